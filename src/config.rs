//! `gateway.toml`: parsed with serde, then validated into typed values.
//!
//! Two layers, as in linkerd2-proxy and rust-rpxy: [`RawConfig`] mirrors the
//! file (`deny_unknown_fields`, strings as written) and [`RawConfig::validate`]
//! turns it into [`Config`] (socket addresses, durations, URIs, header names)
//! or a list of [`ConfigProblem`]s, each naming the field and its line.
//! Nothing binds a port before a config has validated, and a reload builds the
//! new `Config` completely before it is swapped in.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::upstream_tls::Protocol;
use crate::upstream_tls::{TlsFiles, UpstreamTls};
use http::{HeaderName, Uri};
use serde::Deserialize;

/// A Redis URL with any password replaced, for messages and logs.
pub use crate::redis_target::redact_url;
pub use crate::redis_target::{Endpoint, RedisTls};

/// The validated configuration the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub keys: KeysConfig,
    pub routes: Vec<RouteConfig>,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub limits: LimitsConfig,
    pub usage: UsageConfig,
    pub log: LogConfig,
    /// The admin listener; `None` (no `[admin] listen`) keeps it off.
    pub admin: Option<AdminConfig>,
    /// How client certificates name their client (`[client_certs]`).
    pub client_certs: ClientCertsConfig,
    /// Access and refresh tokens (`[tokens]`, issue 20).
    pub tokens: TokensConfig,
    /// External identity providers whose JWTs `auth = ["jwt"]` routes
    /// accept (`[[jwt.issuer]]`, see `auth::issuer`).
    pub jwt_issuers: Vec<IssuerConfig>,
}

/// `[[jwt.issuer]]`: an external identity provider. Its tokens are
/// verified with the keys of its JWKS and name a client whose record must
/// exist (see `auth::issuer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerConfig {
    /// The `iss` claim, matched exactly; also how routes name the issuer.
    pub iss: String,
    pub jwks: crate::jwks::JwksSource,
    /// The CA certificates (PEM) an `https://` JWKS server is verified
    /// against; `None`: the operating system's roots.
    pub ca: Option<PathBuf>,
    /// The token's `aud` must name one of these; empty only with
    /// `audience_optional = true` (no audience check at all).
    pub audience: Vec<String>,
    /// Signature algorithms accepted (asymmetric only).
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// The claim holding the client ID (`sub` by default).
    pub client_claim: String,
    /// The claim holding the scopes: a space-separated string or an array.
    pub scope_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// How often the JWKS is fetched again in the background.
    pub refresh: Duration,
    /// The least time between two fetches caused by tokens with an unknown `kid`.
    pub refetch_interval: Duration,
}

/// The algorithms an issuer accepts unless it says otherwise.
pub const DEFAULT_ISSUER_ALGORITHMS: [jsonwebtoken::Algorithm; 3] =
    [jsonwebtoken::Algorithm::RS256, jsonwebtoken::Algorithm::ES256, jsonwebtoken::Algorithm::EdDSA];

/// `[tokens]`: the token endpoint and the access tokens (JWTs) it signs,
/// verified on routes with `auth = ["key", "jwt"]` (see `auth::jwt`).
#[derive(Debug, Clone)]
pub struct TokensConfig {
    /// Off unless set: no token endpoint, no JWKS document.
    pub enabled: bool,
    /// The token endpoint's path on the public listener.
    pub path: String,
    /// Lifetime of an access token (`exp - iat`).
    pub access_ttl: Duration,
    /// Lifetime of a refresh token.
    pub refresh_ttl: Duration,
    /// PKCS#8 PEM file with the Ed25519 signing key; `None`: one is
    /// generated when the gateway starts.
    pub signing_key: Option<PathBuf>,
    /// The `iss` claim signed into, and required of, access tokens.
    pub issuer: String,
    /// The `aud` claim, if access tokens carry (and must carry) one.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// Verified access tokens kept in process (by hash, until `exp`).
    pub cache_capacity: u64,
    /// The token endpoint hands the refresh token out as a secure cookie
    /// instead of in the JSON body, and reads it back (`refresh::cookie`).
    pub refresh_cookie: bool,
    /// The cookie's `Path`: the token endpoint's unless set; `/` makes it a
    /// `__Host-` cookie (sent to every path of the host, stripped before
    /// any upstream).
    pub refresh_cookie_path: String,
}

impl Default for TokensConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            path: "/oauth/token".to_owned(),
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            signing_key: None,
            issuer: "keygate".to_owned(),
            audience: None,
            leeway: Duration::from_secs(30),
            cache_capacity: 100_000,
            refresh_cookie: false,
            refresh_cookie_path: "/oauth/token".to_owned(),
        }
    }
}

/// `[client_certs]`: client certificates as credentials, on routes with
/// `auth = ["cert"]` (the TLS listener's `client_ca` verifies them).
#[derive(Debug, Clone, Default)]
pub struct ClientCertsConfig {
    /// Where a verified certificate names its client ID.
    pub id_from: crate::client_cert::IdFrom,
}

/// A kind of credential a route may accept (`[[route]] auth`). Access
/// tokens (issue 20) join as `Jwt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// An API key (bearer, key header, or query where allowed).
    Key,
    /// A client certificate verified by the TLS listener.
    Cert,
    /// An access token (JWT) from the token endpoint (`[tokens]`).
    Jwt,
}

impl CredentialKind {
    pub const ALL: [CredentialKind; 3] = [Self::Key, Self::Cert, Self::Jwt];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Cert => "cert",
            Self::Jwt => "jwt",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// The set of credential kinds a route accepts; `["key"]` by default.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CredentialKinds(u8);

impl CredentialKinds {
    pub const KEY: CredentialKinds = CredentialKinds(1);

    pub fn of(kinds: &[CredentialKind]) -> Self {
        Self(kinds.iter().fold(0, |set, kind| set | kind.bit()))
    }

    pub fn accepts(self, kind: CredentialKind) -> bool {
        self.0 & kind.bit() != 0
    }
}

impl Default for CredentialKinds {
    fn default() -> Self {
        Self::KEY
    }
}

impl fmt::Debug for CredentialKinds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(CredentialKind::ALL.iter().filter(|k| self.accepts(**k)).map(|k| k.as_str()))
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub mode: LimitMode,
    /// Send `RateLimit-Policy` / `RateLimit` on responses of limited keys.
    pub headers: bool,
    /// Also send `X-RateLimit-Limit/Remaining/Reset`.
    pub legacy_headers: bool,
    /// When the limit store (Redis) fails: decide locally within the
    /// documented bounds (true) or answer 503 once leases are spent.
    pub fail_open: bool,
    /// Shared mode: a leased slice is this fraction of one second's rate.
    pub lease_fraction: f64,
    /// Shared mode: unspent leased tokens are dropped after this long.
    pub lease_ttl: Duration,
    /// Most quota units one instance leases at a time.
    pub quota_lease: u64,
    /// With `fail_open`: the fraction of a key's quota one instance may
    /// spend per window beyond its leases while Redis is unreachable.
    pub outage_allowance: f64,
    /// Shared mode: gateway instances sharing each rate; while Redis is
    /// unreachable each enforces `rate / instances` locally.
    pub instances: std::num::NonZeroU32,
    /// Limiters of keys idle this long are dropped (memory stays bounded).
    pub idle_eviction: Duration,
    pub max_tracked_keys: u64,
}

/// Usage tracking (needs the Redis store: counts are flushed there).
#[derive(Debug, Clone)]
pub struct UsageConfig {
    pub enabled: bool,
    /// Time between flushes to Redis.
    pub flush_interval: Duration,
    /// How often open hour and day buckets are written when the freshness
    /// budget does not reach them (see `usage::flusher`).
    pub rollup_interval: Duration,
    /// The most series (a client, key or route in a minute, hour or day
    /// bucket) held in memory: the open buckets, and what Redis has not
    /// acknowledged. Past it, events of new series are dropped and counted.
    pub max_buffered_series: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitMode {
    /// Each instance enforces each key's rate on its own (exact on one instance).
    Local,
    /// Instances share each key's rate through Redis (leased slices).
    Redis,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The first listener's address (`server.listen`, or the first
    /// `[[server.listener]]`): where the log says the gateway listens.
    pub listen: SocketAddr,
    /// Every listener, plain or TLS; never empty (`server.listen` alone is
    /// one plain listener). Bound once at start: not reloadable.
    pub listeners: Vec<ListenerConfig>,
    /// How long in-flight requests may run after SIGTERM before the process exits anyway.
    pub drain_timeout: Duration,
    /// Worker threads, each a single-threaded runtime with its own listener
    /// (SO_REUSEPORT) and upstream connection pools. 0 in the file means one
    /// per CPU core; resolved to a count here.
    pub workers: usize,
    /// Let other processes bind the same address too (`SO_REUSEPORT`
    /// across processes, e.g. for a zero-downtime restart); off, a second
    /// instance on the address fails to start with "address in use".
    pub reuse_port: bool,
    /// Connection deadlines and sizes: every state a connection can be in
    /// has a deadline, every buffer a limit.
    pub edge: EdgeConfig,
}

/// One `[[server.listener]]`: an address, plain HTTP or TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub listen: SocketAddr,
    /// `None`: cleartext HTTP/1.1 and h2c.
    pub tls: Option<ListenerTls>,
}

/// A TLS listener's certificates and client-certificate rule. The files are
/// checked when the config validates, and read again on every reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// Chosen by SNI (the names in each certificate); the first also answers
    /// clients that send no name, or a name no certificate has.
    pub certs: Vec<CertFiles>,
    /// From accept to a finished TLS handshake; the smaller of this and
    /// `header_read_timeout` applies. The first request head then has its
    /// own `header_read_timeout`, as after h2c detection.
    pub handshake_timeout: Duration,
    /// mTLS: client certificates are verified against this CA.
    pub client_auth: Option<ClientAuth>,
}

/// One certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `client_ca` and `client_auth` of a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    pub ca: PathBuf,
    pub mode: ClientAuthMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuthMode {
    /// A client without a valid certificate fails the handshake.
    Required,
    /// A client may send none; one it sends must be valid.
    Optional,
}

/// What one client may hold of the gateway: deadlines for every connection
/// state, caps on connections, sizes of request heads, and which request
/// forms are refused before they are judged. Library defaults are not relied
/// on: each value here is set explicitly on hyper.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// From accept to a complete request head (first bytes, protocol
    /// detection, the HTTP/1 head, the HTTP/2 preface and first stream), and
    /// for each later head once its first byte arrived.
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// A response the client does not read for this long (the socket's send
    /// buffer stays full) closes the connection.
    pub send_timeout: Duration,
    /// HTTP/2: PING an idle peer this often; no answer within
    /// `http2_keepalive_timeout` closes the connection.
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    pub http2_max_concurrent_streams: u32,
    /// Open connections across all workers; past it new ones are closed at once.
    pub max_connections: usize,
    /// Open connections from one source address.
    pub max_connections_per_ip: usize,
    /// The whole request head (request line and headers; HTTP/2: the header
    /// list); larger heads get 431.
    pub max_header_bytes: usize,
    /// Header fields in one request head.
    pub max_headers: usize,
    /// Peers whose `X-Forwarded-For` is believed; from anyone else it is
    /// replaced by the peer's own address.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Refuse path forms that backends read differently (`;` parameters,
    /// trailing dots or spaces in segments, double encoding, invalid UTF-8).
    pub strict_paths: bool,
    /// Remove headers that make frameworks reinterpret the method or path
    /// (`X-HTTP-Method-Override`, `X-Original-URL`, ...).
    pub strip_override_headers: bool,
    /// The request ID's header (`request_id`): read from the client when
    /// sane, sent upstream, returned on every response.
    pub request_id_header: HeaderName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded store: TOML files in a folder, relative paths resolved
    /// against the config file's folder.
    File { dir: PathBuf },
    /// Redis: one node (`kind = "redis"`, `url` like
    /// `redis://127.0.0.1:6379/0`, or `rediss://` for TLS, with `tls`), a
    /// cluster (`kind = "redis-cluster"`, `nodes`) or a Sentinel-managed
    /// primary (`kind = "redis-sentinel"`, `sentinels`, `master`); every
    /// Redis key under `prefix`.
    Redis { endpoint: Endpoint, prefix: String, tls: RedisTls },
}

#[derive(Debug, Clone)]
pub struct KeysConfig {
    /// Prefix of every key string, e.g. `kg_`.
    pub prefix: String,
    /// Header carrying the key besides `Authorization: Bearer`.
    pub header: HeaderName,
    /// Query parameter carrying the key, on routes that allow it.
    pub query_param: String,
    /// Identity headers sent upstream in place of the key.
    pub client_header: HeaderName,
    pub key_id_header: HeaderName,
    pub scopes_header: HeaderName,
    /// Verified records kept in process.
    pub cache_capacity: u64,
    /// How long a cached record is trusted without asking the store again
    /// (bounds staleness if an invalidation message is lost).
    pub cache_ttl: Duration,
    /// How long an unknown key hash is remembered as unknown.
    pub negative_ttl: Duration,
    /// While the store is unreachable, cached records keep working this long
    /// past their `cache_ttl`; keys the gateway cannot vouch for get 503.
    pub stale_window: Duration,
    /// Failed authentications allowed per source IP (IPv6: per /64) before
    /// its keyed requests get 429 unverified; `None` ("off") disables.
    pub auth_failures_per_ip: Option<crate::meta::Rate>,
    /// How many failures a source may have in a row before the rate applies.
    pub auth_failures_burst: std::num::NonZeroU32,
    /// Global cap on store lookups for keys not cached (503 past it);
    /// `None` (0) disables.
    pub store_lookups_per_second: Option<std::num::NonZeroU32>,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Path prefix, normalised, without a trailing slash (except `/`).
    pub path: String,
    /// Lowercase host without port; `None` matches any host.
    pub host: Option<String>,
    pub target: RouteTarget,
    pub strip_prefix: bool,
    /// No key required (health checks, docs).
    pub public: bool,
    /// Scopes a key needs here (any method); empty means the default
    /// read/write rule by method.
    pub scopes: Vec<String>,
    /// Scopes needed per method (`GET = ["orders:read"]`), on top of `scopes`.
    pub method_scopes: BTreeMap<String, Vec<String>>,
    /// Whether the key may come in the query string (`?api_key=`).
    pub allow_query_key: bool,
    /// The credentials this route accepts (`auth`): keys, client
    /// certificates, or both (a presented key then wins).
    pub auth: CredentialKinds,
    /// Units of rate limit and quota one request here costs.
    pub cost: std::num::NonZeroU32,
    /// Limits on the request body forwarded upstream.
    pub body: BodyLimits,
    /// What a request that did not come over TLS gets (`tls_only`).
    pub plain: PlainHttp,
    /// Methods whose failed attempts may be retried on another target
    /// (`retry_methods`; the idempotent ones by default).
    pub retry_methods: crate::proxy::retry::RetryMethods,
    /// The `iss` of the token issuers this route trusts (`issuers`): among
    /// `[tokens] issuer` and the `[[jwt.issuer]]` ones. `None`: all of them.
    pub issuers: Option<Vec<String>>,
}

impl RouteConfig {
    /// Whether this route accepts tokens from issuer `iss`.
    pub fn trusts_issuer(&self, iss: &str) -> bool {
        self.issuers.as_ref().is_none_or(|trusted| trusted.iter().any(|t| t == iss))
    }
}

/// A route's answer to requests over cleartext HTTP (`tls_only`,
/// `tls_redirect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlainHttp {
    /// Served like any other (the default).
    #[default]
    Served,
    /// 308 to the same URL on `https://` (at the first TLS listener's port).
    Redirect,
    /// 403 `tls_required`.
    Refused,
}

/// A route's limits on request bodies (`max_body`, `upload_idle_timeout`),
/// one field on [`RouteConfig`] so that routes built in code take the
/// defaults with `body: BodyLimits::default()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyLimits {
    /// Largest request body forwarded, in bytes (`None`: unlimited). Bigger
    /// declared bodies get 413 before forwarding; chunked ones are cut off.
    pub max: Option<u64>,
    /// Longest pause allowed between two pieces of a request body on its way
    /// upstream: a stalled upload must not hold an upstream connection forever.
    pub idle_timeout: Duration,
}

impl Default for BodyLimits {
    fn default() -> Self {
        Self { max: Some(DEFAULT_MAX_BODY), idle_timeout: DEFAULT_UPLOAD_IDLE_TIMEOUT }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    /// A named `[upstream.NAME]`.
    Upstream(String),
    /// Answered inside the gateway with what the upstream would have received.
    Echo,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `scheme://host:port` bases, used round robin.
    pub targets: Vec<Uri>,
    pub connect_timeout: Duration,
    /// Time allowed until the upstream's response headers arrive.
    pub timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Longest pause allowed between two pieces of a response body once its
    /// head has arrived; a stalled upstream then ends the response as aborted.
    pub body_idle_timeout: Duration,
    /// Open connections allowed to each target (idle or busy), so a hanging
    /// upstream cannot make the gateway open one connection per waiting request.
    pub max_connections: std::num::NonZeroUsize,
    /// `websocket_idle_timeout`: how long an upgraded (WebSocket) tunnel may
    /// carry no byte either way before the gateway closes it. The
    /// connection's HTTP idle timeout no longer applies once it is upgraded.
    pub websocket_idle_timeout: Duration,
    /// `protocol`: the HTTP version spoken to the targets.
    pub protocol: Protocol,
    /// For `https://` targets: the rustls config (built at load, shared by
    /// every worker) and the name to verify. `None` when every target is `http://`.
    pub tls: Option<UpstreamTls>,
    /// `balance`: how a target is chosen.
    pub balance: crate::proxy::balance::Policy,
    /// `weights`: each target's share, in `targets` order (all 1 by default).
    pub weights: Vec<u32>,
    /// `passive = {...}`: ejection on consecutive failures.
    pub passive: crate::proxy::health::PassiveSettings,
    /// `health = {...}`: active checks, if configured.
    pub health: Option<crate::proxy::health::ActiveSettings>,
    /// `retries`, `retry_budget`, `retry_statuses`, `retry_buffer`, `try_timeout`.
    pub retry: crate::proxy::retry::RetrySettings,
    /// Circuit breaking: requests in flight allowed (`max_requests`) and
    /// connection attempts pending (`max_pending`), all targets together.
    pub max_requests: usize,
    pub max_pending: usize,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A `RUST_LOG`-style filter for the diagnostic log (stderr); the
    /// `RUST_LOG` variable wins when set.
    pub filter: String,
    pub format: LogFormat,
    /// `access`: where access lines go (`access_log`); `None` is `"off"`.
    /// Built here but started by its first line, so `keygate check` opens
    /// nothing; a reload builds a new one, which reopens the file.
    pub access: Option<std::sync::Arc<crate::access_log::Sink>>,
    /// `access_format`: defaults to `format`.
    pub access_format: LogFormat,
}

/// `[admin]`: the admin API, `/metrics` and health checks on their own listener.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The bearer token admin calls must present (from `token` or `token_env`).
    pub token: AdminToken,
    /// Who the audit trail says acted when a call used this token.
    pub token_name: String,
    /// `readyz_requires_healthy_upstreams`: `/readyz` also answers 503
    /// while some upstream has no target in rotation (off by default: a
    /// gateway whose upstreams are all down can still answer its refusals,
    /// and taking it out of a load balancer fixes nothing).
    pub readyz_requires_healthy_upstreams: bool,
}

/// The admin bearer token. Only its SHA-256 digest is kept: comparing digests
/// in constant time hides the token's length as well as its bytes, and the
/// clear token is not held in memory after the config is loaded. `Debug`
/// prints no part of it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl AdminToken {
    /// Shortest token accepted: anything shorter is guessable.
    pub const MIN_LEN: usize = 16;

    pub fn new(token: &str) -> Self {
        use sha2::Digest;
        Self { digest: sha2::Sha256::digest(token.as_bytes()).into() }
    }

    /// Whether `presented` is the token, compared in constant time.
    pub fn matches(&self, presented: &[u8]) -> bool {
        use sha2::Digest;
        use subtle::ConstantTimeEq;
        let presented: [u8; 32] = sha2::Sha256::digest(presented).into();
        bool::from(self.digest.ct_eq(&presented))
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl EdgeConfig {
    /// hyper's own HTTP/1 header timer, which also runs while a keep-alive
    /// connection is idle: the watchdog keeps the two deadlines apart, so
    /// hyper's is only a backstop past the longer of them.
    pub fn hyper_header_backstop(&self) -> Duration {
        self.header_read_timeout.max(self.idle_timeout) + self.header_read_timeout
    }
}

// === The file as written ===

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    keys: RawKeys,
    #[serde(default, rename = "route")]
    routes: Vec<RawRoute>,
    #[serde(default, rename = "upstream")]
    upstreams: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    usage: RawUsage,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    client_certs: RawClientCerts,
    #[serde(default)]
    tokens: RawTokens,
    #[serde(default)]
    jwt: RawJwt,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    #[serde(default, rename = "issuer")]
    issuers: Vec<RawIssuer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuer {
    iss: Option<String>,
    jwks: Option<String>,
    ca: Option<String>,
    audience: Option<OneOrMany>,
    audience_optional: Option<bool>,
    algorithms: Option<Vec<String>>,
    client_claim: Option<String>,
    scope_claim: Option<String>,
    leeway: Option<String>,
    refresh: Option<String>,
    refetch_interval: Option<String>,
}

/// A string or a list of strings (`audience = "api"` or `["api", "web"]`).
#[derive(Debug, Default)]
struct OneOrMany(Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut all = Vec::new();
                while let Some(one) = seq.next_element::<String>()? {
                    all.push(one);
                }
                Ok(OneOrMany(all))
            }
        }
        // A sequence is asked for (the TOML parser hands a string to
        // `visit_str` all the same): the config's field walk in
        // tests/config_fields.rs can trace a sequence, not "anything".
        d.deserialize_seq(Visitor)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokens {
    enabled: Option<bool>,
    path: Option<String>,
    access_ttl: Option<String>,
    refresh_ttl: Option<String>,
    signing_key: Option<String>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Option<String>,
    cache_capacity: Option<u64>,
    refresh_cookie: Option<bool>,
    refresh_cookie_path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientCerts {
    id_from: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUsage {
    enabled: Option<bool>,
    flush_interval: Option<String>,
    rollup_interval: Option<String>,
    max_buffered_series: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    mode: Option<LimitMode>,
    headers: Option<bool>,
    legacy_headers: Option<bool>,
    fail_open: Option<bool>,
    lease_fraction: Option<f64>,
    lease_ttl: Option<String>,
    quota_lease: Option<u64>,
    outage_allowance: Option<f64>,
    instances: Option<u32>,
    idle_eviction: Option<String>,
    max_tracked_keys: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    #[serde(default, rename = "listener")]
    listeners: Vec<RawListener>,
    drain_timeout: Option<String>,
    workers: Option<usize>,
    reuse_port: Option<bool>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    send_timeout: Option<String>,
    http2_keepalive_interval: Option<String>,
    http2_keepalive_timeout: Option<String>,
    http2_max_concurrent_streams: Option<u32>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    max_header_bytes: Option<usize>,
    max_headers: Option<usize>,
    trusted_proxies: Option<Vec<String>>,
    strict_paths: Option<bool>,
    strip_override_headers: Option<bool>,
    request_id_header: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    listen: String,
    tls: Option<RawTls>,
    handshake_timeout: Option<String>,
    client_ca: Option<String>,
    client_auth: Option<String>,
}

/// `tls = { cert, key }`, or `tls = { certs = [{ cert, key }, ...] }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<String>,
    key: Option<String>,
    certs: Option<Vec<RawCertFiles>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertFiles {
    cert: String,
    key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    kind: Option<String>,
    url: Option<String>,
    nodes: Option<Vec<String>>,
    sentinels: Option<Vec<String>>,
    master: Option<String>,
    dir: Option<String>,
    prefix: Option<String>,
    tls_ca: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    prefix: Option<String>,
    header: Option<String>,
    query_param: Option<String>,
    client_header: Option<String>,
    key_id_header: Option<String>,
    scopes_header: Option<String>,
    cache_capacity: Option<u64>,
    cache_ttl: Option<String>,
    negative_ttl: Option<String>,
    stale_window: Option<String>,
    auth_failures_per_ip: Option<String>,
    auth_failures_burst: Option<u32>,
    store_lookups_per_second: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path: String,
    upstream: String,
    host: Option<String>,
    #[serde(default)]
    strip_prefix: bool,
    #[serde(default)]
    public: bool,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    method_scopes: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    allow_query_key: bool,
    auth: Option<Vec<String>>,
    issuers: Option<Vec<String>>,
    cost: Option<u32>,
    max_body: Option<String>,
    upload_idle_timeout: Option<String>,
    #[serde(default)]
    tls_only: bool,
    tls_redirect: Option<bool>,
    retry_methods: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    targets: Vec<String>,
    connect_timeout: Option<String>,
    timeout: Option<String>,
    pool_idle_timeout: Option<String>,
    pool_max_idle_per_host: Option<usize>,
    body_idle_timeout: Option<String>,
    max_connections: Option<usize>,
    websocket_idle_timeout: Option<String>,
    /// CA certificates (PEM) for `https://` targets instead of the system's roots.
    ca: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
    server_name: Option<String>,
    protocol: Option<String>,
    balance: Option<String>,
    weights: Option<Vec<u32>>,
    passive: Option<RawPassive>,
    health: Option<RawActiveHealth>,
    retries: Option<u32>,
    retry_budget: Option<f64>,
    retry_statuses: Option<Vec<u16>>,
    retry_buffer: Option<String>,
    try_timeout: Option<String>,
    max_requests: Option<usize>,
    max_pending: Option<usize>,
}

/// `passive = { failures = 5, count_5xx = true, ejection = "10s", max_ejection = "5m" }`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPassive {
    failures: Option<u32>,
    count_5xx: Option<bool>,
    ejection: Option<String>,
    max_ejection: Option<String>,
}

/// `health = { path = "/healthz", interval = "5s", timeout = "1s", healthy = 2, unhealthy = 3 }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawActiveHealth {
    path: String,
    interval: Option<String>,
    timeout: Option<String>,
    healthy: Option<u32>,
    unhealthy: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    filter: Option<String>,
    format: Option<LogFormat>,
    access: Option<String>,
    access_format: Option<LogFormat>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    token: Option<String>,
    token_env: Option<String>,
    token_name: Option<String>,
    readyz_requires_healthy_upstreams: Option<bool>,
}

// Hand-written so a token written inline never reaches a log through `{:?}`.
impl fmt::Debug for RawAdmin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawAdmin")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_env", &self.token_env)
            .field("token_name", &self.token_name)
            .field("readyz_requires_healthy_upstreams", &self.readyz_requires_healthy_upstreams)
            .finish()
    }
}

// === Errors ===

/// One thing wrong with a config file: the field's dotted path, its line
/// (when the file has it), and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub field: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: `{}`: {}", self.field, self.message),
            None => write!(f, "`{}`: {}", self.field, self.message),
        }
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: invalid configuration:\n{}", list(.problems))]
    Invalid { path: PathBuf, problems: Vec<ConfigProblem> },
}

fn list(problems: &[ConfigProblem]) -> String {
    problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n")
}

// === Loading ===

/// What a config is loaded for, which decides whether the process
/// environment is read. Only serving needs the admin token that
/// `[admin] token_env` names; a command that only reads the file (`check`,
/// `keys`, `usage`) must work where that variable is not set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `serve`, a reload, `check --env`: `token_env` must be set.
    Serve,
    /// Every other command: the variable is not read, and the loaded
    /// config has no `admin` when the token would come from it.
    Inspect,
}

impl Config {
    /// Reads, parses and validates a config file to serve it (see
    /// [`Purpose::Serve`]). Relative paths in it (the file store's `dir`)
    /// are resolved against the file's folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_for(path, Purpose::Serve)
    }

    /// [`Config::load`] for `purpose`.
    pub fn load_for(path: &Path, purpose: Purpose) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml_for(&text, base, purpose).map_err(|e| e.at(path))
    }

    /// The configuration of an empty file plus one echo route: what store
    /// commands use when only `--redis` is given.
    pub fn defaults() -> Config {
        let minimal = RawConfig {
            routes: vec![RawRoute {
                path: "/".into(),
                upstream: ECHO_TARGET.into(),
                host: None,
                strip_prefix: false,
                public: false,
                scopes: vec![],
                method_scopes: BTreeMap::new(),
                allow_query_key: false,
                auth: None,
                issuers: None,
                cost: None,
                max_body: None,
                upload_idle_timeout: None,
                tls_only: false,
                tls_redirect: None,
                retry_methods: None,
            }],
            ..RawConfig::default()
        };
        // The defaults are fixed text above; a test proves they validate.
        minimal
            .validate(Path::new("."))
            .unwrap_or_else(|problems| unreachable!("defaults are invalid: {problems:?}"))
    }

    /// Makes the store the Redis at `url`, whatever the file says: what
    /// `--redis URL` and `KEYGATE_REDIS_URL` do, for every command (`serve`
    /// and a reload included), so that one rule holds everywhere: the flag
    /// or the variable over the file. The file's Redis `prefix` is kept;
    /// over a file store it is the default `kg:`. The message of a URL that
    /// does not parse names no password.
    pub fn use_redis(&mut self, url: &str) -> Result<(), String> {
        self.use_redis_nodes(std::slice::from_ref(&url.to_owned()))
    }

    /// [`Config::use_redis`] for one URL or several: several are the seed
    /// nodes of a Redis Cluster (`--redis` repeated, `KEYGATE_REDIS_NODES`).
    pub fn use_redis_nodes(&mut self, urls: &[String]) -> Result<(), String> {
        for url in urls {
            check_redis_url(url)?;
        }
        let endpoint = match urls {
            [] => return Err("no Redis URL given".to_owned()),
            [url] => Endpoint::Node(url.clone()),
            seeds => Endpoint::Cluster(seeds.to_vec()),
        };
        // The config's TLS files stay with the store they were written for.
        let (prefix, tls) = match &self.store {
            StoreConfig::Redis { prefix, tls, .. } => (prefix.clone(), tls.clone()),
            StoreConfig::File { .. } => ("kg:".to_owned(), RedisTls::default()),
        };
        self.store = StoreConfig::Redis { endpoint, prefix, tls };
        Ok(())
    }

    /// Parses and validates config text to serve it; `base` resolves
    /// relative paths.
    pub fn from_toml(text: &str, base: &Path) -> Result<Config, TextError> {
        Self::from_toml_for(text, base, Purpose::Serve)
    }

    /// [`Config::from_toml`] for `purpose`.
    pub fn from_toml_for(text: &str, base: &Path, purpose: Purpose) -> Result<Config, TextError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| TextError::Syntax(e.to_string()))?;
        raw.validate_for(base, purpose).map_err(|mut problems| {
            locate_lines(text, &mut problems);
            TextError::Invalid(problems)
        })
    }
}

/// A config error before it is tied to a file path.
#[derive(Debug)]
pub enum TextError {
    Syntax(String),
    Invalid(Vec<ConfigProblem>),
}

impl TextError {
    fn at(self, path: &Path) -> ConfigError {
        match self {
            TextError::Syntax(message) => ConfigError::Syntax { path: path.into(), message },
            TextError::Invalid(problems) => ConfigError::Invalid { path: path.into(), problems },
        }
    }
}

/// Fills in each problem's line by finding its field in the document.
fn locate_lines(text: &str, problems: &mut [ConfigProblem]) {
    let Ok(doc) = toml_edit::Document::parse(text) else { return };
    for problem in problems {
        problem.line = span_of(&doc, &problem.field).map(|offset| 1 + text[..offset].matches('\n').count());
    }
}

/// Byte offset of a dotted field path like `route[2].upstream` or
/// `upstream.api.targets[0]`, or of the deepest enclosing part found.
fn span_of(doc: &toml_edit::Document<&str>, field: &str) -> Option<usize> {
    use toml_edit::{Item, Value};

    /// Where the walk stands: a table-ish item, or a value inside an array.
    enum Node<'a> {
        Item(&'a Item),
        Table(&'a toml_edit::Table),
        Value(&'a Value),
    }

    let mut node = Node::Item(doc.as_item());
    let mut best = None;
    for step in field.split('.').flat_map(|part| part.split('[')) {
        node = match step.strip_suffix(']').and_then(|i| i.parse::<usize>().ok()) {
            Some(index) => match node {
                Node::Item(Item::ArrayOfTables(tables)) => Node::Table(tables.get(index)?),
                Node::Item(Item::Value(Value::Array(values))) | Node::Value(Value::Array(values)) => {
                    Node::Value(values.get(index)?)
                }
                _ => return best,
            },
            None => {
                let table = match node {
                    Node::Item(item) => item.as_table_like(),
                    Node::Table(table) => Some(table as &dyn toml_edit::TableLike),
                    Node::Value(value) => value.as_inline_table().map(|t| t as &dyn toml_edit::TableLike),
                };
                let Some((key, child)) = table.and_then(|t| t.get_key_value(step)) else { return best };
                best = key.span().map(|s| s.start).or(best);
                Node::Item(child)
            }
        };
        let span = match &node {
            Node::Table(table) => table.span(),
            Node::Value(value) => value.span(),
            Node::Item(_) => None,
        };
        best = span.map(|s| s.start).or(best);
    }
    best
}

// === Validation ===

/// Collects problems instead of stopping at the first, so one `keygate check`
/// shows everything that needs fixing.
#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem { field: field.into(), line: None, message: message.into() });
    }

    fn duration(&mut self, field: &str, value: Option<&str>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(text) => humantime::parse_duration(text).unwrap_or_else(|e| {
                self.push(
                    field,
                    format!("`{text}` is not a duration ({e}); write e.g. \"500ms\", \"30s\", \"5m\""),
                );
                default
            }),
        }
    }

    fn header(&mut self, field: &str, value: Option<&str>, default: &'static str) -> HeaderName {
        match value {
            None => HeaderName::from_static(default),
            Some(text) => HeaderName::from_bytes(text.as_bytes()).unwrap_or_else(|_| {
                self.push(field, format!("`{text}` is not a valid header name"));
                HeaderName::from_static(default)
            }),
        }
    }
}

pub const ECHO_TARGET: &str = "builtin:echo";

/// A route's `max_body` when the file gives none: 10 MiB holds any JSON or
/// form API request with room to spare, while one client's uploads stay
/// bounded; routes taking files say so with a bigger value or `"unlimited"`.
pub const DEFAULT_MAX_BODY: u64 = 10 * 1024 * 1024;

/// A route's `upload_idle_timeout` when the file gives none: a client that
/// sends nothing for 30 s mid-body has stalled, not slowed down.
pub const DEFAULT_UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// `max_body`: a size (`"10MiB"`, `"512KB"`, `"1000"`), or `0`/`"unlimited"`
/// for no limit.
fn max_body(p: &mut Problems, field: &str, value: Option<&str>) -> Option<u64> {
    let Some(text) = value else { return Some(DEFAULT_MAX_BODY) };
    if text.trim().eq_ignore_ascii_case("unlimited") {
        return None;
    }
    match parse_size(text) {
        Some(0) => None,
        Some(bytes) => Some(bytes),
        None => {
            p.push(
                field,
                format!("`{text}` is not a size; write e.g. \"10MiB\", \"512KB\", \"1000\" or \"unlimited\""),
            );
            Some(DEFAULT_MAX_BODY)
        }
    }
}

/// A byte size: digits, optional spaces, an optional unit among `B`, `KB`,
/// `MB`, `GB` (powers of 1000) and `KiB`, `MiB`, `GiB` (powers of 1024), any
/// case. A dozen lines do not call for a crate; overflow is refused.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().ok()?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

impl RawConfig {
    pub fn validate(self, base: &Path) -> Result<Config, Vec<ConfigProblem>> {
        self.validate_for(base, Purpose::Serve)
    }

    pub fn validate_for(self, base: &Path, purpose: Purpose) -> Result<Config, Vec<ConfigProblem>> {
        let mut p = Problems::default();

        let mut covered = Vec::new();
        let listeners = validate_listeners(&mut p, &self.server, base, &mut covered);
        let listen = listeners[0].listen;
        let server = ServerConfig {
            listen,
            listeners,
            drain_timeout: p.duration(
                "server.drain_timeout",
                self.server.drain_timeout.as_deref(),
                Duration::from_secs(30),
            ),
            workers: match self.server.workers.unwrap_or(0) {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n if n > 256 => {
                    p.push("server.workers", format!("{n} is more than 256; 0 means one per core"));
                    1
                }
                n => n,
            },
            reuse_port: self.server.reuse_port.unwrap_or(false),
            edge: validate_edge(&mut p, &self.server),
        };

        let store = validate_store(&mut p, self.store, base);
        let keys = validate_keys(&mut p, self.keys);
        check_request_id_header(&mut p, &server.edge.request_id_header, &keys);

        let mut upstreams = BTreeMap::new();
        for (name, raw) in self.upstreams {
            let at = format!("upstream.{name}");
            if name.starts_with("builtin:") || name.is_empty() {
                p.push(&at, "upstream names may not be empty or start with `builtin:`");
            }
            upstreams.insert(name, validate_upstream(&mut p, &at, raw, base));
        }

        let mut routes: Vec<RouteConfig> = Vec::new();
        if self.routes.is_empty() {
            p.push("route", "at least one [[route]] is needed");
        }
        let has_tls = server.listeners.iter().any(|l| l.tls.is_some());
        for (i, raw) in self.routes.into_iter().enumerate() {
            let at = format!("route[{i}]");
            let route = validate_route(&mut p, &at, raw, &upstreams, has_tls);
            if routes.iter().any(|r| r.path == route.path && r.host == route.host) {
                p.push(
                    format!("{at}.path"),
                    format!("another route already has path `{}` for this host", route.path),
                );
            }
            routes.push(route);
        }
        check_certificates_cover_hosts(&mut p, &covered, &routes);

        let limits = validate_limits(&mut p, self.limits, &store);
        let usage = UsageConfig {
            enabled: self.usage.enabled.unwrap_or(true),
            flush_interval: p.duration(
                "usage.flush_interval",
                self.usage.flush_interval.as_deref(),
                Duration::from_secs(1),
            ),
            rollup_interval: p.duration(
                "usage.rollup_interval",
                self.usage.rollup_interval.as_deref(),
                Duration::from_secs(300),
            ),
            max_buffered_series: self.usage.max_buffered_series.unwrap_or(1_000_000),
        };
        for (field, interval) in
            [("usage.flush_interval", usage.flush_interval), ("usage.rollup_interval", usage.rollup_interval)]
        {
            if interval.is_zero() {
                p.push(field, "must be above zero");
            }
        }

        let format = self.log.format.unwrap_or(LogFormat::Text);
        let log = LogConfig {
            filter: self.log.filter.unwrap_or_else(|| "info".to_owned()),
            format,
            access: validate_access_log(&mut p, self.log.access.as_deref(), base),
            access_format: self.log.access_format.unwrap_or(format),
        };
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log.filter) {
            p.push("log.filter", format!("`{}` is not a valid filter: {e}", log.filter));
        }

        let env = |name: &str| std::env::var(name).ok();
        let env: Option<&EnvLookup<'_>> = match purpose {
            Purpose::Serve => Some(&env),
            Purpose::Inspect => None,
        };
        let admin = validate_admin(&mut p, self.admin, env);

        let client_certs = ClientCertsConfig {
            id_from: match self.client_certs.id_from.as_deref().map(str::parse) {
                None => Default::default(),
                Some(Ok(id_from)) => id_from,
                Some(Err(why)) => {
                    p.push("client_certs.id_from", why);
                    Default::default()
                }
            },
        };

        let tokens = validate_tokens(&mut p, self.tokens, base);
        // An issuer written but refused has its own problem already.
        let any_issuer = !self.jwt.issuers.is_empty();
        let jwt_issuers = validate_issuers(&mut p, self.jwt.issuers, &tokens, base);
        if !tokens.enabled
            && !any_issuer
            && let Some(i) = routes.iter().position(|r| r.auth.accepts(CredentialKind::Jwt))
        {
            p.push(
                format!("route[{i}].auth"),
                "\"jwt\" needs [tokens] enabled = true (keygate's own tokens) or a [[jwt.issuer]]",
            );
        }
        check_route_issuers(&mut p, &routes, &tokens, &jwt_issuers);

        if p.0.is_empty() {
            Ok(Config {
                server,
                store,
                keys,
                routes,
                upstreams,
                limits,
                usage,
                log,
                admin,
                client_certs,
                tokens,
                jwt_issuers,
            })
        } else {
            Err(p.0)
        }
    }
}

/// `[tokens]`: durations above zero, an absolute path, and a signing key
/// file that holds an Ed25519 PKCS#8 key (checked here, so a bad file
/// stops the gateway before it binds; the message never quotes the key).
fn validate_tokens(p: &mut Problems, raw: RawTokens, base: &Path) -> TokensConfig {
    let d = TokensConfig::default();
    let path = raw.path.unwrap_or(d.path);
    let tokens = TokensConfig {
        enabled: raw.enabled.unwrap_or(d.enabled),
        refresh_cookie: raw.refresh_cookie.unwrap_or(d.refresh_cookie),
        refresh_cookie_path: raw.refresh_cookie_path.unwrap_or_else(|| path.clone()),
        path,
        access_ttl: p.duration("tokens.access_ttl", raw.access_ttl.as_deref(), d.access_ttl),
        refresh_ttl: p.duration("tokens.refresh_ttl", raw.refresh_ttl.as_deref(), d.refresh_ttl),
        signing_key: raw.signing_key.map(|file| base.join(file)),
        issuer: raw.issuer.unwrap_or(d.issuer),
        audience: raw.audience,
        leeway: p.duration("tokens.leeway", raw.leeway.as_deref(), d.leeway),
        cache_capacity: raw.cache_capacity.unwrap_or(d.cache_capacity),
    };
    if !tokens.path.starts_with('/') {
        p.push("tokens.path", format!("`{}` must start with `/`", tokens.path));
    }
    for (field, value) in
        [("tokens.access_ttl", tokens.access_ttl), ("tokens.refresh_ttl", tokens.refresh_ttl)]
    {
        if value.is_zero() {
            p.push(field, "must be above zero");
        }
    }
    if tokens.issuer.is_empty() {
        p.push("tokens.issuer", "must not be empty");
    }
    // RFC 6265 §5.1.4: a browser sends the cookie only to paths under its own.
    let cookie_path = tokens.refresh_cookie_path.as_str();
    let covered = tokens.path == cookie_path
        || tokens
            .path
            .strip_prefix(cookie_path)
            .is_some_and(|rest| cookie_path.ends_with('/') || rest.starts_with('/'));
    let cookie_safe = cookie_path.bytes().all(|b| b.is_ascii_graphic() && b != b';');
    if !tokens.path.starts_with('/') {
        // Refused above; the cookie path defaults to it and adds nothing.
    } else if !cookie_path.starts_with('/') || !cookie_safe {
        p.push("tokens.refresh_cookie_path", format!("`{cookie_path}` must be a path starting with `/`"));
    } else if !covered {
        p.push(
            "tokens.refresh_cookie_path",
            format!("`{cookie_path}` does not cover `tokens.path` (`{}`): browsers would not send the cookie there", tokens.path),
        );
    }
    if let Some(file) = &tokens.signing_key
        && let Err(why) = crate::pem::ed25519_key(file)
    {
        p.push("tokens.signing_key", why);
    }
    tokens
}

/// `[[jwt.issuer]]`: each field checked, its JWKS file read now (a URL is
/// not fetched by `keygate check`: the gateway fetches it when it starts).
fn validate_issuers(
    p: &mut Problems,
    raw: Vec<RawIssuer>,
    tokens: &TokensConfig,
    base: &Path,
) -> Vec<IssuerConfig> {
    use jsonwebtoken::Algorithm;
    let mut issuers: Vec<IssuerConfig> = Vec::new();
    for (i, raw) in raw.into_iter().enumerate() {
        let at = format!("jwt.issuer[{i}]");
        let iss = match raw.iss {
            Some(iss) if !iss.is_empty() => iss,
            Some(_) => {
                p.push(format!("{at}.iss"), "must not be empty");
                String::new()
            }
            None => {
                p.push(&at, "needs `iss`: the issuer's `iss` claim, matched exactly");
                String::new()
            }
        };
        if !iss.is_empty() && issuers.iter().any(|other| other.iss == iss) {
            p.push(format!("{at}.iss"), format!("`{iss}` is already another [[jwt.issuer]]'s"));
        }
        if tokens.enabled && iss == tokens.issuer {
            p.push(
                format!("{at}.iss"),
                format!("`{iss}` is keygate's own `[tokens] issuer`: a token could not be told whose it is"),
            );
        }
        let jwks = match raw.jwks.as_deref().map(|text| crate::jwks::JwksSource::parse(text, base)) {
            Some(Ok(source)) => Some(source),
            Some(Err(why)) => {
                p.push(format!("{at}.jwks"), why);
                None
            }
            None => {
                p.push(&at, "needs `jwks`: the URL (https:// or http://) or file of the issuer's keys");
                None
            }
        };
        let ca = raw.ca.map(|file| base.join(file));
        let mut algorithms = Vec::new();
        for name in raw
            .algorithms
            .unwrap_or_else(|| DEFAULT_ISSUER_ALGORITHMS.iter().map(|alg| format!("{alg:?}")).collect())
        {
            match name.parse::<Algorithm>() {
                Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => p.push(
                    format!("{at}.algorithms"),
                    format!(
                        "`{name}` is HMAC, a shared secret: a JWKS publishes public keys, and HMAC keyed \
                         with a published key would let anyone sign tokens; use RS256, ES256 or EdDSA"
                    ),
                ),
                Ok(alg) if !algorithms.contains(&alg) => algorithms.push(alg),
                Ok(_) => {}
                Err(_) => p.push(
                    format!("{at}.algorithms"),
                    format!(
                        "`{name}` is not a signature algorithm keygate verifies; known: RS256, RS384, \
                         RS512, PS256, PS384, PS512, ES256, ES384, EdDSA (`none` is never accepted)"
                    ),
                ),
            }
        }
        if algorithms.is_empty() {
            p.push(format!("{at}.algorithms"), "name at least one algorithm, e.g. [\"RS256\"]");
        }
        let audience = raw.audience.map(|a| a.0);
        let audience = match (audience, raw.audience_optional.unwrap_or(false)) {
            (Some(list), false) if list.is_empty() || list.iter().any(String::is_empty) => {
                p.push(format!("{at}.audience"), "name the `aud` value(s) this gateway's tokens carry");
                Vec::new()
            }
            (Some(list), false) => list,
            (Some(_), true) => {
                p.push(
                    format!("{at}.audience_optional"),
                    "`audience` is set: tokens must name it; drop one of the two",
                );
                Vec::new()
            }
            (None, true) => Vec::new(),
            (None, false) => {
                p.push(
                    &at,
                    "needs `audience`: the `aud` this API's tokens carry (a string or a list); \
                     `audience_optional = true` accepts tokens whatever their audience",
                );
                Vec::new()
            }
        };
        let claim = |p: &mut Problems, field: &str, value: Option<String>, default: &str| {
            let value = value.unwrap_or_else(|| default.to_owned());
            if value.is_empty() {
                p.push(format!("{at}.{field}"), "must name a claim");
            }
            value
        };
        let client_claim = claim(p, "client_claim", raw.client_claim, "sub");
        let scope_claim = claim(p, "scope_claim", raw.scope_claim, "scope");
        let leeway = p.duration(&format!("{at}.leeway"), raw.leeway.as_deref(), tokens.leeway);
        let refresh =
            p.duration(&format!("{at}.refresh"), raw.refresh.as_deref(), Duration::from_secs(10 * 60));
        let refetch_interval = p.duration(
            &format!("{at}.refetch_interval"),
            raw.refetch_interval.as_deref(),
            Duration::from_secs(30),
        );
        if refresh < Duration::from_secs(1) {
            p.push(format!("{at}.refresh"), "must be at least 1s");
        }
        if refetch_interval < Duration::from_secs(1) {
            p.push(
                format!("{at}.refetch_interval"),
                "must be at least 1s: it bounds the fetches tokens with made-up kids can cause",
            );
        }
        match &jwks {
            Some(source @ crate::jwks::JwksSource::File(path)) if !algorithms.is_empty() => {
                let read = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
                let parsed = read.and_then(|bytes| crate::jwks::parse(&bytes, &algorithms));
                match parsed {
                    Ok(parsed) if parsed.keys.is_empty() => p.push(
                        format!("{at}.jwks"),
                        format!(
                            "{} has no usable key ({} skipped: each needs a kid, and a kind and alg \
                             among `algorithms`)",
                            source.describe(),
                            parsed.skipped
                        ),
                    ),
                    Ok(_) => {}
                    Err(why) => p.push(format!("{at}.jwks"), format!("{}: {why}", path.display())),
                }
            }
            Some(source) if source.is_https() => {
                let files = crate::upstream_tls::TlsFiles { ca: ca.clone(), ..Default::default() };
                if let Err(e) =
                    crate::upstream_tls::client_config(&files, crate::upstream_tls::Protocol::Http1)
                {
                    let field = if ca.is_some() { "ca" } else { "jwks" };
                    p.push(format!("{at}.{field}"), e.message);
                }
            }
            _ => {}
        }
        if ca.is_some() && !jwks.as_ref().is_some_and(crate::jwks::JwksSource::is_https) {
            p.push(format!("{at}.ca"), "only means something with an https:// `jwks`");
        }
        if let Some(jwks) = jwks {
            issuers.push(IssuerConfig {
                iss,
                jwks,
                ca,
                audience,
                algorithms,
                client_claim,
                scope_claim,
                leeway,
                refresh,
                refetch_interval,
            });
        }
    }
    issuers
}

/// A route's `issuers` must each be `[tokens] issuer` (with tokens on) or
/// a `[[jwt.issuer]]`'s `iss`.
fn check_route_issuers(
    p: &mut Problems,
    routes: &[RouteConfig],
    tokens: &TokensConfig,
    issuers: &[IssuerConfig],
) {
    let mut known: Vec<&str> = issuers.iter().map(|i| i.iss.as_str()).collect();
    if tokens.enabled {
        known.push(&tokens.issuer);
    }
    known.sort_unstable();
    known.dedup();
    for (i, route) in routes.iter().enumerate() {
        for name in route.issuers.iter().flatten() {
            if !known.contains(&name.as_str()) {
                p.push(
                    format!("route[{i}].issuers"),
                    format!(
                        "`{name}` is neither a [[jwt.issuer]]'s `iss` nor (with [tokens] enabled) `[tokens] issuer`; known: {}",
                        if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                    ),
                );
            }
        }
    }
}

/// Reads one environment variable (the process's, or a test's table).
type EnvLookup<'a> = dyn Fn(&str) -> Option<String> + 'a;

/// `[admin]`: off without `listen`; with it, exactly one of `token` and
/// `token_env` (read through `env`, so tests need not touch the process
/// environment; `None`: not read at all, see [`Purpose::Inspect`]).
/// Messages never quote the token.
fn validate_admin(p: &mut Problems, raw: RawAdmin, env: Option<&EnvLookup<'_>>) -> Option<AdminConfig> {
    let Some(listen_text) = raw.listen else {
        for (field, set) in [
            ("token", raw.token.is_some()),
            ("token_env", raw.token_env.is_some()),
            ("token_name", raw.token_name.is_some()),
            ("readyz_requires_healthy_upstreams", raw.readyz_requires_healthy_upstreams.is_some()),
        ] {
            if set {
                p.push(
                    format!("admin.{field}"),
                    "the admin API is off without `admin.listen`; set it or remove this",
                );
            }
        }
        return None;
    };
    let listen = listen_text.parse().unwrap_or_else(|_| {
        p.push("admin.listen", format!("`{listen_text}` is not an address like \"127.0.0.1:9090\""));
        SocketAddr::from(([127, 0, 0, 1], 9090))
    });
    let token_name = raw.token_name.unwrap_or_else(|| "admin".to_owned());
    if token_name.is_empty() || token_name.len() > 64 || token_name.chars().any(char::is_control) {
        p.push("admin.token_name", "must be 1-64 printable characters");
    }
    let token = match (raw.token, raw.token_env) {
        (Some(_), Some(_)) => {
            p.push("admin.token_env", "give either `token` or `token_env`, not both");
            None
        }
        (None, None) => {
            p.push(
                "admin.listen",
                "the admin API needs a bearer token: set `token_env` (the name of an environment \
                 variable holding it) or `token`",
            );
            None
        }
        (Some(token), None) => Some(("admin.token", token)),
        (None, Some(name)) => match env.map(|env| env(&name)) {
            Some(Some(token)) => Some(("admin.token_env", token)),
            Some(None) => {
                p.push("admin.token_env", format!("the environment variable `{name}` is not set"));
                None
            }
            // Not reading the environment: the name is all there is to check.
            None => {
                if name.is_empty() {
                    p.push("admin.token_env", "must name an environment variable");
                }
                return None;
            }
        },
    };
    let token = token.and_then(|(field, token)| {
        if token.trim().len() < AdminToken::MIN_LEN {
            p.push(
                field,
                format!(
                    "the admin token must be at least {} characters (e.g. `openssl rand -hex 32`)",
                    AdminToken::MIN_LEN
                ),
            );
            return None;
        }
        Some(AdminToken::new(token.trim()))
    })?;
    let readyz_requires_healthy_upstreams = raw.readyz_requires_healthy_upstreams.unwrap_or(false);
    Some(AdminConfig { listen, token, token_name, readyz_requires_healthy_upstreams })
}

/// `server.listen` or the `[[server.listener]]` entries (never both), each
/// TLS listener's files loaded to prove they serve. Never empty: on a
/// problem, a placeholder listener stands in (the config is refused anyway).
/// The listeners, and (in `covered`) the names each TLS listener's
/// certificates cover, for [`check_certificates_cover_hosts`].
fn validate_listeners(
    p: &mut Problems,
    raw: &RawServer,
    base: &Path,
    covered: &mut Vec<(String, Vec<String>)>,
) -> Vec<ListenerConfig> {
    let address = |p: &mut Problems, field: &str, text: &str| {
        text.parse::<SocketAddr>().map_err(|_| {
            p.push(field, format!("`{text}` is not an address like \"127.0.0.1:8080\""));
        })
    };
    let fallback = || vec![ListenerConfig { listen: SocketAddr::from(([127, 0, 0, 1], 8080)), tls: None }];
    if raw.listeners.is_empty() {
        let text = raw.listen.as_deref().unwrap_or("127.0.0.1:8080");
        return match address(p, "server.listen", text) {
            Ok(listen) => vec![ListenerConfig { listen, tls: None }],
            Err(()) => fallback(),
        };
    }
    if raw.listen.is_some() {
        p.push(
            "server.listen",
            "give either `server.listen` (one plain listener) or `[[server.listener]]` entries, not both; \
             move this address into a `[[server.listener]]`",
        );
    }
    let provider = crate::redis_target::provider();
    let mut listeners: Vec<ListenerConfig> = Vec::new();
    for (i, raw) in raw.listeners.iter().enumerate() {
        let at = format!("server.listener[{i}]");
        let Ok(listen) = address(p, &format!("{at}.listen"), &raw.listen) else { continue };
        // Port 0 picks a free port for each (tests): never the same one.
        if listen.port() != 0 && listeners.iter().any(|l| l.listen == listen) {
            p.push(
                format!("{at}.listen"),
                format!("another [[server.listener]] already listens on {listen}"),
            );
        }
        let tls = match &raw.tls {
            None => {
                for (field, set) in [
                    ("handshake_timeout", raw.handshake_timeout.is_some()),
                    ("client_ca", raw.client_ca.is_some()),
                    ("client_auth", raw.client_auth.is_some()),
                ] {
                    if set {
                        p.push(format!("{at}.{field}"), "only applies to a listener with `tls`");
                    }
                }
                None
            }
            Some(tls) => validate_listener_tls(p, &at, raw, tls, base, &provider, covered),
        };
        listeners.push(ListenerConfig { listen, tls });
    }
    if listeners.is_empty() { fallback() } else { listeners }
}

/// A TLS listener whose certificates name none of the routes' hosts could
/// only ever hand clients a certificate for some other name: refused. (With
/// no route naming a host, any certificate may be the right one.) `covered`
/// holds, per TLS listener whose files all loaded, its field and the names
/// its certificates cover, as [`validate_listener_tls`] read them.
fn check_certificates_cover_hosts(
    p: &mut Problems,
    covered: &[(String, Vec<String>)],
    routes: &[RouteConfig],
) {
    let hosts: std::collections::BTreeSet<&str> = routes.iter().filter_map(|r| r.host.as_deref()).collect();
    if hosts.is_empty() {
        return;
    }
    for (field, names) in covered {
        if !hosts.iter().any(|host| crate::tls::certs::names_cover(names, host)) {
            let hosts: Vec<&str> = hosts.iter().copied().collect();
            p.push(
                field,
                format!(
                    "its certificates name {} but no route host ({}): clients would get a certificate for another name",
                    names.join(", "),
                    hosts.join(", ")
                ),
            );
        }
    }
}

/// One listener's `tls`, `handshake_timeout`, `client_ca` and `client_auth`;
/// every file is loaded, so `keygate check` finds a broken one.
fn validate_listener_tls(
    p: &mut Problems,
    at: &str,
    raw: &RawListener,
    tls: &RawTls,
    base: &Path,
    provider: &rustls::crypto::CryptoProvider,
    covered: &mut Vec<(String, Vec<String>)>,
) -> Option<ListenerTls> {
    use crate::tls::certs;
    let mut entries: Vec<(String, CertFiles)> = Vec::new();
    let mut pair =
        |p: &mut Problems, field: String, cert: Option<&String>, key: Option<&String>| match (cert, key) {
            (Some(cert), Some(key)) => {
                entries.push((field, CertFiles { cert: base.join(cert), key: base.join(key) }));
            }
            (Some(_), None) => p.push(format!("{field}.key"), "a `cert` needs its `key`"),
            (None, Some(_)) => p.push(format!("{field}.cert"), "a `key` needs its `cert`"),
            (None, None) => {}
        };
    let field = format!("{at}.tls");
    match &tls.certs {
        Some(list) => {
            if tls.cert.is_some() || tls.key.is_some() {
                p.push(&field, "give either `cert` and `key`, or `certs = [{ cert, key }, ...]`, not both");
            }
            for (i, entry) in list.iter().enumerate() {
                pair(p, format!("{field}.certs[{i}]"), Some(&entry.cert), Some(&entry.key));
            }
        }
        None => pair(p, field.clone(), tls.cert.as_ref(), tls.key.as_ref()),
    }
    if entries.is_empty() {
        p.push(&field, "a TLS listener needs a certificate: `tls = { cert = \"...\", key = \"...\" }`");
        return None;
    }
    let mut names = Some(Vec::new());
    for (field, files) in &entries {
        match certs::load(&files.cert, &files.key, provider) {
            Ok(loaded) => {
                if let Some(names) = &mut names {
                    names.extend(loaded.names);
                }
            }
            Err(error) => {
                p.push(format!("{field}.{}", error.file.field()), error.message);
                names = None;
            }
        }
    }
    if let Some(names) = names {
        covered.push((format!("{at}.tls"), names));
    }
    let handshake_timeout = p.duration(
        &format!("{at}.handshake_timeout"),
        raw.handshake_timeout.as_deref(),
        Duration::from_secs(10),
    );
    if handshake_timeout.is_zero() {
        p.push(
            format!("{at}.handshake_timeout"),
            "must be above zero: every connection state keeps a deadline",
        );
    }
    let mode = match raw.client_auth.as_deref() {
        None | Some("required") => ClientAuthMode::Required,
        Some("optional") => ClientAuthMode::Optional,
        Some(other) => {
            p.push(format!("{at}.client_auth"), format!("`{other}` is not \"required\" or \"optional\""));
            ClientAuthMode::Required
        }
    };
    let client_auth = match &raw.client_ca {
        None => {
            if raw.client_auth.is_some() {
                p.push(
                    format!("{at}.client_auth"),
                    "needs `client_ca`: the CA client certificates must chain to",
                );
            }
            None
        }
        Some(ca) => {
            let ca = base.join(ca);
            if let Err(error) = certs::load_roots(&ca) {
                p.push(format!("{at}.client_ca"), error.message);
            }
            Some(ClientAuth { ca, mode })
        }
    };
    Some(ListenerTls {
        certs: entries.into_iter().map(|(_, files)| files).collect(),
        handshake_timeout,
        client_auth,
    })
}

/// The `[server]` deadlines and limits. Zero is refused where it would mean
/// "no limit" by accident: every state keeps a deadline.
/// `[server] request_id_header` is read from clients, sent upstream and
/// logged: it may not be a header that carries a credential (a key sent in
/// it would be kept as the ID and logged), that the gateway sets itself,
/// or that is hop-by-hop.
fn check_request_id_header(p: &mut Problems, name: &HeaderName, keys: &KeysConfig) {
    use http::header;
    let taken = [
        &keys.header,
        &keys.client_header,
        &keys.key_id_header,
        &keys.scopes_header,
        &header::AUTHORIZATION,
        &header::PROXY_AUTHORIZATION,
        &header::COOKIE,
        &header::SET_COOKIE,
        &header::HOST,
        &header::CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::CONTENT_LENGTH,
        &header::CONTENT_TYPE,
    ];
    let forwarded = name.as_str().starts_with("x-forwarded-") || name.as_str() == "forwarded";
    if forwarded || taken.contains(&name) {
        p.push("server.request_id_header", format!("`{name}` carries credentials or is the gateway's own"));
    }
}

/// `[log] access`: `"stdout"` (the default), `"off"`, or a file, relative
/// to the config's folder, whose folder must exist.
fn validate_access_log(
    p: &mut Problems,
    access: Option<&str>,
    base: &Path,
) -> Option<std::sync::Arc<crate::access_log::Sink>> {
    use crate::access_log::{Destination, Sink};
    let destination = match access.unwrap_or("stdout") {
        "off" => return None,
        "stdout" => Destination::Stdout,
        "" => {
            p.push("log.access", "must be \"stdout\", \"off\" or a file path");
            return None;
        }
        path => {
            let path = base.join(path);
            let folder = path.parent().filter(|f| !f.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !folder.is_dir() {
                p.push("log.access", format!("folder {} does not exist", folder.display()));
                return None;
            }
            if path.is_dir() {
                p.push("log.access", format!("{} is a folder, not a file", path.display()));
                return None;
            }
            Destination::File(path)
        }
    };
    Some(std::sync::Arc::new(Sink::new(destination)))
}

fn validate_edge(p: &mut Problems, raw: &RawServer) -> EdgeConfig {
    let mut deadline = |field: &str, value: &Option<String>, default: u64| {
        let at = format!("server.{field}");
        let d = p.duration(&at, value.as_deref(), Duration::from_secs(default));
        if d.is_zero() {
            p.push(at, "must be above zero: every connection state keeps a deadline");
            return Duration::from_secs(default);
        }
        d
    };
    let header_read_timeout = deadline("header_read_timeout", &raw.header_read_timeout, 10);
    let idle_timeout = deadline("idle_timeout", &raw.idle_timeout, 60);
    let send_timeout = deadline("send_timeout", &raw.send_timeout, 30);
    let http2_keepalive_interval = deadline("http2_keepalive_interval", &raw.http2_keepalive_interval, 20);
    let http2_keepalive_timeout = deadline("http2_keepalive_timeout", &raw.http2_keepalive_timeout, 10);
    let mut at_least = |field: &str, value: Option<usize>, default: usize, min: usize| {
        let n = value.unwrap_or(default);
        if n < min {
            p.push(format!("server.{field}"), format!("{n} is below the minimum of {min}"));
            return default;
        }
        n
    };
    let max_connections = at_least("max_connections", raw.max_connections, 10_000, 1);
    let max_connections_per_ip = at_least("max_connections_per_ip", raw.max_connections_per_ip, 256, 1);
    // hyper's HTTP/1 read buffer cannot be smaller than 8 KiB.
    let max_header_bytes = at_least("max_header_bytes", raw.max_header_bytes, 64 * 1024, 8 * 1024);
    let max_headers = at_least("max_headers", raw.max_headers, 100, 1);
    let http2_max_concurrent_streams = at_least(
        "http2_max_concurrent_streams",
        raw.http2_max_concurrent_streams.map(|n| n as usize),
        100,
        1,
    ) as u32;
    if max_connections_per_ip > max_connections {
        p.push(
            "server.max_connections_per_ip",
            format!("{max_connections_per_ip} is above server.max_connections ({max_connections})"),
        );
    }
    let mut trusted_proxies = Vec::new();
    for (i, text) in raw.trusted_proxies.iter().flatten().enumerate() {
        // A bare address is a one-address network.
        let parsed = text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match parsed {
            Ok(net) => trusted_proxies.push(net.trunc()),
            Err(_) => p.push(
                format!("server.trusted_proxies[{i}]"),
                format!("`{text}` is not an address or network like \"10.0.0.0/8\""),
            ),
        }
    }
    EdgeConfig {
        header_read_timeout,
        idle_timeout,
        send_timeout,
        http2_keepalive_interval,
        http2_keepalive_timeout,
        http2_max_concurrent_streams,
        max_connections,
        max_connections_per_ip,
        max_header_bytes,
        max_headers,
        trusted_proxies,
        strict_paths: raw.strict_paths.unwrap_or(true),
        strip_override_headers: raw.strip_override_headers.unwrap_or(true),
        request_id_header: p.header(
            "server.request_id_header",
            raw.request_id_header.as_deref(),
            crate::request_id::DEFAULT_HEADER,
        ),
    }
}

fn validate_store(p: &mut Problems, raw: RawStore, base: &Path) -> StoreConfig {
    let kind = raw.kind.as_deref().unwrap_or("file");
    // Each field belongs to some kinds; named, so a misplaced one is a clear error.
    let belongs: [(&str, bool, &[&str]); 4] = [
        ("url", raw.url.is_some(), &["redis"]),
        ("nodes", raw.nodes.is_some(), &["redis-cluster"]),
        ("sentinels", raw.sentinels.is_some(), &["redis-sentinel"]),
        ("master", raw.master.is_some(), &["redis-sentinel"]),
    ];
    if ["file", "redis", "redis-cluster", "redis-sentinel"].contains(&kind) {
        for (field, set, kinds) in belongs {
            if set && !kinds.contains(&kind) {
                let uses = match kind {
                    "file" => "the file store uses `dir`",
                    "redis" => "a single Redis uses `url`",
                    "redis-cluster" => "a cluster uses `nodes`",
                    _ => "Sentinel uses `sentinels` and `master`",
                };
                p.push(
                    format!("store.{field}"),
                    format!("`{field}` belongs to kind = \"{}\"; {uses}", kinds[0]),
                );
            }
        }
    }
    match kind {
        "file" => {
            for (field, set) in
                [("tls_ca", &raw.tls_ca), ("tls_cert", &raw.tls_cert), ("tls_key", &raw.tls_key)]
            {
                if set.is_some() {
                    p.push(
                        format!("store.{field}"),
                        format!("`{field}` belongs to kind = \"redis\" (rediss://)"),
                    );
                }
            }
            let dir = PathBuf::from(raw.dir.unwrap_or_else(|| "keys".to_owned()));
            StoreConfig::File { dir: if dir.is_absolute() { dir } else { base.join(dir) } }
        }
        "redis" | "redis-cluster" | "redis-sentinel" => {
            if raw.dir.is_some() {
                p.push("store.dir", "`dir` belongs to kind = \"file\"; the Redis store uses `url`");
            }
            let (endpoint, field) = match kind {
                "redis" => {
                    let url = raw.url.unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
                    if let Err(why) = check_redis_url(&url) {
                        p.push("store.url", why);
                    }
                    (Endpoint::Node(url), "store.url")
                }
                "redis-cluster" => {
                    let nodes = raw.nodes.unwrap_or_default();
                    redis_urls(p, "store.nodes", "seed nodes of the cluster", &nodes);
                    (Endpoint::Cluster(nodes), "store.nodes")
                }
                _ => {
                    let sentinels = raw.sentinels.unwrap_or_default();
                    redis_urls(p, "store.sentinels", "the sentinels to ask for the primary", &sentinels);
                    let master = raw.master.unwrap_or_default();
                    if master.is_empty() || master.contains(char::is_whitespace) {
                        p.push(
                            "store.master",
                            "the name the sentinels monitor the primary as, e.g. \"mymaster\"",
                        );
                    }
                    (Endpoint::Sentinel { sentinels, master }, "store.sentinels")
                }
            };
            let prefix = raw.prefix.unwrap_or_else(|| "kg:".to_owned());
            if prefix.contains(['{', '}', ' ']) {
                p.push("store.prefix", "may not contain braces (reserved for cluster hash tags) or spaces");
            }
            let path = |file: Option<String>| {
                file.map(|file| {
                    let file = PathBuf::from(file);
                    if file.is_absolute() { file } else { base.join(file) }
                })
            };
            let tls = RedisTls { ca: path(raw.tls_ca), cert: path(raw.tls_cert), key: path(raw.tls_key) };
            // The checks every connection makes (URL, `#insecure`, TLS
            // files), made now so that `check` and `serve` refuse them first.
            if p.0.iter().all(|problem| problem.field != field && problem.field != "store.master")
                && let Err(error) = crate::redis_target::check(&endpoint, &tls)
            {
                let name = match error.field {
                    crate::redis_target::Field::Url => field,
                    other => other.config_name(),
                };
                p.push(name, error.message);
            }
            StoreConfig::Redis { endpoint, prefix, tls }
        }
        other => {
            p.push(
                "store.kind",
                format!(
                    "`{other}` is not a store kind; use \"file\", \"redis\", \"redis-cluster\" or \"redis-sentinel\""
                ),
            );
            StoreConfig::File { dir: base.join("keys") }
        }
    }
}

/// Checks a list of Redis URLs (`nodes`, `sentinels`): at least one, each
/// usable, none twice.
fn redis_urls(p: &mut Problems, field: &str, what: &str, urls: &[String]) {
    if urls.is_empty() {
        p.push(field, format!("needs at least one redis:// URL: {what}"));
    }
    for (i, url) in urls.iter().enumerate() {
        if let Err(why) = check_redis_url(url) {
            p.push(field, why);
        } else if urls[..i].contains(url) {
            p.push(field, format!("`{}` is listed twice", redact_url(url)));
        }
    }
}

fn validate_keys(p: &mut Problems, raw: RawKeys) -> KeysConfig {
    let prefix = raw.prefix.unwrap_or_else(|| "kg_".to_owned());
    if prefix.is_empty()
        || prefix.len() > 16
        || !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        p.push("keys.prefix", format!("`{prefix}` must be 1-16 letters, digits or underscores"));
    }
    let query_param = raw.query_param.unwrap_or_else(|| "api_key".to_owned());
    if query_param.is_empty()
        || !query_param.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        p.push("keys.query_param", format!("`{query_param}` must be letters, digits, `_` or `-`"));
    }
    let cache_capacity = raw.cache_capacity.unwrap_or(100_000);
    if cache_capacity == 0 {
        p.push("keys.cache_capacity", "must be at least 1");
    }
    KeysConfig {
        prefix,
        header: p.header("keys.header", raw.header.as_deref(), "x-api-key"),
        query_param,
        client_header: p.header("keys.client_header", raw.client_header.as_deref(), "x-keygate-client"),
        key_id_header: p.header("keys.key_id_header", raw.key_id_header.as_deref(), "x-keygate-key-id"),
        scopes_header: p.header("keys.scopes_header", raw.scopes_header.as_deref(), "x-keygate-scopes"),
        cache_capacity,
        cache_ttl: p.duration("keys.cache_ttl", raw.cache_ttl.as_deref(), Duration::from_secs(60)),
        negative_ttl: p.duration("keys.negative_ttl", raw.negative_ttl.as_deref(), Duration::from_secs(5)),
        stale_window: p.duration("keys.stale_window", raw.stale_window.as_deref(), Duration::from_secs(300)),
        auth_failures_per_ip: auth_failures_per_ip(p, raw.auth_failures_per_ip.as_deref()),
        auth_failures_burst: std::num::NonZeroU32::new(raw.auth_failures_burst.unwrap_or(100))
            .unwrap_or_else(|| {
                p.push(
                    "keys.auth_failures_burst",
                    "must be at least 1; set auth_failures_per_ip = \"off\" to disable",
                );
                std::num::NonZeroU32::MIN
            }),
        store_lookups_per_second: std::num::NonZeroU32::new(raw.store_lookups_per_second.unwrap_or(2000)),
    }
}

/// `[keys] auth_failures_per_ip`: a rate like `"20/s"` (the default), or
/// `"off"` / `"0"` for no limit.
fn auth_failures_per_ip(p: &mut Problems, value: Option<&str>) -> Option<crate::meta::Rate> {
    let default = crate::meta::Rate {
        count: std::num::NonZeroU32::MIN.saturating_add(19),
        period: Duration::from_secs(1),
    };
    match value.map(str::trim) {
        None => Some(default),
        Some("off" | "0") => None,
        Some(text) => match text.parse() {
            Ok(rate) => Some(rate),
            Err(e) => {
                p.push("keys.auth_failures_per_ip", format!("{e}; write e.g. \"20/s\" or \"off\""));
                Some(default)
            }
        },
    }
}

fn validate_limits(p: &mut Problems, raw: RawLimits, store: &StoreConfig) -> LimitsConfig {
    let mode = raw.mode.unwrap_or(LimitMode::Local);
    if mode == LimitMode::Redis && matches!(store, StoreConfig::File { .. }) {
        p.push("limits.mode", "mode = \"redis\" needs [store] kind = \"redis\"");
    }
    let lease_fraction = raw.lease_fraction.unwrap_or(0.05);
    if !(lease_fraction > 0.0 && lease_fraction <= 1.0) {
        p.push("limits.lease_fraction", format!("{lease_fraction} must be above 0 and at most 1"));
    }
    let quota_lease = raw.quota_lease.unwrap_or(100);
    if quota_lease == 0 {
        p.push("limits.quota_lease", "must be at least 1");
    }
    let outage_allowance = raw.outage_allowance.unwrap_or(0.01);
    if !(0.0..=1.0).contains(&outage_allowance) {
        p.push("limits.outage_allowance", format!("{outage_allowance} must be a fraction from 0 to 1"));
    }
    let instances = std::num::NonZeroU32::new(raw.instances.unwrap_or(1)).unwrap_or_else(|| {
        p.push("limits.instances", "must be at least 1");
        std::num::NonZeroU32::MIN
    });
    LimitsConfig {
        mode,
        headers: raw.headers.unwrap_or(true),
        legacy_headers: raw.legacy_headers.unwrap_or(false),
        fail_open: raw.fail_open.unwrap_or(true),
        lease_fraction,
        lease_ttl: p.duration("limits.lease_ttl", raw.lease_ttl.as_deref(), Duration::from_secs(1)),
        quota_lease,
        outage_allowance,
        instances,
        idle_eviction: p.duration(
            "limits.idle_eviction",
            raw.idle_eviction.as_deref(),
            Duration::from_secs(600),
        ),
        max_tracked_keys: raw.max_tracked_keys.unwrap_or(1_000_000).max(1),
    }
}

fn validate_upstream(p: &mut Problems, at: &str, raw: RawUpstream, base: &Path) -> UpstreamConfig {
    if raw.targets.is_empty() {
        p.push(format!("{at}.targets"), "at least one target is needed");
    }
    let protocol = match raw.protocol.as_deref().map(|text| (text, Protocol::parse(text))) {
        None => Protocol::Auto,
        Some((_, Some(protocol))) => protocol,
        Some((text, None)) => {
            p.push(
                format!("{at}.protocol"),
                format!("`{text}` is not a protocol; use \"auto\", \"http1\" or \"http2\""),
            );
            Protocol::Auto
        }
    };
    let mut targets = Vec::new();
    for (i, text) in raw.targets.iter().enumerate() {
        match text.parse::<Uri>() {
            Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some() => {
                if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
                    p.push(format!("{at}.targets[{i}]"), format!("`{text}`: give only scheme://host:port; use a route's `strip_prefix` to change paths"));
                }
                // The name each https target's certificate must carry.
                if uri.scheme_str() == Some("https")
                    && raw.server_name.is_none()
                    && let Err(why) = crate::upstream_tls::server_name_for(uri.host().unwrap_or(""))
                {
                    p.push(format!("{at}.targets[{i}]"), format!("`{text}`: {why}; or set `server_name`"));
                }
                targets.push(uri);
            }
            _ => p.push(
                format!("{at}.targets[{i}]"),
                format!("`{text}` is not a URL like \"http://127.0.0.1:9001\" or \"https://api.internal\""),
            ),
        }
    }
    let tls = validate_upstream_tls(p, at, &raw, &targets, protocol, base);
    UpstreamConfig {
        targets,
        connect_timeout: p.duration(
            &format!("{at}.connect_timeout"),
            raw.connect_timeout.as_deref(),
            Duration::from_secs(2),
        ),
        timeout: p.duration(&format!("{at}.timeout"), raw.timeout.as_deref(), Duration::from_secs(30)),
        pool_idle_timeout: p.duration(
            &format!("{at}.pool_idle_timeout"),
            raw.pool_idle_timeout.as_deref(),
            Duration::from_secs(90),
        ),
        pool_max_idle_per_host: raw.pool_max_idle_per_host.unwrap_or(256),
        body_idle_timeout: p.duration(
            &format!("{at}.body_idle_timeout"),
            raw.body_idle_timeout.as_deref(),
            Duration::from_secs(60),
        ),
        max_connections: std::num::NonZeroUsize::new(raw.max_connections.unwrap_or(512)).unwrap_or_else(
            || {
                p.push(format!("{at}.max_connections"), "must be at least 1");
                std::num::NonZeroUsize::MIN
            },
        ),
        websocket_idle_timeout: p.duration(
            &format!("{at}.websocket_idle_timeout"),
            raw.websocket_idle_timeout.as_deref(),
            Duration::from_secs(60),
        ),
        protocol,
        tls,
        balance: match raw.balance.as_deref().map(|text| (text, crate::proxy::balance::Policy::parse(text))) {
            None => crate::proxy::balance::Policy::default(),
            Some((_, Some(policy))) => policy,
            Some((text, None)) => {
                p.push(
                    format!("{at}.balance"),
                    format!("`{text}` is not a policy; use \"round_robin\", \"least_outstanding\" or \"client_hash\""),
                );
                crate::proxy::balance::Policy::default()
            }
        },
        weights: validate_weights(p, at, raw.weights.as_deref(), raw.targets.len()),
        passive: validate_passive(p, at, raw.passive),
        health: raw.health.map(|raw| validate_active_health(p, at, raw)),
        retry: validate_retry(
            p,
            at,
            &raw.retry_budget,
            raw.retries,
            raw.retry_statuses,
            raw.retry_buffer.as_deref(),
            raw.try_timeout.as_deref(),
        ),
        max_requests: at_least_one(p, &format!("{at}.max_requests"), raw.max_requests, 4096),
        max_pending: at_least_one(p, &format!("{at}.max_pending"), raw.max_pending, 1024),
    }
}

fn at_least_one(p: &mut Problems, field: &str, value: Option<usize>, default: usize) -> usize {
    match value {
        Some(0) => {
            p.push(field, "must be at least 1");
            default
        }
        Some(n) => n,
        None => default,
    }
}

/// `weights`: one per target, 0 to 1000, not all 0.
fn validate_weights(p: &mut Problems, at: &str, weights: Option<&[u32]>, targets: usize) -> Vec<u32> {
    let Some(weights) = weights else { return vec![1; targets] };
    let field = format!("{at}.weights");
    if weights.len() != targets {
        p.push(
            &field,
            format!("{} weights for {targets} targets; give one per target, in order", weights.len()),
        );
        return vec![1; targets];
    }
    if let Some(i) = weights.iter().position(|&w| w > 1000) {
        p.push(format!("{field}[{i}]"), "a weight is 0 (no requests) to 1000");
        return vec![1; targets];
    }
    if weights.iter().all(|&w| w == 0) {
        p.push(&field, "every weight is 0: no target would get a request");
        return vec![1; targets];
    }
    weights.to_vec()
}

fn validate_passive(
    p: &mut Problems,
    at: &str,
    raw: Option<RawPassive>,
) -> crate::proxy::health::PassiveSettings {
    let defaults = crate::proxy::health::PassiveSettings::default();
    let raw = raw.unwrap_or_default();
    let ejection = p.duration(&format!("{at}.passive.ejection"), raw.ejection.as_deref(), defaults.ejection);
    let max_ejection =
        p.duration(&format!("{at}.passive.max_ejection"), raw.max_ejection.as_deref(), defaults.max_ejection);
    if ejection.is_zero() {
        p.push(
            format!("{at}.passive.ejection"),
            "must be longer than 0s (set `failures = 0` to turn passive health off)",
        );
    }
    if max_ejection < ejection {
        p.push(format!("{at}.passive.max_ejection"), format!("is shorter than `ejection` ({ejection:?})"));
    }
    crate::proxy::health::PassiveSettings {
        failures: raw.failures.unwrap_or(defaults.failures),
        count_5xx: raw.count_5xx.unwrap_or(defaults.count_5xx),
        ejection,
        max_ejection,
    }
}

fn validate_active_health(
    p: &mut Problems,
    at: &str,
    raw: RawActiveHealth,
) -> crate::proxy::health::ActiveSettings {
    let at = format!("{at}.health");
    let path = match raw.path.parse::<http::uri::PathAndQuery>() {
        Ok(path) if raw.path.starts_with('/') => path,
        _ => {
            p.push(format!("{at}.path"), format!("`{}` is not a path like \"/healthz\"", raw.path));
            http::uri::PathAndQuery::from_static("/")
        }
    };
    let interval = p.duration(&format!("{at}.interval"), raw.interval.as_deref(), Duration::from_secs(5));
    let timeout = p.duration(&format!("{at}.timeout"), raw.timeout.as_deref(), Duration::from_secs(1));
    if interval.is_zero() {
        p.push(format!("{at}.interval"), "must be longer than 0s");
    }
    if timeout.is_zero() || timeout > interval {
        p.push(
            format!("{at}.timeout"),
            format!("must be longer than 0s and at most `interval` ({interval:?})"),
        );
    }
    let mut count = |field: &str, value: Option<u32>, default: u32| match value {
        Some(0) => {
            p.push(format!("{at}.{field}"), "must be at least 1");
            default
        }
        Some(n) => n,
        None => default,
    };
    let healthy = count("healthy", raw.healthy, 2);
    let unhealthy = count("unhealthy", raw.unhealthy, 3);
    crate::proxy::health::ActiveSettings { path, interval, timeout, healthy, unhealthy }
}

fn validate_retry(
    p: &mut Problems,
    at: &str,
    budget: &Option<f64>,
    retries: Option<u32>,
    statuses: Option<Vec<u16>>,
    buffer: Option<&str>,
    try_timeout: Option<&str>,
) -> crate::proxy::retry::RetrySettings {
    use crate::proxy::upstream::MAX_RETRIES;
    let defaults = crate::proxy::retry::RetrySettings::default();
    let retries = match retries {
        Some(n) if n > MAX_RETRIES => {
            p.push(
                format!("{at}.retries"),
                format!("at most {MAX_RETRIES}; the retry budget bounds them anyway"),
            );
            defaults.retries
        }
        Some(n) => n,
        None => defaults.retries,
    };
    let budget = match *budget {
        Some(b) if !(0.0..=1.0).contains(&b) => {
            p.push(
                format!("{at}.retry_budget"),
                "a fraction of requests, 0 to 1 (0.2: one retry per five requests)",
            );
            defaults.budget
        }
        Some(b) => b,
        None => defaults.budget,
    };
    let statuses = statuses.unwrap_or(defaults.statuses);
    if let Some(i) = statuses.iter().position(|s| !(500..=599).contains(s)) {
        p.push(format!("{at}.retry_statuses[{i}]"), "only 5xx answers are retried");
    }
    let buffer = match buffer.map(|text| (text, parse_size(text))) {
        None => defaults.buffer,
        Some((_, Some(bytes))) if bytes <= 16 * 1024 * 1024 => bytes,
        Some((text, _)) => {
            p.push(
                format!("{at}.retry_buffer"),
                format!("`{text}` is not a size up to 16MiB, e.g. \"64KiB\""),
            );
            defaults.buffer
        }
    };
    let try_timeout =
        try_timeout.map(|text| p.duration(&format!("{at}.try_timeout"), Some(text), Duration::from_secs(30)));
    crate::proxy::retry::RetrySettings { retries, budget, statuses, buffer, try_timeout }
}

/// The TLS half of an `[upstream.NAME]`: its files read and checked into one
/// rustls config now, so `check` refuses what every handshake would.
fn validate_upstream_tls(
    p: &mut Problems,
    at: &str,
    raw: &RawUpstream,
    targets: &[Uri],
    protocol: Protocol,
    base: &Path,
) -> Option<UpstreamTls> {
    let path = |file: &Option<String>| {
        file.as_ref().map(|file| {
            let file = PathBuf::from(file);
            if file.is_absolute() { file } else { base.join(file) }
        })
    };
    let files = TlsFiles {
        ca: path(&raw.ca),
        client_cert: path(&raw.client_cert),
        client_key: path(&raw.client_key),
    };
    let any_https = targets.iter().any(|uri| uri.scheme_str() == Some("https"));
    if !any_https {
        let named = [
            ("ca", &raw.ca),
            ("client_cert", &raw.client_cert),
            ("client_key", &raw.client_key),
            ("server_name", &raw.server_name),
        ];
        for (field, set) in named {
            if set.is_some() {
                p.push(
                    format!("{at}.{field}"),
                    format!("`{field}` applies to https:// targets, and this upstream has none"),
                );
            }
        }
        return None;
    }
    let server_name = match &raw.server_name {
        None => None,
        Some(name) => match crate::upstream_tls::server_name_for(name) {
            Ok(name) => Some(name),
            Err(why) => {
                p.push(format!("{at}.server_name"), why);
                None
            }
        },
    };
    match crate::upstream_tls::client_config(&files, protocol) {
        Ok(config) => Some(UpstreamTls { config, server_name }),
        Err(error) => {
            p.push(format!("{at}.{}", error.field), error.message);
            None
        }
    }
}

fn validate_route(
    p: &mut Problems,
    at: &str,
    raw: RawRoute,
    upstreams: &BTreeMap<String, UpstreamConfig>,
    has_tls: bool,
) -> RouteConfig {
    let path = match crate::path::normalize_path(&raw.path) {
        Ok(path) if raw.path.starts_with('/') => {
            let trimmed = path.trim_end_matches('/');
            if trimmed.is_empty() { "/".to_owned() } else { trimmed.to_owned() }
        }
        _ => {
            p.push(format!("{at}.path"), format!("`{}` must be a plain path starting with `/`", raw.path));
            raw.path.clone()
        }
    };
    let target = if raw.upstream == ECHO_TARGET {
        RouteTarget::Echo
    } else {
        if raw.upstream.starts_with("builtin:") {
            p.push(
                format!("{at}.upstream"),
                format!("`{}` is not a built-in; the only one is `{ECHO_TARGET}`", raw.upstream),
            );
        } else if !upstreams.contains_key(&raw.upstream) {
            let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
            p.push(
                format!("{at}.upstream"),
                format!(
                    "no [upstream.{}] is defined (known: {}; or `{ECHO_TARGET}`)",
                    raw.upstream,
                    if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                ),
            );
        }
        RouteTarget::Upstream(raw.upstream)
    };
    // `admin.local.` is the same name as `admin.local` (requests are matched
    // without the trailing dot too).
    let host = raw.host.map(|h| {
        let h = h.to_ascii_lowercase();
        h.strip_suffix('.').map(str::to_owned).unwrap_or(h)
    });
    if let Some(h) = &host
        && (h.is_empty() || h.contains(['/', ' ', ':']))
    {
        p.push(format!("{at}.host"), format!("`{h}` must be a bare host name without port"));
    }
    let mut method_scopes = BTreeMap::new();
    for (method, scopes) in raw.method_scopes {
        let upper = method.to_ascii_uppercase();
        if http::Method::from_bytes(upper.as_bytes()).is_err() {
            p.push(format!("{at}.method_scopes"), format!("`{method}` is not an HTTP method"));
        }
        check_scopes(p, &format!("{at}.method_scopes"), &scopes);
        method_scopes.insert(upper, scopes);
    }
    check_scopes(p, &format!("{at}.scopes"), &raw.scopes);
    if raw.public && (!raw.scopes.is_empty() || !method_scopes.is_empty()) {
        p.push(format!("{at}.public"), "a public route takes no key, so it cannot require scopes");
    }
    let plain = match (raw.tls_only, raw.tls_redirect) {
        (false, None) => PlainHttp::Served,
        (false, Some(_)) => {
            p.push(format!("{at}.tls_redirect"), "only means something with `tls_only = true`");
            PlainHttp::Served
        }
        (true, Some(false)) => PlainHttp::Refused,
        (true, redirect) => {
            if !has_tls {
                p.push(
                    format!("{at}.tls_only"),
                    "no [[server.listener]] has `tls`, so this route could never be reached",
                );
            }
            if redirect.is_some() { PlainHttp::Redirect } else { PlainHttp::Refused }
        }
    };
    let auth = match raw.auth {
        None => CredentialKinds::default(),
        Some(names) => {
            if raw.public {
                p.push(format!("{at}.auth"), "a public route takes no credential, so it cannot name one");
            }
            if names.is_empty() {
                p.push(format!("{at}.auth"), "name at least one credential: \"key\", \"cert\", \"jwt\"");
            }
            let mut kinds = Vec::new();
            for name in &names {
                match CredentialKind::ALL.into_iter().find(|kind| kind.as_str() == name) {
                    Some(kind) => kinds.push(kind),
                    None => p.push(
                        format!("{at}.auth"),
                        format!("`{name}` is not a credential kind; known: \"key\", \"cert\", \"jwt\""),
                    ),
                }
            }
            CredentialKinds::of(&kinds)
        }
    };
    let cost = std::num::NonZeroU32::new(raw.cost.unwrap_or(1)).unwrap_or_else(|| {
        p.push(format!("{at}.cost"), "must be at least 1");
        std::num::NonZeroU32::MIN
    });
    RouteConfig {
        path,
        host,
        target,
        strip_prefix: raw.strip_prefix,
        public: raw.public,
        scopes: raw.scopes,
        method_scopes,
        allow_query_key: raw.allow_query_key,
        auth,
        cost,
        body: BodyLimits {
            max: max_body(p, &format!("{at}.max_body"), raw.max_body.as_deref()),
            idle_timeout: p.duration(
                &format!("{at}.upload_idle_timeout"),
                raw.upload_idle_timeout.as_deref(),
                DEFAULT_UPLOAD_IDLE_TIMEOUT,
            ),
        },
        plain,
        retry_methods: validate_retry_methods(p, at, raw.retry_methods.as_deref()),
        issuers: match raw.issuers {
            Some(_) if !auth.accepts(CredentialKind::Jwt) => {
                p.push(format!("{at}.issuers"), "names token issuers, but `auth` does not include \"jwt\"");
                None
            }
            Some(list) if list.is_empty() => {
                p.push(
                    format!("{at}.issuers"),
                    "name at least one issuer, or leave it out to trust them all",
                );
                None
            }
            issuers => issuers,
        },
    }
}

/// `retry_methods = ["GET", "POST"]`: standard method names only.
fn validate_retry_methods(
    p: &mut Problems,
    at: &str,
    names: Option<&[String]>,
) -> crate::proxy::retry::RetryMethods {
    use crate::proxy::retry::RetryMethods;
    let Some(names) = names else { return RetryMethods::default() };
    let mut methods = Vec::new();
    for (i, name) in names.iter().enumerate() {
        match RetryMethods::parse_method(name) {
            Some(method) => methods.push(method),
            None => p.push(
                format!("{at}.retry_methods[{i}]"),
                format!("`{name}` is not an HTTP method; use e.g. \"GET\", \"PUT\" or \"POST\""),
            ),
        }
    }
    RetryMethods::of(&methods)
}

fn check_scopes(p: &mut Problems, at: &str, scopes: &[String]) {
    if let Err(e) = crate::meta::parse_scopes(&scopes.join(","))
        .or_else(|e| if scopes.is_empty() { Ok(vec![]) } else { Err(e) })
    {
        p.push(at, e.to_string());
    }
}

/// Whether `url` is a Redis URL keygate can connect with: the scheme, then
/// the redis crate's own parse (a bad port, a bad database number). The
/// message shows the URL with any password replaced.
pub fn check_redis_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://")) {
        return Err(format!("`{}` must start with redis://, rediss:// or unix://", redact_url(url)));
    }
    match redis::IntoConnectionInfo::into_connection_info(url) {
        Ok(_) => Ok(()),
        // The crate's message describes the problem, not the URL; it is
        // still checked, since a password must never be echoed.
        Err(error) => {
            let why = error.to_string();
            let quotes_url = why.contains(url) || why.contains('@') || why.contains("://");
            let why = if quotes_url { "it does not parse".to_owned() } else { why };
            Err(format!("`{}` is not a usable Redis URL: {why}", redact_url(url)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<ConfigProblem> {
        match Config::from_toml(text, Path::new("/etc/keygate")) {
            Err(TextError::Invalid(problems)) => problems,
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    const MINIMAL: &str = "[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n";

    #[test]
    fn built_in_defaults_validate() {
        assert_eq!(Config::defaults().keys.prefix, "kg_");
    }

    #[test]
    fn the_request_id_header_and_access_log_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let route = "[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n";
        let problems = |text: &str| match Config::from_toml(&format!("{text}{route}"), dir.path()) {
            Ok(_) => vec![],
            Err(TextError::Invalid(problems)) => problems.into_iter().map(|p| p.field).collect(),
            Err(other) => panic!("{other:?}"),
        };
        for taken in ["x-api-key", "authorization", "cookie", "x-forwarded-for", "x-keygate-client"] {
            let text = format!("[server]\nrequest_id_header = \"{taken}\"\n");
            assert_eq!(problems(&text), ["server.request_id_header"], "{taken}");
        }
        assert_eq!(problems("[server]\nrequest_id_header = \"x-correlation-id\"\n"), Vec::<String>::new());
        assert_eq!(problems("[log]\naccess = \"nowhere/access.log\"\n"), ["log.access"]);
        assert_eq!(problems("[log]\naccess = \".\"\n"), ["log.access"], "a folder");
        let on = format!("[log]\naccess = \"access.log\"\nformat = \"json\"\n{route}");
        let config = Config::from_toml(&on, dir.path()).unwrap();
        let sink = config.log.access.expect("on");
        assert_eq!(sink.destination(), &crate::access_log::Destination::File(dir.path().join("access.log")));
        assert_eq!(config.log.access_format, LogFormat::Json, "follows `format`");
        assert!(!dir.path().join("access.log").exists(), "nothing opened before the first line");
        let off = Config::from_toml(&format!("[log]\naccess = \"off\"\n{route}"), dir.path()).unwrap();
        assert!(off.log.access.is_none());
        let default = Config::from_toml(route, dir.path()).unwrap();
        assert_eq!(default.log.access.unwrap().destination(), &crate::access_log::Destination::Stdout);
        assert_eq!(default.server.edge.request_id_header, "x-request-id");
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = Config::from_toml(MINIMAL, Path::new("/etc/keygate")).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.store, StoreConfig::File { dir: "/etc/keygate/keys".into() });
        assert_eq!(config.keys.header, "x-api-key");
        assert_eq!(config.routes[0].target, RouteTarget::Echo);
    }

    #[test]
    fn usage_intervals_default_and_are_checked() {
        let config = Config::from_toml(MINIMAL, Path::new(".")).unwrap();
        assert_eq!(
            (config.usage.flush_interval, config.usage.rollup_interval, config.usage.max_buffered_series),
            (Duration::from_secs(1), Duration::from_secs(300), 1_000_000)
        );
        let config =
            Config::from_toml(&format!("{MINIMAL}[usage]\nrollup_interval = \"1m\"\n"), Path::new("."))
                .unwrap();
        assert_eq!(config.usage.rollup_interval, Duration::from_secs(60));
        let found =
            problems(&format!("{MINIMAL}[usage]\nflush_interval = \"0s\"\nrollup_interval = \"soon\"\n"));
        let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["usage.rollup_interval", "usage.flush_interval"], "{found:?}");
    }

    #[test]
    fn tokens_are_off_by_default_and_their_fields_are_checked() {
        let config = Config::from_toml(MINIMAL, Path::new(".")).unwrap();
        assert!(!config.tokens.enabled);
        assert_eq!(config.tokens.path, "/oauth/token");
        assert_eq!(config.tokens.access_ttl, Duration::from_secs(900));

        let found = problems(&format!(
            "{MINIMAL}[tokens]\nenabled = true\npath = \"oauth\"\naccess_ttl = \"0s\"\nsigning_key = \"nope.pem\"\n"
        ));
        let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["tokens.path", "tokens.access_ttl", "tokens.signing_key"], "{found:?}");
        assert!(found[2].message.contains("/etc/keygate/nope.pem"), "{found:?}");

        // The refresh cookie's path must cover the endpoint's, or browsers
        // would never send it there.
        let tokens =
            |extra: &str| format!("{MINIMAL}[tokens]\nenabled = true\npath = \"/oauth/token\"\n{extra}");
        for covering in ["/", "/oauth", "/oauth/", "/oauth/token"] {
            let text = tokens(&format!("refresh_cookie_path = \"{covering}\"\n"));
            let config =
                Config::from_toml(&text, Path::new(".")).unwrap_or_else(|e| panic!("{covering}: {e:?}"));
            assert_eq!(config.tokens.refresh_cookie_path, covering);
        }
        for (bad, says) in
            [("/oauth/tok", "does not cover"), ("/other", "does not cover"), ("oauth", "starting with")]
        {
            let found = problems(&tokens(&format!("refresh_cookie_path = \"{bad}\"\n")));
            assert_eq!(found.len(), 1, "{bad}: {found:?}");
            assert_eq!(found[0].field, "tokens.refresh_cookie_path");
            assert!(found[0].message.contains(says), "{bad}: {found:?}");
        }

        let found = problems(&format!("{MINIMAL}auth = [\"key\", \"jwt\"]\n"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].field, "route[0].auth");
        assert!(found[0].message.contains("[tokens] enabled"), "{found:?}");
    }

    /// A JWKS file with one Ed25519 key, in a temporary folder.
    fn jwks_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let jwks = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]});
        std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
        dir
    }

    fn issuer_problems(dir: &Path, issuer: &str) -> Vec<ConfigProblem> {
        let text = format!("{MINIMAL}auth = [\"jwt\"]\n[[jwt.issuer]]\n{issuer}");
        match Config::from_toml(&text, dir) {
            Err(TextError::Invalid(problems)) => problems,
            Err(TextError::Syntax(message)) => panic!("syntax: {message}"),
            Ok(_) => Vec::new(),
        }
    }

    #[test]
    fn an_issuer_gets_documented_defaults_and_opens_jwt_routes_without_tokens() {
        let dir = jwks_dir();
        let text = format!(
            "{MINIMAL}auth = [\"jwt\"]\n[[jwt.issuer]]\niss = \"https://idp.example\"\njwks = \"jwks.json\"\naudience = \"api\"\n"
        );
        let config = Config::from_toml(&text, dir.path()).expect("valid");
        let issuer = &config.jwt_issuers[0];
        assert_eq!(issuer.iss, "https://idp.example");
        assert_eq!(issuer.jwks, crate::jwks::JwksSource::File(dir.path().join("jwks.json")));
        assert_eq!(issuer.audience, ["api"]);
        assert_eq!(issuer.algorithms, DEFAULT_ISSUER_ALGORITHMS);
        assert_eq!((issuer.client_claim.as_str(), issuer.scope_claim.as_str()), ("sub", "scope"));
        assert_eq!(issuer.leeway, config.tokens.leeway);
        assert_eq!(issuer.refresh, Duration::from_secs(600));
        assert_eq!(issuer.refetch_interval, Duration::from_secs(30));
        assert!(!config.tokens.enabled);
        assert_eq!(config.routes[0].issuers, None, "all issuers by default");

        let list = "iss = \"i\"\njwks = \"https://idp.example/keys\"\naudience = [\"a\", \"b\"]\nalgorithms = [\"PS256\"]\n";
        let config =
            Config::from_toml(&format!("{MINIMAL}[[jwt.issuer]]\n{list}"), dir.path()).expect("valid");
        assert_eq!(config.jwt_issuers[0].audience, ["a", "b"]);
        assert_eq!(config.jwt_issuers[0].algorithms, [jsonwebtoken::Algorithm::PS256]);
    }

    #[test]
    fn hmac_and_unknown_algorithms_are_refused_with_the_reason() {
        let dir = jwks_dir();
        let found = issuer_problems(
            dir.path(),
            "iss = \"i\"\njwks = \"jwks.json\"\naudience = \"api\"\nalgorithms = [\"HS256\", \"none\"]\n",
        );
        let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["jwt.issuer[0].algorithms"; 3], "{found:?}");
        assert!(found[0].message.contains("HMAC"), "{found:?}");
        assert!(found[1].message.contains("`none` is never accepted"), "{found:?}");
        assert!(found[2].message.contains("at least one"), "{found:?}");
        assert_eq!(found[0].line, Some(9), "the line of `algorithms`");
    }

    #[test]
    fn audience_is_required_unless_explicitly_optional_and_never_both() {
        let dir = jwks_dir();
        let base = "iss = \"i\"\njwks = \"jwks.json\"\n";
        let found = issuer_problems(dir.path(), base);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].message.contains("needs `audience`"), "{found:?}");
        assert!(issuer_problems(dir.path(), &format!("{base}audience_optional = true\n")).is_empty());
        let both =
            issuer_problems(dir.path(), &format!("{base}audience = \"a\"\naudience_optional = true\n"));
        assert_eq!(both[0].field, "jwt.issuer[0].audience_optional", "{both:?}");
        let empty = issuer_problems(dir.path(), &format!("{base}audience = []\n"));
        assert_eq!(empty[0].field, "jwt.issuer[0].audience", "{empty:?}");
    }

    #[test]
    fn every_issuer_field_is_checked_naming_it() {
        let dir = jwks_dir();
        std::fs::write(
            dir.path().join("hmac.json"),
            r#"{"keys": [{"kty": "oct", "kid": "s", "k": "c2VjcmV0"}]}"#,
        )
        .unwrap();
        let cases = [
            ("jwks = \"jwks.json\"\naudience = \"a\"\n", "jwt.issuer[0]", "needs `iss`"),
            ("iss = \"\"\njwks = \"jwks.json\"\naudience = \"a\"\n", "jwt.issuer[0].iss", "empty"),
            ("iss = \"i\"\naudience = \"a\"\n", "jwt.issuer[0]", "needs `jwks`"),
            ("iss = \"i\"\njwks = \"ftp://x/k\"\naudience = \"a\"\n", "jwt.issuer[0].jwks", "https://"),
            ("iss = \"i\"\njwks = \"missing.json\"\naudience = \"a\"\n", "jwt.issuer[0].jwks", "cannot read"),
            ("iss = \"i\"\njwks = \"hmac.json\"\naudience = \"a\"\n", "jwt.issuer[0].jwks", "no usable key"),
            (
                "iss = \"i\"\njwks = \"jwks.json\"\naudience = \"a\"\nalgorithms = [\"RS256\"]\n",
                "jwt.issuer[0].jwks",
                "no usable key",
            ),
            (
                "iss = \"i\"\njwks = \"jwks.json\"\naudience = \"a\"\nclient_claim = \"\"\n",
                "jwt.issuer[0].client_claim",
                "claim",
            ),
            (
                "iss = \"i\"\njwks = \"jwks.json\"\naudience = \"a\"\nleeway = \"soon\"\n",
                "jwt.issuer[0].leeway",
                "duration",
            ),
            (
                "iss = \"i\"\njwks = \"jwks.json\"\naudience = \"a\"\nrefresh = \"0s\"\n",
                "jwt.issuer[0].refresh",
                "1s",
            ),
            (
                "iss = \"i\"\njwks = \"jwks.json\"\naudience = \"a\"\nrefetch_interval = \"100ms\"\n",
                "jwt.issuer[0].refetch_interval",
                "made-up kids",
            ),
            (
                "iss = \"i\"\njwks = \"jwks.json\"\naudience = \"a\"\n[[jwt.issuer]]\niss = \"i\"\njwks = \"jwks.json\"\naudience = \"a\"\n",
                "jwt.issuer[1].iss",
                "already",
            ),
        ];
        for (issuer, field, says) in cases {
            let found = issuer_problems(dir.path(), issuer);
            assert_eq!(found.len(), 1, "{issuer}: {found:?}");
            assert_eq!(found[0].field, field, "{issuer}: {found:?}");
            assert!(found[0].message.contains(says), "{issuer}: {found:?}");
        }
        // keygate's own issuer name cannot be an external one's too.
        let text = format!(
            "{MINIMAL}[tokens]\nenabled = true\n[[jwt.issuer]]\niss = \"keygate\"\njwks = \"jwks.json\"\naudience = \"a\"\n"
        );
        let Err(TextError::Invalid(found)) = Config::from_toml(&text, dir.path()) else { panic!("refused") };
        assert_eq!(found[0].field, "jwt.issuer[0].iss", "{found:?}");
    }

    #[test]
    fn a_route_names_only_issuers_that_exist_and_only_with_jwt() {
        let dir = jwks_dir();
        let issuer = "[[jwt.issuer]]\niss = \"https://idp\"\njwks = \"jwks.json\"\naudience = \"a\"\n";
        let route = |extra: &str| format!("{MINIMAL}{extra}\n[tokens]\nenabled = true\n{issuer}");
        let config = Config::from_toml(&route("auth = [\"jwt\"]\nissuers = [\"https://idp\"]"), dir.path())
            .expect("valid");
        assert!(config.routes[0].trusts_issuer("https://idp"));
        assert!(!config.routes[0].trusts_issuer("keygate"));
        Config::from_toml(&route("auth = [\"jwt\"]\nissuers = [\"keygate\"]"), dir.path())
            .expect("own issuer");
        for (extra, says) in [
            ("auth = [\"jwt\"]\nissuers = [\"https://other\"]", "neither"),
            ("auth = [\"key\"]\nissuers = [\"https://idp\"]", "does not include"),
            ("auth = [\"jwt\"]\nissuers = []", "at least one"),
        ] {
            let Err(TextError::Invalid(found)) = Config::from_toml(&route(extra), dir.path()) else {
                panic!("{extra}: refused")
            };
            assert_eq!(found.len(), 1, "{extra}: {found:?}");
            assert_eq!(found[0].field, "route[0].issuers", "{extra}: {found:?}");
            assert!(found[0].message.contains(says), "{extra}: {found:?}");
        }
    }

    #[test]
    fn unknown_field_is_a_syntax_error_naming_it_and_its_line() {
        let err =
            Config::from_toml("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n", Path::new(".")).unwrap_err();
        let TextError::Syntax(message) = err else { panic!("{err:?}") };
        assert!(message.contains("lisen"), "{message}");
        assert!(message.contains("line 3"), "{message}");
    }

    #[test]
    fn route_to_undefined_upstream_names_field_and_line() {
        let text = "[[route]]\npath = \"/a\"\nupstream = \"builtin:echo\"\n\n[[route]]\npath = \"/b\"\nupstream = \"nope\"\n";
        let found = problems(text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].field, "route[1].upstream");
        assert_eq!(found[0].line, Some(7));
        assert!(found[0].message.contains("no [upstream.nope]"));
    }

    #[test]
    fn route_auth_is_a_set_of_known_credentials_defaulting_to_keys() {
        let config = Config::from_toml(MINIMAL, Path::new(".")).unwrap();
        let auth = config.routes[0].auth;
        assert!(auth.accepts(CredentialKind::Key) && !auth.accepts(CredentialKind::Cert), "{auth:?}");
        assert_eq!(config.client_certs.id_from, crate::client_cert::IdFrom::Cn);

        let text = format!("{MINIMAL}auth = [\"cert\", \"key\"]\n[client_certs]\nid_from = \"san-uri\"\n");
        let config = Config::from_toml(&text, Path::new(".")).unwrap();
        let auth = config.routes[0].auth;
        assert!(auth.accepts(CredentialKind::Key) && auth.accepts(CredentialKind::Cert), "{auth:?}");
        assert_eq!(config.client_certs.id_from, crate::client_cert::IdFrom::SanUri);
        let certs_only = Config::from_toml(&format!("{MINIMAL}auth = [\"cert\"]\n"), Path::new(".")).unwrap();
        assert!(!certs_only.routes[0].auth.accepts(CredentialKind::Key));
    }

    #[test]
    fn unknown_or_empty_auth_and_a_bad_id_from_are_refused_naming_the_field() {
        let found = problems(&format!(
            "{MINIMAL}auth = [\"key\", \"oidc\"]\n[[route]]\npath = \"/b\"\nupstream = \"builtin:echo\"\nauth = []\n\
             [[route]]\npath = \"/c\"\nupstream = \"builtin:echo\"\npublic = true\nauth = [\"cert\"]\n\
             [client_certs]\nid_from = \"serial\"\n"
        ));
        let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["route[0].auth", "route[1].auth", "route[2].auth", "client_certs.id_from"]);
        assert!(found[0].message.contains("`oidc`"), "{}", found[0].message);
        assert!(found[3].message.contains("san-dns"), "{}", found[3].message);
        assert_eq!(found[0].line, Some(4));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "[server]\nlisten = \"nowhere\"\ndrain_timeout = \"soon\"\n\n[upstream.api]\ntargets = [\"ftp://x\"]\n\n[[route]]\npath = \"api\"\nupstream = \"api\"\n";
        let found = problems(text);
        let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["server.listen", "server.drain_timeout", "upstream.api.targets[0]", "route[0].path"]
        );
        assert_eq!(found[0].line, Some(2));
        assert_eq!(found[2].line, Some(6));
    }

    #[test]
    fn duplicate_routes_and_public_routes_with_scopes_are_refused() {
        let text = "[[route]]\npath = \"/a/\"\nupstream = \"builtin:echo\"\n[[route]]\npath = \"/a\"\nupstream = \"builtin:echo\"\npublic = true\nscopes = [\"x\"]\n";
        let fields: Vec<String> = problems(text).into_iter().map(|p| p.field).collect();
        assert_eq!(fields, ["route[1].public", "route[1].path"]);
    }

    #[test]
    fn auth_failure_and_lookup_limits_default_on_and_can_be_switched_off() {
        let on = Config::defaults().keys;
        assert_eq!(on.auth_failures_per_ip.map(|r| r.to_string()).as_deref(), Some("20/s"));
        assert_eq!(on.auth_failures_burst.get(), 100);
        assert_eq!(on.store_lookups_per_second.map(|n| n.get()), Some(2000));
        let off = Config::from_toml(
            "[keys]\nauth_failures_per_ip = \"off\"\nstore_lookups_per_second = 0\n\
             [[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n",
            Path::new("."),
        )
        .unwrap();
        assert!(off.keys.auth_failures_per_ip.is_none());
        assert!(off.keys.store_lookups_per_second.is_none());
        let bad = problems(
            "[keys]\nauth_failures_per_ip = \"often\"\nauth_failures_burst = 0\n\
             [[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n",
        );
        let fields: Vec<&str> = bad.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["keys.auth_failures_per_ip", "keys.auth_failures_burst"], "{bad:?}");
        assert_eq!(bad[0].line, Some(2));
    }

    #[test]
    fn redis_password_never_appears_in_messages() {
        assert_eq!(redact_url("redis://user:hunter2@host:6379/0"), "redis://***@host:6379/0");
        let text = "[store]\nkind = \"redis\"\nurl = \"http://user:hunter2@host\"\n".to_owned() + MINIMAL;
        let found = problems(&text);
        assert!(!found[0].message.contains("hunter2"), "{}", found[0].message);
    }

    #[test]
    fn redis_tls_files_resolve_against_the_config_folder_and_are_checked_by_check() {
        let store = |lines: &str| format!("[store]\nkind = \"redis\"\n{lines}\n{MINIMAL}");
        let found =
            problems(&store("url = \"rediss://:hunter2@127.0.0.1:6380\"\ntls_ca = \"certs/redis-ca.pem\""));
        assert_eq!((found[0].field.as_str(), found[0].line), ("store.tls_ca", Some(4)), "{found:?}");
        assert!(found[0].message.contains("cannot read /etc/keygate/certs/redis-ca.pem"), "{found:?}");
        assert!(!found[0].message.contains("hunter2"));

        let found = problems(&store("url = \"rediss://127.0.0.1:6380/#insecure\""));
        assert_eq!((found[0].field.as_str(), found[0].line), ("store.url", Some(3)), "{found:?}");
        assert!(found[0].message.contains("#insecure"), "{found:?}");

        let found = problems(&store("url = \"redis://127.0.0.1:6379\"\ntls_cert = \"/etc/ssl/redis.pem\""));
        assert_eq!(found[0].field, "store.tls_cert", "{found:?}");
        assert!(found[0].message.contains("clear"), "{found:?}");

        let found = problems(&format!("[store]\ntls_ca = \"ca.pem\"\n{MINIMAL}"));
        assert_eq!(found[0].field, "store.tls_ca", "{found:?}");
        assert!(found[0].message.contains("kind = \"redis\""), "{found:?}");
    }

    #[test]
    fn cluster_and_sentinel_stores_name_their_fields() {
        let text = format!(
            "[store]\nkind = \"redis-cluster\"\nnodes = [\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]\n\
             prefix = \"app:\"\n{MINIMAL}"
        );
        let config = Config::from_toml(&text, Path::new("/etc/keygate")).unwrap();
        let nodes = vec!["redis://127.0.0.1:7000".to_owned(), "redis://127.0.0.1:7001".to_owned()];
        assert_eq!(
            config.store,
            StoreConfig::Redis {
                endpoint: Endpoint::Cluster(nodes),
                prefix: "app:".into(),
                tls: RedisTls::default()
            }
        );

        let text = format!(
            "[store]\nkind = \"redis-sentinel\"\nsentinels = [\"redis://127.0.0.1:26379\"]\nmaster = \"mymaster\"\n{MINIMAL}"
        );
        let config = Config::from_toml(&text, Path::new("/etc/keygate")).unwrap();
        assert!(matches!(
            &config.store,
            StoreConfig::Redis { endpoint: Endpoint::Sentinel { master, .. }, .. } if master == "mymaster"
        ));

        let store = |lines: &str| format!("[store]\n{lines}\n{MINIMAL}");
        let found = problems(&store("kind = \"redis-cluster\""));
        assert_eq!(found[0].field, "store.nodes", "{found:?}");
        assert!(found[0].message.contains("at least one"), "{found:?}");
        let found = problems(&store("kind = \"redis-cluster\"\nnodes = [\"http://:hunter2@x\"]"));
        assert_eq!((found[0].field.as_str(), found[0].line), ("store.nodes", Some(3)), "{found:?}");
        assert!(!found[0].message.contains("hunter2"), "{found:?}");
        let found = problems(&store("kind = \"redis-cluster\"\nurl = \"redis://127.0.0.1:7000\""));
        assert!(
            found
                .iter()
                .any(|p| p.field == "store.url" && p.message.contains("`url` belongs to kind = \"redis\"")),
            "{found:?}"
        );
        let found = problems(&store("kind = \"redis-sentinel\"\nsentinels = [\"redis://127.0.0.1:26379\"]"));
        assert_eq!(found[0].field, "store.master", "{found:?}");
        let found = problems(&store(
            "kind = \"redis-sentinel\"\nsentinels = [\"redis://127.0.0.1:26379\"]\nmaster = \"m\"\ntls_ca = \"ca.pem\"",
        ));
        assert!(
            found.iter().any(|p| p.field == "store.tls_ca" && p.message.contains("Sentinel")),
            "{found:?}"
        );
        let found = problems(&store("kind = \"redis\"\nnodes = [\"redis://127.0.0.1:7000\"]"));
        assert!(
            found.iter().any(|p| p.field == "store.nodes" && p.message.contains("redis-cluster")),
            "{found:?}"
        );
        let found = problems(&store("kind = \"cluster\""));
        assert!(found[0].message.contains("redis-cluster"), "{found:?}");
    }

    fn load_admin(text: &str, env: &[(&str, &str)]) -> (Option<AdminConfig>, Vec<ConfigProblem>) {
        let raw: RawConfig = toml::from_str(text).unwrap();
        let mut p = Problems::default();
        let lookup = |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned());
        let admin = validate_admin(&mut p, raw.admin, Some(&lookup));
        (admin, p.0)
    }

    #[test]
    fn admin_is_off_without_listen() {
        assert!(Config::from_toml(MINIMAL, Path::new(".")).unwrap().admin.is_none());
        let (admin, found) = load_admin("[admin]\ntoken_env = \"T\"\n", &[]);
        assert!(admin.is_none());
        assert_eq!(found[0].field, "admin.token_env");
    }

    #[test]
    fn admin_with_listen_and_no_token_is_refused() {
        let (_, found) = load_admin("[admin]\nlisten = \"127.0.0.1:9090\"\n", &[]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].field, "admin.listen");
        assert!(found[0].message.contains("token"), "{}", found[0].message);
    }

    #[test]
    fn admin_token_comes_from_the_named_variable_and_is_never_shown() {
        let secret = "s3cr3t-s3cr3t-s3cr3t";
        let text = "[admin]\nlisten = \"127.0.0.1:9090\"\ntoken_env = \"KG_ADMIN\"\ntoken_name = \"ops\"\n";
        let (admin, found) = load_admin(text, &[("KG_ADMIN", secret)]);
        assert!(found.is_empty(), "{found:?}");
        let admin = admin.unwrap();
        assert_eq!(admin.token_name, "ops");
        assert!(admin.token.matches(secret.as_bytes()));
        assert!(!admin.token.matches(b"s3cr3t-s3cr3t-s3cr3"), "a prefix is not the token");
        assert!(!admin.token.matches(b""));
        assert!(!format!("{admin:?}").contains(secret));

        let (_, found) = load_admin(text, &[]);
        assert!(found[0].message.contains("KG_ADMIN"), "{found:?}");
    }

    #[test]
    fn short_or_doubled_admin_tokens_are_refused_without_quoting_them() {
        let (_, found) = load_admin("[admin]\nlisten = \"127.0.0.1:9090\"\ntoken = \"hunter2\"\n", &[]);
        assert_eq!(found[0].field, "admin.token");
        assert!(!found[0].message.contains("hunter2"));
        let text = "[admin]\nlisten = \"127.0.0.1:9090\"\ntoken = \"0123456789abcdef\"\ntoken_env = \"X\"\n";
        assert_eq!(load_admin(text, &[]).1[0].field, "admin.token_env");
    }

    #[test]
    fn sizes_parse_with_decimal_and_binary_units_and_refuse_the_rest() {
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("10MiB"), Some(10 << 20));
        assert_eq!(parse_size(" 512 kb "), Some(512_000));
        assert_eq!(parse_size("2GB"), Some(2_000_000_000));
        assert_eq!(parse_size("1gib"), Some(1 << 30));
        assert_eq!(parse_size("7b"), Some(7));
        for bad in ["", "MiB", "1.5MiB", "-1", "10 MeB", "99999999999999999999", "18446744073709551615GiB"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn body_and_connection_limits_have_defaults_and_name_their_field() {
        let text = "[[route]]\npath = \"/\"\nupstream = \"api\"\n\n[upstream.api]\ntargets = [\"http://127.0.0.1:1\"]\n";
        let config = Config::from_toml(text, Path::new(".")).unwrap();
        assert_eq!(config.routes[0].body, BodyLimits::default());
        assert_eq!(config.routes[0].body.max, Some(10 << 20));
        let api = &config.upstreams["api"];
        assert_eq!(api.body_idle_timeout, Duration::from_secs(60));
        assert_eq!(api.max_connections.get(), 512);

        let text = text.replace(
            "upstream = \"api\"\n",
            "upstream = \"api\"\nmax_body = \"unlimited\"\nupload_idle_timeout = \"5s\"\n",
        );
        let config = Config::from_toml(&text, Path::new(".")).unwrap();
        assert_eq!(config.routes[0].body, BodyLimits { max: None, idle_timeout: Duration::from_secs(5) });
        let zero = text.replace("\"unlimited\"", "\"0\"");
        assert_eq!(Config::from_toml(&zero, Path::new(".")).unwrap().routes[0].body.max, None);

        let bad = text
            .replace("\"unlimited\"", "\"lots\"")
            .replace("127.0.0.1:1\"]", "127.0.0.1:1\"]\nmax_connections = 0\nbody_idle_timeout = \"never\"");
        let mut fields: Vec<String> = problems(&bad).into_iter().map(|p| p.field).collect();
        fields.sort();
        assert_eq!(
            fields,
            ["route[0].max_body", "upstream.api.body_idle_timeout", "upstream.api.max_connections"]
        );
    }
}
