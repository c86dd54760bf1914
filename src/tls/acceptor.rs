//! One TLS listener's rustls [`ServerConfig`]: which certificate a client
//! gets (SNI), what it may speak (ALPN `h2` and `http/1.1`; TLS 1.3 and 1.2
//! with rustls' safe cipher suites, nothing older), how it resumes (tickets
//! and a session cache), and whether it must show a certificate of its own.
//!
//! The `ServerConfig` is built once per listener and shared by every worker;
//! only the certificates change at run time: the resolver holds them in an
//! `ArcSwap`, so a reload is one pointer swap, handshakes in progress finish
//! with the certificate they picked, and open connections are never touched.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use super::certs::{self, LoadedCert};
use crate::config::{ClientAuthMode, ListenerTls};

/// Resumption sessions kept per listener (the server-side cache, for clients
/// that do not take tickets); an entry is a few hundred bytes.
const SESSION_CACHE_ENTRIES: usize = 4096;

/// A listener's TLS set-up failed; `field` is the `gateway.toml` field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {message}")]
pub struct TlsError {
    pub field: String,
    pub message: String,
}

/// Why a handshake failed, as `/metrics` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The listener's `handshake_timeout` (or the header timeout) passed.
    Timeout,
    /// The bytes were not TLS: most often plain HTTP sent to a TLS port.
    NotTls,
    /// TLS, but nothing in common: an old version (TLS 1.1 and below), no
    /// shared cipher suite, a bad handshake message.
    Refused,
    /// mTLS: no client certificate, or one that does not verify.
    ClientCertificate,
    /// The client went away or the socket failed mid-handshake.
    Io,
}

impl HandshakeFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::NotTls => "not_tls",
            Self::Refused => "refused",
            Self::ClientCertificate => "client_certificate",
            Self::Io => "io",
        }
    }

    /// Classifies the error tokio-rustls returns from a failed accept.
    pub fn of(error: &std::io::Error) -> Self {
        let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
            return Self::Io;
        };
        match tls {
            rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType | rustls::InvalidMessage::UnknownProtocolVersion,
            ) => Self::NotTls,
            rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_) => {
                Self::ClientCertificate
            }
            _ => Self::Refused,
        }
    }
}

/// One `[[server.listener]]` with `tls`, shared by the workers serving it.
#[derive(Debug)]
pub struct TlsListener {
    /// The configured address: how reloads find this listener in a new file.
    pub listen: SocketAddr,
    /// Its position among `[[server.listener]]` (with `listen`, how a
    /// reload finds it: two listeners may both be on port 0).
    pub index: usize,
    pub handshake_timeout: Duration,
    /// Unique in the process: whose certificates the expiry gauge shows.
    id: u64,
    resolver: Arc<SniResolver>,
    /// Tickets and cached sessions, kept across reloads (a renewed
    /// certificate does not cost returning clients a full handshake)
    /// unless the client CA or its mode changed: a session remembers the
    /// client certificate it verified, so one verified under the old CA must
    /// not resume (as nginx ties its session context to the client CA).
    resumption: ArcSwap<Resumption>,
    /// Swapped whole by a reload that changes the client CA or its mode;
    /// a handshake holds the config it started with.
    config: ArcSwap<rustls::ServerConfig>,
}

/// A reload's new certificates and server config for one listener, loaded
/// and checked but not yet in force.
pub struct Staged {
    set: CertSet,
    config: rustls::ServerConfig,
    resumption: Arc<Resumption>,
}

/// Where a listener's sessions resume from, and the client authentication
/// they were verified under.
#[derive(Debug)]
struct Resumption {
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    sessions: Arc<dyn rustls::server::StoresServerSessions>,
    /// The mode and the CA file's bytes (`None`: no client certificates).
    client_auth: Option<(ClientAuthMode, Vec<u8>)>,
}

impl Resumption {
    /// Stateless tickets (TLS 1.3 and 1.2), rotated every 6 h, and a
    /// bounded cache for clients that use session IDs.
    fn new(at: &str, client_auth: Option<(ClientAuthMode, Vec<u8>)>) -> Result<Self, TlsError> {
        Ok(Self {
            ticketer: rustls::crypto::ring::Ticketer::new().map_err(|e| setup(at, e))?,
            sessions: ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES),
            client_auth,
        })
    }
}

/// What decides whether sessions may outlive a reload: the client CA's mode
/// and contents (a CA replaced in place keeps its path).
fn client_auth_identity(at: &str, tls: &ListenerTls) -> Result<Option<(ClientAuthMode, Vec<u8>)>, TlsError> {
    tls.client_auth
        .as_ref()
        .map(|auth| {
            crate::pem::read(&auth.ca)
                .map(|pem| (auth.mode, pem))
                .map_err(|message| TlsError { field: format!("{at}.client_ca"), message })
        })
        .transpose()
}

impl TlsListener {
    /// Loads the listener's files and builds its server config. `index`
    /// is its position among `[[server.listener]]`, for error fields.
    pub fn build(index: usize, listen: SocketAddr, tls: &ListenerTls) -> Result<Arc<Self>, TlsError> {
        crate::redis_target::install_crypto_provider();
        let provider = crate::redis_target::provider();
        let at = format!("server.listener[{index}]");
        let resolver = Arc::new(SniResolver { set: ArcSwap::from_pointee(load_set(&at, tls, &provider)?) });
        let resumption = Resumption::new(&at, client_auth_identity(&at, tls)?)?;
        let config = server_config(&at, tls, &provider, &resolver, &resumption)?;
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Ok(Arc::new(Self {
            listen,
            index,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            handshake_timeout: tls.handshake_timeout,
            resolver,
            resumption: ArcSwap::from_pointee(resumption),
            config: ArcSwap::from_pointee(config),
        }))
    }

    /// Accepts with the current server config (an `Arc` clone).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    /// The server config new handshakes on this listener use.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.config.load_full()
    }

    /// The certificates new handshakes get, in configured order.
    pub fn certificates(&self) -> Vec<LoadedCert> {
        self.resolver.set.load().loaded.clone()
    }

    /// Loads `tls`'s certificates and client CA without installing them.
    pub(super) fn load(&self, tls: &ListenerTls) -> Result<Staged, TlsError> {
        let at = format!("server.listener[{}]", self.index);
        let provider = crate::redis_target::provider();
        let set = load_set(&at, tls, &provider)?;
        let client_auth = client_auth_identity(&at, tls)?;
        let current = self.resumption.load_full();
        let resumption = if current.client_auth == client_auth {
            current
        } else {
            Arc::new(Resumption::new(&at, client_auth)?)
        };
        let config = server_config(&at, tls, &provider, &self.resolver, &resumption)?;
        Ok(Staged { set, config, resumption })
    }

    /// New handshakes get `staged` from now on; open connections keep theirs.
    pub(super) fn install(&self, staged: Staged) {
        crate::metrics::tls_certificates(self.id, &self.listen.to_string(), &staged.set.loaded);
        self.resolver.set.store(Arc::new(staged.set));
        self.resumption.store(staged.resumption);
        self.config.store(Arc::new(staged.config));
    }

    /// Registers the current certificates' expiry with `/metrics`.
    pub fn publish_metrics(&self) {
        crate::metrics::tls_certificates(self.id, &self.listen.to_string(), &self.resolver.set.load().loaded);
    }
}

/// The rustls config for `tls`'s client authentication, on a listener's
/// certificate resolver and resumption state.
fn server_config(
    at: &str,
    tls: &ListenerTls,
    provider: &Arc<rustls::crypto::CryptoProvider>,
    resolver: &Arc<SniResolver>,
    resumption: &Resumption,
) -> Result<rustls::ServerConfig, TlsError> {
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&versions)
        .map_err(|e| setup(at, e))?;
    let builder = match &tls.client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            // The CA's bytes as `resumption` read them (they decide whether
            // sessions carry over), so the file is read once per build. Both
            // come from this `tls`; should they ever disagree, fail closed.
            let Some((_, pem)) = &resumption.client_auth else {
                let message = "the client CA was not read with the listener's sessions".to_owned();
                return Err(TlsError { field: format!("{at}.client_ca"), message });
            };
            let roots = crate::pem::roots(&auth.ca, pem)
                .map_err(|message| TlsError { field: format!("{at}.client_ca"), message })?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider));
            let verifier = match auth.mode {
                ClientAuthMode::Required => verifier,
                ClientAuthMode::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier.build().map_err(|e| TlsError {
                field: format!("{at}.client_ca"),
                message: format!("{}: {e}", auth.ca.display()),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::clone(resolver) as Arc<dyn ResolvesServerCert>);
    // ALPN decides the protocol: no preface sniffing on TLS. A client
    // offering neither (or no ALPN at all) gets HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer = Arc::clone(&resumption.ticketer);
    config.session_storage = Arc::clone(&resumption.sessions);
    Ok(config)
}

fn setup(at: &str, error: rustls::Error) -> TlsError {
    TlsError { field: format!("{at}.tls"), message: format!("TLS set-up: {error}") }
}

/// Every certificate of a listener, loaded; the first problem names its field.
fn load_set(
    at: &str,
    tls: &ListenerTls,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertSet, TlsError> {
    let mut loaded = Vec::with_capacity(tls.certs.len());
    for (i, files) in tls.certs.iter().enumerate() {
        let entry = if tls.certs.len() == 1 { format!("{at}.tls") } else { format!("{at}.tls.certs[{i}]") };
        let cert = certs::load(&files.cert, &files.key, provider)
            .map_err(|e| TlsError { field: format!("{entry}.{}", e.file.field()), message: e.message })?;
        loaded.push(cert);
    }
    CertSet::new(loaded)
        .ok_or_else(|| TlsError { field: format!("{at}.tls"), message: "no certificate".into() })
}

/// The certificates of one listener, indexed by the names they cover.
#[derive(Debug)]
pub struct CertSet {
    /// For clients that send no SNI, or a name nobody covers.
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` is kept as `example.com`: it covers exactly one more
    /// label (RFC 6125 §6.4.3), so `a.example.com` but not `a.b.example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    loaded: Vec<LoadedCert>,
}

impl CertSet {
    /// `None` for no certificates. Where two certificates cover a name, the
    /// first configured wins.
    fn new(loaded: Vec<LoadedCert>) -> Option<Self> {
        let default = Arc::clone(&loaded.first()?.certified);
        let (mut exact, mut wildcard) = (HashMap::new(), HashMap::new());
        for cert in &loaded {
            for name in &cert.names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(parent) => (&mut wildcard, parent),
                    None => (&mut exact, name.as_str()),
                };
                map.entry(key.to_owned()).or_insert_with(|| Arc::clone(&cert.certified));
            }
        }
        Some(Self { default, exact, wildcard, loaded })
    }

    /// The certificate for SNI `name`: an exact name, then a wildcard one
    /// label up, then the default.
    fn pick(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name else { return Arc::clone(&self.default) };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(found) = self.exact.get(&name) {
            return Arc::clone(found);
        }
        let parent = name.split_once('.').map(|(_, parent)| parent);
        parent
            .and_then(|parent| self.wildcard.get(parent))
            .map_or_else(|| Arc::clone(&self.default), Arc::clone)
    }
}

/// Picks each handshake's certificate from the set currently installed.
#[derive(Debug)]
struct SniResolver {
    set: ArcSwap<CertSet>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.set.load().pick(client_hello.server_name()))
    }
}
