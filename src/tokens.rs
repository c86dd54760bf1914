//! The token endpoint (RFC 6749) and the JWKS document, answered by the
//! gateway itself when `[tokens] enabled`.
//!
//! `POST <[tokens] path>` with `grant_type=client_credentials` (§4.4)
//! trades an API key, sent as HTTP Basic `client_id:key` (§2.3.1) or as a
//! bearer token, for an access token (see `auth::jwt`) and a refresh token. The key is verified
//! exactly as on a route (so refusals count toward the source's
//! failed-authentication budget), its rate limit applies to the endpoint,
//! and `scope` may narrow its scopes, never widen them. Refusals are
//! §5.2's (`GatewayError::TokenRequest`, mapped in `error.rs`).
//!
//! `grant_type=refresh_token` (§6) trades a refresh token for a new access
//! token and the refresh token's successor (`refresh::grant`: rotation,
//! reuse detection); for browsers the refresh token can travel in a secure
//! cookie instead of the body (`refresh::cookie`).
//!
//! `GET /.well-known/jwks.json` publishes the public signing keys, so
//! upstreams can verify the tokens themselves.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};

use crate::auth::jwt::{TokenKeys, TokenVerifier, narrow_scopes};
use crate::credential;
use crate::error::{GatewayError, OAuthError, Refusal, json_response};
use crate::gateway::Gateway;
use crate::proxy::CountedBody;
use crate::refresh::{RefreshToken, cookie, grant};

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
    if request.method() != Method::POST {
        return Err(oauth(OAuthError::InvalidRequest));
    }
    let (parts, body) = request.into_parts();
    let form = match tokio::time::timeout(FORM_TIMEOUT, Limited::new(body, MAX_FORM_BYTES).collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) | Err(_) => return Err(oauth(OAuthError::InvalidRequest)),
    };
    let form = Form::parse(&form).ok_or_else(|| oauth(OAuthError::InvalidRequest))?;
    // Taken before anything is spent or rotated, so a refresh token is
    // never used up for an answer that cannot be signed.
    let keys = tokens.keys().ok_or_else(|| {
        Refusal::from(GatewayError::StoreUnavailable("signing keys not loaded yet".to_owned()))
    })?;
    let request =
        TokenRequest { gateway, tokens, keys, headers: &parts.headers, form: &form, client_ip, started };
    match form.grant_type.as_deref() {
        Some("client_credentials") => request.client_credentials().await,
        Some("refresh_token") if gateway.refresh.is_some() => request.refresh().await,
        Some(_) => Err(oauth(OAuthError::UnsupportedGrantType)),
        None => Err(oauth(OAuthError::InvalidRequest)),
    }
}

fn oauth(error: OAuthError) -> Refusal {
    Refusal::from(GatewayError::TokenRequest(error))
}

/// One token request, read.
struct TokenRequest<'a> {
    gateway: &'a Gateway,
    tokens: &'a TokenVerifier,
    /// The signing keys of the moment.
    keys: std::sync::Arc<TokenKeys>,
    headers: &'a http::HeaderMap,
    form: &'a Form,
    client_ip: IpAddr,
    started: Instant,
}

impl TokenRequest<'_> {
    /// §4.4: the key, verified as on a route, for a new pair (a new
    /// refresh-token family).
    async fn client_credentials(&self) -> Result<Response<Full<Bytes>>, Refusal> {
        let presented = presented_key(self.headers).ok_or_else(|| oauth(OAuthError::InvalidClient))?;
        let caller = self.authenticate(&presented).await?;
        // Only keys mint tokens: a key's limits are what its tokens spend.
        let Some(key) = caller.key() else { return Err(oauth(OAuthError::InvalidClient)) };
        let limits = &self.gateway.live.load().config.limits;
        let subject = [crate::limit::Subject::key(key)];
        self.gateway.limits.admit(&subject, std::num::NonZeroU32::MIN, limits).await?;
        let scopes = narrow_scopes(caller.scopes(), self.form.scope.as_deref())
            .map_err(|_| oauth(OAuthError::InvalidScope))?;
        let now = self.tokens.clock().unix_now();
        let config = &self.gateway.live.load().config.tokens;
        let refresh = match self.gateway.refresh.as_deref() {
            Some(store) => Some(grant::start_family(store, key, &scopes, config.refresh_ttl, now).await?),
            None => None,
        };
        Ok(self.answer(key, &scopes, refresh.as_ref(), now))
    }

    /// §6: the refresh token (form, else the cookie) for its successor and
    /// a new access token (`refresh::grant`).
    async fn refresh(&self) -> Result<Response<Full<Bytes>>, Refusal> {
        let Some(store) = self.gateway.refresh.as_deref() else {
            return Err(oauth(OAuthError::UnsupportedGrantType));
        };
        let live = self.gateway.live.load();
        let config = &live.config.tokens;
        let (presented, from_cookie) = match &self.form.refresh_token {
            Some(token) => (token.clone(), false),
            None if config.refresh_cookie => {
                let mut found = cookie::values(self.headers, &cookie::name(&config.refresh_cookie_path));
                found.dedup();
                match found.as_slice() {
                    [one] => ((*one).to_owned(), true),
                    _ => return Err(oauth(OAuthError::InvalidRequest)),
                }
            }
            None => return Err(oauth(OAuthError::InvalidRequest)),
        };
        self.refresh_with(store, &presented).await.map_err(|mut refusal| {
            // A dead token in the cookie would be presented on every page
            // load: tell the browser to drop it.
            let dead = matches!(refusal.error, GatewayError::TokenRequest(OAuthError::InvalidGrant));
            if from_cookie
                && dead
                && let Some(clear) = cookie::clear(&config.refresh_cookie_path)
            {
                refusal.headers.insert(header::SET_COOKIE, clear);
            }
            refusal
        })
    }

    /// [`refresh`](Self::refresh) once the token is found.
    async fn refresh_with(
        &self,
        store: &dyn crate::refresh::RefreshStore,
        presented: &str,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        let live = self.gateway.live.load();
        let config = &live.config.tokens;
        // The refresh token alone is the credential (public clients); a
        // client that authenticates as well must be the token's.
        if self.headers.contains_key(header::AUTHORIZATION) {
            let key = presented_key(self.headers).ok_or_else(|| oauth(OAuthError::InvalidClient))?;
            let caller = self.authenticate(&key).await?;
            let token_client = RefreshToken::parse(presented).map(|t| t.client().to_owned());
            if token_client.is_some_and(|client| caller.key().is_none_or(|k| k.client() != client)) {
                return Err(oauth(OAuthError::InvalidClient));
            }
        }
        let now = self.tokens.clock().unix_now();
        let requested = self.form.scope.as_deref();
        let refreshed = grant::refresh(
            self.gateway,
            store,
            presented,
            requested,
            self.client_ip,
            config.refresh_ttl,
            now,
        )
        .await?;
        let Some(key) = refreshed.caller.key() else { return Err(oauth(OAuthError::InvalidGrant)) };
        Ok(self.answer(key, &refreshed.scopes, Some(&refreshed.token), now))
    }

    /// The key, verified as on a route (refusals spend the source's
    /// failed-authentication budget): `invalid_client` if it is not good.
    async fn authenticate(&self, presented: &str) -> Result<std::sync::Arc<crate::auth::Caller>, Refusal> {
        match self.gateway.verifier.verify(presented, self.client_ip, self.started).await {
            Ok(caller) => Ok(caller),
            Err(GatewayError::KeyRejected(_)) => Err(oauth(OAuthError::InvalidClient)),
            Err(other) => Err(other.into()),
        }
    }

    /// §5.1: a new access token for `key` with `scopes`, and the refresh
    /// token in the body or, for browsers, in its cookie.
    fn answer(
        &self,
        key: &crate::store::KeyRecord,
        scopes: &[String],
        refresh: Option<&RefreshToken>,
        now: u64,
    ) -> Response<Full<Bytes>> {
        let live = self.gateway.live.load();
        let config = &live.config.tokens;
        let (token, claims) = self.keys.issue(key.client(), key.id.as_str(), scopes, now);
        let mut body = serde_json::json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": claims.exp - claims.iat,
            "scope": claims.scope,
        });
        let mut set_cookie = None;
        if let Some(refresh) = refresh {
            if config.refresh_cookie {
                let path = &config.refresh_cookie_path;
                set_cookie = cookie::set(refresh.expose(), path, config.refresh_ttl.as_secs());
            } else {
                body["refresh_token"] = refresh.expose().into();
            }
        }
        let mut response = no_store(json_response(StatusCode::OK, body.to_string()));
        if let Some(value) = set_cookie {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
        response
    }
}

/// `GET /.well-known/jwks.json`.
pub fn jwks(tokens: &TokenVerifier) -> Result<Response<Full<Bytes>>, GatewayError> {
    let keys = tokens
        .keys()
        .ok_or_else(|| GatewayError::StoreUnavailable("signing keys not loaded yet".to_owned()))?;
    let mut response = json_response(StatusCode::OK, keys.jwks(tokens.clock().unix_now()).to_string());
    // Public, and changes only with a rotation, which publishes a key two
    // `key_refresh` before it signs: a cache that keeps the document one
    // `key_refresh` knows every key before it signs.
    let max_age = format!("public, max-age={}", tokens.key_refresh().as_secs().max(1));
    if let Ok(value) = HeaderValue::from_str(&max_age) {
        response.headers_mut().insert(header::CACHE_CONTROL, value);
    }
    Ok(response)
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
    refresh_token: Option<String>,
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
                "refresh_token" => &mut form.refresh_token,
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
