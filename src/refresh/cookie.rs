//! The refresh token as a browser cookie (`[tokens] refresh_cookie`), so
//! that a page's scripts never hold it (RFC 6265bis; OAuth 2.0 for
//! Browser-Based Apps).
//!
//! The token endpoint sets it `Secure; HttpOnly; SameSite=Strict` on the
//! path `[tokens] refresh_cookie_path` (the token endpoint's by default),
//! so a browser sends it to the token endpoint alone, never cross-site and
//! never to a script. Its name carries the strongest prefix the path
//! allows: `__Host-` requires `Path=/` (RFC 6265bis §4.1.3.2), so on any
//! other path it is `__Secure-`. The endpoint reads it back on
//! `grant_type=refresh_token` when the form has no `refresh_token`, and
//! deletes it ([`clear`]) when that refresh is refused as `invalid_grant`.
//!
//! The cookie is the gateway's: [`strip`] removes it from every request
//! before it goes upstream, whatever the path it was (mis)sent to.

use http::{HeaderMap, HeaderValue, header};

/// The cookie's name without its prefix.
const NAME: &str = "keygate-refresh";

/// The cookie's name for a cookie path: `__Host-` where it fits.
pub fn name(path: &str) -> String {
    if path == "/" { format!("__Host-{NAME}") } else { format!("__Secure-{NAME}") }
}

/// Every name the gateway's cookie may have, for [`strip`].
const NAMES: [&str; 2] = ["__Host-keygate-refresh", "__Secure-keygate-refresh"];

/// `Set-Cookie` for `token` on `path`, kept for `max_age` seconds. A token
/// is `[A-Za-z0-9_.-]`, so it needs no quoting.
pub fn set(token: &str, path: &str, max_age: u64) -> Option<HeaderValue> {
    let text =
        format!("{}={token}; Path={path}; Max-Age={max_age}; Secure; HttpOnly; SameSite=Strict", name(path));
    HeaderValue::from_str(&text).ok()
}

/// `Set-Cookie` that deletes the cookie on `path` (RFC 6265bis §5.7: the
/// same name and path, expired): sent when a refresh from the cookie is
/// refused as `invalid_grant`, so a browser stops presenting a dead token
/// on every page load.
pub fn clear(path: &str) -> Option<HeaderValue> {
    let text = format!("{}=; Path={path}; Max-Age=0; Secure; HttpOnly; SameSite=Strict", name(path));
    HeaderValue::from_str(&text).ok()
}

/// The cookie's values among the request's `Cookie` headers (a browser
/// may send two of one name, from two paths).
pub fn values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(n, _)| *n == name)
        .map(|(_, value)| value.trim())
        .collect()
}

/// Removes the gateway's cookies from `headers`, keeping every other
/// cookie (in order) and dropping a `Cookie` header left empty.
pub fn strip(headers: &mut HeaderMap) {
    let ours = |pair: &str| pair.trim().split_once('=').is_some_and(|(n, _)| NAMES.contains(&n.trim()));
    let carries = |v: &HeaderValue| v.to_str().is_ok_and(|text| text.split(';').any(ours));
    if !headers.get_all(header::COOKIE).iter().any(carries) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| match v.to_str() {
            Ok(text) if text.split(';').any(ours) => {
                let rest: Vec<&str> = text.split(';').filter(|p| !ours(p)).map(str::trim).collect();
                let rest = rest.join("; ");
                if rest.is_empty() { None } else { HeaderValue::from_str(&rest).ok() }
            }
            _ => Some(v.clone()),
        })
        .collect();
    headers.remove(header::COOKIE);
    for value in kept {
        headers.append(header::COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_follows_the_path() {
        assert_eq!(name("/"), "__Host-keygate-refresh");
        assert_eq!(name("/oauth/token"), "__Secure-keygate-refresh");
        let set = set("kgr_acme.abc", "/oauth/token", 60).expect("value");
        assert_eq!(
            set,
            "__Secure-keygate-refresh=kgr_acme.abc; Path=/oauth/token; Max-Age=60; Secure; HttpOnly; SameSite=Strict"
        );
    }

    #[test]
    fn clearing_names_the_same_cookie_and_path() {
        assert_eq!(
            clear("/").expect("value"),
            "__Host-keygate-refresh=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict"
        );
        assert!(clear("/oauth/token").unwrap().to_str().unwrap().starts_with("__Secure-keygate-refresh=;"));
    }

    #[test]
    fn values_are_found_among_other_cookies() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; __Secure-keygate-refresh=kgr_x.y"));
        headers.append(header::COOKIE, HeaderValue::from_static("__Secure-keygate-refresh=kgr_z.w"));
        assert_eq!(values(&headers, "__Secure-keygate-refresh"), ["kgr_x.y", "kgr_z.w"]);
        assert!(values(&headers, "__Host-keygate-refresh").is_empty());
    }

    #[test]
    fn strip_keeps_every_other_cookie() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; __Host-keygate-refresh=kgr_x.y; b=2"));
        headers.append(header::COOKIE, HeaderValue::from_static("__Secure-keygate-refresh=kgr_z.w"));
        headers.append(header::COOKIE, HeaderValue::from_static("c=3"));
        strip(&mut headers);
        let left: Vec<&str> = headers.get_all(header::COOKIE).iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(left, ["a=1; b=2", "c=3"]);

        let mut untouched = HeaderMap::new();
        untouched.append(header::COOKIE, HeaderValue::from_static("keygate-refresh=not-ours"));
        strip(&mut untouched);
        assert_eq!(untouched[header::COOKIE], "keygate-refresh=not-ours");
    }
}
