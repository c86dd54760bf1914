//! The admin listener: the keys and clients API, config reload, `/metrics` and health checks.
//!
//! It runs on its own listener (`[admin] listen`, off by default) with its own
//! router, so nothing here is reachable through the public listener: the
//! public handler knows only the configured routes.
//!
//! Access:
//! - `/healthz`, `/readyz` and `/metrics` need no token, as is usual for probes
//!   and Prometheus scrapes; they reveal no key material, only counts by route.
//!   The admin port must therefore stay on a private interface (the default
//!   example binds loopback).
//! - Everything under `/admin/` needs `Authorization: Bearer <token>`, checked
//!   in constant time ([`crate::config::AdminToken::matches`]). The token is
//!   read from the running config on every call, so a reload can change it.
//!   An unknown path under a wrong token answers 401, not 404: callers without
//!   the token learn nothing about the routes.
//!
//! [`ROUTES`] is the router: dispatch walks it, and the OpenAPI test compares
//! it with `docs/admin-openapi.json`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod clients;
pub mod error;
pub mod keys;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use self::error::AdminError;
use crate::gateway::Gateway;
use crate::reload::Reloader;
use crate::server::watchdog::{self, Activity, Deadlines, Ended, Tracked, Watched};

/// Largest request body accepted; key calls are a few hundred bytes.
pub const MAX_BODY: usize = 64 * 1024;
/// How long `/readyz` waits for the store's ping.
const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long admin calls in flight may finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What the admin endpoints act on.
pub struct Admin {
    gateway: Arc<Gateway>,
    reloader: Arc<Reloader>,
    /// The key prefix the gateway started with. The verifier keeps the start
    /// prefix until a restart (a reload only warns), so keys issued here use
    /// it too, or they would not verify.
    prefix: String,
}

impl Admin {
    pub fn new(reloader: Arc<Reloader>) -> Arc<Self> {
        let gateway = Arc::clone(reloader.gateway());
        let prefix = gateway.live.load().config.keys.prefix.clone();
        Arc::new(Self { gateway, reloader, prefix })
    }
}

// === Routes ===

/// What an admin route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Healthz,
    Readyz,
    Metrics,
    Reload,
    Usage,
    IssueKey,
    ListKeys,
    ShowKey,
    UpdateKey,
    RevokeKey,
    RotateKey,
    CreateClient,
    ListClients,
    ShowClient,
    UpdateClient,
    RevokeClient,
}

impl Endpoint {
    /// Probes and scrapes: no token.
    fn is_open(self) -> bool {
        matches!(self, Self::Healthz | Self::Readyz | Self::Metrics)
    }
}

/// One admin route: method and path template (`{id}` matches one segment).
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub endpoint: Endpoint,
}

const fn route(method: &'static str, path: &'static str, endpoint: Endpoint) -> Route {
    Route { method, path, endpoint }
}

/// Every route the admin listener serves; the router is this table.
pub const ROUTES: &[Route] = &[
    route("GET", "/healthz", Endpoint::Healthz),
    route("GET", "/readyz", Endpoint::Readyz),
    route("GET", "/metrics", Endpoint::Metrics),
    route("POST", "/admin/reload", Endpoint::Reload),
    route("GET", "/admin/usage", Endpoint::Usage),
    route("POST", "/admin/keys", Endpoint::IssueKey),
    route("GET", "/admin/keys", Endpoint::ListKeys),
    route("GET", "/admin/keys/{id}", Endpoint::ShowKey),
    route("PATCH", "/admin/keys/{id}", Endpoint::UpdateKey),
    route("POST", "/admin/keys/{id}/revoke", Endpoint::RevokeKey),
    route("POST", "/admin/keys/{id}/rotate", Endpoint::RotateKey),
    route("POST", "/admin/clients", Endpoint::CreateClient),
    route("GET", "/admin/clients", Endpoint::ListClients),
    route("GET", "/admin/clients/{id}", Endpoint::ShowClient),
    route("PATCH", "/admin/clients/{id}", Endpoint::UpdateClient),
    route("POST", "/admin/clients/{id}/revoke", Endpoint::RevokeClient),
];

/// The route for `method` and `path`, with the `{id}` segment if any.
/// `Err(None)`: no such path; `Err(Some(allow))`: the path exists for other methods.
fn resolve<'p>(method: &Method, path: &'p str) -> Result<(Endpoint, Option<&'p str>), Option<String>> {
    let mut allow = Vec::new();
    for route in ROUTES {
        let Some(id) = matches_template(route.path, path) else { continue };
        if route.method == method.as_str() {
            return Ok((route.endpoint, id));
        }
        allow.push(route.method);
    }
    if allow.is_empty() { Err(None) } else { Err(Some(allow.join(", "))) }
}

/// `Some(id)` if `path` fits `template` (`id` is the `{id}` segment, if any).
fn matches_template<'p>(template: &str, path: &'p str) -> Option<Option<&'p str>> {
    let mut id = None;
    let mut segments = path.split('/');
    for part in template.split('/') {
        let segment = segments.next()?;
        if part == "{id}" {
            if segment.is_empty() {
                return None;
            }
            id = Some(segment);
        } else if part != segment {
            return None;
        }
    }
    segments.next().is_none().then_some(id)
}

// === Serving ===

/// Serves the admin API on `listener` until `shutdown` completes, then lets
/// calls in flight finish (briefly).
///
/// Held to the same `[server]` deadlines and header limits as the public
/// listener (see `server::watchdog`): a private port is still a port, and a
/// connection that sends nothing must not stay open forever.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: impl Future<Output = ()>) {
    let edge = admin.gateway.live.load().config.server.edge.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(edge.hyper_header_backstop())
        // hyper-util's `auto` builder has no `max_header_size`; a head that
        // fills the bounded read buffer gets the same 431.
        .max_buf_size(edge.max_header_bytes.max(8 * 1024))
        .max_headers(edge.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(edge.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(edge.http2_keepalive_interval)
        .keep_alive_timeout(edge.http2_keepalive_timeout);
    let builder = Arc::new(builder);
    // As in `server::serve`: every connection holds a receiver, and the drain
    // is over once all are dropped.
    let (draining, _) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    // As in `server::serve`: pause rather than spin on EMFILE.
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let admin = Arc::clone(&admin);
        let activity = Arc::new(Activity::default());
        let requests = Arc::clone(&activity);
        let service = service_fn(move |request| {
            let admin = Arc::clone(&admin);
            let guard = requests.request();
            async move {
                let response = handle(&admin, request).await;
                Ok::<_, std::convert::Infallible>(response.map(|body| Tracked::new(body, guard)))
            }
        });
        let builder = Arc::clone(&builder);
        let draining = draining.subscribe();
        // The protocol is found inside hyper-util's `auto` connection, so the
        // HTTP/1 rule (a byte after idle begins a head) applies to both.
        let deadlines = Deadlines::new(&edge, false);
        tokio::spawn(async move {
            let io = TokioIo::new(Watched::new(stream, Arc::clone(&activity)));
            let connection = builder.serve_connection(io, service);
            match watchdog::drive(connection, &activity, deadlines, draining).await {
                Ended::Closed(Ok(())) => {}
                Ended::Closed(Err(error)) => tracing::debug!(%error, "admin connection ended with an error"),
                Ended::Expired(expired) => tracing::debug!(?expired, "admin connection closed by a deadline"),
            }
        });
    }
    drop(listener);
    draining.send_replace(true);
    if tokio::time::timeout(DRAIN_TIMEOUT, draining.closed()).await.is_err() {
        tracing::warn!("admin calls still in flight after the drain timeout");
    }
}

/// Answers one admin request; never fails.
pub async fn handle(admin: &Admin, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = match dispatch(admin, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    tracing::debug!(target: "keygate::admin", %method, %path, status = response.status().as_u16());
    response
}

async fn dispatch(admin: &Admin, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, AdminError> {
    let (parts, body) = request.into_parts();
    let resolved = resolve(&parts.method, parts.uri.path());

    // Open endpoints first; everything else, unknown paths included, needs the token.
    if let Ok((endpoint, _)) = resolved
        && endpoint.is_open()
    {
        return match endpoint {
            Endpoint::Healthz => Ok(json_ok(serde_json::json!({ "status": "ok" }))),
            Endpoint::Readyz => readyz(&admin.gateway).await,
            _ => Ok(metrics_page(&parts.headers)),
        };
    }
    let actor = authorize(&admin.gateway, &parts.headers)?;
    let (endpoint, id) = resolved.map_err(|allow| match allow {
        Some(allow) => AdminError::MethodNotAllowed { allow },
        None => AdminError::NoRoute,
    })?;
    let body = read_body(body, &parts.headers).await?;

    let call = keys::KeyCall {
        store: &*admin.gateway.store,
        prefix: &admin.prefix,
        actor: &actor,
        now: jiff::Timestamp::now(),
        credits: admin.gateway.limits.credits(),
    };
    let id = id.unwrap_or_default();
    match endpoint {
        Endpoint::IssueKey => keys::issue(&call, &body).await,
        Endpoint::ListKeys => keys::list(&call, parts.uri.query()).await,
        Endpoint::ShowKey => keys::show(&call, id).await,
        Endpoint::UpdateKey => keys::update(&call, id, &body).await,
        Endpoint::RevokeKey => keys::revoke(&call, id).await,
        Endpoint::RotateKey => keys::rotate(&call, id, &body).await,
        Endpoint::CreateClient => clients::create(&call, &body).await,
        Endpoint::ListClients => clients::list(&call, parts.uri.query()).await,
        Endpoint::ShowClient => clients::show(&call, id).await,
        Endpoint::UpdateClient => clients::update(&call, id, &body).await,
        Endpoint::RevokeClient => clients::revoke(&call, id).await,
        Endpoint::Reload => reload(admin, &actor),
        Endpoint::Usage => usage(admin, parts.uri.query()).await,
        Endpoint::Healthz | Endpoint::Readyz | Endpoint::Metrics => {
            Err(AdminError::Internal("open endpoint reached the authorised dispatch".to_owned()))
        }
    }
}

/// `GET /admin/usage?client=ID&since=1h&by=hour`: the same report as
/// `keygate usage --json`, read from the store's Redis.
async fn usage(admin: &Admin, query: Option<&str>) -> Result<Response<Full<Bytes>>, AdminError> {
    use crate::usage::query::{client_flag, since_flag};
    let invalid = |field: &str, reason: String| AdminError::Invalid { field: field.to_owned(), reason };
    let (mut client, mut since, mut by) = (None, "1h".to_owned(), crate::usage::Granularity::Hour);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy().into_owned();
        match name {
            "client" => client = Some(client_flag(&value).map_err(|why| invalid("client", why))?),
            "since" => since = value,
            "by" => by = value.parse().map_err(|_| invalid("by", "expected minute, hour or day".into()))?,
            other => return Err(invalid(other, "unknown parameter; known: client, since, by".into())),
        }
    }
    let now = jiff::Timestamp::now();
    let since = since_flag(&since).and_then(|s| s.resolve(now)).map_err(|why| invalid("since", why))?;
    let redis =
        admin.gateway.store.redis().ok_or(AdminError::NotImplemented(
            "usage is kept in Redis; this gateway runs on the file store",
        ))?;
    let query = crate::usage::UsageQuery { client, since, until: now, by };
    match crate::usage::query(&mut redis.conn.clone(), &redis.prefix, &query).await {
        Ok(report) => {
            Ok(json_ok(serde_json::to_value(report).map_err(|e| AdminError::Internal(e.to_string()))?))
        }
        Err(crate::usage::UsageError::Invalid(why)) => Err(invalid("since", why)),
        Err(error) => Err(AdminError::StoreUnavailable(error.to_string())),
    }
}

/// Checks the bearer token against the running config's; returns the token's
/// name for the audit log.
fn authorize(gateway: &Gateway, headers: &HeaderMap) -> Result<String, AdminError> {
    let live = gateway.live.load();
    let admin = live.config.admin.as_ref().ok_or(AdminError::Disabled)?;
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(crate::credential::bearer_token)
        .ok_or(AdminError::MissingToken)?;
    if admin.token.matches(presented.as_bytes()) {
        Ok(admin.token_name.clone())
    } else {
        Err(AdminError::WrongToken)
    }
}

/// The whole body, refused past [`MAX_BODY`] (by `Content-Length` at once,
/// or while reading a body without one).
async fn read_body(body: Incoming, headers: &HeaderMap) -> Result<Bytes, AdminError> {
    let too_large = AdminError::BodyTooLarge { limit: MAX_BODY };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY as u64) {
        return Err(too_large);
    }
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(too_large),
        Err(error) => Err(AdminError::BadJson(format!("reading the body failed: {error}"))),
    }
}

/// 200 when the store answers a ping in time and a config is live; else 503.
async fn readyz(gateway: &Gateway) -> Result<Response<Full<Bytes>>, AdminError> {
    match tokio::time::timeout(READY_TIMEOUT, gateway.store.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return Err(AdminError::NotReady(error.to_string())),
        Err(_) => return Err(AdminError::NotReady(format!("no ping answer within {READY_TIMEOUT:?}"))),
    }
    let live = gateway.live.load();
    if live.config.admin.as_ref().is_some_and(|admin| admin.readyz_requires_healthy_upstreams) {
        let down = live.upstreams.without_healthy_target();
        if !down.is_empty() {
            return Err(AdminError::NotReady(format!("no healthy target in upstream {}", down.join(", "))));
        }
    }
    Ok(json_ok(serde_json::json!({
        "status": "ready",
        "store": "ok",
        "routes": live.config.routes.len(),
    })))
}

fn reload(admin: &Admin, actor: &str) -> Result<Response<Full<Bytes>>, AdminError> {
    tracing::info!(target: "keygate::audit", actor, via = "admin-api", op = "reload", "config reload requested");
    let reloaded = admin.reloader.reload().map_err(AdminError::InvalidConfig)?;
    Ok(json_ok(serde_json::json!({
        "status": "reloaded",
        "routes": reloaded.routes,
        "upstreams": reloaded.upstreams,
        "certificates": reloaded.certificates,
        "restart_needed": reloaded.restart_needed,
    })))
}

/// `/metrics` in the format the scraper's `Accept` asks for (OpenMetrics
/// unless it prefers the 0.0.4 text format).
fn metrics_page(headers: &HeaderMap) -> Response<Full<Bytes>> {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = crate::metrics::Exposition::negotiate(accept);
    let mut response = Response::new(Full::new(Bytes::from(crate::metrics::render_as(format))));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    response.headers_mut().insert(header::VARY, HeaderValue::from_static("accept"));
    response
}

fn json_ok(value: serde_json::Value) -> Response<Full<Bytes>> {
    crate::error::json_response(StatusCode::OK, value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_resolves_to_itself() {
        for route in ROUTES {
            let path = route.path.replace("{id}", "acme.k1");
            let method: Method = route.method.parse().unwrap();
            let (endpoint, id) = resolve(&method, &path).unwrap();
            assert_eq!(endpoint, route.endpoint, "{} {}", route.method, route.path);
            assert_eq!(id.is_some(), route.path.contains("{id}"));
        }
    }

    #[test]
    fn unknown_paths_and_methods_are_told_apart() {
        assert_eq!(resolve(&Method::GET, "/admin/nope"), Err(None));
        assert_eq!(resolve(&Method::GET, "/admin/keys/"), Err(None), "an empty id is no id");
        assert_eq!(resolve(&Method::GET, "/admin/keys/a.b/c"), Err(None));
        assert_eq!(resolve(&Method::DELETE, "/admin/keys/a.b"), Err(Some("GET, PATCH".to_owned())));
        assert_eq!(resolve(&Method::GET, "/admin/reload"), Err(Some("POST".to_owned())));
    }
}
