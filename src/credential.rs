//! Finding the API key in a request, and removing it before forwarding.
//!
//! A key may come as `Authorization: Bearer <key>`, in the configured header
//! (default `x-api-key`), or, on routes that allow it, in a query parameter.
//! Every value of every carrier is looked at, not only the first: a request
//! may repeat a header, and what the gateway did not read must not slip
//! through to the upstream either. So [`strip`] removes everything that is,
//! or could be, one of our keys (anything starting with the key prefix,
//! including the password of `Basic`), on every route; other credentials
//! (an upstream's own bearer token or Basic login) pass. The identity
//! headers set later tell the upstream who called.

use std::borrow::Cow;

use base64::Engine as _;
use http::HeaderValue;
use http::header::{self, HeaderMap};

use crate::config::{KeysConfig, RouteConfig};

/// What the carriers of a request hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Presented<'a> {
    /// No key anywhere.
    Missing,
    /// The key text to verify.
    Key(Cow<'a, str>),
    /// Two different values that both look like our keys: which one the
    /// client meant cannot be told, so neither is verified.
    Ambiguous,
}

/// Looks for a key in every bearer token, every value of the key header,
/// and (when allowed) the query. A value that starts with the key prefix wins
/// over one that does not (an upstream's own bearer token beside an
/// `x-api-key`); with none, the first value found is verified, so a mistyped
/// key is answered as malformed rather than as missing.
pub fn find<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    keys: &KeysConfig,
    allow_query: bool,
) -> Presented<'a> {
    let bearers = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(bearer_token)
        .map(Cow::Borrowed);
    let in_header =
        headers.get_all(&keys.header).iter().filter_map(|v| v.to_str().ok()).map(|v| Cow::Borrowed(v.trim()));
    let in_query = query
        .filter(|_| allow_query)
        .into_iter()
        .flat_map(form_pairs)
        .filter(|(name, _)| name == &keys.query_param)
        .map(|(_, value)| value);

    let mut first = None;
    let mut ours: Option<Cow<'a, str>> = None;
    for candidate in bearers.chain(in_header).chain(in_query) {
        if candidate.starts_with(&keys.prefix) {
            match &ours {
                Some(seen) if *seen != candidate => return Presented::Ambiguous,
                Some(_) => {}
                None => ours = Some(candidate),
            }
        } else if first.is_none() {
            first = Some(candidate);
        }
    }
    match ours.or(first) {
        Some(key) => Presented::Key(key),
        None => Presented::Missing,
    }
}

/// Removes every `Authorization: Bearer <JWT>` (after an access token was
/// verified); other `Authorization` values are left to [`strip`].
pub fn strip_jwt_bearers(headers: &mut HeaderMap, key_prefix: &str) {
    let is_jwt_bearer = |v: &HeaderValue| {
        v.to_str()
            .ok()
            .and_then(bearer_token)
            .is_some_and(|token| crate::auth::jwt::looks_like_jwt(token, key_prefix))
    };
    // The usual request (one `Authorization`, the token) allocates nothing.
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    if values.all(is_jwt_bearer) {
        headers.remove(header::AUTHORIZATION);
        return;
    }
    let kept: Vec<HeaderValue> =
        headers.get_all(header::AUTHORIZATION).iter().filter(|v| !is_jwt_bearer(v)).cloned().collect();
    headers.remove(header::AUTHORIZATION);
    for value in kept {
        headers.append(header::AUTHORIZATION, value);
    }
}

/// The token of `Bearer <token>`, if that is what it is. The scheme is
/// case-insensitive (RFC 9110 §11.1): `bearer` and `BEARER` are the same.
pub fn bearer_token(value: &str) -> Option<&str> {
    credentials_of(value, "bearer")
}

/// The credentials after `scheme` in an `Authorization` value. Any run of
/// white space separates them (RFC 9110 asks for spaces; a tab must not hide
/// a key from [`strip`]).
fn credentials_of<'v>(value: &'v str, scheme: &str) -> Option<&'v str> {
    let value = value.trim();
    let at = value.find(|c: char| c.is_ascii_whitespace())?;
    let (given, rest) = value.split_at(at);
    given.eq_ignore_ascii_case(scheme).then(|| rest.trim()).filter(|t| !t.is_empty())
}

/// `a=1&b=x%20y` as decoded pairs.
fn form_pairs(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &'_ str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
        (decode(name).into(), decode(value).into())
    })
}

/// Whether an `Authorization` value carries one of our keys: a bearer token
/// with our prefix, or a Basic login whose password has it. A bearer token
/// without the prefix cannot be a key the gateway accepted (parsing requires
/// it), so it is the upstream's own and passes.
fn carries_key(value: &HeaderValue, keys: &KeysConfig) -> bool {
    let Ok(text) = value.to_str() else {
        // Not text, so not a key the gateway could read; nothing to judge.
        return false;
    };
    if let Some(token) = bearer_token(text) {
        return token.starts_with(&keys.prefix);
    }
    let Some(encoded) = credentials_of(text, "basic") else { return false };
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()
        .and_then(|login| String::from_utf8(login).ok())
        .is_some_and(|login| {
            login.split_once(':').is_some_and(|(_, password)| password.starts_with(&keys.prefix))
        })
}

/// Removes every place a key can travel: the key header (all of its
/// values), each `Authorization` value that carries a key, and the query
/// parameter (every copy: on routes that accept a key there, always; on
/// others, when its value has our prefix).
pub fn strip(headers: &mut HeaderMap, path_and_query: &mut String, route: &RouteConfig, keys: &KeysConfig) {
    headers.remove(&keys.header);
    if headers.get_all(header::AUTHORIZATION).iter().any(|v| carries_key(v, keys)) {
        let kept: Vec<HeaderValue> = headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter(|v| !carries_key(v, keys))
            .cloned()
            .collect();
        headers.remove(header::AUTHORIZATION);
        for value in kept {
            headers.append(header::AUTHORIZATION, value);
        }
    }
    let Some((path, query)) = path_and_query.split_once('?') else { return };
    let is_key = |pair: &&str| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        percent_encoding::percent_decode_str(name).decode_utf8_lossy() == keys.query_param
            && (route.allow_query_key
                || percent_encoding::percent_decode_str(value).decode_utf8_lossy().starts_with(&keys.prefix))
    };
    if !query.split('&').any(|pair| is_key(&pair)) {
        return;
    }
    let kept: Vec<&str> = query.split('&').filter(|pair| !is_key(pair)).collect();
    *path_and_query = if kept.is_empty() { path.to_owned() } else { format!("{path}?{}", kept.join("&")) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> KeysConfig {
        crate::config::Config::defaults().keys
    }

    fn route(allow_query_key: bool, public: bool) -> RouteConfig {
        RouteConfig { allow_query_key, public, ..crate::config::Config::defaults().routes[0].clone() }
    }

    fn key(text: &str) -> Presented<'_> {
        Presented::Key(text.into())
    }

    fn basic(user: &str, password: &str) -> HeaderValue {
        let login = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {login}")).unwrap()
    }

    #[test]
    fn jwt_bearers_go_and_other_authorization_values_stay() {
        let jwt = HeaderValue::from_static("Bearer aaa.bbb.ccc");
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, jwt.clone());
        strip_jwt_bearers(&mut headers, "kg_");
        assert!(headers.get(header::AUTHORIZATION).is_none(), "the only value was the token");

        // The upstream's own credentials beside the token (the slow path),
        // in their order; a key-prefixed value is left to `strip`.
        let mut headers = HeaderMap::new();
        headers.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer upstream-own"));
        headers.append(header::AUTHORIZATION, jwt.clone());
        headers.append(header::AUTHORIZATION, basic("user", "pw"));
        headers.append(header::AUTHORIZATION, HeaderValue::from_static("bearer x.y.z"));
        headers.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer kg_a.b.c"));
        strip_jwt_bearers(&mut headers, "kg_");
        let left: Vec<_> = headers.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(
            left,
            [
                &HeaderValue::from_static("Bearer upstream-own"),
                &basic("user", "pw"),
                &HeaderValue::from_static("Bearer kg_a.b.c")
            ]
        );

        let mut headers = HeaderMap::new();
        strip_jwt_bearers(&mut headers, "kg_");
        assert!(headers.is_empty());
    }

    #[test]
    fn bearer_wins_then_header_then_query_when_allowed() {
        let keys = keys();
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static("from-header"));
        assert_eq!(find(&headers, Some("api_key=q"), &keys, true), key("from-header"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer  from-bearer "));
        assert_eq!(find(&headers, None, &keys, false), key("from-bearer"));
        let empty = HeaderMap::new();
        assert_eq!(find(&empty, Some("a=1&api_key=k%2Bq"), &keys, true), key("k+q"));
        assert_eq!(find(&empty, Some("api_key=q"), &keys, false), Presented::Missing);
    }

    #[test]
    fn basic_authorization_is_not_a_key_and_is_left_for_the_upstream() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic Zm9vOmJhcg=="));
        assert_eq!(find(&headers, None, &keys(), false), Presented::Missing);
    }

    #[test]
    fn a_bearer_key_after_a_basic_login_is_found() {
        // Regression: only the first Authorization value was read (and stripped).
        let mut headers = HeaderMap::new();
        headers.append(header::AUTHORIZATION, HeaderValue::from_static("Basic Zm9vOmJhcg=="));
        headers.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer kg_acme_secret"));
        assert_eq!(find(&headers, None, &keys(), false), key("kg_acme_secret"));
    }

    #[test]
    fn our_key_wins_over_an_upstreams_own_bearer_token() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer eyJhbGciOi.upstream.jwt"));
        headers.insert("x-api-key", HeaderValue::from_static("kg_acme_secret"));
        assert_eq!(find(&headers, None, &keys(), false), key("kg_acme_secret"));
    }

    #[test]
    fn two_different_keys_are_ambiguous_and_the_same_key_twice_is_not() {
        let keys = keys();
        let mut headers = HeaderMap::new();
        headers.append("x-api-key", HeaderValue::from_static("kg_acme_one"));
        headers.append("x-api-key", HeaderValue::from_static("kg_acme_one"));
        assert_eq!(find(&headers, None, &keys, false), key("kg_acme_one"));
        headers.append("x-api-key", HeaderValue::from_static("kg_other_two"));
        assert_eq!(find(&headers, None, &keys, false), Presented::Ambiguous);
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer kg_acme_one"));
        assert_eq!(find(&headers, Some("api_key=kg_acme_two"), &keys, true), Presented::Ambiguous);
    }

    #[test]
    fn stripping_the_query_key_keeps_the_other_parameters() {
        let keys = keys();
        let mut headers = HeaderMap::new();
        let mut pq = "/a?x=1&api_key=secret&y=2".to_owned();
        strip(&mut headers, &mut pq, &route(true, false), &keys);
        assert_eq!(pq, "/a?x=1&y=2");
        let mut only = "/a?api_key=secret".to_owned();
        strip(&mut headers, &mut only, &route(true, false), &keys);
        assert_eq!(only, "/a");
        let mut encoded_name = "/a?api%5Fkey=secret&z".to_owned();
        strip(&mut headers, &mut encoded_name, &route(true, false), &keys);
        assert_eq!(encoded_name, "/a?z");
        let mut twice = "/a?api_key=one&b=2&api_key=two".to_owned();
        strip(&mut headers, &mut twice, &route(true, false), &keys);
        assert_eq!(twice, "/a?b=2");
    }

    #[test]
    fn stripping_removes_every_carrier_and_every_copy_not_only_the_one_read() {
        let keys = keys();
        let mut headers = HeaderMap::new();
        headers.append(header::AUTHORIZATION, HeaderValue::from_static("Basic Zm9vOmJhcg=="));
        headers.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer kg_acme_one"));
        headers.append(header::AUTHORIZATION, HeaderValue::from_static("bearer\tkg_acme_tab"));
        headers.append(header::AUTHORIZATION, basic("acme", "kg_acme_in_basic"));
        headers.append("x-api-key", HeaderValue::from_static("two"));
        headers.append("x-api-key", HeaderValue::from_static("kg_acme_three"));
        let mut pq = "/a?api_key=three&x=1".to_owned();
        for public in [false, true] {
            let mut headers = headers.clone();
            strip(&mut headers, &mut pq, &route(true, public), &keys);
            let left: Vec<_> = headers.get_all(header::AUTHORIZATION).iter().collect();
            assert_eq!(left, ["Basic Zm9vOmJhcg=="], "public: {public}");
            assert_eq!(headers.len(), 1, "{headers:?}");
            assert_eq!(pq, "/a?x=1");
        }
    }

    #[test]
    fn a_key_in_the_query_of_a_route_that_does_not_read_it_is_still_stripped() {
        let keys = keys();
        let mut headers = HeaderMap::new();
        let mut pq = "/a?api_key=kg_acme_secret&api_key=upstream-data".to_owned();
        strip(&mut headers, &mut pq, &route(false, false), &keys);
        assert_eq!(pq, "/a?api_key=upstream-data");
    }

    #[test]
    fn stripping_keeps_basic_authorization_and_the_query_where_it_is_not_a_key() {
        let keys = keys();
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic Zm9vOmJhcg=="));
        headers.insert("x-api-key", HeaderValue::from_static("the-key"));
        let mut pq = "/a?api_key=upstream-data".to_owned();
        strip(&mut headers, &mut pq, &route(false, false), &keys);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers[header::AUTHORIZATION], "Basic Zm9vOmJhcg==");
        assert_eq!(pq, "/a?api_key=upstream-data");
    }

    #[test]
    fn the_upstreams_own_bearer_token_passes_and_our_keys_do_not() {
        let keys = keys();
        for public in [false, true] {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer upstream-jwt"));
            headers.insert("x-api-key", HeaderValue::from_static("kg_acme_x"));
            let mut pq = "/a".to_owned();
            strip(&mut headers, &mut pq, &route(false, public), &keys);
            assert_eq!(headers.len(), 1);
            assert_eq!(headers[header::AUTHORIZATION], "Bearer upstream-jwt");

            headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer kg_acme_secret"));
            strip(&mut headers, &mut pq, &route(false, public), &keys);
            assert!(headers.is_empty(), "{headers:?}");
        }
    }
}
