//! Fuzzes the key parser, the gateway's first contact with untrusted input.
//!
//! Run with `cargo +nightly fuzz run parse_key -- -max_total_time=60`.
//! Besides "never panics", it checks what the format promises: whatever
//! parses has a valid client ID, a base62 secret of the fixed length, and
//! re-assembles to exactly the input (`checks::key_parse`).
#![no_main]

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::key_parse(data));
