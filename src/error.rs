//! The one place that maps errors to responses.
//!
//! Every answer the gateway gives itself is JSON `{"error": CODE, "message": TEXT}`,
//! plus `"request_id"` when it answers a request (see `request_id`).
//! The match in [`GatewayError::status_and_code`] is exhaustive on purpose: a
//! new variant does not compile until someone decides its status. Client
//! errors are not logged as errors; each 5xx is logged once with its cause,
//! and the cause never reaches the client.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::path::PathError;

/// Why a request was not (fully) served.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no route for this path")]
    NoRoute,
    #[error("bad request path: {0}")]
    BadPath(#[from] PathError),
    #[error("bad host: {0}")]
    BadHost(#[from] crate::sanitize::HostError),
    #[error("no API key in the request")]
    MissingKey,
    /// A route that takes client certificates only (`auth = ["cert"]`)
    /// was reached without a verified one.
    #[error("no verified client certificate on the connection")]
    MissingCertificate,
    /// The key is malformed, unknown, expired or revoked. The reason is for the
    /// log only: all of them answer the same, so nobody can learn which keys exist.
    #[error("API key rejected: {0}")]
    KeyRejected(&'static str),
    /// An access token (JWT) is malformed, forged, expired, or its key is
    /// revoked. As for keys, the reason is for the log only.
    #[error("access token rejected: {0}")]
    TokenRejected(&'static str),
    /// The token endpoint refused a request, in RFC 6749 §5.2's terms.
    #[error("token request refused: {0:?}")]
    TokenRequest(OAuthError),
    #[error("key lacks scope {0}")]
    MissingScope(String),
    #[error("rate limit exceeded")]
    RateLimited { retry_after: Duration },
    #[error("quota exceeded")]
    QuotaExceeded { retry_after: Duration },
    /// The key's usage credits are spent. `retry_after`: until the next
    /// refill, if the grant has one (without, waiting does not help).
    #[error("credits exhausted")]
    CreditsExhausted { remaining: u64, retry_after: Option<Duration> },
    /// The store could not be asked about a key the gateway had not cached.
    #[error("key store unavailable: {0}")]
    StoreUnavailable(String),
    /// The request's source IP failed authentication too often; its keyed
    /// requests are refused unverified until its budget recovers.
    #[error("too many failed authentications from this source")]
    TooManyAuthFailures { retry_after: Duration },
    /// The global cap on store lookups for uncached keys was reached; the
    /// store was not asked. Counted in `/metrics`, so not logged as an error
    /// (a flood of garbage keys must not flood the error log either).
    #[error("store lookups for uncached keys are over their cap")]
    LookupsThrottled { retry_after: Duration },
    /// The store has a record for the key that it cannot decode (hand-edited,
    /// schema drift). Not an outage: the key is refused, no stale copy served.
    /// A 503, not a 401: the key may be fine and its holder not at fault;
    /// the operator's data is, and a 5xx is what gets logged and alerted on.
    #[error("unreadable key record: {0}")]
    CorruptRecord(String),
    /// An external issuer's JWKS has never been fetched successfully (its
    /// identity provider is down or unreachable since the gateway
    /// started): its tokens cannot be checked either way. A 503, not a
    /// 401: the token may be fine, and a client told "invalid" would throw
    /// it away and log in again, onto an identity provider already in
    /// trouble. Not logged per request: each failed fetch is, once.
    #[error("no signing keys of issuer {issuer} are loaded")]
    JwksUnavailable { issuer: String, retry_after: Duration },
    #[error("upstream {upstream} unreachable: {cause}")]
    UpstreamUnreachable { upstream: String, cause: String },
    #[error("upstream {upstream} did not answer within {after:?}")]
    UpstreamTimeout { upstream: String, after: Duration },
    /// The upstream answered with a head the gateway cannot pass on
    /// faithfully (framed two ways, an unknown transfer coding, unparseable).
    #[error("upstream {upstream} sent a bad response: {reason}")]
    UpstreamBadResponse { upstream: String, reason: String },
    /// TLS to an `https://` target failed: its certificate is not trusted,
    /// expired or for another name, or it refused ours. `reason` is rustls'
    /// (for the log line, which names upstream and target; never the client).
    /// Boxed: the variant is rare, and with three strings inline it made
    /// every `GatewayError` 72 bytes instead of 56.
    #[error("upstream {upstream} target {}: TLS failed: {}", .failure.target, .failure.reason)]
    UpstreamTls { upstream: String, failure: Box<TlsFailure> },
    /// Every connection the upstream's `max_connections` allows was busy for
    /// the whole connect timeout.
    #[error("upstream {upstream} has all its connections busy")]
    UpstreamBusy { upstream: String },
    /// The upstream's circuit breaker is open: `limit` (`max_requests` or
    /// `max_pending`) was full, so nothing was sent.
    #[error("upstream {upstream} is over its {limit}")]
    UpstreamOverloaded { upstream: String, limit: &'static str },
    /// The client's body did not parse or ended early: the client's fault,
    /// never blamed on the upstream.
    #[error("bad request body: {0}")]
    BadRequestBody(String),
    #[error("request body over the route's limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    /// The client paused mid-body longer than the route's `upload_idle_timeout`.
    #[error("request body stalled for {after:?}")]
    RequestBodyTimeout { after: Duration },
    /// `CONNECT` (other than a WebSocket's extended CONNECT) or `TRACE`:
    /// a gateway in front of APIs opens no tunnels to arbitrary hosts and
    /// echoes no requests (TRACE would show the upstream's view of the
    /// request, identity headers included).
    #[error("method {0} is not served")]
    MethodNotAllowed(http::Method),
    /// A `tls_only` route asked over cleartext HTTP (`tls_redirect = false`).
    #[error("this route is served over HTTPS only")]
    TlsRequired,
    /// A `tls_only` route with `tls_redirect`: the same URL on `https://`.
    #[error("redirected to HTTPS")]
    RedirectToHttps { location: HeaderValue },
    /// A bug or an impossible state; details go to the log, never to the client.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The token endpoint's refusals (RFC 6749 §5.2), each with its `error`
/// code; the status is chosen in [`GatewayError::status_and_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthError {
    /// Not a form, a grant type missing, a parameter repeated.
    InvalidRequest,
    /// No key, or a key that is not valid (401 with a `Basic` challenge).
    InvalidClient,
    /// A refresh token that is unknown, expired, used or revoked.
    InvalidGrant,
    /// A scope the key does not hold.
    InvalidScope,
    UnsupportedGrantType,
}

impl OAuthError {
    pub fn code(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidClient => "invalid_client",
            Self::InvalidGrant => "invalid_grant",
            Self::InvalidScope => "invalid_scope",
            Self::UnsupportedGrantType => "unsupported_grant_type",
        }
    }
}

/// Which target a TLS failure was with, and rustls' reason.
#[derive(Debug)]
pub struct TlsFailure {
    pub target: String,
    pub reason: String,
}

/// What the client sees for an error: status, a stable code for scripts,
/// and a message that never carries internals.
pub struct ErrorAnswer {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl GatewayError {
    pub fn answer(&self) -> ErrorAnswer {
        let (status, code) = self.status_and_code();
        let message = match self {
            Self::NoRoute => "no route matches this request".to_owned(),
            Self::BadPath(e) => format!("bad request path: {e}"),
            Self::BadHost(e) => format!("bad host: {e}"),
            Self::MissingKey => "an API key is required".to_owned(),
            Self::MissingCertificate => "a verified client certificate is required".to_owned(),
            Self::KeyRejected(_) => "the API key is not valid".to_owned(),
            Self::TokenRejected(_) => "the access token is not valid".to_owned(),
            Self::TokenRequest(OAuthError::InvalidRequest) => "the token request is malformed".to_owned(),
            Self::TokenRequest(OAuthError::InvalidClient) => "client authentication failed".to_owned(),
            Self::TokenRequest(OAuthError::InvalidGrant) => "the refresh token is not valid".to_owned(),
            Self::TokenRequest(OAuthError::InvalidScope) => {
                "the requested scope exceeds the key's scopes".to_owned()
            }
            Self::TokenRequest(OAuthError::UnsupportedGrantType) => {
                "grant_type must be client_credentials".to_owned()
            }
            Self::MissingScope(scope) => format!("this API key lacks the scope `{scope}`"),
            Self::RateLimited { .. } => "rate limit exceeded; retry later".to_owned(),
            Self::QuotaExceeded { .. } => "quota exhausted for the current window".to_owned(),
            Self::CreditsExhausted { retry_after: Some(_), .. } => {
                "this API key's credits are used up until the next refill".to_owned()
            }
            Self::CreditsExhausted { retry_after: None, .. } => {
                "this API key's credits are used up".to_owned()
            }
            Self::StoreUnavailable(_) => "the key store is unavailable; retry later".to_owned(),
            Self::TooManyAuthFailures { .. } => {
                "too many failed authentications from this address; retry later".to_owned()
            }
            Self::LookupsThrottled { .. } => "the key store is busy; retry later".to_owned(),
            Self::JwksUnavailable { .. } => {
                "the token issuer's signing keys are unavailable; retry later".to_owned()
            }
            Self::CorruptRecord(_) => {
                "this API key's record cannot be read; retry later or contact the operator".to_owned()
            }
            Self::UpstreamUnreachable { .. } => "the upstream service is unreachable".to_owned(),
            Self::UpstreamTimeout { .. } => "the upstream service did not answer in time".to_owned(),
            Self::UpstreamBadResponse { .. } => "the upstream service sent an invalid response".to_owned(),
            Self::UpstreamTls { .. } => {
                "the upstream service could not be reached securely (TLS failed)".to_owned()
            }
            Self::UpstreamBusy { .. } => "the upstream service is busy; retry later".to_owned(),
            Self::UpstreamOverloaded { .. } => "the upstream service is overloaded; retry later".to_owned(),
            Self::BadRequestBody(_) => "the request body is malformed or incomplete".to_owned(),
            Self::BodyTooLarge { limit } => {
                format!("the request body exceeds this route's limit of {limit} bytes")
            }
            Self::RequestBodyTimeout { .. } => "the request body stopped arriving".to_owned(),
            Self::TlsRequired => "this route is served over HTTPS only".to_owned(),
            Self::MethodNotAllowed(method) => format!("{method} is not served by this gateway"),
            Self::RedirectToHttps { .. } => "this route is served over HTTPS; follow the Location".to_owned(),
            Self::Internal(_) => "internal gateway error".to_owned(),
        };
        ErrorAnswer { status, code, message }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            Self::BadPath(_) => (StatusCode::BAD_REQUEST, "bad_path"),
            Self::BadHost(_) => (StatusCode::BAD_REQUEST, "bad_host"),
            Self::MissingKey => (StatusCode::UNAUTHORIZED, "missing_key"),
            Self::MissingCertificate => (StatusCode::UNAUTHORIZED, "missing_certificate"),
            Self::KeyRejected(_) => (StatusCode::UNAUTHORIZED, "invalid_key"),
            Self::TokenRejected(_) => (StatusCode::UNAUTHORIZED, "invalid_token"),
            // RFC 6749 §5.2: 401 for a failed client authentication, else 400.
            Self::TokenRequest(e @ OAuthError::InvalidClient) => (StatusCode::UNAUTHORIZED, e.code()),
            Self::TokenRequest(e) => (StatusCode::BAD_REQUEST, e.code()),
            Self::MissingScope(_) => (StatusCode::FORBIDDEN, "insufficient_scope"),
            Self::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::QuotaExceeded { .. } => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
            Self::CreditsExhausted { .. } => (StatusCode::TOO_MANY_REQUESTS, "credits_exhausted"),
            Self::StoreUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            Self::TooManyAuthFailures { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_auth_failures"),
            Self::LookupsThrottled { .. } => (StatusCode::SERVICE_UNAVAILABLE, "store_busy"),
            Self::CorruptRecord(_) => (StatusCode::SERVICE_UNAVAILABLE, "key_record_unreadable"),
            Self::JwksUnavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "jwks_unavailable"),
            Self::UpstreamUnreachable { .. } => (StatusCode::BAD_GATEWAY, "upstream_unreachable"),
            Self::UpstreamTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            Self::UpstreamBadResponse { .. } => (StatusCode::BAD_GATEWAY, "upstream_bad_response"),
            Self::UpstreamTls { .. } => (StatusCode::BAD_GATEWAY, "upstream_tls_failed"),
            Self::UpstreamBusy { .. } => (StatusCode::SERVICE_UNAVAILABLE, "upstream_busy"),
            Self::UpstreamOverloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "upstream_overloaded"),
            Self::BadRequestBody(_) => (StatusCode::BAD_REQUEST, "bad_request_body"),
            Self::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            Self::RequestBodyTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            Self::TlsRequired => (StatusCode::FORBIDDEN, "tls_required"),
            Self::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::RedirectToHttps { .. } => (StatusCode::PERMANENT_REDIRECT, "tls_required"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// Builds the JSON response, with the headers the status calls for.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        self.into_response_for(None)
    }

    /// [`Self::into_response`] for the request `request_id`, which the
    /// body names (`"request_id"`) so a client can quote it.
    pub fn into_response_for(self, request_id: Option<&str>) -> Response<Full<Bytes>> {
        let answer = self.answer();
        let logged_elsewhere = matches!(self, Self::LookupsThrottled { .. } | Self::JwksUnavailable { .. });
        if answer.status.is_server_error() && !logged_elsewhere {
            tracing::error!(status = answer.status.as_u16(), cause = %self, "request failed");
        } else {
            tracing::debug!(status = answer.status.as_u16(), reason = %self, "request refused");
        }
        let mut body = match &self {
            // RFC 6749 §5.2 names the text `error_description`; `message`
            // stays for the contract's clients.
            Self::TokenRequest(_) => serde_json::json!({
                "error": answer.code, "error_description": answer.message, "message": answer.message,
            }),
            _ => serde_json::json!({ "error": answer.code, "message": answer.message }),
        };
        if let (Some(id), Some(fields)) = (request_id, body.as_object_mut()) {
            fields.insert("request_id".to_owned(), id.into());
        }
        let body = body.to_string();
        let mut response = json_response(answer.status, body);
        let headers = response.headers_mut();
        match &self {
            // RFC 9110 asks a 401 for a challenge; no HTTP scheme names a
            // TLS client certificate, so certificate-only routes send the
            // same realm (a client reading it learns only that it must
            // authenticate).
            Self::MissingKey | Self::MissingCertificate | Self::KeyRejected(_) => {
                headers
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"keygate\""));
            }
            // RFC 6750 §3.
            Self::TokenRejected(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"keygate\", error=\"invalid_token\""),
                );
            }
            // RFC 6749 §5.2: a 401 challenges the scheme the client used;
            // Basic is what the endpoint documents.
            Self::TokenRequest(e) => {
                // RFC 6749 §5.1: token endpoint answers are never cached.
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                if *e == OAuthError::InvalidClient {
                    headers.insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Basic realm=\"keygate\""),
                    );
                }
            }
            // RFC 9110 §15.5.6: a 405 lists the methods that are served
            // (which of them a route takes is the upstream's to say).
            Self::MethodNotAllowed(_) => {
                headers.insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            Self::MissingScope(scope) => {
                if let Ok(v) = HeaderValue::from_str(&format!(
                    "Bearer realm=\"keygate\", error=\"insufficient_scope\", scope=\"{scope}\""
                )) {
                    headers.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            Self::RateLimited { retry_after }
            | Self::QuotaExceeded { retry_after }
            | Self::TooManyAuthFailures { retry_after }
            | Self::LookupsThrottled { retry_after }
            | Self::JwksUnavailable { retry_after, .. }
            | Self::CreditsExhausted { retry_after: Some(retry_after), .. } => {
                // Round up: retrying after a truncated value would be refused again.
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            // Connections free up as fast as the upstream answers: soon.
            Self::UpstreamBusy { .. } | Self::UpstreamOverloaded { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::RedirectToHttps { location } => {
                headers.insert(header::LOCATION, location.clone());
            }
            // The rest of the body is not read: this connection cannot carry another request.
            Self::BadRequestBody(_) | Self::BodyTooLarge { .. } | Self::RequestBodyTimeout { .. } => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

/// An error on its way to the client, with any headers the step that
/// refused wants to add (a 429's `RateLimit` headers). `?` turns a plain
/// [`GatewayError`] into one.
#[derive(Debug)]
pub struct Refusal {
    pub error: GatewayError,
    pub headers: http::HeaderMap,
}

impl From<GatewayError> for Refusal {
    fn from(error: GatewayError) -> Self {
        Self { error, headers: http::HeaderMap::new() }
    }
}

impl Refusal {
    pub fn into_response(self) -> Response<Full<Bytes>> {
        self.into_response_for(None)
    }

    /// The JSON refusal of request `request_id` (named in the body).
    pub fn into_response_for(self, request_id: Option<&str>) -> Response<Full<Bytes>> {
        let mut response = self.error.into_response_for(request_id);
        response.headers_mut().extend(self.headers);
        response
    }

    /// The refusal in gRPC's form, for a client that sent
    /// `content-type: application/grpc*` (see [`is_grpc`]): a trailers-only
    /// response (HTTP 200, headers and no body) whose `grpc-status` is what
    /// the HTTP status means to gRPC and whose `grpc-message` is the JSON
    /// answer's message, percent-encoded. `Retry-After`, the `RateLimit`
    /// headers and the challenge stay, as metadata a client may read; so
    /// does the request ID header, which the handler sets on every answer.
    pub fn into_grpc_response(self) -> Response<Full<Bytes>> {
        let message = self.error.answer().message;
        let mut response = self.into_response();
        let status = grpc_status(response.status());
        *response.status_mut() = StatusCode::OK;
        *response.body_mut() = Full::default();
        let headers = response.headers_mut();
        // HTTP/1-only framing hints mean nothing to gRPC (and HTTP/2 forbids `Connection`).
        headers.remove(header::CONNECTION);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(GRPC_STATUS, HeaderValue::from(status));
        if let Ok(message) = HeaderValue::from_str(&grpc_percent_encode(&message)) {
            headers.insert(GRPC_MESSAGE, message);
        }
        response
    }
}

const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");

/// Whether a request is gRPC (`application/grpc`, `application/grpc+proto`,
/// `application/grpc-web` ...): its refusals are answered in gRPC's form.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().get(..16).is_some_and(|p| p.eq_ignore_ascii_case(b"application/grpc")))
}

/// The gRPC status code (grpc/doc/statuscodes.md, and its HTTP mapping)
/// for the gateway's HTTP status.
fn grpc_status(status: StatusCode) -> u16 {
    match status.as_u16() {
        401 => 16,       // UNAUTHENTICATED
        403 => 7,        // PERMISSION_DENIED
        404 => 5,        // NOT_FOUND: no route
        429 => 8,        // RESOURCE_EXHAUSTED
        502..=504 => 14, // UNAVAILABLE
        _ => 13,         // INTERNAL
    }
}

/// `grpc-message`'s encoding (gRPC over HTTP/2 spec): every byte outside
/// printable ASCII, and `%` itself, as `%XX`.
fn grpc_percent_encode(message: &str) -> String {
    let mut encoded = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// A JSON response with the given status and body.
pub fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn answer(error: GatewayError) -> (StatusCode, http::HeaderMap, serde_json::Value) {
        let response = error.into_response();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn a_grpc_refusal_is_a_trailers_only_200_with_the_grpc_status() {
        let cases = [
            (GatewayError::MissingKey, "16"),
            (GatewayError::MissingScope("chat".into()), "7"),
            (GatewayError::RateLimited { retry_after: Duration::from_secs(2) }, "8"),
            (GatewayError::NoRoute, "5"),
            (GatewayError::UpstreamUnreachable { upstream: "a".into(), cause: "x".into() }, "14"),
            (GatewayError::UpstreamBusy { upstream: "a".into() }, "14"),
            (GatewayError::UpstreamTimeout { upstream: "a".into(), after: Duration::from_secs(1) }, "14"),
            (GatewayError::BodyTooLarge { limit: 1 }, "13"),
        ];
        for (error, code) in cases {
            let what = format!("{error:?}");
            let response = Refusal::from(error).into_grpc_response();
            let (parts, body) = response.into_parts();
            assert_eq!(parts.status, 200, "{what}");
            assert_eq!(parts.headers["content-type"], "application/grpc", "{what}");
            assert_eq!(parts.headers["grpc-status"], code, "{what}");
            assert!(!parts.headers["grpc-message"].is_empty(), "{what}");
            assert!(!parts.headers.contains_key(header::CONNECTION), "{what}");
            assert!(body.collect().await.unwrap().to_bytes().is_empty(), "{what}: trailers-only");
        }
    }

    #[test]
    fn grpc_messages_are_percent_encoded_and_grpc_content_types_recognised() {
        assert_eq!(grpc_percent_encode("lacks `chat`: 100% é"), "lacks `chat`: 100%25 %C3%A9");
        let with = |value: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            is_grpc(&headers)
        };
        assert!(with("application/grpc"));
        assert!(with("application/grpc+proto"));
        assert!(with("Application/GRPC-web"));
        assert!(!with("application/json"));
        assert!(!with("application/gr"));
        assert!(!is_grpc(&http::HeaderMap::new()));
    }

    #[tokio::test]
    async fn a_rejected_token_is_401_invalid_token_with_the_rfc_6750_challenge() {
        let (status, headers, body) = answer(GatewayError::TokenRejected("expired")).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"], "invalid_token");
        assert!(!body["message"].as_str().unwrap().contains("expired"), "the reason stays in the log");
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer realm=\"keygate\", error=\"invalid_token\"");
    }

    #[tokio::test]
    async fn token_request_refusals_are_rfc_6749_errors() {
        let cases = [
            (OAuthError::InvalidRequest, 400, "invalid_request"),
            (OAuthError::InvalidClient, 401, "invalid_client"),
            (OAuthError::InvalidGrant, 400, "invalid_grant"),
            (OAuthError::InvalidScope, 400, "invalid_scope"),
            (OAuthError::UnsupportedGrantType, 400, "unsupported_grant_type"),
        ];
        for (error, want_status, want_code) in cases {
            let (status, headers, body) = answer(GatewayError::TokenRequest(error)).await;
            assert_eq!((status.as_u16(), body["error"].as_str()), (want_status, Some(want_code)));
            assert!(body["error_description"].is_string(), "{body}");
            assert_eq!(headers[header::CACHE_CONTROL], "no-store");
            let challenge = headers.get(header::WWW_AUTHENTICATE);
            assert_eq!(challenge.is_some(), error == OAuthError::InvalidClient, "{error:?}");
        }
    }

    #[tokio::test]
    async fn an_error_body_names_the_request_id_when_there_is_one() {
        let response = Refusal::from(GatewayError::NoRoute).into_response_for(Some("req-1"));
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "error": "no_route", "message": "no route matches this request", "request_id": "req-1",
            })
        );
        let (_, _, body) = answer(GatewayError::NoRoute).await;
        assert!(body.get("request_id").is_none(), "{body}");
    }

    #[tokio::test]
    async fn no_route_is_404() {
        let (status, _, body) = answer(GatewayError::NoRoute).await;
        assert_eq!(status, 404);
        assert_eq!(body["error"], "no_route");
    }

    #[tokio::test]
    async fn bad_path_is_400() {
        let (status, _, body) = answer(GatewayError::BadPath(PathError::AboveRoot)).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "bad_path");
    }

    #[tokio::test]
    async fn bad_host_is_400() {
        let (status, _, body) = answer(GatewayError::BadHost(crate::sanitize::HostError::Duplicate)).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "bad_host");
    }

    #[tokio::test]
    async fn missing_key_is_401_with_challenge() {
        let (status, headers, body) = answer(GatewayError::MissingKey).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"], "missing_key");
        assert!(headers[header::WWW_AUTHENTICATE].to_str().unwrap().starts_with("Bearer"));
    }

    #[tokio::test]
    async fn missing_certificate_is_401_with_the_contract_body_and_challenge() {
        let (status, headers, body) = answer(GatewayError::MissingCertificate).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"], "missing_certificate");
        assert!(body["message"].as_str().unwrap().contains("client certificate"));
        assert!(headers.contains_key(header::WWW_AUTHENTICATE));
    }

    #[tokio::test]
    async fn every_key_rejection_reason_answers_identically() {
        let mut seen = Vec::new();
        for reason in
            ["malformed", "unknown", "expired", "revoked", "client mismatch", "certificate names no client"]
        {
            let (status, headers, body) = answer(GatewayError::KeyRejected(reason)).await;
            assert_eq!(status, 401);
            assert!(headers.contains_key(header::WWW_AUTHENTICATE));
            seen.push(body.to_string());
        }
        seen.dedup();
        assert_eq!(seen.len(), 1, "bodies must not reveal the reason: {seen:?}");
        assert!(!seen[0].contains("revoked"));
    }

    #[tokio::test]
    async fn missing_scope_is_403_naming_the_scope() {
        let (status, headers, body) = answer(GatewayError::MissingScope("orders:write".into())).await;
        assert_eq!(status, 403);
        assert_eq!(body["error"], "insufficient_scope");
        assert!(body["message"].as_str().unwrap().contains("orders:write"));
        assert!(headers[header::WWW_AUTHENTICATE].to_str().unwrap().contains("scope=\"orders:write\""));
    }

    #[tokio::test]
    async fn rate_limited_is_429_with_rounded_up_retry_after() {
        let (status, headers, body) =
            answer(GatewayError::RateLimited { retry_after: Duration::from_millis(1500) }).await;
        assert_eq!(status, 429);
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(headers[header::RETRY_AFTER], "2");
    }

    #[tokio::test]
    async fn credits_exhausted_is_429_with_retry_after_only_when_a_refill_is_due() {
        let (status, headers, body) =
            answer(GatewayError::CreditsExhausted { remaining: 0, retry_after: None }).await;
        assert_eq!(status, 429);
        assert_eq!(body["error"], "credits_exhausted");
        assert!(!headers.contains_key(header::RETRY_AFTER), "waiting does not bring credits back");
        let (status, headers, body) = answer(GatewayError::CreditsExhausted {
            remaining: 2,
            retry_after: Some(Duration::from_millis(3_600_500)),
        })
        .await;
        assert_eq!(status, 429);
        assert_eq!(body["error"], "credits_exhausted");
        assert_eq!(headers[header::RETRY_AFTER], "3601");
        assert!(body["message"].as_str().unwrap().contains("refill"));
    }

    #[tokio::test]
    async fn quota_exceeded_is_429_with_its_own_code() {
        let (status, headers, body) =
            answer(GatewayError::QuotaExceeded { retry_after: Duration::from_secs(3600) }).await;
        assert_eq!(status, 429);
        assert_eq!(body["error"], "quota_exceeded");
        assert_eq!(headers[header::RETRY_AFTER], "3600");
    }

    #[tokio::test]
    async fn store_unavailable_is_503_without_internals() {
        let (status, _, body) =
            answer(GatewayError::StoreUnavailable("redis://10.0.0.5 refused".into())).await;
        assert_eq!(status, 503);
        assert_eq!(body["error"], "store_unavailable");
        assert!(!body.to_string().contains("10.0.0.5"));
    }

    #[tokio::test]
    async fn too_many_auth_failures_is_429_with_retry_after_and_no_challenge() {
        let (status, headers, body) =
            answer(GatewayError::TooManyAuthFailures { retry_after: Duration::from_millis(50) }).await;
        assert_eq!(status, 429);
        assert_eq!(body["error"], "too_many_auth_failures");
        assert_eq!(headers[header::RETRY_AFTER], "1", "at least a second");
        assert!(!headers.contains_key(header::WWW_AUTHENTICATE));
    }

    #[tokio::test]
    async fn throttled_store_lookups_are_503_store_busy_with_retry_after() {
        let (status, headers, body) =
            answer(GatewayError::LookupsThrottled { retry_after: Duration::from_millis(2500) }).await;
        assert_eq!(status, 503);
        assert_eq!(body["error"], "store_busy");
        assert_eq!(headers[header::RETRY_AFTER], "3");
    }

    #[tokio::test]
    async fn an_issuer_without_keys_is_503_with_retry_after_and_no_challenge() {
        let error = GatewayError::JwksUnavailable {
            issuer: "https://idp.internal".into(),
            retry_after: Duration::from_secs(30),
        };
        let (status, headers, body) = answer(error).await;
        assert_eq!(status, 503);
        assert_eq!(body["error"], "jwks_unavailable");
        assert_eq!(headers[header::RETRY_AFTER], "30");
        assert!(!headers.contains_key(header::WWW_AUTHENTICATE), "the token is not judged");
        assert!(!body.to_string().contains("idp.internal"));
    }

    #[tokio::test]
    async fn an_unreadable_record_is_503_without_naming_it() {
        let cause = "corrupt key record redis key `kg:{acme}:key:ab12`: field `status`: disabled";
        let (status, headers, body) = answer(GatewayError::CorruptRecord(cause.into())).await;
        assert_eq!(status, 503);
        assert_eq!(body["error"], "key_record_unreadable");
        assert!(!body.to_string().contains("kg:") && !body.to_string().contains("disabled"));
        assert!(!headers.contains_key(header::RETRY_AFTER));
    }

    #[tokio::test]
    async fn upstream_unreachable_is_502_without_internals() {
        let error = GatewayError::UpstreamUnreachable {
            upstream: "api".into(),
            cause: "connection refused 10.1.1.1".into(),
        };
        let (status, _, body) = answer(error).await;
        assert_eq!(status, 502);
        assert_eq!(body["error"], "upstream_unreachable");
        assert!(!body.to_string().contains("10.1.1.1"));
    }

    #[tokio::test]
    async fn upstream_timeout_is_504() {
        let error = GatewayError::UpstreamTimeout { upstream: "api".into(), after: Duration::from_secs(1) };
        let (status, _, body) = answer(error).await;
        assert_eq!(status, 504);
        assert_eq!(body["error"], "upstream_timeout");
    }

    #[tokio::test]
    async fn upstream_bad_response_is_502_without_internals() {
        let error = GatewayError::UpstreamBadResponse {
            upstream: "api".into(),
            reason: "both Content-Length and Transfer-Encoding from 10.1.1.1".into(),
        };
        let (status, _, body) = answer(error).await;
        assert_eq!(status, 502);
        assert_eq!(body["error"], "upstream_bad_response");
        assert!(!body.to_string().contains("10.1.1.1"));
    }

    #[tokio::test]
    async fn upstream_tls_failure_is_502_without_the_reason() {
        let failure = TlsFailure {
            target: "10.1.1.1:443".into(),
            reason: "invalid peer certificate: UnknownIssuer".into(),
        };
        let error = GatewayError::UpstreamTls { upstream: "api".into(), failure: Box::new(failure) };
        assert!(error.to_string().contains("api") && error.to_string().contains("UnknownIssuer"));
        let (status, _, body) = answer(error).await;
        assert_eq!(status, 502);
        assert_eq!(body["error"], "upstream_tls_failed");
        assert!(!body.to_string().contains("10.1.1.1") && !body.to_string().contains("UnknownIssuer"));
    }

    #[tokio::test]
    async fn upstream_busy_is_503_with_retry_after() {
        let (status, headers, body) = answer(GatewayError::UpstreamBusy { upstream: "api".into() }).await;
        assert_eq!(status, 503);
        assert_eq!(body["error"], "upstream_busy");
        assert_eq!(headers[header::RETRY_AFTER], "1");
        let overloaded = GatewayError::UpstreamOverloaded { upstream: "api".into(), limit: "max_requests" };
        let (status, headers, body) = answer(overloaded).await;
        assert_eq!(status, 503);
        assert_eq!(body["error"], "upstream_overloaded");
        assert_eq!(headers[header::RETRY_AFTER], "1");
        assert!(!body.to_string().contains("max_requests"), "the cap is the operator's business: {body}");
    }

    #[tokio::test]
    async fn client_body_errors_are_4xx_and_close_the_connection() {
        let cases = [
            (GatewayError::BadRequestBody("invalid chunk size line".into()), 400, "bad_request_body"),
            (GatewayError::BodyTooLarge { limit: 1024 }, 413, "body_too_large"),
            (GatewayError::RequestBodyTimeout { after: Duration::from_secs(30) }, 408, "body_timeout"),
        ];
        for (error, want_status, want_code) in cases {
            let (status, headers, body) = answer(error).await;
            assert_eq!(status, want_status);
            assert_eq!(body["error"], want_code);
            assert_eq!(headers[header::CONNECTION], "close");
        }
    }

    #[tokio::test]
    async fn tls_only_refusals_are_403_or_a_308_with_its_location() {
        let (status, headers, body) = answer(GatewayError::TlsRequired).await;
        assert_eq!(status, 403);
        assert_eq!(body["error"], "tls_required");
        assert!(!headers.contains_key(header::LOCATION));
        let location = HeaderValue::from_static("https://api.example:8443/v1?q=1");
        let (status, headers, body) = answer(GatewayError::RedirectToHttps { location }).await;
        assert_eq!(status, 308);
        assert_eq!(body["error"], "tls_required");
        assert_eq!(headers[header::LOCATION], "https://api.example:8443/v1?q=1");
    }

    #[tokio::test]
    async fn internal_is_500_without_details() {
        let (status, _, body) =
            answer(GatewayError::Internal("index out of range at foo.rs:12".into())).await;
        assert_eq!(status, 500);
        assert_eq!(body["error"], "internal");
        assert!(!body.to_string().contains("foo.rs"));
    }
}
