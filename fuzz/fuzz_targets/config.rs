//! Fuzzes the config loader: `keygate check` and every reload parse text an
//! operator (or a broken deploy) wrote.
//!
//! Run with `cargo +nightly fuzz run config -- -max_total_time=60`.
//! Properties (`checks::config`): never panics, and a config that loads
//! keeps its routes through a write-back-and-load round trip.
#![no_main]

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::config(data));
