//! Run with `cargo bench --bench tokens` (add `-- --warm-up-time 1 --measurement-time 3` for a quick pass).
//!
//! Access-token verification (`auth::jwt::TokenVerifier::verify`), the two
//! costs issue 20 compares: a token seen for the first time (header,
//! Ed25519 signature, claims), and the same token again (SHA-256 of its
//! text, one cache lookup, its `exp`). Target: cached < 1 µs, no more than
//! a cached key (`benches/verify.rs`). A third row is a forged token under
//! an unknown `kid`: refused before any signature check.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use keygate::auth::jwt::{TokenKeys, TokenVerifier};
use keygate::config::TokensConfig;

const NOW: u64 = 1_800_000_000;

fn token_benches(c: &mut Criterion) {
    let config = TokensConfig { enabled: true, ..TokensConfig::default() };
    let Ok(keys) = TokenKeys::load(&config) else { panic!("cannot generate a signing key") };
    let keys = Arc::new(keys);
    let scopes = vec!["read".to_owned(), "orders:write".to_owned()];

    // First seen: a fresh verifier (empty cache) per iteration, built
    // outside the measurement.
    let (token, _) = keys.issue("acme", "acme.k1", &scopes, NOW);
    c.bench_function("token verify (first seen)", |b| {
        b.iter_batched(
            || TokenVerifier::new(Arc::clone(&keys), 16),
            |verifier| black_box(verifier.verify(black_box(&token), NOW).is_ok()),
            BatchSize::SmallInput,
        )
    });

    let verifier = TokenVerifier::new(Arc::clone(&keys), 1000);
    assert!(verifier.verify(&token, NOW).is_ok(), "the token verifies");
    c.bench_function("token verify (cached)", |b| {
        b.iter(|| black_box(verifier.verify(black_box(&token), NOW).is_ok()))
    });

    let Ok(other) = TokenKeys::load(&config) else { panic!("cannot generate a signing key") };
    let (forged, _) = other.issue("acme", "acme.k1", &scopes, NOW);
    c.bench_function("token verify (unknown kid, refused)", |b| {
        b.iter(|| black_box(verifier.verify(black_box(&forged), NOW).is_err()))
    });
}

criterion_group!(benches, token_benches);
criterion_main!(benches);
