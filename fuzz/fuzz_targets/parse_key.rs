//! Fuzzes the key parser, the gateway's first contact with untrusted input.
//!
//! Run with `cargo +nightly fuzz run parse_key -- -max_total_time=30`.
//! Besides "never panics", it checks what the format promises: whatever
//! parses has a valid client ID, a base62 secret of the fixed length, and
//! re-assembles to exactly the input.
#![no_main]

use keygate::key::{self, DEFAULT_PREFIX, SECRET_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    for prefix in [DEFAULT_PREFIX, "acme_live_", ""] {
        if let Ok(parsed) = key::parse(input, prefix) {
            assert!(key::validate_client_id(parsed.client).is_ok());
            assert_eq!(parsed.secret.len(), SECRET_LEN);
            assert!(parsed.secret.bytes().all(|b| b.is_ascii_alphanumeric()));
            let rebuilt = format!("{prefix}{}_{}", parsed.client, parsed.secret);
            assert!(input.starts_with(&rebuilt));
            assert_eq!(input.len(), rebuilt.len() + key::CHECKSUM_LEN);
        }
    }
});
