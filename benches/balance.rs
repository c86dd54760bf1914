//! Run with `cargo bench --bench balance` (add `-- --warm-up-time 1 --measurement-time 3` for a quick pass).
//!
//! What each upstream policy costs per request, as `UpstreamPool::forward`
//! pays it: one `Balancer::pick` over the upstream's targets (3 and 10, all
//! healthy, 100 requests outstanding spread over them for
//! `least_outstanding`), and for retries the copy of the request head kept
//! for a second attempt (`Replay::of`, paid only when `retries > 0` and the
//! method is retryable) next to the budget deposit every such request makes.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Request};
use keygate::proxy::Affinity;
use keygate::proxy::balance::{Balancer, Policy, Weighted, stable_hash};
use keygate::proxy::health::{InFlight, PassiveSettings, TargetHealth};
use keygate::proxy::retry::{Replay, RetryBudget};
use tokio::time::Instant;

struct Target {
    health: Arc<TargetHealth>,
    weight: u32,
    name_hash: u64,
}

impl Weighted for Target {
    fn health(&self) -> &TargetHealth {
        &self.health
    }
    fn weight(&self) -> u32 {
        self.weight
    }
    fn name_hash(&self) -> u64 {
        self.name_hash
    }
}

fn targets(count: usize) -> Vec<Target> {
    (0..count)
        .map(|i| {
            let name = format!("http://10.0.0.{i}:8080");
            Target {
                health: TargetHealth::new("bench", &name),
                weight: 1,
                name_hash: stable_hash(name.as_bytes()),
            }
        })
        .collect()
}

fn balance_benches(c: &mut Criterion) {
    let passive = PassiveSettings::default();
    let affinity = Affinity { client: Some("12345-ABCDE"), ip: IpAddr::from([10, 1, 2, 3]) };
    let mut group = c.benchmark_group("pick");
    for count in [3, 10] {
        let set = targets(count);
        // Requests in flight, so least_outstanding compares real numbers.
        let _outstanding: Vec<InFlight> = (0..100).map(|i| set[i % count].health.start_request()).collect();
        for (name, policy) in [
            ("round_robin", Policy::RoundRobin),
            ("least_outstanding", Policy::LeastOutstanding),
            ("client_hash", Policy::ClientHash),
        ] {
            let balancer = Balancer::new(policy, &vec![1; count]);
            group.bench_with_input(BenchmarkId::new(name, count), &set, |b, set| {
                b.iter(|| black_box(balancer.pick(set, black_box(affinity), &[], Instant::now(), &passive)))
            });
        }
    }
    group.finish();

    // A browser-sized head, as the header-rewrite bench uses.
    let mut request = Request::get("/orders/42?expand=items").body(()).unwrap_or_default();
    for (name, value) in [
        ("host", "api.example.com"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-GB,en;q=0.9"),
        ("x-request-id", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("x-forwarded-for", "10.1.2.3"),
        ("x-keygate-client", "12345-ABCDE"),
    ] {
        request.headers_mut().insert(name, HeaderValue::from_static(value));
    }
    let budget = RetryBudget::new(0.2);
    c.bench_function("retry: head kept for a replay + budget deposit", |b| {
        b.iter(|| {
            budget.deposit();
            black_box(Replay::of(black_box(&request), Bytes::new()))
        })
    });
}

criterion_group!(benches, balance_benches);
criterion_main!(benches);
