//! Rotation: the old key lives exactly its grace, the new key has no expiry
//! unless asked, and the two spend one budget (issue 16: "a rotation no
//! longer doubles anything", and defect 1).
//!
//! Through the real `keygate keys` binary, the admin API and the real
//! gateway, against a real redis-server (and the file store's folder).

mod common;

use std::process::{Command, Stdio};

use bytes::Bytes;
use common::gateway::{Answer, TestGateway, http1_client, send};
use common::redis::RedisServer;
use http::{Method, Request};
use http_body_util::Full;
use jiff::{SignedDuration, Timestamp};
use keygate::key::KeyId;
use keygate::meta::MetaChanges;
use keygate::ops;
use keygate::store::KeyStore;
use serde_json::Value;

const PREFIX: &str = "kg_";

/// Runs the `keygate` binary (blocking, off the runtime) and returns stdout;
/// fails the test on a non-zero exit.
async fn keygate_ok(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        let cwd = tempfile::tempdir().unwrap();
        Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(&args)
            .current_dir(cwd.path())
            .env_remove("KEYGATE_REDIS_URL")
            .stdin(Stdio::null())
            .output()
            .expect("run keygate")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "keygate failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn at(value: &Value) -> Timestamp {
    value.as_str().unwrap_or_else(|| panic!("not a time: {value}")).parse().unwrap()
}

/// `a` is `b` give or take a few seconds (the command's own clock).
fn about(a: Timestamp, b: Timestamp) -> bool {
    a.duration_since(b).abs() <= SignedDuration::from_secs(10)
}

/// Regression (issue 16, defect 1), through the CLI binary: rotating a key
/// already in its grace gave the new key the earlier grace's expiry and
/// ignored the `--grace` asked for.
#[tokio::test]
async fn the_cli_rotating_a_key_in_its_grace_gives_the_new_key_no_expiry_and_the_old_exactly_the_new_grace() {
    let redis = RedisServer::start();
    let url = redis.url();
    let keys = |args: &[&str]| {
        let mut all = vec!["keys", "--redis", url.as_str()];
        all.extend_from_slice(args);
        all.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        keygate_ok(&args).await
    };
    let first = json(&run(keys(&["issue", "--client", "acme", "--quota", "100/day", "--json"])).await);
    let first_id = first["id"].as_str().unwrap().to_owned();

    let second = json(&run(keys(&["rotate", &first_id, "--grace", "1h", "--json"])).await);
    assert_eq!(second["expires_at"], Value::Null);
    // The first key is in its one-hour grace: rotate it again, for two days.
    let third = json(&run(keys(&["rotate", &first_id, "--grace", "48h", "--json"])).await);
    assert_eq!(third["expires_at"], Value::Null, "the new key does not inherit the grace's end");
    assert_eq!(third["counts_as"], first_id.as_str(), "it spends the first key's budget");
    let old = json(&run(keys(&["show", &first_id, "--json"])).await);
    let two_days = Timestamp::now() + SignedDuration::from_hours(48);
    assert!(about(at(&old["expires_at"]), two_days), "exactly the new grace: {}", old["expires_at"]);
    assert_eq!(old["state"], "rotating");

    // A shorter grace is honoured too, and `--expires` gives the new key one.
    let third_id = third["id"].as_str().unwrap().to_owned();
    let fourth =
        json(&run(keys(&["rotate", &third_id, "--grace", "10m", "--expires", "30d", "--json"])).await);
    assert!(about(at(&fourth["expires_at"]), Timestamp::now() + SignedDuration::from_hours(30 * 24)));
    assert_eq!(fourth["counts_as"], first_id.as_str(), "the whole line counts as the first key");
    let third_now = json(&run(keys(&["show", &third_id, "--json"])).await);
    assert!(about(at(&third_now["expires_at"]), Timestamp::now() + SignedDuration::from_mins(10)));

    // `keys show` says whose budget a key spends.
    let shown = run(keys(&["show", fourth["id"].as_str().unwrap()])).await;
    assert!(shown.contains(&format!("counts as {first_id}\n")), "{shown}");
}

/// Regression (issue 16, defect 1), through the admin API.
#[tokio::test]
async fn the_admin_api_rotating_a_key_in_its_grace_gives_the_new_key_no_expiry_and_the_old_exactly_the_new_grace()
 {
    let redis = RedisServer::start();
    let config = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\n{}\n[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n",
        redis.url(),
        common::admin::admin_section()
    );
    let (_gateway, admin) = common::admin::start(&config).await;
    let issued =
        admin.call(Method::POST, "/admin/keys", Some(r#"{"client":"acme","quota":"100/day"}"#)).await;
    assert_eq!(issued.status, 201, "{}", issued.text());
    let id = issued.json()["id"].as_str().unwrap().to_owned();
    let rotate = |body: &'static str| {
        let path = format!("/admin/keys/{id}/rotate");
        let admin = &admin;
        async move { admin.call(Method::POST, &path, Some(body)).await }
    };

    assert_eq!(rotate(r#"{"grace":"1h"}"#).await.status, 201);
    let again = rotate(r#"{"grace":"48h"}"#).await;
    assert_eq!(again.status, 201, "{}", again.text());
    assert_eq!(again.json()["expires_at"], Value::Null, "no expiry unless asked");
    assert_eq!(again.json()["counts_as"], id.as_str());
    let old = admin.call(Method::GET, &format!("/admin/keys/{id}"), None).await.json();
    assert!(about(at(&old["expires_at"]), Timestamp::now() + SignedDuration::from_hours(48)), "{old}");

    let with_expiry = rotate(r#"{"grace":"5m","expires":"7d"}"#).await;
    assert_eq!(with_expiry.status, 201, "{}", with_expiry.text());
    assert!(about(
        at(&with_expiry.json()["expires_at"]),
        Timestamp::now() + SignedDuration::from_hours(7 * 24)
    ));
    let old = admin.call(Method::GET, &format!("/admin/keys/{id}"), None).await.json();
    assert!(about(at(&old["expires_at"]), Timestamp::now() + SignedDuration::from_mins(5)), "{old}");

    let bad = rotate(r#"{"expires":"yesterday"}"#).await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(bad.text().contains("expires"), "{}", bad.text());
}

async fn call(gateway: &TestGateway, key: &str) -> Answer {
    let request =
        Request::get(gateway.url("/x")).header("x-api-key", key).body(Full::<Bytes>::default()).unwrap();
    send(&http1_client(), request).await
}

/// Old and new key, alternating through the real gateway during the grace:
/// together never more than the key's one quota and one rate.
async fn rotation_doubles_nothing(gateway: &TestGateway) {
    let store = &*gateway.gateway.store;
    let now = Timestamp::now();
    for (meta, refusal) in [("quota=10/day", "quota_exceeded"), ("rate_limit=10/h", "rate_limited")] {
        let changes = MetaChanges::from_query(meta, now).unwrap();
        let old = ops::issue(store, PREFIX, "acme", changes, now).await.unwrap();
        let old_key = old.key.expose().to_owned();
        for _ in 0..4 {
            assert_eq!(call(gateway, &old_key).await.status, 200, "{meta}");
        }
        let grace = std::time::Duration::from_secs(3600);
        let new = ops::rotate(store, &old.record.id, grace, None, PREFIX, Timestamp::now()).await.unwrap();
        let new_key = new.key.expose().to_owned();
        let mut passed = 0;
        for i in 0..20 {
            let answer = call(gateway, if i % 2 == 0 { &new_key } else { &old_key }).await;
            match answer.status.as_u16() {
                200 => passed += 1,
                429 => assert_eq!(answer.json()["error"], refusal, "{meta}"),
                other => panic!("{meta}: unexpected {other}: {}", answer.text()),
            }
        }
        assert_eq!(passed, 6, "{meta}: old and new key share one budget of 10, 4 spent before");
    }
}

#[tokio::test]
async fn during_the_grace_old_and_new_key_together_never_exceed_the_keys_limits_redis_store() {
    let redis = RedisServer::start();
    let config = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\n\n[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n",
        redis.url()
    );
    rotation_doubles_nothing(&TestGateway::start(&config).await).await;
}

#[tokio::test]
async fn during_the_grace_old_and_new_key_together_never_exceed_the_keys_limits_file_store() {
    let config = "[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n";
    rotation_doubles_nothing(&TestGateway::start(config).await).await;
}

#[tokio::test]
async fn counts_as_is_stored_by_both_stores_and_never_names_another_client() {
    // Redis: the hash field, and a hand-edited one naming another client.
    let redis = RedisServer::start();
    let store = keygate::store::redis::RedisStore::connect(&redis.url(), "kg:").await.unwrap();
    let now = Timestamp::now();
    let old = ops::issue(&store, PREFIX, "acme", MetaChanges::default(), now).await.unwrap();
    let new = ops::rotate(&store, &old.record.id, std::time::Duration::from_secs(60), None, PREFIX, now)
        .await
        .unwrap();
    let read = store.get(&new.record.id).await.unwrap().unwrap();
    assert_eq!(read.meta.counts_as.as_ref(), Some(&old.record.id));
    let hash_key = format!("kg:{{acme}}:key:{}", new.record.secret_hash.to_hex());
    let field: String = redis.query(redis::cmd("HGET").arg(&hash_key).arg("counts_as"));
    assert_eq!(field, old.record.id.as_str());
    let _: () = redis.query(redis::cmd("HSET").arg(&hash_key).arg("counts_as").arg("other.k1"));
    let err = store.get(&new.record.id).await.unwrap_err().to_string();
    assert!(err.contains("counts_as") && err.contains("another client"), "{err}");

    // The file store: the TOML field, and the same refusal.
    let dir = tempfile::tempdir().unwrap();
    let files = keygate::store::file::FileStore::open(dir.path()).await.unwrap();
    let old = ops::issue(&files, PREFIX, "acme", MetaChanges::default(), now).await.unwrap();
    let new = ops::rotate(&files, &old.record.id, std::time::Duration::from_secs(60), None, PREFIX, now)
        .await
        .unwrap();
    let path = dir.path().join(format!("{}.toml", new.record.id));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&format!("counts_as = \"{}\"", old.record.id)), "{text}");
    let reopened = keygate::store::file::FileStore::open(dir.path()).await.unwrap();
    let read = reopened.get(&new.record.id).await.unwrap().unwrap();
    assert_eq!(read.counts_as(), &old.record.id);
    let forged: KeyId = "other.k1".parse().unwrap();
    std::fs::write(&path, text.replace(old.record.id.as_str(), forged.as_str())).unwrap();
    let reopened = keygate::store::file::FileStore::open(dir.path()).await.unwrap();
    assert_eq!(reopened.get(&new.record.id).await.unwrap(), None, "the forged file is skipped");
}
