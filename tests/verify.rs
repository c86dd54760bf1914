//! `POST /admin/verify` against a real Redis and the real gateway: verdicts
//! for good, unknown, revoked and expired keys and for a route's scopes;
//! spending that a later proxied request sees, dry checks that spend
//! nothing, the rate limit, usage, bad bodies, the token, and the key string
//! kept out of logs and answers.

mod common;

use common::admin::{self, TestAdmin, admin_section};
use common::gateway::{Answer, TestGateway, http1_client, send};
use common::redis::RedisServer;
use http::{Method, Request};
use http_body_util::Full;
use serde_json::{Value, json};

/// An echo route with the default read/write rule, one that needs a named
/// scope for POST, and one costing 2 units.
fn config(redis: &RedisServer) -> String {
    format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\n\n\
         [[route]]\npath = \"/api\"\nupstream = \"builtin:echo\"\n\n\
         [[route]]\npath = \"/orders\"\nupstream = \"builtin:echo\"\nmethod_scopes = {{ POST = [\"orders:write\"] }}\n\n\
         [[route]]\npath = \"/heavy\"\nupstream = \"builtin:echo\"\ncost = 2\n{}",
        redis.url(),
        admin_section()
    )
}

struct Setup {
    redis: RedisServer,
    gateway: TestGateway,
    admin: TestAdmin,
}

async fn setup() -> Setup {
    let redis = RedisServer::start();
    let (gateway, admin) = admin::start(&config(&redis)).await;
    Setup { redis, gateway, admin }
}

impl Setup {
    /// Issues a key with `fields` added to the body; returns (key, id).
    async fn issue(&self, fields: Value) -> (String, String) {
        let mut body = json!({"client": "acme"});
        body.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        let issued = self.admin.call(Method::POST, "/admin/keys", Some(&body.to_string())).await;
        assert_eq!(issued.status, 201, "{}", issued.text());
        let json = issued.json();
        (json["key"].as_str().unwrap().to_owned(), json["id"].as_str().unwrap().to_owned())
    }

    async fn verify(&self, body: Value) -> Answer {
        self.admin.call(Method::POST, "/admin/verify", Some(&body.to_string())).await
    }

    /// The verdict of a call that must answer 200.
    async fn verdict(&self, body: Value) -> Value {
        let answer = self.verify(body.clone()).await;
        assert_eq!(answer.status, 200, "{body}: {}", answer.text());
        answer.json()
    }

    async fn proxied(&self, path: &str, key: &str) -> Answer {
        let request =
            Request::get(self.gateway.url(path)).header("x-api-key", key).body(Full::default()).unwrap();
        send(&http1_client(), request).await
    }
}

#[tokio::test]
async fn a_good_key_is_valid_with_its_client_scopes_and_credits_and_nothing_is_spent() {
    let s = setup().await;
    let logs = common::logs::capture();
    let (key, id) = s.issue(json!({"scopes": ["read"], "uses": 5, "quota": "10/day"})).await;

    let verdict = s.verdict(json!({"key": key, "route": "/api"})).await;
    assert_eq!(
        verdict,
        json!({
            "valid": true, "code": "VALID", "client": "acme", "key_id": id, "scopes": ["read"],
            "remaining": {"rate": null, "quota": null, "credits": 5},
        })
    );
    // Dry checks, however many, spend nothing: not the credits, not the quota.
    for _ in 0..12 {
        assert_eq!(s.verdict(json!({"key": key, "route": "/api"})).await["code"], "VALID");
    }
    let shown = s.admin.call(Method::GET, &format!("/admin/keys/{id}"), None).await.json();
    assert_eq!(shown["credits"]["remaining"], 5, "{shown}");
    let proxied = s.proxied("/api/x", &key).await;
    assert_eq!(proxied.status, 200, "the quota of 10 is whole: {}", proxied.text());
    assert_eq!(proxied.headers["keygate-credits-remaining"], "4");

    // Neither the answer nor any log line holds the key string.
    assert!(!verdict.to_string().contains(&key));
    let secret = key.rsplit('_').next().unwrap();
    assert!(logs.text().contains("key operation"), "the capture works: {}", logs.text());
    assert!(!logs.text().contains(secret), "the key's secret is in the logs");
}

#[tokio::test]
async fn unknown_malformed_revoked_and_expired_keys_are_answers_not_errors() {
    let s = setup().await;
    let logs = common::logs::capture();
    let (key, id) = s.issue(json!({})).await;
    let refused = |code: &str| {
        json!({
            "valid": false, "code": code, "client": null, "key_id": null, "scopes": [],
            "remaining": {"rate": null, "quota": null, "credits": null},
        })
    };

    // A well-formed key no one issued (its checksum is right).
    let prefix = keygate::key::DEFAULT_PREFIX;
    let forged = keygate::key::generate(prefix, "acme").unwrap().key.expose().to_owned();
    assert_eq!(s.verdict(json!({"key": forged})).await, refused("INVALID"));
    assert_eq!(s.verdict(json!({"key": "not a key at all"})).await, refused("INVALID"));

    // Expired: the record's expiry set in the past, straight in Redis.
    let (old_key, old_id) = s.issue(json!({"expires": "30d"})).await;
    let kid = old_id.split_once('.').unwrap().1;
    let hash: String = s.redis.query(redis::cmd("GET").arg(format!("kg:{{acme}}:id:{kid}")));
    let _: () = s
        .redis
        .query(redis::cmd("HSET").arg(format!("kg:{{acme}}:key:{hash}")).arg("expires_at").arg("1000"));
    assert_eq!(s.verdict(json!({"key": old_key})).await, refused("EXPIRED"));

    assert_eq!(s.verdict(json!({"key": key})).await["code"], "VALID");
    let revoked = s.admin.call(Method::POST, &format!("/admin/keys/{id}/revoke"), None).await;
    assert_eq!(revoked.status, 200);
    // The revocation reaches the verifier's cache through pub/sub.
    common::wait::poll_until(std::time::Duration::from_secs(5), "the revocation arrives", || async {
        s.verdict(json!({"key": key})).await == refused("REVOKED")
    })
    .await;

    // Many refusals from one backend do not lock out its good keys.
    for _ in 0..50 {
        assert_eq!(s.verdict(json!({"key": forged})).await["code"], "INVALID");
    }
    let (good, _) = s.issue(json!({})).await;
    assert_eq!(s.verdict(json!({"key": good})).await["code"], "VALID");
    for secret in [&key, &forged, &old_key, &good] {
        assert!(!logs.text().contains(secret.as_str()), "a key string is in the logs");
    }
}

#[tokio::test]
async fn a_routes_scopes_are_checked_as_the_proxy_checks_them() {
    let s = setup().await;
    let (reader, reader_id) = s.issue(json!({"scopes": ["read"]})).await;
    let (writer, _) = s.issue(json!({"scopes": ["read", "orders:write"]})).await;

    let get = s.verdict(json!({"key": reader, "route": "/api", "method": "GET"})).await;
    assert_eq!(get["code"], "VALID");
    let post = s.verdict(json!({"key": reader, "route": "/api", "method": "POST"})).await;
    assert_eq!(
        (post["valid"].clone(), post["code"].clone(), post["key_id"].clone()),
        (false.into(), "FORBIDDEN".into(), reader_id.into())
    );
    // The route found from a path, as the proxy matches it.
    let by_path = s.verdict(json!({"key": reader, "path": "/orders/7", "method": "POST"})).await;
    assert_eq!(by_path["code"], "FORBIDDEN");
    let both = json!({"key": writer, "route": "/orders", "path": "/orders/7", "method": "POST"});
    assert_eq!(s.verdict(both).await["code"], "VALID");
    // Without a route there is nothing to be in scope for.
    assert_eq!(s.verdict(json!({"key": reader, "method": "DELETE"})).await["code"], "VALID");
    // The proxy agrees.
    let request =
        Request::post(s.gateway.url("/orders/7")).header("x-api-key", &reader).body(Full::default());
    assert_eq!(send(&http1_client(), request.unwrap()).await.status, 403);
}

#[tokio::test]
async fn spending_takes_quota_and_credits_that_a_proxied_request_then_lacks_and_records_usage() {
    let s = setup().await;
    let (key, id) = s.issue(json!({"uses": 4, "quota": "5/day"})).await;

    let spent = s.verdict(json!({"key": key, "route": "/api", "spend": true})).await;
    assert_eq!(spent["remaining"], json!({"rate": null, "quota": 4, "credits": 3}), "{spent}");
    // The route's cost by default, or the body's.
    let heavy = s.verdict(json!({"key": key, "route": "/heavy", "spend": true})).await;
    assert_eq!(heavy["remaining"], json!({"rate": null, "quota": 2, "credits": 1}), "{heavy}");
    let shown = s.admin.call(Method::GET, &format!("/admin/keys/{id}"), None).await.json();
    assert_eq!(shown["credits"]["remaining"], 1);

    let last = s.proxied("/api/x", &key).await;
    assert_eq!(last.status, 200, "{}", last.text());
    assert_eq!(last.headers["keygate-credits-remaining"], "0");
    let none = s.proxied("/api/x", &key).await;
    assert_eq!((none.status.as_u16(), none.json()["error"].clone()), (429, "credits_exhausted".into()));
    let exhausted = s.verdict(json!({"key": key, "cost": 1, "spend": true})).await;
    assert_eq!(
        (exhausted["valid"].clone(), exhausted["code"].clone(), exhausted["remaining"]["credits"].clone()),
        (false.into(), "CREDITS_EXHAUSTED".into(), 0.into())
    );

    // A quota without credits runs out the same way.
    let (quota_key, _) = s.issue(json!({"quota": "2/day"})).await;
    let body = json!({"key": quota_key, "spend": true, "cost": 2});
    assert_eq!(s.verdict(body.clone()).await["remaining"]["quota"], 0);
    let over = s.verdict(body).await;
    assert_eq!(over["code"], "QUOTA_EXCEEDED");
    assert!(over["retry_after"].as_u64().unwrap() > 0, "{over}");
    assert_eq!(s.proxied("/api/x", &quota_key).await.status, 429);

    // Spent calls are usage, recorded as requests on their routes.
    let flusher = s.gateway.gateway.usage_flusher().expect("usage on Redis");
    flusher.flush_now().await.unwrap();
    let report = s.redis.usage_report("acme").await;
    // 2 spent on the credit key + its 2 proxied, 1 spent refused; 1 + 1 refused
    // spent on the quota key, and its refused proxied request.
    assert_eq!(report.totals.requests, 8, "{report:?}");
    let text = serde_json::to_value(&report).unwrap().to_string();
    assert!(text.contains("/heavy"), "per route: {text}");
}

#[tokio::test]
async fn the_rate_limit_is_spent_too() {
    let s = setup().await;
    let (key, _) = s.issue(json!({"rate": "2/h"})).await;
    let body = json!({"key": key, "spend": true});
    assert_eq!(s.verdict(body.clone()).await["remaining"]["rate"], 1);
    assert_eq!(s.verdict(body.clone()).await["remaining"]["rate"], 0);
    let limited = s.verdict(body).await;
    assert_eq!((limited["valid"].clone(), limited["code"].clone()), (false.into(), "RATE_LIMITED".into()));
    assert!(limited["retry_after"].as_u64().unwrap() > 0, "{limited}");
    assert_eq!(s.proxied("/api/x", &key).await.status, 429, "the proxy sees the same bucket");
    // A dry check spends no cell.
    assert_eq!(s.verdict(json!({"key": key})).await["code"], "VALID");
}

#[tokio::test]
async fn bad_bodies_get_400_naming_the_field_and_no_token_gets_401() {
    let s = setup().await;
    let (key, _) = s.issue(json!({})).await;
    for (body, field) in [
        (json!({}), "key"),
        (json!({"key": 5}), "key"),
        (json!({"key": ""}), "key"),
        (json!({"key": "k".repeat(513)}), "key"),
        (json!({"key": key, "method": "get"}), "method"),
        (json!({"key": key, "colour": "blue"}), "colour"),
        (json!({"key": key, "route": "/nowhere"}), "route"),
        (json!({"key": key, "route": "/api/x"}), "route"),
        (json!({"key": key, "route": null}), "route"),
        (json!({"key": key, "method": "GE T"}), "method"),
        (json!({"key": key, "path": "orders"}), "path"),
        (json!({"key": key, "path": "/elsewhere"}), "path"),
        (json!({"key": key, "route": "/api", "path": "/orders/1"}), "path"),
        (json!({"key": key, "cost": 0}), "cost"),
        (json!({"key": key, "cost": -1}), "cost"),
        (json!({"key": key, "cost": 1_000_001}), "cost"),
        (json!({"key": key, "spend": "yes"}), "spend"),
    ] {
        let answer = s.verify(body.clone()).await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.text());
        assert_eq!(answer.json()["field"], field, "{body}: {}", answer.text());
        assert!(!answer.text().contains(&key), "{body}: the key is echoed");
    }
    let not_json = s.admin.call(Method::POST, "/admin/verify", Some("{\"key\":")).await;
    assert_eq!((not_json.status.as_u16(), not_json.json()["error"].clone()), (400, "bad_json".into()));

    let body = json!({"key": key}).to_string();
    let anonymous = s.admin.call_as(None, Method::POST, "/admin/verify", Some(&body)).await;
    assert_eq!((anonymous.status.as_u16(), anonymous.json()["error"].clone()), (401, "missing_token".into()));
    let wrong = s.admin.call_as(Some("not-the-token"), Method::POST, "/admin/verify", Some(&body)).await;
    assert_eq!(wrong.status, 401);
}
