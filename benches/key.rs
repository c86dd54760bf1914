//! Run with `cargo bench --bench key` (add `-- --warm-up-time 1 --measurement-time 3` for a quick pass).
//!
//! The key functions on the gateway's hot path, one by one: `parse` (which
//! includes the CRC32 checksum check) runs on every request, `hash_secret` on
//! every verification-cache miss. `generate` is here for scale only (CLI/admin).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use keygate::key::{DEFAULT_PREFIX, generate, hash_secret, parse};

fn key_benches(c: &mut Criterion) {
    // A realistic client ID length; generation itself is checked by the unit tests.
    let Ok(generated) = generate(DEFAULT_PREFIX, "12345-ABCDE") else {
        panic!("generating a key for the benchmark failed");
    };
    let key = generated.key.expose().to_owned();
    let Ok(parsed) = parse(&key, DEFAULT_PREFIX) else {
        panic!("a freshly generated key must parse");
    };
    let secret = parsed.secret.to_owned();

    c.bench_function("parse (valid key, with checksum)", |b| {
        b.iter(|| parse(black_box(&key), black_box(DEFAULT_PREFIX)))
    });
    let mut forged = key.clone();
    forged.replace_range(forged.len() - 1.., if key.ends_with('0') { "1" } else { "0" });
    c.bench_function("parse (bad checksum)", |b| b.iter(|| parse(black_box(&forged), DEFAULT_PREFIX)));
    c.bench_function("hash_secret", |b| b.iter(|| hash_secret(black_box(&secret))));
    c.bench_function("generate", |b| {
        b.iter(|| generate(black_box(DEFAULT_PREFIX), black_box("12345-ABCDE")))
    });
}

criterion_group!(benches, key_benches);
criterion_main!(benches);
