//! Client records end to end: written by the real `keygate clients` binary
//! (or the operations it runs) into a real `redis-server` or a real key
//! folder, read by the real gateway with each key, and revoked so that every
//! key of the client is refused on every gateway.
//!
//! Client limits in admission are wired in elsewhere (`src/limit`); these
//! tests are about the records, verification, revocation, CLI and admin API.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::admin::{self, admin_section};
use common::gateway::{Answer, TestGateway, http1_client, send};
use common::redis::RedisServer;
use common::upstream::Upstream;
use common::wait::eventually;
use http::{Method, Request};
use http_body_util::Full;
use jiff::Timestamp;
use keygate::meta::MetaChanges;
use keygate::ops;
use keygate::store::file::FileStore;
use keygate::store::redis::RedisStore;
use keygate::store::{KeyStore, SharedStore};

const PREFIX: &str = "kg_";

/// How long a revocation may take to reach another gateway; generous, as
/// the wait is on the condition (pub/sub delivers in milliseconds).
const INVALIDATION_DEADLINE: Duration = Duration::from_secs(2);

// === Helpers ===

fn redis_config(redis: &RedisServer, upstream: &Upstream) -> String {
    format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\n\n[keys]\ncache_ttl = \"1h\"\n\n[[route]]\npath = \"/\"\nupstream = \"api\"\n\n[upstream.api]\ntargets = [\"{}\"]\n",
        redis.url(),
        upstream.url()
    )
}

/// Runs the real binary in an empty folder, without `KEYGATE_REDIS_URL`.
async fn keygate(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
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
    .unwrap()
}

async fn keygate_ok(args: &[&str]) -> String {
    let out = keygate(args).await;
    assert!(out.status.success(), "keygate {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

async fn get_with_key(gateway: &TestGateway, key: &str) -> Answer {
    let request = Request::get(gateway.url("/a"))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::default());
    send(&http1_client(), request.unwrap()).await
}

async fn status(gateway: &TestGateway, key: &str) -> u16 {
    get_with_key(gateway, key).await.status.as_u16()
}

async fn redis_store(redis: &RedisServer) -> SharedStore {
    Arc::new(RedisStore::connect(&redis.url(), "kg:").await.expect("connect to the test redis"))
}

async fn issue(store: &dyn KeyStore, client: &str) -> String {
    let issued = ops::issue(store, PREFIX, client, MetaChanges::default(), Timestamp::now()).await.unwrap();
    issued.key.expose().to_owned()
}

fn loopback() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

// === Revocation on every gateway ===

#[tokio::test]
async fn revoking_a_client_with_the_cli_refuses_all_its_keys_on_two_gateways_and_across_a_cache_refresh() {
    let redis = RedisServer::start();
    let upstream = Upstream::mirror().await;
    let config = redis_config(&redis, &upstream);
    let (first, second) = (TestGateway::start(&config).await, TestGateway::start(&config).await);
    let url = redis.url();

    keygate_ok(&["clients", "--redis", &url, "create", "acme", "--quota", "100000/month"]).await;
    let key_a = keygate_ok(&["keys", "--redis", &url, "issue", "--client", "acme"]).await.trim().to_owned();
    let key_b = keygate_ok(&["keys", "--redis", &url, "issue", "--client", "acme"]).await.trim().to_owned();
    let other = keygate_ok(&["keys", "--redis", &url, "issue", "--client", "other"]).await.trim().to_owned();
    // Every key works on both gateways, which therefore have them cached.
    for gateway in [&first, &second] {
        for key in [&key_a, &key_b, &other] {
            assert_eq!(status(gateway, key).await, 200);
        }
    }
    let caller = first.gateway.verifier.verify(&key_a, loopback(), Instant::now()).await.unwrap();
    let client = caller.client.as_ref().expect("the key carries its client's record");
    assert_eq!(client.meta.quota.unwrap().to_string(), "100000/month");

    let out = keygate(&["clients", "--redis", &url, "revoke", "acme"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is revoked"));
    for gateway in [&first, &second] {
        for key in [&key_a, &key_b] {
            let took =
                eventually(INVALIDATION_DEADLINE, "the client's revocation reaches the gateway", || async {
                    status(gateway, key).await == 401
                })
                .await;
            eprintln!("refused {took:?} after the CLI returned");
        }
    }
    let refused = get_with_key(&second, &key_b).await;
    assert_eq!(refused.json()["error"], "invalid_key", "the contract's one code for every refused key");
    assert_eq!(status(&first, &other).await, 200, "another client's key is untouched");

    // Every cached record re-checked with the store (what a Redis reconnect
    // does): the keys stay refused, on the cached answer and the fresh one.
    let _: i64 = redis.query(redis::cmd("PUBLISH").arg("kg:invalidate").arg("*"));
    for gateway in [&first, &second] {
        eventually(INVALIDATION_DEADLINE, "the refresh is done", || async {
            let refused = status(gateway, &key_a).await == 401 && status(gateway, &key_b).await == 401;
            let hash = keygate::key::parse(&key_a, PREFIX).unwrap().secret_hash();
            refused && gateway.gateway.verifier.is_current(&hash)
        })
        .await;
        assert_eq!(status(gateway, &key_a).await, 401);
        assert_eq!(status(gateway, &key_b).await, 401);
    }

    // A revoked client gets no new key; the failure is a runtime one (exit 1).
    let out = keygate(&["keys", "--redis", &url, "issue", "--client", "acme"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("client acme is revoked"), "{out:?}");
}

#[tokio::test]
async fn a_key_without_a_client_record_works_as_before_and_picks_up_a_record_created_later() {
    let redis = RedisServer::start();
    let upstream = Upstream::mirror().await;
    let gateway = TestGateway::start(&redis_config(&redis, &upstream)).await;
    let store = redis_store(&redis).await;
    let key = issue(&*store, "acme").await;
    let caller = gateway.gateway.verifier.verify(&key, loopback(), Instant::now()).await.unwrap();
    assert!(caller.client.is_none(), "no record, no client limits");
    assert_eq!(status(&gateway, &key).await, 200);

    // Creating the record announces it: the cached key is re-read with it.
    let changes = MetaChanges::from_query("rate_limit=50&label=gold", Timestamp::now()).unwrap();
    ops::clients::create(&*store, "acme", changes, Timestamp::now()).await.unwrap();
    eventually(INVALIDATION_DEADLINE, "the cached key carries the new record", || async {
        let caller = gateway.gateway.verifier.verify(&key, loopback(), Instant::now()).await.unwrap();
        caller.client.as_ref().is_some_and(|c| c.meta.label.as_deref() == Some("gold"))
    })
    .await;
    assert_eq!(status(&gateway, &key).await, 200);
}

// === Redis layout ===

#[tokio::test]
async fn a_client_record_is_a_plain_hash_beside_its_keys_read_with_the_key_in_one_lookup() {
    let redis = RedisServer::start();
    let upstream = Upstream::mirror().await;
    let url = redis.url();
    let out = keygate_ok(&[
        "clients",
        "--redis",
        &url,
        "create",
        "acme",
        "--rate",
        "100/s",
        "--quota",
        "100000/month",
        "--label",
        "Acme Corp",
        "--json",
    ])
    .await;
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((json["id"].as_str(), json["status"].as_str()), (Some("acme"), Some("active")));

    let fields: std::collections::HashMap<String, String> =
        redis.query(redis::cmd("HGETALL").arg("kg:{acme}:client"));
    assert_eq!(fields["id"], "acme");
    assert_eq!(fields["rate"], "100/s");
    assert_eq!(fields["quota"], "100000/month");
    assert_eq!(fields["label"], "Acme Corp");
    assert_eq!(fields["status"], "active");
    assert!(fields["created_at"].parse::<i64>().is_ok() && fields["updated_at"] == fields["created_at"]);
    assert!(!fields.contains_key("burst"), "unset fields are absent");
    let listed: bool = redis.query(redis::cmd("SISMEMBER").arg("kg:clients").arg("acme"));
    assert!(listed);

    let key = keygate_ok(&["keys", "--redis", &url, "issue", "--client", "acme"]).await.trim().to_owned();
    let gateway = TestGateway::start(&redis_config(&redis, &upstream)).await;
    redis.reset_stats();
    assert_eq!(status(&gateway, &key).await, 200);
    assert_eq!(status(&gateway, &key).await, 200);
    // Key and client, pipelined, on the first request; nothing on the second.
    assert_eq!(redis.command_count("hgetall"), 2);
}

// === CLI ===

#[tokio::test]
async fn the_clients_cli_creates_lists_shows_updates_and_refuses_bad_input_with_exit_2() {
    let redis = RedisServer::start();
    let url = redis.url();
    keygate_ok(&["clients", "--redis", &url, "create", "acme", "--meta", "quota=1000/day&label=gold"]).await;
    keygate_ok(&["clients", "--redis", &url, "create", "beta"]).await;
    let key = keygate_ok(&["keys", "--redis", &url, "issue", "--client", "acme"]).await;
    let id = keygate::key::parse(key.trim(), PREFIX).unwrap().client.to_owned();
    assert_eq!(id, "acme");

    let table = keygate_ok(&["clients", "--redis", &url, "list"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[1].starts_with("acme") && lines[1].contains("1000/day") && lines[2].starts_with("beta"));

    let shown = keygate_ok(&["clients", "--redis", &url, "show", "acme", "--json"]).await;
    let json: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let keys = json["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert!(keys[0]["id"].as_str().unwrap().starts_with("acme."));
    assert_eq!(keys[0]["status"], "active");

    let updated =
        keygate_ok(&["clients", "--redis", &url, "update", "acme", "--quota", "none", "--json"]).await;
    let json: serde_json::Value = serde_json::from_str(&updated).unwrap();
    assert_eq!((json["quota"].clone(), json["label"].clone()), (serde_json::Value::Null, "gold".into()));

    for (args, needle) in [
        (&["create", "gamma", "--scopes", "a b"][..], "scope"),
        (&["create", "gamma", "--meta", "scope=read&expires=1d"], "expires"),
        (&["create", "gamma", "--quota", "10/s"], "at least a minute"),
        (&["create", "a.b"], "client"),
        (&["update", "acme"], "nothing to change"),
    ] {
        let full: Vec<&str> =
            ["clients", "--redis", url.as_str()].into_iter().chain(args.iter().copied()).collect();
        let out = keygate(&full).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let exists: bool = redis.query(redis::cmd("EXISTS").arg("kg:{gamma}:client"));
    assert!(!exists, "nothing was written");
    let out = keygate(&["clients", "--redis", &url, "create", "acme"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already has a record"));
    let out = keygate(&["clients", "--redis", &url, "show", "nobody"]).await;
    assert_eq!(out.status.code(), Some(3), "not found, as for keys");

    // Client writes are in the audit trail beside key writes.
    keygate_ok(&["clients", "--redis", &url, "revoke", "beta"]).await;
    let audit = keygate_ok(&["keys", "--redis", &url, "audit", "--json"]).await;
    let entries: serde_json::Value = serde_json::from_str(&audit).unwrap();
    let actions: Vec<(&str, &str)> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["client"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("client-create", "acme"),
            ("client-create", "beta"),
            ("issue", "acme"),
            ("client-update", "acme"),
            ("client-revoke", "beta")
        ]
    );
    let audit = keygate_ok(&["keys", "--redis", &url, "audit", "--client", "beta"]).await;
    assert_eq!(audit.lines().filter(|l| l.contains("client-")).count(), 2, "{audit}");
}

/// Client credits from the real binary: granted by `create --uses/--refill`,
/// stored in the client hash with the key records' field names, spent
/// through the credit authority as `Owner::Client` (as admission does),
/// shown by `show` with the count left, reset by `update --uses` (or
/// `--meta uses=`), kept by `--refill` alone, cleared by `none`; a bad
/// value exits 2 naming the flag and changes nothing.
#[tokio::test]
async fn the_clients_cli_grants_shows_resets_and_clears_client_credits_and_refuses_bad_values_with_exit_2() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = |rest: &[&str]| -> Vec<String> {
        ["clients", "--redis", url.as_str()].iter().chain(rest).map(|s| s.to_string()).collect()
    };
    let run = |rest: &[&str]| {
        let all = args(rest);
        async move { keygate(&all.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    let json_of = |out: &Output| -> serde_json::Value {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };

    let created =
        json_of(&run(&["create", "acme", "--uses", "1000", "--refill", "1000/month", "--json"]).await);
    assert_eq!(created["credits"]["uses"], 1000);
    assert_eq!(created["credits"]["refill"], "1000/month");
    let granted_at = created["credits"]["granted_at"].clone();
    let field =
        |name: &str| -> Option<String> { redis.query(redis::cmd("HGET").arg("kg:{acme}:client").arg(name)) };
    assert_eq!(field("credits").as_deref(), Some("1000"));
    assert_eq!(field("credits_refill").as_deref(), Some("1000/month"));
    assert!(field("credits_granted_at").is_some_and(|ms| ms.parse::<i64>().is_ok()));

    // Spend three as admission will, under the client's name.
    let store = redis_store(&redis).await;
    let grant = store.get_client("acme").await.unwrap().unwrap().meta.credits.unwrap();
    let conn = redis::aio::ConnectionManager::new(redis::Client::open(url.as_str()).unwrap()).await.unwrap();
    let credits = keygate::limit::credits::Credits::redis(conn, "kg:");
    for _ in 0..3 {
        let owner = keygate::limit::credits::Owner::Client("acme");
        credits.take(owner, &grant, std::num::NonZeroU32::MIN).await.unwrap();
    }
    let out = run(&["show", "acme"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("credits  997 left of 1000, refill 1000/month"), "{text}");
    let shown = json_of(&run(&["show", "acme", "--json"]).await);
    assert_eq!(
        (shown["credits"]["remaining"].clone(), shown["credits"]["uses"].clone()),
        (997.into(), 1000.into())
    );

    // Bad values: exit 2, the flag (or field) named, nothing changed.
    for (bad, needle) in [
        (&["update", "acme", "--uses=-1"][..], "--uses"),
        (&["update", "acme", "--uses=lots"], "--uses"),
        (&["update", "acme", "--uses=1000000000000001"], "--uses"),
        (&["update", "acme", "--refill=5/10s"], "--refill"),
        (&["update", "acme", "--refill=0/day"], "--refill"),
        (&["update", "acme", "--meta", "uses=lots"], "uses"),
        (&["update", "acme", "--uses", "none", "--refill", "5/day"], "refill"),
        (&["create", "beta", "--refill", "5/fortnight"], "--refill"),
    ] {
        let out = run(bad).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {stderr}");
        assert!(stderr.contains(needle), "{bad:?}: {stderr}");
    }
    let exists: bool = redis.query(redis::cmd("EXISTS").arg("kg:{beta}:client"));
    assert!(!exists, "a refused create wrote nothing");
    let shown = json_of(&run(&["show", "acme", "--json"]).await);
    assert_eq!(shown["credits"]["remaining"], 997, "a refused update changed nothing");

    // `--refill` alone keeps the grant; `--uses N` is a new grant, shown at once.
    let refilled = json_of(&run(&["update", "acme", "--refill", "2000/month", "--json"]).await);
    assert_eq!(
        (refilled["credits"]["uses"].clone(), refilled["credits"]["granted_at"].clone()),
        (1000.into(), granted_at)
    );
    let reset = json_of(&run(&["update", "acme", "--uses", "5", "--json"]).await);
    assert_eq!(
        (reset["credits"]["remaining"].clone(), reset["credits"]["refill"].clone()),
        (5.into(), "2000/month".into())
    );
    let reset = json_of(&run(&["update", "acme", "--meta", "uses=7", "--json"]).await);
    assert_eq!(reset["credits"]["remaining"], 7);

    let cleared = json_of(&run(&["update", "acme", "--uses", "none", "--json"]).await);
    assert!(cleared["credits"].is_null(), "{cleared}");
    assert_eq!(field("credits"), None, "the hash lost the field");
    assert_eq!(field("credits_refill"), None);
    let out = run(&["show", "acme"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("credits  -"));
}

// === File store ===

#[tokio::test]
async fn the_file_store_keeps_a_client_as_a_file_beside_its_keys_and_a_revocation_refuses_them() {
    let upstream = Upstream::mirror().await;
    let dir = tempfile::tempdir().unwrap();
    let keys_dir = dir.path().join("keys");
    std::fs::create_dir(&keys_dir).unwrap();
    let config = format!(
        "[store]\nkind = \"file\"\ndir = \"keys\"\n\n[[route]]\npath = \"/\"\nupstream = \"api\"\n\n[upstream.api]\ntargets = [\"{}\"]\n",
        upstream.url()
    );
    let gateway = TestGateway::start_in(&config, dir).await;
    let store = &gateway.gateway.store;
    let key = issue(&**store, "acme").await;
    let changes = MetaChanges::from_query("quota=500/day", Timestamp::now()).unwrap();
    ops::clients::create(&**store, "acme", changes, Timestamp::now()).await.unwrap();

    let text = std::fs::read_to_string(keys_dir.join("acme.toml")).unwrap();
    assert!(text.contains("id = \"acme\"") && text.contains("quota = \"500/day\""), "{text}");
    // Another process (a second gateway, the CLI) reads the same folder.
    let other = FileStore::open(&keys_dir).await.unwrap();
    assert_eq!(other.get_client("acme").await.unwrap().unwrap().meta.quota.unwrap().to_string(), "500/day");
    assert!(other.reload().await.unwrap().is_empty(), "no file skipped: {text}");

    assert_eq!(status(&gateway, &key).await, 200);
    ops::clients::revoke(&**store, "acme", Timestamp::now()).await.unwrap();
    // The store announces the write in process; the verifier's listener
    // applies it a moment later.
    eventually(INVALIDATION_DEADLINE, "the revocation reaches the verifier", || async {
        status(&gateway, &key).await == 401
    })
    .await;
    other.reload().await.unwrap();
    assert!(other.get_client("acme").await.unwrap().unwrap().meta.is_revoked());
}

// === Admin API ===

#[tokio::test]
async fn the_admin_api_creates_lists_shows_updates_and_revokes_clients() {
    let redis = RedisServer::start();
    let config = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\n\n[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n{}",
        redis.url(),
        admin_section()
    );
    let (gateway, admin) = admin::start(&config).await;

    let created = admin
        .call(Method::POST, "/admin/clients", Some(r#"{"id":"acme","quota":"1000/day","label":"gold"}"#))
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.headers["location"], "/admin/clients/acme");
    assert_eq!(created.json()["quota"], "1000/day");
    assert_eq!(created.json()["rate"], serde_json::Value::Null);

    // Scopes on a client are its certificate callers' (none by default).
    assert_eq!(created.json()["scopes"], serde_json::json!([]));
    let scoped =
        admin.call(Method::PATCH, "/admin/clients/acme", Some(r#"{"scopes":["read","orders:write"]}"#)).await;
    assert_eq!(scoped.status, 200, "{}", scoped.text());
    assert_eq!(scoped.json()["scopes"], serde_json::json!(["read", "orders:write"]));

    let again = admin.call(Method::POST, "/admin/clients", Some(r#"{"id":"acme"}"#)).await;
    assert_eq!((again.status.as_u16(), again.json()["error"].clone()), (409, "client_exists".into()));
    for (body, field) in [
        (r#"{"id":"b","scopes":["a b"]}"#, "scopes"),
        (r#"{"id":"b","expires":"30d"}"#, "expires"),
        // The CLI's `--meta` syntax is no field of the admin API (issue 19).
        (r#"{"id":"b","meta":"scope=read"}"#, "meta"),
        (r#"{"id":"b.c"}"#, "client"),
        (r#"{"quota":"5/day"}"#, "id"),
    ] {
        let refused = admin.call(Method::POST, "/admin/clients", Some(body)).await;
        assert_eq!(refused.status, 400, "{body}: {}", refused.text());
        assert_eq!(refused.json()["field"], field, "{body}");
    }

    let issued = admin.call(Method::POST, "/admin/keys", Some(r#"{"client":"acme"}"#)).await;
    assert_eq!(issued.status, 201);
    let key = issued.json()["key"].as_str().unwrap().to_owned();
    let key_id = issued.json()["id"].as_str().unwrap().to_owned();

    let shown = admin.call(Method::GET, "/admin/clients/acme", None).await;
    assert_eq!(shown.status, 200);
    assert_eq!(shown.json()["keys"][0]["id"], key_id.as_str());
    let listed = admin.call(Method::GET, "/admin/clients", None).await;
    assert_eq!(listed.json()["items"].as_array().unwrap().len(), 1);
    assert_eq!(listed.json()["next_cursor"], serde_json::Value::Null);
    assert!(listed.json()["items"][0].get("keys").is_none());

    let patched =
        admin.call(Method::PATCH, "/admin/clients/acme", Some(r#"{"quota":null,"rate":"10/s"}"#)).await;
    assert_eq!(patched.status, 200, "{}", patched.text());
    assert_eq!(
        (patched.json()["quota"].clone(), patched.json()["rate"].clone()),
        (serde_json::Value::Null, "10/s".into())
    );
    let granted =
        admin.call(Method::PATCH, "/admin/clients/acme", Some(r#"{"uses":50,"refill":"50/day"}"#)).await;
    assert_eq!(granted.status, 200, "{}", granted.text());
    assert_eq!(
        (granted.json()["credits"]["uses"].clone(), granted.json()["credits"]["refill"].clone()),
        (50.into(), "50/day".into())
    );
    let shown = admin.call(Method::GET, "/admin/clients/acme", None).await;
    assert_eq!(shown.json()["credits"]["remaining"], 50, "{}", shown.text());
    let refused = admin.call(Method::PATCH, "/admin/clients/acme", Some(r#"{"uses":-1}"#)).await;
    assert_eq!((refused.status.as_u16(), refused.json()["field"].clone()), (400, "uses".into()));
    let cleared = admin.call(Method::PATCH, "/admin/clients/acme", Some(r#"{"uses":null}"#)).await;
    assert!(cleared.json()["credits"].is_null(), "{}", cleared.text());
    let missing = admin.call(Method::PATCH, "/admin/clients/nobody", Some(r#"{"label":"x"}"#)).await;
    assert_eq!((missing.status.as_u16(), missing.json()["error"].clone()), (404, "not_found".into()));

    assert_eq!(status(&gateway, &key).await, 200);
    let revoked = admin.call(Method::POST, "/admin/clients/acme/revoke", None).await;
    assert_eq!(revoked.status, 200);
    assert_eq!(
        (revoked.json()["status"].clone(), revoked.json()["already_revoked"].clone()),
        ("revoked".into(), false.into())
    );
    eventually(INVALIDATION_DEADLINE, "the revocation reaches the gateway", || async {
        status(&gateway, &key).await == 401
    })
    .await;
    let again = admin.call(Method::POST, "/admin/clients/acme/revoke", None).await;
    assert_eq!(again.json()["already_revoked"], true);

    let refused = admin.call(Method::POST, "/admin/keys", Some(r#"{"client":"acme"}"#)).await;
    assert_eq!((refused.status.as_u16(), refused.json()["error"].clone()), (409, "client_revoked".into()));
    let refused = admin.call(Method::POST, &format!("/admin/keys/{key_id}/rotate"), None).await;
    assert_eq!((refused.status.as_u16(), refused.json()["error"].clone()), (409, "client_revoked".into()));
}

/// Regression: a pipelined lookup's `WRONGTYPE` came back as a pipeline
/// error without a code, so a hand-broken record read as a Redis outage.
#[tokio::test]
async fn a_client_record_of_the_wrong_type_refuses_its_keys_as_unreadable_not_as_an_outage() {
    let redis = RedisServer::start();
    let upstream = Upstream::mirror().await;
    let store = redis_store(&redis).await;
    let key = issue(&*store, "acme").await;
    let healthy = issue(&*store, "other").await;
    let _: () = redis.query(redis::cmd("SET").arg("kg:{acme}:client").arg("not a hash"));
    let gateway = TestGateway::start(&redis_config(&redis, &upstream)).await;

    let refused = get_with_key(&gateway, &key).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.json()["error"], "key_record_unreadable");
    assert_eq!(status(&gateway, &healthy).await, 200, "other clients are served");
}
