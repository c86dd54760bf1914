//! Deadlines for every state a connection can be in, kept by one watchdog
//! per connection.
//!
//! hyper's own HTTP/1 header timer starts as soon as a connection is idle, so
//! it cannot tell "10 s to send a head" from "60 s of keep-alive", and hyper
//! has no idle timeout for HTTP/2 at all: a client that sent the preface and
//! SETTINGS and then nothing stayed open forever. So the connection counts
//! what happens on it ([`Activity`], a few relaxed atomic adds per read,
//! write and request), and [`drive`] polls the connection beside a ticking
//! watchdog that reads the counters:
//!
//! | state | ends when | deadline |
//! |---|---|---|
//! | waiting for the first request (since accept) | a request starts | `header_read_timeout` |
//! | idle between requests | a byte arrives (HTTP/1) / a stream opens | `idle_timeout` |
//! | HTTP/1 head begun after idle | the request starts | `header_read_timeout` |
//! | a response the client does not read | a write makes progress | `send_timeout` |
//!
//! Detection before hyper (first bytes, protocol) is bounded by the caller
//! with the same header timeout. An idle connection is shut down gracefully
//! (HTTP/2 gets a GOAWAY); a head or send deadline drops the connection at
//! once. A request waiting on its upstream is not idle: upstream deadlines
//! bound that. The watchdog ticks at a quarter of the shortest deadline, so a
//! deadline is kept to within that quarter, at one timer per connection.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::EdgeConfig;

/// What happened on one connection, as the watchdog needs to know it. Written
/// by the connection's IO and service, read by its watchdog; relaxed
/// ordering is enough, since each counter is only compared with itself.
#[derive(Debug, Default)]
pub struct Activity {
    /// Requests (HTTP/2: streams) whose response has not finished.
    in_flight: AtomicUsize,
    /// Requests started so far.
    started: AtomicU64,
    /// Reads that returned data.
    reads: AtomicU64,
    /// Writes that took data.
    writes: AtomicU64,
    /// The last write found the socket's send buffer full.
    write_blocked: AtomicBool,
    /// Upgraded (WebSocket) tunnels of this connection still open: the
    /// connection's task waits for them after hyper handed the socket over.
    tunnels: AtomicUsize,
    tunnel_closed: tokio::sync::Notify,
}

impl Activity {
    /// Counts a request as in flight until the returned guard is dropped
    /// (with the response body, once hyper has sent it or given up).
    pub fn request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.started.fetch_add(1, Ordering::Relaxed);
        RequestGuard(Arc::clone(self))
    }
}

impl Activity {
    /// Counts a tunnel as open until the returned hold is dropped.
    pub fn tunnel(self: &Arc<Self>) -> TunnelGuard {
        self.tunnels.fetch_add(1, Ordering::Relaxed);
        TunnelGuard(Arc::clone(self))
    }

    /// Whether a tunnel of this connection is open (its upgrade was taken).
    pub fn has_tunnels(&self) -> bool {
        self.tunnels.load(Ordering::Acquire) > 0
    }

    /// Resolves once no tunnel of this connection is open.
    pub async fn tunnels_closed(&self) {
        loop {
            let closed = self.tunnel_closed.notified();
            tokio::pin!(closed);
            // Registered before the count is read: a close in between wakes it.
            closed.as_mut().enable();
            if self.tunnels.load(Ordering::Acquire) == 0 {
                return;
            }
            closed.await;
        }
    }
}

/// An upgrade request's hold on its connection; see [`Activity::tunnel`].
#[derive(Debug)]
pub struct TunnelGuard(Arc<Activity>);

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.0.tunnels.fetch_sub(1, Ordering::AcqRel);
        self.0.tunnel_closed.notify_waiters();
    }
}

/// A request in flight; see [`Activity::request`].
#[derive(Debug)]
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted in flight until dropped.
pub struct Tracked<B> {
    body: B,
    _guard: RequestGuard,
}

impl<B> Tracked<B> {
    pub fn new(body: B, guard: RequestGuard) -> Self {
        Self { body, _guard: guard }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's stream, counting reads and writes into its [`Activity`].
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }

    fn wrote(&self, polled: &Poll<std::io::Result<usize>>) {
        match polled {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.activity.writes.fetch_add(1, Ordering::Relaxed);
                self.activity.write_blocked.store(false, Ordering::Relaxed);
            }
            Poll::Pending => self.activity.write_blocked.store(true, Ordering::Relaxed),
            _ => {}
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.reads.fetch_add(1, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&polled);
        polled
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

/// The deadlines one connection is held to.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub header_read: Duration,
    pub idle: Duration,
    pub send: Duration,
    /// HTTP/2 frames between streams (PING answers, SETTINGS) do not begin a
    /// request head the way an HTTP/1 byte does.
    pub http2: bool,
}

impl Deadlines {
    pub fn new(edge: &EdgeConfig, http2: bool) -> Self {
        Self {
            header_read: edge.header_read_timeout,
            idle: edge.idle_timeout,
            send: edge.send_timeout,
            http2,
        }
    }

    fn tick(&self) -> Duration {
        (self.header_read.min(self.idle).min(self.send) / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(5))
    }
}

/// Why the watchdog ended a connection (for the debug log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No complete request head within `header_read_timeout`.
    Head,
    /// Idle for `idle_timeout`; shut down gracefully.
    Idle,
    /// The client read nothing of a response for `send_timeout`.
    Send,
}

/// Where the connection stands, as the watchdog last saw it.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request head since `since` (accept, or the first byte
    /// after an idle spell). `started` is the request count then.
    Head {
        since: Instant,
        started: u64,
    },
    /// No request in flight since `since`; `reads` and `started` as then.
    Idle {
        since: Instant,
        reads: u64,
        started: u64,
    },
    Busy,
}

/// The watchdog's reading of [`Activity`], one tick after another.
struct Watchdog {
    deadlines: Deadlines,
    phase: Phase,
    /// Since when writes have been blocked without progress, and the write
    /// count then.
    stalled: Option<(Instant, u64)>,
}

impl Watchdog {
    fn new(deadlines: Deadlines, accepted: Instant) -> Self {
        Self { deadlines, phase: Phase::Head { since: accepted, started: 0 }, stalled: None }
    }

    /// Moves the phase on from what the counters say, and tells whether a
    /// deadline has passed.
    fn check(&mut self, activity: &Activity, now: Instant) -> Option<Expired> {
        let in_flight = activity.in_flight.load(Ordering::Relaxed);
        let started = activity.started.load(Ordering::Relaxed);
        let reads = activity.reads.load(Ordering::Relaxed);
        let writes = activity.writes.load(Ordering::Relaxed);

        // A response nobody reads, whatever the phase (a finished request's
        // last bytes may still be waiting in hyper's buffer).
        if activity.write_blocked.load(Ordering::Relaxed) {
            match self.stalled {
                Some((since, at)) if at == writes => {
                    if now.saturating_duration_since(since) >= self.deadlines.send {
                        return Some(Expired::Send);
                    }
                }
                _ => self.stalled = Some((now, writes)),
            }
        } else {
            self.stalled = None;
        }

        self.phase = match self.phase {
            _ if in_flight > 0 => Phase::Busy,
            Phase::Busy => Phase::Idle { since: now, reads, started },
            // A request came and went between two ticks.
            Phase::Head { started: then, .. } | Phase::Idle { started: then, .. } if started != then => {
                Phase::Idle { since: now, reads, started }
            }
            Phase::Idle { reads: then, .. } if reads != then && !self.deadlines.http2 => {
                Phase::Head { since: now, started }
            }
            phase => phase,
        };
        match self.phase {
            Phase::Head { since, .. }
                if now.saturating_duration_since(since) >= self.deadlines.header_read =>
            {
                Some(Expired::Head)
            }
            Phase::Idle { since, .. } if now.saturating_duration_since(since) >= self.deadlines.idle => {
                Some(Expired::Idle)
            }
            _ => None,
        }
    }
}

/// A served connection the watchdog can drive and ask to shut down
/// gracefully. hyper-util's `GracefulConnection` would do, but it has no
/// impl for hyper's HTTP/1 `UpgradeableConnection` (what serves WebSocket
/// upgrades) and is sealed, so the two kinds served are named here.
pub trait Served: std::future::Future<Output = Result<(), Self::Error>> {
    type Error;

    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, B, S> Served for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = hyper::Error;

    fn graceful_shutdown(self: Pin<&mut Self>) {
        // After an upgrade there is no HTTP connection left to shut down:
        // hyper makes this a no-op, and the tunnel has its own idle timeout.
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<I, B, S, E> Served for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    type Error = hyper::Error;

    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self);
    }
}

/// The admin listener's connections (HTTP/1.1 or HTTP/2, detected by hyper-util).
impl<I, B, S, E> Served for hyper_util::server::conn::auto::Connection<'_, I, S, E>
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper_util::server::conn::auto::Connection::graceful_shutdown(self);
    }
}

/// How a driven connection ended.
#[derive(Debug)]
pub enum Ended<E> {
    /// The connection finished (the client closed, or a graceful shutdown
    /// completed), with hyper's result.
    Closed(Result<(), E>),
    /// A deadline passed and the connection was dropped.
    Expired(Expired),
}

/// Polls `connection` until it ends, a deadline passes, or (after
/// `draining` turns true) a graceful shutdown completes. A graceful shutdown,
/// for the drain or for idleness, still has `send` to finish before the
/// connection is dropped.
pub async fn drive<C: Served>(
    connection: C,
    activity: &Activity,
    deadlines: Deadlines,
    mut draining: watch::Receiver<bool>,
) -> Ended<C::Error> {
    let accepted = Instant::now();
    let mut watchdog = Watchdog::new(deadlines, accepted);
    let mut connection = std::pin::pin!(connection);
    let mut ticks = tokio::time::interval_at(accepted + deadlines.tick(), deadlines.tick());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Once set, the connection has been asked to shut down and must be done by then.
    let mut shutdown_by: Option<Instant> = None;
    let mut drain_seen = *draining.borrow();
    if drain_seen {
        connection.as_mut().graceful_shutdown();
        shutdown_by = Some(accepted + deadlines.send);
    }
    loop {
        tokio::select! {
            ended = connection.as_mut() => return Ended::Closed(ended),
            now = ticks.tick() => {
                if shutdown_by.is_some_and(|by| now >= by) {
                    return Ended::Expired(Expired::Idle);
                }
                match watchdog.check(activity, now) {
                    Some(Expired::Idle) if shutdown_by.is_none() => {
                        connection.as_mut().graceful_shutdown();
                        shutdown_by = Some(now + deadlines.send);
                    }
                    Some(Expired::Idle) | None => {}
                    Some(expired) => return Ended::Expired(expired),
                }
            }
            changed = draining.changed(), if !drain_seen => {
                // Err: the server is gone, which also means drain.
                if changed.is_err() || *draining.borrow() {
                    drain_seen = true;
                    if shutdown_by.is_none() {
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn deadlines(http2: bool) -> Deadlines {
        Deadlines { header_read: 10 * SECOND, idle: 60 * SECOND, send: 30 * SECOND, http2 }
    }

    fn read(activity: &Activity) {
        activity.reads.fetch_add(1, Ordering::Relaxed);
    }

    #[test]
    fn a_connection_that_never_starts_a_request_expires_after_the_header_timeout() {
        let t0 = Instant::now();
        for http2 in [false, true] {
            let activity = Activity::default();
            let mut dog = Watchdog::new(deadlines(http2), t0);
            read(&activity); // a byte of a head, or a preface and SETTINGS
            assert_eq!(dog.check(&activity, t0 + 9 * SECOND), None);
            assert_eq!(dog.check(&activity, t0 + 10 * SECOND), Some(Expired::Head), "http2: {http2}");
        }
    }

    #[test]
    fn between_requests_the_idle_timeout_applies_then_a_new_head_has_the_header_timeout() {
        let t0 = Instant::now();
        let activity = Arc::new(Activity::default());
        let mut dog = Watchdog::new(deadlines(false), t0);
        let guard = activity.request();
        assert_eq!(dog.check(&activity, t0 + 5 * SECOND), None);
        // A long request is not idle and has no header deadline.
        assert_eq!(dog.check(&activity, t0 + 500 * SECOND), None);
        drop(guard);
        let done = t0 + 500 * SECOND;
        assert_eq!(dog.check(&activity, done), None);
        assert_eq!(dog.check(&activity, done + 59 * SECOND), None, "keep-alive idle is not a head");
        // The first byte of the next head starts the header deadline.
        read(&activity);
        assert_eq!(dog.check(&activity, done + 59 * SECOND), None);
        read(&activity); // a slow-loris byte: progress does not reset the deadline
        assert_eq!(dog.check(&activity, done + 68 * SECOND), None);
        assert_eq!(dog.check(&activity, done + 69 * SECOND), Some(Expired::Head));
    }

    #[test]
    fn an_idle_connection_expires_after_the_idle_timeout_and_http2_frames_do_not_reset_it() {
        let t0 = Instant::now();
        for http2 in [false, true] {
            let activity = Arc::new(Activity::default());
            let mut dog = Watchdog::new(deadlines(http2), t0);
            drop(activity.request());
            assert_eq!(dog.check(&activity, t0 + SECOND), None);
            if http2 {
                read(&activity); // a PING answer
            }
            assert_eq!(dog.check(&activity, t0 + 60 * SECOND), None, "http2: {http2}");
            assert_eq!(dog.check(&activity, t0 + 61 * SECOND), Some(Expired::Idle), "http2: {http2}");
        }
    }

    #[test]
    fn a_client_that_reads_nothing_of_its_response_expires_after_the_send_timeout() {
        let t0 = Instant::now();
        let activity = Arc::new(Activity::default());
        let mut dog = Watchdog::new(deadlines(false), t0);
        let _guard = activity.request();
        activity.write_blocked.store(true, Ordering::Relaxed);
        assert_eq!(dog.check(&activity, t0), None);
        assert_eq!(dog.check(&activity, t0 + 29 * SECOND), None);
        // Progress restarts the deadline.
        activity.writes.fetch_add(1, Ordering::Relaxed);
        assert_eq!(dog.check(&activity, t0 + 30 * SECOND), None);
        assert_eq!(dog.check(&activity, t0 + 59 * SECOND), None);
        assert_eq!(dog.check(&activity, t0 + 60 * SECOND), Some(Expired::Send));
    }
}
