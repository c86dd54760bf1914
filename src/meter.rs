//! The last phase of a request: counting it once its response has ended.
//!
//! Like pingora's logging phase, this runs after the response, off the path
//! that decides it: the response body is wrapped in a [`MeteredBody`] that
//! counts the bytes it streams and, when it ends (or the client goes away),
//! records usage and metrics exactly once, and writes the access line
//! (`access_log`), which only then knows `bytes_out` and the whole duration.
//! Recording touches only in-memory shards (the usage flusher writes to
//! Redis later, in batches) and the access line only a buffer (its writer
//! thread does the I/O).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::access_log::{self, Entry};
use crate::auth::Caller;
use crate::config::{Config, CredentialKind, RouteConfig, RouteTarget};
use crate::error::GatewayError;
use crate::usage::{self, UsageEvent, UsageRecorder};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the gateway answers with: the upstream's streaming body, or a body
/// the gateway made itself (errors, echo). Defined here, below the handler,
/// because metering wraps it.
pub type ResponseBody = http_body_util::Either<crate::proxy::PooledBody, http_body_util::Full<Bytes>>;

/// What is known about a request when its response head is ready.
pub struct Meter {
    pub recorder: Option<Arc<UsageRecorder>>,
    pub route: Option<Arc<RouteConfig>>,
    /// The verified caller; refused or public requests have none.
    pub caller: Option<Arc<Caller>>,
    pub status: u16,
    pub refusal: Option<usage::Refusal>,
    /// The request body's bytes read from the client so far, counted by
    /// [`crate::proxy::CountedBody`] and read when the response ends (by
    /// then the upload is over, or was cut short). `None`: no body.
    pub bytes_in: Option<Arc<AtomicU64>>,
    /// Usage credits the request spent at admission.
    pub credits: u64,
    pub upstream_latency: Option<Duration>,
    pub started: Instant,
    /// What the access line names besides the above; `None` when the
    /// access log is off (`[log] access = "off"`).
    pub access: Option<Access>,
    /// Counts the request in `keygate_requests_in_flight` until the meter
    /// is dropped: when the response body has ended, or its tunnel closed.
    pub in_flight: crate::metrics::InFlightRequest,
    /// The request's span (`[tracing]` on): it ends, and is queued for
    /// export, when the meter is dropped, so it covers the whole response.
    pub span: Option<Box<crate::otel::RequestSpan>>,
}

/// The request's facts only the access line needs, gathered by the handler.
/// Every field is moved or reference-counted, not copied.
pub struct Access {
    /// The config the request ran on: its `[log]` sink and format, and the
    /// key prefix and query parameter that redaction looks for.
    pub config: Arc<Config>,
    pub request_id: http::HeaderValue,
    pub method: http::Method,
    /// The canonical path; `None` when the request was refused before it
    /// had one (the URI's path is logged then).
    pub path: Option<String>,
    /// The URI as the client sent it, for its query.
    pub uri: http::Uri,
    pub user_agent: Option<http::HeaderValue>,
    /// The client's address (behind trusted proxies, the forwarded one).
    pub peer: std::net::IpAddr,
    /// The request reached its route's target (upstream or echo).
    pub forwarded: bool,
    /// The upstream target that answered.
    pub target: Option<http::uri::Authority>,
    /// The caller came with an access token: the line says `jwt`.
    pub via_token: bool,
}

impl Meter {
    /// Records an upgraded request (WebSocket) once its tunnel has closed:
    /// one request, with the tunnel's bytes each way and its whole duration;
    /// `ended` says how it closed.
    pub fn finish_tunnel(self, bytes_in: u64, bytes_out: u64, ended: &str) {
        let life = self.started.elapsed();
        self.finish(bytes_in, bytes_out, Some((life, ended)));
    }

    /// `tunnel_in`: bytes read from the client after an upgrade, on top of
    /// the request body's.
    fn finish(self, tunnel_in: u64, bytes_out: u64, tunnel: Option<(Duration, &str)>) {
        let route = self.route.as_deref().map_or(crate::metrics::NO_ROUTE, |r| r.path.as_str());
        let elapsed = self.started.elapsed();
        crate::metrics::record_request(route, self.status, elapsed);
        let bytes_in = self.bytes_in.as_ref().map_or(0, |read| read.load(Ordering::Relaxed)) + tunnel_in;
        if let Some(access) = &self.access {
            self.log(access, bytes_in, bytes_out, elapsed, tunnel.map(|(_, ended)| ended));
        }
        if let Some(recorder) = &self.recorder {
            let caller = self.caller.as_deref();
            recorder.record(&UsageEvent {
                client: caller.map(|c| c.client()),
                // A certificate caller has no key: counted for its client
                // (totals and routes), with no key series.
                key_id: caller.and_then(|c| c.key_id()),
                route,
                status: self.status,
                refusal: self.refusal,
                bytes_in,
                bytes_out,
                credits: self.credits,
                upstream_latency: self.upstream_latency,
                tunnel: tunnel.map(|(life, _)| life),
                at: jiff::Timestamp::now(),
            });
        }
    }

    /// Writes the request's access line.
    fn log(
        &self,
        access: &Access,
        bytes_in: u64,
        bytes_out: u64,
        elapsed: Duration,
        tunnel_end: Option<&str>,
    ) {
        let Some(sink) = access.config.log.access.as_deref() else { return };
        let caller = self.caller.as_deref();
        let route = self.route.as_deref();
        let query = access.uri.query().map(|query| access_log::redact_query(query, &access.config.keys));
        let upstream = route.filter(|_| access.forwarded).map(|route| match &route.target {
            RouteTarget::Upstream(name) => name.as_str(),
            RouteTarget::Echo => crate::config::ECHO_TARGET,
        });
        let entry = Entry {
            timestamp: jiff::Timestamp::now(),
            // A kept ID is visible ASCII, a made one hex: always a str.
            request_id: access.request_id.to_str().unwrap_or("-"),
            method: access.method.as_str(),
            path: access.path.as_deref().unwrap_or_else(|| access.uri.path()),
            query: query.as_deref(),
            status: self.status,
            route: route.map(|route| route.path.as_str()),
            upstream,
            target: access.target.as_ref().map(http::uri::Authority::as_str),
            client: caller.map(Caller::client),
            key_id: caller.and_then(Caller::key_id),
            credential: caller.map(|caller| match access.via_token {
                true => CredentialKind::Jwt.as_str(),
                false => caller.kind().as_str(),
            }),
            bytes_in,
            bytes_out,
            duration_us: elapsed.as_micros() as u64,
            upstream_us: self.upstream_latency.map(|latency| latency.as_micros() as u64),
            peer: access.peer,
            user_agent: access.user_agent.as_ref().and_then(|agent| agent.to_str().ok()),
            tunnel_end,
        };
        access_log::write(sink, access.config.log.access_format, &entry);
    }
}

/// The gateway's refusals as usage counts them.
pub fn refusal_of(error: &GatewayError) -> Option<usage::Refusal> {
    use crate::error::OAuthError;
    // Every variant named, so a new way to refuse a credential cannot be
    // left out of `refused_401` by a wildcard (an access token's refusal
    // once was).
    match error {
        GatewayError::MissingKey
        | GatewayError::MissingCertificate
        | GatewayError::KeyRejected(_)
        | GatewayError::TokenRejected(_)
        | GatewayError::TokenRequest(OAuthError::InvalidClient) => Some(usage::Refusal::Unauthorized),
        GatewayError::MissingScope(_) => Some(usage::Refusal::Forbidden),
        GatewayError::RateLimited { .. } => Some(usage::Refusal::RateLimited),
        GatewayError::QuotaExceeded { .. } => Some(usage::Refusal::QuotaExceeded),
        GatewayError::CreditsExhausted { .. } => Some(usage::Refusal::CreditsExhausted),
        GatewayError::NoRoute
        | GatewayError::BadPath(_)
        | GatewayError::BadHost(_)
        | GatewayError::TokenRequest(_)
        | GatewayError::StoreUnavailable(_)
        | GatewayError::TooManyAuthFailures { .. }
        | GatewayError::LookupsThrottled { .. }
        | GatewayError::CorruptRecord(_)
        | GatewayError::JwksUnavailable { .. }
        | GatewayError::UpstreamUnreachable { .. }
        | GatewayError::UpstreamTimeout { .. }
        | GatewayError::UpstreamBadResponse { .. }
        | GatewayError::UpstreamTls { .. }
        | GatewayError::UpstreamBusy { .. }
        | GatewayError::UpstreamOverloaded { .. }
        | GatewayError::BadRequestBody(_)
        | GatewayError::BodyTooLarge { .. }
        | GatewayError::RequestBodyTimeout { .. }
        | GatewayError::MethodNotAllowed(_)
        | GatewayError::TlsRequired
        | GatewayError::RedirectToHttps { .. }
        | GatewayError::Internal(_) => None,
    }
}

/// A response body that counts what it streams and meters the request when
/// it ends or is dropped.
pub struct MeteredBody {
    inner: ResponseBody,
    bytes_out: u64,
    meter: Option<Meter>,
}

impl MeteredBody {
    pub fn new(inner: ResponseBody, meter: Meter) -> Self {
        Self { inner, bytes_out: 0, meter: Some(meter) }
    }

    /// The (empty) body of a `101` whose request is metered when its
    /// tunnel closes ([`Meter::finish_tunnel`]), not when this body ends.
    pub fn unmetered(inner: ResponseBody) -> Self {
        Self { inner, bytes_out: 0, meter: None }
    }

    fn finish(&mut self) {
        if let Some(meter) = self.meter.take() {
            meter.finish(0, self.bytes_out, None);
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    /// `Either`'s boxed error: only the upstream's `Incoming` side can fail.
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Both halves of `ResponseBody` are `Unpin`, so no pin projection is needed.
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes_out += data.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // A body never polled to its end (HEAD, client gone, empty body that
        // hyper skips) is metered here, once.
        self.finish();
    }
}
