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
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
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
    /// Deciding on a peek rather than hyper-util's `auto` reader leaves the
    /// first read to hyper, which then reads the whole request head into its
    /// buffer; the `auto` reader hands hyper its first 24 bytes alone, and
    /// hyper doubles its read buffer to 16 KiB to read the rest, for the
    /// connection's whole life (dhat, 2000 idle connections).
    async fn serve(mut self, stream: TcpStream) {
        // Small request/response exchanges must not wait for Nagle.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "set_nodelay failed");
        }
        let sniffed = tokio::select! {
            sniffed = tokio::time::timeout(HEADER_READ_TIMEOUT, sniff(&stream)) => sniffed,
            _ = self.draining.wait_for(|draining| *draining) => return,
        };
        let Ok(protocol) = sniffed else {
            tracing::debug!(peer = %self.peer, "no request within the header read timeout; closing");
            return;
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
        let io = TokioIo::new(stream);
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

/// Looks at the first bytes without consuming them. Errors and an immediate
/// end of stream are left to HTTP/1.1, which reports or closes them.
async fn sniff(stream: &TcpStream) -> Protocol {
    let mut first = [0u8; H2_PREFACE.len()];
    match stream.peek(&mut first).await {
        Ok(n) if n > 0 && first[..n] == H2_PREFACE[..n] => {
            if n == H2_PREFACE.len() {
                Protocol::Http2
            } else {
                Protocol::Unsure
            }
        }
        _ => Protocol::Http1,
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
    use tokio::io::AsyncWriteExt;

    /// What `sniff` says of a connection whose client sent `first` and then
    /// (when `close`) closed its side.
    async fn sniffed(first: &[u8], close: bool) -> Protocol {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(first).await.unwrap();
        if close {
            client.shutdown().await.unwrap();
        }
        sniff(&server).await
    }

    #[tokio::test]
    async fn first_bytes_tell_http1_from_h2c() {
        assert_eq!(sniffed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false).await, Protocol::Http1);
        assert_eq!(sniffed(b"POST /orders HTTP/1.1\r\n", false).await, Protocol::Http1);
        assert_eq!(sniffed(H2_PREFACE, false).await, Protocol::Http2);
        assert_eq!(sniffed(&H2_PREFACE[..8], false).await, Protocol::Unsure);
        // Closed without a byte: HTTP/1.1 sees the end and closes too.
        assert_eq!(sniffed(b"", true).await, Protocol::Http1);
    }
}
