//! Limits shared by several gateway instances through one real Redis.
//!
//! Time is a hand-driven clock, so "10 seconds at 3x the limit" runs in
//! milliseconds and the counts are exact, not luck.

mod common;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::redis::RedisServer;
use jiff::Timestamp;
use keygate::limit::SubjectKind;
use keygate::limit::quota::{QuotaDecision, Quotas};
use keygate::limit::rate::RateDecision;
use keygate::limit::shared::{LimitKeys, MicrosClock, RedisQuotaAuthority, SharedRates};
use keygate::meta::{Quota, Rate};
use redis::aio::ConnectionManager;

/// A wall clock that moves only when told to.
struct ManualClock(AtomicU64);

impl ManualClock {
    fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_micros() as u64, Ordering::SeqCst);
    }
}

impl MicrosClock for ManualClock {
    fn now_micros(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

async fn connection(redis: &RedisServer) -> ConnectionManager {
    let client = redis::Client::open(redis.url()).unwrap();
    ConnectionManager::new(client).await.unwrap()
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

fn lease_calls(redis: &RedisServer) -> u64 {
    redis.command_count("evalsha") + redis.command_count("eval")
}

#[tokio::test]
async fn three_instances_at_three_times_the_limit_admit_the_ideal_within_five_percent() {
    let redis = RedisServer::start();
    let clock = Arc::new(ManualClock(AtomicU64::new(1_700_000_000_000_000)));
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(SharedRates::with_clock(
            connection(&redis).await,
            LimitKeys::new("kg:"),
            0.05,
            Duration::from_secs(1),
            clock.clone(),
        ));
    }
    let rate: Rate = "100/s".parse().unwrap();
    let burst = nz(100);

    // 300 requests a second for 10 s, spread round robin over the instances.
    let mut admitted = 0u64;
    for i in 0..3000 {
        let decision = instances[i % 3].check_one("acme.k1", rate, burst, nz(1)).await.unwrap();
        if matches!(decision, RateDecision::Allowed { .. }) {
            admitted += 1;
        }
        clock.advance(Duration::from_micros(3333));
    }
    let ideal = 100.0 + 100.0 * 10.0;
    let error = (admitted as f64 - ideal).abs() / ideal;
    eprintln!(
        "shared rate, 3 instances, 10 s at 3x: admitted {admitted} of ideal {ideal} ({:+.2}%)",
        (admitted as f64 - ideal) / ideal * 100.0
    );
    assert!(error <= 0.05, "admitted {admitted}, ideal {ideal}, error {:.1}%", error * 100.0);
    // The bucket never hands out more than burst + rate x elapsed.
    assert!(admitted as f64 <= ideal, "over-admitted: {admitted} > {ideal}");
}

#[tokio::test]
async fn at_1000_requests_a_second_per_key_at_least_95_percent_need_no_redis_call() {
    let redis = RedisServer::start();
    let clock = Arc::new(ManualClock(AtomicU64::new(1_700_000_000_000_000)));
    let rates = SharedRates::with_clock(
        connection(&redis).await,
        LimitKeys::new("kg:"),
        0.05,
        Duration::from_secs(1),
        clock.clone(),
    );
    let rate: Rate = "1000/s".parse().unwrap();
    redis.reset_stats();
    let mut admitted = 0;
    for _ in 0..2000 {
        if matches!(
            rates.check_one("acme.k1", rate, nz(1000), nz(1)).await.unwrap(),
            RateDecision::Allowed { .. }
        ) {
            admitted += 1;
        }
        clock.advance(Duration::from_millis(1));
    }
    let calls = lease_calls(&redis);
    eprintln!(
        "shared rate at 1000 req/s: {calls} Redis calls for 2000 requests ({:.1}%)",
        calls as f64 / 20.0
    );
    assert_eq!(admitted, 2000, "1000/s at exactly 1000/s is never refused");
    assert!(calls * 20 <= 2000, "{calls} Redis calls for 2000 requests (more than 5%)");
}

#[tokio::test]
async fn a_refused_instance_does_not_ask_redis_again_until_tokens_are_due() {
    let redis = RedisServer::start();
    let clock = Arc::new(ManualClock(AtomicU64::new(1_700_000_000_000_000)));
    let rates = SharedRates::with_clock(
        connection(&redis).await,
        LimitKeys::new("kg:"),
        0.05,
        Duration::from_secs(1),
        clock.clone(),
    );
    let rate: Rate = "1/min".parse().unwrap();
    assert!(matches!(
        rates.check_one("acme.k1", rate, nz(1), nz(1)).await.unwrap(),
        RateDecision::Allowed { .. }
    ));
    redis.reset_stats();
    for _ in 0..100 {
        match rates.check_one("acme.k1", rate, nz(1), nz(1)).await.unwrap() {
            RateDecision::Refused { retry_after } => assert!(retry_after <= Duration::from_secs(60)),
            other => panic!("{other:?}"),
        }
    }
    assert!(lease_calls(&redis) <= 1, "a flood of refused requests costs at most one Redis call");
    clock.advance(Duration::from_secs(60));
    assert!(matches!(
        rates.check_one("acme.k1", rate, nz(1), nz(1)).await.unwrap(),
        RateDecision::Allowed { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_is_exact_across_three_instances_under_concurrent_clients() {
    let redis = RedisServer::start();
    let mut instances = Vec::new();
    for _ in 0..3 {
        let authority = RedisQuotaAuthority::new(connection(&redis).await, LimitKeys::new("kg:"));
        instances.push(Arc::new(Quotas::new(Arc::new(authority), 100, 1000)));
    }
    let quota: Quota = "500/day".parse().unwrap();
    let now = Timestamp::now();
    let mut clients = Vec::new();
    for client in 0..30 {
        let quotas = Arc::clone(&instances[client % 3]);
        clients.push(tokio::spawn(async move {
            let mut taken = 0u64;
            for _ in 0..50 {
                if let QuotaDecision::Taken { .. } =
                    quotas.take(SubjectKind::Key, "acme.k1", quota, nz(1), now).await.unwrap()
                {
                    taken += 1;
                }
            }
            taken
        }));
    }
    let mut total = 0;
    for client in clients {
        total += client.await.unwrap();
    }
    // 1500 attempts against a quota of 500: never more, and leases that
    // shrink near the end leave nothing stranded here.
    assert_eq!(total, 500);
    let window = keygate::limit::quota::Window::containing(quota.window, now);
    let counter: std::collections::HashMap<String, u64> =
        redis.query(redis::cmd("HGETALL").arg(format!("kg:{{acme}}:quota:k1:{}", window.id)));
    assert_eq!(counter["limit"], 500);
    assert_eq!(counter["granted"], 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_in_shared_mode_admit_the_burst_once_between_them() {
    use bytes::Bytes;
    use common::gateway::{TestGateway, http1_client, send};
    use http_body_util::Full;

    let redis = RedisServer::start();
    let config = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\n\n[limits]\nmode = \"redis\"\n\n[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n",
        redis.url()
    );
    let a = TestGateway::start(&config).await;
    let b = TestGateway::start(&config).await;
    let changes =
        keygate::meta::MetaChanges::from_query("rate_limit=10/min&burst=10", Timestamp::now()).unwrap();
    let issued =
        keygate::ops::issue(&*a.gateway.store, "kg_", "acme", changes, Timestamp::now()).await.unwrap();
    let key = issued.key.expose().to_owned();

    let client = http1_client();
    let mut passed = 0;
    for i in 0..20 {
        let gateway = if i % 2 == 0 { &a } else { &b };
        let request = http::Request::get(gateway.url("/x"))
            .header("x-api-key", &key)
            .body(Full::<Bytes>::default())
            .unwrap();
        let answer = send(&client, request).await;
        match answer.status.as_u16() {
            200 => passed += 1,
            429 => assert_eq!(answer.json()["error"], "rate_limited"),
            other => panic!("unexpected {other}: {}", answer.text()),
        }
    }
    // One bucket for both: ten in all, not ten each.
    assert_eq!(passed, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_quota_is_exact_across_instances_and_frees_units_as_they_age_out() {
    let redis = RedisServer::start();
    let mut instances = Vec::new();
    for _ in 0..3 {
        let authority = RedisQuotaAuthority::new(connection(&redis).await, LimitKeys::new("kg:"));
        instances.push(Arc::new(Quotas::new(Arc::new(authority), 100, 1000)));
    }
    let quota: Quota = "300/rolling-1d".parse().unwrap();
    let midnight: Timestamp = "2026-11-24T00:00:00Z".parse().unwrap();
    let at = |hours: i64| midnight.checked_add(jiff::SignedDuration::from_hours(hours)).unwrap();

    // 30 concurrent clients over three instances at 01:00: exactly 300 of 1200 pass.
    let take_all = |now: Timestamp, clients: usize, each: usize| {
        let instances = instances.clone();
        async move {
            let mut tasks = Vec::new();
            for client in 0..clients {
                let quotas = Arc::clone(&instances[client % 3]);
                tasks.push(tokio::spawn(async move {
                    let mut taken = 0u64;
                    for _ in 0..each {
                        if let QuotaDecision::Taken { .. } =
                            quotas.take(SubjectKind::Key, "acme.k1", quota, nz(1), now).await.unwrap()
                        {
                            taken += 1;
                        }
                    }
                    taken
                }));
            }
            let mut total = 0;
            for task in tasks {
                total += task.await.unwrap();
            }
            total
        }
    };
    // Each instance's clients want more than the whole quota, so no lease is
    // left unspent (leases may strand at most one per instance otherwise).
    assert_eq!(take_all(at(1), 30, 40).await, 300);
    // Still inside the day: nothing more, and the refusal says when room frees.
    match instances[0].take(SubjectKind::Key, "acme.k1", quota, nz(1), at(20)).await.unwrap() {
        QuotaDecision::Exhausted { retry_after } => assert_eq!(retry_after, Duration::from_secs(5 * 3600)),
        other => panic!("{other:?}"),
    }
    // A day after 01:00 those units have left the window, on every instance.
    assert_eq!(take_all(at(25), 30, 40).await, 300);
}
