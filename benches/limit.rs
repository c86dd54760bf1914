//! Run with `cargo bench --bench limit` (add `-- --warm-up-time 1 --measurement-time 3` for a quick pass).
//!
//! The local rate-limit check on the request path: a cached per-key governor
//! limiter looked up by key ID and asked for one cell. Target: under 200 ns.
//! `admit` adds the facade (quota off, rate on) as the handler calls it.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use keygate::limit::rate::LocalRates;
use keygate::meta::Rate;

fn limit_benches(c: &mut Criterion) {
    let rates = LocalRates::new(1_000_000, Duration::from_secs(600));
    // A rate no benchmark run can exhaust, so every check is an admission.
    let rate: Rate = "1000000000/s".parse().unwrap_or_else(|e| panic!("{e}"));
    let burst = NonZeroU32::new(1_000_000).unwrap_or(NonZeroU32::MIN);
    let one = NonZeroU32::MIN;
    // 10k other keys in the map, as on a busy gateway.
    for i in 0..10_000 {
        rates.check(&format!("client{i}.kid"), rate, burst, one);
    }
    c.bench_function("local rate check (cached limiter)", |b| {
        b.iter(|| black_box(rates.check(black_box("acme.Qf3k9ZpA"), rate, burst, one)))
    });
}

criterion_group!(benches, limit_benches);
criterion_main!(benches);
