//! The gateway against a real redis-server that misbehaves (issue 14,
//! "Faults", Redis side): down at start, killed mid-run, paused, restarted
//! empty, and holding values of the wrong type.
//!
//! Every wait is on a condition under a deadline; latency bounds are
//! asserted by waiting with a timeout, not by measuring sleeps.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::binary::Served;
use common::gateway::{Answer, TestGateway, http1_client, send};
use common::redis::RedisServer;
use http::Request;
use http_body_util::Full;
use jiff::Timestamp;
use keygate::meta::MetaChanges;
use keygate::store::redis::RedisStore;

fn config(redis: &RedisServer, keys: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[store]
kind = "redis"
url = "{}"

[keys]
{keys}

[usage]
enabled = false

[[route]]
path = "/health"
upstream = "builtin:echo"
public = true

[[route]]
path = "/"
upstream = "builtin:echo"
"#,
        redis.url()
    )
}

/// Issues a key straight into `redis` and returns the key string.
async fn issue(redis: &RedisServer, meta: &str) -> String {
    let store = RedisStore::connect(&redis.url(), "kg:").await.unwrap();
    let changes = MetaChanges::from_query(meta, Timestamp::now()).unwrap();
    keygate::ops::issue(&store, "kg_", "acme", changes, Timestamp::now())
        .await
        .unwrap()
        .key
        .expose()
        .to_owned()
}

async fn call(base: &str, key: Option<&str>, path: &str) -> Answer {
    let mut request = Request::get(format!("{base}{path}"));
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    send(&http1_client(), request.body(Full::<Bytes>::default()).unwrap()).await
}

fn error_code(answer: &Answer) -> String {
    answer.json()["error"].as_str().unwrap_or_default().to_owned()
}

/// Calls until the answer has `status` (15 s at most); returns that answer.
async fn until_status(base: &str, key: &str, status: u16) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = call(base, Some(key), "/x").await;
        if answer.status == status {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "no {status} within 15 s; last: {} {}",
            answer.status,
            answer.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, bounded by the deadline
    }
}

fn save_and_kill(redis: &mut RedisServer) {
    let _: () = redis.query(&mut redis::cmd("SAVE"));
    redis.stop();
}

/// Resumes a SIGSTOPped Redis even if the test fails half way.
struct Stopped(u32);

impl Stopped {
    fn pause(redis: &RedisServer) -> Stopped {
        let info: String = redis.query(redis::cmd("INFO").arg("server"));
        let pid: u32 = info
            .lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .and_then(|pid| pid.trim().parse().ok())
            .expect("INFO server names the process");
        assert!(Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_serve_starts_with_redis_down_and_verifies_keys_once_it_is_up() {
    let mut redis = RedisServer::start();
    let key = issue(&redis, "scope=read").await;
    save_and_kill(&mut redis);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config(&redis, "")).unwrap();
    let mut served = Served::start(&path, &[]);
    served.wait_for_line("Redis is unreachable at start");
    let base = format!("http://{}", served.gateway_address());

    // Public routes need no store; a key it cannot vouch for is 503.
    assert_eq!(call(&base, None, "/health").await.status, 200);
    let refused = call(&base, Some(&key), "/x").await;
    assert_eq!((refused.status.as_u16(), error_code(&refused)), (503, "store_unavailable".to_owned()));

    // Redis comes up with the key: verified without a gateway restart.
    redis.restart();
    until_status(&base, &key, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_keeps_cached_keys_working_and_everything_recovers_after_restart() {
    let mut redis = RedisServer::start();
    // Every request past 1 ms revalidates, so the stale path is what serves.
    let gateway = TestGateway::start(&config(&redis, "cache_ttl = \"1ms\"\nstale_window = \"5m\"")).await;
    let base = format!("http://{}", gateway.addr);
    let cached = issue(&redis, "scope=read").await;
    let uncached = issue(&redis, "scope=read").await;
    assert_eq!(call(&base, Some(&cached), "/x").await.status, 200);

    save_and_kill(&mut redis);
    for _ in 0..5 {
        assert_eq!(call(&base, Some(&cached), "/x").await.status, 200, "cached key within stale_window");
        let refused = call(&base, Some(&uncached), "/x").await;
        assert_eq!((refused.status.as_u16(), error_code(&refused)), (503, "store_unavailable".to_owned()));
    }

    redis.restart();
    until_status(&base, &uncached, 200).await;
    assert_eq!(call(&base, Some(&cached), "/x").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_delays_no_cached_key_and_uncached_ones_get_503_within_the_deadline() {
    let redis = RedisServer::start();
    let gateway = TestGateway::start(&config(&redis, "cache_ttl = \"1h\"")).await;
    let base = format!("http://{}", gateway.addr);
    let cached = issue(&redis, "scope=read").await;
    let uncached = issue(&redis, "scope=read").await;
    assert_eq!(call(&base, Some(&cached), "/x").await.status, 200);

    let paused = Stopped::pause(&redis);
    for _ in 0..5 {
        let answer = tokio::time::timeout(Duration::from_millis(500), call(&base, Some(&cached), "/x"))
            .await
            .expect("a cached key does not wait for a paused Redis");
        assert_eq!(answer.status, 200);
    }
    let refused = tokio::time::timeout(Duration::from_secs(2), call(&base, Some(&uncached), "/x"))
        .await
        .expect("an uncached key is refused within 2 s while Redis is paused");
    assert_eq!((refused.status.as_u16(), error_code(&refused)), (503, "store_unavailable".to_owned()));

    drop(paused);
    until_status(&base, &uncached, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_keys_are_refused_once_redis_comes_back_empty() {
    let mut redis = RedisServer::start();
    let gateway = TestGateway::start(&config(&redis, "cache_ttl = \"1h\"")).await;
    let base = format!("http://{}", gateway.addr);
    let key = issue(&redis, "scope=read").await;
    assert_eq!(call(&base, Some(&key), "/x").await.status, 200);

    // Without persistence: the records are gone. The resubscription's
    // invalidation makes the cache ask again, and the store has no key.
    redis.restart();
    let refused = until_status(&base, &key, 401).await;
    assert_eq!(error_code(&refused), "invalid_key");
    for _ in 0..3 {
        assert_eq!(
            call(&base, Some(&key), "/x").await.status,
            401,
            "refused for good, not served from cache"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_record_of_the_wrong_type_is_refused_and_logged_by_name_without_the_secret() {
    let redis = RedisServer::start();
    let key = issue(&redis, "scope=read").await;
    let records: Vec<String> = redis.query(redis::cmd("KEYS").arg("kg:{acme}:key:*"));
    assert_eq!(records.len(), 1);
    let _: () = redis.query(redis::cmd("DEL").arg(&records[0]));
    let _: () = redis.query(redis::cmd("SET").arg(&records[0]).arg("not a hash"));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config(&redis, "")).unwrap();
    let mut served = Served::start(&path, &[]);
    let base = format!("http://{}", served.gateway_address());

    let refused = call(&base, Some(&key), "/x").await;
    assert!(
        matches!(refused.status.as_u16(), 401 | 503),
        "a clear refusal: {} {}",
        refused.status,
        refused.text()
    );
    assert!(!refused.text().contains(&key), "the body holds no key");
    let logged = served.wait_for_line(&records[0]);
    let secret = key.rsplit('_').next().unwrap();
    assert!(!logged.contains(secret), "the log names the Redis key, never the secret: {logged}");
    // Still serving: no panic took anything down.
    assert_eq!(call(&base, None, "/health").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_counter_of_the_wrong_type_refuses_that_key_only() {
    let redis = RedisServer::start();
    let gateway = TestGateway::start(&config(&redis, "")).await;
    let base = format!("http://{}", gateway.addr);
    let broken = issue(&redis, "quota=100/month").await;
    let healthy = issue(&redis, "quota=100/month").await;
    assert_eq!(call(&base, Some(&broken), "/x").await.status, 200);
    let counters: Vec<String> = redis.query(redis::cmd("KEYS").arg("kg:{acme}:quota:*"));
    assert_eq!(counters.len(), 1);
    // A string where a hash belongs: every lease script on it fails.
    let _: () = redis.query(redis::cmd("SET").arg(&counters[0]).arg("not a hash"));

    let mut refused = 0;
    for _ in 0..200 {
        let answer = call(&base, Some(&broken), "/x").await;
        if answer.status != 200 {
            assert_eq!((answer.status.as_u16(), error_code(&answer)), (503, "store_unavailable".to_owned()));
            refused += 1;
        }
    }
    // At most its lease and the outage allowance, then refused.
    // 1 of a lease of 12 spent: 11 left, and no outage allowance (Redis answered).
    assert_eq!(refused, 200 - 11, "a broken counter does not mean no quota");
    // Other keys' quotas still count in Redis, outside any outage.
    assert_eq!(call(&base, Some(&healthy), "/x").await.status, 200);
    let counters: Vec<String> = redis.query(redis::cmd("KEYS").arg("kg:{acme}:quota:*"));
    assert_eq!(counters.len(), 2, "the healthy key leased from Redis");
}
