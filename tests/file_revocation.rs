//! Regression (issue 16, defect 2): on the file store, `keys revoke` exited 0
//! and the next request with the key still got 200 for about a second (the
//! folder watch's debounce, then the cache's soft refresh). A change made by
//! another process (the CLI) must hold for the very next request: revoke,
//! scopes narrowed by `update`, the old key of a rotation.
//!
//! The gateway runs in process on the test's folder; the changes come from
//! the real `keygate` binary, or from a second `FileStore` on the same folder
//! (what another process is, to the gateway: its own index, its own writes),
//! which is fast enough to repeat many times and catch races. No test waits
//! between the change and the request.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use common::gateway::{TestClient, TestGateway, http1_client, send};
use http::Request;
use http_body_util::Full;
use jiff::Timestamp;
use keygate::key::SecretString;
use keygate::meta::MetaChanges;
use keygate::ops::{self, RevokeTarget};
use keygate::store::file::FileStore;

const CONFIG: &str = "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nkind = \"file\"\ndir = \"keys\"\n\n\
                      [keys]\nauth_failures_per_ip = \"off\"\n\n[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n";

async fn gateway() -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("gateway.toml"), CONFIG).unwrap();
    TestGateway::start_in(CONFIG, dir).await
}

async fn call(client: &TestClient, gateway: &TestGateway, method: &str, key: &str) -> u16 {
    let request = Request::builder()
        .method(method)
        .uri(gateway.url("/orders"))
        .header("x-api-key", key)
        .body(Full::<Bytes>::from(if method == "GET" { "" } else { "{}" }))
        .unwrap();
    send(client, request).await.status.as_u16()
}

/// Runs `keygate ARGS -c <gateway's config>` to its end; returns stdout.
async fn keygate(config: &Path, args: &[&str]) -> String {
    let (config, args): (std::path::PathBuf, Vec<String>) =
        (config.to_owned(), args.iter().map(|a| (*a).to_owned()).collect());
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(&args)
            .arg("-c")
            .arg(&config)
            .env_remove("KEYGATE_REDIS_URL")
            .output()
            .unwrap();
        assert!(out.status.success(), "keygate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_cli_revocation_holds_for_the_very_next_request() {
    let gateway = gateway().await;
    let config = gateway.dir.path().join("gateway.toml");
    let client = http1_client();
    for round in 0..5 {
        let issued = keygate(&config, &["keys", "issue", "--client", "acme", "--json"]).await;
        let record: serde_json::Value = serde_json::from_str(&issued).unwrap();
        let (key, id) = (record["key"].as_str().unwrap(), record["id"].as_str().unwrap());
        assert_eq!(call(&client, &gateway, "GET", key).await, 200, "round {round}: a new key works at once");
        assert_eq!(call(&client, &gateway, "GET", key).await, 200, "round {round}: and is now cached");

        keygate(&config, &["keys", "revoke", id]).await;
        assert_eq!(call(&client, &gateway, "GET", key).await, 401, "round {round}: revoked, no wait");
    }
}

#[tokio::test]
async fn cli_updates_and_rotations_hold_for_the_very_next_request() {
    let gateway = gateway().await;
    let config = gateway.dir.path().join("gateway.toml");
    let client = http1_client();
    let issued =
        keygate(&config, &["keys", "issue", "--client", "acme", "--scopes", "read-write", "--json"]).await;
    let record: serde_json::Value = serde_json::from_str(&issued).unwrap();
    let (key, id) = (record["key"].as_str().unwrap(), record["id"].as_str().unwrap());
    assert_eq!(call(&client, &gateway, "POST", key).await, 200, "read-write may POST");

    keygate(&config, &["keys", "update", id, "--scopes", "read"]).await;
    assert_eq!(call(&client, &gateway, "POST", key).await, 403, "scopes narrowed, no wait");
    assert_eq!(call(&client, &gateway, "GET", key).await, 200);

    let new_key = keygate(&config, &["keys", "rotate", id, "--grace", "0s"]).await;
    let new_key = new_key.trim();
    assert_eq!(call(&client, &gateway, "GET", key).await, 401, "the old key's grace is over at once");
    assert_eq!(call(&client, &gateway, "GET", new_key).await, 200, "the new key works at once");
}

/// The same through a second store on the folder, many times over: each
/// round issues, caches, revokes and asks again at once.
#[tokio::test]
async fn revocations_by_another_writer_are_never_missed() {
    let gateway = gateway().await;
    let other = Arc::new(FileStore::open(gateway.dir.path().join("keys")).await.unwrap());
    let client = http1_client();
    let now = Timestamp::now();
    for round in 0..200 {
        let read_write = MetaChanges { scopes: Some(vec!["read-write".into()]), ..MetaChanges::default() };
        let issued = ops::issue(&*other, "kg_", "acme", read_write, now).await.unwrap();
        let key = issued.key.expose().to_owned();
        assert_eq!(call(&client, &gateway, "POST", &key).await, 200, "round {round}");

        let narrowed = MetaChanges { scopes: Some(vec!["read".into()]), ..MetaChanges::default() };
        ops::update(&*other, &issued.record.id, narrowed, now).await.unwrap();
        assert_eq!(call(&client, &gateway, "POST", &key).await, 403, "round {round}: narrowed");

        let target = if round % 2 == 0 {
            RevokeTarget::Id(issued.record.id.clone())
        } else {
            RevokeTarget::Key(SecretString::new(key.clone()))
        };
        ops::revoke(&*other, &target, "kg_").await.unwrap();
        assert_eq!(call(&client, &gateway, "GET", &key).await, 401, "round {round}: revoked");
    }
}
