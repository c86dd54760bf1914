//! Usage credits (`--uses N`) through the real gateway: exact under
//! concurrency and across gateways (Redis), exact and persistent on the file
//! store, the route's cost, the header a client reads, refills on explicit
//! timestamps, resets by `keys update --uses`, and 503 when Redis is down.

mod common;

use std::num::NonZeroU32;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::gateway::{Answer, TestGateway, http1_client, send};
use common::redis::RedisServer;
use http::Request;
use http_body_util::Full;
use jiff::Timestamp;
use keygate::key::KeyId;
use keygate::limit::credits::{Credits, Owner, Take};
use keygate::meta::{CreditGrant, MetaChanges};
use keygate::ops;

fn redis_config(redis: &RedisServer, limits: &str) -> String {
    format!(
        r#"
[store]
kind = "redis"
url = "{}"

[limits]
{limits}

[usage]
enabled = false

[[route]]
path = "/"
upstream = "builtin:echo"

[[route]]
path = "/costly"
upstream = "builtin:echo"
cost = 5
"#,
        redis.url()
    )
}

fn file_config(dir: &str) -> String {
    format!(
        r#"
[store]
kind = "file"
dir = "{dir}"

[[route]]
path = "/"
upstream = "builtin:echo"

[[route]]
path = "/costly"
upstream = "builtin:echo"
cost = 5
"#
    )
}

async fn issue(gateway: &TestGateway, meta: &str) -> (String, KeyId) {
    let changes = MetaChanges::from_query(meta, Timestamp::now()).unwrap();
    let issued = ops::issue(&*gateway.gateway.store, "kg_", "acme", changes, Timestamp::now()).await.unwrap();
    (issued.key.expose().to_owned(), issued.record.id)
}

async fn call(gateway: &TestGateway, key: &str, path: &str) -> Answer {
    let request =
        Request::get(gateway.url(path)).header("x-api-key", key).body(Full::<Bytes>::default()).unwrap();
    send(&http1_client(), request).await
}

fn credits_header(answer: &Answer) -> u64 {
    answer.headers["keygate-credits-remaining"].to_str().unwrap().parse().unwrap()
}

/// What the gateway's authority says `id` has left.
async fn remaining(gateway: &TestGateway, id: &KeyId) -> u64 {
    let record = gateway.gateway.store.get(id).await.unwrap().unwrap();
    let grant = record.meta.credits.unwrap();
    gateway.gateway.limits.credits().remaining(Owner::Key(id.as_str()), &grant).await.unwrap()
}

/// 30 clients, each sending `per_client` requests one after another,
/// spread over `gateways`; returns every answer.
async fn thirty_clients(gateways: &[&TestGateway], key: &str, per_client: usize) -> Vec<Answer> {
    let tasks = (0..30).map(|i| {
        let gateway = gateways[i % gateways.len()];
        async move {
            let client = http1_client();
            let mut answers = Vec::new();
            for _ in 0..per_client {
                let request = Request::get(gateway.url("/x"))
                    .header("x-api-key", key)
                    .body(Full::<Bytes>::default())
                    .unwrap();
                answers.push(send(&client, request).await);
            }
            answers
        }
    });
    futures_util::future::join_all(tasks).await.into_iter().flatten().collect()
}

/// Every answer is a 200 or a 429 `credits_exhausted`; returns the 200s.
fn admitted(answers: &[Answer]) -> usize {
    for answer in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(answer.status, 429, "{}", answer.text());
        assert_eq!(answer.json()["error"], "credits_exhausted");
        assert!(!answer.headers.contains_key("retry-after"), "no refill: waiting does not help");
        assert_eq!(answer.headers["keygate-credits-remaining"], "0");
    }
    answers.iter().filter(|a| a.status == 200).count()
}

// === Redis: exact across gateways ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_clients_on_three_gateways_spend_exactly_the_hundred_credits_granted() {
    let redis = RedisServer::start();
    let config = redis_config(&redis, "");
    let a = TestGateway::start(&config).await;
    let b = TestGateway::start(&config).await;
    let c = TestGateway::start(&config).await;
    let (key, id) = issue(&a, "uses=100").await;

    // 150 requests for 100 credits.
    let answers = thirty_clients(&[&a, &b, &c], &key, 5).await;
    assert_eq!(answers.len(), 150);
    assert_eq!(admitted(&answers), 100, "exactly the credits granted, not one more or less");
    // Each admitted request saw a different count: no credit was handed out twice.
    let mut seen: Vec<u64> = answers.iter().filter(|a| a.status == 200).map(credits_header).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..100).collect::<Vec<u64>>());
    assert_eq!(remaining(&a, &id).await, 0);
    // The count is a plain hash a dashboard can read.
    let left: String =
        redis.query(redis::cmd("HGET").arg(format!("kg:{{acme}}:credits:key:{}", id.kid())).arg("remaining"));
    assert_eq!(left, "0");
}

#[tokio::test]
async fn a_route_of_cost_five_spends_five_credits_and_the_header_counts_down() {
    let redis = RedisServer::start();
    let gateway = TestGateway::start(&redis_config(&redis, "")).await;
    let (key, _) = issue(&gateway, "uses=13").await;

    let first = call(&gateway, &key, "/x").await;
    assert_eq!(first.status, 200);
    assert_eq!(credits_header(&first), 12);
    let costly = call(&gateway, &key, "/costly/x").await;
    assert_eq!(costly.status, 200);
    assert_eq!(credits_header(&costly), 7);
    assert_eq!(credits_header(&call(&gateway, &key, "/costly/x").await), 2);
    // 2 left: a cost of 5 is refused and spends nothing; a cost of 1 still passes.
    let refused = call(&gateway, &key, "/costly/x").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"], "credits_exhausted");
    assert_eq!(refused.headers["keygate-credits-remaining"], "2");
    assert_eq!(credits_header(&call(&gateway, &key, "/x").await), 1);
    assert_eq!(credits_header(&call(&gateway, &key, "/x").await), 0);
    assert_eq!(call(&gateway, &key, "/x").await.status, 429);
}

#[tokio::test]
async fn usage_counts_the_credits_spent_and_the_credits_refusals() {
    let redis = RedisServer::start();
    let config = redis_config(&redis, "").replace("[usage]\nenabled = false", "[usage]\nenabled = true");
    let gateway = TestGateway::start(&config).await;
    let recorder = gateway.gateway.usage.clone().expect("usage is on");
    let (key, _) = issue(&gateway, "uses=11").await;
    assert_eq!(call(&gateway, &key, "/costly/x").await.status, 200);
    assert_eq!(call(&gateway, &key, "/costly/x").await.status, 200);
    assert_eq!(call(&gateway, &key, "/costly/x").await.status, 429);
    assert_eq!(call(&gateway, &key, "/x").await.status, 200);
    // Each request is recorded when its response body ends: wait for all four.
    let mut total = keygate::usage::Counts::default();
    common::wait::within(10, "four requests recorded", async {
        while total.requests < 4 {
            for series in recorder.drain().values() {
                total.add(&series.counts());
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(total.credits, 11, "5 + 5 + 1, the refused request spent none");
    assert_eq!(total.refused_429_credits, 1);
}

#[tokio::test]
async fn keys_without_credits_get_no_credits_header() {
    let redis = RedisServer::start();
    let gateway = TestGateway::start(&redis_config(&redis, "")).await;
    let (key, _) = issue(&gateway, "scope=read").await;
    let answer = call(&gateway, &key, "/x").await;
    assert_eq!(answer.status, 200);
    assert!(!answer.headers.contains_key("keygate-credits-remaining"));
}

#[tokio::test]
async fn a_request_the_rate_limit_refuses_spends_no_credit() {
    let redis = RedisServer::start();
    let gateway = TestGateway::start(&redis_config(&redis, "")).await;
    // One request a minute: the second is refused by the rate, after credits.
    let (key, id) = issue(&gateway, "uses=10&rate_limit=1/min&burst=1").await;
    assert_eq!(call(&gateway, &key, "/x").await.status, 200);
    let refused = call(&gateway, &key, "/x").await;
    assert_eq!(refused.json()["error"], "rate_limited");
    assert_eq!(remaining(&gateway, &id).await, 9, "the rate's refusal gave its credit back");
}

#[tokio::test]
async fn keys_update_uses_resets_the_count_on_the_gateway() {
    let redis = RedisServer::start();
    let gateway = TestGateway::start(&redis_config(&redis, "")).await;
    let (key, id) = issue(&gateway, "uses=1").await;
    assert_eq!(call(&gateway, &key, "/x").await.status, 200);
    assert_eq!(call(&gateway, &key, "/x").await.status, 429);

    let changes = MetaChanges::from_query("uses=3", Timestamp::now()).unwrap();
    ops::update(&*gateway.gateway.store, &id, changes, Timestamp::now()).await.unwrap();
    // The update reaches the gateway's cache through pub/sub; until then the
    // old grant (spent) answers 429 and spends nothing of the new one.
    let first = common::wait::within(10, "the new grant reaches the gateway", async {
        loop {
            let answer = call(&gateway, &key, "/x").await;
            if answer.status == 200 {
                return answer;
            }
            assert_eq!(answer.json()["error"], "credits_exhausted");
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(credits_header(&first), 2, "the count restarted at 3");
    assert_eq!(remaining(&gateway, &id).await, 2);
}

#[tokio::test]
async fn with_redis_down_credits_cannot_be_vouched_for_and_the_answer_is_503() {
    let mut redis = RedisServer::start();
    // fail_open lets quotas and rates decide locally; credits never do.
    let gateway = TestGateway::start(&redis_config(&redis, "fail_open = true")).await;
    let (key, _) = issue(&gateway, "uses=10").await;
    assert_eq!(call(&gateway, &key, "/x").await.status, 200); // the key is now cached
    redis.stop();
    let answer = call(&gateway, &key, "/x").await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(answer.json()["error"], "store_unavailable");
}

// === Redis: refills, on explicit timestamps ===

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

#[tokio::test]
async fn the_redis_script_refills_per_window_and_a_refund_never_crosses_a_refill() {
    let redis = RedisServer::start();
    let conn = redis::aio::ConnectionManager::new(redis::Client::open(redis.url()).unwrap()).await.unwrap();
    let credits = Credits::redis(conn, "kg:");
    let owner = Owner::Client("acme");
    let grant = CreditGrant {
        uses: 2,
        refill: Some("3/month".parse().unwrap()),
        granted_at: at("2026-01-01T00:00:00Z"),
    };
    let one = NonZeroU32::MIN;
    let take = |now: &'static str| {
        let credits = credits.clone();
        async move { credits.take_at(owner, &grant, one, at(now)).await.unwrap() }
    };

    let Take::Taken(january) = take("2026-01-20T00:00:00Z").await else { panic!("1 of 2") };
    assert_eq!(january.remaining, 1);
    take("2026-01-31T00:00:00Z").await;
    let exhausted = take("2026-01-31T23:00:00Z").await;
    assert_eq!(
        exhausted,
        Take::Exhausted { remaining: 0, retry_after: Some(Duration::from_secs(3600)) },
        "Retry-After is the time to the refill"
    );
    // February: set to the refill amount (3), not added to.
    let Take::Taken(february) = take("2026-02-01T00:00:00Z").await else { panic!("refilled") };
    assert_eq!(february.remaining, 2);
    // A January refund does not add to February's refill.
    credits.refund(owner, &january).await;
    assert_eq!(credits.remaining_at(owner, &grant, at("2026-02-02T00:00:00Z")).await.unwrap(), 2);
    credits.refund(owner, &february).await;
    assert_eq!(credits.remaining_at(owner, &grant, at("2026-02-02T00:00:00Z")).await.unwrap(), 3);
    // Client and key counters are apart.
    assert_eq!(
        redis
            .query::<Option<String>>(redis::cmd("HGET").arg("kg:{acme}:credits:client").arg("remaining"))
            .as_deref(),
        Some("3")
    );
}

// === File store: exact in one process, across a restart and a shared folder ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_credits_are_exact_and_survive_a_gateway_restart() {
    let keys = tempfile::tempdir().unwrap();
    let config = file_config(keys.path().to_str().unwrap());
    let first = TestGateway::start(&config).await;
    let (key, id) = issue(&first, "uses=20").await;

    let answers = thirty_clients(&[&first], &key, 1).await;
    assert_eq!(admitted(&answers), 20);
    drop(first);

    // A restarted gateway does not hand out a fresh grant.
    let restarted = TestGateway::start(&config).await;
    let answer = call(&restarted, &key, "/x").await;
    assert_eq!(answer.status, 429);
    assert_eq!(answer.json()["error"], "credits_exhausted");
    assert_eq!(remaining(&restarted, &id).await, 0);
    // The count is kept apart from the key file, in a hidden folder.
    assert!(keys.path().join(format!(".credits/key.{id}.toml")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_a_key_folder_spend_one_count() {
    let keys = tempfile::tempdir().unwrap();
    let config = file_config(keys.path().to_str().unwrap());
    let a = TestGateway::start(&config).await;
    let b = TestGateway::start(&config).await;
    let (key, _) = issue(&a, "uses=25").await;
    // b learns of the key from the folder (a miss reloads a changed folder).
    common::wait::within(10, "the second gateway sees the key", async {
        while call(&b, &key, "/x").await.status != 200 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let answers = thirty_clients(&[&a, &b], &key, 1).await;
    assert_eq!(admitted(&answers), 24, "25 granted, one spent above");
}

#[tokio::test]
async fn keys_show_prints_the_remaining_credits_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let config = file_config("keys");
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(&config_path, &config).unwrap();
    let path = config_path.to_str().unwrap().to_owned();
    let gateway = TestGateway::start_in(&config, dir).await;
    let (key, id) = issue(&gateway, "uses=5&refill=5/day").await;
    assert_eq!(credits_header(&call(&gateway, &key, "/costly/x").await), 0);

    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_keygate"))
                .args(&args)
                .env_remove("KEYGATE_REDIS_URL")
                .stdin(Stdio::null())
                .output()
                .unwrap()
        })
    };
    let args = |rest: &[&str]| {
        let mut all = vec!["keys".to_owned(), "-c".to_owned(), path.clone()];
        all.extend(rest.iter().map(|s| s.to_string()));
        all
    };
    let out = run(args(&["show", id.as_str()])).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let credits = text.lines().find(|line| line.starts_with("credits ")).unwrap_or_default();
    assert!(credits.ends_with(" 0 left of 5, refill 5/day"), "{text}");
    let out = run(args(&["show", id.as_str(), "--json"])).await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["credits"]["remaining"], 0);
    assert_eq!(json["credits"]["uses"], 5);
    assert_eq!(json["credits"]["refill"], "5/day");

    // `keys update --uses 7` resets the count; `show` reads it at once.
    let out = run(args(&["update", id.as_str(), "--uses", "7", "--json"])).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["credits"]["remaining"], 7);
    // Bad values are refused with the flag named, and change nothing.
    for bad in ["--uses=-1", "--refill=5/10s", "--uses=lots", "--uses=1000000000000001", "--refill=0/day"] {
        let out = run(args(&["update", id.as_str(), bad])).await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let flag = bad.split('=').next().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{bad}: {stderr}");
    }
    let out = run(args(&["show", id.as_str(), "--json"])).await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["credits"]["remaining"], 7, "a refused update changed nothing");
    let out = run(args(&["update", id.as_str(), "--uses", "none", "--json"])).await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["credits"].is_null(), "{json}");
}
