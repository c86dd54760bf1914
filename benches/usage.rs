//! Run with `cargo bench --bench usage` (add `-- --warm-up-time 1 --measurement-time 3` for a quick pass).
//!
//! `UsageRecorder::record`, the only usage code on the request path, on one
//! thread: the steady state (the series exists: lock, hash, add) and the
//! first event of a series in a flush interval (which allocates the key).
//! Then the usage thread's work per flush, off the request path but on the
//! same cores: adding a drained batch to the ledger (per series), and
//! building the `HSET`s of 1000 clients' buckets (per client and bucket).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use jiff::Timestamp;
use keygate::usage::ledger::Ledger;
use keygate::usage::recorder::{Batch, Series, SeriesKey};
use keygate::usage::writes::Trip;
use keygate::usage::{Counts, Granularity, Retention, UsageEvent, UsageRecorder};

fn event(at: Timestamp) -> UsageEvent<'static> {
    UsageEvent {
        client: Some("12345-ABCDE"),
        key_id: Some("12345-ABCDE.k7Qm2xAb"),
        route: "/api/v1/orders",
        status: 200,
        refusal: None,
        bytes_in: 512,
        bytes_out: 4096,
        credits: 0,
        upstream_latency: Some(Duration::from_micros(1800)),
        tunnel: None,
        at,
    }
}

fn usage_benches(c: &mut Criterion) {
    let at = Timestamp::now();
    let recorder = UsageRecorder::new();
    let hot = event(at);
    recorder.record(&hot);
    c.bench_function("record (existing series)", |b| b.iter(|| recorder.record(black_box(&hot))));

    c.bench_function("record (new series: first event after a flush)", |b| {
        b.iter_batched_ref(UsageRecorder::new, |fresh| fresh.record(black_box(&hot)), BatchSize::SmallInput)
    });

    // 1000 clients' series in one shard: a busy gateway's map size.
    let clients: Vec<String> = (0..1000).map(|i| format!("client-{i}")).collect();
    let busy = UsageRecorder::new();
    for client in &clients {
        busy.record(&UsageEvent { client: Some(client), ..event(at) });
    }
    let mut i = 0;
    c.bench_function("record (existing series, 1000 series in the shard)", |b| {
        b.iter(|| {
            i = (i + 1) % clients.len();
            busy.record(black_box(&UsageEvent { client: Some(&clients[i]), ..event(at) }))
        })
    });

    // Contention: the same series recorded from one thread, then from two at
    // once (this machine has two cores). Per-thread shards should keep the
    // per-event time of two threads close to one thread's.
    let shared = std::sync::Arc::new(UsageRecorder::new());
    for threads in [1usize, 2] {
        let name = format!("record (existing series, {threads} thread(s) at once, time per event)");
        c.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let started = std::time::Instant::now();
                std::thread::scope(|scope| {
                    for _ in 0..threads {
                        let shared = &shared;
                        let hot = &hot;
                        scope.spawn(move || {
                            for _ in 0..iters {
                                shared.record(black_box(hot));
                            }
                        });
                    }
                });
                started.elapsed()
            })
        });
    }
}

/// A tick's drained batch: 10 000 series, 1000 clients of 10 keys, one route.
fn batch(minute: i64) -> Batch {
    let counts = Counts {
        requests: 3,
        status_2xx: 3,
        bytes_in: 1536,
        bytes_out: 12_288,
        upstream_requests: 3,
        upstream_latency_us: 5400,
        ..Counts::default()
    };
    (0..10_000)
        .map(|i| {
            let client = format!("client-{}", i / 10);
            let key = SeriesKey::new(&client, &format!("k{}", i % 10), "/api/v1/orders", minute);
            (key, Series::from_counts(&counts, 7))
        })
        .collect()
}

fn flush_benches(c: &mut Criterion) {
    let minute = Granularity::Minute.bucket_start(Timestamp::now().as_second());
    let mut group = c.benchmark_group("usage thread");
    group.throughput(criterion::Throughput::Elements(10_000));
    // Series already in the ledger (the steady state of a busy minute).
    let mut ledger = Ledger::with_writer("bench", 10_000_000);
    ledger.add(batch(minute));
    group.bench_function("ledger add (10 000 known series, per series)", |b| {
        b.iter_batched(|| batch(minute), |drained| ledger.add(drained), BatchSize::LargeInput)
    });
    group.throughput(criterion::Throughput::Elements(1000));
    let keys = keygate::usage::schema::UsageKeys::new("kg:");
    let retention = Retention::default();
    let bucket = (Granularity::Minute, minute);
    let clients: Vec<String> = (0..1000).map(|i| format!("client-{i}")).collect();
    group.bench_function("build HSETs (1000 clients' minute buckets of 10 keys, per client)", |b| {
        b.iter(|| {
            let mut trip = Trip::new();
            for client in &clients {
                if let Some(totals) = ledger.totals(bucket, client) {
                    trip.push_bucket(&keys, &retention, (bucket, client), totals, "bench.0");
                }
            }
            black_box(trip.fields())
        })
    });
    group.finish();
}

criterion_group!(benches, usage_benches, flush_benches);
criterion_main!(benches);
