//! The CLI on a real 3-primary + 3-replica Redis Cluster and on a real
//! Sentinel setup (see `common/cluster.rs`), beside an in-process gateway on
//! it: keys, quotas, usage and the audit stream on both. A test binary
//! of its own: `cluster_gateways` already runs five clusters at once, and
//! its failover timings are what extra load on two cores would blur.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::RedisCluster;
use common::gateway::{TestClient, TestGateway, http1_client, send};
use http::Request;
use http_body_util::Full;

fn config(cluster: &RedisCluster) -> String {
    let nodes = cluster.urls().iter().map(|url| format!("\"{url}\"")).collect::<Vec<_>>().join(", ");
    format!(
        "[store]\nkind = \"redis-cluster\"\nnodes = [{nodes}]\n\n[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n"
    )
}

async fn status(client: &TestClient, gateway: &TestGateway, key: &str) -> u16 {
    let request =
        Request::get(gateway.url("/orders")).header("x-api-key", key).body(Full::<Bytes>::default()).unwrap();
    send(client, request).await.status.as_u16()
}

/// The CLI reaches a cluster by `--redis` repeated and by
/// `KEYGATE_REDIS_NODES`: a key it issues is the one the gateways verify,
/// and a revocation through it refuses the key on a running gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reaches_the_cluster_by_repeated_redis_flags_and_by_keygate_redis_nodes() {
    let cluster = RedisCluster::start();
    let urls = cluster.urls();
    let gateway = TestGateway::start(&config(&cluster)).await;
    let cli = || std::process::Command::new(env!("CARGO_BIN_EXE_keygate"));

    let mut issue = cli();
    issue.args(["keys", "issue", "--client", "cli-on-cluster", "--scopes", "read"]);
    for url in &urls[..3] {
        issue.args(["--redis", url]);
    }
    let issued = issue.output().unwrap();
    assert!(issued.status.success(), "{}", String::from_utf8_lossy(&issued.stderr));
    let key = String::from_utf8(issued.stdout).unwrap().trim().to_owned();
    let client = http1_client();
    assert_eq!(status(&client, &gateway, &key).await, 200, "the CLI's key works on the gateway");

    let listed = cli()
        .args(["keys", "list", "--client", "cli-on-cluster", "--json"])
        .env("KEYGATE_REDIS_NODES", urls.join(","))
        .output()
        .unwrap();
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let id = listed[0]["id"].as_str().expect("one key listed").to_owned();

    let revoked =
        cli().args(["keys", "revoke", &id]).env("KEYGATE_REDIS_NODES", urls.join(",")).output().unwrap();
    assert!(revoked.status.success(), "{}", String::from_utf8_lossy(&revoked.stderr));
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(&client, &gateway, &key).await != 401 {
        assert!(Instant::now() < deadline, "the CLI's revocation reaches the gateway");
        tokio::task::yield_now().await;
    }
}

/// Keys, quotas, usage and the audit stream through the CLI and a gateway
/// on one topology, given as the `[store]` section of a config file: a key
/// issued with a quota of 5 a day admits 5 of 7 requests, `keygate usage`
/// reads the 7 (2 refused for quota) back, `keygate keys audit` the issue.
async fn keys_quotas_usage_and_audit_work_on(toml: &str, client: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, toml).unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(args)
            .arg("-c")
            .arg(&config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let key =
        cli(&["keys", "issue", "--client", client, "--scopes", "read", "--quota", "5/day"]).trim().to_owned();

    let gateway = TestGateway::start(toml).await;
    let http = http1_client();
    let mut answers = Vec::new();
    for _ in 0..7 {
        answers.push(status(&http, &gateway, &key).await);
    }
    assert_eq!(answers, [200, 200, 200, 200, 200, 429, 429], "the quota holds");
    let flusher = gateway.gateway.usage_flusher().expect("usage is on");
    flusher.flush_now().await.unwrap();

    let usage: serde_json::Value =
        serde_json::from_str(&cli(&["usage", "--client", client, "--by", "day", "--json"])).unwrap();
    assert_eq!(usage["totals"]["requests"], 7, "{usage}");
    assert_eq!(usage["totals"]["refused_429_quota"], 2, "{usage}");
    let audit: serde_json::Value =
        serde_json::from_str(&cli(&["keys", "audit", "--client", client, "--json"])).unwrap();
    let actions: Vec<&str> = audit.as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(actions, ["issue"], "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_quotas_usage_and_the_audit_stream_work_on_a_cluster() {
    let cluster = RedisCluster::start();
    keys_quotas_usage_and_audit_work_on(&config(&cluster), "all-on-cluster").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_quotas_usage_and_the_audit_stream_work_through_sentinel() {
    let sentinel = common::cluster::RedisSentinel::start();
    let toml = format!("{}\n[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n", sentinel.store_toml());
    keys_quotas_usage_and_audit_work_on(&toml, "all-on-sentinel").await;
}
