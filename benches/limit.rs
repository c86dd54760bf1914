//! Run with `cargo bench --bench limit` (add `-- --warm-up-time 1 --measurement-time 3` for a quick pass).
//!
//! The local rate-limit check on the request path: a cached per-key governor
//! limiter looked up by key ID and asked for one cell. Target: under 200 ns.
//! `admit` adds the facade (quota off, rate on) as the handler calls it; it
//! is async but never awaits without a quota, so its loop runs inside one
//! `block_on` (`iter_custom`), as in the verify bench.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use keygate::config::Config;
use keygate::key::{KeyId, SecretHash};
use keygate::limit::rate::LocalRates;
use keygate::limit::{Limits, Subject};
use keygate::meta::{KeyMeta, Rate};
use keygate::store::KeyRecord;

fn limit_benches(c: &mut Criterion) {
    let rates = LocalRates::new(1_000_000, Duration::from_secs(600));
    // A rate no benchmark run can exhaust, so every check is an admission.
    let rate: Rate = "1000000000/s".parse().unwrap_or_else(|e| panic!("{e}"));
    let burst = NonZeroU32::new(1_000_000).unwrap_or(NonZeroU32::MIN);
    let one = NonZeroU32::MIN;
    // 10k other keys in the map, as on a busy gateway.
    for i in 0..10_000 {
        rates.check_one(&format!("client{i}.kid"), rate, burst, one);
    }
    c.bench_function("local rate check (cached limiter)", |b| {
        b.iter(|| black_box(rates.check_one(black_box("acme.Qf3k9ZpA"), rate, burst, one)))
    });

    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        panic!("cannot build a tokio runtime for the benchmark");
    };
    let config = Config::defaults().limits;
    let limits = Limits::new(&config, None);
    let mut meta = KeyMeta::new(jiff::Timestamp::now());
    meta.rate = Some(rate);
    meta.burst = Some(burst);
    let record = KeyRecord { id: KeyId::new("acme", "Qf3k9ZpA"), secret_hash: SecretHash([7; 32]), meta };
    c.bench_function("admit (rate on, quota off)", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(limits.admit(black_box(&[Subject::key(&record)]), one, &config).await).ok();
                }
                start.elapsed()
            })
        })
    });
}

criterion_group!(benches, limit_benches);
criterion_main!(benches);
