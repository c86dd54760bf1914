//! Connections before their first request: telling HTTP/1.1 from h2c by the
//! first bytes, and what happens to clients that never send any.

mod common;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::gateway::TestGateway;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate::server::Drained;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

const ECHO_ONLY: &str = "[server]\ndrain_timeout = \"30s\"\n\n[[route]]\npath = \"/echo\"\nupstream = \"builtin:echo\"\npublic = true\n";

/// A stream whose first write sends only a few bytes, so an HTTP/2 client's
/// preface reaches the gateway in two pieces.
struct SplitFirstWrite {
    inner: TcpStream,
    first_done: bool,
}

impl AsyncRead for SplitFirstWrite {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SplitFirstWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let limit = if self.first_done { buf.len() } else { buf.len().min(5) };
        let written = Pin::new(&mut self.inner).poll_write(cx, &buf[..limit]);
        if let Poll::Ready(Ok(n)) = written
            && n > 0
        {
            self.first_done = true;
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn an_http2_preface_split_across_writes_is_still_served() {
    let gateway = TestGateway::start(ECHO_ONLY).await;
    for _ in 0..5 {
        let stream = TcpStream::connect(gateway.addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let io = TokioIo::new(SplitFirstWrite { inner: stream, first_done: false });
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("h2 handshake");
        tokio::spawn(connection);
        let request = Request::get(gateway.url("/echo/split")).body(Full::new(Bytes::new())).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
            .await
            .expect("answered within 30 s")
            .expect("request served");
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), http::Version::HTTP_2);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["path"], "/echo/split");
    }
}

#[tokio::test]
async fn connections_that_never_sent_a_byte_do_not_hold_up_the_drain() {
    let mut gateway = TestGateway::start(ECHO_ONLY).await;
    let mut silent = TcpStream::connect(gateway.addr).await.unwrap();
    // A request on another connection proves the gateway has accepted the
    // silent one by now (one accept loop, in order).
    let answer = common::gateway::get(&gateway.url("/echo/x")).await;
    assert_eq!(answer.status, 200);

    // The drain timeout is 30 s: a silent connection counted as in flight
    // would make the drain time out instead of ending cleanly.
    let drained = tokio::time::timeout(Duration::from_secs(20), gateway.begin_shutdown())
        .await
        .expect("drain finished well before its timeout");
    assert_eq!(drained.unwrap(), Drained::Clean);
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await.expect("closed");
    assert!(matches!(read, Ok(0) | Err(_)), "the silent connection is closed: {read:?}");
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_read_timeout() {
    let gateway = TestGateway::start(ECHO_ONLY).await;
    let mut silent = TcpStream::connect(gateway.addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 1];
    // With the clock paused, tokio advances time only when everything idles:
    // the 10 s default header read timeout passes without a real wait.
    let read = tokio::time::timeout(Duration::from_secs(60), silent.read(&mut buf))
        .await
        .expect("closed within 60 s (virtual)");
    assert!(matches!(read, Ok(0) | Err(_)), "closed by the gateway: {read:?}");
    assert!(started.elapsed() >= Duration::from_secs(10), "not before the timeout: {:?}", started.elapsed());
}
