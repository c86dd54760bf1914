//! What this binary is: its version and the git commit it was built from,
//! for `keygate --version`, the start-up log line and `keygate_build_info`.
//!
//! The commit is set by `build.rs`: `KEYGATE_BUILD_COMMIT` when a package
//! build gives it (a source tarball has no `.git`), else `git rev-parse
//! --short=12 HEAD`, else `unknown`.

/// The crate version (`Cargo.toml`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit, abbreviated to 12 hex digits, or `unknown`.
pub const COMMIT: &str = env!("KEYGATE_COMMIT");

/// What `keygate --version` prints after the name: `0.1.0 (commit 0123456789ab)`.
pub const LONG_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("KEYGATE_COMMIT"), ")");
