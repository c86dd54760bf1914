//! WebSocket through the gateway: the HTTP/1.1 `Upgrade: websocket`
//! handshake forwarded on a connection of its own, then a byte tunnel.
//!
//! Clients on HTTP/2 open WebSockets with an extended CONNECT (RFC 8441:
//! `:method CONNECT`, `:protocol websocket`; the listener advertises
//! `SETTINGS_ENABLE_CONNECT_PROTOCOL`). The handler treats one as the GET
//! it stands for, so key, scope and limit checks see the same request as on
//! HTTP/1.1; upstream it becomes an ordinary HTTP/1.1 handshake (with a
//! `Sec-WebSocket-Key` of the gateway's, since RFC 8441 drops it), and the
//! upstream's `101` becomes the `200` that opens the client's stream. The
//! tunnel between the two is the same as for HTTP/1.1.
//!
//! The handler decides *whether* (only after key, scope and limits passed);
//! this module knows what a WebSocket handshake is, forwards it with the
//! `Upgrade`/`Connection` headers every other request loses, and once the
//! upstream has answered `101` copies bytes both ways until either side
//! closes or the tunnel carries nothing for `websocket_idle_timeout`. An
//! upstream answering anything else gets its answer passed on as an
//! ordinary response, and nothing is upgraded.
//!
//! The tunnel runs on a task of its own, outside the client connection's
//! watchdog (hyper hands the connection over on `101` and its HTTP
//! deadlines end there): the tunnel's own idle timeout is the only one.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Whether `request` is a WebSocket opening handshake (RFC 6455 §4.1) the
/// gateway will forward as one: `GET` over HTTP/1.1 with `Connection:
/// upgrade`, `Upgrade: websocket` and the `Sec-WebSocket-Key` and `-Version`
/// headers. Anything else is an ordinary request (its hop-by-hop headers,
/// `Upgrade` among them, removed).
///
/// Over HTTP/2: an extended CONNECT already read as a GET by
/// [`extended_connect_as_get`], with its `Sec-WebSocket-Version`.
pub fn is_websocket<B>(request: &Request<B>) -> bool {
    let headers = request.headers();
    if request.version() == Version::HTTP_2 {
        return request.method() == Method::GET
            && is_websocket_protocol(request)
            && headers.contains_key(header::SEC_WEBSOCKET_VERSION);
    }
    request.method() == Method::GET
        && request.version() == Version::HTTP_11
        && has_token(headers, header::CONNECTION, "upgrade")
        && has_token(headers, header::UPGRADE, "websocket")
        && headers.contains_key(header::SEC_WEBSOCKET_KEY)
        && headers.contains_key(header::SEC_WEBSOCKET_VERSION)
}

fn is_websocket_protocol<B>(request: &Request<B>) -> bool {
    request
        .extensions()
        .get::<hyper::ext::Protocol>()
        .is_some_and(|protocol| protocol.as_str().eq_ignore_ascii_case("websocket"))
}

/// An HTTP/2 extended CONNECT for a WebSocket (RFC 8441 §4) is the GET
/// handshake of HTTP/1.1 in another form (§5): read it as that GET, so
/// that routes' methods, the scope rule and the limits treat both alike.
/// Any other request is left as it is.
pub fn extended_connect_as_get<B>(request: &mut Request<B>) {
    if request.version() == Version::HTTP_2
        && request.method() == Method::CONNECT
        && is_websocket_protocol(request)
    {
        *request.method_mut() = Method::GET;
    }
}

/// Makes a handshake that arrived over HTTP/2 an HTTP/1.1 one for the
/// upstream: RFC 8441 carries no `Sec-WebSocket-Key`, and the upstream
/// needs one (it answers with its hash, which only this hop checks).
fn as_http1_handshake<B>(request: &mut Request<B>) {
    request.extensions_mut().remove::<hyper::ext::Protocol>();
    if !request.headers().contains_key(header::SEC_WEBSOCKET_KEY) {
        let nonce: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
        let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, nonce);
        if let Ok(key) = HeaderValue::from_str(&key) {
            request.headers_mut().insert(header::SEC_WEBSOCKET_KEY, key);
        }
    }
}

/// What the client is answered when the upstream switched protocols: the
/// `101` itself on HTTP/1.1; on HTTP/2 a `200` that opens the stream,
/// without the headers HTTP/2 forbids or RFC 8441 drops.
pub(super) fn answer_for_client<B>(response: &mut http::Response<B>, over_http2: bool) {
    let protocol = response.headers().get(header::UPGRADE).cloned();
    super::remove_hop_by_hop(response.headers_mut());
    if over_http2 {
        *response.status_mut() = http::StatusCode::OK;
        response.headers_mut().remove(header::SEC_WEBSOCKET_ACCEPT);
        return;
    }
    // The upstream's own `Upgrade` value and its `Sec-WebSocket-*` answer
    // go back; the rest of its hop-by-hop headers do not.
    restore_upgrade_headers(response.headers_mut());
    if let Some(protocol) = protocol {
        response.headers_mut().insert(header::UPGRADE, protocol);
    }
}

/// Prepares a handshake's request for the upstream: an HTTP/1.1 GET with
/// `Upgrade`, whichever HTTP the client spoke. Returns whether the client
/// spoke HTTP/2.
pub(super) fn for_upstream<B>(request: &mut Request<B>) -> bool {
    let over_http2 = request.version() == Version::HTTP_2;
    if over_http2 {
        as_http1_handshake(request);
    }
    *request.version_mut() = Version::HTTP_11;
    over_http2
}

/// Whether a comma-separated header lists `token` (case-insensitively).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Puts back, after the hop-by-hop headers were removed, the two that make
/// this hop an upgrade: exactly `Connection: upgrade` and `Upgrade:
/// websocket` (whatever else the client listed stays removed).
pub fn restore_upgrade_headers(headers: &mut HeaderMap) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

/// What keeps the client's connection counted while its tunnel runs (its
/// `max_connections` slot, and the drain waiting for it): the server puts
/// one in the extensions of every request that asks for an upgrade, and
/// the tunnel holds it until it closes. Opaque here, so that forwarding
/// knows nothing of the server above it. `Clone` because request
/// extensions must be; the hold ends when its last clone is dropped.
#[derive(Clone)]
pub struct ConnectionHold(#[allow(dead_code)] std::sync::Arc<dyn Send + Sync>);

impl ConnectionHold {
    pub fn new(hold: impl Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(hold))
    }
}

/// An upgrade both sides agreed to (the upstream answered `101`), waiting
/// for the client's `101` to be sent before bytes can flow.
pub struct Tunnel {
    pub(super) client: OnUpgrade,
    pub(super) upstream: OnUpgrade,
    pub(super) idle_timeout: Duration,
    /// The upstream connection's `max_connections` permit, for the tunnel's life.
    pub(super) permit: tokio::sync::OwnedSemaphorePermit,
    /// The tunnel counts as a request outstanding on its target for its
    /// life: `max_requests` caps tunnels too, and `least_outstanding` sees them.
    pub(super) in_flight: super::health::InFlight,
}

/// How a tunnel went, for usage and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelEnd {
    /// Bytes read from the client and sent upstream.
    pub bytes_in: u64,
    /// Bytes read from the upstream and sent to the client.
    pub bytes_out: u64,
    pub reason: TunnelClosed,
}

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelClosed {
    /// Both sides finished (each direction reached its end).
    Closed,
    /// No byte either way for `websocket_idle_timeout`.
    Idle,
    /// A read or write failed (a reset, a broken pipe).
    Error,
    /// hyper did not hand over a connection (the client went away before
    /// its `101` was written).
    NotUpgraded,
}

impl TunnelClosed {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Idle => "idle_timeout",
            Self::Error => "error",
            Self::NotUpgraded => "not_upgraded",
        }
    }
}

impl Tunnel {
    /// Copies bytes both ways until both directions end, one fails, or
    /// nothing moves for the idle timeout; then closes both connections.
    pub async fn run(self) -> TunnelEnd {
        let Self { client, upstream, idle_timeout, permit, in_flight } = self;
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(error) => {
                tracing::debug!(%error, "websocket upgrade not completed");
                return TunnelEnd { bytes_in: 0, bytes_out: 0, reason: TunnelClosed::NotUpgraded };
            }
        };
        let moved = Moved::default();
        let mut client = Counted { io: TokioIo::new(client), read: &moved.from_client };
        let mut upstream = Counted { io: TokioIo::new(upstream), read: &moved.from_upstream };
        let reason = {
            let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
            tokio::select! {
                copied = copy => match copied {
                    Ok(_) => TunnelClosed::Closed,
                    Err(error) => {
                        tracing::debug!(%error, "websocket tunnel ended with an error");
                        TunnelClosed::Error
                    }
                },
                () = idle(&moved, idle_timeout) => TunnelClosed::Idle,
            }
        };
        // Dropping both ends closes both connections (an idle tunnel's
        // peers see their sockets closed, not a WebSocket close frame: the
        // gateway does not speak the protocol inside).
        drop((client, upstream));
        drop((permit, in_flight));
        TunnelEnd {
            bytes_in: moved.from_client.load(Ordering::Relaxed),
            bytes_out: moved.from_upstream.load(Ordering::Relaxed),
            reason,
        }
    }
}

/// What has crossed the tunnel so far, read by its idle check.
#[derive(Debug, Default)]
struct Moved {
    from_client: AtomicU64,
    from_upstream: AtomicU64,
}

impl Moved {
    fn total(&self) -> u64 {
        self.from_client.load(Ordering::Relaxed) + self.from_upstream.load(Ordering::Relaxed)
    }
}

/// Resolves once no byte has moved either way for `limit`. It ticks at a
/// quarter of the limit (one timer per tunnel, not a reset per read), so the
/// limit is kept to within that quarter.
async fn idle(moved: &Moved, limit: Duration) {
    let tick = (limit / 4).max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = moved.total();
    let mut since = tokio::time::Instant::now();
    loop {
        let now = ticks.tick().await;
        let total = moved.total();
        if total != seen {
            (seen, since) = (total, now);
        } else if now.saturating_duration_since(since) >= limit {
            return;
        }
    }
}

/// One end of the tunnel, counting the bytes read from it.
struct Counted<'a, S> {
    io: S,
    read: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            self.read.fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake() -> http::request::Builder {
        Request::get("/chat")
            .header(header::CONNECTION, "keep-alive, Upgrade")
            .header(header::UPGRADE, "WebSocket")
            .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
    }

    #[test]
    fn only_a_complete_websocket_handshake_is_an_upgrade() {
        assert!(is_websocket(&handshake().body(()).unwrap()));
        let post = handshake().method(Method::POST).body(()).unwrap();
        assert!(!is_websocket(&post), "POST");
        let h2 = handshake().version(Version::HTTP_2).body(()).unwrap();
        assert!(!is_websocket(&h2), "HTTP/2 has no Upgrade");
        let mut other = handshake().body(()).unwrap();
        other.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!is_websocket(&other), "another protocol");
        for missing in [header::CONNECTION, header::SEC_WEBSOCKET_KEY, header::SEC_WEBSOCKET_VERSION] {
            let mut request = handshake().body(()).unwrap();
            request.headers_mut().remove(&missing);
            assert!(!is_websocket(&request), "without {missing}");
        }
    }

    #[test]
    fn the_upgrade_headers_are_put_back_alone() {
        let mut headers = HeaderMap::new();
        restore_upgrade_headers(&mut headers);
        assert_eq!(headers[header::CONNECTION], "upgrade");
        assert_eq!(headers[header::UPGRADE], "websocket");
    }
}
