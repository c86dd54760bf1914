//! The token endpoint (RFC 6749) and the JWKS document, answered by the
//! gateway itself when `[tokens] enabled`.
//!
//! `POST <[tokens] path>` with `grant_type=client_credentials` (§4.4)
//! trades an API key, sent as HTTP Basic `client_id:key` (§2.3.1) or as a
//! bearer token, for an access token (see `auth::jwt`). The key is verified
//! exactly as on a route (so refusals count toward the source's
//! failed-authentication budget), its rate limit applies to the endpoint,
//! and `scope` may narrow its scopes, never widen them. Refusals are
//! §5.2's (`GatewayError::TokenRequest`, mapped in `error.rs`).
//!
//! `GET /.well-known/jwks.json` publishes the public signing keys, so
//! upstreams can verify the tokens themselves.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};

use crate::auth::jwt::{TokenVerifier, narrow_scopes};
use crate::credential;
use crate::error::{GatewayError, OAuthError, Refusal, json_response};
use crate::gateway::Gateway;
use crate::proxy::CountedBody;

/// Where the JWKS document is served.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// A token request's form is a few short fields; more is not one.
const MAX_FORM_BYTES: usize = 8 * 1024;
/// How long the client may take to send that form.
const FORM_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers a request to the token endpoint.
pub async fn token_endpoint(
    gateway: &Gateway,
    tokens: &TokenVerifier,
    request: Request<CountedBody>,
    client_ip: IpAddr,
    started: Instant,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let oauth = |e| Refusal::from(GatewayError::TokenRequest(e));
    if request.method() != Method::POST {
        return Err(oauth(OAuthError::InvalidRequest));
    }
    let presented = presented_key(request.headers()).ok_or_else(|| oauth(OAuthError::InvalidClient))?;
    let (_, body) = request.into_parts();
    let form = match tokio::time::timeout(FORM_TIMEOUT, Limited::new(body, MAX_FORM_BYTES).collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) | Err(_) => return Err(oauth(OAuthError::InvalidRequest)),
    };
    let form = Form::parse(&form).ok_or_else(|| oauth(OAuthError::InvalidRequest))?;
    match form.grant_type.as_deref() {
        Some("client_credentials") => {}
        Some(_) => return Err(oauth(OAuthError::UnsupportedGrantType)),
        None => return Err(oauth(OAuthError::InvalidRequest)),
    }

    let caller = match gateway.verifier.verify(&presented, client_ip, started).await {
        Ok(caller) => caller,
        Err(GatewayError::KeyRejected(_)) => return Err(oauth(OAuthError::InvalidClient)),
        Err(other) => return Err(other.into()),
    };
    // Only keys mint tokens: a key's limits are what its tokens spend.
    let Some(key) = caller.key() else { return Err(oauth(OAuthError::InvalidClient)) };
    let limits = &gateway.live.load().config.limits;
    let subject = [crate::limit::Subject::key(key)];
    gateway.limits.admit(&subject, std::num::NonZeroU32::MIN, limits).await?;
    let scopes =
        narrow_scopes(caller.scopes(), form.scope.as_deref()).map_err(|_| oauth(OAuthError::InvalidScope))?;

    let now = u64::try_from(jiff::Timestamp::now().as_second()).unwrap_or(0);
    let keys = tokens.keys();
    let (token, claims) = keys.issue(key.client(), key.id.as_str(), &scopes, now);
    let body = serde_json::json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": claims.exp - claims.iat,
        "scope": claims.scope,
    });
    Ok(no_store(json_response(StatusCode::OK, body.to_string())))
}

/// `GET /.well-known/jwks.json`.
pub fn jwks(tokens: &TokenVerifier) -> Response<Full<Bytes>> {
    let mut response = json_response(StatusCode::OK, tokens.keys().jwks().to_string());
    // Public, and changes only with a key rotation: caches may keep it a while.
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
    response
}

/// RFC 6749 §5.1: token responses must not be cached.
fn no_store(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// The key: Basic's password (its user name is the client ID, which the
/// key names itself), else a bearer token.
fn presented_key(headers: &http::HeaderMap) -> Option<String> {
    let authorization = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(token) = credential::bearer_token(authorization) {
        return Some(token.to_owned());
    }
    let (scheme, encoded) = authorization.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (_client_id, key) = decoded.split_once(':')?;
    // §2.3.1: both parts are form-urlencoded before Basic encoding.
    Some(percent_encoding::percent_decode_str(key).decode_utf8().ok()?.into_owned())
}

/// The fields of a token request (`application/x-www-form-urlencoded`).
#[derive(Debug, Default, PartialEq, Eq)]
struct Form {
    grant_type: Option<String>,
    scope: Option<String>,
}

impl Form {
    /// `None` if a field is repeated (§3.2: "MUST NOT be included more
    /// than once") or the body is not UTF-8.
    fn parse(body: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(body).ok()?;
        let mut form = Self::default();
        for pair in text.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode_str(&value.replace('+', " "))
                .decode_utf8()
                .ok()?
                .into_owned();
            let field = match name {
                "grant_type" => &mut form.grant_type,
                "scope" => &mut form.scope,
                _ => continue,
            };
            if field.replace(value).is_some() {
                return None;
            }
        }
        Some(form)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_form_is_decoded_and_a_repeated_field_refused() {
        let form = Form::parse(b"grant_type=client_credentials&scope=read+orders%3Awrite&x=1").expect("form");
        assert_eq!(form.grant_type.as_deref(), Some("client_credentials"));
        assert_eq!(form.scope.as_deref(), Some("read orders:write"));
        assert_eq!(Form::parse(b"scope=a&scope=b"), None);
    }

    #[test]
    fn the_key_comes_from_basic_or_bearer() {
        let mut headers = http::HeaderMap::new();
        let basic = base64::engine::general_purpose::STANDARD.encode("acme:kg_acme.k1.s%2Fx");
        headers
            .insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Basic {basic}")).expect("value"));
        assert_eq!(presented_key(&headers).as_deref(), Some("kg_acme.k1.s/x"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer kg_acme.k1.s"));
        assert_eq!(presented_key(&headers).as_deref(), Some("kg_acme.k1.s"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Digest x"));
        assert_eq!(presented_key(&headers), None);
    }
}
