//! Usage through the real binary on a real Redis: every request counted,
//! nothing lost on SIGTERM or while Redis restarts.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::binary::Served;
use common::gateway::{http1_client, send};
use common::redis::RedisServer;
use http::Request;
use http_body_util::Full;
use jiff::Timestamp;
use keygate::meta::MetaChanges;
use keygate::store::redis::RedisStore;

fn config(redis: &RedisServer) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nkind = \"redis\"\nurl = \"{}\"\n\n[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n",
        redis.url()
    )
}

async fn issue(redis: &RedisServer) -> String {
    let store = RedisStore::connect(&redis.url(), "kg:").await.unwrap();
    let changes = MetaChanges::from_query("scope=read", Timestamp::now()).unwrap();
    keygate::ops::issue(&store, "kg_", "acme", changes, Timestamp::now())
        .await
        .unwrap()
        .key
        .expose()
        .to_owned()
}

async fn calls(addr: &str, key: &str, n: usize, expect: u16) {
    let client = http1_client();
    for _ in 0..n {
        let request = Request::get(format!("http://{addr}/orders"))
            .header("x-api-key", key)
            .body(Full::<Bytes>::default())
            .unwrap();
        assert_eq!(send(&client, request).await.status, expect);
    }
}

/// `keygate serve` on the test Redis; returns its folder (keep it alive),
/// the process and the address it listens on.
fn serve(redis: &RedisServer) -> (tempfile::TempDir, Served, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config(redis)).unwrap();
    let mut served = Served::start(&path, &[]);
    let addr = served.gateway_address();
    (dir, served, addr)
}

fn stop(served: Served) {
    served.signal("TERM");
    let (status, log) = served.wait_exit();
    assert_eq!(status.code(), Some(0), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_in_redis_after_sigterm() {
    let redis = RedisServer::start();
    let key = issue(&redis).await;
    let (_dir, served, addr) = serve(&redis);

    calls(&addr, &key, 137, 200).await;
    calls(&addr, "kg_acme_not-a-key", 11, 401).await;
    // No waiting for a periodic flush: the final flush on SIGTERM must carry all.
    tokio::task::spawn_blocking(move || stop(served)).await.unwrap();

    let acme = redis.usage_report("acme").await;
    assert_eq!(acme.totals.requests, 137);
    assert_eq!(acme.totals.status_2xx, 137);
    assert_eq!(acme.clients[0].routes["/"].requests, 137);
    let anonymous = redis.usage_report(keygate::usage::ANONYMOUS).await;
    assert_eq!(anonymous.totals.requests, 11);
    assert_eq!(anonymous.totals.refused_401, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_run_loses_no_count() {
    let mut redis = RedisServer::start();
    let key = issue(&redis).await;
    let (_dir, served, addr) = serve(&redis);

    calls(&addr, &key, 100, 200).await;
    redis.shutdown_saving();
    // Redis is down: the key is cached, so requests pass; usage piles up.
    calls(&addr, &key, 100, 200).await;
    redis.restart();
    calls(&addr, &key, 100, 200).await;

    // The flusher retries on its own once Redis is back: wait for it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while redis.usage_report("acme").await.totals.requests < 200 && Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    tokio::task::spawn_blocking(move || stop(served)).await.unwrap();
    assert_eq!(redis.usage_report("acme").await.totals.requests, 300);
}

/// Regression (issue 16, defect 4): a chunked upload (no Content-Length)
/// was counted as the size hint's lower bound (a 40-byte body counted 14).
/// `bytes_in` is now what was read from the client, through a real
/// upstream and through the echo alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_uploads_count_the_bytes_read_from_the_client() {
    let redis = RedisServer::start();
    let upstream = common::upstream::Upstream::mirror().await;
    let store = RedisStore::connect(&redis.url(), "kg:").await.unwrap();
    let changes = MetaChanges::from_query("scope=read-write", Timestamp::now()).unwrap();
    let key = keygate::ops::issue(&store, "kg_", "acme", changes, Timestamp::now()).await.unwrap().key;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nkind = \"redis\"\nurl = \"{}\"\n\n\
         [[route]]\npath = \"/up\"\nupstream = \"mirror\"\n\n[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n\n\
         [upstream.mirror]\ntargets = [\"{}\"]\n",
        redis.url(),
        upstream.url()
    );
    std::fs::write(&path, text).unwrap();
    let mut served = Served::start(&path, &[]);
    let addr: std::net::SocketAddr = served.gateway_address().parse().unwrap();

    // 40 bytes in three chunks of 10, 20 and 10.
    let chunked = "a\r\n0123456789\r\n14\r\nabcdefghijklmnopqrst\r\na\r\nABCDEFGHIJ\r\n0\r\n\r\n";
    for target in ["/up/orders", "/orders"] {
        let request = format!(
            "POST {target} HTTP/1.1\r\nHost: gw\r\nx-api-key: {}\r\nTransfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\n{chunked}",
            key.expose()
        );
        let answer = common::raw::exchange(addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{target}: {answer}");
        assert!(
            answer.contains("0123456789abcdefghijklmnopqrstABCDEFGHIJ"),
            "the whole body passed: {answer}"
        );
    }
    tokio::task::spawn_blocking(move || stop(served)).await.unwrap();

    let acme = redis.usage_report("acme").await;
    assert_eq!(acme.clients[0].routes["/up"].bytes_in, 40, "through an upstream");
    assert_eq!(acme.clients[0].routes["/"].bytes_in, 40, "through the echo");
    assert_eq!(acme.totals.bytes_in, 80);
}
