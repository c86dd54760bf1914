//! The admin listener's calls that are not keys or clients: the probes,
//! `/metrics`, config reload, the usage report and the OpenAPI document.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use utoipa::ToSchema;

use super::Admin;
use super::error::{AdminError, ErrorBody};
use super::extract::{Actor, Query};
use super::keys::{invalid, json};
use super::request::UsageQuery;
use crate::usage::UsageReport;
use crate::usage::query::{client_flag, since_flag};

/// How long `/readyz` waits for the store's ping.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// `/healthz`'s answer.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(example = "ok")]
    status: &'static str,
}

/// `/readyz`'s answer when ready.
#[derive(Serialize, ToSchema)]
pub struct Ready {
    /// Always `ready`.
    #[schema(example = "ready")]
    status: &'static str,
    /// Always `ok`: the store answered its ping.
    #[schema(example = "ok")]
    store: &'static str,
    /// Routes in the running config.
    routes: usize,
}

/// A successful reload.
#[derive(Serialize, ToSchema)]
pub struct Reloaded {
    /// Always `reloaded`.
    #[schema(example = "reloaded")]
    status: &'static str,
    routes: usize,
    upstreams: usize,
    /// TLS listeners whose certificates were loaded again.
    certificates: usize,
    /// Changed settings that only take effect after a restart, e.g. `server.listen`.
    #[schema(value_type = Vec<String>)]
    restart_needed: Vec<&'static str>,
}

/// The process is up.
#[utoipa::path(
    get, path = "/healthz", operation_id = "healthz", tag = "probes", security(()),
    responses((status = 200, description = "The process is up", body = Health))
)]
pub async fn healthz() -> Response {
    json(StatusCode::OK, &Health { status: "ok" })
}

/// Ready when the store answers a ping in time and a config is live (and,
/// with `readyz_requires_healthy_upstreams`, every upstream has a healthy target).
#[utoipa::path(
    get, path = "/readyz", operation_id = "readyz", tag = "probes", security(()),
    responses(
        (status = 200, description = "Ready", body = Ready),
        (status = 503, description = "Not ready", body = ErrorBody),
    )
)]
pub async fn readyz(State(admin): State<Arc<Admin>>) -> Result<Response, AdminError> {
    let gateway = &admin.gateway;
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
    Ok(json(StatusCode::OK, &Ready { status: "ready", store: "ok", routes: live.config.routes.len() }))
}

/// Prometheus metrics: OpenMetrics, or the text format 0.0.4 when the
/// scraper's `Accept` prefers it (`metrics::Exposition::negotiate`).
#[utoipa::path(
    get, path = "/metrics", operation_id = "metrics", tag = "probes", security(()),
    responses((status = 200, description = "The metrics, in the format `Accept` prefers",
        content(
            (String = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
            (String = "text/plain; version=0.0.4; charset=utf-8"),
        )))
)]
pub async fn metrics(headers: http::HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = crate::metrics::Exposition::negotiate(accept);
    let mut response = crate::metrics::render_as(format).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    response.headers_mut().insert(header::VARY, HeaderValue::from_static("accept"));
    response
}

/// Reload the config file, as SIGHUP does; a refused file leaves the running config.
#[utoipa::path(
    post, path = "/admin/reload", operation_id = "reload", tag = "admin",
    responses(
        (status = 200, description = "Reloaded", body = Reloaded),
        (status = 400, description = "The file was refused (`invalid_config`, with `problems`)", body = ErrorBody),
    )
)]
pub async fn reload(
    State(admin): State<Arc<Admin>>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
) -> Result<Response, AdminError> {
    tracing::info!(target: "keygate::audit", actor, via = "admin-api", op = "reload", "config reload requested");
    let reloaded = admin.reloader.reload().map_err(AdminError::InvalidConfig)?;
    Ok(json(
        StatusCode::OK,
        &Reloaded {
            status: "reloaded",
            routes: reloaded.routes,
            upstreams: reloaded.upstreams,
            certificates: reloaded.certificates,
            restart_needed: reloaded.restart_needed,
        },
    ))
}

/// The `keygate usage --json` report, read from the store's Redis.
#[utoipa::path(
    get, path = "/admin/usage", operation_id = "usage", tag = "admin",
    params(UsageQuery),
    responses(
        (status = 200, description = "The report", body = UsageReport),
        (status = 400, description = "A query parameter is invalid", body = ErrorBody),
        (status = 501, description = "The gateway runs on the file store, which keeps no usage", body = ErrorBody),
    )
)]
pub async fn usage(
    State(admin): State<Arc<Admin>>,
    Query(query): Query<UsageQuery>,
) -> Result<Response, AdminError> {
    let invalid_in = |field: &'static str| move |why: String| invalid(field, why);
    // `?client=` (empty) is no filter, as if absent.
    let client = match query.client.as_deref() {
        None | Some("") => None,
        Some(client) => Some(client_flag(client).map_err(invalid_in("client"))?),
    };
    let now = jiff::Timestamp::now();
    let since = since_flag(query.since.as_deref().unwrap_or("1h"))
        .and_then(|s| s.resolve(now))
        .map_err(invalid_in("since"))?;
    if since >= now {
        return Err(invalid("since", "must be in the past (e.g. 1h, or an RFC 3339 time)"));
    }
    let redis =
        admin.gateway.store.redis().ok_or(AdminError::NotImplemented(
            "usage is kept in Redis; this gateway runs on the file store",
        ))?;
    let by = query.by.unwrap_or(crate::usage::Granularity::Hour);
    let query = crate::usage::UsageQuery { client, since, until: now, by };
    match crate::usage::query(&mut redis.conn.clone(), &redis.prefix, &query).await {
        Ok(report) => Ok(json(StatusCode::OK, &report)),
        Err(crate::usage::UsageError::Invalid(why)) => Err(invalid("since", why)),
        Err(error) => Err(AdminError::StoreUnavailable(error.to_string())),
    }
}

/// This API's OpenAPI 3.1 document (the one in `docs/admin-openapi.json`).
#[utoipa::path(
    get, path = "/admin/openapi.json", operation_id = "openapi", tag = "admin",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json",
        body = Object))
)]
pub async fn openapi(State(admin): State<Arc<Admin>>) -> Response {
    let mut response = admin.openapi_json.clone().into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
