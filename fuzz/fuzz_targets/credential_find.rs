//! Fuzzes the credential finder over arbitrary header values and query strings.
//!
//! Run with `cargo +nightly fuzz run credential_find -- -max_total_time=60`.
//! Input format: see `checks::Carriers`. Property (`checks::credential_find`):
//! never panics, and what it returns is a part or a decoding of what was given.
#![no_main]

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::credential_find(data));
