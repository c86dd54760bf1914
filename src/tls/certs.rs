//! Loading a listener's PEM files: a certificate chain and its key, checked to
//! belong together, with the names and expiry read from the leaf certificate;
//! and a client CA bundle for mTLS.
//!
//! Config validation, `keygate check`, start-up and every reload all load
//! through here, so a file that one of them accepts the others accept too, and
//! every error names the file (the caller adds the field).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;

/// Which of a certificate entry's files a problem is with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum File {
    Cert,
    Key,
    ClientCa,
}

impl File {
    /// The field's name in `gateway.toml`.
    pub fn field(self) -> &'static str {
        match self {
            Self::Cert => "cert",
            Self::Key => "key",
            Self::ClientCa => "client_ca",
        }
    }
}

/// A file that cannot serve, and why; the message names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CertError {
    pub file: File,
    pub message: String,
}

impl CertError {
    fn new(file: File, message: impl Into<String>) -> Self {
        Self { file, message: message.into() }
    }
}

/// A certificate chain with its key, ready for rustls, and what operators
/// want to know of it.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    pub certified: Arc<CertifiedKey>,
    /// The leaf's DNS and IP subject alternative names, lowercase
    /// (`*.example.com` for a wildcard), in the certificate's order.
    pub names: Vec<String>,
    /// When the leaf expires, in seconds since the Unix epoch.
    pub not_after: i64,
    /// The leaf's serial number in hex: tells a renewed certificate apart.
    pub serial: String,
    /// The certificate file it came from.
    pub path: PathBuf,
}

impl LoadedCert {
    /// The expiry as an RFC 3339 timestamp, for `keygate check`.
    pub fn expires(&self) -> String {
        jiff::Timestamp::from_second(self.not_after)
            .map_or_else(|_| self.not_after.to_string(), |t| t.to_string())
    }
}

/// Whether a client asking for `host` (lowercase, no port) would get a
/// certificate valid for it from one naming `names`: an exact name, or a
/// wildcard one label up.
pub fn names_cover(names: &[String], host: &str) -> bool {
    let parent = host.split_once('.').map(|(_, parent)| parent);
    names.iter().any(|name| match name.strip_prefix("*.") {
        Some(wildcard) => parent == Some(wildcard),
        None => name == host,
    })
}

/// Loads `cert` (a PEM chain, leaf first) and `key` (a PEM private key) and
/// checks that the key is the leaf's and that the leaf names at least one host.
pub fn load(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<LoadedCert, CertError> {
    let chain = certificates(File::Cert, cert, &read_pem(File::Cert, cert)?)?;
    let key_pem = read_pem(File::Key, key)?;
    let key_der =
        crate::pem::private_key(key, &key_pem).map_err(|message| CertError::new(File::Key, message))?;
    let (names, not_after, serial) = describe(&chain[0])
        .map_err(|why| CertError::new(File::Cert, format!("{}: {why}", cert.display())))?;
    if names.is_empty() {
        return Err(CertError::new(
            File::Cert,
            format!(
                "{} names no host (no DNS or IP subject alternative name), so no client can verify it",
                cert.display()
            ),
        ));
    }
    let signing = provider.key_provider.load_private_key(key_der).map_err(|e| {
        CertError::new(File::Key, format!("{} is not a private key rustls can sign with: {e}", key.display()))
    })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => {
            return Err(CertError::new(
                File::Key,
                format!("{} is not the key of the certificate in {}: {e}", key.display(), cert.display()),
            ));
        }
    }
    Ok(LoadedCert { certified: Arc::new(certified), names, not_after, serial, path: cert.to_owned() })
}

/// The CA certificates client certificates must chain to (mTLS).
pub fn load_roots(ca: &Path) -> Result<rustls::RootCertStore, CertError> {
    let pem = read_pem(File::ClientCa, ca)?;
    crate::pem::roots(ca, &pem).map_err(|message| CertError::new(File::ClientCa, message))
}

/// The leaf's names, expiry and serial.
fn describe(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64, String), String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("the first certificate does not parse: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push(dns.to_ascii_lowercase()),
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    let not_after = parsed.validity().not_after.timestamp();
    Ok((names, not_after, parsed.raw_serial_as_string().replace(':', "")))
}

/// A file's contents through [`crate::pem::read`] (size-capped, regular
/// files only), its error tagged with the field.
fn read_pem(file: File, path: &Path) -> Result<Vec<u8>, CertError> {
    crate::pem::read(path).map_err(|message| CertError::new(file, message))
}

/// Every certificate in a PEM file; at least one ([`crate::pem::certificates`]).
fn certificates(file: File, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    crate::pem::certificates(path, pem).map_err(|message| CertError::new(file, message))
}
