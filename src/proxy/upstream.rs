//! One `[upstream.NAME]` at run time: its targets (each a connection pool
//! and a health state), the balancer choosing among them, the retry loop,
//! and the circuit breaker in front of it all.
//!
//! [`UpstreamPool::forward`] is the upstream half of the request path, top
//! to bottom: breaker -> (body kept for retries) -> pick a target -> send
//! within the per-try deadline -> record the outcome for passive health ->
//! retry on another target, or answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri, Version, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::balance::{Affinity, Balancer, Weighted, stable_hash};
use super::body::{self, ClientBodyError, CountedBody, RequestBody};
use super::health::{ActiveSettings, Outcome, PassiveSettings, TargetHealth};
use super::pool::{self, ConnPool, PendingConnects, PoolLimits, PooledBody, SendError};
use super::retry::{Replay, RetryBudget, RetrySettings};
use super::{check_framing, error_chain, remove_hop_by_hop, upgrade};
use crate::config::{Protocol, RouteConfig, UpstreamConfig};
use crate::error::{GatewayError, TlsFailure};

/// `retries` is at most this, so the targets a request tried fit in an array.
pub const MAX_RETRIES: u32 = 5;

/// One target of an upstream.
pub struct Target {
    pool: Arc<ConnPool>,
    health: Arc<TargetHealth>,
    weight: u32,
    name_hash: u64,
    /// `scheme://host:port`: the metrics label, and what a reload matches
    /// targets by to carry their health over.
    label: Box<str>,
}

impl Target {
    pub fn pool(&self) -> &Arc<ConnPool> {
        &self.pool
    }

    pub fn label(&self) -> &str {
        &self.label
    }
}

impl Weighted for Target {
    fn health(&self) -> &TargetHealth {
        &self.health
    }
    fn weight(&self) -> u32 {
        self.weight
    }
    fn name_hash(&self) -> u64 {
        self.name_hash
    }
}

/// The targets one request has tried so far.
#[derive(Default)]
struct Tried {
    indices: [usize; MAX_RETRIES as usize + 1],
    len: usize,
}

impl Tried {
    fn push(&mut self, index: usize) {
        if let Some(slot) = self.indices.get_mut(self.len) {
            *slot = index;
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[usize] {
        &self.indices[..self.len]
    }
}

/// One upstream: see the module doc.
pub struct UpstreamPool {
    name: String,
    targets: Vec<Target>,
    balancer: Balancer,
    passive: PassiveSettings,
    active: Option<ActiveSettings>,
    retry: RetrySettings,
    budget: RetryBudget,
    /// Requests in flight allowed across the targets (`max_requests`).
    max_requests: usize,
    timeout: Duration,
    websocket_idle_timeout: Duration,
    series: crate::metrics::UpstreamSeries,
}

impl UpstreamPool {
    /// Builds the upstream; `carried` has the health of targets an earlier
    /// config had, by label.
    pub fn new(
        name: &str,
        config: &UpstreamConfig,
        workers: usize,
        carried: &HashMap<&str, Arc<TargetHealth>>,
    ) -> Self {
        let limits = PoolLimits {
            connect_timeout: config.connect_timeout,
            idle_timeout: config.pool_idle_timeout,
            max_idle: config.pool_max_idle_per_host,
            max_connections: config.max_connections.get(),
            body_idle_timeout: config.body_idle_timeout,
        };
        let pending = PendingConnects::new(config.max_pending);
        let targets = config
            .targets
            .iter()
            .zip(config.weights.iter().copied().chain(std::iter::repeat(1)))
            .filter_map(|(uri, weight)| {
                let https = uri.scheme_str() == Some("https");
                let authority = uri.authority()?.clone();
                // Validated at load: an https target has a TLS config and a name.
                let tls = config.tls.as_ref().filter(|_| https).and_then(|tls| {
                    let name = match &tls.server_name {
                        Some(name) => name.clone(),
                        None => crate::upstream_tls::server_name_for(authority.host()).ok()?,
                    };
                    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config));
                    Some(pool::TargetTls { connector, name })
                });
                let protocol = if https || config.protocol == Protocol::Http2 {
                    config.protocol
                } else {
                    Protocol::Http1
                };
                let label = format!("{}://{authority}", if https { "https" } else { "http" });
                let health = match carried.get(label.as_str()) {
                    Some(health) => Arc::clone(health),
                    None => TargetHealth::new(name, &label),
                };
                let pool =
                    ConnPool::with_tls(authority, workers, limits, tls, protocol, Arc::clone(&pending));
                Some(Target {
                    pool,
                    health,
                    weight,
                    name_hash: stable_hash(label.as_bytes()),
                    label: label.into(),
                })
            })
            .collect::<Vec<_>>();
        let weights: Vec<u32> = targets.iter().map(|t| t.weight).collect();
        Self {
            name: name.to_owned(),
            balancer: Balancer::new(config.balance, &weights),
            targets,
            passive: config.passive.clone(),
            active: config.health.clone(),
            budget: RetryBudget::new(config.retry.budget),
            retry: config.retry.clone(),
            max_requests: config.max_requests,
            timeout: config.timeout,
            websocket_idle_timeout: config.websocket_idle_timeout,
            series: crate::metrics::upstream_series(name),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn targets(&self) -> impl Iterator<Item = &Target> {
        self.targets.iter()
    }

    /// The active checks' settings, if the upstream has `health = {...}`.
    pub fn active_health(&self) -> Option<&ActiveSettings> {
        self.active.as_ref()
    }

    /// Whether some target is in rotation now (for `/readyz`).
    pub fn has_healthy_target(&self, now: Instant) -> bool {
        self.targets.iter().any(|t| t.weight > 0 && t.health.is_healthy(now))
    }

    /// Requests in flight to this upstream, all targets together.
    fn outstanding(&self) -> usize {
        self.targets.iter().map(|t| t.health.outstanding()).sum()
    }

    /// Sends a prepared request (headers already rewritten, URI holding only
    /// path and query) to a target and returns its response headers, with
    /// the body still streaming; a failed attempt is retried on another
    /// target when the request allows it (see `retry.rs`).
    ///
    /// `sent` is when the caller started sending, read once for the request:
    /// the upstream timeout and the pool count from it, so forwarding reads
    /// no clock of its own unless an attempt fails. For a request with a
    /// streamed body, the timeout counts from when the body has been sent
    /// (see [`body::response_deadline`]).
    ///
    /// The route's body limits apply: a declared body over `max_body` is
    /// refused here, before anything is sent; a chunked one is cut off when
    /// it crosses it.
    pub async fn forward(
        &self,
        request: Request<CountedBody>,
        sent: Instant,
        route: &RouteConfig,
        affinity: Affinity<'_>,
    ) -> Result<Response<PooledBody>, GatewayError> {
        let limits = &route.body;
        let declared = http_body::Body::size_hint(request.body()).exact();
        if let (Some(max), Some(declared)) = (limits.max, declared)
            && declared > max
        {
            return Err(GatewayError::BodyTooLarge { limit: max });
        }
        self.check_breaker()?;

        let (mut parts, body) = request.into_parts();
        // Origin-form URI, as an HTTP/1.1 server expects; upstreams are
        // spoken to over HTTP/1.1 whatever the client used (the pool
        // switches to HTTP/2 for targets that speak it).
        if parts.uri.path_and_query().is_none() {
            parts.uri = Uri::from_static("/");
        }
        parts.version = Version::HTTP_11;
        let retryable = self.retry.retries > 0 && route.retry_methods.contains(&parts.method);
        if retryable {
            self.budget.deposit();
        }
        // The body: streamed, or (to be sent again) read whole first.
        let keep = retryable && (body.is_end_stream() || declared.is_some_and(|n| n <= self.retry.buffer));
        let (mut request, mut progress, replay) = if keep && !body.is_end_stream() {
            let (streamed, _) = RequestBody::new(body, limits, sent);
            let bytes = match streamed.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(fault) => return Err(client_body_error(&fault)),
            };
            let request = Request::from_parts(parts, RequestBody::buffered(bytes.clone()));
            let replay = Replay::of(&request, bytes);
            (request, None, Some(replay))
        } else {
            let (body, progress) = RequestBody::new(body, limits, sent);
            let request = Request::from_parts(parts, body);
            // A retry goes to another target: with one in rotation there is
            // none to prepare for, so no copy of the head (a header map clone
            // and its drop, ~2.5k of a small GET's ~74k instructions).
            let elsewhere = self.targets.iter().filter(|t| t.weight > 0).nth(1).is_some();
            let replay = (keep && elsewhere).then(|| Replay::of(&request, Bytes::new()));
            (request, progress, replay)
        };

        let deadline = sent + self.timeout;
        let mut now = sent;
        let mut tried = Tried::default();
        loop {
            let Some(pick) =
                self.balancer.pick(&self.targets, affinity, tried.as_slice(), now, &self.passive)
            else {
                return Err(GatewayError::Internal(format!("upstream {} has no targets", self.name)));
            };
            if pick.panic {
                self.series.panics.inc();
            }
            tried.push(pick.index);
            let target = &self.targets[pick.index];
            if let Some(host) = target.pool.host() {
                request.headers_mut().insert(header::HOST, host.clone());
            }
            let in_flight = target.health.start_request();
            let try_deadline = match self.retry.try_timeout {
                // Only an attempt that could be retried has its own deadline.
                Some(per_try) if keep => deadline.min(now + per_try),
                _ => deadline,
            };
            let exchange = target.pool.send(request, now);
            let outcome = match &progress {
                // No body, or one already read: the request is sent with its head.
                None => tokio::time::timeout_at(try_deadline, exchange).await.ok(),
                Some(progress) => {
                    tokio::select! {
                        biased;
                        outcome = exchange => Some(outcome),
                        () = body::response_deadline(progress, self.timeout) => None,
                    }
                }
            };
            let failed = match outcome {
                Some(Ok((response, lease))) => {
                    let status = response.status().as_u16();
                    let bad = status >= 500 && self.passive.count_5xx;
                    let verdict = if bad { Outcome::Failure } else { Outcome::Success };
                    // One clock read for the verdict on the 5xx path only.
                    let at = if bad { Instant::now() } else { now };
                    target.health.record(verdict, at, &self.passive, &target.label);
                    if self.retry.statuses.contains(&status)
                        && let Some(next) = self.next_attempt(replay.as_ref(), &tried, at, deadline)
                    {
                        // Discarded unread: dropping the lease closes its connection.
                        drop((response, lease));
                        (request, progress, now) = (next, None, at);
                        continue;
                    }
                    // Dropping `lease` unreleased closes the connection: after a
                    // response framed two ways, its next bytes mean nothing.
                    if let Err(reason) = check_framing(&response) {
                        return Err(GatewayError::UpstreamBadResponse {
                            upstream: self.name.clone(),
                            reason,
                        });
                    }
                    let idle = target.pool.body_idle_timeout();
                    let mut response =
                        response.map(|body| PooledBody::new(body, lease, idle, Some(in_flight)));
                    remove_hop_by_hop(response.headers_mut());
                    return Ok(response);
                }
                Some(Err(error)) => self.send_failure(error, &target.pool),
                None => GatewayError::UpstreamTimeout { upstream: self.name.clone(), after: self.timeout },
            };
            drop(in_flight);
            let targets_fault = is_targets_fault(&failed);
            let at = Instant::now();
            if targets_fault {
                target.health.record(Outcome::Failure, at, &self.passive, &target.label);
            }
            let retriable = targets_fault || matches!(failed, GatewayError::UpstreamBusy { .. });
            match self.next_attempt(replay.as_ref().filter(|_| retriable), &tried, at, deadline) {
                Some(next) => (request, progress, now) = (next, None, at),
                None => return Err(failed),
            }
        }
    }

    /// The request for one more attempt, if the request may have one now:
    /// a replayable request, attempts and untried targets left, time left,
    /// and a token in the budget (taken here).
    /// Circuit breaking: past `max_requests` in flight, nothing is sent.
    fn check_breaker(&self) -> Result<(), GatewayError> {
        if self.outstanding() < self.max_requests {
            return Ok(());
        }
        crate::metrics::upstream_overloaded(&self.name, "max_requests");
        Err(GatewayError::UpstreamOverloaded { upstream: self.name.clone(), limit: "max_requests" })
    }

    fn next_attempt(
        &self,
        replay: Option<&Replay>,
        tried: &Tried,
        now: Instant,
        deadline: Instant,
    ) -> Option<Request<RequestBody>> {
        let replay = replay?;
        let attempts_left = tried.len <= self.retry.retries as usize;
        let targets_left =
            self.targets.iter().enumerate().any(|(i, t)| t.weight > 0 && !tried.as_slice().contains(&i));
        if !attempts_left || !targets_left || now >= deadline {
            return None;
        }
        if !self.budget.withdraw() {
            self.series.retries_refused.inc();
            return None;
        }
        self.series.retries.inc();
        Some(replay.request())
    }

    /// Sends a WebSocket handshake (see [`upgrade::is_websocket`]; its
    /// upgrade headers restored) to a target on a connection of its own.
    /// On `101` the response comes with the [`upgrade::Tunnel`] to run once
    /// the client has its `101` (`client` is the client connection's
    /// upgrade); any other answer is passed on as an ordinary response. The
    /// upstream timeout bounds the wait for the answer's head. Not retried:
    /// the handshake is cheap for the client to repeat, and a tunnel is not
    /// idempotent.
    pub async fn forward_upgrade(
        &self,
        request: Request<CountedBody>,
        sent: Instant,
        route: &RouteConfig,
        affinity: Affinity<'_>,
        client: hyper::upgrade::OnUpgrade,
    ) -> Result<(Response<PooledBody>, Option<upgrade::Tunnel>), GatewayError> {
        self.check_breaker()?;
        let Some(pick) = self.balancer.pick(&self.targets, affinity, &[], sent, &self.passive) else {
            return Err(GatewayError::Internal(format!("upstream {} has no targets", self.name)));
        };
        let target = &self.targets[pick.index];
        let (parts, body) = request.into_parts();
        let (body, _) = RequestBody::new(body, &route.body, sent);
        let mut request = Request::from_parts(parts, body);
        if let Some(host) = target.pool.host() {
            request.headers_mut().insert(header::HOST, host.clone());
        }
        let over_http2 = upgrade::for_upstream(&mut request);
        let in_flight = target.health.start_request();
        let exchange = target.pool.send_upgrade(request);
        let (mut response, permit) = match tokio::time::timeout_at(sent + self.timeout, exchange).await {
            Err(_) => {
                target.health.record(Outcome::Failure, Instant::now(), &self.passive, &target.label);
                return Err(GatewayError::UpstreamTimeout {
                    upstream: self.name.clone(),
                    after: self.timeout,
                });
            }
            Ok(Err(error)) => {
                let failed = self.send_failure(error, &target.pool);
                if is_targets_fault(&failed) {
                    target.health.record(Outcome::Failure, Instant::now(), &self.passive, &target.label);
                }
                return Err(failed);
            }
            Ok(Ok(answered)) => answered,
        };
        let bad = response.status().is_server_error() && self.passive.count_5xx;
        let verdict = if bad { Outcome::Failure } else { Outcome::Success };
        target.health.record(verdict, Instant::now(), &self.passive, &target.label);
        if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            if let Err(reason) = check_framing(&response) {
                return Err(GatewayError::UpstreamBadResponse { upstream: self.name.clone(), reason });
            }
            let idle = target.pool.body_idle_timeout();
            let lease = pool::Lease::dedicated(&target.pool, Some(permit));
            let mut response = response.map(|body| PooledBody::new(body, lease, idle, Some(in_flight)));
            remove_hop_by_hop(response.headers_mut());
            return Ok((response, None));
        }
        let upstream = hyper::upgrade::on(&mut response);
        let tunnel = upgrade::Tunnel {
            client,
            upstream,
            idle_timeout: self.websocket_idle_timeout,
            permit,
            in_flight,
        };
        upgrade::answer_for_client(&mut response, over_http2);
        let idle = target.pool.body_idle_timeout();
        let lease = pool::Lease::dedicated(&target.pool, None);
        Ok((response.map(|body| PooledBody::new(body, lease, idle, None)), Some(tunnel)))
    }

    /// The error a failed send is answered with: the client's, when its
    /// body is what failed; the upstream's otherwise.
    fn send_failure(&self, error: SendError, target: &ConnPool) -> GatewayError {
        let upstream = self.name.clone();
        // A TLS failure after the handshake (TLS 1.3 servers refuse a
        // missing client certificate on the first read) is named as one.
        if let SendError::Http(error) = &error
            && target.is_tls()
            && body::client_fault(error).is_none()
            && let Some(reason) = crate::upstream_tls::rustls_reason(error)
        {
            let failure = TlsFailure { target: target.authority().to_string(), reason };
            return GatewayError::UpstreamTls { upstream, failure: Box::new(failure) };
        }
        match error {
            SendError::Busy(..) => GatewayError::UpstreamBusy { upstream },
            SendError::Overloaded(..) => {
                crate::metrics::upstream_overloaded(&upstream, "max_pending");
                GatewayError::UpstreamOverloaded { upstream, limit: "max_pending" }
            }
            SendError::Tls(target, reason) => {
                let failure = TlsFailure { target: target.to_string(), reason };
                GatewayError::UpstreamTls { upstream, failure: Box::new(failure) }
            }
            SendError::Http(error) => match body::client_fault(&error) {
                Some(fault) => client_body_error(fault),
                None if error.is_parse() => {
                    GatewayError::UpstreamBadResponse { upstream, reason: error_chain(&error) }
                }
                None => GatewayError::UpstreamUnreachable { upstream, cause: error_chain(&error) },
            },
            error => GatewayError::UpstreamUnreachable { upstream, cause: error_chain(&error) },
        }
    }
}

/// Whether a failed attempt counts against the target's passive health.
/// The client's own fault (its body) and keygate's own caps (`max_connections`,
/// `max_pending`) are not the target's; the same rule for requests and for
/// WebSocket handshakes.
fn is_targets_fault(failed: &GatewayError) -> bool {
    matches!(
        failed,
        GatewayError::UpstreamUnreachable { .. }
            | GatewayError::UpstreamTimeout { .. }
            | GatewayError::UpstreamTls { .. }
            | GatewayError::UpstreamBadResponse { .. }
    )
}

/// The answer to a request whose own body failed.
fn client_body_error(fault: &ClientBodyError) -> GatewayError {
    match fault {
        ClientBodyError::Read(cause) => GatewayError::BadRequestBody(cause.to_string()),
        ClientBodyError::TooLarge(limit) => GatewayError::BodyTooLarge { limit: *limit },
        ClientBodyError::Stalled(after) => GatewayError::RequestBodyTimeout { after: *after },
    }
}

/// The upstream pools of one config, by name.
#[derive(Default)]
pub struct Upstreams {
    pools: HashMap<String, Arc<UpstreamPool>, foldhash::fast::RandomState>,
}

impl Upstreams {
    /// Builds the pools of a config; the health of every target `previous`
    /// also had (same upstream, same `scheme://host:port`) is carried over,
    /// and upstreams with `health = {...}` start their checks.
    pub fn new<'a>(
        configs: impl IntoIterator<Item = (&'a String, &'a UpstreamConfig)>,
        workers: usize,
        previous: Option<&Upstreams>,
    ) -> Self {
        let pools = configs
            .into_iter()
            .map(|(name, config)| {
                let carried: HashMap<&str, Arc<TargetHealth>> = previous
                    .and_then(|previous| previous.get(name))
                    .map(|old| old.targets.iter().map(|t| (&*t.label, Arc::clone(&t.health))).collect())
                    .unwrap_or_default();
                let pool = Arc::new(UpstreamPool::new(name, config, workers, &carried));
                super::probe::spawn(&pool);
                (name.clone(), pool)
            })
            .collect();
        Self { pools }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<UpstreamPool>> {
        self.pools.get(name)
    }

    /// The upstreams with no target in rotation now, by name (sorted).
    pub fn without_healthy_target(&self) -> Vec<&str> {
        let now = Instant::now();
        let mut names: Vec<&str> = self
            .pools
            .values()
            .filter(|pool| !pool.has_healthy_target(now))
            .map(|pool| pool.name())
            .collect();
        names.sort_unstable();
        names
    }
}
