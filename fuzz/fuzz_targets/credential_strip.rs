//! Fuzzes credential stripping: what goes upstream must carry no key.
//!
//! Run with `cargo +nightly fuzz run credential_strip -- -max_total_time=60`.
//! Input format: see `checks::Carriers`. Properties
//! (`checks::credential_strip`): on a keyed route nothing a key could travel
//! in is left, on a public route no bearer token with our prefix, and
//! headers that carry no key pass untouched.
#![no_main]

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::credential_strip(data));
