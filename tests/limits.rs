//! Per-key rate limits and quotas through the real gateway.

mod common;

use bytes::Bytes;
use common::gateway::{Answer, TestGateway, http1_client, send};
use http::Request;
use http_body_util::Full;
use jiff::Timestamp;
use keygate::meta::MetaChanges;
use keygate::ops;

const CONFIG: &str = r#"
[limits]
legacy_headers = true

[[route]]
path = "/"
upstream = "builtin:echo"

[[route]]
path = "/costly"
upstream = "builtin:echo"
cost = 5
"#;

/// Issues a key with `meta` (the seed notes' syntax) in the gateway's store.
async fn issue(gateway: &TestGateway, meta: &str) -> (String, keygate::key::KeyId) {
    let changes = MetaChanges::from_query(meta, Timestamp::now()).unwrap();
    let issued = ops::issue(&*gateway.gateway.store, "kg_", "acme", changes, Timestamp::now()).await.unwrap();
    (issued.key.expose().to_owned(), issued.record.id)
}

async fn update(gateway: &TestGateway, id: &keygate::key::KeyId, meta: &str) {
    let changes = MetaChanges::from_query(meta, Timestamp::now()).unwrap();
    ops::update(&*gateway.gateway.store, id, changes, Timestamp::now()).await.unwrap();
}

async fn call(gateway: &TestGateway, key: &str, path: &str) -> Answer {
    let request =
        Request::get(gateway.url(path)).header("x-api-key", key).body(Full::<Bytes>::default()).unwrap();
    send(&http1_client(), request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_burst_of_twenty_simultaneous_requests_passes() {
    let gateway = TestGateway::start(CONFIG).await;
    // 10 a minute: no cell comes back during the test, however slow the machine.
    let (key, _) = issue(&gateway, "rate_limit=10/min&burst=10").await;
    let calls = (0..20).map(|_| call(&gateway, &key, "/x"));
    let answers = futures_util::future::join_all(calls).await;
    let passed = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(passed, 10);
    for refused in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(refused.status, 429);
        assert_eq!(refused.json()["error"], "rate_limited");
        let retry_after: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=6).contains(&retry_after), "one cell every 6 s: {retry_after}");
        assert_eq!(refused.headers["ratelimit-policy"], "\"rate\";q=10;w=60");
        assert!(refused.headers["ratelimit"].to_str().unwrap().starts_with("\"rate\";r=0;t="));
    }
}

#[tokio::test]
async fn admitted_responses_report_where_the_key_stands() {
    let gateway = TestGateway::start(CONFIG).await;
    let (key, _) = issue(&gateway, "rate_limit=10/min&quota=100/day").await;
    let answer = call(&gateway, &key, "/x").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["ratelimit-policy"], "\"rate\";q=10;w=60, \"quota\";q=100;w=86400");
    let state = answer.headers["ratelimit"].to_str().unwrap();
    assert!(state.starts_with("\"rate\";r=9;t=6, \"quota\";r=99;t="), "{state}");
    assert_eq!(answer.headers["x-ratelimit-remaining"], "9");
}

#[tokio::test]
async fn keys_without_limits_get_no_limit_headers() {
    let gateway = TestGateway::start(CONFIG).await;
    let (key, _) = issue(&gateway, "scope=read").await;
    let answer = call(&gateway, &key, "/x").await;
    assert_eq!(answer.status, 200);
    assert!(!answer.headers.contains_key("ratelimit"));
}

#[tokio::test]
async fn quota_exhausted_is_429_quota_exceeded_until_the_window_resets() {
    let gateway = TestGateway::start(CONFIG).await;
    let (key, _) = issue(&gateway, "quota=5/day").await;
    for _ in 0..5 {
        assert_eq!(call(&gateway, &key, "/x").await.status, 200);
    }
    let refused = call(&gateway, &key, "/x").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"], "quota_exceeded");
    let retry_after: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
    let midnight = 86_400 - Timestamp::now().as_second() % 86_400;
    assert!(
        retry_after.abs_diff(midnight as u64) <= 2,
        "resets at UTC midnight: {retry_after} vs {midnight}"
    );
    assert!(refused.headers["ratelimit"].to_str().unwrap().starts_with("\"quota\";r=0"));
}

#[tokio::test]
async fn a_rate_refusal_spends_no_quota() {
    let gateway = TestGateway::start(CONFIG).await;
    let (key, id) = issue(&gateway, "rate_limit=2/min&quota=3/day").await;
    assert_eq!(call(&gateway, &key, "/x").await.status, 200);
    assert_eq!(call(&gateway, &key, "/x").await.status, 200);
    for _ in 0..5 {
        assert_eq!(call(&gateway, &key, "/x").await.json()["error"], "rate_limited");
    }
    // Lift the rate limit: exactly one unit of quota must be left.
    update(&gateway, &id, "rate_limit=100/s").await;
    let answer = wait_for_status(&gateway, &key, 200).await;
    assert!(answer.headers["ratelimit"].to_str().unwrap().contains("\"quota\";r=0"));
    assert_eq!(call(&gateway, &key, "/x").await.json()["error"], "quota_exceeded");
}

#[tokio::test]
async fn a_quota_refusal_spends_no_rate() {
    let gateway = TestGateway::start(CONFIG).await;
    let (key, id) = issue(&gateway, "rate_limit=3/min&quota=1/day").await;
    assert_eq!(call(&gateway, &key, "/x").await.status, 200);
    for _ in 0..5 {
        assert_eq!(call(&gateway, &key, "/x").await.json()["error"], "quota_exceeded");
    }
    update(&gateway, &id, "quota=10/day").await;
    // Two rate cells must be left: the five quota refusals took none.
    let answer = wait_for_status(&gateway, &key, 200).await;
    assert!(answer.headers["ratelimit"].to_str().unwrap().starts_with("\"rate\";r=1;"));
    assert_eq!(call(&gateway, &key, "/x").await.status, 200);
    assert_eq!(call(&gateway, &key, "/x").await.json()["error"], "rate_limited");
}

#[tokio::test]
async fn a_costly_route_counts_its_cost() {
    let gateway = TestGateway::start(CONFIG).await;
    let (key, _) = issue(&gateway, "quota=12/day").await;
    assert_eq!(call(&gateway, &key, "/costly").await.status, 200);
    assert_eq!(call(&gateway, &key, "/costly").await.status, 200);
    // 10 spent, 2 left: a 5-unit request is refused whole, 1-unit ones pass.
    assert_eq!(call(&gateway, &key, "/costly").await.json()["error"], "quota_exceeded");
    assert_eq!(call(&gateway, &key, "/x").await.status, 200);
    assert_eq!(call(&gateway, &key, "/x").await.status, 200);
    assert_eq!(call(&gateway, &key, "/x").await.json()["error"], "quota_exceeded");
}

/// After `keys update`, the gateway sees the new record once the store's
/// invalidation has reached the cache; poll until it has.
async fn wait_for_status(gateway: &TestGateway, key: &str, status: u16) -> Answer {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let answer = call(gateway, key, "/x").await;
        if answer.status == status || tokio::time::Instant::now() > deadline {
            assert_eq!(answer.status, status, "{}", answer.text());
            return answer;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_rolling_quota_reports_its_whole_window_and_refuses_past_it() {
    let gateway = TestGateway::start(CONFIG).await;
    let (key, _) = issue(&gateway, "quota=3/rolling-1d").await;
    for left in [2, 1, 0] {
        let answer = call(&gateway, &key, "/x").await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.headers["ratelimit-policy"], "\"quota\";q=3;w=86400");
        let state = answer.headers["ratelimit"].to_str().unwrap().to_owned();
        assert!(state.starts_with(&format!("\"quota\";r={left};")), "{state}");
    }
    let refused = call(&gateway, &key, "/x").await;
    assert_eq!(refused.json()["error"], "quota_exceeded");
    // Room frees when the first requests leave the window, about a day on.
    let retry_after: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((82_800..=86_400).contains(&retry_after), "{retry_after}");
}
