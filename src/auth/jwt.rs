//! Access tokens: the JWTs (RFC 7519) keygate signs for a key, and their
//! verification on routes with `auth = ["key", "jwt"]`.
//!
//! Signing is EdDSA (Ed25519) only, through jsonwebtoken over ring (see
//! `Cargo.toml` for the choice). The signing key comes from `[tokens]
//! signing_key` or is generated at start; its `kid` is derived from the
//! public key, so a rotated key gets a new `kid` and tokens of both can be
//! told apart. [`TokenKeys::jwks`] is the `/.well-known/jwks.json` body.
//!
//! Verification is in three steps, cheapest first, so that a flood of
//! forged tokens costs little:
//! 1. the cache: a token verified before is found by the SHA-256 of its
//!    text and only its `exp` is checked again (no signature, no parse);
//! 2. the header: a token whose `alg` is not EdDSA (`none`, HMAC: the
//!    "public key as HMAC secret" confusion) or whose `kid` is not one of
//!    ours is refused before any signature check;
//! 3. the signature, then the claims (`iss`, `aud`, `exp`, `nbf` with
//!    leeway). jsonwebtoken checks the signature only: the claims are
//!    checked here against the caller's `now`, so tests can drive time.
//!
//! What a token grants is checked elsewhere: its `scope` as a key's scopes,
//! and its source key (`kid` claim) for revocation, limits and usage.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use moka::sync::Cache;
use ring::signature::KeyPair as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::TokensConfig;

/// Whether a bearer value is a JWT rather than a key: three dot-separated
/// parts and not the key prefix (keys are refused as keys, not as tokens).
pub fn looks_like_jwt(value: &str, key_prefix: &str) -> bool {
    !value.starts_with(key_prefix) && value.bytes().filter(|b| *b == b'.').count() == 2
}

/// The claims of a keygate access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    /// The client ID of the key the token was issued for.
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// The ID of the API key the token was issued for: its record supplies
    /// revocation, limits, quota and usage.
    pub kid: String,
    /// Space-separated scopes (RFC 8693 §4.2), a subset of the key's.
    pub scope: String,
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    pub exp: u64,
    pub jti: String,
}

impl AccessClaims {
    /// The scopes as the route's scope check takes them.
    pub fn scopes(&self) -> Vec<String> {
        self.scope.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect()
    }
}

/// Why a token was refused. Each maps to 401 `invalid_token`; the variant
/// is for logs and tests and never names the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a JWT keygate accepts (malformed, or an algorithm other than EdDSA)")]
    Malformed,
    #[error("signed with a key this gateway does not know (kid)")]
    UnknownKid,
    #[error("bad signature")]
    Signature,
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
    #[error("expired")]
    Expired,
    #[error("not yet valid")]
    NotYetValid,
}

impl TokenError {
    /// For the log line (a `&'static str`, as key refusals give).
    pub fn reason(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownKid => "unknown kid",
            Self::Signature => "bad signature",
            Self::Issuer => "wrong issuer",
            Self::Audience => "wrong audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not yet valid",
        }
    }
}

/// Why a requested scope cannot be granted (RFC 6749 `invalid_scope`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scope `{0}` is not granted to this key")]
pub struct ScopeNotGranted(pub String);

/// The scopes an access token may carry: all of the key's when none are
/// asked for, otherwise those asked for, each of which the key must hold
/// (`read-write` holds `read` and `write`). Never wider than the key.
pub fn narrow_scopes(granted: &[String], requested: Option<&str>) -> Result<Vec<String>, ScopeNotGranted> {
    let Some(requested) = requested.map(str::trim).filter(|r| !r.is_empty()) else {
        return Ok(granted.to_vec());
    };
    let holds = |wanted: &str| {
        granted.iter().any(|g| {
            g == wanted
                || (g == crate::scope::READ_WRITE
                    && (wanted == crate::scope::READ || wanted == crate::scope::WRITE))
        })
    };
    let mut scopes: Vec<String> = Vec::new();
    for wanted in requested.split(' ').filter(|s| !s.is_empty()) {
        if !holds(wanted) {
            return Err(ScopeNotGranted(wanted.to_owned()));
        }
        if !scopes.iter().any(|s| s == wanted) {
            scopes.push(wanted.to_owned());
        }
    }
    Ok(scopes)
}

// === impl TokenKeys ===

/// A signing key: the private half signs, the public half verifies and is
/// published in the JWKS.
struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// The raw 32-byte public key, for the JWKS `x`.
    public: Vec<u8>,
}

/// Why the signing key could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KeySetupError {
    #[error("{0}")]
    File(String),
    #[error("cannot generate an Ed25519 key")]
    Generate,
}

/// The keys access tokens are signed and verified with, and the claims
/// policy of `[tokens]`.
pub struct TokenKeys {
    current: SigningKey,
    issuer: String,
    audience: Option<String>,
    access_ttl: Duration,
    leeway: u64,
    /// Signature only: the claims are checked in [`TokenKeys::check_claims`].
    validation: Validation,
}

impl std::fmt::Debug for TokenKeys {
    // The private key stays out of every log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys").field("kid", &self.current.kid).field("issuer", &self.issuer).finish()
    }
}

impl TokenKeys {
    /// The keys `[tokens]` names: its `signing_key` file, or a key
    /// generated now (valid for this process only).
    pub fn load(config: &TokensConfig) -> Result<Self, KeySetupError> {
        let pkcs8 = match &config.signing_key {
            Some(path) => crate::pem::ed25519_key(path).map_err(KeySetupError::File)?,
            None => generate_pkcs8()?,
        };
        Self::from_pkcs8(&pkcs8, config)
    }

    /// The keys from an Ed25519 PKCS#8 document.
    pub fn from_pkcs8(pkcs8: &[u8], config: &TokensConfig) -> Result<Self, KeySetupError> {
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|_| KeySetupError::File("not an Ed25519 PKCS#8 key".to_owned()))?;
        let public = pair.public_key().as_ref().to_vec();
        // 16 bytes of the public key's hash: stable for a key, new for a
        // rotated one, and says nothing a published key does not.
        let kid = URL_SAFE_NO_PAD.encode(&Sha256::digest(&public)[..16]);
        let current = SigningKey {
            kid,
            encoding: EncodingKey::from_ed_der(pkcs8),
            decoding: DecodingKey::from_ed_der(&public),
            public,
        };
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        Ok(Self {
            current,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            access_ttl: config.access_ttl,
            leeway: config.leeway.as_secs(),
            validation,
        })
    }

    /// The `kid` of the key new tokens are signed with.
    pub fn kid(&self) -> &str {
        &self.current.kid
    }

    /// The `iss` of the tokens these keys sign (`[tokens] issuer`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// How long an access token lives.
    pub fn access_ttl(&self) -> Duration {
        self.access_ttl
    }

    /// Signs an access token for key `key_id` of `client` with `scopes`,
    /// issued at `now` (Unix seconds).
    pub fn issue(&self, client: &str, key_id: &str, scopes: &[String], now: u64) -> (String, AccessClaims) {
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            sub: client.to_owned(),
            aud: self.audience.clone(),
            kid: key_id.to_owned(),
            scope: scopes.join(" "),
            iat: now,
            nbf: None,
            exp: now + self.access_ttl.as_secs(),
            jti: random_id(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.current.kid.clone());
        // Signing with a key ring accepted cannot fail, and the claims are
        // plain strings and numbers; an empty token (refused everywhere)
        // is the answer if it ever did.
        let token = jsonwebtoken::encode(&header, &claims, &self.current.encoding).unwrap_or_default();
        (token, claims)
    }

    /// The JWKS document (RFC 7517) of the public keys, for
    /// `GET /.well-known/jwks.json`.
    pub fn jwks(&self) -> serde_json::Value {
        let key = &self.current;
        serde_json::json!({ "keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(&key.public),
            "kid": key.kid,
            "alg": "EdDSA",
            "use": "sig",
        }]})
    }

    /// Steps 2 and 3 of the module doc: header, signature, claims.
    fn verify_uncached(&self, token: &str, now: u64) -> Result<AccessClaims, TokenError> {
        // `decode_header` refuses `alg: none` (jsonwebtoken has no such
        // algorithm); anything but EdDSA is refused here, before a key is
        // chosen, so an HMAC token is never checked against a public key.
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Malformed);
        }
        let key = match header.kid.as_deref() {
            Some(kid) if kid == self.current.kid => &self.current,
            _ => return Err(TokenError::UnknownKid),
        };
        let data = jsonwebtoken::decode::<AccessClaims>(token, &key.decoding, &self.validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::Signature,
                _ => TokenError::Malformed,
            },
        )?;
        self.check_claims(&data.claims, now)?;
        Ok(data.claims)
    }

    fn check_claims(&self, claims: &AccessClaims, now: u64) -> Result<(), TokenError> {
        if claims.iss != self.issuer {
            return Err(TokenError::Issuer);
        }
        if claims.aud != self.audience {
            return Err(TokenError::Audience);
        }
        if claims.nbf.is_some_and(|nbf| nbf > now + self.leeway) {
            return Err(TokenError::NotYetValid);
        }
        check_exp(claims, now, self.leeway)
    }
}

fn check_exp(claims: &AccessClaims, now: u64, leeway: u64) -> Result<(), TokenError> {
    if claims.exp + leeway <= now { Err(TokenError::Expired) } else { Ok(()) }
}

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn generate_pkcs8() -> Result<Vec<u8>, KeySetupError> {
    let rng = ring::rand::SystemRandom::new();
    ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map(|doc| doc.as_ref().to_vec())
        .map_err(|_| KeySetupError::Generate)
}

/// A 128-bit random `jti`, hex.
fn random_id() -> String {
    let mut bytes = [0u8; 16];
    // The OS random source failing leaves zeros: `jti` is an identifier
    // for logs and replay lists, not a secret.
    let _ = getrandom::fill(&mut bytes);
    hex::encode(bytes)
}

// === impl TokenVerifier ===

/// Verifies access tokens, caching the verified ones (step 1 of the
/// module doc).
pub struct TokenVerifier {
    keys: Arc<TokenKeys>,
    /// Verified claims by SHA-256 of the token text. Bounded by
    /// `[tokens] cache_capacity`; an entry outlives no token (time to live
    /// of `access_ttl` plus leeway, and `exp` is checked on every hit).
    cache: Cache<[u8; 32], Arc<AccessClaims>>,
}

impl TokenVerifier {
    pub fn new(keys: Arc<TokenKeys>, capacity: u64) -> Self {
        let ttl = keys.access_ttl + Duration::from_secs(keys.leeway);
        let cache =
            Cache::builder().max_capacity(capacity).time_to_live(ttl).support_invalidation_closures().build();
        Self { keys, cache }
    }

    /// The verifier `[tokens]` asks for; `None` when tokens are off, or
    /// (logged) if the signing key cannot be set up, which validation has
    /// ruled out for a key file.
    pub fn for_config(config: &TokensConfig) -> Option<Self> {
        if !config.enabled {
            return None;
        }
        match TokenKeys::load(config) {
            Ok(keys) => Some(Self::new(Arc::new(keys), config.cache_capacity)),
            Err(error) => {
                tracing::error!(%error, "access tokens are off: no signing key");
                None
            }
        }
    }

    pub fn keys(&self) -> &Arc<TokenKeys> {
        &self.keys
    }

    /// Whether `token` was verified before and is still cached (whatever
    /// its `exp`); no signature check.
    pub fn is_cached(&self, token: &str) -> bool {
        self.cache.contains_key(&token_hash(token))
    }

    /// The claims of `token` if it is valid at `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<Arc<AccessClaims>, TokenError> {
        let hash = token_hash(token);
        if let Some(claims) = self.cache.get(&hash) {
            check_exp(&claims, now, self.keys.leeway)?;
            return Ok(claims);
        }
        let claims = Arc::new(self.keys.verify_uncached(token, now)?);
        self.cache.insert(hash, claims.clone());
        Ok(claims)
    }

    /// Drops the cached tokens of key `key_id` (revoked or rotated).
    pub fn forget_key(&self, key_id: &str) {
        let key_id = key_id.to_owned();
        // Only fails without `support_invalidation_closures`, set in `new`.
        let _ = self.cache.invalidate_entries_if(move |_, claims| claims.kid == key_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn config() -> TokensConfig {
        TokensConfig { enabled: true, audience: Some("api".to_owned()), ..TokensConfig::default() }
    }

    fn verifier() -> TokenVerifier {
        TokenVerifier::new(Arc::new(TokenKeys::load(&config()).expect("a generated key")), 100)
    }

    fn scopes(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    /// Rewrites a token's payload (keeping header and signature).
    fn with_payload(token: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let parts: Vec<&str> = token.split('.').collect();
        let mut payload: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("base64")).expect("json");
        edit(&mut payload);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&payload).expect("json"));
        format!("{}.{payload}.{}", parts[0], parts[2])
    }

    fn with_header(token: &str, header: serde_json::Value) -> String {
        let parts: Vec<&str> = token.split('.').collect();
        let header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).expect("json"));
        format!("{header}.{}.{}", parts[1], parts[2])
    }

    #[test]
    fn an_issued_token_verifies_with_its_claims() {
        let v = verifier();
        let (token, issued) = v.keys().issue("acme", "k1", &scopes(&["read", "orders:write"]), NOW);
        let claims = v.verify(&token, NOW + 1).expect("valid");
        assert_eq!(*claims, issued);
        assert_eq!(claims.sub, "acme");
        assert_eq!(claims.kid, "k1");
        assert_eq!(claims.exp, NOW + 15 * 60);
        assert_eq!(claims.scopes(), scopes(&["read", "orders:write"]));
        assert_eq!(claims.aud.as_deref(), Some("api"));
    }

    #[test]
    fn expiry_holds_for_cached_tokens_too_with_leeway() {
        let v = verifier();
        let (token, claims) = v.keys().issue("acme", "k1", &scopes(&["read"]), NOW);
        assert!(v.verify(&token, NOW).is_ok(), "fills the cache");
        assert!(v.verify(&token, claims.exp + 29).is_ok(), "within the 30 s leeway");
        assert_eq!(v.verify(&token, claims.exp + 30).unwrap_err(), TokenError::Expired);
        // Never seen before, and expired: refused on the uncached path too.
        let fresh = verifier();
        let (token, claims) = fresh.keys().issue("acme", "k1", &scopes(&["read"]), NOW);
        assert_eq!(fresh.verify(&token, claims.exp + 30).unwrap_err(), TokenError::Expired);
    }

    #[test]
    fn a_tampered_payload_fails_the_signature() {
        let v = verifier();
        let (token, _) = v.keys().issue("acme", "k1", &scopes(&["read"]), NOW);
        let widened = with_payload(&token, |p| p["scope"] = "read write admin".into());
        assert_eq!(v.verify(&widened, NOW).unwrap_err(), TokenError::Signature);
    }

    #[test]
    fn alg_none_and_hmac_are_refused_before_any_key_is_used() {
        let v = verifier();
        let (token, _) = v.keys().issue("acme", "k1", &scopes(&["read"]), NOW);
        let kid = v.keys().kid().to_owned();
        let none = with_header(&token, serde_json::json!({"alg": "none", "kid": kid}));
        let unsigned = format!("{}.", none.rsplit_once('.').expect("three parts").0);
        assert_eq!(v.verify(&unsigned, NOW).unwrap_err(), TokenError::Malformed);
        assert_eq!(v.verify(&none, NOW).unwrap_err(), TokenError::Malformed);

        // HS256 keyed with the published public key: the classic confusion.
        let public =
            URL_SAFE_NO_PAD.decode(v.keys().jwks()["keys"][0]["x"].as_str().expect("x")).expect("b64");
        let claims: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD.decode(token.split('.').nth(1).expect("payload")).expect("b64"),
        )
        .expect("json");
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid);
        let hmac = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&public)).expect("signs");
        assert_eq!(v.verify(&hmac, NOW).unwrap_err(), TokenError::Malformed);
    }

    #[test]
    fn another_gateways_key_is_an_unknown_kid_and_no_signature_is_checked() {
        let ours = verifier();
        let theirs = verifier();
        let (token, _) = theirs.keys().issue("acme", "k1", &scopes(&["read"]), NOW);
        assert_eq!(ours.verify(&token, NOW).unwrap_err(), TokenError::UnknownKid);
        // Our kid on their signature: checked, and refused.
        let forged = with_header(&token, serde_json::json!({"alg": "EdDSA", "kid": ours.keys().kid()}));
        assert_eq!(ours.verify(&forged, NOW).unwrap_err(), TokenError::Signature);
    }

    #[test]
    fn wrong_issuer_or_audience_is_refused() {
        let pkcs8 = generate_pkcs8().expect("key");
        let signer =
            TokenKeys::from_pkcs8(&pkcs8, &TokensConfig { issuer: "elsewhere".to_owned(), ..config() })
                .expect("keys");
        let (foreign_iss, _) = signer.issue("acme", "k1", &scopes(&["read"]), NOW);
        let other_aud =
            TokenKeys::from_pkcs8(&pkcs8, &TokensConfig { audience: Some("other".to_owned()), ..config() })
                .expect("keys");
        let (foreign_aud, _) = other_aud.issue("acme", "k1", &scopes(&["read"]), NOW);

        let ours = TokenVerifier::new(Arc::new(TokenKeys::from_pkcs8(&pkcs8, &config()).expect("keys")), 10);
        assert_eq!(ours.verify(&foreign_iss, NOW).unwrap_err(), TokenError::Issuer);
        assert_eq!(ours.verify(&foreign_aud, NOW).unwrap_err(), TokenError::Audience);
    }

    #[test]
    fn a_revoked_keys_cached_tokens_are_dropped() {
        let v = verifier();
        let (token, _) = v.keys().issue("acme", "k1", &scopes(&["read"]), NOW);
        let (other, _) = v.keys().issue("acme", "k2", &scopes(&["read"]), NOW);
        v.verify(&token, NOW).expect("valid");
        v.verify(&other, NOW).expect("valid");
        v.forget_key("k1");
        v.cache.run_pending_tasks();
        let hash = |t: &str| -> [u8; 32] { Sha256::digest(t.as_bytes()).into() };
        assert!(!v.cache.contains_key(&hash(&token)));
        assert!(v.cache.contains_key(&hash(&other)));
    }

    #[test]
    fn jwks_publishes_the_signing_key_under_its_kid() {
        let v = verifier();
        let jwks = v.keys().jwks();
        let key = &jwks["keys"][0];
        assert_eq!(key["kid"], v.keys().kid());
        assert_eq!((key["kty"].as_str(), key["crv"].as_str()), (Some("OKP"), Some("Ed25519")));
        // The published key verifies a token: what an upstream would do.
        let (token, _) = v.keys().issue("acme", "k1", &scopes(&["read"]), NOW);
        let decoding = DecodingKey::from_ed_components(key["x"].as_str().expect("x")).expect("key");
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.validate_exp = false;
        validation.set_audience(&["api"]);
        assert!(jsonwebtoken::decode::<AccessClaims>(&token, &decoding, &validation).is_ok());
    }

    #[test]
    fn scopes_narrow_and_never_widen() {
        let key = scopes(&["read-write", "orders:read"]);
        assert_eq!(narrow_scopes(&key, None), Ok(key.clone()));
        assert_eq!(narrow_scopes(&key, Some("  ")), Ok(key.clone()));
        assert_eq!(narrow_scopes(&key, Some("read orders:read read")), Ok(scopes(&["read", "orders:read"])));
        assert_eq!(narrow_scopes(&key, Some("write")), Ok(scopes(&["write"])));
        assert_eq!(narrow_scopes(&key, Some("read admin")), Err(ScopeNotGranted("admin".to_owned())));
        assert_eq!(
            narrow_scopes(&scopes(&["read"]), Some("read-write")),
            Err(ScopeNotGranted("read-write".to_owned()))
        );
    }
}
