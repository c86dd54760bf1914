//! The admin listener: token checks, the keys API against both stores,
//! health and readiness, metrics, and its separation from the public listener.

mod common;

use std::future::Future;
use std::time::Duration;

use common::admin::{self, TOKEN, TestAdmin, admin_section};
use common::gateway::{Answer, TestGateway, http1_client, send};
use common::redis::RedisServer;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;

/// A protected echo route and a public one; no catch-all, so unknown paths
/// on the public listener answer `no_route`.
fn config(store: &str) -> String {
    format!(
        "{store}\n[[route]]\npath = \"/api\"\nupstream = \"builtin:echo\"\n\n[[route]]\npath = \"/open\"\nupstream = \"builtin:echo\"\npublic = true\n{}",
        admin_section()
    )
}

fn redis_store(redis: &RedisServer) -> String {
    format!("[store]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"kgtest:\"\n", redis.url())
}

/// A request through the public listener presenting `key`.
async fn public_get(gateway: &TestGateway, path: &str, key: &str) -> Answer {
    let request = Request::get(gateway.url(path)).header("x-api-key", key).body(Full::default()).unwrap();
    send(&http1_client(), request).await
}

/// Polls `check` until it holds, failing after `secs`: waits on a condition,
/// never on a fixed sleep.
async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, bounded by the deadline
    }
}

// === Access ===

#[tokio::test]
async fn admin_calls_need_the_bearer_token() {
    let (_gateway, admin) = admin::start(&config("")).await;

    let none = admin.call_as(None, Method::GET, "/admin/keys", None).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.json()["error"], "missing_token");
    assert!(none.headers.contains_key("www-authenticate"));

    for wrong in ["nope", &TOKEN[..TOKEN.len() - 1], &format!("{TOKEN}x"), &TOKEN.to_uppercase()] {
        let answer = admin.call_as(Some(wrong), Method::GET, "/admin/keys", None).await;
        assert_eq!(answer.status, 401, "{wrong}");
        assert_eq!(answer.json()["error"], "invalid_token");
        assert!(!answer.text().contains(TOKEN), "the token is never echoed");
    }
    let basic = Request::get(admin.url("/admin/keys"))
        .header("authorization", format!("Basic {TOKEN}"))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&http1_client(), basic).await.status, 401);

    assert_eq!(admin.call(Method::GET, "/admin/keys", None).await.status, 200);
}

/// Regression (issue 16, defect 10): `bearer` in lowercase was refused; the
/// scheme is case-insensitive (RFC 9110 §11.1), the token is not.
#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_and_the_token_is_not() {
    let (_gateway, admin) = admin::start(&config("")).await;
    for scheme in ["bearer", "BEARER", "Bearer", "bEaReR"] {
        let request = Request::get(admin.url("/admin/keys"))
            .header("authorization", format!("{scheme} {TOKEN}"))
            .body(Full::default())
            .unwrap();
        assert_eq!(send(&http1_client(), request).await.status, 200, "{scheme}");
    }
    let request = Request::get(admin.url("/admin/keys"))
        .header("authorization", format!("Bearer {}", TOKEN.to_uppercase()))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&http1_client(), request).await.status, 401);
}

#[tokio::test]
async fn unknown_admin_paths_say_401_without_the_token_and_404_with_it() {
    let (_gateway, admin) = admin::start(&config("")).await;
    let anonymous = admin.call_as(None, Method::GET, "/admin/secret-stuff", None).await;
    assert_eq!(anonymous.status, 401, "no route discovery without the token");
    let known = admin.call(Method::GET, "/admin/secret-stuff", None).await;
    assert_eq!((known.status, known.json()["error"].clone()), (StatusCode::NOT_FOUND, "no_route".into()));
    let method = admin.call(Method::DELETE, "/admin/keys/acme.k1", None).await;
    assert_eq!(method.status, 405);
    assert_eq!(method.json()["error"], "method_not_allowed");
    assert_eq!(method.headers["allow"], "GET, HEAD, PATCH");
    let anonymous = admin.call_as(None, Method::DELETE, "/admin/keys/acme.k1", None).await;
    assert_eq!(anonymous.status, 401, "no method discovery without the token either");
    let probe = admin.call_as(None, Method::POST, "/healthz", None).await;
    assert_eq!(probe.status, 401, "only GET and HEAD of a probe are open");
}

/// Regression (issue 19): schemathesis found a PATCH whose body was not JSON
/// answered 200, and axum's own refusals would be plain text; every refusal
/// is the contract's JSON error.
#[tokio::test]
async fn bodies_and_queries_that_do_not_fit_get_the_contracts_json_errors() {
    let (_gateway, admin) = admin::start(&config("")).await;
    let id = admin.call(Method::POST, "/admin/keys", Some(r#"{"client":"acme"}"#)).await.json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/admin/keys/{id}");
    for body in ["not json", "", "[1]", "{\"label\":"] {
        let answer = admin.call(Method::PATCH, &path, Some(body)).await;
        assert_eq!(answer.status, 400, "{body:?}: {}", answer.text());
        assert!(
            ["bad_json", "invalid_field"].contains(&answer.json()["error"].as_str().unwrap()),
            "{body:?}"
        );
    }
    let untyped = Request::patch(admin.url(&path))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(bytes::Bytes::from_static(b"{\"label\":\"x\"}")))
        .unwrap();
    let answer = send(&http1_client(), untyped).await;
    assert_eq!(answer.status, 415);
    assert_eq!(answer.json()["error"], "unsupported_media_type");

    for (body, field) in [
        (r#"{"client":5}"#, "client"),
        (r#"{"client":"c","scopes":[1]}"#, "scopes"),
        (r#"{"client":"c","burst":-1}"#, "burst"),
        (r#"{"client":"c","label":{}}"#, "label"),
    ] {
        let answer = admin.call(Method::POST, "/admin/keys", Some(body)).await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.text());
        assert_eq!(
            (answer.json()["error"].as_str(), answer.json()["field"].as_str()),
            (Some("invalid_field"), Some(field)),
            "{body}"
        );
    }
    let client_expiry =
        admin.call(Method::POST, "/admin/clients", Some(r#"{"id":"acme","expires":"1d"}"#)).await;
    assert_eq!(
        (client_expiry.status.as_u16(), client_expiry.json()["field"].clone()),
        (400, "expires".into())
    );

    let clients = admin.call(Method::GET, "/admin/clients?page=2", None).await;
    assert_eq!((clients.status.as_u16(), clients.json()["field"].clone()), (400, "page".into()));
    // `?client=` (empty) is no filter.
    let all = admin.call(Method::GET, "/admin/keys?client=", None).await;
    assert_eq!(all.status, 200, "{}", all.text());
    assert_eq!(all.json()["items"].as_array().unwrap().len(), 1);
    let usage = admin.call(Method::GET, "/admin/usage?client=&since=1h", None).await;
    assert_eq!(usage.status, 501, "the file store keeps no usage: {}", usage.text());
}

#[tokio::test]
async fn probes_and_metrics_need_no_token() {
    let (_gateway, admin) = admin::start(&config("")).await;
    let health = admin.call_as(None, Method::GET, "/healthz", None).await;
    assert_eq!((health.status, health.json()["status"].clone()), (StatusCode::OK, "ok".into()));
    let ready = admin.call_as(None, Method::GET, "/readyz", None).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["routes"], 2);
    let metrics = admin.call_as(None, Method::GET, "/metrics", None).await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.headers["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    assert!(metrics.text().contains("# TYPE keygate_key_cache_hits counter"), "{}", metrics.text());
}

#[tokio::test]
async fn the_public_listener_never_reaches_the_admin_api() {
    let (gateway, _admin) = admin::start(&config("")).await;
    for path in ["/admin/keys", "/admin/reload", "/metrics", "/healthz", "/readyz"] {
        let request = Request::get(gateway.url(path))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Full::default())
            .unwrap();
        let answer = send(&http1_client(), request).await;
        assert_eq!(answer.status, 404, "{path}: {}", answer.text());
        assert_eq!(answer.json()["error"], "no_route", "{path}");
    }
}

// === Keys ===

/// Issue, use, list, show, update, rotate and revoke a key through the admin
/// API, checking each effect through the public listener.
async fn key_lifecycle(gateway: &TestGateway, admin: &TestAdmin) {
    let issued = admin
        .call(Method::POST, "/admin/keys", Some(r#"{"client":"acme","scopes":["read"],"label":"ci"}"#))
        .await;
    assert_eq!(issued.status, 201, "{}", issued.text());
    assert_eq!(issued.headers["cache-control"], "no-store");
    let body = issued.json();
    let key = body["key"].as_str().unwrap().to_owned();
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(issued.headers["location"], format!("/admin/keys/{id}"));
    assert_eq!(
        (body["client"].clone(), body["scopes"].clone()),
        ("acme".into(), serde_json::json!(["read"]))
    );
    assert!(body.get("secret_hash").is_none());
    assert_eq!(public_get(gateway, "/api/x", &key).await.status, 200);

    admin.call(Method::POST, "/admin/keys", Some(r#"{"client":"other"}"#)).await;
    let all = admin.call(Method::GET, "/admin/keys", None).await.json();
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    assert_eq!(all["next_cursor"], Value::Null, "one page holds both");
    assert!(all["items"].as_array().unwrap().iter().all(|r| r.get("key").is_none()), "list never shows keys");
    let mine = admin.call(Method::GET, "/admin/keys?client=acme", None).await.json();
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);

    let shown = admin.call(Method::GET, &format!("/admin/keys/{id}"), None).await;
    assert_eq!((shown.status, shown.json()["label"].clone()), (StatusCode::OK, "ci".into()));
    assert!(!shown.text().contains(&key));

    let updated = admin
        .call(Method::PATCH, &format!("/admin/keys/{id}"), Some(r#"{"rate":"100/s","label":null}"#))
        .await;
    assert_eq!(updated.status, 200, "{}", updated.text());
    assert_eq!(
        (updated.json()["rate"].clone(), updated.json()["label"].clone()),
        ("100/s".into(), Value::Null)
    );

    let rotated =
        admin.call(Method::POST, &format!("/admin/keys/{id}/rotate"), Some(r#"{"grace":"1h"}"#)).await;
    assert_eq!(rotated.status, 201, "{}", rotated.text());
    let new_key = rotated.json()["key"].as_str().unwrap().to_owned();
    assert_eq!(rotated.json()["rotated_from"], id.as_str());
    assert_eq!(rotated.json()["rate"], "100/s", "metadata carries over");
    let old = admin.call(Method::GET, &format!("/admin/keys/{id}"), None).await.json();
    assert_eq!(old["state"], "rotating");
    assert_eq!(public_get(gateway, "/api/x", &new_key).await.status, 200);
    assert_eq!(public_get(gateway, "/api/x", &key).await.status, 200, "old key works in its grace period");

    let revoked = admin.call(Method::POST, &format!("/admin/keys/{id}/revoke"), None).await;
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    assert_eq!(
        (revoked.json()["status"].clone(), revoked.json()["already_revoked"].clone()),
        ("revoked".into(), false.into())
    );
    let again = admin.call(Method::POST, &format!("/admin/keys/{id}/revoke"), None).await;
    assert_eq!(again.json()["already_revoked"], true);
    eventually(10, "the revoked key is refused", || async {
        public_get(gateway, "/api/x", &key).await.status == 401
    })
    .await;

    let refused = admin.call(Method::POST, &format!("/admin/keys/{id}/rotate"), None).await;
    assert_eq!(
        (refused.status, refused.json()["error"].clone()),
        (StatusCode::CONFLICT, "key_not_usable".into())
    );
}

#[tokio::test]
async fn keys_api_against_the_file_store() {
    let (gateway, admin) = admin::start(&config("")).await;
    key_lifecycle(&gateway, &admin).await;
}

#[tokio::test]
async fn keys_api_against_redis() {
    let redis = RedisServer::start();
    let (gateway, admin) = admin::start(&config(&redis_store(&redis))).await;
    key_lifecycle(&gateway, &admin).await;
    assert!(redis.dump().iter().any(|(key, _)| key.starts_with("kgtest:")), "records live in this Redis");

    // Every operation is in the audit trail, under the admin token's name.
    let mut conn =
        redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let trail = keygate::usage::read_audit(&mut conn, "kgtest:", None, 100).await.unwrap();
    let actions: Vec<String> = trail.iter().map(|r| r.entry.action.to_string()).collect();
    for action in ["issue", "update", "rotate", "revoke"] {
        assert!(actions.iter().any(|a| a == action), "{action} missing from {actions:?}");
    }
    assert!(trail.iter().all(|r| r.entry.actor == "admin:tests"), "{trail:?}");
}

#[tokio::test]
async fn bad_requests_name_the_field() {
    let (_gateway, admin) = admin::start(&config("")).await;
    let cases: &[(Method, &str, &str, &str)] = &[
        (Method::POST, "/admin/keys", r#"{"scopes":["read"]}"#, "client"),
        (Method::POST, "/admin/keys", r#"{"client":"a b"}"#, "client"),
        (Method::POST, "/admin/keys", r#"{"client":"c","rate":"fast"}"#, "rate"),
        (Method::POST, "/admin/keys", r#"{"client":"c","quota":100}"#, "quota"),
        (Method::POST, "/admin/keys", r#"{"client":"c","burst":5}"#, "burst"),
        (Method::POST, "/admin/keys", r#"{"client":"c","colour":"blue"}"#, "colour"),
        (Method::POST, "/admin/keys", r#"{"client":"c","expires":"2000-01-01T00:00:00Z"}"#, "expires"),
        (Method::GET, "/admin/keys/not-an-id", "", "id"),
        (Method::GET, "/admin/keys?colour=blue", "", "colour"),
        (Method::POST, "/admin/keys/acme.k1/rotate", r#"{"grace":"a while"}"#, "grace"),
    ];
    for (method, path, body, field) in cases {
        let answer = admin.call(method.clone(), path, (!body.is_empty()).then_some(*body)).await;
        assert_eq!(answer.status, 400, "{method} {path} {body}: {}", answer.text());
        assert_eq!(answer.json()["error"], "invalid_field");
        assert_eq!(answer.json()["field"], *field, "{body}: {}", answer.text());
    }
    let bad_json = admin.call(Method::POST, "/admin/keys", Some("{\"client\":")).await;
    assert_eq!(
        (bad_json.status, bad_json.json()["error"].clone()),
        (StatusCode::BAD_REQUEST, "bad_json".into())
    );

    let missing = admin.call(Method::GET, "/admin/keys/acme.missing1", None).await;
    assert_eq!(
        (missing.status, missing.json()["error"].clone()),
        (StatusCode::NOT_FOUND, "not_found".into())
    );
    let missing = admin.call(Method::POST, "/admin/keys/acme.missing1/revoke", None).await;
    assert_eq!(missing.status, 404);

    let huge = format!(r#"{{"client":"c","label":"{}"}}"#, "x".repeat(keygate::admin::MAX_BODY));
    let answer = admin.call(Method::POST, "/admin/keys", Some(&huge)).await;
    assert_eq!(answer.status, 413);
}

#[tokio::test]
async fn usage_needs_a_redis_store() {
    let (_gateway, admin) = admin::start(&config("")).await;
    let answer = admin.call(Method::GET, "/admin/usage", None).await;
    assert_eq!(
        (answer.status, answer.json()["error"].clone()),
        (StatusCode::NOT_IMPLEMENTED, "not_implemented".into())
    );
}

#[tokio::test]
async fn usage_answers_the_same_report_as_the_cli() {
    let redis = RedisServer::start();
    let (gateway, admin) = admin::start(&config(&redis_store(&redis))).await;
    let issued =
        admin.call(Method::POST, "/admin/keys", Some(r#"{"client":"acme","scopes":["read"]}"#)).await;
    let key = issued.json()["key"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        assert_eq!(public_get(&gateway, "/api/x", &key).await.status, 200);
    }
    // Flush as a tick would; a request is recorded when its response body
    // ends on the server, which may be just after the client has it.
    let flusher = gateway.gateway.usage_flusher().expect("a Redis store flushes usage");
    let usage = || admin.call(Method::GET, "/admin/usage?client=acme&since=1h&by=minute", None);
    eventually(10, "usage shows all 3 requests", || async {
        flusher.flush_now().await.unwrap();
        usage().await.json()["totals"]["requests"] == 3
    })
    .await;
    let answer = usage().await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["totals"]["requests"], 3);
    let bad = admin.call(Method::GET, "/admin/usage?by=fortnight", None).await;
    assert_eq!((bad.status, bad.json()["field"].clone()), (StatusCode::BAD_REQUEST, "by".into()));
}

// === Readiness ===

#[tokio::test]
async fn readyz_follows_redis_down_and_back() {
    let mut redis = RedisServer::start();
    let (_gateway, admin) = admin::start(&config(&redis_store(&redis))).await;
    let ready = || async { admin.call_as(None, Method::GET, "/readyz", None).await.status };
    assert_eq!(ready().await, 200);

    redis.stop();
    eventually(15, "readyz says 503 with Redis stopped", || async { ready().await == 503 }).await;
    let answer = admin.call_as(None, Method::GET, "/readyz", None).await;
    assert_eq!(answer.json()["error"], "not_ready");
    assert!(!answer.text().contains("127.0.0.1"), "no internals: {}", answer.text());
    assert_eq!(
        admin.call_as(None, Method::GET, "/healthz", None).await.status,
        200,
        "the process is still up"
    );

    redis.restart();
    eventually(15, "readyz says 200 with Redis back", || async { ready().await == 200 }).await;
}

// === Metrics ===

/// Passes once the lead wires `keygate::metrics::record_request` into the handler.
#[tokio::test]

async fn metrics_count_requests_through_the_public_listener() {
    let (gateway, admin) = admin::start(&config("")).await;
    for _ in 0..3 {
        assert_eq!(common::gateway::get(&gateway.url("/open/x")).await.status, 200);
    }
    assert_eq!(common::gateway::get(&gateway.url("/nowhere")).await.status, 404);
    let text = admin.call_as(None, Method::GET, "/metrics", None).await.text();
    // Other tests in this process may count too, so look for at least ours.
    let count = |prefix: &str| -> u64 {
        text.lines().find_map(|l| l.strip_prefix(prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    assert!(count(r#"keygate_requests_total{route="/open",status="200"}"#) >= 3, "{text}");
    assert!(count(r#"keygate_requests_total{route="(none)",status="404"}"#) >= 1, "{text}");
    assert!(!text.contains("/open/x"), "the request path is never a label");
}

/// Regression (issue 16, defect 3): a key issued without scopes got
/// `read-write`. Least privilege: `read`, through the admin API as through
/// the CLI, so such a key may read but not write.
#[tokio::test]
async fn a_key_issued_without_scopes_may_only_read() {
    let (gateway, admin) = admin::start(&config("")).await;
    let issued = admin.call(Method::POST, "/admin/keys", Some(r#"{"client":"acme"}"#)).await;
    assert_eq!(issued.status, 201, "{}", issued.text());
    let body = issued.json();
    assert_eq!(body["scopes"], serde_json::json!(["read"]));
    let key = body["key"].as_str().unwrap();
    assert_eq!(public_get(&gateway, "/api/x", key).await.status, 200);
    let post = Request::post(gateway.url("/api/x")).header("x-api-key", key).body(Full::default()).unwrap();
    let answer = send(&http1_client(), post).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.text());
}

// === Pages ===

/// Follows `next_cursor` from `first` to the end, issuing a key between
/// pages; returns the IDs seen, in order.
async fn walk(admin: &TestAdmin, first: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut path = first.to_owned();
    for n in 0.. {
        let page = admin.call(Method::GET, &path, None).await;
        assert_eq!(page.status, 200, "{path}: {}", page.text());
        let page = page.json();
        seen.extend(page["items"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_owned()));
        let Some(cursor) = page["next_cursor"].as_str() else { break };
        path = format!("{first}&cursor={cursor}");
        // A client that sorts first, so its key lands before the cursor.
        let body = format!(r#"{{"client":"a{n}"}}"#);
        assert_eq!(admin.call(Method::POST, "/admin/keys", Some(&body)).await.status, 201);
    }
    seen
}

#[tokio::test]
async fn keys_and_clients_are_listed_a_page_at_a_time() {
    let redis = RedisServer::start();
    let (_gateway, admin) = admin::start(&config(&redis_store(&redis))).await;
    let mut issued = Vec::new();
    for client in ["m", "n", "o", "p", "q"] {
        for _ in 0..2 {
            let answer =
                admin.call(Method::POST, "/admin/keys", Some(&format!(r#"{{"client":"{client}"}}"#))).await;
            issued.push(answer.json()["id"].as_str().unwrap().to_owned());
        }
        let created =
            admin.call(Method::POST, "/admin/clients", Some(&format!(r#"{{"id":"{client}"}}"#))).await;
        assert_eq!(created.status, 201);
    }
    issued.sort();

    let seen = walk(&admin, "/admin/keys?limit=3").await;
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "in ID order, never twice");
    assert!(issued.iter().all(|id| seen.contains(id)), "{issued:?} all in {seen:?}");
    let one = walk(&admin, "/admin/keys?client=o&limit=1").await;
    assert_eq!(one, issued[4..6], "one client's keys, a page each");

    let page = admin.call(Method::GET, "/admin/clients?limit=2", None).await.json();
    assert_eq!(
        page["items"].as_array().unwrap().iter().map(|c| c["id"].clone()).collect::<Vec<_>>(),
        ["m", "n"]
    );
    let cursor = page["next_cursor"].as_str().unwrap();
    let next = admin.call(Method::GET, &format!("/admin/clients?limit=2&cursor={cursor}"), None).await.json();
    assert_eq!(next["items"][0]["id"], "o");
    let last = admin.call(Method::GET, "/admin/clients?limit=1000", None).await.json();
    assert_eq!((last["items"].as_array().unwrap().len(), last["next_cursor"].clone()), (5, Value::Null));
    let default = admin.call(Method::GET, "/admin/keys", None).await.json();
    assert_eq!(default["next_cursor"], Value::Null, "100 a page by default");

    // A key cursor is no client cursor, and the reverse.
    let key_page = admin.call(Method::GET, "/admin/keys?limit=1", None).await.json();
    let key_cursor = key_page["next_cursor"].as_str().unwrap().to_owned();
    let client_cursor = cursor.to_owned();
    for (path, field) in [
        ("/admin/keys?limit=0".to_owned(), "limit"),
        ("/admin/keys?limit=1001".to_owned(), "limit"),
        ("/admin/keys?limit=ten".to_owned(), "limit"),
        ("/admin/clients?limit=-1".to_owned(), "limit"),
        ("/admin/keys?cursor=!!".to_owned(), "cursor"),
        ("/admin/keys?cursor=_w".to_owned(), "cursor"),
        (format!("/admin/keys?cursor={client_cursor}"), "cursor"),
        (format!("/admin/clients?cursor={key_cursor}"), "cursor"),
    ] {
        let refused = admin.call(Method::GET, &path, None).await;
        assert_eq!(refused.status, 400, "{path}: {}", refused.text());
        assert_eq!(refused.json()["field"], field, "{path}: {}", refused.text());
    }
}
