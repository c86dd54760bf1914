//! Forwarding to upstreams: pooled clients, header rewriting, timeouts.
//!
//! Each `[upstream.NAME]` picks its targets round robin; each target has
//! per-worker pools of keep-alive connections (`pool.rs`). Bodies stream both ways (hyper's `Incoming` is passed
//! through, never collected), so a 1 GiB upload costs no more memory than a
//! small one.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use rustls::pki_types::CertificateDer;

use crate::config::{BodyLimits, KeysConfig, Protocol, UpstreamConfig};
use crate::error::{GatewayError, TlsFailure};
pub use body::{ClientBodyError, CountedBody, RequestBody};
pub use pool::{ConnPool, PoolLimits, PooledBody, UpstreamBodyError};

pub mod body;
pub mod pool;
pub mod upgrade;

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus
/// the non-standard ones old clients still send. `Upgrade` is among them:
/// a WebSocket handshake gets it back ([`upgrade::restore_upgrade_headers`]),
/// no other request forwards it.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers the gateway may add to a request on its way upstream: the three
/// `X-Forwarded-*`, the three identity headers and the upstream's `Host`.
pub const ADDED_REQUEST_HEADERS: usize = 7;

/// Removes hop-by-hop headers, including every header named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names (standard names compare without hashing) finds
    // which are present; most requests carry none, and most responses only
    // `Connection: keep-alive`, so only those are removed, without allocating.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // `close` and `keep-alive` are connection options, not header names to
    // look for (`Keep-Alive` is removed with the fixed list anyway).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|token| !token.eq_ignore_ascii_case("close") && !token.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// The connection's peer, with its address as `X-Forwarded-For` carries it,
/// made once per connection rather than formatted on every request.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    forwarded_for: HeaderValue,
    /// Whether the connection is TLS (`X-Forwarded-Proto: https`, `tls_only`).
    pub tls: bool,
    /// mTLS: the client's certificate chain (DER, leaf first) as the
    /// listener's `client_ca` verified it during the handshake; `None` on
    /// plain connections and for clients that sent none (`client_auth =
    /// "optional"`). Shared by every request of the connection.
    pub client_certs: Option<Arc<[CertificateDer<'static>]>>,
}

impl Peer {
    /// A peer whose forwarding headers are not believed.
    pub fn new(addr: SocketAddr) -> Self {
        let value = match addr.ip() {
            IpAddr::V4(ip) => ipv4_value(ip),
            IpAddr::V6(ip) => HeaderValue::from_maybe_shared(Bytes::from(ip.to_string())),
        };
        // An IP address's text is always a valid header value.
        let forwarded_for = value.unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self { addr, forwarded_for, tls: false, client_certs: None }
    }

    /// A peer on a TLS connection, with the client certificate chain the
    /// handshake verified, if any.
    pub fn over_tls(addr: SocketAddr, client_certs: Option<Arc<[CertificateDer<'static>]>>) -> Self {
        Self { tls: true, client_certs, ..Self::new(addr) }
    }

    /// The scheme the client used: what `X-Forwarded-Proto` says.
    pub fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// The connection's verified client certificate (end entity, DER), if
    /// any: what `auth = ["cert"]` routes take as the credential. Set only by
    /// the TLS listener, after rustls' client verifier accepted the chain.
    pub fn client_certificate(&self) -> Option<&CertificateDer<'static>> {
        self.client_certs.as_deref().and_then(<[_]>::first)
    }

    /// Whether this peer is a proxy whose `X-Forwarded-For` is believed
    /// (`server.trusted_proxies`; none by default, which costs nothing).
    pub fn is_trusted(&self, trusted_proxies: &[ipnet::IpNet]) -> bool {
        is_among(trusted_proxies, self.addr.ip())
    }

    /// The address of the client the request is from: the peer itself, or,
    /// behind trusted proxies, the right-most `X-Forwarded-For` entry that is
    /// not one of them (entries left of it are the client's own claims).
    /// Limits keyed by address and the access log use this.
    pub fn client_ip(&self, headers: &HeaderMap, trusted_proxies: &[ipnet::IpNet]) -> IpAddr {
        let mut client = self.addr.ip();
        if !self.is_trusted(trusted_proxies) {
            return client;
        }
        let hops: Vec<&str> = headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        for hop in hops.iter().rev() {
            let Ok(ip) = hop.parse::<IpAddr>() else { break };
            client = ip;
            if !is_among(trusted_proxies, ip) {
                break;
            }
        }
        client
    }
}

/// Whether `ip` is in one of `networks`.
fn is_among(networks: &[ipnet::IpNet], ip: IpAddr) -> bool {
    networks.iter().any(|net| net.contains(&ip))
}

/// An IPv4 address as dotted decimal, written digit by digit: `Ipv4Addr`'s
/// `Display` goes through the formatting machinery, which cost ~1.3k
/// instructions on every new connection (callgrind, a connection per request).
fn ipv4_value(ip: Ipv4Addr) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    let mut text = BytesMut::with_capacity("255.255.255.255".len());
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            text.extend_from_slice(b".");
        }
        text.extend_from_slice(itoa::Buffer::new().format(octet).as_bytes());
    }
    HeaderValue::from_maybe_shared(text.freeze())
}

/// Sets the `X-Forwarded-*` headers: appends the peer to `X-Forwarded-For`
/// when the peer is a trusted proxy (`trusted`, from [`Peer::is_trusted`]),
/// and otherwise replaces whatever the client claimed with the peer's
/// address (a client cannot make an upstream believe it is someone else); records the scheme and the host the client
/// asked for (its own `Host` value, or none). `Forwarded` (RFC 7239) is not
/// written, so a client's is not passed on either.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: &Peer,
    trusted: bool,
    proto: &'static str,
    host: Option<HeaderValue>,
) {
    headers.remove(header::FORWARDED);
    let existing = if trusted { headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) } else { None };
    let chain = match existing {
        Some(existing) if !existing.trim().is_empty() => {
            let chain = format!("{existing}, {}", peer.addr.ip());
            HeaderValue::from_maybe_shared(Bytes::from(chain)).ok()
        }
        _ => Some(peer.forwarded_for.clone()),
    };
    if let Some(chain) = chain {
        headers.insert(X_FORWARDED_FOR, chain);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match host {
        Some(value) => headers.insert(X_FORWARDED_HOST, value),
        None => headers.remove(X_FORWARDED_HOST),
    };
}

/// The identity headers' values for one verified key (client ID, key ID,
/// scopes), built once when the key is cached rather than on every request.
#[derive(Debug, Clone)]
pub struct Identity {
    client: Option<HeaderValue>,
    key_id: Option<HeaderValue>,
    scopes: Option<HeaderValue>,
}

impl Identity {
    /// The headers for a caller with this client ID, key ID and scopes.
    /// Plain strings, so forwarding knows nothing of how keys are stored.
    pub fn new(client: &str, key_id: &str, scopes: &[String]) -> Self {
        // IDs and scopes are validated ASCII, so these conversions succeed;
        // a value that did not would be left out, never forwarded raw.
        let value = |text: String| HeaderValue::from_maybe_shared(Bytes::from(text)).ok();
        Self {
            client: value(client.to_owned()),
            key_id: value(key_id.to_owned()),
            scopes: value(scopes.join(" ")),
        }
    }

    /// The headers for a caller known by its client alone (a client
    /// certificate): client ID and the client's scopes, and no key ID
    /// header at all, so an upstream cannot mistake it for a key's. Nothing
    /// from the certificate itself is forwarded.
    /// A client without scopes sends no scopes header.
    pub fn for_client(client: &str, scopes: &[String]) -> Self {
        let identity = Self::new(client, "", scopes);
        Self { key_id: None, scopes: identity.scopes.filter(|_| !scopes.is_empty()), ..identity }
    }
}

/// Replaces any identity headers the client sent (they would be spoofs) with
/// the verified caller's: client ID, key ID and scopes. Public routes send none.
pub fn set_identity(headers: &mut HeaderMap, keys: &KeysConfig, caller: Option<&Identity>) {
    let (client, key_id, scopes) = match caller {
        Some(identity) => (identity.client.clone(), identity.key_id.clone(), identity.scopes.clone()),
        None => (None, None, None),
    };
    // `insert` drops every value the client sent under that name.
    for (name, value) in
        [(&keys.client_header, client), (&keys.key_id_header, key_id), (&keys.scopes_header, scopes)]
    {
        match value {
            Some(value) => headers.insert(name.clone(), value),
            None => headers.remove(name),
        };
    }
}

/// One upstream: its targets, each with per-worker connection pools.
pub struct UpstreamPool {
    name: String,
    targets: Vec<Arc<ConnPool>>,
    next: AtomicUsize,
    timeout: Duration,
    websocket_idle_timeout: Duration,
}

impl UpstreamPool {
    pub fn new(name: &str, config: &UpstreamConfig, workers: usize) -> Self {
        let targets = config
            .targets
            .iter()
            .filter_map(|uri| Some((uri.scheme_str() == Some("https"), uri.authority()?.clone())))
            .map(|(https, authority)| {
                let limits = PoolLimits {
                    connect_timeout: config.connect_timeout,
                    idle_timeout: config.pool_idle_timeout,
                    max_idle: config.pool_max_idle_per_host,
                    max_connections: config.max_connections.get(),
                    body_idle_timeout: config.body_idle_timeout,
                };
                // Validated at load: an https target has a TLS config and a name.
                let tls = config.tls.as_ref().filter(|_| https).and_then(|tls| {
                    let name = match &tls.server_name {
                        Some(name) => name.clone(),
                        None => crate::upstream_tls::server_name_for(authority.host()).ok()?,
                    };
                    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config));
                    Some(pool::TargetTls { connector, name })
                });
                let protocol = if https || config.protocol == Protocol::Http2 {
                    config.protocol
                } else {
                    Protocol::Http1
                };
                ConnPool::with_tls(authority, workers, limits, tls, protocol)
            })
            .collect();
        Self {
            name: name.to_owned(),
            targets,
            next: AtomicUsize::new(0),
            timeout: config.timeout,
            websocket_idle_timeout: config.websocket_idle_timeout,
        }
    }

    /// The next target, round robin.
    fn pick(&self) -> Option<&Arc<ConnPool>> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.targets.get(n % self.targets.len().max(1))
    }

    /// Sends a prepared request (headers already rewritten, URI holding only
    /// path and query) to the next target and returns its response headers,
    /// with the body still streaming.
    ///
    /// `sent` is when the caller started sending, read once for the request:
    /// the upstream timeout and the pool count from it, so forwarding reads
    /// no clock of its own (each read is some 25 ns on the request path).
    /// For a request with a body, the timeout counts from when the body has
    /// been sent (see [`body::response_deadline`]).
    ///
    /// `limits` are the route's: a declared body over `max_body` is refused
    /// here, before anything is sent; a chunked one is cut off when it crosses it.
    pub async fn forward(
        &self,
        request: Request<CountedBody>,
        sent: tokio::time::Instant,
        limits: &BodyLimits,
    ) -> Result<Response<PooledBody>, GatewayError> {
        let target = self
            .pick()
            .ok_or_else(|| GatewayError::Internal(format!("upstream {} has no targets", self.name)))?;
        if let (Some(max), Some(declared)) = (limits.max, http_body::Body::size_hint(request.body()).exact())
            && declared > max
        {
            return Err(GatewayError::BodyTooLarge { limit: max });
        }
        let (parts, body) = request.into_parts();
        let (body, progress) = RequestBody::new(body, limits, sent);
        let mut request = Request::from_parts(parts, body);
        // Origin-form URI and the upstream's own Host, as an HTTP/1.1 server expects.
        if request.uri().path_and_query().is_none() {
            *request.uri_mut() = Uri::from_static("/");
        }
        if let Some(host) = target.host() {
            request.headers_mut().insert(header::HOST, host.clone());
        }
        // Upstreams are spoken to over HTTP/1.1 whatever the client used.
        *request.version_mut() = Version::HTTP_11;

        let exchange = target.send(request, sent);
        let outcome = match progress {
            // No body: the request is sent with its head.
            None => tokio::time::timeout_at(sent + self.timeout, exchange).await.ok(),
            Some(progress) => {
                tokio::select! {
                    biased;
                    outcome = exchange => Some(outcome),
                    () = body::response_deadline(&progress, self.timeout) => None,
                }
            }
        };
        match outcome {
            None => Err(GatewayError::UpstreamTimeout { upstream: self.name.clone(), after: self.timeout }),
            Some(Err(error)) => Err(self.send_failure(error, target)),
            Some(Ok((response, lease))) => {
                // Dropping `lease` unreleased closes the connection: after a
                // response framed two ways, its next bytes mean nothing.
                if let Err(reason) = check_framing(&response) {
                    return Err(GatewayError::UpstreamBadResponse { upstream: self.name.clone(), reason });
                }
                let idle = target.body_idle_timeout();
                let mut response = response.map(|body| PooledBody::new(body, lease, idle));
                remove_hop_by_hop(response.headers_mut());
                Ok(response)
            }
        }
    }

    /// Sends a WebSocket handshake (see [`upgrade::is_websocket`]; its
    /// upgrade headers restored) to the next target on a connection of its
    /// own. On `101` the response comes with the [`upgrade::Tunnel`] to run
    /// once the client has its `101` (`client` is the client connection's
    /// upgrade); any other answer is passed on as an ordinary response.
    /// The upstream timeout bounds the wait for the answer's head.
    pub async fn forward_upgrade(
        &self,
        request: Request<CountedBody>,
        sent: tokio::time::Instant,
        limits: &BodyLimits,
        client: hyper::upgrade::OnUpgrade,
    ) -> Result<(Response<PooledBody>, Option<upgrade::Tunnel>), GatewayError> {
        let target = self
            .pick()
            .ok_or_else(|| GatewayError::Internal(format!("upstream {} has no targets", self.name)))?;
        let (parts, body) = request.into_parts();
        let (body, _) = RequestBody::new(body, limits, sent);
        let mut request = Request::from_parts(parts, body);
        if let Some(host) = target.host() {
            request.headers_mut().insert(header::HOST, host.clone());
        }
        *request.version_mut() = Version::HTTP_11;
        let exchange = target.send_upgrade(request);
        let (mut response, permit) = match tokio::time::timeout_at(sent + self.timeout, exchange).await {
            Err(_) => {
                return Err(GatewayError::UpstreamTimeout {
                    upstream: self.name.clone(),
                    after: self.timeout,
                });
            }
            Ok(Err(error)) => return Err(self.send_failure(error, target)),
            Ok(Ok(answered)) => answered,
        };
        if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            if let Err(reason) = check_framing(&response) {
                return Err(GatewayError::UpstreamBadResponse { upstream: self.name.clone(), reason });
            }
            let idle = target.body_idle_timeout();
            let lease = pool::Lease::dedicated(target, Some(permit));
            let mut response = response.map(|body| PooledBody::new(body, lease, idle));
            remove_hop_by_hop(response.headers_mut());
            return Ok((response, None));
        }
        let upstream = hyper::upgrade::on(&mut response);
        let tunnel = upgrade::Tunnel { client, upstream, idle_timeout: self.websocket_idle_timeout, permit };
        // The upstream's own `Upgrade` value and its `Sec-WebSocket-*`
        // answer go back; the rest of its hop-by-hop headers do not.
        let protocol = response.headers().get(header::UPGRADE).cloned();
        remove_hop_by_hop(response.headers_mut());
        upgrade::restore_upgrade_headers(response.headers_mut());
        if let Some(protocol) = protocol {
            response.headers_mut().insert(header::UPGRADE, protocol);
        }
        let idle = target.body_idle_timeout();
        let lease = pool::Lease::dedicated(target, None);
        Ok((response.map(|body| PooledBody::new(body, lease, idle)), Some(tunnel)))
    }

    /// The error a failed send is answered with: the client's, when its
    /// body is what failed; the upstream's otherwise.
    fn send_failure(&self, error: pool::SendError, target: &ConnPool) -> GatewayError {
        let upstream = self.name.clone();
        // A TLS failure after the handshake (TLS 1.3 servers refuse a
        // missing client certificate on the first read) is named as one.
        if let pool::SendError::Http(error) = &error
            && target.is_tls()
            && body::client_fault(error).is_none()
            && let Some(reason) = crate::upstream_tls::rustls_reason(error)
        {
            let failure = TlsFailure { target: target.authority().to_string(), reason };
            return GatewayError::UpstreamTls { upstream, failure: Box::new(failure) };
        }
        match error {
            pool::SendError::Busy(..) => GatewayError::UpstreamBusy { upstream },
            pool::SendError::Tls(target, reason) => {
                let failure = TlsFailure { target: target.to_string(), reason };
                GatewayError::UpstreamTls { upstream, failure: Box::new(failure) }
            }
            pool::SendError::Http(error) => match body::client_fault(&error) {
                Some(ClientBodyError::Read(cause)) => GatewayError::BadRequestBody(cause.to_string()),
                Some(ClientBodyError::TooLarge(limit)) => GatewayError::BodyTooLarge { limit: *limit },
                Some(ClientBodyError::Stalled(after)) => GatewayError::RequestBodyTimeout { after: *after },
                None if error.is_parse() => {
                    GatewayError::UpstreamBadResponse { upstream, reason: error_chain(&error) }
                }
                None => GatewayError::UpstreamUnreachable { upstream, cause: error_chain(&error) },
            },
            error => GatewayError::UpstreamUnreachable { upstream, cause: error_chain(&error) },
        }
    }
}

/// Refuses responses whose framing the gateway cannot pass on faithfully.
/// hyper's client reads `Transfer-Encoding` over `Content-Length` and any
/// coding list ending in `chunked` as chunked; the gateway drops the header
/// as hop-by-hop, so a response carrying both (a smuggling attempt or a
/// broken upstream), or a transfer coding other than a lone `chunked`
/// (which would reach the client undeclared), is refused with 502. A `101`
/// to an ordinary request was never asked for (WebSocket handshakes go
/// through [`UpstreamPool::forward_upgrade`]).
fn check_framing<B>(response: &Response<B>) -> Result<(), String> {
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        return Err("101 Switching Protocols to a request that asked for no upgrade".to_owned());
    }
    let headers = response.headers();
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    let Some(first) = codings.next() else { return Ok(()) };
    if headers.contains_key(header::CONTENT_LENGTH) {
        return Err("both Content-Length and Transfer-Encoding".to_owned());
    }
    let lone_chunked = first.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked");
    if !lone_chunked || codings.next().is_some() {
        return Err(format!("unsupported Transfer-Encoding {first:?}"));
    }
    Ok(())
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
    pools: HashMap<String, Arc<UpstreamPool>, foldhash::fast::RandomState>,
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
    fn connection_options_alone_remove_only_the_hop_by_hop_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-kept"]);

        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("close"));
        headers.append(header::CONNECTION, HeaderValue::from_static("X-Hop-A , x-hop-b"));
        headers.insert("x-hop-a", HeaderValue::from_static("1"));
        headers.insert("x-hop-b", HeaderValue::from_static("2"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn identity_replaces_every_spoofed_copy_and_public_routes_send_none() {
        let keys = crate::config::Config::defaults().keys;
        let spoofed = |headers: &mut HeaderMap| {
            for name in [&keys.client_header, &keys.key_id_header, &keys.scopes_header] {
                headers.append(name.clone(), HeaderValue::from_static("spoof-1"));
                headers.append(name.clone(), HeaderValue::from_static("spoof-2"));
            }
        };

        let identity = Identity::new("acme", "acme.k1", &["orders:read".into(), "orders:write".into()]);
        let mut headers = HeaderMap::new();
        spoofed(&mut headers);
        set_identity(&mut headers, &keys, Some(&identity));
        let all = |headers: &HeaderMap, name: &HeaderName| -> Vec<String> {
            headers.get_all(name).iter().map(|v| v.to_str().unwrap().to_owned()).collect()
        };
        assert_eq!(all(&headers, &keys.client_header), ["acme"]);
        assert_eq!(all(&headers, &keys.key_id_header), ["acme.k1"]);
        assert_eq!(all(&headers, &keys.scopes_header), ["orders:read orders:write"]);

        let mut headers = HeaderMap::new();
        spoofed(&mut headers);
        set_identity(&mut headers, &keys, None);
        assert!(headers.is_empty(), "public routes forward no identity: {headers:?}");
    }

    #[test]
    fn ipv4_peers_are_written_as_std_writes_them() {
        for text in ["0.0.0.0", "1.2.3.4", "10.0.0.255", "192.0.2.9", "255.255.255.255"] {
            let ip: Ipv4Addr = text.parse().unwrap();
            assert_eq!(ipv4_value(ip).unwrap(), text);
        }
        // Every octet value, in every position.
        for n in 0..=255u8 {
            let ip = Ipv4Addr::new(n, 255 - n, n / 2, n.wrapping_mul(7));
            assert_eq!(ipv4_value(ip).unwrap(), ip.to_string().as_str());
        }
        let v6 = Peer::new("[2001:db8::1]:80".parse().unwrap());
        assert_eq!(v6.forwarded_for, "2001:db8::1");
    }

    #[test]
    fn forwarded_for_is_the_peer_when_the_client_sent_none() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("  "));
        set_forwarded(&mut headers, &Peer::new("192.0.2.9:1234".parse().unwrap()), false, "http", None);
        assert_eq!(headers[X_FORWARDED_FOR], "192.0.2.9");
    }

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn a_clients_own_forwarded_for_is_replaced_unless_its_peer_is_trusted() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.9.9.9"));
        headers.insert(header::FORWARDED, HeaderValue::from_static("for=10.9.9.9"));
        let peer = Peer::new("192.0.2.9:1234".parse().unwrap());
        let trusted = nets(&["10.0.0.0/8"]);
        assert!(!peer.is_trusted(&trusted));
        assert_eq!(peer.client_ip(&headers, &trusted), "192.0.2.9".parse::<IpAddr>().unwrap());
        set_forwarded(&mut headers, &peer, false, "http", None);
        assert_eq!(headers[X_FORWARDED_FOR], "192.0.2.9");
        assert!(!headers.contains_key(header::FORWARDED));
    }

    #[test]
    fn behind_trusted_proxies_the_client_is_the_rightmost_untrusted_hop() {
        let trusted = nets(&["10.0.0.0/8", "192.168.1.1/32"]);
        let peer = Peer::new("10.0.0.2:443".parse().unwrap());
        let mut headers = HeaderMap::new();
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1, 203.0.113.7"));
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("192.168.1.1, 10.0.0.1"));
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert_eq!(
            peer.client_ip(&headers, &trusted),
            ip("203.0.113.7"),
            "1.1.1.1 is the client's own claim"
        );
        // A garbage hop ends the walk at the last address believed.
        let mut garbled = HeaderMap::new();
        garbled.insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7, junk, 10.0.0.1"));
        assert_eq!(peer.client_ip(&garbled, &trusted), ip("10.0.0.1"));
        assert_eq!(peer.client_ip(&HeaderMap::new(), &trusted), ip("10.0.0.2"));
    }

    #[test]
    fn forwarded_for_appends_to_an_existing_chain_from_a_trusted_proxy() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        let peer = Peer::new("127.0.0.1:5000".parse().unwrap());
        assert!(peer.is_trusted(&nets(&["127.0.0.1/32"])));
        set_forwarded(&mut headers, &peer, true, "http", Some(HeaderValue::from_static("api.example")));
        assert_eq!(headers[X_FORWARDED_FOR], "203.0.113.7, 127.0.0.1");
        assert_eq!(headers[X_FORWARDED_PROTO], "http");
        assert_eq!(headers[X_FORWARDED_HOST], "api.example");
    }

    #[test]
    fn forwarded_host_from_the_client_is_not_passed_on_when_there_is_no_host() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_HOST, HeaderValue::from_static("spoofed.example"));
        set_forwarded(&mut headers, &Peer::new("[::1]:5000".parse().unwrap()), false, "http", None);
        assert!(!headers.contains_key(X_FORWARDED_HOST));
        assert_eq!(headers[X_FORWARDED_FOR], "::1");
    }
}
