//! Refresh tokens (RFC 6749 §6): what they look like, what is stored for
//! them, and the store interface both key stores implement.
//!
//! A refresh token is opaque to its holder: `kgr_<client>.<secret>`, the
//! secret 256 random bits from the OS CSPRNG as 43 base64url characters.
//! The client ID in it is not secret (as in a key string); it is there so a
//! store finds the token's records under the client's hash tag, one Redis
//! Cluster slot, without an index. Only the SHA-256 of the whole token is
//! stored ([`TokenHash`]), beside a [`RefreshRecord`]: the key it came from
//! (ID and secret hash, so a key replaced under the same ID does not
//! inherit it), its scope, its family and its state.
//!
//! Rotation (RFC 9700 §4.14.2): every use retires the token and issues its
//! successor in the same family, atomically ([`RefreshStore::rotate`]), so
//! of two concurrent uses exactly one wins. A retired token presented again
//! means two parties hold it: the whole family is revoked. The rules of the
//! grant itself (key checks, scope narrowing) are in `grant.rs`; the
//! browser cookie in `cookie.rs`; storage in `redis.rs` and `file.rs`.

pub mod cookie;
pub mod file;
pub mod grant;
pub mod redis;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::key::{KeyId, SecretHash};
use crate::store::StoreError;

/// What every refresh token starts with (secret scanners can match it).
pub const TOKEN_PREFIX: &str = "kgr_";
/// 32 random bytes, base64url without padding.
const SECRET_LEN: usize = 43;

/// A refresh token in clear. Shown once, in the token response (or its
/// cookie); `Debug` redacts it.
#[derive(Clone, PartialEq, Eq)]
pub struct RefreshToken(String);

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RefreshToken(<redacted>)")
    }
}

/// Why a refresh token could not be made.
#[derive(Debug, thiserror::Error)]
#[error("the OS random source is unavailable")]
pub struct RandomUnavailable;

impl RefreshToken {
    /// A new token for `client` (a valid client ID: it comes from a key).
    pub fn generate(client: &str) -> Result<Self, RandomUnavailable> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|_| RandomUnavailable)?;
        Ok(Self(format!("{TOKEN_PREFIX}{client}.{}", URL_SAFE_NO_PAD.encode(secret))))
    }

    /// A presented token, if it has the shape of one; no store is asked
    /// about anything else. Total on any input.
    pub fn parse(text: &str) -> Option<Self> {
        let (client, secret) = text.strip_prefix(TOKEN_PREFIX)?.split_once('.')?;
        crate::key::validate_client_id(client).ok()?;
        let base64url = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
        (secret.len() == SECRET_LEN && secret.bytes().all(base64url)).then(|| Self(text.to_owned()))
    }

    /// The client whose key the token came from.
    pub fn client(&self) -> &str {
        // Parsed or generated with the prefix and a `.`.
        self.0[TOKEN_PREFIX.len()..].split_once('.').map_or("", |(client, _)| client)
    }

    /// What stores find the token by.
    pub fn hash(&self) -> TokenHash {
        TokenHash(Sha256::digest(self.0.as_bytes()).into())
    }

    /// The clear token, for the one answer that hands it out.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// SHA-256 of a refresh token; lowercase hex in stores.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({}…)", &self.to_hex()[..12])
    }
}

/// Where a refresh token is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshState {
    /// May be used, once.
    Active,
    /// Was used (its successor exists): presenting it again is theft.
    Used,
    /// Its family was revoked (theft, or its key was revoked or rotated).
    Revoked,
}

impl RefreshState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Used => "used",
            Self::Revoked => "revoked",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(Self::Active),
            "used" => Some(Self::Used),
            "revoked" => Some(Self::Revoked),
            _ => None,
        }
    }
}

/// What a store keeps for one refresh token (found by its [`TokenHash`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRecord {
    /// The API key the token's family was granted to.
    pub key_id: KeyId,
    /// That key's secret hash when the family was granted: a different key
    /// under the same ID (a record rewritten by hand) is not this one.
    pub key_hash: SecretHash,
    /// Space-separated scopes, the key's or fewer.
    pub scope: String,
    /// Every token descended from one `client_credentials` grant shares it.
    pub family: String,
    pub state: RefreshState,
    /// Unix seconds; the token is refused from then on.
    pub expires_at: u64,
}

impl RefreshRecord {
    /// The client the token belongs to (its key's).
    pub fn client(&self) -> &str {
        self.key_id.client()
    }
}

/// What [`RefreshStore::rotate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// The token was active: it is now used and its successor stored.
    Rotated,
    /// The token was already used: its whole family is revoked now.
    Reused,
    /// No such token, expired, or its family revoked: nothing changed.
    Gone,
}

/// Where refresh tokens live: beside the keys, in the store's Redis or the
/// file store's folder. Every call concerns one client (one slot, one file).
#[async_trait]
pub trait RefreshStore: Send + Sync + 'static {
    /// Stores the first token of a new family.
    async fn insert(&self, hash: &TokenHash, record: &RefreshRecord) -> Result<(), StoreError>;

    /// The record of `client`'s token `hash`, unless it is unknown or
    /// expired at `now` (Unix seconds).
    async fn get(
        &self,
        client: &str,
        hash: &TokenHash,
        now: u64,
    ) -> Result<Option<RefreshRecord>, StoreError>;

    /// Atomically: if `old` is active, marks it used and stores `new` with
    /// `record` in the same family ([`Rotation::Rotated`]); if it was used
    /// already, revokes its family ([`Rotation::Reused`]). The family of
    /// `record` is ignored: the successor joins `old`'s.
    async fn rotate(
        &self,
        client: &str,
        old: &TokenHash,
        new: &TokenHash,
        record: &RefreshRecord,
        now: u64,
    ) -> Result<Rotation, StoreError>;

    /// Revokes every token of `client`'s `family`.
    async fn revoke_family(&self, client: &str, family: &str) -> Result<(), StoreError>;
}

/// A refresh store shared by the gateway's tasks.
pub type SharedRefreshStore = Arc<dyn RefreshStore>;

/// The refresh store beside a key store: its Redis if it has one, else the
/// file store's folder that `config` names; `None` otherwise (no place
/// that every gateway sharing the keys would see).
pub fn for_store(
    store: &dyn crate::store::KeyStore,
    config: &crate::config::StoreConfig,
) -> Option<SharedRefreshStore> {
    match (store.redis(), config) {
        (Some(handle), _) => Some(Arc::new(redis::RedisRefreshStore::new(handle.conn, &handle.prefix))),
        (None, crate::config::StoreConfig::File { dir }) => Some(Arc::new(file::FileRefreshStore::new(dir))),
        (None, crate::config::StoreConfig::Redis { .. }) => None,
    }
}

/// A new family's ID: 128 random bits, hex (not a secret).
pub fn new_family() -> Result<String, RandomUnavailable> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|_| RandomUnavailable)?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_parses_and_names_its_client() {
        let token = RefreshToken::generate("acme-1").expect("random");
        let text = token.expose();
        assert!(text.starts_with("kgr_acme-1."), "{text}");
        assert_eq!(text.len(), "kgr_acme-1.".len() + SECRET_LEN);
        let parsed = RefreshToken::parse(text).expect("parses");
        assert_eq!(parsed.client(), "acme-1");
        assert_eq!(parsed.hash(), token.hash());
        assert_ne!(RefreshToken::generate("acme-1").expect("random").hash(), token.hash());
        assert!(!format!("{token:?}").contains(text));
    }

    #[test]
    fn anything_else_is_not_a_token() {
        let good = RefreshToken::generate("acme").expect("random");
        let secret = good.expose().split_once('.').expect("dot").1;
        for bad in [
            String::new(),
            "kgr_".to_owned(),
            format!("kgr_acme{secret}"),
            format!("kgr_ac.me.{secret}"),
            format!("kgr_acme.{}", &secret[1..]),
            format!("kgr_acme.{secret}x"),
            format!("kgr_acme.{}=", &secret[1..]),
            format!("kg_acme.{secret}"),
            format!("kgr_{}.{secret}", "a".repeat(65)),
        ] {
            assert_eq!(RefreshToken::parse(&bad), None, "{bad}");
        }
    }

    #[test]
    fn states_round_trip() {
        for state in [RefreshState::Active, RefreshState::Used, RefreshState::Revoked] {
            assert_eq!(RefreshState::parse(state.as_str()), Some(state));
        }
        assert_eq!(RefreshState::parse("ACTIVE"), None);
    }
}
