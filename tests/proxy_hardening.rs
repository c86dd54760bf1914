//! The upstream side under hostile or broken peers (issue 14, items 4, 5, 13):
//! responses framed two ways or cut short never reach the client as complete,
//! a client's broken body is the client's error, bodies have time and size
//! limits, and a hanging upstream costs a bounded number of connections.
//!
//! The oracles are raw: a recording upstream that answers scripted bytes, and
//! raw sockets or hyper clients that tell a complete response from an aborted one.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::gateway::{TestGateway, http1_client, http2_client, send};
use common::raw::{RawUpstream, exchange};
use common::upstream::Upstream;
use common::wait::within;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::io::AsyncWriteExt;

fn config(upstream_url: &str, route_extra: &str, upstream_extra: &str) -> String {
    format!(
        "[[route]]\npath = \"/api\"\nupstream = \"api\"\npublic = true\n{route_extra}\n\n\
         [upstream.api]\ntargets = [\"{upstream_url}\"]\n{upstream_extra}\n"
    )
}

/// What a client made of one response: its status, and whether its body
/// arrived complete (`Ok`) or was aborted (`Err`).
async fn fetch(
    client: &common::gateway::TestClient,
    request: Request<Full<Bytes>>,
) -> (u16, Result<Bytes, String>) {
    let response = within(30, "the gateway's answer", client.request(request)).await.expect("response head");
    let status = response.status().as_u16();
    let body = within(30, "the body's end", response.into_body().collect()).await;
    (status, body.map(|b| b.to_bytes()).map_err(|e| e.to_string()))
}

fn get(url: String) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

// === 4. Response framing ===

/// Answers the gateway must refuse with 502 before sending any header: each
/// would otherwise pass a body the client cannot frame as the upstream did.
const BADLY_FRAMED: [(&str, &[u8]); 7] = [
    ("Content-Length with chunked (the issue's case)", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nhello"),
    ("chunked with Content-Length after it", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("duplicate differing Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nhello"),
    ("gzip, chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("a coding without chunked last", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nhello"),
    ("chunked twice", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("101 to a request that asked for no upgrade", b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: evil\r\n\r\nhello"),
];

#[tokio::test]
async fn regression_badly_framed_responses_are_502_and_their_connection_is_not_reused() {
    for (case, answer) in BADLY_FRAMED {
        let upstream = RawUpstream::answering(answer).await;
        let gateway = TestGateway::start(&config(&upstream.url(), "", "")).await;
        let client = http1_client();
        for round in 1..=2 {
            let (status, body) = fetch(&client, get(gateway.url("/api/x"))).await;
            let body = body.unwrap_or_else(|e| panic!("{case}: the 502 itself is complete: {e}"));
            assert_eq!(status, 502, "{case}: {}", String::from_utf8_lossy(&body));
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(json["error"] == "upstream_bad_response", "{case}: {json}");
            assert_eq!(upstream.connections(), round, "{case}: a connection is never reused after it");
        }
    }
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_reaches_the_client_aborted() {
    let upstream = RawUpstream::start(|mut conn| async move {
        conn.read_head().await;
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel").await;
    })
    .await;
    let gateway = TestGateway::start(&config(&upstream.url(), "", "")).await;
    for client in [http1_client(), http2_client()] {
        let (status, body) = fetch(&client, get(gateway.url("/api/x"))).await;
        assert_eq!(status, 200, "the head was already on its way");
        assert!(body.is_err(), "a short body must not look complete: {body:?}");
    }
    // On the wire: the 10-byte length stays, 3 bytes follow, the connection closes.
    let raw = exchange(gateway.addr, b"GET /api/x HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.to_ascii_lowercase().contains("content-length: 10"), "{raw}");
    assert!(raw.ends_with("\r\n\r\nhel"), "{raw:?}");
}

#[tokio::test]
async fn bad_chunks_and_resets_mid_body_reach_the_client_aborted() {
    let cases: [(&str, &'static [u8]); 3] = [
        ("a bad chunk size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\nzz\r\nmore"),
        (
            "a chunk without its CRLF",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhelXX4\r\nmore\r\n0\r\n\r\n",
        ),
        (
            "a reset before the last chunk",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n",
        ),
    ];
    for (case, answer) in cases {
        // The script answers, then closes its side: the last case is a reset mid-body.
        let upstream = RawUpstream::start(move |mut conn| async move {
            conn.read_head().await;
            conn.write(answer).await;
        })
        .await;
        let gateway = TestGateway::start(&config(&upstream.url(), "", "")).await;
        for client in [http1_client(), http2_client()] {
            let (status, body) = fetch(&client, get(gateway.url("/api/x"))).await;
            assert_eq!(status, 200, "{case}");
            assert!(body.is_err(), "{case}: must not look complete: {body:?}");
        }
        let raw = exchange(gateway.addr, b"GET /api/x HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(raw.starts_with("HTTP/1.1 200"), "{case}: {raw}");
        assert!(!raw.ends_with("0\r\n\r\n"), "{case}: the last chunk must not be written: {raw:?}");
    }
}

/// After a response that cannot have a body (to HEAD, 204, 304), bytes the
/// upstream sends anyway must not be read as the next request's response.
#[tokio::test]
async fn a_body_after_a_bodiless_response_is_never_taken_for_the_next_response() {
    let smuggled = "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled";
    let heads = [
        ("HEAD", format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len())),
        ("GET", format!("HTTP/1.1 204 No Content\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len())),
        ("GET", format!("HTTP/1.1 304 Not Modified\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len())),
    ];
    for (method, first) in heads {
        let first: &'static str = Box::leak(first.into_boxed_str());
        // Only the upstream's very first answer misbehaves, whatever connection comes next.
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let upstream = RawUpstream::start(move |mut conn| {
            let served = Arc::clone(&served);
            async move {
                while conn.read_head().await.is_some() {
                    if served.fetch_add(1, Ordering::SeqCst) == 0 {
                        conn.write(first.as_bytes()).await;
                    } else {
                        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhonest").await;
                    }
                }
            }
        })
        .await;
        let gateway = TestGateway::start(&config(&upstream.url(), "", "")).await;
        let client = http1_client();
        let request =
            Request::builder().method(method).uri(gateway.url("/api/a")).body(Full::default()).unwrap();
        let (status, _) = fetch(&client, request).await;
        assert!(matches!(status, 200 | 204 | 304), "{first:?}: {status}");
        for _ in 0..3 {
            let (status, body) = fetch(&client, get(gateway.url("/api/b"))).await;
            let body = body.unwrap();
            assert_eq!((status, &body[..]), (200, &b"honest"[..]), "{first:?}");
        }
    }
}

#[tokio::test]
async fn informational_responses_are_skipped_and_the_final_one_passes() {
    let upstream = RawUpstream::answering(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    let gateway = TestGateway::start(&config(&upstream.url(), "", "")).await;
    let client = http1_client();
    for _ in 0..2 {
        let (status, body) = fetch(&client, get(gateway.url("/api/x"))).await;
        assert_eq!((status, body.unwrap()), (200, Bytes::from_static(b"ok")));
    }
    assert_eq!(upstream.connections(), 1, "a well-framed exchange keeps its connection");
}

// === 5. Client body errors are client errors ===

fn status_count(route: &str, status: u16) -> u64 {
    let wanted = format!("route=\"{route}\",status=\"{status}\"");
    keygate::metrics::render()
        .lines()
        .filter(|l| l.starts_with("keygate_requests_total") && l.contains(&wanted))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn regression_malformed_request_bodies_are_400_not_502() {
    let upstream = Upstream::mirror().await;
    let text = "[[route]]\npath = \"/bodies\"\nupstream = \"api\"\npublic = true\n\n[upstream.api]\ntargets = [\"URL\"]\n"
        .replace("URL", &upstream.url());
    let gateway = TestGateway::start(&text).await;
    let head = "POST /bodies HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n";
    let long_extension = format!("5;{}\r\nhello\r\n0\r\n\r\n", "x".repeat(100_000));
    let cases: [(&str, String); 4] = [
        ("a bad chunk size", "5\r\nhello\r\nzz\r\nmore\r\n0\r\n\r\n".to_owned()),
        ("an overlong chunk extension", long_extension),
        ("a missing CRLF after chunk data", "5\r\nhelloXX0\r\n\r\n".to_owned()),
        ("a chunk size that overflows", "ffffffffffffffffff\r\nhello\r\n0\r\n\r\n".to_owned()),
    ];
    for (case, body) in cases {
        let raw = exchange(gateway.addr, format!("{head}{body}").as_bytes()).await;
        assert!(
            raw.is_empty() || (raw.starts_with("HTTP/1.1 400") && raw.contains("bad_request_body")),
            "{case}: a 400 or a closed connection, got {raw:?}"
        );
    }
    // A client that stops mid-body (half-closes after 5 of 100 bytes).
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(b"POST /bodies HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nhello").await.unwrap();
    stream.shutdown().await.unwrap();
    let raw = common::raw::read_until_close(&mut stream).await;
    assert!(raw.is_empty() || raw.starts_with("HTTP/1.1 400"), "client gone mid-body: {raw:?}");

    for status in [500, 502, 503, 504] {
        assert_eq!(status_count("/bodies", status), 0, "no {status} counted for a client's broken body");
    }
}

// === 13. Body limits and time limits ===

#[tokio::test]
async fn a_declared_body_over_max_body_is_413_before_anything_is_forwarded() {
    let upstream = RawUpstream::answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let gateway = TestGateway::start(&config(&upstream.url(), "max_body = \"1KiB\"", "")).await;
    let client = http1_client();
    let big = Request::post(gateway.url("/api/up")).body(Full::new(Bytes::from(vec![b'x'; 1025]))).unwrap();
    let answer = send(&client, big).await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.json()["error"], "body_too_large");
    assert_eq!(upstream.connections(), 0, "nothing reached the upstream");
    let fits = Request::post(gateway.url("/api/up")).body(Full::new(Bytes::from(vec![b'x'; 1024]))).unwrap();
    assert_eq!(send(&http1_client(), fits).await.status, 200);
}

#[tokio::test]
async fn a_chunked_body_crossing_max_body_is_cut_off_and_never_arrives_whole() {
    let upstream = RawUpstream::start(|mut conn| async move {
        conn.read_head().await;
        // Read until the gateway gives up on the request.
        conn.read_to_close().await;
    })
    .await;
    let gateway = TestGateway::start(&config(&upstream.url(), "max_body = \"1KiB\"", "")).await;
    let mut request = String::from("POST /api/up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..4 {
        request.push_str(&format!("200\r\n{}\r\n", "y".repeat(512)));
    }
    request.push_str("0\r\n\r\n");
    let raw = exchange(gateway.addr, request.as_bytes()).await;
    assert!(raw.is_empty() || (raw.starts_with("HTTP/1.1 413") && raw.contains("body_too_large")), "{raw:?}");
    within(10, "the upstream connection to close", async {
        while upstream.finished.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let received = upstream.received_on(0);
    assert!(received.len() < 2048, "at most the limit and a chunk passed: {} bytes", received.len());
    assert!(!received.ends_with(b"0\r\n\r\n"), "the upstream never saw a complete request");
}

#[tokio::test(start_paused = true)]
async fn regression_a_slow_but_steady_upload_is_not_an_upstream_timeout() {
    // The upstream reads the whole body, then answers with its length.
    let upstream = RawUpstream::start(|mut conn| async move {
        conn.read_head().await;
        let body = conn.read_body(5 * (3 + 2 + 2) + 5).await;
        let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        conn.write(answer.as_bytes()).await;
        conn.read_to_close().await;
    })
    .await;
    let gateway = TestGateway::start(&config(
        &upstream.url(),
        "upload_idle_timeout = \"3s\"",
        "timeout = \"2s\"\nconnect_timeout = \"1h\"",
    ))
    .await;
    // Five chunks, one a second: 5 s of upload against a 2 s response timeout.
    let chunks = Box::pin(futures_util::stream::unfold(0, |i| async move {
        if i == 5 {
            return None;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        Some((Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from_static(b"abc"))), i + 1))
    }));
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let request =
        Request::post(gateway.url("/api/up")).body(http_body_util::StreamBody::new(chunks)).unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200, "the response timeout starts once the body is sent");
}

#[tokio::test(start_paused = true)]
async fn a_stalled_upload_is_408_and_its_upstream_request_is_abandoned() {
    let upstream = RawUpstream::start(|mut conn| async move {
        conn.read_head().await;
        conn.read_to_close().await;
    })
    .await;
    let gateway = TestGateway::start(&config(
        &upstream.url(),
        "upload_idle_timeout = \"3s\"",
        "timeout = \"1h\"\nconnect_timeout = \"1h\"",
    ))
    .await;
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(b"POST /api/up HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nhello").await.unwrap();
    let raw = common::raw::read_until_close(&mut stream).await;
    assert!(raw.starts_with("HTTP/1.1 408") && raw.contains("body_timeout"), "{raw:?}");
    within(60, "the upstream connection to close", async {
        while upstream.finished.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn regression_a_stalled_response_body_ends_aborted_and_frees_the_connection() {
    let upstream = RawUpstream::start(|mut conn| async move {
        conn.read_head().await;
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel").await;
        // Then nothing, until the gateway lets go.
        conn.read_to_close().await;
    })
    .await;
    let gateway = TestGateway::start(&config(
        &upstream.url(),
        "",
        "body_idle_timeout = \"5s\"\ntimeout = \"1h\"\nconnect_timeout = \"1h\"",
    ))
    .await;
    let (status, body) = fetch(&http1_client(), get(gateway.url("/api/x"))).await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "a stalled body must end aborted: {body:?}");
    within(60, "the upstream connection to close", async {
        while upstream.finished.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn regression_streams_to_a_hanging_upstream_open_at_most_max_connections() {
    let upstream = RawUpstream::start(|mut conn| async move {
        conn.read_head().await;
        conn.read_to_close().await;
    })
    .await;
    let gateway = Arc::new(
        TestGateway::start(&config(
            &upstream.url(),
            "",
            "max_connections = 4\nconnect_timeout = \"300ms\"\ntimeout = \"2s\"",
        ))
        .await,
    );
    let client = http2_client();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (client, url) = (client.clone(), gateway.url("/api/hang"));
        tasks.push(tokio::spawn(async move { send(&client, get(url)).await }));
    }
    let mut busy = 0;
    let mut timed_out = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        match answer.status.as_u16() {
            503 => {
                assert_eq!(answer.json()["error"], "upstream_busy");
                assert_eq!(answer.headers["retry-after"], "1");
                busy += 1;
            }
            504 => timed_out += 1,
            other => panic!("unexpected {other}: {}", answer.text()),
        }
    }
    assert_eq!(timed_out, 4, "the four connections' requests time out upstream");
    assert_eq!(busy, 96);
    assert!(upstream.connections() <= 4, "opened {} connections", upstream.connections());
}

#[tokio::test]
async fn a_client_gone_mid_stream_cancels_the_upstream_request() {
    // The upstream streams a body slowly and notices when the gateway hangs up.
    let (upstream, mut closed) = ticking_upstream().await;
    let gateway = TestGateway::start(&config(&upstream.url(), "", "")).await;
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(b"GET /api/stream HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(stream);
    within(10, "the upstream's response to be dropped", closed.recv()).await;
}

/// An upstream streaming `tick` lines forever, 20 ms apart; the receiver
/// hears when a response's stream is dropped (the gateway hung up on it).
async fn ticking_upstream() -> (Upstream, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let (tx, closed) = tokio::sync::mpsc::unbounded_channel::<()>();
    let upstream = Upstream::start(move |_req| {
        let tx = tx.clone();
        async move {
            let chunks = futures_util::stream::unfold((0u32, Guard(tx)), |(i, guard)| async move {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Some((
                    Ok::<_, hyper::Error>(hyper::body::Frame::data(Bytes::from_static(b"tick\n"))),
                    (i + 1, guard),
                ))
            });
            Response::new(http_body_util::StreamBody::new(chunks).boxed())
        }
    })
    .await;
    (upstream, closed)
}

/// Sends on drop: the upstream's body stream was dropped (its connection gone).
struct Guard(tokio::sync::mpsc::UnboundedSender<()>);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// The same cut, on the Redis store: the request the client abandoned is
/// still counted in usage (the file store records none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_stream_is_still_counted_in_usage() {
    let redis = common::redis::RedisServer::start();
    let store = keygate::store::redis::RedisStore::connect(&redis.url(), "kg:").await.unwrap();
    let now = jiff::Timestamp::now();
    let changes = keygate::meta::MetaChanges::from_query("scope=read", now).unwrap();
    let issued = keygate::ops::issue(&store, "kg_", "acme", changes, now).await.unwrap();
    let key = issued.key.expose().to_owned();

    let (upstream, mut closed) = ticking_upstream().await;
    let text = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\n\n[[route]]\npath = \"/api\"\nupstream = \"api\"\n\n[upstream.api]\ntargets = [\"{}\"]\n",
        redis.url(),
        upstream.url()
    );
    let gateway = TestGateway::start(&text).await;
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let request = format!("GET /api/stream HTTP/1.1\r\nHost: t\r\nx-api-key: {key}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(stream);
    within(10, "the upstream's response to be dropped", closed.recv()).await;

    let flusher = gateway.gateway.usage_flusher().expect("usage flushes to Redis");
    let requests = within(10, "the abandoned request in usage", async {
        loop {
            flusher.flush_now().await.unwrap();
            let report = redis.usage_report("acme").await;
            if report.totals.requests > 0 {
                return report.totals.requests;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(requests, 1);
}
