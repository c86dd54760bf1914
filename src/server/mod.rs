//! Listeners and connections: accept, serve HTTP/1.1 and HTTP/2, drain on shutdown.
//!
//! [`serve`] takes an already-bound listener (tests bind `127.0.0.1:0` and pass
//! it in, as mini-redis does), its [`Transport`] and a shutdown future. On
//! shutdown it stops accepting, lets in-flight requests finish within the
//! drain timeout, and returns.
//!
//! The parts, in the order a connection meets them:
//! - [`limits`]: the global and per-address connection caps, taken at accept;
//! - [`Transport`]: on a TLS listener, the handshake (within the listener's
//!   `handshake_timeout` and the header timeout); ALPN then names the protocol;
//! - [`detect`]: on a plain one, the first bytes tell HTTP/1.1 from h2c,
//!   within the header timeout;
//! - [`watchdog`]: a deadline for every later state of the connection;
//! - hyper's HTTP/1 or HTTP/2 server, with every size and limit set explicitly.
//!
//! In production [`run_workers`] runs one [`serve`] per worker thread, each on
//! its own single-threaded runtime with its own `SO_REUSEPORT` listener: the
//! kernel spreads connections over the workers, and a connection's whole life
//! (accept, requests, upstream connections) stays on one core.

pub mod detect;
pub mod limits;
pub mod transport;
pub mod watchdog;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::EdgeConfig;
use crate::gateway::Gateway;
use crate::{handler, proxy};
use detect::{Protocol, Replay};
use watchdog::{Activity, Deadlines, Ended, Tracked, Watched};

pub use crate::worker::worker_index;
pub use transport::Transport;

/// How the drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every connection finished its in-flight requests.
    Clean,
    /// The drain timeout passed with connections still open; they were dropped.
    TimedOut,
}

/// The connection builders, made once per worker and shared by its connections.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    edge: EdgeConfig,
}

impl Protocols {
    fn new(edge: &EdgeConfig) -> Self {
        let mut http1 = http1::Builder::new();
        // Flattened writes: for small messages one copy beats a writev of many
        // slices (measured: ~0.5 µs less CPU per small request, wrk + /proc).
        // 16 KiB responses cost the same either way (5 alternating rounds:
        // 15.95 µs flattened, 16.27 vectored), so this side stays flattened;
        // the upstream side writes vectored (see `proxy/pool.rs`).
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(edge.hyper_header_backstop())
            // A larger head gets 431 and the connection closes; the read
            // buffer cannot grow past the same bound.
            .max_header_size(edge.max_header_bytes)
            .max_buf_size(edge.max_header_bytes.max(8 * 1024))
            .max_headers(edge.max_headers)
            .writev(false);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(edge.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(edge.http2_max_concurrent_streams)
            // WebSockets over HTTP/2 (RFC 8441), see proxy/upgrade.rs.
            .enable_connect_protocol()
            .keep_alive_interval(edge.http2_keepalive_interval)
            .keep_alive_timeout(edge.http2_keepalive_timeout)
            // hyper's defaults, written out: rapid-reset (CVE-2023-44487) and
            // error-reset floods close the connection.
            .max_pending_accept_reset_streams(20)
            .max_local_error_reset_streams(1024);
        Self { http1, http2, edge: edge.clone() }
    }
}

/// Serves cleartext connections from `listener` until `shutdown` completes,
/// then drains.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) -> Drained {
    serve_transport(listener, Transport::Plain, gateway, shutdown, drain_timeout).await
}

/// Serves connections from `listener` over `transport` until `shutdown`
/// completes, then drains.
pub async fn serve_transport(
    listener: TcpListener,
    transport: Transport,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) -> Drained {
    let protocols = Arc::new(Protocols::new(&gateway.live.load().config.server.edge));
    // Every connection holds a receiver: it tells them to shut down
    // gracefully when the drain starts, and the drain is over once all are
    // dropped (`closed`).
    let (draining, _) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut backoff = AcceptBackoff::default();

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of
                    // spinning; connections already open keep being served.
                    let pause = backoff.failed();
                    tracing::warn!(%error, ?pause, "accept failed");
                    tokio::time::sleep(pause).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        backoff.succeeded();
        // Refused before a byte is read: the cheapest answer there is.
        let permit = match gateway.connections.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(full) => {
                crate::metrics::connection_refused(full.as_str());
                tracing::debug!(%peer, limit = full.as_str(), "connection refused at its cap");
                drop(stream);
                continue;
            }
        };
        let connection = Connection {
            transport: transport.clone(),
            protocols: Arc::clone(&protocols),
            draining: draining.subscribe(),
            gateway: Arc::clone(&gateway),
            peer,
        };
        tokio::spawn(async move {
            connection.serve(stream).await;
            drop(permit);
        });
    }

    drop(listener);
    draining.send_replace(true);
    tracing::info!(?drain_timeout, "shutting down: no new connections, draining in-flight requests");
    tokio::select! {
        () = draining.closed() => Drained::Clean,
        () = tokio::time::sleep(drain_timeout) => {
            tracing::warn!("drain timeout passed with requests still in flight");
            Drained::TimedOut
        }
    }
}

/// The pause after a failed `accept`: doubling from 10 ms to 1 s while
/// accepts keep failing (EMFILE does not clear by retrying at once), back to
/// none after a success.
#[derive(Debug, Default)]
struct AcceptBackoff {
    next: Option<Duration>,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    fn failed(&mut self) -> Duration {
        let pause = self.next.unwrap_or(Self::FIRST);
        self.next = Some((pause * 2).min(Self::MAX));
        pause
    }

    fn succeeded(&mut self) {
        self.next = None;
    }
}

/// One accepted connection, before it is known which protocol it speaks.
struct Connection {
    transport: Transport,
    protocols: Arc<Protocols>,
    draining: watch::Receiver<bool>,
    gateway: Arc<Gateway>,
    peer: SocketAddr,
}

impl Connection {
    /// Serves the connection with the protocol its first bytes announce,
    /// holding it to the deadlines of `[server]`.
    async fn serve(self, stream: TcpStream) {
        // Small request/response exchanges must not wait for Nagle.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "set_nodelay failed");
        }
        match self.transport.clone() {
            Transport::Plain => self.serve_plain(stream).await,
            // Boxed: a TLS stream's state would otherwise size every plain
            // connection's task too.
            Transport::Tls(tls) => Box::pin(self.serve_tls(stream, tls)).await,
        }
    }

    /// Cleartext: the first bytes tell HTTP/1.1 from h2c, and are replayed.
    async fn serve_plain(mut self, stream: TcpStream) {
        let edge = &self.protocols.edge;
        let detected = tokio::select! {
            detected = tokio::time::timeout(edge.header_read_timeout, detect::read_protocol(&stream)) => detected,
            // Nothing sent yet, so nothing to finish: close at once on drain.
            _ = self.draining.wait_for(|draining| *draining) => return,
        };
        let (protocol, first) = match detected {
            Ok(Ok(Some(detected))) => detected,
            Ok(Ok(None)) => return,
            Ok(Err(error)) => {
                tracing::debug!(peer = %self.peer, %error, "reading the first request failed; closing");
                return;
            }
            Err(_elapsed) => {
                crate::metrics::connection_expired("header_read_timeout");
                tracing::debug!(peer = %self.peer, "no protocol within the header read timeout; closing");
                return;
            }
        };

        let client = proxy::Peer::new(self.peer);
        self.serve_http(protocol, Replay::new(first, stream), client).await;
    }

    /// TLS: the handshake, bounded by the smaller of the listener's
    /// `handshake_timeout` and the header read timeout (which the first
    /// request head then gets afresh, as after plain detection), and
    /// refused cleanly whatever goes wrong (plain HTTP sent here included):
    /// a debug line, a count in `/metrics`, the connection closed.
    async fn serve_tls(mut self, stream: TcpStream, tls: Arc<crate::tls::TlsListener>) {
        let limit = self.protocols.edge.header_read_timeout.min(tls.handshake_timeout);
        let handshaken = tokio::select! {
            handshaken = transport::handshake(&tls, stream, self.peer, limit) => handshaken,
            // Nothing served yet: close at once on drain.
            _ = self.draining.wait_for(|draining| *draining) => return,
        };
        match handshaken {
            Ok(done) => self.serve_http(done.protocol, done.stream, done.peer).await,
            Err(failure) => crate::metrics::tls_handshake_failed(failure.as_str()),
        }
    }

    /// HTTP/1.1 or HTTP/2 over `io`, held to the deadlines of `[server]`.
    async fn serve_http<S>(self, protocol: Protocol, io: S, client: proxy::Peer)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Self { protocols, draining, gateway, peer, transport } = self;
        let tls = matches!(transport, Transport::Tls(_));
        let mut counted = crate::metrics::connection_serving(
            tls,
            match protocol {
                Protocol::Http1 => crate::metrics::ConnectionProtocol::Http1,
                Protocol::Http2 => crate::metrics::ConnectionProtocol::Http2,
            },
        );
        let activity = Arc::new(Activity::default());
        let requests = Arc::clone(&activity);
        let service = service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
            let gateway = Arc::clone(&gateway);
            let client = client.clone();
            let guard = requests.request();
            // Only a request asking for an upgrade pays for this (one allocation):
            // its tunnel, if there is one, keeps the connection counted.
            // (An HTTP/2 WebSocket is a CONNECT: RFC 8441.)
            if request.headers().contains_key(http::header::UPGRADE)
                || request.method() == http::Method::CONNECT
            {
                let hold = proxy::upgrade::ConnectionHold::new(requests.tunnel());
                request.extensions_mut().insert(hold);
            }
            // Boxed per request: hyper keeps one slot for the request future
            // per connection for the connection's whole life, so an unboxed
            // future (about 3.6 KiB) would be held by every idle connection.
            Box::pin(async move {
                let response = handler::handle(gateway, request, client).await;
                Ok::<_, std::convert::Infallible>(response.map(|body| Tracked::new(body, guard)))
            })
        });
        let io = TokioIo::new(Watched::new(io, Arc::clone(&activity)));
        let deadlines = Deadlines::new(&protocols.edge, protocol == Protocol::Http2);
        let ended = match protocol {
            Protocol::Http1 => {
                // With upgrades: on a `101` hyper hands the connection to
                // the WebSocket tunnel and this future ends (the watchdog
                // with it), so HTTP deadlines never cut a tunnel.
                let connection = protocols.http1.serve_connection(io, service).with_upgrades();
                // Kept past the HTTP connection: a drain waits for open tunnels too.
                let drain = draining.clone();
                let ended = describe(watchdog::drive(connection, &activity, deadlines, draining).await);
                // An upgraded connection is still this task's: its
                // `max_connections` slot and the drain last until its tunnel
                // closes, and it counts as a WebSocket meanwhile.
                if activity.has_tunnels() {
                    counted.switch(tls, crate::metrics::ConnectionProtocol::WebSocket);
                }
                activity.tunnels_closed().await;
                drop(drain);
                ended
            }
            // Boxed: an HTTP/2 connection's state is several times an
            // HTTP/1.1 one's, and unboxed it would size every connection's
            // task (3.7 KiB instead of 1.1 KiB), which every idle connection
            // holds and every accept copies.
            Protocol::Http2 => {
                let connection = protocols.http2.serve_connection(io, service);
                describe(Box::pin(watchdog::drive(connection, &activity, deadlines, draining)).await)
            }
        };
        drop(counted);
        if let Some(ended) = ended {
            tracing::debug!(%peer, ended, "connection closed");
        }
    }
}

/// What to log of a connection's end, if anything: hyper's error, or the
/// deadline that ended it (counted in `/metrics`).
fn describe(ended: Ended<hyper::Error>) -> Option<String> {
    match ended {
        Ended::Closed(Ok(())) => None,
        Ended::Closed(Err(error)) => Some(format!("with an error: {error}")),
        Ended::Expired(expired) => {
            let deadline = match expired {
                watchdog::Expired::Head => "header_read_timeout",
                watchdog::Expired::Idle => "idle_timeout",
                watchdog::Expired::Send => "send_timeout",
            };
            crate::metrics::connection_expired(deadline);
            Some(format!("after its {deadline}"))
        }
    }
}

/// Binds `count` listeners on `addr` sharing the port through `SO_REUSEPORT`
/// (the first binds, so port 0 picks one free port for all).
///
/// `SO_REUSEPORT` would also let a second keygate (or anything else setting
/// it) join the port silently and take a share of the traffic. Unless
/// `share_with_others` (`server.reuse_port`), a probe socket without the
/// option binds first: it fails with "address in use" if anyone listens
/// there. Two processes starting in the same instant could both pass the
/// probe; one started later cannot.
pub fn bind_workers(
    addr: SocketAddr,
    count: usize,
    share_with_others: bool,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    if !share_with_others && addr.port() != 0 {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        probe.set_reuse_address(true)?;
        probe.bind(&addr.into()).map_err(|error| {
            std::io::Error::new(
                error.kind(),
                format!(
                    "{error}: another process listens on {addr} (set server.reuse_port = true to share it)"
                ),
            )
        })?;
    }
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

/// One worker's share of the listeners: one `SO_REUSEPORT` socket per
/// configured listener, with what it speaks.
pub type WorkerListeners = Vec<(std::net::TcpListener, Transport)>;

/// Regroups [`bind_workers`]' sockets (one `Vec` per configured listener,
/// one socket per worker in each) into one group per worker.
pub fn per_worker(bound: Vec<(Vec<std::net::TcpListener>, Transport)>) -> Vec<WorkerListeners> {
    let mut workers: Vec<WorkerListeners> = Vec::new();
    for (sockets, transport) in bound {
        for (index, socket) in sockets.into_iter().enumerate() {
            if workers.len() <= index {
                workers.push(Vec::new());
            }
            workers[index].push((socket, transport.clone()));
        }
    }
    workers
}

/// Runs one worker per group, each on its own thread and single-threaded
/// runtime serving every listener of its group (so the thread count stays
/// `server.workers` however many listeners there are, and a worker's
/// upstream pools serve all of them), until `shutdown` turns true; returns
/// how each worker drained (timed out if any of its listeners did). Each
/// worker sends its runtime's handle to `runtimes` once it runs (start-up
/// waits for them before telling systemd it is ready, and the watchdog
/// probes them).
pub fn run_workers(
    workers: Vec<WorkerListeners>,
    gateway: &Arc<Gateway>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    drain_timeout: Duration,
    runtimes: tokio::sync::mpsc::UnboundedSender<tokio::runtime::Handle>,
) -> std::io::Result<Vec<Drained>> {
    let mut threads = Vec::new();
    for (index, listeners) in workers.into_iter().enumerate() {
        let gateway = Arc::clone(gateway);
        let shutdown = shutdown.clone();
        let runtimes = runtimes.clone();
        let thread =
            std::thread::Builder::new().name(format!("keygate-worker-{index}")).spawn(move || {
                crate::worker::set_worker_index(index);
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                // Dropped once sent: the channel closes when every worker
                // has sent its handle or failed before it.
                let _ = runtimes.send(runtime.handle().clone());
                drop(runtimes);
                runtime.block_on(async move {
                    let mut serving = Vec::with_capacity(listeners.len());
                    for (listener, transport) in listeners {
                        let listener = TcpListener::from_std(listener)?;
                        let mut shutdown = shutdown.clone();
                        let stop = async move {
                            // Err: the sender is gone, which also means stop.
                            let _ = shutdown.wait_for(|stop| *stop).await;
                        };
                        serving.push(serve_transport(
                            listener,
                            transport,
                            Arc::clone(&gateway),
                            stop,
                            drain_timeout,
                        ));
                    }
                    let drained = futures_util::future::join_all(serving).await;
                    let clean = drained.iter().all(|d| *d == Drained::Clean);
                    Ok::<_, std::io::Error>(if clean { Drained::Clean } else { Drained::TimedOut })
                })
            })?;
        threads.push(thread);
    }
    drop(runtimes);
    let drained = threads
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|_| Err(std::io::Error::other("worker thread panicked"))))
        .collect();
    // Every request has ended: its access line is in a sink's buffer, and
    // gets written before the process goes on to exit.
    crate::access_log::sink::flush_all(ACCESS_LOG_FLUSH);
    drained
}

/// How long the final access log flush may take (a disk that slow loses
/// the last lines rather than holding up the exit).
const ACCESS_LOG_FLUSH: Duration = Duration::from_secs(5);

/// Completes on SIGTERM or SIGINT (Ctrl-C).
///
/// The handlers are installed by this call, not when the future is first
/// polled: `serve` calls it before telling systemd it is ready, so a SIGTERM
/// right after READY drains gracefully instead of killing the process (the
/// signal's default action). Must be called within a Tokio runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &'static str| {
            let installed = signal(kind);
            async move {
                match installed {
                    Ok(mut signal) => {
                        signal.recv().await;
                    }
                    Err(error) => {
                        tracing::error!(%error, "cannot listen for {name}");
                        std::future::pending::<()>().await;
                    }
                }
            }
        };
        let interrupt = listen(SignalKind::interrupt(), "SIGINT");
        let terminate = listen(SignalKind::terminate(), "SIGTERM");
        async move {
            tokio::select! {
                () = interrupt => tracing::info!("received SIGINT"),
                () = terminate => tracing::info!("received SIGTERM"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            if let Err(error) = tokio::signal::ctrl_c().await {
                tracing::error!(%error, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
            tracing::info!("received SIGINT");
        }
    }
}
