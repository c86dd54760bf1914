//! WebSocket through the gateway: a real tokio-tungstenite client, the real
//! gateway in process, and a real WebSocket echo upstream, on loopback.
//! The upgrade happens only after key, scope and limits passed and only on
//! the upstream's `101`; a tunnel is counted in usage when it closes and is
//! closed by its own idle timeout, not the connection's HTTP one.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::gateway::TestGateway;
use common::redis::RedisServer;
use common::upstream::{Upstream, full};
use futures_util::{SinkExt, StreamExt};
use http::Response;
use jiff::Timestamp;
use keygate::meta::MetaChanges;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// A WebSocket upstream echoing every text and binary message. Counts the
/// tunnels that have closed on its side (a read ended or failed).
struct EchoServer {
    url: String,
    closed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo_server() -> EchoServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let closed = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&closed);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                if let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await {
                    while let Some(Ok(message)) = ws.next().await {
                        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                            break;
                        }
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    EchoServer { url, closed, task }
}

fn config(upstream: &str, extra_upstream: &str) -> String {
    format!(
        r#"
[server]
idle_timeout = "200ms"

[[route]]
path = "/chat"
upstream = "chat"
scopes = ["chat"]

[upstream.chat]
targets = ["{upstream}"]
{extra_upstream}
"#
    )
}

async fn issue(gateway: &TestGateway, meta: &str) -> String {
    let changes = MetaChanges::from_query(meta, Timestamp::now()).unwrap();
    let issued =
        keygate::ops::issue(&*gateway.gateway.store, "kg_", "acme", changes, Timestamp::now()).await.unwrap();
    issued.key.expose().to_owned()
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to the gateway's `/chat`, with `key` if given.
async fn connect(gateway: &TestGateway, key: Option<&str>) -> Result<Socket, WsError> {
    let mut request = format!("ws://{}/chat", gateway.addr).into_client_request().unwrap();
    if let Some(key) = key {
        request.headers_mut().insert("x-api-key", key.parse().unwrap());
    }
    let connecting = tokio_tungstenite::connect_async(request);
    let (socket, response) =
        tokio::time::timeout(Duration::from_secs(10), connecting).await.expect("handshake within 10 s")?;
    assert_eq!(response.status(), 101);
    Ok(socket)
}

/// The HTTP answer a refused handshake got: status and body.
fn refused(result: Result<Socket, WsError>) -> (u16, String) {
    match result {
        Err(WsError::Http(response)) => {
            let body = response.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            (response.status().as_u16(), body.into_owned())
        }
        Err(other) => panic!("not an HTTP refusal: {other}"),
        Ok(_) => panic!("the gateway upgraded a connection it should have refused"),
    }
}

/// Sends `text` and expects it echoed, over either kind of socket.
async fn round_trip<S>(socket: &mut tokio_tungstenite::WebSocketStream<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    socket.send(Message::text(text)).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), socket.next()).await.expect("echo within 5 s");
    assert_eq!(echoed.unwrap().unwrap(), Message::text(text));
}

#[tokio::test]
async fn an_echo_round_trips_through_the_gateway_with_a_key() {
    let echo = echo_server().await;
    let gateway = TestGateway::start(&config(&echo.url, "")).await;
    let key = issue(&gateway, "scope=chat").await;

    let mut socket = connect(&gateway, Some(&key)).await.unwrap();
    round_trip(&mut socket, "hello through keygate").await;
    socket.send(Message::binary(vec![0u8, 1, 2, 255])).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::binary(vec![0u8, 1, 2, 255]));
    socket.close(None).await.unwrap();
    common::wait::within(5, "the upstream sees the tunnel closed", async {
        while echo.closed.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// One access line per tunnel, written when it closes: status 101, the
/// tunnel's bytes, how it ended, the whole duration.
#[tokio::test]
async fn a_tunnel_writes_its_access_line_when_it_closes() {
    let echo = echo_server().await;
    let log = common::access::AccessLog::new();
    let gateway = TestGateway::start(&format!("{}{}", log.toml("json"), config(&echo.url, ""))).await;
    let key = issue(&gateway, "scope=chat").await;

    let mut socket = connect(&gateway, Some(&key)).await.unwrap();
    round_trip(&mut socket, "hello through keygate").await;
    assert!(log.entries().is_empty(), "no line while the tunnel is open: {}", log.text());
    socket.close(None).await.unwrap();
    drop(socket);

    let line = log.wait_for("for the tunnel", |line| line["path"] == "/chat").await;
    assert_eq!(line["status"], 101);
    assert_eq!(line["tunnel_end"], "closed", "{line}");
    assert_eq!((line["upstream"].as_str(), line["client"].as_str()), (Some("chat"), Some("acme")));
    assert_eq!(line["target"], echo.url.trim_start_matches("http://"), "{line}");
    // A text frame of 21 bytes each way, plus the framing and the close.
    assert!(line["bytes_in"].as_u64().unwrap() > 21 && line["bytes_out"].as_u64().unwrap() > 21, "{line}");
    assert!(line["request_id"].as_str().is_some_and(|id| id.len() == 32), "{line}");
    assert_eq!(log.entries().len(), 1, "one line per tunnel: {}", log.text());
}

#[tokio::test]
async fn a_handshake_without_a_key_gets_the_json_401_and_no_upgrade() {
    let echo = echo_server().await;
    let gateway = TestGateway::start(&config(&echo.url, "")).await;
    let (status, body) = refused(connect(&gateway, None).await);
    assert_eq!(status, 401);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "missing_key");
    assert_eq!(echo.closed.load(Ordering::SeqCst), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn a_key_without_the_scope_gets_the_json_403_and_no_upgrade() {
    let echo = echo_server().await;
    let gateway = TestGateway::start(&config(&echo.url, "")).await;
    let key = issue(&gateway, "scope=other").await;
    let (status, body) = refused(connect(&gateway, Some(&key)).await);
    assert_eq!(status, 403);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "insufficient_scope");
}

#[tokio::test]
async fn an_upstream_refusing_the_upgrade_gives_the_client_its_own_answer() {
    let plain = Upstream::start(|_req| async {
        Response::builder().status(200).header("x-upstream", "plain").body(full("no websocket here")).unwrap()
    })
    .await;
    let gateway = TestGateway::start(&config(&plain.url(), "")).await;
    let key = issue(&gateway, "scope=chat").await;
    let (status, body) = refused(connect(&gateway, Some(&key)).await);
    assert_eq!(status, 200);
    assert_eq!(body, "no websocket here");
}

#[tokio::test]
async fn a_tunnel_outlives_the_http_idle_timeout_while_bytes_flow_and_closes_when_silent() {
    let echo = echo_server().await;
    // The connection's HTTP idle timeout is 200 ms; the tunnel's own 600 ms.
    let gateway = TestGateway::start(&config(&echo.url, "websocket_idle_timeout = \"600ms\"")).await;
    let key = issue(&gateway, "scope=chat").await;
    let mut socket = connect(&gateway, Some(&key)).await.unwrap();

    // Five times the HTTP idle timeout, with a message every 100 ms.
    let busy = tokio::time::Instant::now();
    while busy.elapsed() < Duration::from_secs(1) {
        round_trip(&mut socket, "still here").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Silence: the gateway closes the tunnel after its idle timeout (kept
    // to within a quarter of it), and the upstream sees its side closed.
    let silent = tokio::time::Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(5), socket.next()).await.expect("closed within 5 s");
    assert!(!matches!(next, Some(Ok(Message::Text(_)))), "a closed tunnel, not a message: {next:?}");
    let waited = silent.elapsed();
    assert!(waited >= Duration::from_millis(600), "closed after {waited:?}, before the idle timeout");
    common::wait::within(5, "the upstream sees the tunnel closed", async {
        while echo.closed.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_tunnel_is_one_request_in_usage_with_its_bytes_both_ways() {
    let redis = RedisServer::start();
    let echo = echo_server().await;
    let config = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\n\n[usage]\nenabled = true\n{}",
        redis.url(),
        config(&echo.url, "")
    );
    let gateway = TestGateway::start(&config).await;
    let recorder = gateway.gateway.usage.clone().expect("usage is on");
    let key = issue(&gateway, "scope=chat").await;

    let mut socket = connect(&gateway, Some(&key)).await.unwrap();
    let payload = "x".repeat(1000);
    let opened = std::time::Instant::now();
    for _ in 0..3 {
        round_trip(&mut socket, &payload).await;
    }
    // Nothing is recorded while the tunnel is open.
    tokio::task::yield_now().await;
    assert_eq!(recorder.drain().values().map(|s| s.counts().requests).sum::<u64>(), 0);
    socket.close(None).await.unwrap();
    drop(socket);

    let lived = opened.elapsed();
    let mut total = keygate::usage::Counts::default();
    common::wait::within(10, "the tunnel recorded once closed", async {
        while total.requests < 1 {
            for series in recorder.drain().values() {
                total.add(&series.counts());
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(total.requests, 1);
    // Three 1000-byte messages each way, plus framing (client frames are
    // masked: 8 bytes of header each), plus the close frames.
    assert!((3000..3100).contains(&total.bytes_in), "bytes in: {}", total.bytes_in);
    assert!((3000..3100).contains(&total.bytes_out), "bytes out: {}", total.bytes_out);
    // Its life, handshake to close: at least what the test saw of it.
    assert!(total.tunnel_us >= lived.as_micros() as u64, "{} us, lived {lived:?}", total.tunnel_us);
    assert!(total.tunnel_us < 10_000_000, "{} us", total.tunnel_us);
}

#[tokio::test]
async fn a_rate_limited_handshake_gets_the_json_429_and_no_upgrade() {
    let echo = echo_server().await;
    let gateway = TestGateway::start(&config(&echo.url, "")).await;
    let key = issue(&gateway, "scope=chat&rate_limit=1/min&burst=1").await;
    let first = connect(&gateway, Some(&key)).await.unwrap();
    let (status, body) = refused(connect(&gateway, Some(&key)).await);
    assert_eq!(status, 429);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "rate_limited");
    drop(first);
}

/// Whether the gateway serves a request on a new connection (a connection
/// over `max_connections` is closed at accept, before any answer).
async fn served_on_a_new_connection(gateway: &TestGateway) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let _ = stream.write_all(b"GET /chat HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    answer.starts_with(b"HTTP/1.1 ")
}

#[tokio::test]
async fn an_open_tunnel_keeps_its_connection_counted_against_max_connections() {
    let echo = echo_server().await;
    let config = config(&echo.url, "")
        .replace("[server]\n", "[server]\nmax_connections = 1\nmax_connections_per_ip = 1\n");
    let gateway = TestGateway::start(&config).await;
    let key = issue(&gateway, "scope=chat").await;
    assert!(served_on_a_new_connection(&gateway).await, "room for one");

    let mut socket = connect(&gateway, Some(&key)).await.unwrap();
    round_trip(&mut socket, "holding the only slot").await;
    assert!(!served_on_a_new_connection(&gateway).await, "the tunnel holds the one connection allowed");

    socket.close(None).await.unwrap();
    drop(socket);
    common::wait::within(5, "the slot is free once the tunnel closed", async {
        while !served_on_a_new_connection(&gateway).await {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test]
async fn an_open_tunnel_counts_against_the_upstreams_max_requests() {
    let echo = echo_server().await;
    let gateway = TestGateway::start(&config(&echo.url, "max_requests = 1")).await;
    let key = issue(&gateway, "scope=chat").await;
    let mut socket = connect(&gateway, Some(&key)).await.unwrap();
    round_trip(&mut socket, "holding the one request allowed").await;

    match connect(&gateway, Some(&key)).await {
        Err(WsError::Http(refused)) => {
            assert_eq!(refused.status(), 503);
            assert_eq!(refused.headers()["retry-after"], "1");
        }
        other => panic!("a second tunnel must be refused by the breaker: {other:?}"),
    }

    socket.close(None).await.unwrap();
    drop(socket);
    common::wait::within(5, "a tunnel is allowed again once the first closed", async {
        loop {
            if let Ok(mut socket) = connect(&gateway, Some(&key)).await {
                round_trip(&mut socket, "after the first closed").await;
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
}

type H2Socket = tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// Opens a WebSocket over HTTP/2 (RFC 8441 extended CONNECT) to `/chat`:
/// the answer's status, and the socket when the gateway opened the stream.
async fn connect_h2(gateway: &TestGateway, key: Option<&str>) -> (http::StatusCode, Option<H2Socket>) {
    let tcp = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let empty = || http_body_util::Empty::<bytes::Bytes>::new();
    // One ordinary exchange first: the server's SETTINGS (with
    // ENABLE_CONNECT_PROTOCOL) have arrived once it is answered.
    let warm = http::Request::get(format!("http://{}/chat", gateway.addr)).body(empty()).unwrap();
    sender.send_request(warm).await.unwrap();

    let mut request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://{}/chat", gateway.addr))
        .header("sec-websocket-version", "13")
        .extension(hyper::ext::Protocol::from_static("websocket"));
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    let mut response = sender.send_request(request.body(empty()).unwrap()).await.unwrap();
    let status = response.status();
    if status != 200 {
        return (status, None);
    }
    let upgraded = hyper::upgrade::on(&mut response).await.unwrap();
    let socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    (status, Some(socket))
}

#[tokio::test]
async fn a_websocket_over_http2_extended_connect_round_trips_with_a_key_and_is_refused_without() {
    let echo = echo_server().await;
    let gateway = TestGateway::start(&config(&echo.url, "")).await;
    let key = issue(&gateway, "scope=chat").await;

    let (status, socket) = connect_h2(&gateway, Some(&key)).await;
    assert_eq!(status, 200, "RFC 8441: the stream opens with a 200");
    let mut socket = socket.unwrap();
    // Messages for three times the connection's HTTP idle timeout (200 ms):
    // the open stream keeps the HTTP/2 connection from being closed as idle.
    let busy = tokio::time::Instant::now();
    while busy.elapsed() < Duration::from_millis(600) {
        round_trip(&mut socket, "over h2").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    socket.close(None).await.unwrap();
    common::wait::within(5, "the upstream sees the tunnel closed", async {
        while echo.closed.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;

    assert_eq!(connect_h2(&gateway, None).await.0, 401, "no key, no stream");
    let reader = issue(&gateway, "scope=read").await;
    assert_eq!(connect_h2(&gateway, Some(&reader)).await.0, 403, "a key without the scope, no stream");
}
