//! The ring of keys access tokens are signed with, kept in the store so
//! every gateway sharing the keys signs and verifies with the same ones,
//! and rotated without refusing a single valid token.
//!
//! Without `[tokens] signing_key` (a file the operator manages), the first
//! gateway to start generates an Ed25519 key and stores it with a
//! create-if-absent write ([`RingStore::create`]): gateways starting at once
//! all end up with the winner's key. Each gateway then re-reads the ring
//! every `[tokens] key_refresh`.
//!
//! Rotation ([`Ring::rotated`], `keygate tokens rotate-key`) adds a key that
//! signs only from `signs_from`, a publish delay ahead, written with a
//! compare-and-set on the ring's `version` ([`RingStore::replace`]) so two
//! rotations never lose one another. By the time the new key signs, every
//! gateway (which re-reads within `key_refresh`) and every upstream caching
//! the JWKS (`max-age` is `key_refresh`) has seen it, so no token is ever
//! signed by a key some verifier does not know yet. Which key signs, and
//! which ones verify, is decided by time alone:
//!
//! - the signer at `now` is the newest key whose `signs_from` has come;
//! - a key stops signing (retires) when the next one starts, and is still
//!   accepted for `grace` after that (the access-token lifetime plus the
//!   leeway: the last token it signed has expired by then);
//! - a key retired for longer is neither accepted nor published, and the
//!   next rotation drops it from the ring.
//!
//! The ring holds private keys: whoever can read the store's Redis (or the
//! key folder) can mint tokens, as whoever can write it can mint keys.
//! Layout: docs/redis-schema.md, "Signing keys"; storage in `redis.rs` and
//! `file.rs`.

pub mod file;
pub mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::store::StoreError;

/// One key of the ring. `Debug` leaves the private key out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingKey {
    /// The JWT `kid` (derived from the public key, see `auth::jwt`).
    pub kid: String,
    /// Always `EdDSA` for now; stored so another algorithm can join.
    pub alg: String,
    /// The Ed25519 private key, PKCS#8 DER in standard base64.
    pub pkcs8: String,
    /// When the key was made (Unix seconds).
    pub created: u64,
    /// From when it signs (Unix seconds); published and accepted before.
    pub signs_from: u64,
}

impl fmt::Debug for RingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingKey")
            .field("kid", &self.kid)
            .field("created", &self.created)
            .field("signs_from", &self.signs_from)
            .finish_non_exhaustive()
    }
}

impl RingKey {
    /// The key's PKCS#8 document.
    pub fn pkcs8_der(&self) -> Result<Vec<u8>, RingError> {
        STANDARD.decode(&self.pkcs8).map_err(|_| RingError::Corrupt(format!("key {}: bad `pkcs8`", self.kid)))
    }
}

/// Where a key is in its life at some moment ([`Ring::state_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Published and accepted; signs from `signs_from`.
    Next,
    /// Signs new tokens.
    Signing,
    /// No longer signs; accepted until the given Unix second.
    Retired { accepted_until: u64 },
    /// Retired for longer than the grace: ignored, dropped at the next rotation.
    Expired,
}

impl KeyState {
    /// Whether tokens signed by the key are accepted (and it is published).
    pub fn is_accepted(self) -> bool {
        !matches!(self, Self::Expired)
    }
}

/// The signing keys, oldest first (by `signs_from`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ring {
    /// Bumped by every write: the compare-and-set of [`RingStore::replace`].
    pub version: u64,
    pub keys: Vec<RingKey>,
}

/// Why a ring could not be read, made or changed.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("the signing key ring is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot generate an Ed25519 key")]
    Generate,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no signing key ring in the store yet (no gateway with tokens enabled has started)")]
    Missing,
    #[error("the ring changed while rotating {0} times in a row; try again")]
    Contended(u32),
}

impl Ring {
    /// A ring of one new key, signing from `now`.
    pub fn generate(now: u64) -> Result<Self, RingError> {
        Ok(Self { version: 1, keys: vec![new_key(now, now)?] })
    }

    /// A ring of the one key in `pkcs8` (a `[tokens] signing_key` file),
    /// signing since ever.
    pub fn of_file_key(pkcs8: &[u8]) -> Result<Self, RingError> {
        Ok(Self { version: 1, keys: vec![ring_key(pkcs8, 0, 0)?] })
    }

    pub fn from_json(text: &str) -> Result<Self, RingError> {
        let mut ring: Self = serde_json::from_str(text).map_err(|e| RingError::Corrupt(e.to_string()))?;
        if ring.keys.is_empty() {
            return Err(RingError::Corrupt("it holds no key".to_owned()));
        }
        ring.keys.sort_by_key(|key| key.signs_from);
        Ok(ring)
    }

    pub fn to_json(&self) -> String {
        // Plain strings and numbers: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The index of the key that signs at `now`: the newest whose
    /// `signs_from` has come (the oldest if none has, which only a clock
    /// far behind the rotating one sees).
    fn signer_index(&self, now: u64) -> usize {
        self.keys.iter().rposition(|key| key.signs_from <= now).unwrap_or(0)
    }

    /// The key that signs at `now`.
    pub fn signer(&self, now: u64) -> &RingKey {
        &self.keys[self.signer_index(now)]
    }

    /// The state of `keys[index]` at `now`, a retired key being accepted
    /// for `grace` after its successor started signing.
    pub fn state_of(&self, index: usize, now: u64, grace: Duration) -> KeyState {
        let signer = self.signer_index(now);
        if index > signer {
            return KeyState::Next;
        }
        if index == signer {
            return KeyState::Signing;
        }
        let retired_at = self.keys[index + 1].signs_from;
        let accepted_until = retired_at.saturating_add(grace.as_secs());
        if now < accepted_until { KeyState::Retired { accepted_until } } else { KeyState::Expired }
    }

    /// The ring with a new key signing from `now + publish_delay`, and
    /// without the keys expired by then; its version bumped.
    pub fn rotated(&self, now: u64, publish_delay: Duration, grace: Duration) -> Result<Self, RingError> {
        let signs_from = now.saturating_add(publish_delay.as_secs());
        let mut keys: Vec<RingKey> = (0..self.keys.len())
            .filter(|&i| self.state_of(i, now, grace).is_accepted())
            .map(|i| self.keys[i].clone())
            .collect();
        // A key already waiting to sign later than the new one would sign
        // after it and retire it at once: the new one replaces it instead.
        keys.retain(|key| key.signs_from < signs_from || key.signs_from <= now);
        keys.push(new_key(now, signs_from)?);
        Ok(Self { version: self.version + 1, keys })
    }
}

fn new_key(now: u64, signs_from: u64) -> Result<RingKey, RingError> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| RingError::Generate)?;
    ring_key(pkcs8.as_ref(), now, signs_from)
}

fn ring_key(pkcs8: &[u8], created: u64, signs_from: u64) -> Result<RingKey, RingError> {
    let kid = crate::auth::jwt::kid_of_pkcs8(pkcs8)
        .ok_or_else(|| RingError::Corrupt("not an Ed25519 PKCS#8 key".to_owned()))?;
    Ok(RingKey { kid, alg: "EdDSA".to_owned(), pkcs8: STANDARD.encode(pkcs8), created, signs_from })
}

/// Where the ring lives: beside the keys, in the store's Redis or the file
/// store's folder.
#[async_trait]
pub trait RingStore: Send + Sync + 'static {
    /// The stored ring, if there is one.
    async fn load(&self) -> Result<Option<Ring>, RingError>;

    /// Stores `ring` unless a ring is stored already; either way answers
    /// the ring now stored (`ring`, or the one that was there first).
    async fn create(&self, ring: &Ring) -> Result<Ring, RingError>;

    /// Replaces the stored ring with `next` if the stored one's version is
    /// still `expected`; `false` (nothing written) otherwise.
    async fn replace(&self, expected: u64, next: &Ring) -> Result<bool, RingError>;
}

pub type SharedRingStore = Arc<dyn RingStore>;

/// The ring store beside a key store (as `refresh::for_store`): its Redis,
/// or the file store's folder.
pub fn for_store(
    store: &dyn crate::store::KeyStore,
    config: &crate::config::StoreConfig,
) -> Option<SharedRingStore> {
    match (store.redis(), config) {
        (Some(handle), _) => Some(Arc::new(redis::RedisRingStore::new(handle.conn, &handle.prefix))),
        (None, crate::config::StoreConfig::File { dir }) => Some(Arc::new(file::FileRingStore::new(dir))),
        (None, crate::config::StoreConfig::Redis { .. }) => None,
    }
}

/// The stored ring, generating and storing the first one if there is none.
pub async fn load_or_create(store: &dyn RingStore, now: u64) -> Result<Ring, RingError> {
    if let Some(ring) = store.load().await? {
        return Ok(ring);
    }
    store.create(&Ring::generate(now)?).await
}

/// Rotates the stored ring (see [`Ring::rotated`]), retrying the
/// compare-and-set when another writer got in between. Each failed attempt
/// means another rotation landed, and each lands once, so of `n` rotations
/// at once none fails more than `n - 1` times: eight attempts cover seven
/// operators rotating in the same instant. Answers the ring as written.
pub async fn rotate(
    store: &dyn RingStore,
    now: u64,
    publish_delay: Duration,
    grace: Duration,
) -> Result<Ring, RingError> {
    const ATTEMPTS: u32 = 8;
    for _ in 0..ATTEMPTS {
        let current = store.load().await?.ok_or(RingError::Missing)?;
        let next = current.rotated(now, publish_delay, grace)?;
        if store.replace(current.version, &next).await? {
            return Ok(next);
        }
    }
    Err(RingError::Contended(ATTEMPTS))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const GRACE: Duration = Duration::from_secs(15 * 60 + 30);
    const DELAY: Duration = Duration::from_secs(120);

    #[test]
    fn a_new_ring_signs_with_its_only_key_from_now() {
        let ring = Ring::generate(NOW).expect("ring");
        assert_eq!(ring.keys.len(), 1);
        assert_eq!(ring.signer(NOW).kid, ring.keys[0].kid);
        assert_eq!(ring.state_of(0, NOW, GRACE), KeyState::Signing);
        let der = ring.keys[0].pkcs8_der().expect("der");
        assert_eq!(crate::auth::jwt::kid_of_pkcs8(&der).as_deref(), Some(ring.keys[0].kid.as_str()));
    }

    #[test]
    fn a_rotation_publishes_first_then_signs_then_retires_the_old_key_after_the_grace() {
        let ring = Ring::generate(NOW).expect("ring");
        let rotated = ring.rotated(NOW + 10, DELAY, GRACE).expect("rotated");
        assert_eq!(rotated.version, ring.version + 1);
        let (old, new) = (&rotated.keys[0], &rotated.keys[1]);
        assert_eq!(old, &ring.keys[0]);
        assert_eq!(new.signs_from, NOW + 10 + 120);

        // Published, not signing, until its time.
        assert_eq!(rotated.state_of(1, NOW + 129, GRACE), KeyState::Next);
        assert_eq!(rotated.signer(NOW + 129).kid, old.kid);
        // Then it signs, and the old key is accepted for the grace.
        assert_eq!(rotated.signer(NOW + 130).kid, new.kid);
        let until = NOW + 130 + GRACE.as_secs();
        assert_eq!(rotated.state_of(0, NOW + 130, GRACE), KeyState::Retired { accepted_until: until });
        assert_eq!(rotated.state_of(0, until - 1, GRACE), KeyState::Retired { accepted_until: until });
        assert_eq!(rotated.state_of(0, until, GRACE), KeyState::Expired);

        // The next rotation after that drops it.
        let again = rotated.rotated(until, DELAY, GRACE).expect("rotated");
        assert_eq!(again.keys.iter().map(|k| &k.kid).collect::<Vec<_>>(), [&new.kid, &again.keys[1].kid]);
    }

    #[test]
    fn rotating_twice_within_the_delay_replaces_the_waiting_key() {
        let ring = Ring::generate(NOW).expect("ring");
        let once = ring.rotated(NOW, DELAY, GRACE).expect("rotated");
        let twice = once.rotated(NOW + 1, Duration::ZERO, GRACE).expect("rotated");
        // The waiting key would have signed after the newer one and retired
        // it on the spot: it is gone, the newest signs now.
        assert_eq!(twice.keys.len(), 2);
        assert_eq!(twice.keys[0].kid, ring.keys[0].kid);
        assert_eq!(twice.signer(NOW + 1).kid, twice.keys[1].kid);
    }

    #[test]
    fn json_round_trips_sorts_and_refuses_garbage() {
        let ring = Ring::generate(NOW).expect("ring").rotated(NOW, DELAY, GRACE).expect("rotated");
        assert_eq!(Ring::from_json(&ring.to_json()).expect("parses"), ring);
        let mut reversed = ring.clone();
        reversed.keys.reverse();
        assert_eq!(Ring::from_json(&reversed.to_json()).expect("parses"), ring);
        for bad in ["", "{}", r#"{"version":1,"keys":[]}"#, r#"{"version":1,"keys":[],"x":1}"#] {
            assert!(matches!(Ring::from_json(bad), Err(RingError::Corrupt(_))), "{bad}");
        }
    }

    #[test]
    fn debug_leaves_the_private_key_out() {
        let ring = Ring::generate(NOW).expect("ring");
        let shown = format!("{ring:?}");
        assert!(shown.contains(&ring.keys[0].kid));
        assert!(!shown.contains(&ring.keys[0].pkcs8), "{shown}");
    }
}
