//! The signing key ring of access tokens, shared through the store (issue
//! 20): gateways without a key file sign and verify with one generated key
//! (Redis and the file store), a rotation by the real `keygate tokens
//! rotate-key` publishes the new key on every gateway before it signs and
//! keeps the old key's tokens good for their lifetime, concurrent
//! rotations lose nothing, and the CLI refuses what would break tokens.

mod common;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use common::gateway::{Answer, TestGateway, get, http1_client, send, with_bearer};
use common::redis::RedisServer;
use common::wait::poll_until;
use http::{Request, StatusCode, header};
use http_body_util::Full;
use jiff::Timestamp;
use keygate::meta::MetaChanges;
use keygate::ops;
use keygate::signing;
use keygate::store::SharedStore;

const PREFIX: &str = "kg_";

fn config(store: &str, tokens_extra: &str) -> String {
    format!(
        r#"{store}
[tokens]
enabled = true
{tokens_extra}

[[route]]
path = "/"
upstream = "builtin:echo"
auth = ["key", "jwt"]
"#
    )
}

fn redis_store(redis: &RedisServer) -> String {
    format!("[store]\nkind = \"redis\"\nurl = \"{}\"\n", redis.url())
}

/// A gateway on `toml` in a fresh folder holding it as `gateway.toml`.
async fn start(toml: &str) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.toml"), toml).unwrap();
    TestGateway::start_in(toml, dir).await
}

async fn issue(store: &SharedStore) -> String {
    let changes = MetaChanges { scopes: Some(vec!["read".to_owned()]), ..MetaChanges::default() };
    let issued = ops::issue(&**store, PREFIX, "acme", changes, Timestamp::now()).await.expect("issue");
    issued.key.expose().to_owned()
}

async fn access_token(gw: &TestGateway, key: &str) -> String {
    let basic = STANDARD.encode(format!("acme:{key}"));
    let request = Request::post(gw.url("/oauth/token"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::AUTHORIZATION, format!("Basic {basic}"))
        .body(Full::new(Bytes::from_static(b"grant_type=client_credentials")))
        .unwrap();
    let answer = send(&http1_client(), request).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    answer.json()["access_token"].as_str().expect("access_token").to_owned()
}

/// The `kid` in a JWT's header.
fn kid_of(token: &str) -> String {
    let header = URL_SAFE_NO_PAD.decode(token.split('.').next().expect("header")).expect("base64url");
    let header: serde_json::Value = serde_json::from_slice(&header).expect("JSON");
    header["kid"].as_str().expect("kid").to_owned()
}

/// The kids a gateway's JWKS document publishes, in its order.
async fn published(gw: &TestGateway) -> Vec<String> {
    let answer: Answer = get(&gw.url("/.well-known/jwks.json")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let jwks = answer.json();
    jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["kid"].as_str().expect("kid").to_owned())
        .collect()
}

/// `keygate ARGS -c CONFIG`: its exit code, stdout and stderr.
async fn keygate(config: &Path, args: &[&str]) -> (i32, String, String) {
    let run = common::binary::run_cli_with_config(config, args).await;
    (run.code, run.stdout, run.stderr)
}

// === One generated key for every gateway ===

#[tokio::test]
async fn gateways_without_a_key_file_share_the_key_the_first_one_stored_redis() {
    let redis = RedisServer::start();
    let text = config(&redis_store(&redis), "");
    // Started at once: each may find no ring and race to store its own.
    let (a, b, c) = tokio::join!(start(&text), start(&text), start(&text));
    let kids = published(&a).await;
    assert_eq!(kids.len(), 1, "{kids:?}");
    assert_eq!(published(&b).await, kids);
    assert_eq!(published(&c).await, kids);

    let key = issue(&a.gateway.store).await;
    let token = access_token(&a, &key).await;
    assert_eq!(kid_of(&token), kids[0]);
    for other in [&b, &c] {
        let answer = with_bearer(other, http::Method::GET, "/x", &token).await;
        assert_eq!(answer.status, StatusCode::OK, "another gateway verifies it: {}", answer.text());
    }
    // One record, under the documented name, holding that key.
    let ring: String = redis.query(redis::cmd("GET").arg("kg:tokens:signing-ring"));
    let ring = signing::Ring::from_json(&ring).expect("a ring");
    assert_eq!(ring.keys.iter().map(|k| k.kid.clone()).collect::<Vec<_>>(), kids);
}

#[tokio::test]
async fn gateways_without_a_key_file_share_the_key_the_first_one_stored_file_store() {
    let keys = tempfile::tempdir().unwrap();
    let text = config(&format!("[store]\nkind = \"file\"\ndir = \"{}\"\n", keys.path().display()), "");
    let (a, b) = tokio::join!(start(&text), start(&text));
    let kids = published(&a).await;
    assert_eq!(published(&b).await, kids);
    let key = issue(&a.gateway.store).await;
    let token = access_token(&b, &key).await;
    assert_eq!(with_bearer(&a, http::Method::GET, "/x", &token).await.status, StatusCode::OK);

    // A restarted gateway signs with the same key: its tokens outlive it.
    drop(b);
    let b = start(&text).await;
    assert_eq!(published(&b).await, kids);
    assert_eq!(with_bearer(&b, http::Method::GET, "/x", &token).await.status, StatusCode::OK);
    let stored = keys.path().join(".signing/ring.json");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777, 0o600, "private keys");
}

// === Rotation ===

#[tokio::test]
async fn a_rotation_publishes_everywhere_before_signing_and_old_tokens_stay_good_for_their_lifetime() {
    let redis = RedisServer::start();
    // Re-read every 200 ms; tokens live 4 s: the old key is accepted 4 s
    // after the new one starts signing.
    let text =
        config(&redis_store(&redis), "key_refresh = \"200ms\"\naccess_ttl = \"4s\"\nleeway = \"0s\"\n");
    let (a, b) = tokio::join!(start(&text), start(&text));
    let key = issue(&a.gateway.store).await;
    let old_token = access_token(&a, &key).await;
    let old_kid = kid_of(&old_token);

    let (code, out, err) =
        keygate(&a.dir.path().join("gateway.toml"), &["tokens", "rotate-key", "--publish-delay", "1s"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("Rotated: key "), "{err}");
    let new_kid = out
        .lines()
        .find(|line| line.contains("next"))
        .and_then(|line| line.split_whitespace().next())
        .unwrap_or_else(|| panic!("the new key is listed as next:\n{out}"))
        .to_owned();
    assert_ne!(new_kid, old_kid);

    // Published on both before it signs (the delay is 1 s, the re-read 0.2 s).
    for gw in [&a, &b] {
        poll_until(Duration::from_secs(2), "the new key is published", || async {
            published(gw).await.contains(&new_kid)
        })
        .await;
    }
    // Then new tokens carry it, on each gateway, and verify on the other.
    poll_until(Duration::from_secs(5), "the new key signs", || async {
        kid_of(&access_token(&b, &key).await) == new_kid
    })
    .await;
    let new_token = access_token(&b, &key).await;
    assert_eq!(kid_of(&new_token), new_kid);
    assert_eq!(kid_of(&access_token(&a, &key).await), new_kid);
    for gw in [&a, &b] {
        assert_eq!(with_bearer(gw, http::Method::GET, "/x", &new_token).await.status, StatusCode::OK);
        let answer = with_bearer(gw, http::Method::GET, "/x", &old_token).await;
        assert_eq!(answer.status, StatusCode::OK, "the old key's token is still good: {}", answer.text());
    }
    let (code, listed, err) =
        keygate(&a.dir.path().join("gateway.toml"), &["tokens", "keys", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("JSON");
    let states: Vec<(&str, &str)> = listed["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| (k["kid"].as_str().unwrap(), k["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [(old_kid.as_str(), "retired"), (new_kid.as_str(), "signing")]);
    assert!(!listed.to_string().contains("pkcs8"), "no private key is printed");

    // Once the last token the old key signed has expired, no gateway
    // publishes it any more.
    for gw in [&a, &b] {
        poll_until(Duration::from_secs(10), "the old key is dropped", || async {
            published(gw).await == [new_kid.clone()]
        })
        .await;
    }
}

#[tokio::test]
async fn concurrent_rotations_each_land_and_leave_a_consistent_ring() {
    let redis = RedisServer::start();
    let text = config(&redis_store(&redis), "");
    let gw = start(&text).await;
    let store =
        signing::for_store(&*gw.gateway.store, &gw.gateway.live.load().config.store).expect("ring store");
    let before = store.load().await.expect("load").expect("the gateway made one");
    let now = keygate::clock::Clock::System.unix_now();
    let grace = Duration::from_secs(930);
    let rotations = (0..6).map(|i| {
        let store = store.clone();
        async move { signing::rotate(&*store, now, Duration::from_secs(60 + i), grace).await }
    });
    let results = futures_util::future::join_all(rotations).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let after = store.load().await.expect("load").expect("ring");
    assert_eq!(after.version, before.version + 6, "every rotation was written once");
    // The key signing before is kept; waiting keys never outlive a newer one.
    assert_eq!(after.keys[0], before.keys[0]);
    assert!(after.keys.windows(2).all(|w| w[0].signs_from < w[1].signs_from), "{:?}", after.keys);
}

#[tokio::test]
async fn the_cli_refuses_a_rotation_that_would_break_tokens() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("gateway.toml");

    std::fs::write(&config_file, config(&redis_store(&redis), "key_refresh = \"1m\"\n")).unwrap();
    let (code, _, err) = keygate(&config_file, &["tokens", "keys"]).await;
    assert_eq!(code, 3, "no ring yet: {err}");
    assert!(err.contains("no signing key ring"), "{err}");
    let (code, _, err) = keygate(&config_file, &["tokens", "rotate-key"]).await;
    assert_eq!(code, 3, "nothing to rotate: {err}");
    // A delay shorter than two re-reads: some gateway would not know the key.
    let (code, _, err) = keygate(&config_file, &["tokens", "rotate-key", "--publish-delay", "90s"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("shorter than twice tokens.key_refresh"), "{err}");

    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        STANDARD.encode(pkcs8.as_ref())
    );
    std::fs::write(dir.path().join("signing.pem"), pem).unwrap();
    std::fs::write(&config_file, config(&redis_store(&redis), "signing_key = \"signing.pem\"\n")).unwrap();
    let (code, _, err) = keygate(&config_file, &["tokens", "rotate-key"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tokens.signing_key is set"), "{err}");
    let keys: Vec<String> = redis.query(redis::cmd("KEYS").arg("*"));
    assert!(keys.is_empty(), "nothing was written: {keys:?}");
}
