//! `POST /admin/verify`: keygate's keys for backends that are not behind
//! the proxy (as Unkey's `verifyKey`). A backend sends the key its end user
//! presented, and optionally the route, method and cost of the request;
//! keygate answers whether the key is good for it, whose it is, and what is
//! left of its limits, spending them when asked.
//!
//! Why on the admin listener, behind the admin token: a key checker open to
//! anyone would be an oracle for guessing keys, without the proxy's
//! per-source budget in front of it. The applications that verify keys are
//! trusted backends: they hold the admin token.
//!
//! The steps are the proxy's own, not copies (`handler.rs`): verification by
//! [`Verifier::verify_for_backend`](crate::auth::Verifier::verify_for_backend)
//! (the cache, then the store), the route's scopes by [`crate::scope::check`],
//! and with `spend: true` the limits by
//! [`Limits::admit_caller`](crate::limit::Limits::admit_caller), then usage
//! by the same recorder, as a request on the route (or `(none)`) answered
//! 200, 403 or 429. `spend: false` is a dry check: nothing is spent or
//! recorded, and only credits, which can be read without spending, report
//! what is left (rate and quota are leased in slices across gateways, so
//! what is left of them is only known by spending).
//!
//! Failed verifications do not count against the caller's failed-
//! authentication budget: the backend asks for many end users from one
//! address, and one user's bad key must not lock the others out. The global
//! cap on store lookups for uncached keys still bounds what they cost.
//!
//! A refused key is an answer (200, `valid: false`), not an error; errors are
//! a bad body (400 naming the field) and a store that cannot answer (503).
//! The key string is never logged nor answered.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::response::Response;
use http::{Method, StatusCode};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{AdminError, ErrorBody};
use super::extract::{Call, Json};
use super::keys::{invalid, json};
use super::request::VerifyRequest;
use crate::auth::{Caller, Rejection};
use crate::config::{CredentialKind, RouteConfig};
use crate::error::GatewayError;
use crate::gateway::Live;
use crate::limit::Admission;
use crate::usage::{Refusal, UsageEvent};

/// The longest key string accepted (keys are about 60 bytes).
const MAX_KEY_LEN: usize = 512;
/// The most units one call may spend (a route's `cost` is far below).
const MAX_COST: u32 = 1_000_000;

/// The verdict on a key, in the contract's refusal terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Code {
    /// Good for the request: verified, in scope, within its limits.
    Valid,
    /// Malformed, or no such key (the proxy's 401 `invalid_key`).
    Invalid,
    /// The key, or its client, is revoked.
    Revoked,
    /// The key is past its expiry.
    Expired,
    /// The key lacks a scope the route needs for the method (403 `insufficient_scope`).
    Forbidden,
    /// Over its rate limit (429 `rate_limited`).
    RateLimited,
    /// Its quota for the period is spent (429 `quota_exceeded`).
    QuotaExceeded,
    /// Its usage credits are spent (429 `credits_exhausted`).
    CreditsExhausted,
}

/// What is left after this call, of each limit the key (or its client) has:
/// the least of the key's and its client's; `null` where no such limit is
/// set, and for rate and quota in a dry check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct Remaining {
    pub rate: Option<u64>,
    pub quota: Option<u64>,
    pub credits: Option<u64>,
}

/// `POST /admin/verify`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Verdict<'a> {
    /// `code` is `VALID`.
    pub valid: bool,
    pub code: Code,
    /// The key's client; `null` for a key that did not verify.
    #[schema(value_type = Option<String>)]
    pub client: Option<&'a str>,
    /// The key's ID (`CLIENT.KID`), never the key; `null` for a key that did not verify.
    #[schema(value_type = Option<String>)]
    pub key_id: Option<&'a str>,
    /// The key's scopes; `[]` for a key that did not verify.
    #[schema(value_type = Vec<String>)]
    pub scopes: &'a [String],
    pub remaining: Remaining,
    /// For `RATE_LIMITED`, `QUOTA_EXCEEDED` and `CREDITS_EXHAUSTED` with a
    /// refill: seconds until a retry may pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub retry_after: Option<u64>,
}

impl<'a> Verdict<'a> {
    fn refused_key(code: Code) -> Self {
        let remaining = Remaining::default();
        Self { valid: false, code, client: None, key_id: None, scopes: &[], remaining, retry_after: None }
    }

    fn of(caller: &'a Caller, code: Code, remaining: Remaining) -> Self {
        Self {
            valid: code == Code::Valid,
            code,
            client: Some(caller.client()),
            key_id: caller.key_id(),
            scopes: caller.scopes(),
            remaining,
            retry_after: None,
        }
    }
}

/// Verify a key for a backend not behind the proxy: valid or not, whose,
/// its scopes, what is left of its limits; `spend: true` spends them.
#[utoipa::path(
    post, path = "/admin/verify", operation_id = "verify_key", tag = "verify",
    request_body = VerifyRequest,
    responses(
        (status = 200, description = "The verdict; a refused key is `valid: false`", body = Verdict),
        (status = 400, description = "A field is invalid (an unknown route, a bad method or path), or the body is not JSON", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 415, description = "The body is not declared as JSON", body = ErrorBody),
    )
)]
pub async fn verify(call: Call, Json(body): Json<VerifyRequest>) -> Result<Response, AdminError> {
    let gateway = call.gateway();
    let live = gateway.live.load_full();
    // Bounded so that no key-sized string is hashed; the contents are the
    // verifier's to judge (and never echoed).
    if !(1..=MAX_KEY_LEN).contains(&body.key.expose().len()) {
        return Err(invalid("key", format!("must be 1 to {MAX_KEY_LEN} bytes")));
    }
    let method = match body.method.as_deref() {
        None => Method::GET,
        // Upper case as methods are sent (the proxy's scopes name them so).
        Some(text) if (1..=16).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_uppercase()) => {
            Method::from_bytes(text.as_bytes()).map_err(|_| invalid("method", "not an HTTP method"))?
        }
        Some(text) => return Err(invalid("method", format!("`{text}` is not an upper-case HTTP method"))),
    };
    let route = find_route(&live, body.route.as_deref(), body.path.as_deref())?;
    let cost = match body.cost {
        Some(cost @ 1..=MAX_COST) => NonZeroU32::new(cost).unwrap_or(NonZeroU32::MIN),
        Some(cost) => return Err(invalid("cost", format!("{cost} is not between 1 and {MAX_COST}"))),
        None => route.as_ref().map_or(NonZeroU32::MIN, |route| route.cost),
    };

    // 1. Verify: the cache, then the store, as the proxy does.
    let caller = match gateway.verifier.verify_for_backend(body.key.expose()).await {
        Ok(caller) => caller,
        Err(GatewayError::KeyRejected(reason)) => {
            return Ok(json(StatusCode::OK, &Verdict::refused_key(rejected(reason))));
        }
        Err(error) => return Err(unavailable(error)),
    };

    // 2. Scope: the route's, for the method (a public route needs none).
    let route_path = route.as_ref().map_or(crate::metrics::NO_ROUTE, |route| route.path.as_str());
    if let Some(route) = route.as_deref().filter(|route| !route.public)
        && crate::scope::check(caller.scopes(), route, &method).is_err()
    {
        if body.spend {
            record(&call, &caller, route_path, StatusCode::FORBIDDEN, Some(Refusal::Forbidden), 0);
        }
        return Ok(json(StatusCode::OK, &Verdict::of(&caller, Code::Forbidden, Remaining::default())));
    }

    // 3. Limits: spent as a proxied request spends them, or only read.
    if !body.spend {
        let remaining = Remaining { credits: credits_left(&call, &caller).await, ..Remaining::default() };
        return Ok(json(StatusCode::OK, &Verdict::of(&caller, Code::Valid, remaining)));
    }
    let limits = &live.config.limits;
    let admitted = gateway.limits.admit_caller(caller.key(), caller.client.as_deref(), cost, limits).await;
    let verdict = match admitted {
        Ok(admission) => {
            let credits = if admission.credits.is_some() { u64::from(cost.get()) } else { 0 };
            record(&call, &caller, route_path, StatusCode::OK, None, credits);
            Verdict::of(&caller, Code::Valid, remaining(&admission))
        }
        Err(refusal) => {
            let (code, retry_after, credits) = match &refusal.error {
                GatewayError::RateLimited { retry_after } => (Code::RateLimited, Some(*retry_after), None),
                GatewayError::QuotaExceeded { retry_after } => {
                    (Code::QuotaExceeded, Some(*retry_after), None)
                }
                GatewayError::CreditsExhausted { remaining, retry_after } => {
                    (Code::CreditsExhausted, *retry_after, Some(*remaining))
                }
                _ => return Err(unavailable(refusal.error)),
            };
            let refused = crate::meter::refusal_of(&refusal.error);
            record(&call, &caller, route_path, StatusCode::TOO_MANY_REQUESTS, refused, 0);
            let remaining = Remaining { credits, ..Remaining::default() };
            let mut verdict = Verdict::of(&caller, code, remaining);
            verdict.retry_after = retry_after.map(|wait| wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
            verdict
        }
    };
    Ok(json(StatusCode::OK, &verdict))
}

/// The route `name` (a configured route's `path`, for any host) or the one
/// `path` falls under, as the proxy matches it; both given, they must agree.
fn find_route(
    live: &Live,
    name: Option<&str>,
    path: Option<&str>,
) -> Result<Option<Arc<RouteConfig>>, AdminError> {
    let by_path = match path {
        None => None,
        Some(raw) => {
            let path = crate::path::normalize_path(raw).map_err(|e| invalid("path", e.to_string()))?;
            let found = live.routes.find(None, &path).map(|matched| matched.route);
            Some(found.ok_or_else(|| invalid("path", format!("no route serves `{path}`")))?)
        }
    };
    let route = match (name, by_path) {
        (None, by_path) => by_path,
        (Some(name), by_path) => {
            let named = live
                .routes
                .find(None, name)
                .filter(|matched| matched.route.path == name)
                .map(|matched| matched.route)
                .ok_or_else(|| invalid("route", format!("no route has the path `{name}`")))?;
            if by_path.as_ref().is_some_and(|found| !Arc::ptr_eq(found, &named)) {
                return Err(invalid("path", format!("the path is not under the route `{name}`")));
            }
            Some(named)
        }
    };
    if let Some(route) = &route
        && !route.public
        && !route.auth.accepts(CredentialKind::Key)
    {
        return Err(invalid(if name.is_some() { "route" } else { "path" }, "this route takes no keys"));
    }
    Ok(route)
}

/// The verdict for a key verification refused (`KeyRejected`'s reason).
fn rejected(reason: &str) -> Code {
    if reason == Rejection::Revoked.reason() || reason == Rejection::ClientRevoked.reason() {
        Code::Revoked
    } else if reason == Rejection::Expired.reason() {
        Code::Expired
    } else {
        Code::Invalid
    }
}

/// A verification or limit that could not be decided: the store, or the
/// limits' store, did not answer (503), or a record is unreadable (500).
fn unavailable(error: GatewayError) -> AdminError {
    match error {
        GatewayError::StoreUnavailable(cause) => AdminError::StoreUnavailable(cause),
        GatewayError::LookupsThrottled { .. } => {
            AdminError::StoreUnavailable("store lookups for uncached keys are over their cap".to_owned())
        }
        other => AdminError::Internal(other.to_string()),
    }
}

/// The least of the key's and the client's remaining, per limit.
fn remaining(admission: &Admission) -> Remaining {
    let (key, client) = (&admission.key, &admission.client);
    Remaining {
        rate: least(key.rate.map(|p| p.remaining), client.rate.map(|p| p.remaining)),
        quota: least(key.quota.map(|p| p.remaining), client.quota.map(|p| p.remaining)),
        credits: admission.credits,
    }
}

/// The credits left, read without spending: the least of the key's and its
/// client's; `None` if neither has credits (or the authority cannot say).
async fn credits_left(call: &Call, caller: &Caller) -> Option<u64> {
    use crate::ops::view::{client_remaining_credits, remaining_credits};
    let key = match caller.key() {
        Some(record) => remaining_credits(call.credits(), record).await.flatten(),
        None => None,
    };
    let client = match caller.client.as_deref() {
        Some(record) => client_remaining_credits(call.credits(), record).await.flatten(),
        None => None,
    };
    least(key, client)
}

/// The lesser of two limits' numbers, either of which may be unset.
fn least(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Records the call as the proxy records a request (`meter.rs`): for the
/// caller's client and key, on the route, with the answer it stands for.
fn record(
    call: &Call,
    caller: &Caller,
    route: &str,
    status: StatusCode,
    refusal: Option<Refusal>,
    credits: u64,
) {
    let Some(recorder) = &call.gateway().usage else { return };
    recorder.record(&UsageEvent {
        client: Some(caller.client()),
        key_id: caller.key_id(),
        route,
        status: status.as_u16(),
        refusal,
        bytes_in: 0,
        bytes_out: 0,
        credits,
        upstream_latency: None,
        tunnel: None,
        at: call.now,
    });
}
