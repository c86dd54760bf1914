//! Run with `cargo bench --bench verify` (add `-- --warm-up-time 1 --measurement-time 3` for a quick pass).
//!
//! A cache-hit verification, the work every request with a known key pays:
//! parse and checksum the key, hash its secret, look the hash up in the
//! in-process cache, check status and expiry. No store call happens; the
//! store (a `FileStore` in a temporary folder) is only there to warm the cache.
//!
//! `verify` is async but never awaits on a cache hit, so the loop runs inside
//! one `block_on` on a current-thread runtime (`iter_custom`): the runtime's
//! per-call entry cost is not measured, and criterion needs no async feature.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use keygate::auth::Verifier;
use keygate::config::Config;
use keygate::meta::MetaChanges;
use keygate::store::SharedStore;
use keygate::store::file::FileStore;

fn verify_benches(c: &mut Criterion) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        panic!("cannot build a tokio runtime for the benchmark");
    };
    let Ok(dir) = tempfile::tempdir() else { panic!("cannot create a temporary folder") };
    let keys = Config::defaults().keys;
    // The peer's address: its failed-authentication budget is checked first.
    let source = std::net::IpAddr::from([192, 0, 2, 1]);

    let (verifier, key) = rt.block_on(async {
        let store: SharedStore = match FileStore::open(dir.path()).await {
            Ok(store) => Arc::new(store),
            Err(e) => panic!("opening the file store: {e}"),
        };
        let issued = match keygate::ops::issue(
            &*store,
            &keys.prefix,
            "12345-ABCDE",
            MetaChanges::default(),
            jiff::Timestamp::now(),
        )
        .await
        {
            Ok(issued) => issued,
            Err(e) => panic!("issuing the benchmark key: {e}"),
        };
        let verifier = Verifier::new(store, &keys);
        let key = issued.key.expose().to_owned();
        // Warm the cache: the first call reads the store, every later one hits.
        if let Err(e) = verifier.verify(&key, source, Instant::now()).await {
            panic!("the issued key must verify: {e}");
        }
        assert_eq!(verifier.cached_len(), 1, "the key is cached");
        (verifier, key)
    });

    c.bench_function("verify (cache hit)", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    // The request's arrival instant, which the handler reads
                    // for its own use and passes in.
                    black_box(verifier.verify(black_box(&key), source, start).await).ok();
                }
                start.elapsed()
            })
        })
    });
}

criterion_group!(benches, verify_benches);
criterion_main!(benches);
