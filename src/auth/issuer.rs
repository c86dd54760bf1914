//! JWTs from external identity providers (`[[jwt.issuer]]`): verified with
//! the keys of each issuer's JWKS, on routes with `auth = ["jwt"]`.
//!
//! Verification is in steps, cheapest first, as for keygate's own tokens
//! (`jwt.rs`), so a flood of forged tokens costs little:
//! 1. the cache: a token verified before is found by its text (compared
//!    in full); only its `exp` (and the route's trust in its issuer) is checked
//!    again. An entry lives until the token's `exp` plus leeway, and goes
//!    as soon as a refresh finds its `kid` gone from the issuer's JWKS;
//! 2. the header and the issuer: the payload's `iss` (read, not yet
//!    trusted) picks the issuer, which must be configured and trusted by
//!    the route; `alg` must be one it allows (never `none`, which
//!    jsonwebtoken cannot even parse, never HMAC: `keygate check` refuses
//!    `HS*`, and no symmetric key is ever loaded from a JWKS) and one the
//!    key of that `kid` can verify;
//! 3. the key by `kid`: an unknown `kid` may be a rotation, so the JWKS is
//!    fetched again, but at most once per `refetch_interval` per issuer;
//!    otherwise the token is refused without a signature check;
//! 4. the signature, then the claims: `iss` exactly, `aud` (one of the
//!    configured audiences, unless `audience_optional`), `exp` (required)
//!    and `nbf` with leeway, the client claim (a valid client ID) and the
//!    scope claim (a space-separated string or an array).
//!
//! Who the token's client is, and whether it may call, is the caller's
//! business (`token.rs`): its client record must exist and be active.
//!
//! Each issuer's JWKS is fetched in a background task when the gateway
//! starts and every `refresh`; a failing fetch keeps the keys already
//! loaded and logs one line.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Validation;
use moka::sync::Cache;

use crate::config::IssuerConfig;
use crate::jwks::{KeySet, VerifyingKey};

/// A cached token lives no longer than this, whatever its `exp` says.
const MAX_CACHED: Duration = Duration::from_secs(24 * 3600);

/// A token payload larger than this is refused before it is decoded.
const MAX_PAYLOAD: usize = 16 * 1024;

/// What a verified external token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalClaims {
    /// The issuer's `iss`.
    pub issuer: Arc<str>,
    /// The client ID, from the issuer's client claim.
    pub client: String,
    /// The scopes the token grants, checked against the route.
    pub scopes: Vec<String>,
    pub exp: u64,
    /// The `kid` it was verified with (a cached token goes with its key).
    kid: String,
    /// The leeway of its issuer, for the `exp` check on cache hits.
    leeway: u64,
}

/// Why an external token was refused. Each maps to 401 `invalid_token`;
/// the reason is for logs and tests, never names the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IssuerError {
    #[error("malformed")]
    Malformed,
    #[error("issuer not configured")]
    UnknownIssuer,
    #[error("issuer not trusted on this route")]
    Untrusted,
    #[error("algorithm not allowed")]
    Algorithm,
    #[error("no kid")]
    NoKid,
    #[error("unknown kid")]
    UnknownKid,
    #[error("bad signature")]
    Signature,
    #[error("wrong audience")]
    Audience,
    #[error("no exp")]
    NoExpiry,
    #[error("expired")]
    Expired,
    #[error("not yet valid")]
    NotYetValid,
    #[error("no client claim")]
    NoClient,
    #[error("client claim is not a client ID")]
    BadClient,
    /// The issuer has no keys at all: no fetch of its JWKS has succeeded
    /// yet. Not the token's fault (503, see `GatewayError::JwksUnavailable`).
    #[error("no JWKS keys loaded")]
    KeysUnavailable,
}

impl IssuerError {
    /// For the log line (a `&'static str`, as key refusals give).
    pub fn reason(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownIssuer => "issuer not configured",
            Self::Untrusted => "issuer not trusted on this route",
            Self::Algorithm => "algorithm not allowed",
            Self::NoKid => "no kid",
            Self::UnknownKid => "unknown kid",
            Self::Signature => "bad signature",
            Self::Audience => "wrong audience",
            Self::NoExpiry => "no exp",
            Self::Expired => "expired",
            Self::NotYetValid => "not yet valid",
            Self::NoClient => "no client claim",
            Self::BadClient => "client claim is not a client ID",
            Self::KeysUnavailable => "no JWKS keys loaded",
        }
    }
}

/// The `iss` of a JWT's payload, read without any check: it only picks
/// which issuer's keys to verify with (and `iss` is checked again once the
/// signature holds). `None`: not a JWT with a string `iss`.
pub fn peek_issuer(token: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: String,
    }
    let payload = token.split('.').nth(1).filter(|p| p.len() <= MAX_PAYLOAD)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<Iss>(&bytes).ok().map(|claims| claims.iss)
}

// === impl Issuer ===

/// One configured issuer: its policy and its keys.
pub struct Issuer {
    config: IssuerConfig,
    iss: Arc<str>,
    keys: KeySet,
}

impl Issuer {
    pub fn config(&self) -> &IssuerConfig {
        &self.config
    }

    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// The key for `kid`: the current set's, or, for an unknown `kid`, the
    /// set after a refetch if one is due (step 3 of the module doc).
    async fn key(&self, kid: &str, cache: &TokenCache) -> Result<Arc<VerifyingKey>, IssuerError> {
        if let Some(key) = self.keys.get(kid) {
            return Ok(key);
        }
        if !self.keys.refetch_due() {
            return Err(self.unknown_kid());
        }
        // Behind a fetch under way (the first one at start, or another
        // request's refetch), whose answer may hold this kid.
        let held = self.keys.lock().await;
        if let Some(key) = self.keys.get(kid) {
            return Ok(key);
        }
        if !self.keys.claim_refetch(&held) {
            return Err(self.unknown_kid());
        }
        self.fetch(&held, cache, "a token's kid is not in the JWKS").await;
        self.keys.get(kid).ok_or_else(|| self.unknown_kid())
    }

    /// Why a `kid` was not found: not in the keys, or no keys at all.
    fn unknown_kid(&self) -> IssuerError {
        match self.keys.current().is_empty() {
            true => IssuerError::KeysUnavailable,
            false => IssuerError::UnknownKid,
        }
    }

    /// Fetches the JWKS (under the fetch lock) and applies it: cached
    /// tokens of keys no longer there are dropped. A failure keeps the keys
    /// already loaded and logs one line.
    async fn fetch(&self, held: &tokio::sync::OwnedMutexGuard<()>, cache: &TokenCache, why: &'static str) {
        let before = self.keys.current();
        let fetched = self.keys.fetch(held).await;
        crate::metrics::jwks_fetched(&self.iss, fetched.as_ref().ok().map(|(keys, _)| keys.len()));
        match fetched {
            Ok((keys, skipped)) => {
                let changed = keys.len() != before.len() || keys.kids().any(|kid| before.get(kid).is_none());
                if changed {
                    tracing::info!(issuer = %self.iss, keys = keys.len(), skipped, why, "JWKS loaded");
                }
                let gone: Vec<String> =
                    before.kids().filter(|kid| keys.get(kid).is_none()).map(str::to_owned).collect();
                if !gone.is_empty() {
                    let iss = Arc::clone(&self.iss);
                    // Fails only without `support_invalidation_closures` (set in `Issuers::new`).
                    let dropped = cache.invalidate_entries_if(move |_, cached| {
                        *cached.issuer == *iss && gone.iter().any(|kid| *kid == cached.kid)
                    });
                    if dropped.is_err() {
                        cache.invalidate_all();
                    }
                }
            }
            Err(error) => tracing::warn!(
                issuer = %self.iss,
                jwks = %self.keys.source().describe(),
                %error,
                why,
                "JWKS fetch failed; keeping the keys already loaded"
            ),
        }
    }

    /// Step 4 of the module doc, on the signature-checked payload.
    fn check_claims(
        &self,
        kid: &str,
        claims: &serde_json::Map<String, serde_json::Value>,
        now: u64,
    ) -> Result<ExternalClaims, IssuerError> {
        use serde_json::Value;
        let config = &self.config;
        let leeway = config.leeway.as_secs();
        if claims.get("iss").and_then(Value::as_str) != Some(&*self.iss) {
            return Err(IssuerError::UnknownIssuer);
        }
        if !config.audience.is_empty() {
            let named = |aud: &str| config.audience.iter().any(|ours| ours == aud);
            let ok = match claims.get("aud") {
                Some(Value::String(aud)) => named(aud),
                Some(Value::Array(auds)) => auds.iter().filter_map(Value::as_str).any(named),
                _ => false,
            };
            if !ok {
                return Err(IssuerError::Audience);
            }
        }
        let exp = numeric_date(claims.get("exp")).ok_or(IssuerError::NoExpiry)?;
        if exp.saturating_add(leeway) <= now {
            return Err(IssuerError::Expired);
        }
        match claims.get("nbf") {
            None => {}
            Some(nbf) => match numeric_date(Some(nbf)) {
                Some(nbf) if nbf <= now.saturating_add(leeway) => {}
                Some(_) => return Err(IssuerError::NotYetValid),
                None => return Err(IssuerError::Malformed),
            },
        }
        let client = claims.get(&config.client_claim).and_then(Value::as_str).ok_or(IssuerError::NoClient)?;
        crate::key::validate_client_id(client).map_err(|_| IssuerError::BadClient)?;
        let scopes = match claims.get(&config.scope_claim) {
            Some(Value::String(scopes)) => scopes.split(' ').map(str::to_owned).collect(),
            Some(Value::Array(scopes)) => {
                scopes.iter().filter_map(Value::as_str).map(str::to_owned).collect()
            }
            _ => Vec::new(),
        };
        // RFC 6749 §3.3 scope tokens only: anything else could not be
        // matched by a route nor sent upstream as a header.
        let mut unique: Vec<String> = Vec::new();
        for scope in scopes.into_iter().filter(|s| is_scope_token(s)) {
            if !unique.contains(&scope) {
                unique.push(scope);
            }
        }
        let scopes = unique;
        Ok(ExternalClaims {
            issuer: Arc::clone(&self.iss),
            client: client.to_owned(),
            scopes,
            exp,
            kid: kid.to_owned(),
            leeway,
        })
    }
}

/// A NumericDate (RFC 7519 §2): seconds, possibly with a fraction.
fn numeric_date(value: Option<&serde_json::Value>) -> Option<u64> {
    let value = value?;
    value.as_u64().or_else(|| value.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f as u64))
}

fn is_scope_token(scope: &str) -> bool {
    !scope.is_empty()
        && scope.bytes().all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

// === impl Issuers ===

/// By token text, hashed with foldhash and compared in full, as keygate's
/// own tokens are cached (`jwt.rs`, which says why not a digest).
type TokenCache = Cache<Box<str>, Arc<ExternalClaims>, foldhash::fast::RandomState>;

/// A cached token expires at its `exp` plus leeway (at most [`MAX_CACHED`]).
struct UntilExp;

impl moka::Expiry<Box<str>, Arc<ExternalClaims>> for UntilExp {
    fn expire_after_create(
        &self,
        _: &Box<str>,
        claims: &Arc<ExternalClaims>,
        _: Instant,
    ) -> Option<Duration> {
        let now = jiff::Timestamp::now().as_second().max(0).unsigned_abs();
        let left = claims.exp.saturating_add(claims.leeway).saturating_sub(now);
        Some(Duration::from_secs(left).min(MAX_CACHED))
    }
}

/// Every configured issuer, and the verified-token cache they share.
pub struct Issuers {
    by_iss: HashMap<String, Arc<Issuer>>,
    /// Verified tokens by their text (step 1 of the module doc),
    /// bounded by `[tokens] cache_capacity`.
    cache: TokenCache,
}

impl Issuers {
    /// The issuers `configs` describe, keys not loaded yet (see [`Self::start`]).
    pub fn new(configs: &[IssuerConfig], cache_capacity: u64) -> Arc<Self> {
        crate::redis_target::install_crypto_provider();
        let mut by_iss = HashMap::new();
        for config in configs {
            let tls = match config.jwks.is_https() {
                false => None,
                true => {
                    let files = crate::upstream_tls::TlsFiles { ca: config.ca.clone(), ..Default::default() };
                    match crate::upstream_tls::client_config(&files, crate::upstream_tls::Protocol::Http1) {
                        Ok(tls) => Some(tls),
                        // `keygate check` built it; the fetches will say why they fail.
                        Err(error) => {
                            tracing::error!(issuer = %config.iss, %error, "no TLS for the JWKS URL");
                            None
                        }
                    }
                }
            };
            if let crate::jwks::JwksSource::Url(uri) = &config.jwks
                && uri.scheme_str() == Some("http")
                && !uri.host().is_some_and(is_loopback)
            {
                tracing::warn!(
                    issuer = %config.iss,
                    jwks = %config.jwks.describe(),
                    "the JWKS comes over plain http: whoever is on the path can substitute the keys; use https"
                );
            }
            let keys =
                KeySet::new(config.jwks.clone(), config.algorithms.clone(), tls, config.refetch_interval);
            let issuer = Issuer { iss: Arc::from(config.iss.as_str()), config: config.clone(), keys };
            by_iss.insert(config.iss.clone(), Arc::new(issuer));
        }
        let cache = Cache::builder()
            .max_capacity(cache_capacity)
            .expire_after(UntilExp)
            .support_invalidation_closures()
            .build_with_hasher(foldhash::fast::RandomState::default());
        Arc::new(Self { by_iss, cache })
    }

    /// [`Self::new`], then one background task per issuer: the first fetch
    /// now (holding the fetch lock from here, so a token arriving before it
    /// ran waits for it), then one every `refresh`. A task ends once the
    /// issuers are dropped. Must run inside a tokio runtime.
    pub fn start(configs: &[IssuerConfig], cache_capacity: u64) -> Arc<Self> {
        let issuers = Self::new(configs, cache_capacity);
        for issuer in issuers.by_iss.values() {
            let first = issuer.keys.try_lock();
            let weak: Weak<Issuer> = Arc::downgrade(issuer);
            let cache = issuers.cache.clone();
            tokio::spawn(refresh_loop(weak, cache, first));
        }
        issuers
    }

    /// Fetches every issuer's JWKS now, one after the other (without
    /// [`Self::start`]'s tasks: benches, tests, tools).
    pub async fn load_now(&self) {
        for issuer in self.by_iss.values() {
            let held = issuer.keys.lock().await;
            issuer.fetch(&held, &self.cache, "asked").await;
        }
    }

    pub fn issuer(&self, iss: &str) -> Option<&Arc<Issuer>> {
        self.by_iss.get(iss)
    }

    /// Whether `token` was verified before and is still cached; no check.
    pub fn is_cached(&self, token: &str) -> bool {
        self.cache.contains_key(token)
    }

    /// The claims of `token` if it is valid at `now` (Unix seconds) and
    /// from an issuer `trusts` accepts.
    pub async fn verify(
        &self,
        token: &str,
        trusts: impl Fn(&str) -> bool,
        now: u64,
    ) -> Result<Arc<ExternalClaims>, IssuerError> {
        if let Some(claims) = self.cache.get(token) {
            if !trusts(&claims.issuer) {
                return Err(IssuerError::Untrusted);
            }
            if claims.exp.saturating_add(claims.leeway) <= now {
                return Err(IssuerError::Expired);
            }
            return Ok(claims);
        }
        // `decode_header` refuses `alg: none` (jsonwebtoken has no such
        // algorithm) and anything that is not a JWT.
        let header = jsonwebtoken::decode_header(token).map_err(|_| IssuerError::Malformed)?;
        let iss = peek_issuer(token).ok_or(IssuerError::Malformed)?;
        let issuer = self.by_iss.get(&iss).ok_or(IssuerError::UnknownIssuer)?;
        if !trusts(&iss) {
            return Err(IssuerError::Untrusted);
        }
        if !issuer.config.algorithms.contains(&header.alg) {
            return Err(IssuerError::Algorithm);
        }
        let kid = header.kid.ok_or(IssuerError::NoKid)?;
        let key = issuer.key(&kid, &self.cache).await?;
        if !key.algorithms.contains(&header.alg) {
            return Err(IssuerError::Algorithm);
        }
        // The signature only (one algorithm: the header's, which the key
        // verifies); the claims are checked against `now` below.
        let mut validation = Validation::new(header.alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key.decoding,
            &validation,
        )
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => IssuerError::Signature,
            _ => IssuerError::Malformed,
        })?;
        let claims = Arc::new(issuer.check_claims(&kid, &data.claims, now)?);
        self.cache.insert(Box::from(token), Arc::clone(&claims));
        Ok(claims)
    }
}

/// One issuer's scheduled fetches (see [`Issuers::start`]).
async fn refresh_loop(
    issuer: Weak<Issuer>,
    cache: TokenCache,
    first: Option<tokio::sync::OwnedMutexGuard<()>>,
) {
    let mut held = first;
    loop {
        let Some(issuer) = issuer.upgrade() else { return };
        let guard = match held.take() {
            Some(guard) => guard,
            None => issuer.keys.lock().await,
        };
        issuer.fetch(&guard, &cache, "scheduled").await;
        drop(guard);
        let every = issuer.config.refresh;
        drop(issuer);
        tokio::time::sleep(every).await;
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use ring::signature::KeyPair as _;
    use serde_json::json;

    const NOW: u64 = 1_800_000_000;

    struct Idp {
        encoding: EncodingKey,
        _dir: tempfile::TempDir,
        issuers: Arc<Issuers>,
    }

    /// An issuer `https://idp` with one Ed25519 key `k1` in a JWKS file.
    async fn idp(edit: impl FnOnce(&mut IssuerConfig)) -> Idp {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
        let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("jwks.json");
        let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1", "x": x}]});
        std::fs::write(&file, jwks.to_string()).expect("write");
        let mut config = IssuerConfig {
            iss: "https://idp".to_owned(),
            jwks: crate::jwks::JwksSource::File(file),
            ca: None,
            audience: vec!["api".to_owned()],
            algorithms: crate::config::DEFAULT_ISSUER_ALGORITHMS.to_vec(),
            client_claim: "sub".to_owned(),
            scope_claim: "scope".to_owned(),
            leeway: Duration::from_secs(30),
            refresh: Duration::from_secs(600),
            refetch_interval: Duration::from_secs(30),
        };
        edit(&mut config);
        let issuers = Issuers::new(&[config], 100);
        issuers.load_now().await;
        Idp { encoding: EncodingKey::from_ed_der(pkcs8.as_ref()), _dir: dir, issuers }
    }

    impl Idp {
        fn sign(&self, claims: serde_json::Value) -> String {
            let mut header = Header::new(Algorithm::EdDSA);
            header.kid = Some("k1".to_owned());
            jsonwebtoken::encode(&header, &claims, &self.encoding).expect("signs")
        }

        async fn verify(&self, token: &str, now: u64) -> Result<Arc<ExternalClaims>, IssuerError> {
            self.issuers.verify(token, |_| true, now).await
        }
    }

    fn claims() -> serde_json::Value {
        json!({"iss": "https://idp", "aud": "api", "sub": "acme", "scope": "read", "exp": NOW + 60})
    }

    #[test]
    fn the_issuer_is_peeked_from_the_payload_without_trusting_it() {
        let payload = URL_SAFE_NO_PAD.encode(r#"{"iss":"https://idp","sub":"x"}"#);
        assert_eq!(peek_issuer(&format!("e30.{payload}.sig")).as_deref(), Some("https://idp"));
        assert_eq!(peek_issuer("e30.bm90IGpzb24.sig"), None);
        assert_eq!(peek_issuer(&format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(r#"{"iss":7}"#))), None);
        assert_eq!(peek_issuer("no-dots"), None);
        let huge = URL_SAFE_NO_PAD.encode(format!(r#"{{"iss":"{}"}}"#, "a".repeat(MAX_PAYLOAD)));
        assert_eq!(peek_issuer(&format!("e30.{huge}.sig")), None, "too large to be decoded");
    }

    #[tokio::test]
    async fn exp_and_nbf_hold_with_leeway_cached_or_not() {
        let idp = idp(|_| {}).await;
        let token = idp.sign(claims());
        assert_eq!(idp.verify(&token, NOW + 89).await.map(|c| c.exp), Ok(NOW + 60), "within leeway");
        assert_eq!(idp.verify(&token, NOW + 90).await.unwrap_err(), IssuerError::Expired, "cached, expired");
        let fresh =
            idp.sign(json!({"exp": NOW + 60, "jti": 2, "iss": "https://idp", "aud": "api", "sub": "acme"}));
        assert_eq!(idp.verify(&fresh, NOW + 90).await.unwrap_err(), IssuerError::Expired, "uncached");
        let mut early = claims();
        early["nbf"] = json!(NOW + 31);
        assert_eq!(idp.verify(&idp.sign(early.clone()), NOW).await.unwrap_err(), IssuerError::NotYetValid);
        early["nbf"] = json!(NOW + 30);
        assert!(idp.verify(&idp.sign(early), NOW).await.is_ok());
        let mut fraction = claims();
        fraction["exp"] = json!(NOW as f64 + 60.5);
        assert_eq!(idp.verify(&idp.sign(fraction), NOW).await.map(|c| c.exp), Ok(NOW + 60));
        let mut text_exp = claims();
        text_exp["exp"] = json!("tomorrow");
        assert_eq!(idp.verify(&idp.sign(text_exp), NOW).await.unwrap_err(), IssuerError::NoExpiry);
    }

    #[tokio::test]
    async fn scopes_come_as_a_string_or_an_array_and_only_as_scope_tokens() {
        let idp = idp(|config| config.scope_claim = "scp".to_owned()).await;
        let mut c = claims();
        c["scp"] = json!(["read", "orders:write", "read", "bad scope", "q\"uote", ""]);
        assert_eq!(idp.verify(&idp.sign(c), NOW).await.expect("valid").scopes, ["read", "orders:write"]);
        let mut c = claims();
        c["scp"] = json!(" read  write ");
        assert_eq!(idp.verify(&idp.sign(c), NOW).await.expect("valid").scopes, ["read", "write"]);
        // The default claim is not read once another is configured.
        assert!(idp.verify(&idp.sign(claims()), NOW).await.expect("valid").scopes.is_empty());
    }

    #[tokio::test]
    async fn the_client_comes_from_the_configured_claim_and_must_be_a_client_id() {
        let idp = idp(|config| config.client_claim = "azp".to_owned()).await;
        let mut c = claims();
        c["azp"] = json!("shop-1");
        assert_eq!(idp.verify(&idp.sign(c), NOW).await.expect("valid").client, "shop-1");
        assert_eq!(idp.verify(&idp.sign(claims()), NOW).await.unwrap_err(), IssuerError::NoClient);
        let mut c = claims();
        c["azp"] = json!("user@example.com");
        assert_eq!(idp.verify(&idp.sign(c), NOW).await.unwrap_err(), IssuerError::BadClient);
    }

    #[tokio::test]
    async fn audience_optional_accepts_any_aud_and_a_list_needs_one_of_ours() {
        let any = idp(|config| config.audience.clear()).await;
        let mut c = claims();
        c["aud"] = json!("whatever");
        assert!(any.verify(&any.sign(c), NOW).await.is_ok());
        let listed = idp(|config| config.audience = vec!["a".to_owned(), "b".to_owned()]).await;
        let mut c = claims();
        c["aud"] = json!(["x", "b"]);
        assert!(listed.verify(&listed.sign(c), NOW).await.is_ok());
        let mut c = claims();
        c["aud"] = json!(["x", "y"]);
        assert_eq!(listed.verify(&listed.sign(c), NOW).await.unwrap_err(), IssuerError::Audience);
    }

    #[tokio::test]
    async fn trust_is_checked_on_cache_hits_too_and_a_token_without_kid_is_refused() {
        let idp = idp(|_| {}).await;
        let token = idp.sign(claims());
        assert!(idp.verify(&token, NOW).await.is_ok());
        assert!(idp.issuers.is_cached(&token));
        assert_eq!(idp.issuers.verify(&token, |_| false, NOW).await.unwrap_err(), IssuerError::Untrusted);
        let kidless =
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims(), &idp.encoding).expect("signs");
        assert_eq!(idp.verify(&kidless, NOW).await.unwrap_err(), IssuerError::NoKid);
    }
}
