//! Forwarding to upstreams: header rewriting here; the rest in one file per
//! concern:
//!
//! - `upstream.rs`: one `[upstream.NAME]`, the forwarding loop (breaker,
//!   pick, send, retry);
//! - `balance.rs`: which target (`balance`, `weights`);
//! - `health.rs` and `probe.rs`: passive and active health;
//! - `retry.rs`: which requests are retried, and the retry budget;
//! - `pool.rs`: per-worker pools of keep-alive connections to one target;
//! - `body.rs`: the request body on its way up; `upgrade.rs`: WebSocket.
//!
//! Bodies stream both ways (hyper's `Incoming` is passed through, never
//! collected, except a small body kept to be sent again on a retry), so a
//! 1 GiB upload costs no more memory than a small one.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::Response;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use rustls::pki_types::CertificateDer;

use crate::config::KeysConfig;
pub use body::{ClientBodyError, CountedBody, RequestBody};
pub use pool::{ConnPool, PoolLimits, PooledBody, UpstreamBodyError};

pub use balance::Affinity;
pub use upstream::{UpstreamPool, Upstreams};

pub mod balance;
pub mod body;
pub mod health;
pub mod pool;
pub mod probe;
pub mod retry;
pub mod upgrade;
pub mod upstream;

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
/// `X-Forwarded-*`, the three identity headers, the request ID and the
/// upstream's `Host`.
pub const ADDED_REQUEST_HEADERS: usize = 8;

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
