//! The admin listener: the keys and clients API (lists paged, `page.rs`),
//! key verification for backends (`verify.rs`), config reload, `/metrics`,
//! health checks, and the API's OpenAPI document.
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
//! - `/dashboard` and its two assets need no token either: they are static
//!   files holding no data (see [`dashboard`]); the page asks for the token
//!   and sends it on each admin call it makes.
//! - Everything else, `/admin/openapi.json` included, needs `Authorization:
//!   Bearer <token>`, checked in constant time
//!   ([`crate::config::AdminToken::matches`]) before routing: an unknown path
//!   under a wrong token answers 401, not 404, so callers without the token
//!   learn nothing about the routes. The token is read from the running
//!   config on every call, so a reload can change it. The document is no
//!   secret (`docs/admin-openapi.json` holds the same), but serving it behind
//!   the token keeps the rule short: only the probes and the static page are open.
//!
//! The router is axum's, built by utoipa-axum from the handlers: each
//! handler's `#[utoipa::path]` gives its method and path to the router and
//! its entry to the document in the same `routes!` call ([`router`],
//! [`openapi`]), so what is served and what is documented cannot differ.
//! Errors, axum's own rejections included, are [`AdminError`]s.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod clients;
pub mod dashboard;
pub mod error;
pub mod extract;
pub mod keys;
pub mod page;
pub mod request;
pub mod system;
pub mod verify;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request as AxumRequest, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::{Service, service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use self::error::AdminError;
use self::extract::Actor;
use crate::gateway::Gateway;
use crate::reload::Reloader;
use crate::server::watchdog::{self, Activity, Deadlines, Ended, Tracked, Watched};

/// Largest request body accepted; key calls are a few hundred bytes.
pub const MAX_BODY: usize = 64 * 1024;
/// How long admin calls in flight may finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The paths served without the token (for `GET` and `HEAD`): the probes,
/// and the dashboard's files, which hold no data (the page logs in itself;
/// a browser loading it cannot add the bearer header to that first request).
const OPEN_PATHS: &[&str] =
    &["/healthz", "/readyz", "/metrics", dashboard::PATHS[0], dashboard::PATHS[1], dashboard::PATHS[2]];

/// What the admin endpoints act on.
pub struct Admin {
    gateway: Arc<Gateway>,
    reloader: Arc<Reloader>,
    /// The key prefix the gateway started with. The verifier keeps the start
    /// prefix until a restart (a reload only warns), so keys issued here use
    /// it too, or they would not verify.
    prefix: String,
    /// `GET /admin/openapi.json`'s body, rendered once: it depends on the
    /// code only.
    openapi_json: Bytes,
}

impl Admin {
    pub fn new(reloader: Arc<Reloader>) -> Arc<Self> {
        let gateway = Arc::clone(reloader.gateway());
        let prefix = gateway.live.load().config.keys.prefix.clone();
        let openapi_json = Bytes::from(openapi_json());
        Arc::new(Self { gateway, reloader, prefix, openapi_json })
    }
}

// === Routes and document ===

/// Every operation, registered in the router and in the document at once.
fn operations() -> (Router<Arc<Admin>>, OpenApi) {
    OpenApiRouter::with_openapi(base_document())
        .routes(routes!(system::healthz))
        .routes(routes!(system::readyz))
        .routes(routes!(system::metrics))
        .routes(routes!(system::reload))
        .routes(routes!(system::usage))
        .routes(routes!(system::openapi))
        .routes(routes!(dashboard::page))
        .routes(routes!(dashboard::script))
        .routes(routes!(dashboard::style))
        .routes(routes!(keys::issue, keys::list))
        .routes(routes!(keys::show, keys::update))
        .routes(routes!(keys::revoke))
        .routes(routes!(keys::rotate))
        .routes(routes!(clients::create, clients::list))
        .routes(routes!(clients::show, clients::update))
        .routes(routes!(clients::revoke))
        .routes(routes!(verify::verify))
        .split_for_parts()
}

/// The admin API's router, ready to serve.
pub fn router(admin: Arc<Admin>) -> Router {
    let (routes, _) = operations();
    let routes = routes.fallback(no_route).with_state(Arc::clone(&admin));
    // Layers on the routes themselves would run inside each path's method
    // router, before it adds `Allow`; around the whole router they see the
    // finished answer.
    Router::new()
        .fallback_service(routes)
        // axum answers a known path with another method by an empty 405;
        // the contract wants the JSON error body (and keeps axum's `Allow`).
        .layer(middleware::map_response(method_not_allowed))
        // Outermost: the token is checked before routing, so unknown paths
        // and methods are refused alike without it.
        .layer(middleware::from_fn_with_state(Arc::clone(&admin), authorize))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        // Around everything: every answer, refusals of the token included,
        // carries the call's ID.
        .layer(middleware::from_fn_with_state(Arc::clone(&admin), request_id))
}

/// Gives the call its ID (the client's when sane, else a new one, as on the
/// public listener): error bodies name it (`AdminError`), and the answer
/// carries it in the configured header unless a handler set one.
async fn request_id(State(admin): State<Arc<Admin>>, request: AxumRequest, next: Next) -> Response {
    let header = admin.gateway.live.load().config.server.edge.request_id_header.clone();
    let id = crate::request_id::for_request(request.headers(), &header);
    let mut response = crate::request_id::scope(id.clone(), next.run(request)).await;
    response.headers_mut().entry(header).or_insert(id);
    response
}

/// The OpenAPI 3.1 document generated from the handlers.
pub fn openapi() -> OpenApi {
    let mut doc = operations().1;
    shared_answers(&mut doc);
    links(&mut doc);
    doc
}

/// Adds the answers every call of a kind can give, in one place rather than
/// on each handler: 401 for every call behind the token, 500 and 503 for
/// those that read the store.
fn shared_answers(doc: &mut OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
            )
            .build()
    };
    for (path, item) in doc.paths.paths.iter_mut() {
        let store = path.starts_with("/admin/keys")
            || path.starts_with("/admin/clients")
            || path == "/admin/usage"
            || path == "/admin/verify";
        for operation in [&mut item.get, &mut item.post, &mut item.patch].into_iter().flatten() {
            let responses = &mut operation.responses.responses;
            if !OPEN_PATHS.contains(&path.as_str()) {
                let missing = error("No token, a wrong token, or the admin API is off in the running config");
                responses.insert("401".to_owned(), missing.into());
            }
            if store {
                responses.insert("500".to_owned(), error("The store holds a record it cannot read").into());
                responses.insert("503".to_owned(), error("The store is unavailable; retry later").into());
            }
        }
    }
}

/// OpenAPI links from the answers that create a key or a client to the
/// calls on it, with the new record's `id`: the path a client (and
/// schemathesis' stateful tests) follows, issue -> show -> update -> rotate
/// -> revoke.
fn links(doc: &mut OpenApi) {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::link::LinkBuilder;
    let key_calls = ["show_key", "update_key", "rotate_key", "revoke_key"];
    let client_calls = ["show_client", "update_client", "revoke_client"];
    // Each creating call is a POST answering 201 with the record.
    for (path, targets) in [
        ("/admin/keys", &key_calls[..]),
        ("/admin/keys/{id}/rotate", &key_calls[..]),
        ("/admin/clients", &client_calls[..]),
    ] {
        let operation = doc.paths.paths.get_mut(path).and_then(|item| item.post.as_mut());
        let Some(RefOr::T(response)) = operation.and_then(|o| o.responses.responses.get_mut("201")) else {
            continue;
        };
        for target in targets {
            let link = LinkBuilder::new()
                .operation_id(*target)
                .parameter("id", "$response.body#/id")
                .description(format!("`{target}` on the record this call created"))
                .build();
            response.links.insert((*target).to_owned(), link.into());
        }
    }
}

/// The document as served and as written to `docs/admin-openapi.json`.
pub fn openapi_json() -> String {
    // Serialising a document of plain strings and maps cannot fail; an
    // empty document would fail the test that compares it with the file.
    let mut doc = serde_json::to_value(openapi()).unwrap_or_default();
    camel_case_links(&mut doc);
    if let Some(schemas) = doc.pointer_mut("/components/schemas").and_then(|s| s.as_object_mut()) {
        request::cross_field_rules(schemas);
    }
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    text
}

/// utoipa 5.5 serialises a Link Object's fields in snake case
/// (`operation_id`); OpenAPI spells them `operationId`, `operationRef` and
/// `requestBody`, and tools ignore the others.
fn camel_case_links(doc: &mut serde_json::Value) {
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else { return };
    let responses = paths
        .values_mut()
        .filter_map(|item| item.as_object_mut())
        .flat_map(|item| item.values_mut())
        .filter_map(|operation| operation.get_mut("responses").and_then(|r| r.as_object_mut()))
        .flat_map(|responses| responses.values_mut());
    for response in responses {
        let Some(links) = response.get_mut("links").and_then(|l| l.as_object_mut()) else { continue };
        for link in links.values_mut().filter_map(|link| link.as_object_mut()) {
            for (snake, camel) in [
                ("operation_id", "operationId"),
                ("operation_ref", "operationRef"),
                ("request_body", "requestBody"),
            ] {
                if let Some(value) = link.remove(snake) {
                    link.insert(camel.to_owned(), value);
                }
            }
        }
    }
}

/// What the handlers do not say: title, security, shared error answers,
/// and the links schemathesis and clients follow from a new key.
fn base_document() -> OpenApi {
    use utoipa::openapi::{ComponentsBuilder, InfoBuilder, OpenApiBuilder};
    let bearer = SecurityScheme::Http(
        HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some("The `[admin]` token (`token` or `token_env`)"))
            .build(),
    );
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("keygate admin API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Generated from the handlers (src/admin/); `KEYGATE_BLESS=1 cargo test --test \
                     admin_openapi` rewrites docs/admin-openapi.json. Errors are \
                     `{\"error\": CODE, \"message\": TEXT}`.",
                ))
                .build(),
        )
        .components(Some(ComponentsBuilder::new().security_scheme("bearer", bearer).build()))
        .security(Some([utoipa::openapi::security::SecurityRequirement::new(
            "bearer",
            std::iter::empty::<String>(),
        )]))
        .build()
}

/// Any path no handler serves (the token was already checked).
async fn no_route() -> AdminError {
    AdminError::NoRoute
}

/// axum's bare 405 as the contract's JSON error, `Allow` kept.
async fn method_not_allowed(response: Response) -> Response {
    if response.status() != StatusCode::METHOD_NOT_ALLOWED
        || response.headers().contains_key(header::CONTENT_TYPE)
    {
        return response;
    }
    let allow = response
        .headers()
        .get(header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .map(|allow| allow.split(',').map(str::trim).collect::<Vec<_>>().join(", "))
        .unwrap_or_default();
    AdminError::MethodNotAllowed { allow }.into_response()
}

/// The token check in front of every call but the probes; passes who acts
/// to the handlers as an [`Actor`], and logs each call's answer.
async fn authorize(State(admin): State<Arc<Admin>>, mut request: AxumRequest, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let open = OPEN_PATHS.contains(&path.as_str()) && matches!(method, Method::GET | Method::HEAD);
    let response = if open {
        next.run(request).await
    } else {
        match check_token(&admin.gateway, request.headers()) {
            Ok(actor) => {
                request.extensions_mut().insert(Actor(actor));
                next.run(request).await
            }
            Err(error) => error.into_response(),
        }
    };
    tracing::debug!(target: "keygate::admin", %method, %path, status = response.status().as_u16());
    response
}

/// Checks the bearer token against the running config's; returns the token's
/// name for the audit log.
fn check_token(gateway: &Gateway, headers: &HeaderMap) -> Result<String, AdminError> {
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
    let router = router(Arc::clone(&admin));
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
        let activity = Arc::new(Activity::default());
        let requests = Arc::clone(&activity);
        // The Router answers every request (its errors are answers too); the
        // watchdog counts each in flight until its body is done.
        let router = TowerToHyperService::new(router.clone());
        let service = service_fn(move |request: Request<Incoming>| {
            let guard = requests.request();
            let answer = router.call(request);
            async move {
                let response = answer.await?;
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
