//! Limits, quotas and credits on a client record, shared by all of the
//! client's keys: through the real gateway, on one gateway and on three
//! sharing one real Redis (`[limits] mode = "redis"`).
//!
//! Rates are given per minute and the tests send their requests in well
//! under a second, so refill during a test is at most a fraction of a cell:
//! the counts are exact, not luck.

mod common;

use bytes::Bytes;
use common::gateway::{Answer, TestGateway, http1_client, send};
use common::redis::RedisServer;
use http::Request;
use http_body_util::Full;
use jiff::Timestamp;
use keygate::meta::MetaChanges;
use keygate::ops;

fn config(redis: &RedisServer, mode: &str) -> String {
    format!(
        r#"
[store]
kind = "redis"
url = "{}"

[limits]
mode = "{mode}"

[usage]
enabled = false

[[route]]
path = "/"
upstream = "builtin:echo"
"#,
        redis.url()
    )
}

fn changes(meta: &str) -> MetaChanges {
    MetaChanges::from_query(meta, Timestamp::now()).unwrap()
}

async fn create_client(gateway: &TestGateway, id: &str, meta: &str) {
    ops::clients::create(&*gateway.gateway.store, id, changes(meta), Timestamp::now()).await.unwrap();
}

async fn issue(gateway: &TestGateway, client: &str, meta: &str) -> String {
    let issued =
        ops::issue(&*gateway.gateway.store, "kg_", client, changes(meta), Timestamp::now()).await.unwrap();
    issued.key.expose().to_owned()
}

async fn call(gateway: &TestGateway, key: &str) -> Answer {
    let request =
        Request::get(gateway.url("/x")).header("x-api-key", key).body(Full::<Bytes>::default()).unwrap();
    send(&http1_client(), request).await
}

/// Asserts every answer is a 200 or a 429 with `code`; returns the 200s.
fn admitted(answers: &[Answer], code: &str) -> usize {
    for answer in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(answer.status, 429, "{}", answer.text());
        assert_eq!(answer.json()["error"], code, "{}", answer.text());
    }
    answers.iter().filter(|a| a.status == 200).count()
}

/// `count` requests from each of 30 concurrent callers, the callers spread
/// over `gateways` and over `keys`.
async fn thirty_callers(gateways: &[&TestGateway], keys: &[String], count: usize) -> Vec<Answer> {
    let callers = (0..30).map(|i| {
        let gateway = gateways[i % gateways.len()];
        let key = &keys[i % keys.len()];
        async move {
            let client = http1_client();
            let mut answers = Vec::new();
            for _ in 0..count {
                let request = Request::get(gateway.url("/x"))
                    .header("x-api-key", key)
                    .body(Full::<Bytes>::default())
                    .unwrap();
                answers.push(send(&client, request).await);
            }
            answers
        }
    });
    futures_util::future::join_all(callers).await.into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_gateway_a_client_quota_is_shared_by_its_keys_and_a_refusal_by_one_spends_nothing_of_the_other()
 {
    let redis = RedisServer::start();
    let gateway = TestGateway::start(&config(&redis, "local")).await;
    create_client(&gateway, "acme", "quota=10/day").await;
    let roomy = issue(&gateway, "acme", "quota=100/day").await;
    let plain = issue(&gateway, "acme", "").await;
    let tight = issue(&gateway, "acme", "quota=2/day").await;

    // The tight key's own quota refuses its third request: that refusal
    // must spend nothing of the client's quota.
    let first = call(&gateway, &tight).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let policy = first.headers["ratelimit-policy"].to_str().unwrap().to_owned();
    assert!(policy.contains("\"quota\";q=2") && policy.contains("\"client-quota\";q=10"), "{policy}");
    assert_eq!(call(&gateway, &tight).await.status, 200);
    for _ in 0..3 {
        let refused = call(&gateway, &tight).await;
        assert_eq!(refused.status, 429);
        assert_eq!(refused.json()["error"], "quota_exceeded");
        let policy = refused.headers["ratelimit-policy"].to_str().unwrap();
        assert!(!policy.contains("client-quota"), "the key's own quota refused, not the client's: {policy}");
    }

    // 8 of the client's 10 are left, for its other keys together.
    let mut answers = Vec::new();
    for i in 0..20 {
        answers.push(call(&gateway, if i % 2 == 0 { &roomy } else { &plain }).await);
    }
    assert_eq!(admitted(&answers, "quota_exceeded"), 8, "ten for the client in all, not ten per key");
    let refused = answers.last().unwrap();
    assert!(refused.headers["ratelimit-policy"].to_str().unwrap().contains("\"client-quota\""));

    let other = issue(&gateway, "globex", "").await;
    assert_eq!(call(&gateway, &other).await.status, 200, "another client's keys are not touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_three_gateways_in_shared_mode_a_client_rate_and_quota_hold_for_all_its_keys() {
    let redis = RedisServer::start();
    let config = config(&redis, "redis");
    let a = TestGateway::start(&config).await;
    let b = TestGateway::start(&config).await;
    let c = TestGateway::start(&config).await;
    let gateways = [&a, &b, &c];

    // A rate of 12 a minute with a burst of 12: 12 in all, whoever sends.
    create_client(&a, "acme", "rate_limit=12/min&burst=12").await;
    let keys = [issue(&a, "acme", "").await, issue(&a, "acme", "").await, issue(&a, "acme", "").await];
    let answers = thirty_callers(&gateways, &keys, 2).await;
    assert_eq!(admitted(&answers, "rate_limited"), 12, "one bucket for the client across three gateways");

    // A quota of 20 a day, shared by two keys over three gateways.
    create_client(&a, "globex", "quota=20/day").await;
    let keys = [issue(&a, "globex", "").await, issue(&a, "globex", "").await];
    let answers = thirty_callers(&gateways, &keys, 2).await;
    assert_eq!(admitted(&answers, "quota_exceeded"), 20, "the client quota is exact across gateways");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credits_are_exact_for_thirty_concurrent_callers_on_three_gateways() {
    let redis = RedisServer::start();
    let config = config(&redis, "redis");
    let a = TestGateway::start(&config).await;
    let b = TestGateway::start(&config).await;
    let c = TestGateway::start(&config).await;
    create_client(&a, "acme", "uses=50").await;
    // One key with credits of its own (more than the client's), one without.
    let keys = [issue(&a, "acme", "uses=1000").await, issue(&a, "acme", "").await];

    let answers = thirty_callers(&[&a, &b, &c], &keys, 3).await;
    assert_eq!(admitted(&answers, "credits_exhausted"), 50, "exactly the client's 50, not 50 per key");
    let mut seen: Vec<u64> = answers
        .iter()
        .filter(|a| a.status == 200 && a.headers.contains_key("keygate-credits-remaining"))
        .map(|a| a.headers["keygate-credits-remaining"].to_str().unwrap().parse().unwrap())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen.len(), 50);
    // The header shows the fewest left of key and client: the client's.
    assert_eq!(seen, (0..50).collect::<Vec<u64>>(), "each remaining count once");

    // A refusal by the client's credits spent none of the key's own: the key
    // with 1000 spent one per admitted request of its own.
    let record = a.gateway.store.list(Some("acme")).await.unwrap();
    let with_credits = record.iter().find(|r| r.meta.credits.is_some()).unwrap();
    let grant = with_credits.meta.credits.unwrap();
    let owner = keygate::limit::credits::Owner::Key(with_credits.id.as_str());
    let left = a.gateway.limits.credits().remaining(owner, &grant).await.unwrap();
    let key_admitted = 1000 - left;
    assert!(key_admitted <= 50, "only admitted requests spend the key's credits: {key_admitted}");
    assert!(key_admitted >= 1, "the key with credits was admitted sometimes");
}
