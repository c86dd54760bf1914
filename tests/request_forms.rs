//! Request forms a backend could read differently from the gateway: every
//! copy of a credential, method-override headers, strict path forms, the one
//! host of a request, and whose `X-Forwarded-For` is believed. A mirror
//! upstream is the oracle: it answers with what it received.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::gateway::{Answer, TestGateway, http1_client, send};
use common::upstream::Upstream;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jiff::Timestamp;
use keygate::meta::MetaChanges;
use keygate::ops;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(upstream: &Upstream, server: &str) -> String {
    format!(
        r#"[server]
{server}

[[route]]
path = "/keyed"
upstream = "api"

[[route]]
path = "/open"
upstream = "api"
public = true

[[route]]
path = "/"
host = "admin.local"
upstream = "api"
public = true

[upstream.api]
targets = ["{}"]
"#,
        upstream.url()
    )
}

async fn issue(gateway: &TestGateway) -> String {
    let changes = MetaChanges::from_query("scope=read-write", Timestamp::now()).unwrap();
    let issued = ops::issue(&*gateway.gateway.store, "kg_", "acme", changes, Timestamp::now()).await.unwrap();
    issued.key.expose().to_owned()
}

async fn call(request: http::request::Builder) -> Answer {
    send(&http1_client(), request.body(Full::<Bytes>::default()).unwrap()).await
}

/// Every value the upstream received for `name` (the mirror keeps the first
/// only, so the test asks for the whole header block back).
fn seen(answer: &Answer, name: &str) -> Option<String> {
    answer.json()["headers"][name].as_str().map(str::to_owned)
}

#[tokio::test]
async fn a_key_in_a_second_authorization_header_never_reaches_the_upstream() {
    // Regression: with `Basic ...` first and `Bearer <key>` second, only the
    // first value was looked at, and the key went upstream.
    let upstream = Upstream::mirror().await;
    let gateway = TestGateway::start(&config(&upstream, "")).await;
    let key = issue(&gateway).await;
    for path in ["/keyed/x", "/open/x"] {
        let request = Request::get(gateway.url(path))
            .header("authorization", "Basic Zm9vOmJhcg==")
            .header("authorization", format!("Bearer {key}"));
        let answer = call(request).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.text());
        assert!(!answer.text().contains(&key), "{path}: the key reached the upstream: {}", answer.text());
        assert_eq!(seen(&answer, "authorization").as_deref(), Some("Basic Zm9vOmJhcg=="), "{path}");
    }
    // Two copies of the key header, one of them the key: verified, neither passed on.
    let request = Request::get(gateway.url("/keyed/y")).header("x-api-key", &key).header("x-api-key", &key);
    let answer = call(request).await;
    assert_eq!(answer.status, 200);
    assert!(!answer.text().contains(&key));
    // Two different keys: which one is meant cannot be told.
    let other = issue(&gateway).await;
    let request = Request::get(gateway.url("/keyed/z")).header("x-api-key", &key).header("x-api-key", &other);
    assert_eq!(call(request).await.status, 401);
}

#[tokio::test]
async fn method_override_headers_are_removed_unless_configured_otherwise() {
    let upstream = Upstream::mirror().await;
    let headers =
        ["x-http-method-override", "x-http-method", "x-method-override", "x-original-url", "x-rewrite-url"];
    for (server, kept) in [("", false), ("strip_override_headers = false", true)] {
        let gateway = TestGateway::start(&config(&upstream, server)).await;
        let mut request = Request::get(gateway.url("/open/x"));
        for name in headers {
            request = request.header(name, "DELETE");
        }
        let answer = call(request).await;
        assert_eq!(answer.status, 200);
        for name in headers {
            assert_eq!(seen(&answer, name).is_some(), kept, "{name} with `{server}`");
        }
    }
}

#[tokio::test]
async fn strict_paths_refuse_forms_backends_read_differently() {
    let upstream = Upstream::mirror().await;
    let gateway = TestGateway::start(&config(&upstream, "")).await;
    for path in [
        "/open/admin;x",
        "/open/..;/keyed",
        "/open/%252e%252e/keyed",
        "/open/%c0%ae%c0%ae/keyed",
        "/open/admin.",
        "/open/admin%20",
        "/open/%3b",
    ] {
        let answer = call(Request::get(gateway.url(path))).await;
        assert_eq!(answer.status, 400, "{path}");
        assert_eq!(answer.json()["error"], "bad_path", "{path}");
    }
    // The switch: off, `;` passes as data.
    let lax = TestGateway::start(&config(&upstream, "strict_paths = false")).await;
    let answer = call(Request::get(lax.url("/open/admin;x"))).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["path"], "/open/admin;x");
}

#[tokio::test]
async fn a_trailing_dot_names_the_same_host_and_two_hosts_are_refused() {
    let upstream = Upstream::mirror().await;
    let gateway = TestGateway::start(&config(&upstream, "")).await;
    for host in ["admin.local", "ADMIN.local.", "admin.local.:8080"] {
        let answer = call(Request::get(gateway.url("/anything")).header("host", host)).await;
        assert_eq!(answer.status, 200, "{host} matches the admin.local route");
    }
    let answer = call(Request::get(gateway.url("/anything")).header("host", "other.local")).await;
    assert_eq!(answer.status, 404, "another host has no route there");

    // Two Host headers (raw: clients refuse to send them).
    let mut raw = TcpStream::connect(gateway.addr).await.unwrap();
    raw.write_all(
        b"GET /anything HTTP/1.1\r\nHost: other.local\r\nHost: admin.local\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("bad_host"), "{answer}");

    // HTTP/2: `:authority` and `host` must agree.
    let stream = TcpStream::connect(gateway.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let request = Request::get("http://other.local/anything")
        .header("host", "admin.local")
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let upstream = Upstream::mirror().await;
    let spoofed = |gateway: &TestGateway| {
        Request::get(gateway.url("/open/x"))
            .header("x-forwarded-for", "203.0.113.9")
            .header("forwarded", "for=6.6.6.6")
    };
    let untrusted = TestGateway::start(&config(&upstream, "")).await;
    let answer = call(spoofed(&untrusted)).await;
    assert_eq!(
        seen(&answer, "x-forwarded-for").as_deref(),
        Some("127.0.0.1"),
        "the client's claim is replaced"
    );
    assert_eq!(seen(&answer, "forwarded"), None);

    let trusted = TestGateway::start(&config(&upstream, "trusted_proxies = [\"127.0.0.1\"]")).await;
    let answer = call(spoofed(&trusted)).await;
    assert_eq!(seen(&answer, "x-forwarded-for").as_deref(), Some("203.0.113.9, 127.0.0.1"));
}

#[tokio::test]
async fn the_echo_route_holds_bodies_to_the_same_limits_as_an_upstream() {
    // Regression: a malformed chunked body to the echo route was a 500.
    let config = "[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\npublic = true\nmax_body = \"1KiB\"\n";
    let gateway = TestGateway::start(config).await;
    let raw = |bytes: Vec<u8>| {
        let addr = gateway.addr;
        async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(&bytes).await.unwrap();
            let mut answer = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await.unwrap();
            String::from_utf8_lossy(&answer).into_owned()
        }
    };
    let bad_chunk =
        raw(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
            .to_vec())
        .await;
    assert!(bad_chunk.is_empty() || bad_chunk.starts_with("HTTP/1.1 400"), "{bad_chunk}");
    let big = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n{}\r\n0\r\n\r\n",
        "a".repeat(2048)
    );
    let too_large = raw(big.into_bytes()).await;
    assert!(too_large.starts_with("HTTP/1.1 413"), "{too_large}");
    let fits =
        raw(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello".to_vec())
            .await;
    assert!(fits.starts_with("HTTP/1.1 200"), "{fits}");
}
