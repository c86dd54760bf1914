//! Finding the API key in a request, and removing it before forwarding.
//!
//! A key may come as `Authorization: Bearer <key>`, in the configured header
//! (default `x-api-key`), or, on routes that allow it, in a query parameter.
//! Every place a key may travel on the route is stripped, not only the one it
//! came in, so the upstream never sees a key; the identity headers set later
//! tell the upstream who called.

use http::header::{self, HeaderMap};

use crate::config::{KeysConfig, RouteConfig};

/// Looks for a key, in order: bearer token, configured header, query (when
/// allowed). Returns the key text.
pub fn find<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    keys: &KeysConfig,
    allow_query: bool,
) -> Option<std::borrow::Cow<'a, str>> {
    if let Some(token) =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer_token)
    {
        return Some(token.into());
    }
    if let Some(value) = headers.get(&keys.header).and_then(|v| v.to_str().ok()) {
        return Some(value.trim().into());
    }
    if allow_query {
        let query = query?;
        let value = form_pairs(query).find(|(name, _)| name == &keys.query_param).map(|(_, value)| value)?;
        return Some(value);
    }
    None
}

/// The token of `Bearer <token>` (scheme case-insensitive), if that is what it is.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// `a=1&b=x%20y` as decoded pairs.
fn form_pairs(query: &str) -> impl Iterator<Item = (std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)> {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &'_ str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
        (decode(name).into(), decode(value).into())
    })
}

/// Removes every place a key can travel on this route: the key header, the
/// query parameter where the route accepts one, and a bearer token. On a
/// public route a bearer token is removed only if it looks like one of our
/// keys: otherwise it may be the upstream's own credential.
pub fn strip(headers: &mut HeaderMap, path_and_query: &mut String, route: &RouteConfig, keys: &KeysConfig) {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer_token);
    if bearer.is_some_and(|token| !route.public || token.starts_with(&keys.prefix)) {
        headers.remove(header::AUTHORIZATION);
    }
    headers.remove(&keys.header);
    if route.allow_query_key {
        let Some((path, query)) = path_and_query.split_once('?') else { return };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
                percent_encoding::percent_decode_str(name).decode_utf8_lossy() != keys.query_param
            })
            .collect();
        *path_and_query =
            if kept.is_empty() { path.to_owned() } else { format!("{path}?{}", kept.join("&")) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn keys() -> KeysConfig {
        crate::config::Config::defaults().keys
    }

    fn route(allow_query_key: bool, public: bool) -> RouteConfig {
        RouteConfig { allow_query_key, public, ..crate::config::Config::defaults().routes[0].clone() }
    }

    #[test]
    fn bearer_wins_then_header_then_query_when_allowed() {
        let keys = keys();
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static("from-header"));
        assert_eq!(find(&headers, Some("api_key=q"), &keys, true).unwrap(), "from-header");
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer  from-bearer "));
        assert_eq!(find(&headers, None, &keys, false).unwrap(), "from-bearer");
        let empty = HeaderMap::new();
        assert_eq!(find(&empty, Some("a=1&api_key=k%2Bq"), &keys, true).unwrap(), "k+q");
        assert_eq!(find(&empty, Some("api_key=q"), &keys, false), None);
    }

    #[test]
    fn basic_authorization_is_not_a_key_and_is_left_for_the_upstream() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic Zm9vOmJhcg=="));
        assert_eq!(find(&headers, None, &keys(), false), None);
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
    }

    #[test]
    fn stripping_removes_every_carrier_not_only_the_one_read() {
        let keys = keys();
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer one"));
        headers.insert("x-api-key", HeaderValue::from_static("two"));
        let mut pq = "/a?api_key=three&x=1".to_owned();
        strip(&mut headers, &mut pq, &route(true, false), &keys);
        assert!(headers.is_empty(), "{headers:?}");
        assert_eq!(pq, "/a?x=1");
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
    fn a_public_route_drops_our_keys_but_keeps_the_upstreams_own_bearer_token() {
        let keys = keys();
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer upstream-jwt"));
        headers.insert("x-api-key", HeaderValue::from_static("kg_acme_x"));
        let mut pq = "/a".to_owned();
        strip(&mut headers, &mut pq, &route(false, true), &keys);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers[header::AUTHORIZATION], "Bearer upstream-jwt");

        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer kg_acme_secret"));
        strip(&mut headers, &mut pq, &route(false, true), &keys);
        assert!(headers.is_empty(), "{headers:?}");
    }
}
