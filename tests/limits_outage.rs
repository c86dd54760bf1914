//! Quotas and shared rate limits while Redis is down (issue 14, item 10).
//!
//! The bug: with the shipped `[limits] fail_open = true`, a 100/day quota
//! admitted 150 of 150 requests once Redis was killed. Now an instance may
//! spend what it already leased plus `outage_allowance` of the quota, then
//! answers 503; shared rate limits fall back to `rate / instances` locally;
//! and what was spent in the outage is written to Redis once it is back.
//!
//! Redis is killed with SIGKILL after a `SAVE`, so the restarted server
//! holds the counters as they were at the kill (a replica or AOF would do
//! the same in production). No sleeps: each phase is bounded by counts, and
//! the recovery is awaited by polling under a deadline.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::gateway::{Answer, TestGateway, http1_client, send};
use common::redis::RedisServer;
use http::Request;
use http_body_util::Full;
use jiff::Timestamp;
use keygate::key::KeyId;
use keygate::limit::quota::Window;
use keygate::meta::{MetaChanges, Quota};

fn config(redis: &RedisServer, limits: &str) -> String {
    format!(
        r#"
[store]
kind = "redis"
url = "{}"

[keys]
cache_ttl = "1h"

[limits]
fail_open = true
quota_lease = 10
{limits}

[usage]
enabled = false

[[route]]
path = "/"
upstream = "builtin:echo"
"#,
        redis.url()
    )
}

async fn issue(gateway: &TestGateway, meta: &str) -> (String, KeyId) {
    let changes = MetaChanges::from_query(meta, Timestamp::now()).unwrap();
    let issued =
        keygate::ops::issue(&*gateway.gateway.store, "kg_", "acme", changes, Timestamp::now()).await.unwrap();
    (issued.key.expose().to_owned(), issued.record.id)
}

async fn call(gateway: &TestGateway, key: &str) -> Answer {
    let request =
        Request::get(gateway.url("/x")).header("x-api-key", key).body(Full::<Bytes>::default()).unwrap();
    send(&http1_client(), request).await
}

/// Sends `n` requests and counts the admitted ones; every refusal must be
/// one of `refusals` (status, error code).
async fn admitted_of(gateway: &TestGateway, key: &str, n: usize, refusals: &[(u16, &str)]) -> usize {
    let mut admitted = 0;
    for _ in 0..n {
        let answer = call(gateway, key).await;
        if answer.status == 200 {
            admitted += 1;
            continue;
        }
        let got = (answer.status.as_u16(), answer.json()["error"].as_str().unwrap_or("").to_owned());
        assert!(
            refusals.iter().any(|(status, code)| got == (*status, (*code).to_owned())),
            "unexpected answer {got:?}: {}",
            answer.text()
        );
    }
    admitted
}

/// Polls until a request is admitted again after Redis came back (the
/// limits retry the store after a short back-off), at most 15 s.
async fn until_admitted(gateway: &TestGateway, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = call(gateway, key).await;
        if answer.status == 200 {
            return;
        }
        assert_eq!(answer.status, 503, "only the outage may refuse here: {}", answer.text());
        assert!(Instant::now() < deadline, "no request admitted within 15 s of Redis coming back");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, bounded by the deadline
    }
}

/// The Redis counter of `id`'s current quota window.
fn granted(redis: &RedisServer, id: &KeyId, quota: &str) -> u64 {
    let quota: Quota = quota.parse().unwrap();
    let window = Window::containing(quota.window, Timestamp::now());
    let key = format!("kg:{{{}}}:quota:{}:{}", id.client(), id.kid(), window.id);
    let granted: Option<u64> = redis.query(redis::cmd("HGET").arg(&key).arg("granted"));
    granted.unwrap_or(0)
}

fn kill_after_save(redis: &mut RedisServer) {
    let _: () = redis.query(&mut redis::cmd("SAVE"));
    redis.stop();
}

const QUOTA: &str = "100/month";
const OUTAGE: &[(u16, &str)] = &[(503, "store_unavailable")];
const EXHAUSTED: &[(u16, &str)] = &[(429, "quota_exceeded")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_quota_spends_only_its_lease_and_the_allowance_while_redis_is_down() {
    let mut redis = RedisServer::start();
    // The default allowance: 1% of the quota, 1 unit of 100.
    let gateway = TestGateway::start(&config(&redis, "")).await;
    let (key, id) = issue(&gateway, &format!("quota={QUOTA}")).await;

    // 25 requests lease three blocks of 10: 5 units stay leased, unspent.
    assert_eq!(admitted_of(&gateway, &key, 25, &[]).await, 25);
    assert_eq!(granted(&redis, &id, QUOTA), 30);

    kill_after_save(&mut redis);
    // 150 requests against a dead Redis: the 5 leased units, plus 1.
    let during = admitted_of(&gateway, &key, 150, OUTAGE).await;
    assert_eq!(during, 5 + 1, "admitted during the outage");

    redis.restart();
    until_admitted(&gateway, &key).await;
    // Back: the outage's unit was written to Redis, so the month's total is
    // exactly the quota, not the quota plus the outage.
    let after = 1 + admitted_of(&gateway, &key, 100, EXHAUSTED).await;
    assert_eq!(25 + during + after, 100, "admitted in all ({during} during, {after} after)");
    assert_eq!(granted(&redis, &id, QUOTA), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_exhausting_a_quota_during_an_outage_stay_within_the_documented_bound() {
    let mut redis = RedisServer::start();
    let limits = "outage_allowance = 0.02";
    let a = TestGateway::start(&config(&redis, limits)).await;
    let b = TestGateway::start(&config(&redis, limits)).await;
    let (key, id) = issue(&a, &format!("quota={QUOTA}")).await;

    // 90 of 100 spent, alternating: each gateway holds a partly spent lease.
    let mut before = 0;
    for _ in 0..45 {
        before += admitted_of(&a, &key, 1, &[]).await + admitted_of(&b, &key, 1, &[]).await;
    }
    assert_eq!(before, 90);

    kill_after_save(&mut redis);
    let during = admitted_of(&a, &key, 100, OUTAGE).await + admitted_of(&b, &key, 100, OUTAGE).await;

    redis.restart();
    // Both drained until Redis says the quota is spent: nothing leased is
    // left anywhere, so Redis's counter is every admitted request.
    let mut after = 0;
    for gateway in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let answer = call(gateway, &key).await;
            match (answer.status.as_u16(), answer.json()["error"].as_str()) {
                (200, _) => after += 1,
                (429, Some("quota_exceeded")) => break,
                (503, Some("store_unavailable")) => {
                    assert!(Instant::now() < deadline, "limits did not recover within 15 s");
                    tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
                }
                other => panic!("unexpected {other:?}: {}", answer.text()),
            }
            assert!(after <= 200, "runaway admissions");
        }
    }
    let total = before + during + after;
    // Q + N x allowance: 100 + 2 x 2.
    eprintln!("two gateways: {before} before, {during} during the outage, {after} after: {total} of 100");
    assert!(total <= 104, "admitted {total}, bound 104");
    assert!(total >= 100, "the quota's own units are all admitted: {total}");
    assert_eq!(granted(&redis, &id, QUOTA), total as u64, "Redis counts every admitted request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_rate_limits_fall_back_to_the_instance_share_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let gateway = TestGateway::start(&config(&redis, "mode = \"redis\"\ninstances = 2")).await;
    // 10 an hour, burst 10: no token comes back while the test runs.
    let (key, _) = issue(&gateway, "rate_limit=10/hour&burst=10").await;
    assert_eq!(admitted_of(&gateway, &key, 1, &[]).await, 1);

    kill_after_save(&mut redis);
    // This instance's share: a burst of 10 / 2 at 10 / 2 an hour.
    let during = admitted_of(&gateway, &key, 20, &[(429, "rate_limited")]).await;
    assert_eq!(during, 5);

    redis.restart();
    // The shared bucket is back, with the 9 tokens it had at the kill: what
    // the fallback admitted is not charged to it (rates are short-lived).
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut admitted = 0;
    while admitted == 0 {
        admitted = admitted_of(&gateway, &key, 1, &[(429, "rate_limited"), (503, "store_unavailable")]).await;
        assert!(Instant::now() < deadline, "the shared rate limit did not come back within 15 s");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, bounded by the deadline
    }
    let rest = admitted_of(&gateway, &key, 20, &[(429, "rate_limited")]).await;
    assert_eq!(admitted + rest, 9, "the shared bucket's tokens, once");
}
