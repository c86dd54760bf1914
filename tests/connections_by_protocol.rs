//! `keygate_connections_open_by_protocol` (issue 19, "Observability"): a
//! connection is counted under its protocol once detection named it, moves
//! to `websocket` when its upgrade is taken, and is gone once it closes.
//!
//! Alone in its test binary: the gauges are the process's, so no other
//! test's connections may move them while this one reads exact values.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::gateway::TestGateway;
use common::wait::poll_until;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// The gauge's value for `protocol` on the plain listener.
fn open(protocol: &str) -> i64 {
    let wanted =
        format!("keygate_connections_open_by_protocol{{transport=\"plain\",protocol=\"{protocol}\"}} ");
    let metrics = keygate::metrics::render();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&wanted))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {wanted} in {metrics}"))
}

async fn counts_become(http1: i64, http2: i64, websocket: i64) {
    let what = format!("http1={http1} http2={http2} websocket={websocket}");
    poll_until(Duration::from_secs(10), &what, || async {
        (open("http1"), open("http2"), open("websocket")) == (http1, http2, websocket)
    })
    .await;
}

/// A WebSocket upstream that echoes text messages.
async fn ws_echo() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await {
                    while let Some(Ok(message)) = ws.next().await {
                        if message.is_text() && ws.send(message).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    url
}

/// One GET `/echo` on an open client connection, whatever its HTTP version.
trait EchoSender {
    async fn get(&mut self) -> u16;
}

impl EchoSender for hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    async fn get(&mut self) -> u16 {
        let request = Request::get("/echo").header("host", "gw").body(Full::default()).unwrap();
        let response = self.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        response.into_body().collect().await.unwrap();
        status
    }
}

impl EchoSender for hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    async fn get(&mut self) -> u16 {
        let request = Request::get("http://gw/echo").body(Full::default()).unwrap();
        let response = self.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        response.into_body().collect().await.unwrap();
        status
    }
}

#[tokio::test]
async fn each_connection_is_counted_under_its_protocol_until_it_closes() {
    let ws = ws_echo().await;
    let gw = TestGateway::start(&format!(
        "[[route]]\npath = \"/echo\"\nupstream = \"builtin:echo\"\npublic = true\n\n\
         [[route]]\npath = \"/chat\"\nupstream = \"chat\"\npublic = true\n\n\
         [upstream.chat]\ntargets = [\"{ws}\"]\n"
    ))
    .await;
    counts_become(0, 0, 0).await;

    // HTTP/1.1: counted once its first bytes named it.
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut http1, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    let http1_task = tokio::spawn(connection);
    assert_eq!(http1.get().await, 200);
    counts_become(1, 0, 0).await;

    // h2c (prior knowledge) beside it.
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut http2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    let http2_task = tokio::spawn(connection);
    assert_eq!(http2.get().await, 200);
    counts_become(1, 1, 0).await;

    // A WebSocket: an HTTP/1.1 connection whose upgrade was taken.
    let (mut socket, response) =
        tokio_tungstenite::connect_async(format!("ws://{}/chat", gw.addr)).await.expect("upgraded");
    assert_eq!(response.status(), 101);
    socket.send(Message::text("ping")).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::text("ping"));
    counts_become(1, 1, 1).await;

    // Closed one by one, each leaves its own count.
    drop(http1);
    http1_task.await.unwrap().unwrap();
    counts_become(0, 1, 1).await;
    drop(http2);
    http2_task.await.unwrap().unwrap();
    counts_become(0, 0, 1).await;
    socket.close(None).await.unwrap();
    drop(socket);
    counts_become(0, 0, 0).await;
}
