//! The core proxy: routing, pass-through, header rewriting and upstream failures,
//! through the real gateway in front of real upstream servers.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::gateway::{TestGateway, get, http1_client, http2_client, send};
use common::upstream::{Upstream, closed_port_url, full};
use http::{Method, Request, Response};
use http_body_util::Full;

fn proxy_config(upstream_url: &str) -> String {
    format!(
        r#"
[[route]]
path = "/api"
upstream = "api"
public = true

[[route]]
path = "/v2"
upstream = "api"
strip_prefix = true
public = true

[[route]]
path = "/echo"
upstream = "builtin:echo"
public = true

[upstream.api]
targets = ["{upstream_url}"]
timeout = "5s"
"#
    )
}

#[tokio::test]
async fn methods_bodies_and_query_pass_through_unchanged() {
    let upstream = Upstream::mirror().await;
    let gateway = TestGateway::start(&proxy_config(&upstream.url())).await;
    let client = http1_client();

    for method in [Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS] {
        let body = format!("{{\"sent_with\":\"{method}\",\"unicode\":\"é✓\"}}");
        let request = Request::builder()
            .method(method.clone())
            .uri(gateway.url("/api/orders/42?expand=items&x=%20y"))
            .header("content-type", "application/json")
            .header("x-custom", "kept")
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        let answer = send(&client, request).await;
        assert_eq!(answer.status, 200, "{method}: {}", answer.text());
        assert_eq!(answer.headers["x-upstream"], "mirror");
        let seen = answer.json();
        assert_eq!(seen["method"], method.as_str());
        assert_eq!(seen["path"], "/api/orders/42");
        assert_eq!(seen["query"], "expand=items&x=%20y");
        assert_eq!(seen["body"], body);
        assert_eq!(seen["headers"]["x-custom"], "kept");
        assert_eq!(seen["headers"]["content-type"], "application/json");
    }
}

#[tokio::test]
async fn upstream_status_and_headers_come_back_unchanged() {
    let upstream = Upstream::start(|_req| async {
        Response::builder()
            .status(201)
            .header("x-request-id", "abc")
            .header("set-cookie", "a=1")
            .body(full("made"))
            .unwrap()
    })
    .await;
    let gateway = TestGateway::start(&proxy_config(&upstream.url())).await;
    let answer = get(&gateway.url("/api/things")).await;
    assert_eq!(answer.status, 201);
    assert_eq!(answer.headers["x-request-id"], "abc");
    assert_eq!(answer.headers["set-cookie"], "a=1");
    assert_eq!(answer.text(), "made");
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let upstream = Upstream::start(|_req| async {
        Response::builder()
            .header("connection", "x-upstream-hop")
            .header("x-upstream-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("x-end-to-end", "1")
            .body(full("ok"))
            .unwrap()
    })
    .await;
    let mirror = Upstream::mirror().await;
    let gateway = TestGateway::start(&proxy_config(&mirror.url())).await;
    let request = Request::get(gateway.url("/api/x"))
        .header("connection", "x-client-hop, keep-alive")
        .header("x-client-hop", "secret-to-this-hop")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "trailers")
        .header("x-end-to-end", "1")
        .body(Full::default())
        .unwrap();
    let seen = send(&http1_client(), request).await.json();
    let headers = seen["headers"].as_object().unwrap();
    for gone in ["x-client-hop", "keep-alive", "proxy-authorization", "te"] {
        assert!(!headers.contains_key(gone), "{gone} was forwarded: {headers:?}");
    }
    assert_eq!(headers["x-end-to-end"], "1");

    let gateway = TestGateway::start(&proxy_config(&upstream.url())).await;
    let answer = get(&gateway.url("/api/x")).await;
    assert!(!answer.headers.contains_key("x-upstream-hop"));
    assert!(!answer.headers.contains_key("keep-alive"));
    assert_eq!(answer.headers["x-end-to-end"], "1");
}

#[tokio::test]
async fn x_forwarded_headers_are_set_and_appended_behind_a_trusted_proxy() {
    let upstream = Upstream::mirror().await;
    let config = format!("[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n{}", proxy_config(&upstream.url()));
    let gateway = TestGateway::start(&config).await;
    let request = Request::get(gateway.url("/api/x"))
        .header("host", "api.example.com")
        .header("x-forwarded-for", "203.0.113.9")
        .body(Full::default())
        .unwrap();
    let seen = send(&http1_client(), request).await.json();
    assert_eq!(seen["headers"]["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
    assert_eq!(seen["headers"]["x-forwarded-host"], "api.example.com");
    // The upstream is addressed by its own authority, not the client's Host.
    assert_eq!(seen["headers"]["host"], upstream.addr.to_string());
}

#[tokio::test]
async fn strip_prefix_and_normalised_paths_are_what_the_upstream_sees() {
    let upstream = Upstream::mirror().await;
    let gateway = TestGateway::start(&proxy_config(&upstream.url())).await;
    assert_eq!(get(&gateway.url("/v2/users/7")).await.json()["path"], "/users/7");
    assert_eq!(get(&gateway.url("/v2")).await.json()["path"], "/");
    assert_eq!(get(&gateway.url("//api//x/./y")).await.json()["path"], "/api/x/y");
    assert_eq!(get(&gateway.url("/echo/../api/z")).await.json()["path"], "/api/z");
    assert_eq!(get(&gateway.url("/api/%2e%2e/v2/q")).await.json()["path"], "/q");
}

#[tokio::test]
async fn ambiguous_paths_are_refused_with_400() {
    let upstream = Upstream::mirror().await;
    let gateway = TestGateway::start(&proxy_config(&upstream.url())).await;
    for path in ["/api%2fx", "/api/%5cx", "/../etc", "/api/%zz"] {
        let answer = get(&gateway.url(path)).await;
        assert_eq!(answer.status, 400, "{path}");
        assert_eq!(answer.json()["error"], "bad_path", "{path}");
    }
}

#[tokio::test]
async fn unknown_route_is_404_json() {
    let upstream = Upstream::mirror().await;
    let gateway = TestGateway::start(&proxy_config(&upstream.url())).await;
    let answer = get(&gateway.url("/nothing/here")).await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.headers["content-type"], "application/json");
    assert_eq!(answer.json()["error"], "no_route");
    // Prefixes match whole segments only.
    assert_eq!(get(&gateway.url("/apix")).await.status, 404);
}

#[tokio::test]
async fn host_routes_only_answer_their_host() {
    let upstream = Upstream::mirror().await;
    let config = format!(
        "[[route]]\npath = \"/\"\nhost = \"a.example\"\nupstream = \"api\"\npublic = true\n\n[upstream.api]\ntargets = [\"{}\"]\n",
        upstream.url()
    );
    let gateway = TestGateway::start(&config).await;
    let with_host = |host: &'static str| {
        Request::get(gateway.url("/x")).header("host", host).body(Full::default()).unwrap()
    };
    assert_eq!(send(&http1_client(), with_host("a.example:8080")).await.status, 200);
    assert_eq!(send(&http1_client(), with_host("b.example")).await.status, 404);
}

#[tokio::test]
async fn unreachable_upstream_is_502_json() {
    let gateway = TestGateway::start(&proxy_config(&closed_port_url().await)).await;
    let answer = get(&gateway.url("/api/x")).await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.json()["error"], "upstream_unreachable");
    assert!(!answer.text().contains("127.0.0.1"), "internals leaked: {}", answer.text());
}

#[tokio::test]
async fn slow_upstream_is_504_json_after_the_configured_timeout() {
    // The upstream never answers; the gateway gives up after 300 ms.
    let upstream = Upstream::start(|_req| async {
        std::future::pending::<()>().await;
        unreachable!()
    })
    .await;
    let config = proxy_config(&upstream.url()).replace("timeout = \"5s\"", "timeout = \"300ms\"");
    let gateway = TestGateway::start(&config).await;
    let started = std::time::Instant::now();
    let answer = get(&gateway.url("/api/slow")).await;
    assert_eq!(answer.status, 504);
    assert_eq!(answer.json()["error"], "upstream_timeout");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn round_robin_spreads_requests_over_targets() {
    let a = Upstream::start(|_req| async { Response::new(full("a")) }).await;
    let b = Upstream::start(|_req| async { Response::new(full("b")) }).await;
    let config = format!(
        "[[route]]\npath = \"/\"\nupstream = \"api\"\npublic = true\n\n[upstream.api]\ntargets = [\"{}\", \"{}\"]\n",
        a.url(),
        b.url()
    );
    let gateway = TestGateway::start(&config).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(get(&gateway.url("/")).await.text());
    }
    seen.sort();
    assert_eq!(seen, ["a", "a", "b", "b"]);
}

#[tokio::test]
async fn http2_prior_knowledge_clients_are_served() {
    let upstream = Upstream::mirror().await;
    let gateway = TestGateway::start(&proxy_config(&upstream.url())).await;
    let client = http2_client();
    let request =
        Request::post(gateway.url("/api/h2?q=1")).body(Full::new(Bytes::from_static(b"over h2"))).unwrap();
    let answer = send(&client, request).await;
    assert_eq!(answer.status, 200);
    let seen = answer.json();
    assert_eq!(seen["body"], "over h2");
    assert_eq!(seen["query"], "q=1");
    // Upstreams are spoken to over HTTP/1.1 whatever the client used.
    assert_eq!(seen["version"], "HTTP/1.1");

    let echoed = send(&client, Request::get(gateway.url("/echo/x")).body(Full::default()).unwrap()).await;
    assert_eq!(echoed.json()["path"], "/echo/x");
}

#[tokio::test]
async fn echo_shows_the_request_as_an_upstream_would_receive_it() {
    let gateway = TestGateway::start(&proxy_config("http://127.0.0.1:9")).await;
    let request = Request::put(gateway.url("/echo/a?b=c"))
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let seen = send(&http1_client(), request).await.json();
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["path"], "/echo/a");
    assert_eq!(seen["query"], "b=c");
    assert_eq!(seen["body"], "hello");
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    assert!(seen["headers"].get("x-hop").is_none());
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let upstream = Upstream::mirror().await;
    let gateway = TestGateway::start(&proxy_config(&upstream.url())).await;
    for _ in 0..20 {
        assert_eq!(get(&gateway.url("/api/x")).await.status, 200);
    }
    assert_eq!(upstream.connections.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_upstream_that_closes_after_each_response_still_serves_every_request() {
    let upstream = Upstream::start(|_req| async {
        Response::builder().header("connection", "close").body(full("bye")).unwrap()
    })
    .await;
    let gateway = TestGateway::start(&proxy_config(&upstream.url())).await;
    for _ in 0..10 {
        let answer = get(&gateway.url("/api/x")).await;
        assert_eq!((answer.status.as_u16(), answer.text()), (200, "bye".to_owned()));
    }
    assert_eq!(upstream.connections.load(std::sync::atomic::Ordering::SeqCst), 10);
}

#[tokio::test]
async fn empty_responses_give_their_connection_back_to_the_pool() {
    // A 204 (no body to read) and a normal answer alternate; both must leave
    // the pooled connection usable for the next request.
    let upstream = Upstream::start(|req: Request<hyper::body::Incoming>| async move {
        if req.uri().path().ends_with("/empty") {
            Response::builder().status(204).body(full("")).unwrap()
        } else {
            Response::new(full("body"))
        }
    })
    .await;
    let gateway = TestGateway::start(&proxy_config(&upstream.url())).await;
    for path in ["/api/empty", "/api/full", "/api/empty", "/api/full"] {
        let answer = get(&gateway.url(path)).await;
        assert!(answer.status.is_success(), "{path}: {}", answer.status);
    }
    assert_eq!(upstream.connections.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn connect_and_trace_are_refused_with_405_and_never_reach_the_upstream() {
    let upstream = Upstream::mirror().await;
    let gateway = TestGateway::start(&proxy_config(&upstream.url())).await;
    for head in [
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
        "CONNECT /api/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "TRACE /api/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    ] {
        let answer = common::raw::exchange(gateway.addr, head.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{head:?} -> {answer}");
        assert!(answer.to_ascii_lowercase().contains("\r\nallow: get, head"), "{answer}");
        assert!(answer.contains("\"method_not_allowed\""), "{answer}");
    }
    for method in [Method::CONNECT, Method::TRACE] {
        let request = Request::builder()
            .method(method.clone())
            .uri(gateway.url("/api/x"))
            .body(Full::default())
            .unwrap();
        assert_eq!(send(&http2_client(), request).await.status, 405, "{method} over HTTP/2");
    }
    assert_eq!(upstream.connections.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing went upstream");
}
