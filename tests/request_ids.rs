//! Request IDs in every error body the gateway writes (issue 19,
//! "Observability"): the admin API's refusals, axum's own rejections
//! (mapped to `AdminError`) and the public listener's refusals all name
//! the call's `request_id` in the body and the answer's header, the
//! client's when it sent a sane one, under the configured header name.
//!
//! Not covered (hyper writes them itself, with no hook): the bare 400, 414
//! and 431 hyper's HTTP/1 parser answers to a head it cannot parse.

mod common;

use bytes::Bytes;
use common::admin::{self, TOKEN, admin_section};
use common::gateway::{Answer, http1_client, send};
use http::{Method, Request, StatusCode};
use http_body_util::Full;

fn config(id_header: Option<&str>) -> String {
    let server = id_header.map_or_else(String::new, |h| format!("[server]\nrequest_id_header = \"{h}\"\n"));
    format!("{server}\n[[route]]\npath = \"/api\"\nupstream = \"builtin:echo\"\n{}", admin_section())
}

async fn call(url: String, method: Method, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(&http1_client(), request.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await
}

/// The body's `request_id`, checked equal to the answer's `header`.
fn id_of(answer: &Answer, header: &str) -> String {
    let body = answer.json();
    let id = body["request_id"].as_str().unwrap_or_else(|| panic!("no request_id in {body}")).to_owned();
    let sent =
        answer.headers.get(header).unwrap_or_else(|| panic!("no {header} header: {:?}", answer.headers));
    assert_eq!(sent.to_str().unwrap(), id, "{body}");
    assert!(body["error"].is_string() && body["message"].is_string(), "the contract's shape: {body}");
    id
}

/// A call and what it must answer: method, path, headers, body, status, `error`.
type Case<'a> = (Method, &'a str, &'a [(&'a str, &'a str)], &'a str, u16, &'a str);

#[tokio::test]
async fn every_admin_error_names_the_calls_request_id() {
    let (_gw, admin) = admin::start(&config(None)).await;
    let bearer = format!("Bearer {TOKEN}");
    let json = [("authorization", bearer.as_str()), ("content-type", "application/json")];
    let cases: [Case<'_>; 6] = [
        (Method::GET, "/admin/keys", &[], "", 401, "missing_token"),
        (
            Method::GET,
            "/admin/keys",
            &[("authorization", "Bearer wrong-token-0123456789")],
            "",
            401,
            "invalid_token",
        ),
        (Method::GET, "/admin/nowhere", &json, "", 404, "no_route"),
        (Method::DELETE, "/admin/reload", &json, "", 405, "method_not_allowed"),
        (Method::POST, "/admin/keys", &json, "{not json", 400, "bad_json"),
        (
            Method::POST,
            "/admin/keys",
            &[("authorization", bearer.as_str())],
            "{}",
            415,
            "unsupported_media_type",
        ),
    ];
    let count = cases.len();
    let mut ids = std::collections::HashSet::new();
    for (method, path, headers, body, status, code) in cases {
        let answer = call(admin.url(path), method.clone(), headers, body).await;
        assert_eq!(answer.status.as_u16(), status, "{method} {path}: {}", answer.text());
        assert_eq!(answer.json()["error"], code, "{method} {path}");
        let id = id_of(&answer, "x-request-id");
        assert_eq!(id.len(), 32, "a generated ID: {id}");
        ids.insert(id);
    }
    assert_eq!(ids.len(), count, "one ID per call");

    // The client's own ID is kept, and a successful answer carries it too.
    let mine = [("authorization", bearer.as_str()), ("x-request-id", "ticket-4711")];
    let answer = call(admin.url("/admin/nowhere"), Method::GET, &mine, "").await;
    assert_eq!(id_of(&answer, "x-request-id"), "ticket-4711");
    let answer = call(admin.url("/healthz"), Method::GET, &[("x-request-id", "probe-1")], "").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["x-request-id"], "probe-1");
}

#[tokio::test]
async fn the_configured_header_names_the_id_on_both_listeners() {
    let (gw, admin) = admin::start(&config(Some("x-correlation-id"))).await;
    let mine = [("x-correlation-id", "corr-42")];
    let answer = call(admin.url("/admin/keys"), Method::GET, &mine, "").await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(id_of(&answer, "x-correlation-id"), "corr-42");
    assert!(!answer.headers.contains_key("x-request-id"), "only the configured header");

    // The public listener's refusals did already; the same header there.
    let answer = call(gw.url("/api"), Method::GET, &mine, "").await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(id_of(&answer, "x-correlation-id"), "corr-42");
    let answer = call(gw.url("/nowhere"), Method::GET, &[], "").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(id_of(&answer, "x-correlation-id").len(), 32);
}
