//! The edge under hostile clients: every connection state has a deadline,
//! connections are capped globally and per source address, and request heads
//! have a size. Raw sockets play the client; time-dependent tests pause
//! tokio's clock, so a 60 s deadline passes without a real wait.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::gateway::TestGateway;
use common::upstream::{Upstream, full};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

const ECHO: &str = "[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\npublic = true\n";

/// Reads until the gateway closes the connection (or resets it), and says
/// how long that took and what was read. Panics past `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(started + limit, stream.read(&mut buf)).await {
            Err(_) => panic!("still open after {limit:?}; read {} bytes", got.len()),
            Ok(Ok(0)) | Ok(Err(_)) => return (started.elapsed(), got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A client socket whose source address is `ip` (any 127/8 address is this
/// machine's loopback), for tests of the per-address cap.
async fn connect_from(ip: &str, to: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// The status code of a raw HTTP/1.1 answer.
fn status_of(answer: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(answer);
    text.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

// === Deadlines ===

#[tokio::test(start_paused = true)]
async fn a_single_byte_of_the_h2_preface_is_closed_after_the_header_read_timeout() {
    // Regression: a prefix of the HTTP/2 preface (even `P`) held the
    // connection forever; 20,500 of them exhausted the descriptors.
    let gateway = TestGateway::start(ECHO).await;
    let mut client = TcpStream::connect(gateway.addr).await.unwrap();
    client.write_all(b"P").await.unwrap();
    let (after, got) = read_until_closed(&mut client, Duration::from_secs(120)).await;
    assert!(got.is_empty(), "nothing answered: {got:?}");
    assert!(after >= Duration::from_secs(10), "not before the 10 s default: {after:?}");
    assert!(after < Duration::from_secs(13), "closed at the deadline: {after:?}");
}

#[tokio::test(start_paused = true)]
async fn an_h2c_preface_and_settings_then_nothing_is_closed_after_the_header_read_timeout() {
    let gateway = TestGateway::start(ECHO).await;
    let mut client = TcpStream::connect(gateway.addr).await.unwrap();
    client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
    client.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let (after, _server_settings) = read_until_closed(&mut client, Duration::from_secs(120)).await;
    assert!(after >= Duration::from_secs(10), "{after:?}");
    assert!(after < Duration::from_secs(13), "{after:?}");
}

#[tokio::test(start_paused = true)]
async fn a_head_sent_a_byte_at_a_time_is_closed_after_the_header_read_timeout() {
    // Slow loris: progress does not buy more time for a head.
    let gateway = TestGateway::start(ECHO).await;
    let mut client = TcpStream::connect(gateway.addr).await.unwrap();
    client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let trickle = async {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if client.write_all(b"X-Slow: 1\r\n").await.is_err() {
                return;
            }
        }
    };
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), trickle).await.ok();
    // The write fails (or the read below sees the close) soon after 10 s.
    let (_, got) = read_until_closed(&mut client, Duration::from_secs(30)).await;
    let after = started.elapsed();
    assert!(!String::from_utf8_lossy(&got).contains("200 OK"), "never served: {got:?}");
    assert!(after < Duration::from_secs(16), "closed near the 10 s deadline: {after:?}");
}

#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_connection_outlives_the_header_timeout_and_closes_after_the_idle_timeout() {
    let gateway = TestGateway::start(ECHO).await;
    let stream = TcpStream::connect(gateway.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = Request::get("/first").header("host", "x").body(Full::new(Bytes::new())).unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    let idle_from = Instant::now();

    // Past the 10 s header timeout, the idle connection still serves.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let request = Request::get("/second").header("host", "x").body(Full::new(Bytes::new())).unwrap();
    let response = sender.send_request(request).await.expect("kept alive past the header timeout");
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    let idle_from_second = Instant::now();
    assert!(idle_from_second >= idle_from + Duration::from_secs(30));

    tokio::time::timeout(Duration::from_secs(120), connection).await.expect("closed by the gateway").ok();
    let idle = idle_from_second.elapsed();
    assert!(idle >= Duration::from_secs(60), "not before the 60 s default: {idle:?}");
    assert!(idle < Duration::from_secs(64), "{idle:?}");
}

#[tokio::test(start_paused = true)]
async fn an_idle_http2_connection_is_sent_away_after_the_idle_timeout() {
    let gateway = TestGateway::start(ECHO).await;
    let stream = TcpStream::connect(gateway.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = Request::get(gateway.url("/h2")).body(Full::new(Bytes::new())).unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    let idle_from = Instant::now();
    // The gateway's keep-alive PINGs (every 20 s) are answered by the
    // client: frames, but not requests, so they do not keep it open.
    tokio::time::timeout(Duration::from_secs(120), connection).await.expect("closed by the gateway").ok();
    let idle = idle_from.elapsed();
    assert!(idle >= Duration::from_secs(60), "{idle:?}");
    assert!(idle < Duration::from_secs(64), "{idle:?}");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_a_large_response_is_closed_after_the_send_timeout() {
    const SIZE: usize = 64 * 1024 * 1024;
    let upstream = Upstream::start(|_req| async {
        Response::builder().body(full(Bytes::from(vec![b'x'; SIZE]))).unwrap()
    })
    .await;
    let config = format!(
        "[[route]]\npath = \"/\"\nupstream = \"big\"\npublic = true\n\n[upstream.big]\ntargets = [\"{}\"]\n",
        upstream.url()
    );
    let gateway = TestGateway::start(&config).await;
    let mut client = TcpStream::connect(gateway.addr).await.unwrap();
    client.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    // The client reads nothing for longer than the 30 s default...
    tokio::time::sleep(Duration::from_secs(45)).await;
    // ...and then finds the connection closed short of the body.
    let (_, got) = read_until_closed(&mut client, Duration::from_secs(60)).await;
    assert!(got.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&got[..got.len().min(64)]));
    assert!(got.len() < SIZE, "the gateway gave up on the reader: read {} bytes", got.len());
}

#[tokio::test(start_paused = true)]
async fn the_admin_listener_closes_a_connection_that_sends_nothing() {
    let (_gateway, admin) = common::admin::start(&format!("{ECHO}{}", common::admin::admin_section())).await;
    let mut silent = TcpStream::connect(admin.addr).await.unwrap();
    let (after, got) = read_until_closed(&mut silent, Duration::from_secs(120)).await;
    assert!(got.is_empty());
    assert!(after >= Duration::from_secs(10) && after < Duration::from_secs(13), "{after:?}");
}

// === Connection caps ===

#[tokio::test]
async fn one_client_over_its_connection_cap_cannot_stop_another_clients_requests() {
    let config = format!("[server]\nmax_connections = 5\nmax_connections_per_ip = 3\n\n{ECHO}");
    let gateway = TestGateway::start(&config).await;
    // Three silent connections from one address fill its share...
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from("127.0.0.1", gateway.addr).await);
    }
    // ...so its fourth is closed at once, before a byte is read.
    let mut over = connect_from("127.0.0.1", gateway.addr).await;
    over.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.ok();
    let (_, got) = read_until_closed(&mut over, Duration::from_secs(5)).await;
    assert!(got.is_empty(), "refused without an answer: {got:?}");

    // Another address still gets served.
    let mut other = connect_from("127.0.0.2", gateway.addr).await;
    other.write_all(b"GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let (_, got) = read_until_closed(&mut other, Duration::from_secs(5)).await;
    assert_eq!(status_of(&got), 200);

    // The global cap: 3 held + 2 more from a second address fill it.
    let _b1 = connect_from("127.0.0.2", gateway.addr).await;
    let _b2 = connect_from("127.0.0.2", gateway.addr).await;
    let mut third = connect_from("127.0.0.3", gateway.addr).await;
    let (_, got) = read_until_closed(&mut third, Duration::from_secs(5)).await;
    assert!(got.is_empty());

    // A closed connection gives its place back.
    drop(held.pop());
    let limits = &gateway.gateway.connections;
    common::wait::within(5, "the closed connection's place to come back", async {
        while limits.open_from("127.0.0.1".parse().unwrap()) != 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let mut again = connect_from("127.0.0.1", gateway.addr).await;
    again.write_all(b"GET /again HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let (_, got) = read_until_closed(&mut again, Duration::from_secs(5)).await;
    assert_eq!(status_of(&got), 200);
    let metrics = keygate::metrics::render();
    assert!(
        metrics.contains("keygate_connections_refused_total{limit=\"max_connections_per_ip\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("keygate_connections_refused_total{limit=\"max_connections\"}"), "{metrics}");
    // The gauge counts every open connection of the process (other tests'
    // gateways included): at least the four this test still holds.
    let open: i64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("keygate_connections_open "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no keygate_connections_open in {metrics}"));
    assert!(open >= 4, "{open} open");
}

// === Request head limits ===

async fn raw_answer(gateway: &TestGateway, head: &[u8]) -> Vec<u8> {
    let mut client = TcpStream::connect(gateway.addr).await.unwrap();
    // The gateway may close before it has read it all: a failed write is fine.
    let _ = client.write_all(head).await;
    read_until_closed(&mut client, Duration::from_secs(10)).await.1
}

#[tokio::test]
async fn a_request_head_over_the_limit_gets_431() {
    let gateway = TestGateway::start(ECHO).await;
    // One 70 KB header.
    let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(70_000));
    assert_eq!(status_of(&raw_answer(&gateway, big.as_bytes()).await), 431);
    // A 388 KB head of many headers under hyper's old buffer default.
    let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..95 {
        many.push_str(&format!("X-H{i}: {}\r\n", "b".repeat(4000)));
    }
    many.push_str("\r\n");
    assert!(many.len() > 380_000);
    assert_eq!(status_of(&raw_answer(&gateway, many.as_bytes()).await), 431);
    // More header fields than allowed, each small.
    let mut count = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..150 {
        count.push_str(&format!("X-C{i}: 1\r\n"));
    }
    count.push_str("\r\n");
    assert_eq!(status_of(&raw_answer(&gateway, count.as_bytes()).await), 431);
    // Just under the limit is served.
    let fits =
        format!("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Fits: {}\r\n\r\n", "c".repeat(60_000));
    assert_eq!(status_of(&raw_answer(&gateway, fits.as_bytes()).await), 200);
}

#[tokio::test]
async fn an_http2_header_list_is_held_to_the_same_limit() {
    let gateway = TestGateway::start(ECHO).await;
    let stream = TcpStream::connect(gateway.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        // The client's own cap must not be what refuses.
        .max_header_list_size(1 << 20)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let with_header = |size: usize| {
        Request::get(gateway.url("/h2"))
            .header("x-big", "a".repeat(size))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let fits = sender.send_request(with_header(40_000)).await.expect("a 40 KB header list is served");
    assert_eq!(fits.status(), 200);
    fits.into_body().collect().await.unwrap();
    match sender.send_request(with_header(70_000)).await {
        Ok(response) => assert_eq!(response.status(), 431),
        // h2 may refuse the stream instead of answering it; either way the
        // request never reaches the handler.
        Err(error) => assert!(format!("{error:?}").contains("REFUSED"), "{error:?}"),
    }
}

// === Early answers ===

#[tokio::test]
async fn an_early_refusal_of_a_large_upload_answers_and_does_not_wait_for_the_body() {
    let config = "[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n";
    let gateway = TestGateway::start(config).await;
    let mut client = TcpStream::connect(gateway.addr).await.unwrap();
    // 1 GiB announced, a few bytes sent: the 401 must come anyway, and the
    // gateway closes rather than reading a gigabyte it will throw away.
    client
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\nsome bytes")
        .await
        .unwrap();
    let (_, got) = read_until_closed(&mut client, Duration::from_secs(10)).await;
    assert_eq!(status_of(&got), 401);
}
