//! Fuzzes the path canonicaliser, on which every route and scope decision rests.
//!
//! Run with `cargo +nightly fuzz run normalize_path -- -max_total_time=60`.
//! Properties (`checks::normalize_path`): idempotent, absolute, and free of
//! `//`, `/./`, `/../` and `\`.
#![no_main]

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::normalize_path(data));
