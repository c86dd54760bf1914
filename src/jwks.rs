//! JWKS documents (RFC 7517) of external token issuers (`[[jwt.issuer]]
//! jwks`): where one comes from (an `https://` or `http://` URL, or a file),
//! fetching it, and turning it into verification keys by `kid`.
//!
//! Parsing keeps only what can verify a signature with an algorithm the
//! issuer allows: RSA keys for `RS*`/`PS*`, P-256 and P-384 keys for
//! `ES256`/`ES384`, Ed25519 keys for `EdDSA`. Symmetric (`oct`) keys are
//! never loaded, whatever the document says, so no token is ever checked
//! with HMAC keyed by something published; keys marked `use: enc`, keys
//! without a `kid`, and keys of a kind jsonwebtoken cannot read are skipped
//! one by one, so one odd entry does not hide the others. A key's own `alg`,
//! when given, narrows what it may verify.
//!
//! [`KeySet`] holds one issuer's current keys behind an `ArcSwap` (a
//! verification reads them without a lock) and the rule that bounds fetches
//! caused by tokens: at most one refetch for an unknown `kid` per
//! `refetch_interval`. The scheduled refreshes are `auth::issuer`'s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Mutex, OwnedMutexGuard};

/// A JWKS document larger than this is refused (real ones are a few KiB).
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// How long one fetch may take, connection and TLS handshake included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Where an issuer's JWKS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// Fetched with `GET` (no redirects followed, 200 only).
    Url(Uri),
    /// Read from disk (resolved against the config's folder).
    File(PathBuf),
}

impl JwksSource {
    /// `jwks = "..."`: a URL when it starts with `https://` or `http://`,
    /// otherwise a file path, relative ones against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        if text.starts_with("https://") || text.starts_with("http://") {
            let uri: Uri = text.parse().map_err(|e| format!("`{text}` is not a URL: {e}"))?;
            if uri.host().is_none_or(str::is_empty) {
                return Err(format!("`{text}` has no host"));
            }
            Ok(Self::Url(uri))
        } else if text.contains("://") {
            Err(format!("`{text}`: only https:// and http:// URLs, or a file path"))
        } else if text.is_empty() {
            Err("must name a URL or a file".to_owned())
        } else {
            Ok(Self::File(base.join(text)))
        }
    }

    pub fn is_https(&self) -> bool {
        matches!(self, Self::Url(uri) if uri.scheme_str() == Some("https"))
    }

    /// Where the document comes from, for logs: a URL without its query
    /// (which could carry a token), or the file's path.
    pub fn describe(&self) -> String {
        match self {
            Self::Url(uri) => format!(
                "{}://{}{}",
                uri.scheme_str().unwrap_or("http"),
                uri.authority().map_or("", |a| a.as_str()),
                uri.path()
            ),
            Self::File(path) => path.display().to_string(),
        }
    }

    /// The document's bytes: read from the file, or fetched (`tls` for an
    /// `https://` URL) within [`FETCH_TIMEOUT`].
    pub async fn fetch(&self, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Bytes, String> {
        match self {
            Self::File(path) => {
                let bytes = tokio::fs::read(path).await.map_err(|e| format!("{}: {e}", path.display()))?;
                if bytes.len() > MAX_JWKS_BYTES {
                    return Err(format!("{} is over {MAX_JWKS_BYTES} bytes", path.display()));
                }
                Ok(bytes.into())
            }
            Self::Url(uri) => tokio::time::timeout(FETCH_TIMEOUT, fetch_url(uri, tls))
                .await
                .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))?,
        }
    }
}

async fn fetch_url(uri: &Uri, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Bytes, String> {
    let host = uri.host().ok_or("no host")?;
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let stream =
        tokio::net::TcpStream::connect((bare_host, port)).await.map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let authority = uri.authority().map_or(host, |a| a.as_str());
    let request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, authority)
        .header(header::ACCEPT, "application/json, application/jwk-set+json")
        .header(header::USER_AGENT, concat!("keygate/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    if !https {
        return get(stream, request).await;
    }
    let config = tls.ok_or("no TLS configuration for an https:// JWKS")?;
    let name = crate::upstream_tls::server_name_for(host)?;
    let stream = tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    get(stream, request).await
}

/// One HTTP/1.1 `GET` on `io`; the body if the answer is 200.
async fn get<IO>(io: IO, request: Request<Empty<Bytes>>) -> Result<Bytes, String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| format!("HTTP: {e}"))?;
    // The connection ends with the response (or the timeout around us).
    let driving = tokio::spawn(connection);
    let answer = async {
        let response = sender.send_request(request).await.map_err(|e| format!("HTTP: {e}"))?;
        if response.status() != StatusCode::OK {
            return Err(format!("HTTP status {}", response.status().as_u16()));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES).collect().await;
        body.map(|collected| collected.to_bytes()).map_err(|e| format!("reading the body: {e}"))
    }
    .await;
    driving.abort();
    answer
}

// === Keys ===

/// One key of a JWKS, ready to verify.
pub struct VerifyingKey {
    pub decoding: DecodingKey,
    /// The algorithms this key may verify: those its kind supports, that
    /// its `alg` names (when it names one), and that the issuer allows.
    pub algorithms: Vec<Algorithm>,
}

/// The keys of one JWKS document, by `kid`.
#[derive(Default)]
pub struct KeyMap {
    keys: HashMap<String, Arc<VerifyingKey>>,
}

impl KeyMap {
    pub fn get(&self, kid: &str) -> Option<&Arc<VerifyingKey>> {
        self.keys.get(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

/// A parsed document: its usable keys, and how many entries were skipped.
pub struct Parsed {
    pub keys: KeyMap,
    pub skipped: usize,
}

/// Reads a JWKS document, keeping the keys that can verify one of
/// `allowed` (see the module doc). A document that is not a JWKS at all is
/// an error; one whose keys are all skipped is not (the caller decides).
pub fn parse(document: &[u8], allowed: &[Algorithm]) -> Result<Parsed, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let document: Document =
        serde_json::from_slice(document).map_err(|e| format!("not a JWKS document ({e})"))?;
    let mut keys = HashMap::new();
    let mut skipped = 0;
    for entry in document.keys {
        match usable_key(entry, allowed) {
            Some((kid, key)) if !keys.contains_key(&kid) => {
                keys.insert(kid, Arc::new(key));
            }
            // A `kid` twice: the first wins, as a verifier that picks by
            // `kid` cannot tell them apart.
            _ => skipped += 1,
        }
    }
    Ok(Parsed { keys: KeyMap { keys }, skipped })
}

fn usable_key(entry: serde_json::Value, allowed: &[Algorithm]) -> Option<(String, VerifyingKey)> {
    let jwk: Jwk = serde_json::from_value(entry).ok()?;
    let kid = jwk.common.key_id.clone().filter(|kid| !kid.is_empty())?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))) {
        return None;
    }
    let by_kind: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &[
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => &[],
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
            _ => &[],
        },
        // Never HMAC: a published secret is no secret.
        AlgorithmParameters::OctetKey(_) => &[],
    };
    let named = match jwk.common.key_algorithm {
        None => None,
        Some(alg) => Some(alg.to_string().parse::<Algorithm>().ok()?),
    };
    let algorithms: Vec<Algorithm> = by_kind
        .iter()
        .copied()
        .filter(|alg| allowed.contains(alg) && named.is_none_or(|named| named == *alg))
        .collect();
    if algorithms.is_empty() {
        return None;
    }
    let decoding = DecodingKey::from_jwk(&jwk).ok()?;
    Some((kid, VerifyingKey { decoding, algorithms }))
}

// === impl KeySet ===

/// One issuer's current keys, and the bound on refetches for unknown kids.
pub struct KeySet {
    source: JwksSource,
    allowed: Vec<Algorithm>,
    /// For an `https://` source.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Swapped whole by each successful fetch; read lock-free.
    keys: ArcSwap<KeyMap>,
    /// Held for the length of every fetch, so that fetches never overlap
    /// and a request waiting on an unknown `kid` sees the answer of the
    /// fetch already under way instead of starting its own. A tokio mutex:
    /// it is held across the fetch's awaits.
    fetching: Arc<Mutex<()>>,
    /// Nanoseconds since `base` before which no refetch for an unknown
    /// `kid` may start; 0 until the first one.
    next_refetch: AtomicU64,
    base: Instant,
    refetch_interval: Duration,
    /// Fetch attempts made (scheduled and for unknown kids), for tests and logs.
    fetches: AtomicU64,
}

impl KeySet {
    pub fn new(
        source: JwksSource,
        allowed: Vec<Algorithm>,
        tls: Option<Arc<rustls::ClientConfig>>,
        refetch_interval: Duration,
    ) -> Self {
        Self {
            source,
            allowed,
            tls,
            keys: ArcSwap::from_pointee(KeyMap::default()),
            fetching: Arc::new(Mutex::new(())),
            next_refetch: AtomicU64::new(0),
            base: Instant::now(),
            refetch_interval,
            fetches: AtomicU64::new(0),
        }
    }

    pub fn source(&self) -> &JwksSource {
        &self.source
    }

    /// The key with this `kid` in the current set, without waiting.
    pub fn get(&self, kid: &str) -> Option<Arc<VerifyingKey>> {
        self.keys.load().get(kid).cloned()
    }

    /// The current set.
    pub fn current(&self) -> Arc<KeyMap> {
        self.keys.load_full()
    }

    /// Fetch attempts so far.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The fetch lock, now if it is free (to hold it from before a task
    /// that will fetch is even scheduled).
    pub fn try_lock(&self) -> Option<OwnedMutexGuard<()>> {
        Arc::clone(&self.fetching).try_lock_owned().ok()
    }

    /// The fetch lock, once the fetch under way (if any) is over.
    pub async fn lock(&self) -> OwnedMutexGuard<()> {
        Arc::clone(&self.fetching).lock_owned().await
    }

    fn now_nanos(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a refetch for an unknown `kid` may start now (one atomic
    /// load: a flood of made-up kids is refused here without a lock).
    pub fn refetch_due(&self) -> bool {
        self.now_nanos() >= self.next_refetch.load(Ordering::Acquire)
    }

    /// Takes the refetch slot if it is due; the next one is due
    /// `refetch_interval` from now. Called under the fetch lock.
    pub fn claim_refetch(&self, _held: &OwnedMutexGuard<()>) -> bool {
        let now = self.now_nanos();
        if now < self.next_refetch.load(Ordering::Acquire) {
            return false;
        }
        let interval = u64::try_from(self.refetch_interval.as_nanos()).unwrap_or(u64::MAX);
        self.next_refetch.store(now.saturating_add(interval).max(1), Ordering::Release);
        true
    }

    /// Fetches and parses the document (under the fetch lock, `_held`) and
    /// swaps it in. A document with no usable key is refused like a failed
    /// fetch: the keys already loaded stay. Returns the new set and how many
    /// entries it skipped.
    pub async fn fetch(&self, _held: &OwnedMutexGuard<()>) -> Result<(Arc<KeyMap>, usize), String> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let document = self.source.fetch(self.tls.as_ref()).await?;
        let Parsed { keys, skipped } = parse(&document, &self.allowed)?;
        if keys.is_empty() {
            return Err(format!(
                "no usable key ({skipped} skipped: each needs a kid, and a kind and alg among the allowed algorithms)"
            ));
        }
        let keys = Arc::new(keys);
        self.keys.store(Arc::clone(&keys));
        Ok((keys, skipped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

    fn ed25519_jwk(kid: &str) -> serde_json::Value {
        serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"})
    }

    #[test]
    fn sources_are_urls_or_files_relative_to_the_config() {
        let base = Path::new("/etc/keygate");
        assert!(matches!(JwksSource::parse("https://idp.example/jwks", base), Ok(JwksSource::Url(_))));
        assert_eq!(
            JwksSource::parse("idp/jwks.json", base),
            Ok(JwksSource::File(PathBuf::from("/etc/keygate/idp/jwks.json")))
        );
        assert!(JwksSource::parse("ftp://idp.example/jwks", base).is_err());
        assert!(JwksSource::parse("https:///jwks", base).is_err());
        assert!(JwksSource::parse("", base).is_err());
        let url = JwksSource::parse("https://idp.example:8443/keys?token=secret", base).unwrap();
        assert_eq!(url.describe(), "https://idp.example:8443/keys", "no query in logs");
    }

    #[test]
    fn symmetric_encryption_kidless_and_disallowed_keys_are_skipped_one_by_one() {
        let document = serde_json::json!({"keys": [
            ed25519_jwk("good"),
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0", "alg": "HS256"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "enc", "use": "enc", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "RSA", "kid": "weird", "n": 5},
            ed25519_jwk("good"),
        ]});
        let parsed = parse(document.to_string().as_bytes(), &ALL).unwrap();
        assert_eq!(parsed.keys.kids().collect::<Vec<_>>(), ["good"]);
        assert_eq!(parsed.skipped, 5);
        assert_eq!(parsed.keys.get("good").unwrap().algorithms, [Algorithm::EdDSA]);
        // The issuer allows RS256 only: the Ed25519 key verifies nothing.
        let parsed = parse(document.to_string().as_bytes(), &[Algorithm::RS256]).unwrap();
        assert!(parsed.keys.is_empty());
        assert!(parse(b"{\"not\": \"jwks\"}", &ALL).is_err());
        assert!(parse(b"<html>", &ALL).is_err());
    }

    #[test]
    fn a_keys_own_alg_narrows_what_it_verifies() {
        let n = "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw";
        let document =
            serde_json::json!({"keys": [{"kty": "RSA", "kid": "r", "alg": "PS256", "n": n, "e": "AQAB"}]});
        let parsed = parse(document.to_string().as_bytes(), &[Algorithm::RS256, Algorithm::PS256]).unwrap();
        assert_eq!(parsed.keys.get("r").unwrap().algorithms, [Algorithm::PS256]);
    }

    #[tokio::test]
    async fn refetches_for_unknown_kids_are_one_per_interval() {
        let keys = KeySet::new(
            JwksSource::File(PathBuf::from("/nonexistent")),
            ALL.to_vec(),
            None,
            Duration::from_secs(30),
        );
        let held = keys.lock().await;
        assert!(keys.refetch_due());
        assert!(keys.claim_refetch(&held), "the first one is due at once");
        assert!(!keys.refetch_due());
        assert!(!keys.claim_refetch(&held));
        // A failed fetch keeps the (empty) set and counts as an attempt.
        assert!(keys.fetch(&held).await.is_err());
        assert_eq!(keys.fetches(), 1);
        assert!(keys.current().is_empty());
    }
}
