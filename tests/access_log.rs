//! The access log and request IDs (issue 19, "Observability"), end to end:
//! the real gateway in process, a real upstream on an ephemeral port, the
//! access log written to a file in the test's folder and read back once the
//! line appears (with a deadline: the writer thread batches lines).
//!
//! Every field is checked with its value for a proxied 200, a 401, a 429,
//! the echo route and a POST with a body; the request ID is followed from
//! the client (kept when sane, replaced when not, made when absent) to the
//! upstream, the response header, the error body and the line; and no
//! secret (a key in the header, the query or Basic, an access token, a
//! refresh token) reaches the access log or the diagnostic log.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use common::access::AccessLog;
use common::gateway::{Answer, TestGateway, http1_client, send};
use common::upstream::Upstream;
use http::{Request, StatusCode};
use http_body_util::Full;
use jiff::Timestamp;
use keygate::key::KeyId;
use keygate::meta::MetaChanges;
use keygate::ops;
use keygate::store::SharedStore;

const PREFIX: &str = "kg_";

/// `/api` to the upstream (keys also in the query), `/echo` to the echo;
/// tokens on, so access and refresh tokens can be tried too.
fn config(log: &AccessLog, upstream: &Upstream) -> String {
    format!(
        r#"{log}
[tokens]
enabled = true

[[route]]
path = "/api"
upstream = "api"
allow_query_key = true
auth = ["key", "jwt"]

[[route]]
path = "/echo"
upstream = "builtin:echo"

[upstream.api]
targets = ["{url}"]
"#,
        log = log.toml("json"),
        url = upstream.url(),
    )
}

async fn start() -> (TestGateway, AccessLog, Upstream) {
    let upstream = Upstream::mirror().await;
    let log = AccessLog::new();
    let gw = TestGateway::start(&config(&log, &upstream)).await;
    (gw, log, upstream)
}

async fn issue(store: &SharedStore, client: &str, meta: &str) -> (String, KeyId) {
    let changes = MetaChanges::from_query(meta, Timestamp::now()).expect("test metadata");
    let issued = ops::issue(&**store, PREFIX, client, changes, Timestamp::now()).await.expect("issue");
    (issued.key.expose().to_owned(), issued.record.id)
}

/// `method url` with `headers` and `body`.
async fn call(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(&http1_client(), request.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await
}

fn response_id(answer: &Answer) -> String {
    answer.headers["x-request-id"].to_str().unwrap().to_owned()
}

fn is_generated(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The fields every line has, whatever the request: the stable names.
const FIELDS: [&str; 19] = [
    "timestamp",
    "request_id",
    "method",
    "path",
    "query",
    "status",
    "route",
    "upstream",
    "target",
    "client",
    "key_id",
    "credential",
    "bytes_in",
    "bytes_out",
    "duration_us",
    "upstream_us",
    "peer",
    "user_agent",
    "tunnel_end",
];

fn assert_fields(line: &serde_json::Value) {
    let names: std::collections::BTreeSet<&str> =
        line.as_object().expect("an object").keys().map(String::as_str).collect();
    assert_eq!(names, FIELDS.into_iter().collect(), "{line}");
    let at: Timestamp = line["timestamp"].as_str().unwrap().parse().expect("an RFC 3339 timestamp");
    let age = Timestamp::now().duration_since(at);
    assert!(age.as_secs() >= 0 && age.as_secs() < 60, "written just now: {at}");
    assert_eq!(line["peer"], "127.0.0.1");
}

#[tokio::test]
async fn a_proxied_200_logs_every_field_and_keeps_the_clients_request_id_end_to_end() {
    let (gw, log, upstream) = start().await;
    let (key, id) = issue(&gw.gateway.store, "acme", "scope=read").await;

    let answer = call(
        "GET",
        &gw.url("/api/orders?page=2&sort=asc"),
        &[("x-api-key", &key), ("user-agent", "access-test/1.0"), ("x-request-id", "client-req-42")],
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(response_id(&answer), "client-req-42", "the client's sane ID comes back");
    let seen = answer.json();
    assert_eq!(seen["headers"]["x-request-id"], "client-req-42", "and went upstream: {seen}");

    let line = log.line_of("client-req-42").await;
    assert_fields(&line);
    let expected = [
        ("method", serde_json::json!("GET")),
        ("path", "/api/orders".into()),
        ("query", "page=2&sort=asc".into()),
        ("status", 200.into()),
        ("route", "/api".into()),
        ("upstream", "api".into()),
        ("target", upstream.addr.to_string().into()),
        ("client", "acme".into()),
        ("key_id", id.as_str().into()),
        ("credential", "key".into()),
        ("bytes_in", 0.into()),
        ("bytes_out", answer.body.len().into()),
        ("user_agent", "access-test/1.0".into()),
        ("tunnel_end", serde_json::Value::Null),
    ];
    for (field, value) in expected {
        assert_eq!(line[field], value, "{field} in {line}");
    }
    let (duration, upstream_us) =
        (line["duration_us"].as_u64().unwrap(), line["upstream_us"].as_u64().unwrap());
    assert!(
        upstream_us > 0 && duration >= upstream_us,
        "the whole request outlasts its upstream part: {line}"
    );
}

#[tokio::test]
async fn a_post_with_a_body_logs_the_bytes_each_way_exactly() {
    let (gw, log, _upstream) = start().await;
    let (key, _) = issue(&gw.gateway.store, "acme", "scope=read-write").await;
    let body = "x".repeat(12_345);

    let answer =
        call("POST", &gw.url("/api/upload"), &[("x-api-key", &key), ("x-request-id", "post-1")], &body).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["body"].as_str().unwrap().len(), 12_345, "the upstream got it all");
    let line = log.line_of("post-1").await;
    assert_fields(&line);
    assert_eq!(line["method"], "POST");
    assert_eq!(line["bytes_in"], 12_345);
    assert_eq!(line["bytes_out"], answer.body.len(), "{line}");
    assert_eq!(line["status"], 200);

    // The echo answers from inside the gateway: the same counts.
    let answer =
        call("POST", &gw.url("/echo/upload"), &[("x-api-key", &key), ("x-request-id", "post-2")], &body)
            .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let line = log.line_of("post-2").await;
    assert_eq!(
        (line["bytes_in"].as_u64(), line["bytes_out"].as_u64()),
        (Some(12_345), Some(answer.body.len() as u64))
    );
}

#[tokio::test]
async fn an_echo_request_without_an_id_gets_one_made_and_names_the_echo() {
    let (gw, log, _upstream) = start().await;
    let (key, id) = issue(&gw.gateway.store, "acme", "scope=read").await;

    let answer = call("GET", &gw.url("/echo/hello"), &[("x-api-key", &key)], "").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let made = response_id(&answer);
    assert!(is_generated(&made), "a made ID: {made}");
    assert_eq!(
        answer.json()["headers"]["x-request-id"],
        made.as_str(),
        "the echo sees what an upstream would"
    );

    let line = log.line_of(&made).await;
    assert_fields(&line);
    assert_eq!(line["upstream"], "builtin:echo");
    assert_eq!(line["target"], serde_json::Value::Null, "no target behind the echo");
    assert_eq!(line["upstream_us"], serde_json::Value::Null);
    assert_eq!(line["route"], "/echo");
    assert_eq!(line["path"], "/echo/hello");
    assert_eq!(line["query"], serde_json::Value::Null);
    assert_eq!((line["client"].as_str(), line["key_id"].as_str()), (Some("acme"), Some(id.as_str())));
    assert_eq!(line["bytes_out"], answer.body.len());
    assert_eq!(line["user_agent"], serde_json::Value::Null, "the test client sends none");

    let again = call("GET", &gw.url("/echo/hello"), &[("x-api-key", &key)], "").await;
    assert_ne!(response_id(&again), made, "each request its own ID");
}

#[tokio::test]
async fn a_401_names_the_request_id_in_its_body_header_and_line_and_no_caller() {
    let (gw, log, _upstream) = start().await;

    // An ID that is not sane (a space) is replaced, not kept.
    let answer = call("GET", &gw.url("/api/orders"), &[("x-request-id", "two words")], "").await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let made = response_id(&answer);
    assert!(is_generated(&made), "replaced: {made}");
    let body = answer.json();
    assert_eq!(body["error"], "missing_key");
    assert_eq!(body["request_id"], made.as_str(), "{body}");

    let line = log.line_of(&made).await;
    assert_fields(&line);
    assert_eq!(line["status"], 401);
    assert_eq!(line["route"], "/api");
    for refused_before in ["upstream", "target", "client", "key_id", "credential", "upstream_us"] {
        assert_eq!(line[refused_before], serde_json::Value::Null, "{refused_before} in {line}");
    }
    assert_eq!(line["bytes_out"], answer.body.len());
    assert!(!log.text().contains("two words"), "the insane ID is not logged");

    // Too long, or sent twice: replaced too. A sane one is kept, even here.
    let long = "a".repeat(129);
    let answer = call("GET", &gw.url("/api/orders"), &[("x-request-id", &long)], "").await;
    assert!(is_generated(&response_id(&answer)));
    let answer =
        call("GET", &gw.url("/api/orders"), &[("x-request-id", "one"), ("x-request-id", "two")], "").await;
    assert!(is_generated(&response_id(&answer)));
    let answer = call("GET", &gw.url("/api/orders"), &[("x-request-id", "kept-on-401")], "").await;
    assert_eq!(response_id(&answer), "kept-on-401");
    assert_eq!(answer.json()["request_id"], "kept-on-401");
    assert_eq!(log.line_of("kept-on-401").await["status"], 401);
}

#[tokio::test]
async fn a_429_logs_the_caller_it_refused_and_names_the_request_id() {
    let (gw, log, _upstream) = start().await;
    let (key, id) = issue(&gw.gateway.store, "acme", "scope=read&rate=1/m&burst=1").await;

    let first = call("GET", &gw.url("/api/a"), &[("x-api-key", &key)], "").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    let limited =
        call("GET", &gw.url("/api/a"), &[("x-api-key", &key), ("x-request-id", "over-1")], "").await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS, "{}", limited.text());
    assert_eq!(response_id(&limited), "over-1");
    assert_eq!(limited.json()["request_id"], "over-1");

    let line = log.line_of("over-1").await;
    assert_fields(&line);
    assert_eq!(line["status"], 429);
    assert_eq!((line["client"].as_str(), line["key_id"].as_str()), (Some("acme"), Some(id.as_str())));
    assert_eq!(line["credential"], "key");
    assert_eq!(line["upstream"], serde_json::Value::Null, "not forwarded");
    assert_eq!(line["bytes_out"], limited.body.len());
}

#[tokio::test]
async fn a_grpc_refusal_carries_the_request_id_as_metadata() {
    let (gw, log, _upstream) = start().await;
    let answer = call(
        "POST",
        &gw.url("/api/pkg.Service/Method"),
        &[("content-type", "application/grpc"), ("te", "trailers"), ("x-request-id", "grpc-1")],
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "trailers-only");
    assert_eq!(answer.headers["grpc-status"], "16");
    assert_eq!(response_id(&answer), "grpc-1");
    assert_eq!(log.line_of("grpc-1").await["status"], 200);
}

#[tokio::test]
async fn no_key_token_or_refresh_token_reaches_the_access_or_diagnostic_log() {
    let diagnostic = common::logs::capture();
    let (gw, log, _upstream) = start().await;
    let (key, _) = issue(&gw.gateway.store, "acme", "scope=read").await;
    let basic = STANDARD.encode(format!("acme:{key}"));

    // A key in the header, in the query (read, and a copy under another
    // name), and as HTTP Basic.
    let by_header = call("GET", &gw.url("/api/a"), &[("x-api-key", &key), ("x-request-id", "s-1")], "").await;
    assert_eq!(by_header.status, StatusCode::OK);
    let in_query = format!("/api/a?api_key={key}&page=2&copy={key}");
    let by_query = call("GET", &gw.url(&in_query), &[("x-request-id", "s-2")], "").await;
    assert_eq!(by_query.status, StatusCode::OK, "{}", by_query.text());
    let by_basic = call(
        "GET",
        &gw.url("/api/a"),
        &[("authorization", &format!("Basic {basic}")), ("x-request-id", "s-3")],
        "",
    )
    .await;
    assert!(
        by_basic.status.is_success() || by_basic.status == StatusCode::UNAUTHORIZED,
        "{}",
        by_basic.text()
    );

    // An access token and a refresh token from the token endpoint, both used.
    let granted = call(
        "POST",
        &gw.url("/oauth/token"),
        &[
            ("authorization", &format!("Basic {basic}")),
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-request-id", "s-4"),
        ],
        "grant_type=client_credentials",
    )
    .await;
    assert_eq!(granted.status, StatusCode::OK, "{}", granted.text());
    let tokens = granted.json();
    let access = tokens["access_token"].as_str().unwrap().to_owned();
    let refresh = tokens["refresh_token"].as_str().unwrap().to_owned();
    let by_token = call(
        "GET",
        &gw.url("/api/a"),
        &[("authorization", &format!("Bearer {access}")), ("x-request-id", "s-5")],
        "",
    )
    .await;
    assert_eq!(by_token.status, StatusCode::OK, "{}", by_token.text());
    let refreshed = call(
        "POST",
        &gw.url("/oauth/token"),
        &[("content-type", "application/x-www-form-urlencoded"), ("x-request-id", "s-6")],
        &format!("grant_type=refresh_token&refresh_token={refresh}"),
    )
    .await;
    assert_eq!(refreshed.status, StatusCode::OK, "{}", refreshed.text());
    // Secrets sent in a query where they are not read are still not logged.
    let stray = format!("/echo/x?access_token={access}&refresh_token={refresh}");
    call("GET", &gw.url(&stray), &[("x-api-key", &key), ("x-request-id", "s-7")], "").await;

    // A key that is not valid: refused, which the diagnostic log records.
    let forged = format!("{key}x");
    let refused =
        call("GET", &gw.url("/api/a"), &[("x-api-key", &forged), ("x-request-id", "s-8")], "").await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);

    for id in ["s-1", "s-2", "s-3", "s-4", "s-5", "s-6", "s-7", "s-8"] {
        log.line_of(id).await;
    }
    assert_eq!(log.line_of("s-2").await["query"], "api_key=REDACTED&page=2&copy=REDACTED");
    assert_eq!(log.line_of("s-5").await["credential"], "jwt");
    let secret_part = key.rsplit('_').next().unwrap().to_owned();
    let (access_log, diagnostic_log) = (log.text(), diagnostic.text());
    for (what, secret) in [
        ("the key", key.as_str()),
        ("the key's secret part", secret_part.as_str()),
        ("the Basic credentials", basic.as_str()),
        ("the access token", access.as_str()),
        ("the refresh token", refresh.as_str()),
        ("the forged key", forged.as_str()),
    ] {
        assert!(!access_log.contains(secret), "{what} in the access log:\n{access_log}");
        assert!(!diagnostic_log.contains(secret), "{what} in the diagnostic log:\n{diagnostic_log}");
    }
    assert!(diagnostic_log.contains("request refused"), "the diagnostic log was captured: {diagnostic_log}");
}

/// A reload builds a new sink, which opens its file anew: moving the log
/// away and reloading is how it is rotated.
#[tokio::test]
async fn a_reload_reopens_the_access_log_so_a_moved_file_is_rotated() {
    let (gw, log, upstream) = start().await;
    call("GET", &gw.url("/echo/before"), &[("x-request-id", "before-1")], "").await;
    log.line_of("before-1").await;
    let rotated = log.path.with_extension("log.1");
    std::fs::rename(&log.path, &rotated).unwrap();

    let config = keygate::config::Config::from_toml(&config(&log, &upstream), gw.dir.path()).unwrap();
    gw.gateway.reload(config);
    call("GET", &gw.url("/echo/after"), &[("x-request-id", "after-1")], "").await;
    assert_eq!(log.line_of("after-1").await["path"], "/echo/after");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("before-1") && !old.contains("after-1"), "{old}");
}
