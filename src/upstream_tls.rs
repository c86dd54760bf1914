//! TLS to `https://` upstreams: one rustls [`ClientConfig`] per
//! `[upstream.NAME]`, built when the config loads from the files it names.
//!
//! Built once (at start, and again by every reload, since a reload validates
//! the whole file anew) and shared by every worker's connection pools: a
//! handshake never reads a file or parses a certificate.
//!
//! - Trust: without `ca`, the operating system's roots (rustls-native-certs:
//!   `/etc/ssl/certs`, or `SSL_CERT_FILE` / `SSL_CERT_DIR`), as curl does and
//!   as `rediss://` does (see [`crate::redis_target`]), so a private CA the
//!   operator installed on the host works. With `ca`, those certificates only:
//!   no public CA can vouch for a private upstream.
//! - `client_cert` + `client_key`: a client certificate (mTLS), both or
//!   neither, the key checked against the certificate now.
//! - `server_name`: the name sent as SNI and verified in the certificate,
//!   for targets addressed by IP; otherwise each target's host is.
//! - `protocol`: the ALPN offer. `auto` offers `h2` and `http/1.1` and speaks
//!   what the upstream picks; `http1` offers only `http/1.1`; `http2` offers
//!   only `h2` (and, on `http://`, speaks HTTP/2 with prior knowledge, h2c).
//! - ring provider, TLS 1.2 and 1.3 only (rustls' safe defaults).
//!
//! It sits below `config` (which validates `[upstream.NAME]` with it) and
//! `proxy` (which connects with it), like `redis_target`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;

/// Which HTTP version to speak to an upstream (`protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// HTTP/2 when the upstream picks `h2` over ALPN; HTTP/1.1 otherwise
    /// (and always on `http://`).
    #[default]
    Auto,
    Http1,
    /// HTTP/2 only: `h2` over ALPN on `https://`, prior knowledge on `http://`.
    Http2,
}

impl Protocol {
    /// `"auto" | "http1" | "http2"`.
    pub fn parse(text: &str) -> Option<Protocol> {
        match text {
            "auto" => Some(Protocol::Auto),
            "http1" => Some(Protocol::Http1),
            "http2" => Some(Protocol::Http2),
            _ => None,
        }
    }

    /// The ALPN protocols offered, in order of preference.
    fn alpn(self) -> Vec<Vec<u8>> {
        match self {
            Protocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Protocol::Http1 => vec![b"http/1.1".to_vec()],
            Protocol::Http2 => vec![b"h2".to_vec()],
        }
    }
}

/// The TLS files an `[upstream.NAME]` names, resolved against the config's folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// What `https://` targets of one upstream connect with.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// Shared by every worker; rebuilt by a reload.
    pub config: Arc<ClientConfig>,
    /// `server_name`: verified (and sent as SNI) instead of each target's host.
    pub server_name: Option<ServerName<'static>>,
}

/// Why an upstream's TLS settings cannot be used: the field (`ca`,
/// `client_cert`, `client_key`) and a message naming the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TlsError {
    pub field: &'static str,
    pub message: String,
}

impl TlsError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self { field, message: message.into() }
    }
}

/// Builds the client config for one upstream from its files: reads and
/// checks them (and, without `ca`, the system's roots); connects to nothing.
pub fn client_config(files: &TlsFiles, protocol: Protocol) -> Result<Arc<ClientConfig>, TlsError> {
    crate::redis_target::install_crypto_provider();
    let roots = match &files.ca {
        Some(path) => {
            let pem = crate::pem::read(path).map_err(|e| TlsError::new("ca", e))?;
            crate::pem::roots(path, &pem).map_err(|e| TlsError::new("ca", e))?
        }
        None => system_roots()?,
    };
    let builder = ClientConfig::builder_with_provider(crate::redis_target::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new("ca", format!("TLS set-up: {e}")))?
        .with_root_certificates(roots);
    let mut config = match (&files.client_cert, &files.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => return Err(TlsError::new("client_cert", "needs client_key (its private key)")),
        (None, Some(_)) => return Err(TlsError::new("client_key", "needs client_cert (its certificate)")),
        (Some(cert), Some(key)) => {
            let (chain, key_der) = client_identity(cert, key)?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                TlsError::new(
                    "client_key",
                    format!(
                        "{} and {} are not a certificate and its key: {e}",
                        cert.display(),
                        key.display()
                    ),
                )
            })?
        }
    };
    config.alpn_protocols = protocol.alpn();
    Ok(Arc::new(config))
}

type Identity = (Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>);

fn client_identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let cert_pem = crate::pem::read(cert).map_err(|e| TlsError::new("client_cert", e))?;
    let chain = crate::pem::certificates(cert, &cert_pem).map_err(|e| TlsError::new("client_cert", e))?;
    let key_pem = crate::pem::read(key).map_err(|e| TlsError::new("client_key", e))?;
    let key_der = crate::pem::private_key(key, &key_pem).map_err(|e| TlsError::new("client_key", e))?;
    Ok((chain, key_der))
}

/// The operating system's roots. Certificates that do not parse are skipped
/// (as curl skips them), but none at all is an error: every `https://`
/// target would fail.
fn system_roots() -> Result<rustls::RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
        return Err(TlsError::new(
            "ca",
            format!(
                "https targets without `ca` trust the system's CA certificates, and none loaded{why}; \
                 install ca-certificates (or set SSL_CERT_FILE), or set `ca` to the CA that signed \
                 the upstream's certificate"
            ),
        ));
    }
    Ok(roots)
}

/// The name to verify for a target whose host is `host` (brackets of an
/// IPv6 literal removed).
pub fn server_name_for(host: &str) -> Result<ServerName<'static>, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .map_err(|e| format!("`{host}` is not a DNS name or IP address: {e}"))
}

/// The TLS reason inside an error from a TLS connection (only ask for
/// those), if rustls raised it: rustls' own text ("invalid peer certificate: UnknownIssuer",
/// "received fatal alert: CertificateRequired", ...).
pub fn rustls_reason(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                return Some(tls.to_string());
            }
            // hyper's HTTP/2 side keeps an I/O error's kind and text only
            // (the rustls error inside becomes a string). On a TLS stream,
            // tokio-rustls reports exactly rustls' errors as `InvalidData`.
            if io.kind() == std::io::ErrorKind::InvalidData {
                return Some(io.to_string());
            }
        }
        source = error.source();
    }
    None
}
