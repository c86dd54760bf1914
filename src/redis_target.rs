//! The Redis a deployment names (a URL and, for `rediss://`, TLS files), and
//! the one place a [`redis::Client`] is built from them.
//!
//! Every connection keygate opens to Redis comes from a client built by
//! [`client`]: the store's multiplexed connection and its pub/sub subscriber,
//! the usage flusher's connection, shared limits (on the store's connection),
//! the CLI's audit trail and `keygate usage`. So `rediss://` works the same
//! everywhere, and `keygate check` (config validation) runs these very checks
//! before anything connects.
//!
//! It sits below both `config` (which validates `[store]` with it) and `store`
//! (which connects with it), so neither imports the other for it.
//!
//! TLS is rustls (the redis crate's `tokio-rustls-comp`), never OpenSSL:
//! - `rediss://` without `tls_ca`: the server's certificate must chain to the
//!   operating system's roots (rustls-native-certs: `/etc/ssl/certs`, or
//!   `SSL_CERT_FILE` / `SSL_CERT_DIR`), as for redis-cli and curl, so a
//!   private CA installed on the host works and no root list is frozen into
//!   the binary.
//! - `tls_ca`: those CA certificates only; the system's roots are not
//!   consulted, so no public CA can vouch for a private Redis.
//! - `tls_cert` + `tls_key`: a client certificate, for a Redis started with
//!   `tls-auth-clients yes`.
//! - The URL's host must be in the server certificate (rustls checks names
//!   and IP addresses alike).
//!
//! Refused, each with a message naming the field:
//! - `#insecure` (the redis crate's skip-verification fragment). Skipping
//!   verification lets anyone on the path read the key records and forge
//!   answers; a self-signed or private Redis is trusted with `tls_ca`
//!   instead. The crate's `tls-rustls-insecure` feature is not compiled in,
//!   so the fragment could not be honoured anyway; refusing it says so up
//!   front instead of failing every connection.
//! - TLS files with a `redis://` (or Unix socket) URL: the operator asked for
//!   TLS, and the traffic would silently go in clear.
//! - Files that are missing, not regular files, over [`MAX_PEM_BYTES`], not
//!   PEM, holding no certificate (or no key), not usable as a CA, or a key
//!   that does not belong to its certificate.
//!
//! Messages never hold the URL's password: [`redact_url`] and [`scrub`]
//! replace it with `***`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redis::{ConnectionAddr, IntoConnectionInfo, TlsCertificates};

/// Larger files are refused (see [`crate::pem`]).
pub use crate::pem::MAX_PEM_BYTES;

/// TLS files for a `rediss://` Redis, as configured (`[store] tls_ca`,
/// `tls_cert`, `tls_key`, or `--redis-ca` / `KEYGATE_REDIS_CA` and friends).
/// Paths from the config file are already resolved against its folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// CA certificates (PEM) the server's certificate must chain to, instead
    /// of the system's roots.
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM), leaf first; needs `key`.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

impl RedisTls {
    /// Whether no TLS file is named.
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }
}

/// Which Redis a deployment names (`[store] kind`): one node, a Redis
/// Cluster found from seed nodes, or a primary found through Sentinel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `kind = "redis"`: `url`.
    Node(String),
    /// `kind = "redis-cluster"`: `nodes`, any of which can tell the rest.
    Cluster(Vec<String>),
    /// `kind = "redis-sentinel"`: `sentinels` to ask where the primary
    /// named `master` is.
    Sentinel { sentinels: Vec<String>, master: String },
}

impl Endpoint {
    /// Every URL named (node, seeds or sentinels).
    pub fn urls(&self) -> &[String] {
        match self {
            Endpoint::Node(url) => std::slice::from_ref(url),
            Endpoint::Cluster(nodes) => nodes,
            Endpoint::Sentinel { sentinels, .. } => sentinels,
        }
    }

    /// The endpoint for messages and `keygate check`, passwords redacted.
    pub fn describe(&self) -> String {
        let urls = self.urls().iter().map(|url| redact_url(url)).collect::<Vec<_>>().join(", ");
        match self {
            Endpoint::Node(_) => format!("redis {urls}"),
            Endpoint::Cluster(_) => format!("redis cluster {urls}"),
            Endpoint::Sentinel { master, .. } => format!("redis sentinel master {master} via {urls}"),
        }
    }
}

/// The setting a [`TargetError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Url,
    Ca,
    Cert,
    Key,
}

impl Field {
    /// The config field: `store.url`, `store.tls_ca`, ...
    pub fn config_name(self) -> &'static str {
        match self {
            Field::Url => "store.url",
            Field::Ca => "store.tls_ca",
            Field::Cert => "store.tls_cert",
            Field::Key => "store.tls_key",
        }
    }

    /// The command-line flag and variable that override it.
    pub fn flag(self) -> &'static str {
        match self {
            Field::Url => "--redis (KEYGATE_REDIS_URL)",
            Field::Ca => "--redis-ca (KEYGATE_REDIS_CA)",
            Field::Cert => "--redis-cert (KEYGATE_REDIS_CERT)",
            Field::Key => "--redis-key (KEYGATE_REDIS_KEY)",
        }
    }
}

/// Why a Redis URL and its TLS files cannot be used. The message never holds
/// the URL's password, nor any file's contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TargetError {
    pub field: Field,
    pub message: String,
}

impl TargetError {
    fn new(field: Field, message: impl Into<String>) -> Self {
        Self { field, message: message.into() }
    }
}

/// Builds the client for `url` with `tls`, after every check in the module
/// doc. Reads the TLS files (and, for `rediss://` without `tls_ca`, the
/// system's roots) but connects to nothing: a Redis that is down is not an
/// error here.
pub fn client(url: &str, tls: &RedisTls) -> Result<redis::Client, TargetError> {
    install_crypto_provider();
    let info = url.into_connection_info().map_err(|e| {
        TargetError::new(
            Field::Url,
            scrub(
                url,
                format!("`{}` is not a Redis URL: {}", redact_url(url), e.detail().unwrap_or("invalid")),
            ),
        )
    })?;
    let insecure = match info.addr() {
        ConnectionAddr::TcpTls { insecure, .. } => *insecure,
        _ => {
            if let Some(field) = first_set(tls) {
                return Err(TargetError::new(
                    field,
                    format!(
                        "TLS files need a rediss:// URL; `{}` is not TLS, so the traffic would go in \
                         clear. Use rediss://, or remove {}",
                        redact_url(url),
                        field.config_name()
                    ),
                ));
            }
            return redis::Client::open(info).map_err(|e| url_error(url, &e));
        }
    };
    if insecure {
        return Err(TargetError::new(
            Field::Url,
            "`#insecure` (no certificate verification) is not supported: anyone on the path could \
             read and forge the store's answers. Remove it and give the CA that signed the Redis \
             certificate as store.tls_ca (--redis-ca)",
        ));
    }

    match certificates(tls)? {
        None => redis::Client::open(info).map_err(|e| url_error(url, &e)),
        Some(certs) => redis::Client::build_with_tls(info, certs).map_err(|e| url_error(url, &e)),
    }
}

/// The checks [`client`] makes, for every URL of `endpoint`; connects to
/// nothing. TLS through Sentinel is refused (not supported yet).
pub fn check(endpoint: &Endpoint, tls: &RedisTls) -> Result<(), TargetError> {
    if let Endpoint::Sentinel { .. } = endpoint
        && let Some(field) = first_set(tls)
    {
        return Err(TargetError::new(
            field,
            "TLS to Redis through Sentinel is not supported yet; use kind = \"redis\" or \"redis-cluster\" \
             for rediss://",
        ));
    }
    if endpoint.urls().is_empty() {
        return Err(TargetError::new(Field::Url, "no Redis URL given"));
    }
    for url in endpoint.urls() {
        client(url, tls)?;
    }
    Ok(())
}

/// The CA and client certificate of `tls`, read and checked; `None` when
/// neither is named (a `rediss://` Redis is then checked against the
/// system's roots, which must load). For a [`client`] and for a cluster's
/// client, which takes them once for every node.
pub fn certificates(tls: &RedisTls) -> Result<Option<TlsCertificates>, TargetError> {
    install_crypto_provider();
    let root_cert = match &tls.ca {
        Some(path) => Some(read_ca(path)?),
        None => {
            system_roots()?;
            None
        }
    };
    let client_tls = match (&tls.cert, &tls.key) {
        (None, None) => None,
        // Named by the field that is there, so the message points at a line.
        (Some(_), None) => {
            return Err(TargetError::new(
                Field::Cert,
                "store.tls_cert needs store.tls_key (its private key)",
            ));
        }
        (None, Some(_)) => {
            return Err(TargetError::new(Field::Key, "store.tls_key needs store.tls_cert (its certificate)"));
        }
        (Some(cert), Some(key)) => Some(read_client_identity(cert, key)?),
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(TlsCertificates { client_tls, root_cert }))
}

/// What a failed connection means, for the messages operators read: the
/// redis crate's error, plus the likely cause when it is a TLS failure.
/// Says nothing of the URL; callers scrub the password from what they add.
pub fn explain(error: &redis::RedisError) -> String {
    let text = error.to_string();
    let hint = tls_hint(&text);
    if hint.is_empty() { text } else { format!("{text} ({hint})") }
}

/// What a connection attempt that got no answer within `waited` means. A
/// plain Redis port given a TLS handshake never answers at all (it waits
/// for the end of an inline command), so over TLS that is the likely cause.
pub fn no_answer(client: &redis::Client, waited: std::time::Duration) -> String {
    match client.get_connection_info().addr() {
        ConnectionAddr::TcpTls { .. } => format!(
            "no answer within {waited:?} (TLS: a plain Redis port never answers a TLS handshake; is this \
             the server's tls-port, or a plain port that needs redis://?)"
        ),
        _ => format!("no answer within {waited:?}"),
    }
}

fn tls_hint(text: &str) -> &'static str {
    // rustls's error texts (`rustls::Error`'s Display), as the redis crate
    // passes them through in an I/O error.
    if text.contains("invalid peer certificate") {
        if text.contains("NotValidForName") {
            "TLS: the Redis certificate does not name the URL's host; connect by a name or address \
             in its subject alternative names"
        } else if text.contains("Expired") || text.contains("NotValidYet") {
            "TLS: the Redis certificate is outside its validity period"
        } else {
            "TLS: the Redis certificate is not signed by a trusted CA; set store.tls_ca \
             (--redis-ca) to the CA that signed it"
        }
    } else if text.contains("InvalidContentType") || text.contains("corrupt message") {
        "TLS: the server did not answer in TLS; is this a plain Redis port? Use redis:// for it, \
         or the server's tls-port"
    } else if text.contains("CertificateRequired") || text.contains("certificate required") {
        "TLS: the Redis requires a client certificate; set store.tls_cert and store.tls_key"
    } else if text.contains("received fatal alert") {
        "TLS: the Redis refused the handshake; if it requires client certificates, check \
         store.tls_cert and store.tls_key"
    } else {
        ""
    }
}

/// `url` with the password of `scheme://user:password@host` replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// `text` with `url`'s password (raw or percent-decoded) replaced by `***`,
/// wherever it occurs.
pub fn scrub(url: &str, text: String) -> String {
    match password(url) {
        Some(password) => scrub_password(password, text),
        None => text,
    }
}

/// `text` with `password` (raw or percent-decoded) replaced by `***`.
pub fn scrub_password(password: &str, text: String) -> String {
    let decoded = percent_encoding::percent_decode_str(password).decode_utf8_lossy().into_owned();
    let text = text.replace(password, "***");
    if decoded.is_empty() { text } else { text.replace(&decoded, "***") }
}

/// The password in `redis://user:password@host/...` or in a `?pass=...` /
/// `?password=...` query (the redis crate's Unix-socket form).
pub fn password(url: &str) -> Option<&str> {
    let userinfo_password = url.split_once("://").and_then(|(_, rest)| {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let (userinfo, _) = authority.rsplit_once('@')?;
        let (_, password) = userinfo.split_once(':')?;
        Some(password)
    });
    let query_password = url.split_once('?').and_then(|(_, query)| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix("pass=").or_else(|| pair.strip_prefix("password=")))
    });
    userinfo_password.or(query_password).filter(|p| !p.is_empty())
}

fn url_error(url: &str, error: &redis::RedisError) -> TargetError {
    TargetError::new(Field::Url, scrub(url, format!("`{}`: {error}", redact_url(url))))
}

fn first_set(tls: &RedisTls) -> Option<Field> {
    [(Field::Ca, &tls.ca), (Field::Cert, &tls.cert), (Field::Key, &tls.key)]
        .into_iter()
        .find_map(|(field, path)| path.is_some().then_some(field))
}

/// rustls needs a process-wide crypto provider; ring is the only one
/// compiled in. Installing it explicitly keeps `ClientConfig::builder()` in
/// the redis crate from panicking if another crate ever enables a second
/// provider. A provider installed earlier (by anyone) stays.
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The process's crypto provider (ring), for every rustls config keygate builds.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// The CA file's bytes, once every certificate in it is known to parse and
/// to be usable as a trust anchor.
fn read_ca(path: &Path) -> Result<Vec<u8>, TargetError> {
    let pem = read_pem(Field::Ca, path)?;
    crate::pem::roots(path, &pem).map_err(|e| TargetError::new(Field::Ca, e))?;
    Ok(pem)
}

/// The client certificate and key, once they parse and the key is the
/// certificate's (rustls checks the pair as the redis crate will use it).
fn read_client_identity(cert: &Path, key: &Path) -> Result<redis::ClientTlsConfig, TargetError> {
    let cert_pem = read_pem(Field::Cert, cert)?;
    let chain = crate::pem::certificates(cert, &cert_pem).map_err(|e| TargetError::new(Field::Cert, e))?;
    let key_pem = read_pem(Field::Key, key)?;
    let key_der = crate::pem::private_key(key, &key_pem).map_err(|e| TargetError::new(Field::Key, e))?;
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TargetError::new(Field::Cert, format!("TLS set-up: {e}")))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| {
            TargetError::new(
                Field::Key,
                format!("{} and {} are not a certificate and its key: {e}", cert.display(), key.display()),
            )
        })?;
    Ok(redis::ClientTlsConfig { client_cert: cert_pem, client_key: key_pem })
}

/// A regular file's contents, at most [`MAX_PEM_BYTES`].
fn read_pem(field: Field, path: &Path) -> Result<Vec<u8>, TargetError> {
    crate::pem::read(path).map_err(|e| TargetError::new(field, e))
}

/// The system's roots load, and there is at least one: the redis crate
/// loads them again at each connection and fails it on any error, so a
/// broken store is better reported once, by `keygate check`.
fn system_roots() -> Result<(), TargetError> {
    let found = rustls_native_certs::load_native_certs();
    if let Some(error) = found.errors.first() {
        return Err(TargetError::new(
            Field::Ca,
            format!(
                "the system's CA certificates do not load ({error}); repair them, or set store.tls_ca \
                 (--redis-ca) to the CA that signed the Redis certificate"
            ),
        ));
    }
    if found.certs.is_empty() {
        return Err(TargetError::new(
            Field::Ca,
            "rediss:// without store.tls_ca trusts the system's CA certificates, and none were found \
             (install ca-certificates, or set SSL_CERT_FILE); or set store.tls_ca (--redis-ca)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        /// A CA, a leaf signed by it, and the leaf's key, as PEM files.
        fn new() -> Pki {
            let dir = tempfile::tempdir().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca =
                rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
            let leaf_key = rcgen::KeyPair::generate().unwrap();
            let leaf = rcgen::CertificateParams::new(vec!["client".to_owned()])
                .unwrap()
                .signed_by(&leaf_key, &*ca)
                .unwrap();
            let other_key = rcgen::KeyPair::generate().unwrap();
            std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
            std::fs::write(dir.path().join("leaf.pem"), leaf.pem()).unwrap();
            std::fs::write(dir.path().join("leaf-key.pem"), leaf_key.serialize_pem()).unwrap();
            std::fs::write(dir.path().join("other-key.pem"), other_key.serialize_pem()).unwrap();
            Pki { dir }
        }

        fn path(&self, name: &str) -> Option<PathBuf> {
            Some(self.dir.path().join(name))
        }

        fn write(&self, name: &str, contents: &[u8]) -> Option<PathBuf> {
            std::fs::write(self.dir.path().join(name), contents).unwrap();
            self.path(name)
        }
    }

    const TLS_URL: &str = "rediss://127.0.0.1:6380/";

    fn refused(url: &str, tls: &RedisTls) -> TargetError {
        client(url, tls).expect_err("should be refused")
    }

    #[test]
    fn a_ca_and_a_client_identity_build_a_client() {
        let pki = Pki::new();
        let tls =
            RedisTls { ca: pki.path("ca.pem"), cert: pki.path("leaf.pem"), key: pki.path("leaf-key.pem") };
        let built = client(TLS_URL, &tls).unwrap();
        assert!(matches!(built.get_connection_info().addr(), ConnectionAddr::TcpTls { insecure: false, .. }));
        client("redis://127.0.0.1:6379/", &RedisTls::default()).unwrap();
    }

    #[test]
    fn insecure_is_refused() {
        for url in ["rediss://127.0.0.1:6380/#insecure", "rediss://127.0.0.1:6380#insecure"] {
            let error = refused(url, &RedisTls::default());
            assert_eq!(error.field, Field::Url);
            assert!(error.message.contains("#insecure") && error.message.contains("tls_ca"), "{error}");
        }
    }

    #[test]
    fn tls_files_with_a_plain_url_are_refused() {
        let pki = Pki::new();
        let tls = RedisTls { ca: pki.path("ca.pem"), ..RedisTls::default() };
        for url in ["redis://127.0.0.1:6379/", "unix:///run/redis.sock"] {
            let error = refused(url, &tls);
            assert_eq!(error.field, Field::Ca);
            assert!(error.message.contains("rediss://") && error.message.contains("clear"), "{error}");
        }
    }

    #[test]
    fn bad_ca_files_are_named() {
        let pki = Pki::new();
        let cases: [(Option<PathBuf>, &str); 6] = [
            (pki.path("missing.pem"), "cannot read"),
            (pki.path(""), "not a regular file"),
            (pki.write("junk.pem", b"hello, I am not a certificate\n"), "holds no PEM certificate"),
            (pki.write("empty.pem", b""), "holds no PEM certificate"),
            (pki.path("leaf-key.pem"), "holds no PEM certificate"),
            (
                pki.write("broken.pem", b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"),
                "not valid PEM",
            ),
        ];
        for (path, why) in cases {
            let shown = path.as_ref().unwrap().display().to_string();
            let error = refused(TLS_URL, &RedisTls { ca: path, ..RedisTls::default() });
            assert_eq!(error.field, Field::Ca);
            assert!(error.message.contains(why) && error.message.contains(&shown), "{why}: {error}");
        }
        let huge = vec![b'a'; MAX_PEM_BYTES as usize + 1];
        let error = refused(TLS_URL, &RedisTls { ca: pki.write("huge.pem", &huge), ..RedisTls::default() });
        assert!(error.message.contains("larger than 1024 KiB"), "{error}");
    }

    #[test]
    fn a_certificate_that_is_not_a_ca_is_refused_as_one() {
        let pki = Pki::new();
        let garbage_der = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let error =
            refused(TLS_URL, &RedisTls { ca: pki.write("bad.pem", garbage_der), ..RedisTls::default() });
        assert!(
            error.message.contains("certificate 1") && error.message.contains("not usable as a CA"),
            "{error}"
        );
    }

    #[test]
    fn a_client_identity_must_be_whole_and_matching() {
        let pki = Pki::new();
        let ca = pki.path("ca.pem");
        let only_cert = RedisTls { ca: ca.clone(), cert: pki.path("leaf.pem"), key: None };
        assert_eq!(refused(TLS_URL, &only_cert).field, Field::Cert);
        let only_key = RedisTls { ca: ca.clone(), cert: None, key: pki.path("leaf-key.pem") };
        assert_eq!(refused(TLS_URL, &only_key).field, Field::Key);

        let wrong_key =
            RedisTls { ca: ca.clone(), cert: pki.path("leaf.pem"), key: pki.path("other-key.pem") };
        let error = refused(TLS_URL, &wrong_key);
        assert_eq!(error.field, Field::Key);
        assert!(error.message.contains("not a certificate and its key"), "{error}");

        let no_key = RedisTls { ca, cert: pki.path("leaf.pem"), key: pki.path("leaf.pem") };
        let error = refused(TLS_URL, &no_key);
        assert!(error.message.contains("no usable PEM private key"), "{error}");
    }

    #[test]
    fn url_errors_never_show_the_password() {
        for url in
            ["rediss://:hunter2@/", "rediss://u:hunter2@127.0.0.1:6380/#bogus", "rediss://u:hunter2@0.0.0.0/"]
        {
            let error = refused(url, &RedisTls::default());
            assert_eq!(error.field, Field::Url);
            assert!(!error.message.contains("hunter2"), "{error}");
        }
        assert_eq!(redact_url("rediss://user:hunter2@host:6380/0"), "rediss://***@host:6380/0");
        assert_eq!(scrub("redis://u:s3cr%40t@h", "auth s3cr@t and s3cr%40t".into()), "auth *** and ***");
        assert_eq!(scrub("redis+unix:///s.sock?db=1&pass=hunter2", "x hunter2".into()), "x ***");
    }

    #[test]
    fn tls_failures_get_a_hint_naming_the_cause() {
        let io = |text: &str| redis::RedisError::from(std::io::Error::other(text.to_owned()));
        let unknown = explain(&io("invalid peer certificate: UnknownIssuer"));
        assert!(unknown.contains("UnknownIssuer") && unknown.contains("store.tls_ca"), "{unknown}");
        let name = explain(&io("invalid peer certificate: NotValidForName"));
        assert!(name.contains("does not name the URL's host"), "{name}");
        let plain = explain(&io("received corrupt message of type InvalidContentType"));
        assert!(plain.contains("plain Redis port"), "{plain}");
        let mtls = explain(&io("received fatal alert: CertificateRequired"));
        assert!(mtls.contains("store.tls_cert"), "{mtls}");
        assert_eq!(explain(&io("Connection refused")), "Connection refused");
    }
}
