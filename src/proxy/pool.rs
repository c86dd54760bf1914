//! Per-worker pools of connections to one upstream target: HTTP/1.1 over
//! TCP or TLS, and HTTP/2 (over TLS when the upstream picks `h2` by ALPN, or
//! h2c with `protocol = "http2"` on `http://`).
//!
//! Each worker thread keeps its own idle list of `hyper::client::conn::http1`
//! senders, whose connection tasks run on that worker's runtime: a request
//! and its upstream connection never cross threads, and checking a
//! connection out is a pop from a list no other thread touches (its mutex
//! is never contended). Compared with hyper-util's pooled client this skips
//! the shared pool, the per-request readiness task and the cross-task
//! hand-offs, which the end-to-end bench showed as the proxy core's cost.
//!
//! A connection goes back to its list when the response body has been read
//! to its end ([`Lease::release`], called by [`PooledBody`]); a response
//! abandoned midway closes its connection, as HTTP/1.1 requires.
//!
//! Each target allows `max_connections` open connections: a semaphore permit
//! is taken before connecting and held by the connection's task until the
//! connection ends, idle or busy. A request over the cap waits up to the
//! connect timeout (closing an idle connection to make room) and then gets
//! [`SendError::Busy`], so a hanging upstream costs a bounded number of sockets.
//!
//! A response body that stops arriving for `body_idle_timeout` ends as an
//! error ([`UpstreamBodyError::Stalled`]): the client sees an aborted
//! response, never a complete one, and the connection is closed.
//!
//! TLS (`https://` targets) is a branch taken when connecting only: the
//! handshake uses the upstream's one rustls config (built at config load),
//! and a TLS HTTP/1.1 connection is pooled exactly like a plain one. A
//! certificate the config does not trust is [`SendError::Tls`] with rustls'
//! reason; nothing is ever sent on such a connection.
//!
//! HTTP/2: each worker keeps one connection per target and every request
//! of that worker multiplexes on it (a clone of its `SendRequest`); a
//! connection that closed (GOAWAY, reset) is replaced on the next request.
//! Once a target is known to speak HTTP/2 (`http2`, or `auto` after its
//! first `h2` answer) a worker connects one request at a time, so a burst
//! shares one new connection; only the very first burst under `auto`, before
//! ALPN has answered once, may open a few (the extra ones close when their
//! requests end).
//! It holds one `max_connections` permit like an HTTP/1.1 connection, so
//! `max_connections` caps open sockets either way; concurrent requests on
//! one HTTP/2 connection are bounded by the upstream's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` instead (hyper waits for a free stream).
//! Plain `http://` pools have no HTTP/2 slots: their request path is one
//! branch longer than before and allocates nothing more.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};

use super::body::RequestBody;
use super::health::InFlight;
use crate::upstream_tls::Protocol;

/// Why a request could not be sent; the caller maps these to 502.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connect to {0}: {1}")]
    Connect(Authority, String),
    #[error("connect to {0}: no answer within {1:?}")]
    ConnectTimeout(Authority, Duration),
    #[error("{0}: all {1} connections busy")]
    Busy(Authority, usize),
    /// The upstream's `max_pending` connection attempts were already under
    /// way (circuit breaking): nothing was tried.
    #[error("{0}: {1} connection attempts already pending")]
    Overloaded(Authority, usize),
    /// The TLS handshake failed: an untrusted, expired or wrong-host
    /// certificate, a refused client certificate... (rustls' reason).
    #[error("TLS to {0}: {1}")]
    Tls(Authority, String),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// Connection attempts under way to one upstream's targets (waiting for a
/// `max_connections` permit, connecting, handshaking), capped at
/// `max_pending`: past it a request is refused at once rather than queued
/// behind connects that are not getting anywhere.
#[derive(Debug)]
pub struct PendingConnects {
    count: std::sync::atomic::AtomicUsize,
    max: usize,
}

impl PendingConnects {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { count: std::sync::atomic::AtomicUsize::new(0), max })
    }

    fn enter(self: &Arc<Self>) -> Option<PendingGuard> {
        let before = self.count.fetch_add(1, Ordering::Relaxed);
        let guard = PendingGuard(Arc::clone(self));
        (before < self.max).then_some(guard)
    }
}

struct PendingGuard(Arc<PendingConnects>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a target is reached over TLS: the upstream's shared config and the
/// name its certificate must carry.
pub struct TargetTls {
    pub connector: tokio_rustls::TlsConnector,
    pub name: ServerName<'static>,
}

/// A new connection: HTTP/1.1 (pooled per request) or HTTP/2 (shared).
enum Connected {
    H1(SendRequest<RequestBody>),
    H2(http2::SendRequest<RequestBody>),
}

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// Idle connections to one target, one list per worker.
pub struct ConnPool {
    authority: Authority,
    /// `Host` for every request to this target, built once.
    host: Option<http::HeaderValue>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    per_worker: Vec<Mutex<Vec<Idle>>>,
    /// One permit per connection allowed open; each connection task holds one.
    permits: Arc<Semaphore>,
    max_connections: usize,
    /// Requests waiting for a permit. While there are any, a connection
    /// coming back is closed rather than pooled: pooled, it would keep its
    /// permit and the waiter would time out beside an idle connection.
    waiting_for_permit: std::sync::atomic::AtomicUsize,
    /// How long a response body may pause between frames.
    body_idle_timeout: Duration,
    /// `Some` for `https://` targets.
    tls: Option<TargetTls>,
    /// Each worker's shared HTTP/2 connection; `None` (no slots at all) when
    /// this target never speaks HTTP/2 (plain `http://` unless `http2`).
    h2: Option<Vec<H2Slot>>,
    /// `https` or `http`, for the absolute URI HTTP/2 requests carry.
    scheme: http::uri::Scheme,
    protocol: Protocol,
    /// Shared by the upstream's targets: its `max_pending`.
    pending: Arc<PendingConnects>,
}

/// One worker's HTTP/2 connection to a target.
#[derive(Default)]
struct H2Slot {
    /// The shared connection; cloned for each request. A std Mutex: held
    /// for a clone or a swap, never across an await.
    sender: Mutex<Option<http2::SendRequest<RequestBody>>>,
    /// Held while this worker connects once the target is known to speak
    /// HTTP/2, so a burst opens one connection, not one per request.
    connecting: tokio::sync::Mutex<()>,
    /// The target has picked `h2` before (`auto` learns it from ALPN).
    seen: std::sync::atomic::AtomicBool,
}

impl H2Slot {
    /// The connection, if there is one still open.
    fn checkout(&self) -> Option<http2::SendRequest<RequestBody>> {
        let mut slot = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
        match slot.as_ref() {
            Some(sender) if !sender.is_closed() => Some(sender.clone()),
            Some(_) => {
                *slot = None;
                None
            }
            None => None,
        }
    }

    fn install(&self, sender: http2::SendRequest<RequestBody>) {
        self.seen.store(true, Ordering::Relaxed);
        *self.sender.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender);
    }
}

/// The limits of one target's pool, from its `[upstream.NAME]`.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
    pub max_connections: usize,
    pub body_idle_timeout: Duration,
}

impl ConnPool {
    /// A target reached over TLS when `tls` is given, speaking `protocol`;
    /// its connection attempts count in `pending`, its upstream's.
    pub fn with_tls(
        authority: Authority,
        workers: usize,
        limits: PoolLimits,
        tls: Option<TargetTls>,
        protocol: Protocol,
        pending: Arc<PendingConnects>,
    ) -> Arc<Self> {
        let workers = workers.max(1);
        let per_worker = (0..workers).map(|_| Mutex::new(Vec::new())).collect();
        let speaks_h2 = match protocol {
            Protocol::Http1 => false,
            Protocol::Http2 => true,
            Protocol::Auto => tls.is_some(),
        };
        let h2 = speaks_h2.then(|| (0..workers).map(|_| H2Slot::default()).collect());
        let scheme = if tls.is_some() { http::uri::Scheme::HTTPS } else { http::uri::Scheme::HTTP };
        let host = http::HeaderValue::from_str(authority.as_str()).ok();
        let max_connections = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Self {
            authority,
            host,
            connect_timeout: limits.connect_timeout,
            idle_timeout: limits.idle_timeout,
            max_idle: limits.max_idle,
            per_worker,
            permits: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            waiting_for_permit: std::sync::atomic::AtomicUsize::new(0),
            body_idle_timeout: limits.body_idle_timeout,
            tls,
            h2,
            scheme,
            protocol,
            pending,
        })
    }

    /// Whether this target is reached over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The target's `host:port`.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// How long a response body from this target may pause between frames.
    pub fn body_idle_timeout(&self) -> Duration {
        self.body_idle_timeout
    }

    /// The `Host` header value for this target.
    pub fn host(&self) -> Option<&http::HeaderValue> {
        self.host.as_ref()
    }

    fn idle_list(&self) -> &Mutex<Vec<Idle>> {
        &self.per_worker[crate::worker::worker_index() % self.per_worker.len()]
    }

    /// Sends `request` (origin-form URI, `Host` set) on a pooled connection,
    /// or a new one. A pooled connection that turns out to be closed (the
    /// upstream timed it out) is retried once on a fresh connection: hyper
    /// hands the request back unsent in that case, so the retry is safe.
    ///
    /// `now` is when the caller started sending (it times the upstream with
    /// it too): it ages the idle connections without a clock read of its own.
    pub async fn send(
        self: &Arc<Self>,
        request: Request<RequestBody>,
        now: Instant,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        let mut request = request;
        if let Some(slots) = &self.h2 {
            let slot = self.h2_slot(slots);
            if let Some(sender) = slot.checkout() {
                // Boxed: only HTTP/2 requests pay for the HTTP/2 future's size.
                match Box::pin(self.send_h2(sender, request)).await {
                    Ok(sent) => return Ok(sent),
                    Err((error, None)) => return Err(error),
                    // Closed before it took the request: connect anew below.
                    Err((_, Some(unsent))) => request = unsent,
                }
            }
            if self.protocol == Protocol::Http2 || slot.seen.load(Ordering::Relaxed) {
                return Box::pin(self.connect_h2_once(slot, request)).await;
            }
        }
        if let Some(mut sender) = self.checkout(now)
            && sender.ready().await.is_ok()
        {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, self.lease(sender))),
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(SendError::Http(failed.into_error())),
                },
            }
        }
        // Boxed: connecting is the rare path, and every connection's request
        // future would otherwise be sized for it (dhat: bytes per idle connection).
        // The HTTP/1.1 case stays inline, as before TLS existed: calling
        // `send_on_new` here held the request in a future of its own and
        // grew every plain request (measured, debug build: +320 bytes
        // allocated per request).
        match Box::pin(self.connect()).await? {
            Connected::H1(mut sender) => {
                let response = sender.send_request(request).await?;
                Ok((response, self.lease(sender)))
            }
            connected @ Connected::H2(_) => Box::pin(self.send_on_new(connected, request)).await,
        }
    }

    /// Sends the first request on a new connection; an HTTP/2 one becomes
    /// this worker's shared connection.
    async fn send_on_new(
        self: &Arc<Self>,
        connected: Connected,
        request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        match connected {
            Connected::H1(mut sender) => {
                let response = sender.send_request(request).await?;
                Ok((response, self.lease(sender)))
            }
            Connected::H2(sender) => {
                if let Some(slots) = &self.h2 {
                    self.h2_slot(slots).install(sender.clone());
                }
                Box::pin(self.send_h2(sender, request)).await.map_err(|(error, _)| error)
            }
        }
    }

    /// Connects for a target known to speak HTTP/2, one request at a time
    /// per worker: requests that arrive while the connection is being made
    /// wait for it and share it, instead of each opening its own.
    async fn connect_h2_once(
        self: &Arc<Self>,
        slot: &H2Slot,
        request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        // Held until the new connection is installed, not while its first
        // request waits for an answer: the others send on it meanwhile.
        let connecting = slot.connecting.lock().await;
        let connected = match slot.checkout() {
            Some(sender) => Connected::H2(sender),
            None => self.connect().await?,
        };
        if let Connected::H2(sender) = &connected {
            slot.install(sender.clone());
        }
        drop(connecting);
        self.send_on_new(connected, request).await
    }

    fn h2_slot<'a>(&self, slots: &'a [H2Slot]) -> &'a H2Slot {
        &slots[crate::worker::worker_index() % slots.len()]
    }

    /// Sends on an HTTP/2 connection; a request it never took is handed
    /// back. The lease holds no sender: the connection stays shared.
    async fn send_h2(
        self: &Arc<Self>,
        mut sender: http2::SendRequest<RequestBody>,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lease), (SendError, Option<Request<RequestBody>>)> {
        // HTTP/2 carries the scheme and authority as pseudo-headers, taken
        // from an absolute URI.
        let mut parts = std::mem::take(request.uri_mut()).into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *request.uri_mut() = http::Uri::from_parts(parts).unwrap_or_default();
        *request.version_mut() = http::Version::HTTP_2;
        match sender.try_send_request(request).await {
            Ok(response) => Ok((response, Lease { sender: None, pool: Arc::clone(self), _permit: None })),
            Err(mut failed) => {
                let unsent = failed.take_message();
                Err((SendError::Http(failed.into_error()), unsent))
            }
        }
    }

    /// The most recently used idle connection still open and not too old.
    fn checkout(&self, now: Instant) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.idle_list().lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(candidate) = idle.pop() {
            if !candidate.sender.is_closed()
                && now.saturating_duration_since(candidate.since) < self.idle_timeout
            {
                return Some(candidate.sender);
            }
        }
        None
    }

    async fn connect(&self) -> Result<Connected, SendError> {
        let _pending = self.pending_slot()?;
        let permit = self.permit().await?;
        let stream = self.tcp().await?;
        let Some(tls) = &self.tls else {
            return if self.protocol == Protocol::Http2 {
                // h2c: HTTP/2 with prior knowledge on a plain connection.
                start_h2(stream, permit).await.map(Connected::H2)
            } else {
                start_h1(stream, permit).await.map(Connected::H1)
            };
        };
        let stream = self.handshake(tls, stream).await?;
        let h2 = match stream.get_ref().1.alpn_protocol() {
            Some(b"h2") => true,
            // No ALPN answer: `http2` means prior knowledge, else HTTP/1.1.
            None => self.protocol == Protocol::Http2,
            Some(_) => false,
        };
        if h2 {
            start_h2(stream, permit).await.map(Connected::H2)
        } else {
            start_h1(stream, permit).await.map(Connected::H1)
        }
    }

    /// Sends an upgrade request (WebSocket) on a connection of its own,
    /// never pooled and always HTTP/1.1 (`Upgrade` does not exist in
    /// HTTP/2). The connection is made for hyper to hand over on `101`; the
    /// returned permit counts it against `max_connections` for as long as
    /// the caller holds it (the tunnel's life, or the refusal's body).
    pub async fn send_upgrade(
        &self,
        request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, tokio::sync::OwnedSemaphorePermit), SendError> {
        let pending = self.pending_slot()?;
        let permit = self.permit().await?;
        let stream = self.tcp().await?;
        let mut sender = match &self.tls {
            None => start_upgradable(stream).await?,
            Some(tls) => {
                let stream = self.handshake(tls, stream).await?;
                if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                    let why = "chose HTTP/2 by ALPN; an upgrade needs HTTP/1.1 (set protocol = \"http1\")";
                    return Err(SendError::Connect(self.authority.clone(), why.to_owned()));
                }
                start_upgradable(stream).await?
            }
        };
        drop(pending);
        let response = sender.send_request(request).await?;
        Ok((response, permit))
    }

    /// A place among the upstream's pending connection attempts.
    fn pending_slot(&self) -> Result<PendingGuard, SendError> {
        self.pending.enter().ok_or_else(|| SendError::Overloaded(self.authority.clone(), self.pending.max))
    }

    /// A permit for one more open connection to this target, waiting up to
    /// the connect timeout when all are taken.
    async fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, SendError> {
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => Ok(permit),
            Err(_) => {
                // Full: an idle connection (on any worker) is worth less than
                // a request waiting; closing one frees its permit shortly.
                // Counted before the eviction: a connection put back in
                // between is either evicted here or closed by `put_back`.
                self.waiting_for_permit.fetch_add(1, Ordering::SeqCst);
                self.evict_one_idle();
                let waited =
                    tokio::time::timeout(self.connect_timeout, Arc::clone(&self.permits).acquire_owned())
                        .await;
                self.waiting_for_permit.fetch_sub(1, Ordering::SeqCst);
                match waited {
                    Ok(Ok(permit)) => Ok(permit),
                    // The semaphore is never closed; treat it as full if it were.
                    Err(_) | Ok(Err(_)) => Err(SendError::Busy(self.authority.clone(), self.max_connections)),
                }
            }
        }
    }

    /// A TCP connection to the target, within the connect timeout.
    async fn tcp(&self) -> Result<TcpStream, SendError> {
        let authority = &self.authority;
        let default_port = if self.tls.is_some() { 443 } else { 80 };
        let address = (authority.host(), authority.port_u16().unwrap_or(default_port));
        let stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(address)).await {
            Err(_) => return Err(SendError::ConnectTimeout(authority.clone(), self.connect_timeout)),
            Ok(Err(error)) => return Err(SendError::Connect(authority.clone(), error.to_string())),
            Ok(Ok(stream)) => stream,
        };
        // Small request/response exchanges must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// The TLS handshake on a new connection. It shares the connect
    /// timeout: a target that accepts TCP and never answers TLS costs no
    /// more than one that never answers.
    async fn handshake(
        &self,
        tls: &TargetTls,
        stream: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, SendError> {
        let authority = &self.authority;
        let handshake = tls.connector.connect(tls.name.clone(), stream);
        match tokio::time::timeout(self.connect_timeout, handshake).await {
            Err(_) => Err(SendError::ConnectTimeout(authority.clone(), self.connect_timeout)),
            Ok(Err(error)) => {
                let reason = crate::upstream_tls::rustls_reason(&error).unwrap_or_else(|| error.to_string());
                Err(SendError::Tls(authority.clone(), reason))
            }
            Ok(Ok(stream)) => Ok(stream),
        }
    }

    /// Closes the oldest idle connection of the first worker that has one.
    fn evict_one_idle(&self) {
        for list in &self.per_worker {
            let mut idle = list.lock().unwrap_or_else(PoisonError::into_inner);
            if !idle.is_empty() {
                // Dropped after the lock: the sender's drop ends the connection task.
                let oldest = idle.remove(0);
                drop(idle);
                drop(oldest);
                return;
            }
        }
    }

    fn lease(self: &Arc<Self>, sender: SendRequest<RequestBody>) -> Lease {
        Lease { sender: Some(sender), pool: Arc::clone(self), _permit: None }
    }

    fn put_back(&self, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle_list().lock().unwrap_or_else(PoisonError::into_inner);
        // Read under the lock the waiter's eviction also takes: a waiter
        // counted after this read finds the connection in the list.
        let wanted = self.waiting_for_permit.load(Ordering::SeqCst) > 0;
        if idle.len() < self.max_idle && !wanted {
            idle.push(Idle { sender, since: Instant::now() });
        } else {
            // Dropped after the lock: the connection ends, and its permit
            // goes to the waiter.
            drop(idle);
            drop(sender);
        }
    }
}

/// Starts an HTTP/1.1 connection on `io`. Its task runs on this worker's
/// runtime for its whole life and holds `permit` until it ends, idle or busy.
async fn start_h1<IO>(
    io: IO,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<SendRequest<RequestBody>, SendError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Vectored writes, unlike the server side (see `server.rs`): a request
    // body goes out as the chunks hyper read from the client, not copied
    // into one buffer first. Measured (alternating 4 s `wrk -t1 -c32`
    // runs, 5 rounds, CPU µs per request from /proc): POST 16 KiB 18.2
    // -> 16.7 and 17.9 -> 17.0 µs; small GETs unchanged within noise
    // (callgrind: +350 instructions, 0.75 %, for the one-slice `writev`).
    let (sender, connection) = http1::Builder::new().writev(true).handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream connection ended with an error");
        }
        drop(permit);
    });
    Ok(sender)
}

/// Starts an HTTP/1.1 connection for one upgrade request: hyper hands its
/// IO over to the response's `OnUpgrade` on `101` (the task then ends),
/// and the sender is dropped after that one request.
async fn start_upgradable<IO>(io: IO) -> Result<SendRequest<RequestBody>, SendError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upstream upgrade connection ended with an error");
        }
    });
    Ok(sender)
}

/// Starts an HTTP/2 connection on `io`, its task holding `permit` like an
/// HTTP/1.1 connection's.
async fn start_h2<IO>(
    io: IO,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<http2::SendRequest<RequestBody>, SendError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream HTTP/2 connection ended with an error");
        }
        drop(permit);
    });
    Ok(sender)
}

/// A connection in use by one response; back to the pool only if released.
/// An HTTP/2 lease holds no sender: its connection is never checked out.
pub struct Lease {
    sender: Option<SendRequest<RequestBody>>,
    pool: Arc<ConnPool>,
    /// A dedicated (upgrade) connection's `max_connections` permit, held
    /// while its response streams; pooled connections' tasks hold theirs.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Lease {
    /// The lease of a dedicated connection's response: never pooled, its
    /// permit (if the tunnel did not take it) given back when the response ends.
    pub fn dedicated(pool: &Arc<ConnPool>, permit: Option<tokio::sync::OwnedSemaphorePermit>) -> Self {
        Self { sender: None, pool: Arc::clone(pool), _permit: permit }
    }

    /// The response was read to its end: the connection can serve another.
    pub fn release(mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.put_back(sender);
        }
    }
}

/// Why an upstream response body ended before its end.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBodyError {
    /// Reset, closed short of its length, or malformed framing.
    #[error("reading the upstream body: {0}")]
    Read(#[source] hyper::Error),
    #[error("upstream body stalled for {0:?}")]
    Stalled(Duration),
}

/// An upstream response body that gives its connection back to the pool
/// once read to the end, and fails if the upstream pauses too long.
pub struct PooledBody {
    body: Incoming,
    lease: Option<Lease>,
    idle_timeout: Duration,
    /// Armed the first time the body has to wait: responses that arrive with
    /// their head (most small ones) never allocate a timer.
    stall: Option<Pin<Box<Sleep>>>,
    /// A frame arrived since the stall timer was last armed.
    moved: bool,
    /// The request counts as outstanding on its target until the body ends.
    in_flight: Option<InFlight>,
    /// The target that answered (its `host:port`), for the access log;
    /// a reference count, not a copy.
    target: Authority,
}

impl PooledBody {
    pub fn new(body: Incoming, lease: Lease, idle_timeout: Duration, in_flight: Option<InFlight>) -> Self {
        let target = lease.pool.authority().clone();
        let mut pooled =
            Self { body, lease: Some(lease), idle_timeout, stall: None, moved: false, in_flight, target };
        // An empty body (204, 304, HEAD) is already at its end.
        if pooled.body.is_end_stream() {
            pooled.release();
        }
        pooled
    }

    /// The target (`host:port`) this body comes from.
    pub fn target(&self) -> &Authority {
        &self.target
    }

    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
        self.in_flight = None;
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(None) => {
                this.release();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.moved = true;
                if this.body.is_end_stream() {
                    this.release();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            // The lease is dropped with the body, unreleased: the connection closes.
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(UpstreamBodyError::Read(error)))),
            Poll::Pending => {
                let idle = this.idle_timeout;
                match &mut this.stall {
                    None => this.stall = Some(Box::pin(tokio::time::sleep(idle))),
                    Some(timer) if this.moved => timer.as_mut().reset(Instant::now() + idle),
                    Some(_) => {}
                }
                this.moved = false;
                if let Some(timer) = &mut this.stall
                    && timer.as_mut().poll(cx).is_ready()
                {
                    // Never given back: a connection mid-body cannot serve another request.
                    this.lease = None;
                    return Poll::Ready(Some(Err(UpstreamBodyError::Stalled(idle))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
