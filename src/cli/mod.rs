//! The `keygate` command. The top-level command (`serve`, `check`, and the
//! store options) lives here; each group of subcommands has its own file.

pub mod keys;
