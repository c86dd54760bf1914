//! Request forms judged before routing: which host the request is for, and
//! headers that would make an upstream run another request than the one the
//! gateway checked.
//!
//! The gateway decides on the host and the method and path; the upstream
//! must act on the same. So a request naming two hosts (two `Host` headers,
//! or a `Host` that disagrees with the URI's authority, as HTTP/2's
//! `:authority` or an absolute-form HTTP/1.1 target carry it) is refused, a
//! trailing dot (`admin.local.`, the same name to DNS) matches the same host
//! route as without it, and method-override headers are removed (a `read`
//! key's GET must not become a DELETE at a framework that honours them).

use http::Uri;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that frameworks (Rails, Express's method-override, Symfony,
/// Laravel, IIS URL rewrite, Spring's `HiddenHttpMethodFilter` kin) read as
/// the real method or path.
pub const OVERRIDE_HEADERS: [HeaderName; 5] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
];

/// Why the request's host was refused (answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("more than one Host header")]
    Duplicate,
    #[error("the Host header and the request target name different hosts")]
    Disagrees,
    #[error("the Host header is not a host name")]
    Malformed,
}

/// The host a request is for, as sent (the header value is passed on as
/// `X-Forwarded-Host` without a copy), or `None` when it names none.
pub fn request_host(headers: &HeaderMap, uri: &Uri) -> Result<Option<HeaderValue>, HostError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let from_header = hosts.next();
    if hosts.next().is_some() {
        return Err(HostError::Duplicate);
    }
    let host = match (from_header, uri.authority()) {
        (Some(value), Some(authority)) => {
            let text = value.to_str().map_err(|_| HostError::Malformed)?;
            if !same_host(text, authority.as_str()) {
                return Err(HostError::Disagrees);
            }
            value.clone()
        }
        (Some(value), None) => value.clone(),
        (None, Some(authority)) => {
            HeaderValue::from_str(authority.as_str()).map_err(|_| HostError::Malformed)?
        }
        (None, None) => return Ok(None),
    };
    let text = host.to_str().map_err(|_| HostError::Malformed)?;
    if text.is_empty()
        || !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']'))
    {
        return Err(HostError::Malformed);
    }
    Ok(Some(host))
}

/// The name routes match on: no port, no trailing dot. Case is left to the
/// route table, which compares without it.
pub fn route_name(host: &str) -> &str {
    let (name, _) = split_port(host);
    name.strip_suffix('.').unwrap_or(name)
}

/// `example.com:8080` -> (`example.com`, `8080`); `[::1]:80` -> (`[::1]`, `80`);
/// `[::1]` -> (`[::1]`, none).
fn split_port(host: &str) -> (&str, Option<&str>) {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => (&host[..i], Some(&host[i + 1..])),
        _ => (host, None),
    }
}

/// `Host: API.example.` and `:authority: api.example:443` name one host when
/// their names agree; a port on one side only is the scheme's default.
fn same_host(a: &str, b: &str) -> bool {
    route_name(a).eq_ignore_ascii_case(route_name(b))
        && match (split_port(a).1, split_port(b).1) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        }
}

/// Removes the method and path override headers (every copy).
pub fn remove_override_headers(headers: &mut HeaderMap) {
    for name in &OVERRIDE_HEADERS {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_of(hosts: &[&str], uri: &str) -> Result<Option<String>, HostError> {
        let mut headers = HeaderMap::new();
        for host in hosts {
            headers.append(header::HOST, HeaderValue::from_str(host).unwrap());
        }
        request_host(&headers, &uri.parse().unwrap()).map(|h| h.map(|h| h.to_str().unwrap().to_owned()))
    }

    #[test]
    fn one_host_is_taken_from_the_header_or_the_target() {
        assert_eq!(host_of(&["api.example:8080"], "/x"), Ok(Some("api.example:8080".into())));
        assert_eq!(host_of(&[], "http://api.example/x"), Ok(Some("api.example".into())));
        assert_eq!(host_of(&["API.example."], "https://api.example:443/x"), Ok(Some("API.example.".into())));
        assert_eq!(host_of(&[], "/x"), Ok(None));
    }

    #[test]
    fn a_request_naming_two_hosts_is_refused() {
        assert_eq!(host_of(&["a.example", "b.example"], "/x"), Err(HostError::Duplicate));
        assert_eq!(host_of(&["a.example", "a.example"], "/x"), Err(HostError::Duplicate));
        assert_eq!(host_of(&["admin.local"], "http://public.example/x"), Err(HostError::Disagrees));
        assert_eq!(host_of(&["a.example:81"], "http://a.example:82/x"), Err(HostError::Disagrees));
        assert_eq!(host_of(&["a b"], "/x"), Err(HostError::Malformed));
        assert_eq!(host_of(&["a/b"], "/x"), Err(HostError::Malformed));
        assert_eq!(host_of(&[""], "/x"), Err(HostError::Malformed));
    }

    #[test]
    fn route_names_drop_the_port_and_a_trailing_dot() {
        assert_eq!(route_name("admin.local."), "admin.local");
        assert_eq!(route_name("admin.local.:8080"), "admin.local");
        assert_eq!(route_name("[::1]:80"), "[::1]");
        assert_eq!(route_name("[::1]"), "[::1]");
        assert_eq!(route_name("example.com"), "example.com");
    }

    #[test]
    fn every_override_header_goes_and_others_stay() {
        let mut headers = HeaderMap::new();
        for name in &OVERRIDE_HEADERS {
            headers.append(name.clone(), HeaderValue::from_static("DELETE"));
            headers.append(name.clone(), HeaderValue::from_static("/admin"));
        }
        headers.insert("x-kept", HeaderValue::from_static("1"));
        remove_override_headers(&mut headers);
        assert_eq!(headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }
}
