//! Forwarding to upstreams: pooled clients, header rewriting, timeouts.
//!
//! Each `[upstream.NAME]` picks its targets round robin; each target has
//! per-worker pools of keep-alive connections (`pool.rs`). Bodies stream both ways (hyper's `Incoming` is passed
//! through, never collected), so a 1 GiB upload costs no more memory than a
//! small one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;

use crate::config::{KeysConfig, UpstreamConfig};
use crate::error::GatewayError;
use crate::store::KeyRecord;
pub use pool::{ConnPool, PooledBody};

pub mod pool;

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus
/// the non-standard ones old clients still send.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers, including every header named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names (standard
    // header names compare without hashing) spares a dozen hashed removals.
    let any = headers.keys().any(|name| name == header::UPGRADE || HOP_BY_HOP.contains(name));
    if !any {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    // `Upgrade` is hop-by-hop too; protocol upgrades are not proxied (yet).
    headers.remove(header::UPGRADE);
}

/// Sets the `X-Forwarded-*` headers: appends the peer to `X-Forwarded-For`,
/// and records the scheme and host the client used.
pub fn set_forwarded(headers: &mut HeaderMap, peer: IpAddr, proto: &'static str, host: Option<&str>) {
    let peer = peer.to_string();
    let chain = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => format!("{existing}, {peer}"),
        _ => peer,
    };
    if let Ok(value) = HeaderValue::from_str(&chain) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match host.and_then(|h| HeaderValue::from_str(h).ok()) {
        Some(value) => headers.insert(X_FORWARDED_HOST, value),
        None => headers.remove(X_FORWARDED_HOST),
    };
}

/// Replaces any identity headers the client sent (they would be spoofs) with
/// the verified caller's: client ID, key ID and scopes. Public routes send none.
pub fn set_identity(headers: &mut HeaderMap, keys: &KeysConfig, caller: Option<&KeyRecord>) {
    headers.remove(&keys.client_header);
    headers.remove(&keys.key_id_header);
    headers.remove(&keys.scopes_header);
    let Some(record) = caller else { return };
    // IDs and scopes are validated ASCII, so these conversions succeed.
    if let Ok(v) = HeaderValue::from_str(record.client()) {
        headers.insert(keys.client_header.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(record.id.as_str()) {
        headers.insert(keys.key_id_header.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&record.meta.scopes.join(" ")) {
        headers.insert(keys.scopes_header.clone(), v);
    }
}

/// One upstream: its targets, each with per-worker connection pools.
pub struct UpstreamPool {
    name: String,
    targets: Vec<Arc<ConnPool>>,
    next: AtomicUsize,
    timeout: Duration,
}

impl UpstreamPool {
    pub fn new(name: &str, config: &UpstreamConfig, workers: usize) -> Self {
        let targets = config
            .targets
            .iter()
            .filter_map(|uri| uri.authority().cloned())
            .map(|authority| {
                ConnPool::new(
                    authority,
                    workers,
                    config.connect_timeout,
                    config.pool_idle_timeout,
                    config.pool_max_idle_per_host,
                )
            })
            .collect();
        Self { name: name.to_owned(), targets, next: AtomicUsize::new(0), timeout: config.timeout }
    }

    /// The next target, round robin.
    fn pick(&self) -> Option<&Arc<ConnPool>> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.targets.get(n % self.targets.len().max(1))
    }

    /// Sends a prepared request (headers already rewritten, URI holding only
    /// path and query) to the next target and returns its response headers,
    /// with the body still streaming.
    pub async fn forward(
        &self,
        mut request: Request<Incoming>,
    ) -> Result<Response<PooledBody>, GatewayError> {
        let target = self
            .pick()
            .ok_or_else(|| GatewayError::Internal(format!("upstream {} has no targets", self.name)))?;
        // Origin-form URI and the upstream's own Host, as an HTTP/1.1 server expects.
        if request.uri().path_and_query().is_none() {
            *request.uri_mut() = Uri::from_static("/");
        }
        if let Some(host) = target.host() {
            request.headers_mut().insert(header::HOST, host.clone());
        }
        // Upstreams are spoken to over HTTP/1.1 whatever the client used.
        *request.version_mut() = Version::HTTP_11;

        match tokio::time::timeout(self.timeout, target.send(request)).await {
            Err(_elapsed) => {
                Err(GatewayError::UpstreamTimeout { upstream: self.name.clone(), after: self.timeout })
            }
            Ok(Err(e)) => {
                Err(GatewayError::UpstreamUnreachable { upstream: self.name.clone(), cause: error_chain(&e) })
            }
            Ok(Ok((response, lease))) => {
                let mut response = response.map(|body| PooledBody::new(body, lease));
                remove_hop_by_hop(response.headers_mut());
                Ok(response)
            }
        }
    }
}

/// `error: cause: cause`, for logs.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The upstream pools of one config, by name.
#[derive(Default)]
pub struct Upstreams {
    pools: HashMap<String, Arc<UpstreamPool>>,
}

impl Upstreams {
    pub fn new<'a>(
        configs: impl IntoIterator<Item = (&'a String, &'a UpstreamConfig)>,
        workers: usize,
    ) -> Self {
        let pools = configs
            .into_iter()
            .map(|(name, c)| (name.clone(), Arc::new(UpstreamPool::new(name, c, workers))))
            .collect();
        Self { pools }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<UpstreamPool>> {
        self.pools.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret-Hop"));
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn forwarded_for_appends_to_an_existing_chain() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        set_forwarded(&mut headers, "127.0.0.1".parse().unwrap(), "http", Some("api.example"));
        assert_eq!(headers[X_FORWARDED_FOR], "203.0.113.7, 127.0.0.1");
        assert_eq!(headers[X_FORWARDED_PROTO], "http");
        assert_eq!(headers[X_FORWARDED_HOST], "api.example");
    }

    #[test]
    fn forwarded_host_from_the_client_is_not_passed_on_when_there_is_no_host() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_HOST, HeaderValue::from_static("spoofed.example"));
        set_forwarded(&mut headers, "::1".parse().unwrap(), "http", None);
        assert!(!headers.contains_key(X_FORWARDED_HOST));
        assert_eq!(headers[X_FORWARDED_FOR], "::1");
    }
}
