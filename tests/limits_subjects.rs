//! Limits with two subjects, a key and its client, decided all or nothing,
//! through `Limits` (the handler's one call) against a real redis-server:
//! one instance, and three instances sharing the Redis in shared mode.
//!
//! Client records are another part of keygate; here the client's limits
//! are handed to `admit` as a subject, exactly as the handler will. Rates
//! are per hour and quotas per day, so no cell or unit comes back while a
//! test runs, however slow the machine: the counts are exact, not luck.

mod common;

use std::num::NonZeroU32;
use std::sync::Arc;

use common::redis::RedisServer;
use keygate::config::{Config, LimitMode, LimitsConfig};
use keygate::error::GatewayError;
use keygate::limit::{Admission, Limits, Subject, SubjectKind};
use keygate::meta::{Quota, Rate};
use redis::aio::ConnectionManager;

fn config(mode: LimitMode) -> LimitsConfig {
    let mut config = Config::defaults().limits;
    config.mode = mode;
    config
}

/// A connection whose replies may take up to 5 s (not the crate's 500 ms):
/// these tests run three redis-servers and 90 tasks at once on a shared
/// machine, and a slow reply must not turn into an outage decision.
async fn connection(redis: &RedisServer) -> ConnectionManager {
    let client = redis::Client::open(redis.url()).unwrap();
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(std::time::Duration::from_secs(5)));
    ConnectionManager::new_with_config(client, config).await.unwrap()
}

/// `n` gateway instances' limits, sharing `redis`.
async fn instances(redis: &RedisServer, n: usize, mode: LimitMode) -> Vec<Arc<Limits>> {
    let mut all = Vec::new();
    for _ in 0..n {
        all.push(Arc::new(Limits::new(&config(mode), Some((connection(redis).await.into(), "kg:")))));
    }
    all
}

fn rate(text: &str) -> Option<Rate> {
    Some(text.parse().unwrap())
}

fn quota(text: &str) -> Option<Quota> {
    Some(text.parse().unwrap())
}

const ONE: NonZeroU32 = NonZeroU32::MIN;

/// A key of client `acme` with its own limits.
fn key(id: &'static str, rate: Option<Rate>, quota: Option<Quota>) -> Subject<'static> {
    Subject { kind: SubjectKind::Key, id, rate, burst: None, quota, credits: None }
}

fn acme(rate: Option<Rate>, quota: Option<Quota>) -> Subject<'static> {
    Subject::client("acme", rate, None, quota)
}

/// What one admission came to: admitted, or the error code and the
/// policy its `RateLimit-Policy` names.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Admitted(Admission),
    Refused { code: &'static str, policy: String },
}

async fn admit(limits: &Limits, mode: LimitMode, subjects: &[Subject<'_>]) -> Outcome {
    match limits.admit(subjects, ONE, &config(mode)).await {
        Ok(admission) => Outcome::Admitted(admission),
        Err(refusal) => {
            let code = match refusal.error {
                GatewayError::RateLimited { .. } => "rate_limited",
                GatewayError::QuotaExceeded { .. } => "quota_exceeded",
                other => panic!("unexpected refusal: {other:?}"),
            };
            let policy = refusal.headers.get("ratelimit-policy").map_or("", |v| v.to_str().unwrap());
            // The policy's name alone: `"client-quota";q=10;w=86400` -> client-quota.
            let policy = policy.split(';').next().unwrap_or("").trim_matches('"').to_owned();
            Outcome::Refused { code, policy }
        }
    }
}

async fn admitted(limits: &Limits, mode: LimitMode, subjects: &[Subject<'_>], times: usize) -> usize {
    let mut passed = 0;
    for _ in 0..times {
        passed += usize::from(matches!(admit(limits, mode, subjects).await, Outcome::Admitted(_)));
    }
    passed
}

// === One instance ===

/// Both modes on one instance: the same answers.
async fn a_client_quota_shared_by_its_keys(mode: LimitMode) {
    let redis = RedisServer::start();
    let limits = &instances(&redis, 1, mode).await[0];
    let client = acme(None, quota("10/day"));
    let tight = key("acme.k1", None, quota("4/day"));
    let roomy = key("acme.k2", None, quota("100/day"));

    // The tight key: 4 of 6, its own quota refuses the other 2 (the
    // client's quota named first, so its unit is taken before the key
    // refuses, and must go back) ...
    assert_eq!(admitted(limits, mode, &[client, tight], 4).await, 4);
    for _ in 0..2 {
        let outcome = admit(limits, mode, &[client, tight]).await;
        assert_eq!(outcome, Outcome::Refused { code: "quota_exceeded", policy: "quota".into() });
    }
    // ... which spent nothing of the client's: exactly 6 of its 10 are left.
    let Outcome::Admitted(first) = admit(limits, mode, &[roomy, client]).await else { panic!("refused") };
    assert_eq!(first.client.quota.unwrap().remaining, 5, "the client's 10, minus 4, minus this one");
    assert_eq!(first.key.quota.unwrap().remaining, 99);
    assert_eq!(admitted(limits, mode, &[roomy, client], 20).await, 5);
    let outcome = admit(limits, mode, &[roomy, client]).await;
    assert_eq!(outcome, Outcome::Refused { code: "quota_exceeded", policy: "client-quota".into() });

    // The client's refusals spent nothing of the roomy key's: with the
    // client's quota raised, exactly 100 - 6 are left.
    let raised = acme(None, quota("1000/day"));
    assert_eq!(admitted(limits, mode, &[roomy, raised], 200).await, 94);
}

#[tokio::test]
async fn one_instance_local_mode_a_client_quota_is_shared_and_a_refusal_by_either_spends_nothing_of_the_other()
 {
    a_client_quota_shared_by_its_keys(LimitMode::Local).await;
}

#[tokio::test]
async fn one_instance_shared_mode_a_client_quota_is_shared_and_a_refusal_by_either_spends_nothing_of_the_other()
 {
    a_client_quota_shared_by_its_keys(LimitMode::Redis).await;
}

async fn a_client_rate_shared_by_its_keys(mode: LimitMode) {
    let redis = RedisServer::start();
    let limits = &instances(&redis, 1, mode).await[0];
    let client = acme(rate("10/h"), None);
    let tight = key("acme.k1", rate("3/h"), None);
    let open = key("acme.k2", None, None);
    let other = key("acme.k3", rate("5/h"), None);

    // The tight key's own rate refuses 2 of 5, spending none of the client's cells.
    assert_eq!(admitted(limits, mode, &[tight, client], 3).await, 3);
    let outcome = admit(limits, mode, &[tight, client]).await;
    assert_eq!(outcome, Outcome::Refused { code: "rate_limited", policy: "rate".into() });
    // So exactly 7 of the client's 10 are left for its other keys.
    assert_eq!(admitted(limits, mode, &[open, client], 20).await, 7);
    // Now the client refuses, and spends nothing of a key's own rate.
    for _ in 0..5 {
        let outcome = admit(limits, mode, &[other, client]).await;
        assert_eq!(outcome, Outcome::Refused { code: "rate_limited", policy: "client-rate".into() });
    }
    assert_eq!(admitted(limits, mode, &[other], 10).await, 5, "all 5 of its own cells are left");
}

#[tokio::test]
async fn one_instance_local_mode_a_client_rate_is_shared_and_a_refusal_by_either_spends_nothing_of_the_other()
{
    a_client_rate_shared_by_its_keys(LimitMode::Local).await;
}

#[tokio::test]
async fn one_instance_shared_mode_a_client_rate_is_shared_and_a_refusal_by_either_spends_nothing_of_the_other()
 {
    a_client_rate_shared_by_its_keys(LimitMode::Redis).await;
}

#[tokio::test]
async fn a_rate_refusal_by_the_client_gives_back_the_quota_units_of_both() {
    let redis = RedisServer::start();
    let mode = LimitMode::Redis;
    let limits = &instances(&redis, 1, mode).await[0];
    let client = acme(rate("2/h"), quota("5/day"));
    let k1 = key("acme.k1", None, quota("5/day"));
    assert_eq!(admitted(limits, mode, &[k1, client], 2).await, 2);
    for _ in 0..10 {
        let outcome = admit(limits, mode, &[k1, client]).await;
        assert_eq!(outcome, Outcome::Refused { code: "rate_limited", policy: "client-rate".into() });
    }
    // Lift the client's rate: 3 units are left of each quota, not fewer.
    let unlimited = acme(None, quota("5/day"));
    let Outcome::Admitted(admission) = admit(limits, mode, &[k1, unlimited]).await else { panic!("refused") };
    assert_eq!(admission.key.quota.unwrap().remaining, 2);
    assert_eq!(admission.client.quota.unwrap().remaining, 2);
}

// === Three instances sharing one Redis ===

/// 30 concurrent clients over three instances, client `t` on instance
/// `t % 3` with key `keys[t % keys.len()]`, each trying `each` times.
/// Returns how many each key got admitted.
async fn hammer(
    limits: &[Arc<Limits>],
    keys: &[Subject<'static>],
    client: Subject<'static>,
    each: usize,
) -> Vec<usize> {
    let mut tasks = Vec::new();
    for t in 0..30 {
        let limits = Arc::clone(&limits[t % limits.len()]);
        let (k, key) = (t % keys.len(), keys[t % keys.len()]);
        tasks.push(tokio::spawn(async move {
            (k, admitted(&limits, LimitMode::Redis, &[key, client], each).await)
        }));
    }
    let mut per_key = vec![0; keys.len()];
    for task in tasks {
        let (k, passed) = task.await.unwrap();
        per_key[k] += passed;
    }
    per_key
}

/// Six keys, three of them tight. Key `t % 6` is always on instance `t % 3`.
fn six_keys(tight_rate: Option<Rate>, tight_quota: Option<Quota>) -> Vec<Subject<'static>> {
    ["acme.k0", "acme.k1", "acme.k2", "acme.k3", "acme.k4", "acme.k5"]
        .into_iter()
        .enumerate()
        .map(|(i, id)| if i < 3 { key(id, tight_rate, tight_quota) } else { key(id, None, None) })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_a_client_quota_is_exact_and_its_keys_refusals_spend_none_of_it() {
    let redis = RedisServer::start();
    let limits = instances(&redis, 3, LimitMode::Redis).await;
    let keys = six_keys(None, quota("3/day"));
    // 1200 attempts against a client quota of 120; the tight keys' own
    // quotas refuse most of theirs.
    let per_key = hammer(&limits, &keys, acme(None, quota("120/day")), 40).await;
    eprintln!("client quota 120 over 3 instances, admitted per key: {per_key:?}");
    for tight in &per_key[..3] {
        assert!(*tight <= 3, "a key's own quota holds: {per_key:?}");
    }
    // Exactly the client's quota: the keys' refusals took none of it, and
    // the instances together took no more.
    assert_eq!(per_key.iter().sum::<usize>(), 120, "{per_key:?}");
    let window =
        keygate::limit::quota::Window::containing(keygate::meta::QuotaWindow::Day, jiff::Timestamp::now());
    let counter: std::collections::HashMap<String, u64> =
        redis.query(redis::cmd("HGETALL").arg(format!("kg:{{acme}}:quota:_client:{}", window.id)));
    assert_eq!((counter["limit"], counter["granted"]), (120, 120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_a_client_quota_refusal_spends_nothing_of_its_keys() {
    let redis = RedisServer::start();
    let limits = instances(&redis, 3, LimitMode::Redis).await;
    let keys: Vec<Subject<'static>> = six_keys(None, quota("30/day"))
        .into_iter()
        .map(|k| Subject { quota: quota("30/day"), ..k })
        .collect();
    let per_key = hammer(&limits, &keys, acme(None, quota("60/day")), 40).await;
    assert_eq!(per_key.iter().sum::<usize>(), 60, "{per_key:?}");
    // The client's quota raised: each key has exactly 30 minus what it got,
    // on the instance that serves it.
    let raised = acme(None, quota("100000/day"));
    for (k, key) in keys.iter().enumerate() {
        let left = admitted(&limits[k % 3], LimitMode::Redis, &[*key, raised], 40).await;
        assert_eq!(left, 30 - per_key[k], "key {k}: {per_key:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_a_client_rate_holds_its_bound_and_its_keys_refusals_spend_none_of_it() {
    let redis = RedisServer::start();
    let limits = instances(&redis, 3, LimitMode::Redis).await;
    let keys = six_keys(rate("2/h"), None);
    // 40 an hour for the whole client; the tight keys allow 2 each.
    let per_key = hammer(&limits, &keys, acme(rate("40/h"), None), 20).await;
    eprintln!("client rate 40/h over 3 instances, admitted per key: {per_key:?}");
    for tight in &per_key[..3] {
        assert!(*tight <= 2, "a key's own rate holds: {per_key:?}");
    }
    // The documented bound is burst + rate x elapsed: at 40/h a test of a
    // few seconds earns no extra cell, and a slice is one token, so none is
    // stranded. Exactly the burst: the keys' refusals took none of it.
    assert_eq!(per_key.iter().sum::<usize>(), 40, "{per_key:?}");
}
