//! Prometheus metrics: what the gateway counts, and the text `/metrics` serves.
//!
//! The request path calls the free functions here ([`record_request`],
//! [`cache_hit`], [`refused`], ...); they write to one process-wide
//! [`Metrics`] and never fail. [`render`] encodes it for the admin listener's
//! `/metrics`.
//!
//! Crate choice: `prometheus-client` rather than `metrics` +
//! `metrics-exporter-prometheus`. It is four small crates instead of a recorder
//! stack (metrics-util, quanta, crossbeam, sketches), it needs no global
//! recorder installed before use (tests build their own [`Metrics`]), and its
//! handles are plain `Arc<Atomic>`s we can keep: after a route's first request
//! a call is one read-locked lookup by `&str` (no allocation) plus atomic adds;
//! the only lock taken per observation is the histogram's short mutex.
//!
//! Label cardinality is bounded by construction: `route` is a route's
//! configured path (never the request path), capped at [`MAX_ROUTES`] distinct
//! values (more are counted under `(other)`); `status` is an HTTP status code;
//! `kind` is an enum.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, PoisonError, RwLock};
use std::time::Duration;

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The `route` label for a request no route matched.
pub const NO_ROUTE: &str = "(none)";
/// The `route` label once [`MAX_ROUTES`] distinct routes have been seen.
pub const OTHER_ROUTE: &str = "(other)";
/// Distinct `route` label values kept. Routes come from the config, so this is
/// only reached by a config with very many routes, or reloaded very often with
/// new paths; it keeps `/metrics` bounded either way.
pub const MAX_ROUTES: usize = 512;

/// Why the gateway refused a request for its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    RateLimited,
    QuotaExceeded,
    CreditsExhausted,
}

impl Refusal {
    /// The `kind` label: the same codes as the error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::QuotaExceeded => "quota_exceeded",
            Self::CreditsExhausted => "credits_exhausted",
        }
    }
}

impl EncodeLabelValue for Refusal {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: Arc<str>,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusalLabels {
    kind: Refusal,
}

/// Why the edge closed or refused a connection: a `[server]` field name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EdgeLabels {
    limit: &'static str,
}

/// An open connection's listener kind and the protocol it speaks.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProtocolLabels {
    transport: &'static str,
    protocol: &'static str,
}

/// What a client connection speaks, once its first bytes (plain) or ALPN
/// (TLS) told: HTTP/1.1, HTTP/2, or after a `101` a WebSocket tunnel (a
/// WebSocket over HTTP/2 is a stream of an `http2` connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionProtocol {
    Http1,
    Http2,
    WebSocket,
}

impl ConnectionProtocol {
    const ALL: [Self; 3] = [Self::Http1, Self::Http2, Self::WebSocket];

    fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::WebSocket => "websocket",
        }
    }
}

/// The index of a (transport, protocol) pair in `Metrics::connections_by_protocol`.
fn protocol_slot(tls: bool, protocol: ConnectionProtocol) -> usize {
    usize::from(tls) * ConnectionProtocol::ALL.len() + protocol as usize
}

/// A TLS listener's certificate: the listener's configured address and the
/// certificate file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
struct CertLabels {
    listener: String,
    cert: String,
}

/// Why a TLS handshake failed (`tls::HandshakeFailure`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HandshakeLabels {
    reason: &'static str,
}

/// One JWKS fetch of an external token issuer: its `iss` (from the
/// config, so bounded) and how it went (`ok`, `failed`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct JwksFetchLabels {
    issuer: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IssuerLabels {
    issuer: String,
}

/// One upstream target: the upstream's name and the target's `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TargetLabels {
    upstream: String,
    target: String,
}

/// What the process runs (`build_info`): one series, always 1.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

/// A circuit breaker's refusal: the upstream and the `[upstream.NAME]`
/// field whose cap was full.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OverloadLabels {
    upstream: String,
    limit: &'static str,
}

/// One target's handles, held by its health state so the request path
/// updates them with plain atomic adds (no label lookup).
#[derive(Debug, Clone)]
pub struct TargetSeries {
    labels: TargetLabels,
    pub healthy: Gauge,
    pub outstanding: Gauge,
    pub ejections: Counter,
    pub failures: Counter,
    pub requests: Counter,
    pub duration: Histogram,
}

/// One upstream's handles, held by its pool.
#[derive(Debug, Clone)]
pub struct UpstreamSeries {
    pub retries: Counter,
    pub retries_refused: Counter,
    pub panics: Counter,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 0.5 ms to about 16 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadLabels {
    /// `ok` or `refused` (the running config stayed).
    result: &'static str,
}

/// Every metric the gateway exports, registered in its own registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RouteLabels>,
    cache_hits: Counter,
    cache_misses: Counter,
    redis_errors: Counter,
    redis_latency: Histogram,
    refusals: Family<RefusalLabels, Counter>,
    usage_flush_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    usage_dropped: Counter,
    access_log_dropped: Counter,
    connections_refused: Family<EdgeLabels, Counter>,
    connections_expired: Family<EdgeLabels, Counter>,
    connections_open: Gauge,
    /// Every (transport, protocol) pair's gauge, made at start: a
    /// connection changes one with an atomic add, no label lookup.
    connections_by_protocol: [Gauge; 6],
    requests_in_flight: Gauge,
    auth_failures: Counter,
    auth_failures_refused: Counter,
    store_lookups_throttled: Counter,
    cache_refreshes: Counter,
    tls_handshake_failures: Family<HandshakeLabels, Counter>,
    /// Seconds until each listener certificate expires, computed from
    /// `tls_not_after` when the page is rendered (a stored countdown would
    /// go stale between reloads).
    tls_expiry: Family<CertLabels, Gauge>,
    target_healthy: Family<TargetLabels, Gauge>,
    target_outstanding: Family<TargetLabels, Gauge>,
    target_ejections: Family<TargetLabels, Counter>,
    target_failures: Family<TargetLabels, Counter>,
    target_requests: Family<TargetLabels, Counter>,
    target_duration: HistogramFamily<TargetLabels>,
    upstream_retries: Family<UpstreamLabels, Counter>,
    upstream_retries_refused: Family<UpstreamLabels, Counter>,
    upstream_panics: Family<UpstreamLabels, Counter>,
    upstream_overloaded: Family<OverloadLabels, Counter>,
    jwks_fetches: Family<JwksFetchLabels, Counter>,
    jwks_keys: Family<IssuerLabels, Gauge>,
    reloads: Family<ReloadLabels, Counter>,
    usage_flush_failures: Counter,
    pubsub_subscribed: Gauge,
    /// Each certificate's expiry (Unix seconds) by the id of the listener
    /// that loaded it (two listeners, or two gateways in one test process,
    /// may share an address label such as `127.0.0.1:0`); replaced per
    /// listener when its certificates load. A std Mutex: nothing awaits
    /// while it is held.
    tls_not_after: std::sync::Mutex<std::collections::BTreeMap<(u64, CertLabels), i64>>,
    /// Handles per route, found by `&str` without allocating. A std RwLock:
    /// nothing awaits while it is held, and writes happen once per new route.
    routes: RwLock<HashMap<Box<str>, Arc<RouteSeries>, foldhash::fast::RandomState>>,
}

/// One route's handles into the families above.
struct RouteSeries {
    label: Arc<str>,
    duration: Histogram,
    /// `(status, counter)`: a route sees a handful of statuses, so a short
    /// vector beats a map.
    statuses: RwLock<Vec<(u16, Counter)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keygate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route (the configured path) and status",
            requests.clone(),
        );
        let request_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers, by route",
            request_duration.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "key_cache_hits",
            "Key verifications answered from the in-process cache",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        registry.register("key_cache_misses", "Key verifications that asked the store", cache_misses.clone());
        let redis_errors = Counter::default();
        registry.register("redis_errors", "Redis calls that failed or timed out", redis_errors.clone());
        let redis_latency = latency_histogram();
        registry.register("redis_latency_seconds", "Redis round-trip time", redis_latency.clone());
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "refused",
            "Requests refused by rate limit, quota or credits, by kind",
            refusals.clone(),
        );
        let usage_flush_lag = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "usage_flush_lag_seconds",
            "Age of the oldest usage not yet flushed to Redis at the last flush",
            usage_flush_lag.clone(),
        );
        let usage_dropped = Counter::default();
        registry.register(
            "usage_dropped",
            "Usage records dropped because the buffer for an unreachable Redis was full",
            usage_dropped.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped_lines",
            "Access log lines dropped because the writer was behind (buffer full) or the destination failed",
            access_log_dropped.clone(),
        );
        let connections_refused = Family::<EdgeLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed at accept because a cap was full, by the cap's [server] field",
            connections_refused.clone(),
        );
        let connections_expired = Family::<EdgeLabels, Counter>::default();
        registry.register(
            "connections_expired",
            "Connections closed by a deadline, by the deadline's [server] field",
            connections_expired.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Client connections open on the public listener, all workers together",
            connections_open.clone(),
        );
        let by_protocol = Family::<ProtocolLabels, Gauge>::default();
        registry.register(
            "connections_open_by_protocol",
            "Client connections open on the public listener once their protocol is known, by \
             transport (plain, tls) and protocol (http1, http2, websocket: an HTTP/1.1 connection \
             upgraded to a WebSocket tunnel), all workers together",
            by_protocol.clone(),
        );
        let connections_by_protocol = std::array::from_fn(|slot| {
            let tls = slot >= ConnectionProtocol::ALL.len();
            let protocol = ConnectionProtocol::ALL[slot % ConnectionProtocol::ALL.len()];
            let labels =
                ProtocolLabels { transport: if tls { "tls" } else { "plain" }, protocol: protocol.as_str() };
            by_protocol.get_or_create(&labels).clone()
        });
        let requests_in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests on the public listener from their arrival until their response body ended \
             (or their WebSocket tunnel closed), all workers together",
            requests_in_flight.clone(),
        );
        let auth_failures = Counter::default();
        registry.register(
            "auth_failures",
            "Keyed requests whose key was rejected (malformed, unknown, client mismatch, expired, \
             revoked); each counts against its source IP's failure budget",
            auth_failures.clone(),
        );
        let auth_failures_refused = Counter::default();
        registry.register(
            "auth_failures_refused",
            "Keyed requests answered 429 without verification: their source IP was over its \
             failed-authentication budget (keys.auth_failures_per_ip)",
            auth_failures_refused.clone(),
        );
        let store_lookups_throttled = Counter::default();
        registry.register(
            "store_lookups_throttled",
            "Keys not in the cache answered 503 without a store lookup: the global cap \
             keys.store_lookups_per_second was reached",
            store_lookups_throttled.clone(),
        );
        let cache_refreshes = Counter::default();
        registry.register(
            "key_cache_refreshes",
            "Cached keys re-checked with the store in the background after an invalidation of \
             everything, while still being served",
            cache_refreshes.clone(),
        );
        let tls_handshake_failures = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed on a TLS listener, by reason (not_tls: plain HTTP or other \
             bytes sent to a TLS port; refused: an old version or nothing in common; \
             client_certificate; timeout; io)",
            tls_handshake_failures.clone(),
        );
        let tls_expiry = Family::<CertLabels, Gauge>::default();
        registry.register(
            "tls_certificate_expiry_seconds",
            "Seconds until a TLS listener's certificate expires (negative once expired), by listener \
             address and certificate file",
            tls_expiry.clone(),
        );
        let target_healthy = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "upstream_target_healthy",
            "1 while an upstream target is in rotation, 0 while it is ejected (passive health) or \
             failing its health checks",
            target_healthy.clone(),
        );
        let target_outstanding = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "upstream_target_outstanding",
            "Requests sent to an upstream target whose response has not ended",
            target_outstanding.clone(),
        );
        let target_ejections = Family::<TargetLabels, Counter>::default();
        registry.register(
            "upstream_target_ejections",
            "Times an upstream target was ejected by passive health (consecutive failures)",
            target_ejections.clone(),
        );
        let target_requests = Family::<TargetLabels, Counter>::default();
        registry.register(
            "upstream_target_requests",
            "Requests sent to an upstream target (retries included), by upstream and target",
            target_requests.clone(),
        );
        let target_duration: HistogramFamily<TargetLabels> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "upstream_target_duration_seconds",
            "Time from sending a request to an upstream target until its response body ended (or \
             the exchange failed), by upstream and target",
            target_duration.clone(),
        );
        let target_failures = Family::<TargetLabels, Counter>::default();
        registry.register(
            "upstream_target_failures",
            "Exchanges with an upstream target that failed (connect error, reset, timeout, or a 5xx \
             counted by passive health)",
            target_failures.clone(),
        );
        let upstream_retries = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_retries",
            "Requests sent again to another target after a failed attempt",
            upstream_retries.clone(),
        );
        let upstream_retries_refused = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_retries_refused",
            "Failed attempts not retried because the upstream's retry budget was spent",
            upstream_retries_refused.clone(),
        );
        let upstream_panics = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_panic_picks",
            "Requests sent to an out-of-rotation target because every target of the upstream was out \
             (panic mode: the least recently failed one)",
            upstream_panics.clone(),
        );
        let upstream_overloaded = Family::<OverloadLabels, Counter>::default();
        registry.register(
            "upstream_overloaded",
            "Requests answered 503 by an upstream's circuit breaker, by the cap that was full \
             (max_requests, max_pending)",
            upstream_overloaded.clone(),
        );
        let jwks_fetches = Family::<JwksFetchLabels, Counter>::default();
        registry.register(
            "jwks_fetches",
            "Fetches of an external token issuer's JWKS ([[jwt.issuer]]), scheduled or for an unknown \
             kid, by issuer and outcome (ok, failed: the keys already loaded are kept)",
            jwks_fetches.clone(),
        );
        let jwks_keys = Family::<IssuerLabels, Gauge>::default();
        registry.register(
            "jwks_keys",
            "Usable keys loaded from an external token issuer's JWKS (0: its tokens get 503 \
             jwks_unavailable)",
            jwks_keys.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads (SIGHUP, POST /admin/reload) by result: ok, or refused (invalid file; the \
             running config stayed)",
            reloads.clone(),
        );
        let usage_flush_failures = Counter::default();
        registry.register(
            "usage_flush_failures",
            "Usage flushes to Redis that failed (the counts are kept and retried)",
            usage_flush_failures.clone(),
        );
        let pubsub_subscribed = Gauge::default();
        registry.register(
            "store_pubsub_subscribed",
            "1 while the store's invalidation subscription (Redis pub/sub) is up, 0 while it is \
             being re-established (invalidations may be late); 0 with the file store",
            pubsub_subscribed.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        // One series for the process's life: a dashboard joins on it to show
        // which version and commit each instance runs (as Prometheus's own
        // `prometheus_build_info` does).
        build_info
            .get_or_create(&BuildLabels {
                version: crate::build_info::VERSION,
                commit: crate::build_info::COMMIT,
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; its labels are the keygate version and the git commit it was built from",
            build_info,
        );
        Self {
            registry,
            reloads,
            usage_flush_failures,
            pubsub_subscribed,
            jwks_fetches,
            jwks_keys,
            target_healthy,
            target_outstanding,
            target_ejections,
            target_failures,
            target_requests,
            target_duration,
            upstream_retries,
            upstream_retries_refused,
            upstream_panics,
            upstream_overloaded,
            tls_handshake_failures,
            tls_expiry,
            tls_not_after: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            connections_refused,
            connections_expired,
            connections_open,
            connections_by_protocol,
            requests_in_flight,
            auth_failures,
            auth_failures_refused,
            store_lookups_throttled,
            cache_refreshes,
            requests,
            request_duration,
            cache_hits,
            cache_misses,
            redis_errors,
            redis_latency,
            refusals,
            usage_flush_lag,
            usage_dropped,
            access_log_dropped,
            routes: RwLock::new(HashMap::default()),
        }
    }

    pub fn connection_refused(&self, limit: &'static str) {
        self.connections_refused.get_or_create(&EdgeLabels { limit }).inc();
    }

    pub fn connection_opened(&self) {
        self.connections_open.inc();
    }

    pub fn connection_closed(&self) {
        self.connections_open.dec();
    }

    pub fn connection_expired(&self, limit: &'static str) {
        self.connections_expired.get_or_create(&EdgeLabels { limit }).inc();
    }

    /// Counts one answered request and observes its latency.
    pub fn record_request(&self, route: &str, status: u16, duration: Duration) {
        let series = self.route_series(route);
        series.duration.observe(duration.as_secs_f64());
        let found = {
            let statuses = series.statuses.read().unwrap_or_else(PoisonError::into_inner);
            statuses.iter().find(|(s, _)| *s == status).map(|(_, counter)| counter.clone())
        };
        let counter = found.unwrap_or_else(|| {
            let mut statuses = series.statuses.write().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, counter)) = statuses.iter().find(|(s, _)| *s == status) {
                return counter.clone();
            }
            let labels = RequestLabels { route: Arc::clone(&series.label), status };
            let counter = self.requests.get_or_create_owned(&labels);
            statuses.push((status, counter.clone()));
            counter
        });
        counter.inc();
    }

    fn route_series(&self, route: &str) -> Arc<RouteSeries> {
        if let Some(series) = self.routes.read().unwrap_or_else(PoisonError::into_inner).get(route) {
            return Arc::clone(series);
        }
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = routes.get(route) {
            return Arc::clone(series);
        }
        let route = if routes.len() >= MAX_ROUTES { OTHER_ROUTE } else { route };
        if let Some(series) = routes.get(route) {
            return Arc::clone(series);
        }
        let label: Arc<str> = Arc::from(route);
        let duration = self.request_duration.get_or_create_owned(&RouteLabels { route: Arc::clone(&label) });
        let series = Arc::new(RouteSeries { label, duration, statuses: RwLock::new(Vec::new()) });
        routes.insert(route.into(), Arc::clone(&series));
        series
    }

    pub fn cache_hit(&self) {
        self.cache_hits.inc();
    }

    pub fn cache_miss(&self) {
        self.cache_misses.inc();
    }

    pub fn redis_error(&self) {
        self.redis_errors.inc();
    }

    pub fn redis_latency(&self, duration: Duration) {
        self.redis_latency.observe(duration.as_secs_f64());
    }

    pub fn refused(&self, kind: Refusal) {
        self.refusals.get_or_create(&RefusalLabels { kind }).inc();
    }

    pub fn auth_failure(&self) {
        self.auth_failures.inc();
    }

    pub fn auth_failures_refused(&self) {
        self.auth_failures_refused.inc();
    }

    pub fn store_lookup_throttled(&self) {
        self.store_lookups_throttled.inc();
    }

    pub fn cache_refresh(&self) {
        self.cache_refreshes.inc();
    }

    pub fn usage_flush_lag(&self, lag: Duration) {
        self.usage_flush_lag.set(lag.as_secs_f64());
    }

    pub fn usage_dropped(&self, n: u64) {
        self.usage_dropped.inc_by(n);
    }

    pub fn access_log_dropped(&self, n: u64) {
        self.access_log_dropped.inc_by(n);
    }

    pub fn tls_handshake_failed(&self, reason: &'static str) {
        self.tls_handshake_failures.get_or_create(&HandshakeLabels { reason }).inc();
    }

    /// Replaces what is known of listener `id`'s certificates (labelled
    /// `listener`): `(file, expiry)`.
    pub fn tls_certificates(&self, id: u64, listener: &str, certs: impl IntoIterator<Item = (String, i64)>) {
        let mut known = self.tls_not_after.lock().unwrap_or_else(PoisonError::into_inner);
        known.retain(|(owner, _), _| *owner != id);
        for (cert, not_after) in certs {
            known.insert((id, CertLabels { listener: listener.to_owned(), cert }), not_after);
        }
    }

    pub fn target_series(&self, upstream: &str, target: &str) -> TargetSeries {
        let labels = TargetLabels { upstream: upstream.to_owned(), target: target.to_owned() };
        TargetSeries {
            healthy: self.target_healthy.get_or_create_owned(&labels),
            outstanding: self.target_outstanding.get_or_create_owned(&labels),
            ejections: self.target_ejections.get_or_create_owned(&labels),
            failures: self.target_failures.get_or_create_owned(&labels),
            requests: self.target_requests.get_or_create_owned(&labels),
            duration: self.target_duration.get_or_create_owned(&labels),
            labels,
        }
    }

    /// Drops a target's series once no config has it any more.
    pub fn forget_target(&self, series: &TargetSeries) {
        self.target_healthy.remove(&series.labels);
        self.target_outstanding.remove(&series.labels);
        self.target_ejections.remove(&series.labels);
        self.target_failures.remove(&series.labels);
        self.target_requests.remove(&series.labels);
        self.target_duration.remove(&series.labels);
    }

    pub fn upstream_series(&self, upstream: &str) -> UpstreamSeries {
        let labels = UpstreamLabels { upstream: upstream.to_owned() };
        UpstreamSeries {
            retries: self.upstream_retries.get_or_create_owned(&labels),
            retries_refused: self.upstream_retries_refused.get_or_create_owned(&labels),
            panics: self.upstream_panics.get_or_create_owned(&labels),
        }
    }

    pub fn upstream_overloaded(&self, upstream: &str, limit: &'static str) {
        self.upstream_overloaded
            .get_or_create(&OverloadLabels { upstream: upstream.to_owned(), limit })
            .inc();
    }

    /// One JWKS fetch of `issuer` and, if it succeeded, how many keys it holds now.
    pub fn jwks_fetched(&self, issuer: &str, keys: Option<usize>) {
        let outcome = if keys.is_some() { "ok" } else { "failed" };
        self.jwks_fetches.get_or_create(&JwksFetchLabels { issuer: issuer.to_owned(), outcome }).inc();
        let gauge = self.jwks_keys.get_or_create(&IssuerLabels { issuer: issuer.to_owned() });
        if let Some(keys) = keys {
            gauge.set(i64::try_from(keys).unwrap_or(i64::MAX));
        }
    }

    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "refused" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    pub fn usage_flush_failed(&self) {
        self.usage_flush_failures.inc();
    }

    pub fn pubsub_subscribed(&self, up: bool) {
        self.pubsub_subscribed.set(i64::from(up));
    }

    /// The OpenMetrics text exposition (Prometheus scrapes it as is),
    /// without the process metrics ([`render`] adds them).
    pub fn render(&self) -> String {
        {
            let now = jiff::Timestamp::now().as_second();
            let known = self.tls_not_after.lock().unwrap_or_else(PoisonError::into_inner);
            // Cleared first: a certificate no longer configured disappears.
            self.tls_expiry.clear();
            for ((_, labels), not_after) in known.iter() {
                self.tls_expiry.get_or_create(labels).set(not_after - now);
            }
        }
        let mut text = String::new();
        // Writing into a String cannot fail; an encoder error would only mean
        // a bug in a metric's encoding, and a partial page is still useful.
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "encoding metrics failed");
        }
        text
    }
}

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

// === The process-wide metrics, for the request path ===

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Counts one answered request by its route's configured path (or
/// [`NO_ROUTE`]) and status, and observes its duration.
pub fn record_request(route: &str, status: u16, duration: Duration) {
    METRICS.record_request(route, status, duration);
}

/// A key verification answered from the in-process cache.
/// A connection refused at accept: `limit` is the `[server]` cap that was full.
pub fn connection_refused(limit: &'static str) {
    METRICS.connection_refused(limit);
}

/// A client connection was admitted (counted until [`connection_closed`]).
pub fn connection_opened() {
    METRICS.connection_opened();
}

pub fn connection_closed() {
    METRICS.connection_closed();
}

/// A connection closed by the `[server]` deadline `limit`.
pub fn connection_expired(limit: &'static str) {
    METRICS.connection_expired(limit);
}

pub fn cache_hit() {
    METRICS.cache_hit();
}

/// A key verification that had to ask the store.
pub fn cache_miss() {
    METRICS.cache_miss();
}

/// A Redis call failed or timed out.
pub fn redis_error() {
    METRICS.redis_error();
}

/// One Redis round trip took `duration`.
pub fn redis_latency(duration: Duration) {
    METRICS.redis_latency(duration);
}

/// A request refused by rate limit or quota.
pub fn refused(kind: Refusal) {
    METRICS.refused(kind);
}

/// A keyed request whose key was rejected.
pub fn auth_failure() {
    METRICS.auth_failure();
}

/// A keyed request refused unverified: its source is over its failure budget.
pub fn auth_failures_refused() {
    METRICS.auth_failures_refused();
}

/// A store lookup for an uncached key refused by the global cap.
pub fn store_lookup_throttled() {
    METRICS.store_lookup_throttled();
}

/// A cached key re-checked in the background after an epoch bump.
pub fn cache_refresh() {
    METRICS.cache_refresh();
}

/// At a usage flush: the age of the oldest usage it wrote.
pub fn usage_flush_lag(lag: Duration) {
    METRICS.usage_flush_lag(lag);
}

/// `n` usage records dropped (buffer full while Redis was unreachable).
pub fn usage_dropped(n: u64) {
    METRICS.usage_dropped(n);
}

/// `n` access log lines dropped (the writer behind, or its file failing).
pub fn access_log_dropped(n: u64) {
    METRICS.access_log_dropped(n);
}

/// A TLS handshake failed for `reason` (`tls::HandshakeFailure::as_str`).
pub fn tls_handshake_failed(reason: &'static str) {
    METRICS.tls_handshake_failed(reason);
}

/// The certificates listener `id` (labelled `listener`) serves now, for the
/// expiry gauge.
pub fn tls_certificates(id: u64, listener: &str, certs: &[crate::tls::certs::LoadedCert]) {
    METRICS.tls_certificates(id, listener, certs.iter().map(|c| (c.path.display().to_string(), c.not_after)));
}

/// The process-wide metrics as Prometheus text.
pub fn jwks_fetched(issuer: &str, keys: Option<usize>) {
    METRICS.jwks_fetched(issuer, keys);
}

pub fn render() -> String {
    render_as(Exposition::OpenMetrics)
}

/// `/metrics` in the format the scraper asked for, with the process
/// metrics (`process_*`, as every Prometheus client library names them).
pub fn render_as(format: Exposition) -> String {
    let mut text = METRICS.render();
    let process = crate::process_metrics::render();
    // Before OpenMetrics' closing `# EOF`.
    match text.strip_suffix("# EOF\n") {
        Some(body) => text = format!("{body}{process}# EOF\n"),
        None => text.push_str(&process),
    }
    match format {
        Exposition::OpenMetrics => text,
        Exposition::Prometheus004 => crate::exposition::to_text_004(&text),
    }
}

/// Counts a connection under its protocol until dropped ([`connection_serving`]).
#[derive(Debug)]
pub struct ProtocolConnection {
    slot: usize,
}

impl ProtocolConnection {
    /// The connection now speaks `protocol` (an upgrade to a WebSocket).
    pub fn switch(&mut self, tls: bool, protocol: ConnectionProtocol) {
        let slot = protocol_slot(tls, protocol);
        METRICS.connections_by_protocol[slot].inc();
        METRICS.connections_by_protocol[self.slot].dec();
        self.slot = slot;
    }
}

impl Drop for ProtocolConnection {
    fn drop(&mut self) {
        METRICS.connections_by_protocol[self.slot].dec();
    }
}

/// A connection (over TLS or not) speaks `protocol`: counted in
/// `keygate_connections_open_by_protocol` until the returned value is dropped.
pub fn connection_serving(tls: bool, protocol: ConnectionProtocol) -> ProtocolConnection {
    let slot = protocol_slot(tls, protocol);
    METRICS.connections_by_protocol[slot].inc();
    ProtocolConnection { slot }
}

/// Counts a request in flight until it is dropped ([`request_started`]).
#[derive(Debug)]
pub struct InFlightRequest(());

impl Drop for InFlightRequest {
    fn drop(&mut self) {
        METRICS.requests_in_flight.dec();
    }
}

/// A request arrived: in flight until the answer dropped is.
pub fn request_started() -> InFlightRequest {
    METRICS.requests_in_flight.inc();
    InFlightRequest(())
}

/// A config reload ended: installed (`ok`) or refused.
pub fn config_reload(ok: bool) {
    METRICS.config_reload(ok);
}

/// A usage flush to Redis failed.
pub fn usage_flush_failed() {
    METRICS.usage_flush_failed();
}

/// The invalidation subscription came up (`true`) or went down.
pub fn pubsub_subscribed(up: bool) {
    METRICS.pubsub_subscribed(up);
}

/// The two exposition formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// OpenMetrics 1.0 (`application/openmetrics-text`): the default.
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (`text/plain; version=0.0.4`), for
    /// scrapers that ask for it (older Prometheus, many agents).
    Prometheus004,
}

impl Exposition {
    /// The format an `Accept` header asks for: text 0.0.4 when it prefers
    /// `text/plain` to OpenMetrics (by `q`), OpenMetrics otherwise (no
    /// header, `*/*`, or OpenMetrics preferred, as Prometheus sends).
    pub fn negotiate(accept: Option<&str>) -> Self {
        let (mut openmetrics, mut text) = (0.0_f32, 0.0_f32);
        for range in accept.unwrap_or("").split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let mut q = 1.0_f32;
            let mut version = None;
            for param in parts {
                match param.split_once('=').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim())) {
                    Some((k, v)) if k == "q" => q = v.parse().unwrap_or(0.0),
                    Some((k, v)) if k == "version" => version = Some(v.to_owned()),
                    _ => {}
                }
            }
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" if version.as_deref().is_none_or(|v| v == "0.0.4") => text = text.max(q),
                _ => {}
            }
        }
        if text > openmetrics { Self::Prometheus004 } else { Self::OpenMetrics }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => CONTENT_TYPE,
            Self::Prometheus004 => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The handles of one upstream target's series (see [`TargetSeries`]).
pub fn target_series(upstream: &str, target: &str) -> TargetSeries {
    METRICS.target_series(upstream, target)
}

/// Removes a target's series: its health state is gone with the last config naming it.
pub fn forget_target(series: &TargetSeries) {
    METRICS.forget_target(series);
}

/// The handles of one upstream's retry series.
pub fn upstream_series(upstream: &str) -> UpstreamSeries {
    METRICS.upstream_series(upstream)
}

/// A request refused by `upstream`'s circuit breaker: `limit` was full.
pub fn upstream_overloaded(upstream: &str, limit: &'static str) {
    METRICS.upstream_overloaded(upstream, limit);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no `{prefix}` in\n{text}"))
    }

    #[test]
    fn certificate_expiry_is_seconds_left_per_listener_and_replaced_when_its_certificates_reload() {
        let metrics = Metrics::new();
        let now = jiff::Timestamp::now().as_second();
        // Two listeners (ids) with the same address label each keep theirs.
        metrics.tls_certificates(1, "0.0.0.0:443", [("a.pem".to_owned(), now + 86_400)]);
        metrics.tls_certificates(2, "0.0.0.0:443", [("b.pem".to_owned(), now - 10)]);
        let value = |text: &str, cert: &str| -> i64 {
            let prefix = format!(
                "keygate_tls_certificate_expiry_seconds{{listener=\"0.0.0.0:443\",cert=\"{cert}\"}} "
            );
            line(text, &prefix)[prefix.len()..].parse().unwrap()
        };
        let text = metrics.render();
        assert!((86_390..=86_400).contains(&value(&text, "a.pem")), "{text}");
        assert!(value(&text, "b.pem") < 0, "expired: negative");
        metrics.tls_certificates(1, "0.0.0.0:443", [("c.pem".to_owned(), now + 100)]);
        let text = metrics.render();
        assert!(!text.contains("a.pem"), "a replaced certificate disappears: {text}");
        assert!(text.contains("c.pem") && text.contains("b.pem"), "{text}");
    }

    #[test]
    fn jwks_fetches_are_counted_by_issuer_and_outcome_with_the_keys_loaded() {
        let metrics = Metrics::new();
        metrics.jwks_fetched("https://idp", None);
        let text = metrics.render();
        assert!(
            text.contains("keygate_jwks_fetches_total{issuer=\"https://idp\",outcome=\"failed\"} 1"),
            "{text}"
        );
        assert!(text.contains("keygate_jwks_keys{issuer=\"https://idp\"} 0"), "never loaded: {text}");
        metrics.jwks_fetched("https://idp", Some(2));
        metrics.jwks_fetched("https://idp", None);
        let text = metrics.render();
        assert!(
            text.contains("keygate_jwks_fetches_total{issuer=\"https://idp\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("keygate_jwks_keys{issuer=\"https://idp\"} 2"),
            "a failure keeps the keys: {text}"
        );
    }

    #[test]
    fn requests_are_counted_by_route_and_status_with_latency() {
        let metrics = Metrics::new();
        metrics.record_request("/api", 200, Duration::from_millis(3));
        metrics.record_request("/api", 200, Duration::from_millis(5));
        metrics.record_request("/api", 503, Duration::from_millis(1));
        metrics.record_request(NO_ROUTE, 404, Duration::from_micros(100));
        let text = metrics.render();
        assert!(text.contains(r#"keygate_requests_total{route="/api",status="200"} 2"#), "{text}");
        assert!(text.contains(r#"keygate_requests_total{route="/api",status="503"} 1"#), "{text}");
        assert!(text.contains(r#"keygate_requests_total{route="(none)",status="404"} 1"#), "{text}");
        assert_eq!(
            line(&text, r#"keygate_request_duration_seconds_count{route="/api"}"#).split(' ').nth(1),
            Some("3")
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn route_labels_are_capped() {
        let metrics = Metrics::new();
        for i in 0..MAX_ROUTES + 10 {
            metrics.record_request(&format!("/r{i}"), 200, Duration::ZERO);
        }
        let text = metrics.render();
        let series = text.lines().filter(|l| l.starts_with("keygate_requests_total{")).count();
        assert_eq!(series, MAX_ROUTES + 1, "the cap plus `(other)`");
        assert!(text.contains(r#"keygate_requests_total{route="(other)",status="200"} 10"#));
    }

    #[test]
    fn cache_redis_refusal_and_usage_metrics_render() {
        let metrics = Metrics::new();
        metrics.cache_hit();
        metrics.cache_hit();
        metrics.cache_miss();
        metrics.redis_error();
        metrics.redis_latency(Duration::from_millis(2));
        metrics.refused(Refusal::RateLimited);
        metrics.refused(Refusal::QuotaExceeded);
        metrics.refused(Refusal::QuotaExceeded);
        metrics.usage_flush_lag(Duration::from_millis(1500));
        metrics.usage_dropped(7);
        metrics.auth_failure();
        metrics.auth_failure();
        metrics.auth_failures_refused();
        metrics.store_lookup_throttled();
        metrics.cache_refresh();
        let text = metrics.render();
        for expected in [
            "keygate_key_cache_hits_total 2",
            "keygate_key_cache_misses_total 1",
            "keygate_redis_errors_total 1",
            "keygate_redis_latency_seconds_count 1",
            r#"keygate_refused_total{kind="rate_limited"} 1"#,
            r#"keygate_refused_total{kind="quota_exceeded"} 2"#,
            "keygate_usage_flush_lag_seconds 1.5",
            "keygate_usage_dropped_total 7",
            "keygate_auth_failures_total 2",
            "keygate_auth_failures_refused_total 1",
            "keygate_store_lookups_throttled_total 1",
            "keygate_key_cache_refreshes_total 1",
            "# HELP keygate_auth_failures_refused Keyed requests answered 429",
        ] {
            assert!(text.contains(expected), "missing `{expected}` in\n{text}");
        }
    }

    #[test]
    fn build_info_names_the_version_and_commit_with_help() {
        let text = Metrics::new().render();
        let series = format!(
            "keygate_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            crate::build_info::VERSION,
            crate::build_info::COMMIT
        );
        assert!(text.contains(&series), "missing `{series}` in\n{text}");
        assert!(text.contains("# HELP keygate_build_info Always 1;"), "{text}");
        assert!(text.contains("# TYPE keygate_build_info gauge"), "{text}");
        assert!(!crate::build_info::COMMIT.is_empty());
    }

    #[test]
    fn the_global_functions_reach_the_rendered_page() {
        record_request("/global-test", 201, Duration::from_millis(1));
        assert!(render().contains(r#"keygate_requests_total{route="/global-test",status="201"} 1"#));
    }
}
