//! The Grafana dashboard in `docs/grafana/keygate.json` queries only
//! metrics a real gateway exports (issue 19): a gateway on a real
//! `redis-server` with an upstream, keys and usage serves some traffic (a
//! proxied request, an echo, a refused key, a rate-limited key, a reload),
//! and every metric name in every panel's query must then be on its
//! `/metrics` page as a sample.

mod common;

use std::collections::BTreeSet;

use bytes::Bytes;
use common::admin::admin_section;
use common::gateway::{http1_client, send};
use common::redis::RedisServer;
use common::upstream::Upstream;
use http::{Method, Request, header};
use http_body_util::Full;
use jiff::Timestamp;
use keygate::meta::MetaChanges;

/// Every `keygate_*` and `process_*` name in the dashboard's queries.
fn queried_metrics() -> BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana/keygate.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} queries nothing", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(at) = rest.find(|c: char| c.is_ascii_alphabetic()) {
                let word: String =
                    rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[at + word.len().max(1)..];
                if word.starts_with("keygate_") || word.starts_with("process_") {
                    names.insert(word);
                }
            }
        }
    }
    names
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_on_a_live_gateways_page() {
    let queried = queried_metrics();
    assert!(queried.len() >= 15, "the dashboard covers the families: {queried:?}");

    let redis = RedisServer::start();
    let upstream = Upstream::mirror().await;
    let toml = format!(
        "[store]\nkind = \"redis\"\nurl = \"{redis}\"\n\n\
         [upstream.api]\ntargets = [\"http://{up}\"]\n\n\
         [[route]]\npath = \"/api\"\nupstream = \"api\"\n\n\
         [[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\npublic = true\n{admin}",
        redis = redis.url(),
        up = upstream.addr,
        admin = admin_section(),
    );
    let (gateway, admin) = common::admin::start(&toml).await;
    let changes = MetaChanges::from_query("scope=read&rate=1/m", Timestamp::now()).unwrap();
    let issued = keygate::ops::issue(&*gateway.gateway.store, "kg_", "acme", changes, Timestamp::now()).await;
    let key = issued.unwrap().key.expose().to_owned();

    let client = http1_client();
    let call = |path: &str, key: Option<&str>| {
        let mut request = Request::get(gateway.url(path));
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        send(&client, request.body(Full::<Bytes>::default()).unwrap())
    };
    assert_eq!(call("/api/orders", Some(&key)).await.status, 200, "proxied");
    assert_eq!(call("/api/orders", Some(&key)).await.status, 429, "over its 1/m");
    assert_eq!(call("/api/orders", Some("kg_acme.nope.nope")).await.status, 401);
    assert_eq!(call("/hello", None).await.status, 200, "echo");
    assert_eq!(admin.call(Method::POST, "/admin/reload", None).await.status, 200);

    let request = Request::get(admin.url("/metrics")).header(header::ACCEPT, "text/plain;version=0.0.4");
    let page = send(&client, request.body(Full::<Bytes>::default()).unwrap()).await.text();
    let sampled: BTreeSet<&str> = page
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = queried.iter().filter(|name| !sampled.contains(name.as_str())).collect();
    assert!(missing.is_empty(), "queried by the dashboard, not on /metrics: {missing:?}\n{page}");
}
