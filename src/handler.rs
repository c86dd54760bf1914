//! The request path, top to bottom: the gateway's table of contents.
//!
//! ```text
//! route -> credential (key or client certificate) -> verify -> scope -> limit -> proxy -> usage
//! ```
//!
//! [`handle`] gives the request its ID, turns every outcome into a response
//! (errors through [`GatewayError::into_response`], the one mapping) and
//! hands the last phase (`meter`: usage, metrics, the access line) what it
//! needs. [`serve`] holds the steps; each step lives in its own module.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::Either;
use hyper::body::Incoming;

use crate::auth::Caller;
use crate::auth::jwt;
use crate::config::{CredentialKind, PlainHttp, RouteConfig, RouteTarget};
use crate::error::{GatewayError, Refusal};
use crate::gateway::{Gateway, Live};
use crate::meter::{self, Meter, MeteredBody, ResponseBody};
use crate::{credential, echo, limit, otel, path, proxy, request_id, route, sanitize, scope, tokens};

/// Facts about a request gathered along the way, for the access log and
/// the metering phase.
#[derive(Default)]
struct Trail {
    path: Option<String>,
    /// Whether the request reached its route's target (the access log then
    /// names it, from `route`).
    forwarded: bool,
    route: Option<Arc<RouteConfig>>,
    caller: Option<Arc<Caller>>,
    /// The caller came with an access token (its key's record stands
    /// behind it): the access log says `jwt`, not `key`.
    via_token: bool,
    upstream_latency: Option<std::time::Duration>,
    /// Usage credits spent at admission (kept when the upstream then fails:
    /// credits pay for admission, as Unkey's do).
    credits: u64,
    /// The client's address: the peer's, or behind trusted proxies the one
    /// they forwarded for.
    client_ip: Option<std::net::IpAddr>,
    /// The request is gRPC: refusals take gRPC's form, and `TE: trailers`
    /// is forwarded (gRPC servers may require it).
    grpc: bool,
    /// A WebSocket upgrade the upstream accepted (`101`), run once the
    /// client's `101` is on its way.
    tunnel: Option<proxy::upgrade::Tunnel>,
    /// The client connection's hold, kept by the tunnel while it runs.
    tunnel_hold: Option<proxy::upgrade::ConnectionHold>,
    /// The request's span, with `[tracing]` on (`otel`); each step below
    /// notes itself on it. Boxed: with tracing off it costs a null pointer.
    span: Option<Box<otel::RequestSpan>>,
}

/// Serves one request and never fails: every error, and even a panic inside
/// a step, becomes a response.
pub async fn handle(
    gateway: Arc<Gateway>,
    request: Request<Incoming>,
    peer: proxy::Peer,
) -> Response<MeteredBody> {
    let started = Instant::now();
    let in_flight = crate::metrics::request_started();
    // One config for the whole request, from the request ID to the log line.
    let live = gateway.live.load_full();
    // 0. Request ID: the client's when sane, else a new one; it goes
    // upstream, back on the response, in the error body and the log line.
    let id_header = &live.config.server.edge.request_id_header;
    let request_id = request_id::for_request(request.headers(), id_header);
    let method = request.method().clone();
    // 0a. Trace: with `[tracing]` on, the request's span, child of the
    // incoming `traceparent` when valid.
    let span = gateway.otel.as_ref().map(|otel| otel.request_span(&request));
    // The body's bytes as read from the client, whatever it declared
    // (a chunked upload declares nothing): counted as they pass.
    let (parts, body) = request.into_parts();
    // What the access line needs of the request as sent (reference counts).
    let sent = live
        .config
        .log
        .access
        .is_some()
        .then(|| (parts.uri.clone(), parts.headers.get(header::USER_AGENT).cloned()));
    let (body, bytes_in) = proxy::CountedBody::new(body);
    let request = Request::from_parts(parts, body);
    let mut trail = Trail { grpc: crate::error::is_grpc(request.headers()), span, ..Trail::default() };

    let outcome = AssertUnwindSafe(serve(&gateway, &live, request, &peer, started, &mut trail, &request_id))
        .catch_unwind()
        .await;
    let mut refusal = None;
    let refused = match outcome {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(refused)) => {
            refusal = meter::refusal_of(&refused.error);
            if let Some(kind) = refusal.and_then(metrics_refusal) {
                crate::metrics::refused(kind);
            }
            Err(refused)
        }
        Err(_panic) => Err(Refusal::from(GatewayError::Internal("request handler panicked".into()))),
    };
    let mut response = match refused {
        Ok(response) => response,
        Err(refused) if trail.grpc => refused.into_grpc_response().map(Either::Right),
        Err(refused) => refused.into_response_for(request_id.to_str().ok()).map(Either::Right),
    };
    // An upstream that answers with its own value keeps it (its headers
    // come back unchanged); every other answer carries the request's.
    response.headers_mut().entry(id_header).or_insert_with(|| request_id.clone());
    if let Some(span) = &mut trail.span {
        span.answered(response.status().as_u16(), request_id.to_str().unwrap_or_default());
    }

    // 8. Usage, metrics and the access line: when the response body ends,
    // or for an upgraded request when its tunnel closes.
    let access = sent.map(|(uri, user_agent)| meter::Access {
        config: Arc::clone(&live.config),
        request_id,
        method,
        path: trail.path.take(),
        uri,
        user_agent,
        peer: trail.client_ip.unwrap_or_else(|| peer.addr.ip()),
        forwarded: trail.forwarded,
        target: match response.body() {
            Either::Left(upstream) => Some(upstream.target().clone()),
            Either::Right(_) => None,
        },
        via_token: trail.via_token,
    });
    let tunnel = trail.tunnel.take();
    let meter = Meter {
        recorder: gateway.usage.clone(),
        route: trail.route,
        caller: trail.caller,
        status: response.status().as_u16(),
        refusal,
        bytes_in,
        credits: trail.credits,
        upstream_latency: trail.upstream_latency,
        started,
        access,
        in_flight,
        span: trail.span.take(),
    };
    match tunnel {
        // A tunnel exists only once the upstream switched protocols, and
        // this response is the client's side of that: its `101`, or over
        // HTTP/2 the `200` opening the stream.
        Some(tunnel) => {
            tokio::spawn(run_tunnel(tunnel, meter, trail.tunnel_hold.take()));
            response.map(MeteredBody::unmetered)
        }
        None => response.map(|body| MeteredBody::new(body, meter)),
    }
}

/// Runs an upgraded connection's tunnel to its end, then meters the request
/// (one request, the bytes both ways, its whole duration) and writes its
/// access line.
async fn run_tunnel(
    tunnel: proxy::upgrade::Tunnel,
    meter: Meter,
    hold: Option<proxy::upgrade::ConnectionHold>,
) {
    let end = tunnel.run().await;
    meter.finish_tunnel(end.bytes_in, end.bytes_out, end.reason.as_str());
    drop(hold);
}

async fn serve(
    gateway: &Gateway,
    live: &Live,
    mut request: Request<proxy::CountedBody>,
    peer: &proxy::Peer,
    started: Instant,
    trail: &mut Trail,
    request_id: &HeaderValue,
) -> Result<Response<ResponseBody>, Refusal> {
    // A WebSocket over HTTP/2 is checked as the GET it stands for; any
    // other CONNECT, and TRACE, are not served at all.
    proxy::upgrade::extended_connect_as_get(&mut request);
    if matches!(*request.method(), http::Method::CONNECT | http::Method::TRACE) {
        return Err(GatewayError::MethodNotAllowed(request.method().clone()).into());
    }

    // 1. Route: one host, one canonical path; decide and forward on those.
    let edge = &live.config.server.edge;
    let behind_proxy = peer.is_trusted(&edge.trusted_proxies);
    // The failed-authentication budget and the access log count by it.
    let client_ip = peer.client_ip(request.headers(), &edge.trusted_proxies);
    trail.client_ip = Some(client_ip);
    if edge.strict_paths {
        path::check_strict(request.uri().path()).map_err(GatewayError::from)?;
    }
    let path = path::normalize_path(request.uri().path()).map_err(GatewayError::from)?;
    // 1a. Tokens: the token endpoint and JWKS are the gateway's own, ahead
    // of the routes (`tokens.rs`).
    if let Some(tokens) = gateway.tokens.as_deref() {
        if path == live.config.tokens.path {
            trail.path = Some(path);
            let answer = tokens::token_endpoint(gateway, tokens, request, client_ip, started).await?;
            return Ok(answer.map(Either::Right));
        }
        if path == tokens::JWKS_PATH {
            trail.path = Some(path);
            return Ok(tokens::jwks(tokens)?.map(Either::Right));
        }
    }
    let host = sanitize::request_host(request.headers(), request.uri()).map_err(GatewayError::from)?;
    let matched =
        live.routes.find(host.as_ref().and_then(|h| h.to_str().ok()).map(sanitize::route_name), &path);
    let Some(route::RouteMatch { route, upstream_path }) = matched else {
        trail.path = Some(path);
        return Err(GatewayError::NoRoute.into());
    };
    // Sized exactly: a full `String` becomes the URI's `Bytes` without the
    // extra allocation a spare capacity costs.
    let query = request.uri().query();
    let mut path_and_query =
        String::with_capacity(upstream_path.len() + query.map_or(0, |query| query.len() + 1));
    path_and_query.push_str(upstream_path);
    if let Some(query) = query {
        path_and_query.push('?');
        path_and_query.push_str(query);
    }
    trail.path = Some(path);
    trail.route = Some(Arc::clone(&route));
    if let Some(span) = &mut trail.span {
        span.routed(&route.path, host.as_ref().and_then(|h| h.to_str().ok()).map(sanitize::route_name));
    }
    let route = &route;
    let keys = &live.config.keys;

    // 1b. TLS: a `tls_only` route answers cleartext before any key is read.
    if !peer.tls && route.plain != PlainHttp::Served {
        let https_port = gateway.tls.get().and_then(|edge| edge.https_port);
        return Err(plain_refusal(route.plain, host.as_ref(), https_port, request.uri()).into());
    }

    // 2. Credential: a key (bearer token, key header, or where the route
    // allows the query) on routes that take keys, or an access token (a
    // JWT as bearer) on routes that take those; else, on routes that take
    // them, the client certificate the TLS listener verified. A presented
    // key always wins: it is verified (and refused) as on a key-only route.
    let mut caller = None;
    let mut token_presented = false;
    if !route.public {
        let takes_keys = route.auth.accepts(CredentialKind::Key);
        let takes_tokens = route.auth.accepts(CredentialKind::Jwt);
        let presented = match takes_keys || takes_tokens {
            true => credential::find(request.headers(), request.uri().query(), keys, route.allow_query_key),
            false => credential::Presented::Missing,
        };
        let certificate = peer.client_certificate().filter(|_| route.auth.accepts(CredentialKind::Cert));

        // 3. Verify: cache, then store; malformed keys never reach the store.
        // A token's key supplies its limits and usage (`auth/token.rs`).
        let record = match (presented, certificate) {
            (credential::Presented::Key(token), _)
                if takes_tokens && (!takes_keys || jwt::looks_like_jwt(&token, &keys.prefix)) =>
            {
                // keygate's own access token, or an external issuer's.
                token_presented = true;
                let (tokens, issuers) = (gateway.tokens.as_deref(), gateway.issuers.as_deref());
                gateway.verifier.verify_jwt(tokens, issuers, route, &token, client_ip).await?
            }
            (credential::Presented::Key(key), _) => gateway.verifier.verify(&key, client_ip, started).await?,
            (credential::Presented::Ambiguous, _) => {
                return Err(GatewayError::KeyRejected("two different keys presented").into());
            }
            (credential::Presented::Missing, Some(cert)) => {
                let id_from = live.config.client_certs.id_from;
                gateway.verifier.verify_certificate(cert, id_from, started).await?
            }
            (credential::Presented::Missing, None) if takes_keys || takes_tokens => {
                return Err(GatewayError::MissingKey.into());
            }
            (credential::Presented::Missing, None) => return Err(GatewayError::MissingCertificate.into()),
        };
        trail.caller = Some(Arc::clone(&record));
        trail.via_token = token_presented;
        if let Some(span) = &mut trail.span {
            span.verified(record.client(), record.key_id());
        }

        // 4. Scope: the caller (key, or certificate's client) must cover
        // this route and method.
        scope::check(record.scopes(), route, request.method())
            .map_err(|missing| GatewayError::MissingScope(missing.to_owned()))?;

        // 5. Limits: the key's own, then its client's (shared by all of the
        // client's keys and certificates): quota, credits and rate, all or
        // nothing; refusals carry the headers.
        let admission = gateway
            .limits
            .admit_caller(record.key(), record.client.as_deref(), route.cost, &live.config.limits)
            .await?;
        if admission.credits.is_some() {
            trail.credits = u64::from(route.cost.get());
        }
        if let Some(span) = &mut trail.span {
            span.event("admitted");
        }

        caller = Some((record, admission));
    }

    // Every key carrier goes, not only the one read: a second copy must not
    // leak, and a key sent to a public route is still nobody else's business.
    credential::strip(request.headers_mut(), &mut path_and_query, route, keys);
    // An access token is a credential like a key: the upstream gets the
    // identity headers, not the bearer (it can verify tokens by the JWKS).
    if token_presented {
        credential::strip_jwt_bearers(request.headers_mut(), &keys.prefix);
    }
    // The refresh-token cookie is the token endpoint's alone, whatever
    // path a browser sent it to (`refresh::cookie`).
    if gateway.tokens.is_some() {
        crate::refresh::cookie::strip(request.headers_mut());
    }
    // The scopes were checked against this method and path; no header may
    // make the upstream run another.
    if edge.strip_override_headers {
        sanitize::remove_override_headers(request.headers_mut());
    }

    // 6. Proxy: rewrite headers, then forward (or answer from the echo). A
    // WebSocket handshake to an upstream is forwarded as one, the checks
    // above passed; the client's connection is upgraded only on the
    // upstream's `101`.
    let client_upgrade = (matches!(route.target, RouteTarget::Upstream(_))
        && proxy::upgrade::is_websocket(&request))
    .then(|| hyper::upgrade::on(&mut request));
    if client_upgrade.is_some() {
        trail.tunnel_hold = request.extensions_mut().remove::<proxy::upgrade::ConnectionHold>();
    }
    *request.uri_mut() = Uri::from_maybe_shared(Bytes::from(path_and_query))
        .map_err(|e| GatewayError::Internal(format!("rebuilding the upstream path: {e}")))?;
    let headers = request.headers_mut();
    // Room for what is added below, made at once. A keep-alive HTTP/1.1
    // request reuses the previous response's map, already big enough; on a
    // new connection or an HTTP/2 stream the map is sized to the headers the
    // client sent and would grow (rehashing) twice (callgrind: ~1k
    // instructions per new connection).
    headers.reserve(proxy::ADDED_REQUEST_HEADERS);
    proxy::remove_hop_by_hop(headers);
    if client_upgrade.is_some() {
        proxy::upgrade::restore_upgrade_headers(headers);
    }
    if trail.grpc {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // An upstream gets its own target's `Host` (set by the pool); the echo,
    // standing in for an upstream served at the gateway's own address,
    // shows the one the client asked for, as such an upstream would get it.
    let echo_host = match route.target {
        RouteTarget::Echo => host.clone(),
        RouteTarget::Upstream(_) => None,
    };
    proxy::set_forwarded(headers, peer, behind_proxy, peer.scheme(), host);
    match echo_host {
        Some(host) => headers.insert(header::HOST, host),
        None => headers.remove(header::HOST),
    };
    proxy::set_identity(headers, keys, caller.as_ref().map(|(caller, _)| &caller.identity));
    // Set after the hop-by-hop removal: a client naming it in `Connection`
    // cannot keep it from the upstream.
    headers.insert(edge.request_id_header.clone(), request_id.clone());
    // With tracing on, upstream's parent is the gateway's span (the
    // client's `traceparent` is replaced); off, it passes untouched.
    if let (Some(otel), Some(span)) = (&gateway.otel, &mut trail.span) {
        otel.inject(span, headers);
        span.event("upstream.request");
    }

    let mut response = match &route.target {
        RouteTarget::Echo => {
            trail.forwarded = true;
            Box::pin(echo::answer(request, &route.body)).await?.map(Either::Right)
        }
        RouteTarget::Upstream(name) => {
            trail.forwarded = true;
            let pool = live
                .upstreams
                .get(name)
                .ok_or_else(|| GatewayError::Internal(format!("route names unknown upstream {name}")))?;
            // tokio's clock, which the upstream timeout runs on (the same
            // as std's outside tests with a paused clock).
            let sent = tokio::time::Instant::now();
            // Whom `client_hash` keeps on one target: the API client, or
            // on public routes the client's address.
            let affinity =
                proxy::Affinity { client: trail.caller.as_ref().map(|c| c.client()), ip: client_ip };
            let response = match client_upgrade {
                None => pool.forward(request, sent, route, affinity).await,
                Some(client) => match pool.forward_upgrade(request, sent, route, affinity, client).await {
                    Ok((response, tunnel)) => {
                        trail.tunnel = tunnel;
                        Ok(response)
                    }
                    Err(error) => Err(error),
                },
            };
            trail.upstream_latency = Some(sent.elapsed());
            if let Some(span) = &mut trail.span {
                span.upstream_answered(sent.elapsed());
            }
            response?.map(Either::Left)
        }
    };

    // 7. Tell the client where it stands against its limits and credits.
    if let Some((_, admission)) = &caller {
        if live.config.limits.headers {
            limit::write_headers(response.headers_mut(), admission, live.config.limits.legacy_headers);
        }
        limit::write_credits_header(response.headers_mut(), admission);
    }
    Ok(response)
}

/// What a `tls_only` route answers a cleartext request: with `tls_redirect`,
/// a 308 to the same path and query on `https://` at the TLS listener's port
/// (left out when 443); a 403 when redirecting is off, or impossible (no TLS
/// listener bound, no host to send the client to).
fn plain_refusal(
    plain: PlainHttp,
    host: Option<&HeaderValue>,
    https_port: Option<u16>,
    uri: &Uri,
) -> GatewayError {
    let (PlainHttp::Redirect, Some(host), Some(port)) =
        (plain, host.and_then(|h| h.to_str().ok()), https_port)
    else {
        return GatewayError::TlsRequired;
    };
    let name = sanitize::route_name(host);
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 {
        format!("https://{name}{target}")
    } else {
        format!("https://{name}:{port}{target}")
    };
    // The host passed `request_host`'s character check and the target is
    // the request's own: the value is valid; a 403 if it were not.
    HeaderValue::from_str(&location)
        .map_or(GatewayError::TlsRequired, |location| GatewayError::RedirectToHttps { location })
}

/// Rate and quota refusals, as the metrics count them.
fn metrics_refusal(refusal: crate::usage::Refusal) -> Option<crate::metrics::Refusal> {
    match refusal {
        crate::usage::Refusal::RateLimited => Some(crate::metrics::Refusal::RateLimited),
        crate::usage::Refusal::QuotaExceeded => Some(crate::metrics::Refusal::QuotaExceeded),
        crate::usage::Refusal::CreditsExhausted => Some(crate::metrics::Refusal::CreditsExhausted),
        crate::usage::Refusal::Unauthorized | crate::usage::Refusal::Forbidden => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleartext_on_a_tls_only_route_is_redirected_to_the_tls_port_or_refused() {
        let uri: Uri = "/v1/orders?page=2".parse().unwrap();
        let host = HeaderValue::from_static("api.example:8080");
        let location = |port| match plain_refusal(PlainHttp::Redirect, Some(&host), Some(port), &uri) {
            GatewayError::RedirectToHttps { location } => location,
            other => panic!("not a redirect: {other:?}"),
        };
        assert_eq!(location(8443), "https://api.example:8443/v1/orders?page=2");
        assert_eq!(location(443), "https://api.example/v1/orders?page=2", "the default port is left out");
        for (plain, host, port) in [
            (PlainHttp::Refused, Some(&host), Some(8443)),
            (PlainHttp::Redirect, None, Some(8443)),
            (PlainHttp::Redirect, Some(&host), None),
        ] {
            let refusal = plain_refusal(plain, host, port, &uri);
            assert!(matches!(refusal, GatewayError::TlsRequired), "{plain:?} {host:?} {port:?}: {refusal:?}");
        }
    }
}
