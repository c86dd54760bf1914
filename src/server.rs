//! Listeners and connections: accept, serve HTTP/1.1 and HTTP/2, drain on shutdown.
//!
//! [`serve`] takes an already-bound listener (tests bind `127.0.0.1:0` and pass
//! it in, as mini-redis does) and a shutdown future. On shutdown it stops
//! accepting, lets in-flight requests finish within the drain timeout, and returns.
//! TLS will slot in between `accept` and `serve_connection`.
//!
//! In production [`run_workers`] runs one [`serve`] per worker thread, each on
//! its own single-threaded runtime with its own `SO_REUSEPORT` listener: the
//! kernel spreads connections over the workers, and a connection's whole life
//! (accept, requests, upstream connections) stays on one core.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::gateway::Gateway;
use crate::{handler, proxy};

/// How the drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every connection finished its in-flight requests.
    Clean,
    /// The drain timeout passed with connections still open; they were dropped.
    TimedOut,
}

/// How long a connection may take to send its first request head (and then
/// each next one): slow-loris clients are dropped after this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What an HTTP/2 client sends first (RFC 9113 §3.4); h2c with prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The connection builders, made once per worker and shared by its connections.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// For the rare connection whose first bytes are too few to tell.
    auto: auto::Builder<TokioExecutor>,
}

impl Protocols {
    fn new() -> Self {
        let mut http1 = http1::Builder::new();
        // Flattened writes: for small messages one copy beats a writev of many
        // slices (measured: ~0.5 µs less CPU per small request, wrk + /proc).
        // 16 KiB responses cost the same either way (5 alternating rounds:
        // 15.95 µs flattened, 16.27 vectored), so this side stays flattened;
        // the upstream side writes vectored (see `proxy/pool.rs`).
        http1.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).writev(false);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new());
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).writev(false);
        auto.http2().timer(TokioTimer::new());
        Self { http1, http2, auto }
    }
}

/// Serves connections from `listener` until `shutdown` completes, then drains.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) -> Drained {
    let protocols = Arc::new(Protocols::new());
    let graceful = GracefulShutdown::new();
    // Connections that have not sent a byte yet have nothing to finish:
    // this tells them to close at once when the drain starts.
    let (draining, _) = watch::channel(false);
    tokio::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of
                    // spinning; connections already open keep being served.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection = Connection {
            protocols: Arc::clone(&protocols),
            watcher: graceful.watcher(),
            draining: draining.subscribe(),
            gateway: Arc::clone(&gateway),
            peer,
        };
        tokio::spawn(connection.serve(stream));
    }

    drop(listener);
    draining.send_replace(true);
    tracing::info!(?drain_timeout, "shutting down: no new connections, draining in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => Drained::Clean,
        () = tokio::time::sleep(drain_timeout) => {
            tracing::warn!("drain timeout passed with requests still in flight");
            Drained::TimedOut
        }
    }
}

/// One accepted connection, before it is known which protocol it speaks.
struct Connection {
    protocols: Arc<Protocols>,
    watcher: Watcher,
    draining: watch::Receiver<bool>,
    gateway: Arc<Gateway>,
    peer: SocketAddr,
}

impl Connection {
    /// Serves the connection with the protocol its first bytes announce.
    ///
    /// The first read is ours, and hyper is handed its bytes again
    /// ([`Replay`]): a peek would cost one more syscall per connection
    /// (strace, a connection per request: 3 `recvfrom` against nginx's 2).
    /// The read takes up to hyper's own first buffer size, so hyper still
    /// gets the whole request head at once; hyper-util's `auto` reader hands
    /// hyper its first 24 bytes alone, and hyper then doubles its read buffer
    /// to 16 KiB to read the rest, for the connection's whole life (dhat,
    /// 2000 idle connections).
    async fn serve(mut self, stream: TcpStream) {
        // Small request/response exchanges must not wait for Nagle.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "set_nodelay failed");
        }
        let first = tokio::select! {
            first = tokio::time::timeout(HEADER_READ_TIMEOUT, read_first(&stream)) => first,
            _ = self.draining.wait_for(|draining| *draining) => return,
        };
        let (protocol, first) = match first {
            Ok(Ok(first)) => (protocol_of(&first), first),
            Ok(Err(error)) => {
                tracing::debug!(peer = %self.peer, %error, "reading the first request failed; closing");
                return;
            }
            Err(_elapsed) => {
                tracing::debug!(peer = %self.peer, "no request within the header read timeout; closing");
                return;
            }
        };

        let Self { protocols, watcher, gateway, peer, .. } = self;
        let client = proxy::Peer::new(peer);
        let service = service_fn(move |request| {
            let gateway = Arc::clone(&gateway);
            let client = client.clone();
            // Boxed per request: hyper keeps one slot for the request future
            // per connection for the connection's whole life, so an unboxed
            // future (about 3.6 KiB) would be held by every idle connection.
            Box::pin(async move {
                Ok::<_, std::convert::Infallible>(handler::handle(gateway, request, client).await)
            })
        });
        let io = TokioIo::new(Replay::new(first, stream));
        let ended: Result<(), Box<dyn std::error::Error + Send + Sync>> = match protocol {
            Protocol::Http1 => {
                watcher.watch(protocols.http1.serve_connection(io, service)).await.map_err(Into::into)
            }
            // Boxed, like the rare case below: an HTTP/2 connection's state is
            // several times an HTTP/1.1 one's, and unboxed it would size every
            // connection's task (3.7 KiB instead of 1.1 KiB), which every idle
            // connection holds and every accept copies.
            Protocol::Http2 => Box::pin(watcher.watch(protocols.http2.serve_connection(io, service)))
                .await
                .map_err(Into::into),
            Protocol::Unsure => Box::pin(watcher.watch(protocols.auto.serve_connection(io, service))).await,
        };
        if let Err(error) = ended {
            tracing::debug!(%peer, %error, "connection ended with an error");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    /// h2c with prior knowledge: the client's first bytes are the preface.
    Http2,
    /// The first bytes so far are a prefix of the preface: read more to know.
    Unsure,
}

/// How much the first read takes: hyper's first read buffer (8 KiB), so
/// that what hyper is handed fits it as a read of its own would.
const FIRST_READ: usize = 8 * 1024;

thread_local! {
    /// Where each connection's first read lands before its bytes are copied
    /// out at their size: one buffer per thread instead of an 8 KiB
    /// allocation per connection. Borrowed only between awaits.
    static FIRST_READ_BUFFER: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; FIRST_READ].into_boxed_slice());
}

/// The client's first bytes: one read, waiting until something (or the end
/// of the stream: then nothing) arrives. Plain TCP only: behind TLS, ALPN
/// names the protocol and nothing needs reading ahead.
async fn read_first(stream: &TcpStream) -> std::io::Result<Bytes> {
    loop {
        stream.readable().await?;
        let read = FIRST_READ_BUFFER.with_borrow_mut(|buffer| match stream.try_read(buffer) {
            Ok(n) => Ok(Some(Bytes::copy_from_slice(&buffer[..n]))),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(error) => Err(error),
        });
        if let Some(first) = read? {
            return Ok(first);
        }
    }
}

/// The protocol the first bytes announce. An immediate end of stream is left
/// to HTTP/1.1, which closes it.
fn protocol_of(first: &[u8]) -> Protocol {
    let n = first.len().min(H2_PREFACE.len());
    if n == 0 || first[..n] != H2_PREFACE[..n] {
        Protocol::Http1
    } else if n == H2_PREFACE.len() {
        Protocol::Http2
    } else {
        Protocol::Unsure
    }
}

/// A stream that first gives back bytes already read from it, then reads on.
/// The bytes are dropped once handed over, so an idle connection keeps none.
struct Replay<S> {
    first: Option<Bytes>,
    inner: S,
}

impl<S> Replay<S> {
    fn new(first: Bytes, inner: S) -> Self {
        Self { first: (!first.is_empty()).then_some(first), inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(first) = &mut self.first {
            let n = first.len().min(buf.remaining());
            buf.put_slice(&first.split_to(n));
            if first.is_empty() {
                self.first = None;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

thread_local! {
    /// Which worker thread this is (0 outside workers, e.g. in tests); picks
    /// the worker's own upstream connection pool.
    static WORKER_INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The current worker's index.
pub fn worker_index() -> usize {
    WORKER_INDEX.with(std::cell::Cell::get)
}

/// Binds `count` listeners on `addr` sharing the port through `SO_REUSEPORT`
/// (the first binds, so port 0 picks one free port for all).
pub fn bind_reuseport(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut listeners = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Runs one [`serve`] per listener, each on its own thread and
/// single-threaded runtime, until `shutdown` turns true; returns how each
/// worker drained.
pub fn run_workers(
    listeners: Vec<std::net::TcpListener>,
    gateway: &Arc<Gateway>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    drain_timeout: Duration,
) -> std::io::Result<Vec<Drained>> {
    let mut threads = Vec::new();
    for (index, listener) in listeners.into_iter().enumerate() {
        let gateway = Arc::clone(gateway);
        let mut shutdown = shutdown.clone();
        let thread =
            std::thread::Builder::new().name(format!("keygate-worker-{index}")).spawn(move || {
                WORKER_INDEX.with(|w| w.set(index));
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    let stop = async move {
                        // Err: the sender is gone, which also means stop.
                        let _ = shutdown.wait_for(|stop| *stop).await;
                    };
                    Ok::<_, std::io::Error>(serve(listener, gateway, stop, drain_timeout).await)
                })
            })?;
        threads.push(thread);
    }
    threads
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|_| Err(std::io::Error::other("worker thread panicked"))))
        .collect()
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received SIGINT"),
        () = terminate => tracing::info!("received SIGTERM"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected pair: (client, the server's accepted side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// What the first read says of a connection whose client sent `first`
    /// and then (when `close`) closed its side.
    async fn sniffed(first: &[u8], close: bool) -> Protocol {
        let (mut client, server) = pair().await;
        client.write_all(first).await.unwrap();
        if close {
            client.shutdown().await.unwrap();
        }
        protocol_of(&read_first(&server).await.unwrap())
    }

    #[tokio::test]
    async fn first_bytes_tell_http1_from_h2c() {
        assert_eq!(sniffed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false).await, Protocol::Http1);
        assert_eq!(sniffed(b"POST /orders HTTP/1.1\r\n", false).await, Protocol::Http1);
        assert_eq!(sniffed(H2_PREFACE, false).await, Protocol::Http2);
        assert_eq!(sniffed(&H2_PREFACE[..8], false).await, Protocol::Unsure);
        // Closed without a byte: HTTP/1.1 sees the end and closes too.
        assert_eq!(sniffed(b"", true).await, Protocol::Http1);
        // More than the preface, and a first byte that differs.
        assert_eq!(protocol_of(&[H2_PREFACE, b"\x00\x00\x12\x04"].concat()), Protocol::Http2);
        assert_eq!(protocol_of(b"P"), Protocol::Unsure);
        assert_eq!(protocol_of(b"PUT / HTTP/1.1\r\n"), Protocol::Http1);
    }

    #[tokio::test]
    async fn replay_hands_back_the_first_bytes_in_pieces_then_reads_on() {
        let (mut client, server) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let first = read_first(&server).await.unwrap();
        assert_eq!(&first[..], b"GET / HTTP/1.1\r\n");
        client.write_all(b"Host: x\r\n\r\n").await.unwrap();
        client.shutdown().await.unwrap();

        let mut replay = Replay::new(first, server);
        // A reader with less room than the replayed bytes gets them in order.
        let mut small = [0u8; 5];
        replay.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"GET /");
        let mut rest = Vec::new();
        replay.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b" HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(replay.first.is_none(), "nothing kept once handed over");

        // Writes go straight to the stream.
        let (mut client, server) = pair().await;
        let mut replay = Replay::new(Bytes::new(), server);
        replay.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        let mut got = [0u8; 17];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HTTP/1.1 200 OK\r\n");
    }
}
