//! Key operations shared by the `keygate keys` CLI and the admin API.
//!
//! Each operation is one async function over a [`KeyStore`]: it validates its
//! input, reads and writes records, and returns a typed result or an
//! [`OpsError`]. Nothing here prints or knows about HTTP, so the CLI and the
//! admin API give the same answers to the same requests. The clear key exists
//! only in an [`Issued`] value, handed back once to be shown to the operator.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod clients;
pub mod view;

use std::str::FromStr;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::key::{self, KeyFormatError, KeyId, SecretString};
use crate::meta::{KeyMeta, KeyStatus, MetaChanges, MetaError};
use crate::store::{KeyRecord, KeyStore, Page, StoreError};

/// How many fresh kids `issue`/`rotate` try when the store says the ID is taken.
/// A kid is 8 base62 characters (47 bits) per client, so a second attempt is
/// already vanishingly rare; the bound only keeps a broken store from looping.
const ID_ATTEMPTS: usize = 3;

/// Why a key operation failed. Never carries a secret or a key string.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// No record has this ID.
    #[error("no key with id {0}")]
    NotFound(KeyId),
    /// A well-formed key string that the store does not know.
    #[error("no key in the store matches the given key")]
    UnknownKey,
    /// The operation needs a usable key, and this one is revoked or expired.
    #[error("key {id} is {why}; issue a new key instead")]
    NotUsable { id: KeyId, why: &'static str },
    /// No client record has this ID.
    #[error("no client record for {0}")]
    ClientNotFound(String),
    /// `clients create` for a client that has a record.
    #[error("client {0} already has a record; change it with `clients update`")]
    ClientExists(String),
    /// A new key for a revoked client.
    #[error("client {0} is revoked; it can have no new keys")]
    ClientRevoked(String),
    /// An input broke a rule; `field` names the flag or field (e.g. `client`, `rate`).
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error(transparent)]
    Store(StoreError),
}

impl OpsError {
    fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::Invalid { field: field.to_owned(), reason: reason.into() }
    }

    fn key_format(field: &str, err: KeyFormatError) -> Self {
        Self::invalid(field, err.to_string())
    }
}

impl From<MetaError> for OpsError {
    fn from(err: MetaError) -> Self {
        Self::Invalid { field: err.field, reason: format!("`{}`: {}", err.value, err.why) }
    }
}

impl From<StoreError> for OpsError {
    fn from(err: StoreError) -> Self {
        match err {
            // An update racing a delete surfaces as the store's NotFound; to the
            // operator that is the same "no such key" as a failed lookup.
            StoreError::NotFound(id) => Self::NotFound(id),
            StoreError::ClientNotFound(id) => Self::ClientNotFound(id),
            StoreError::ClientExists(id) => Self::ClientExists(id),
            other => Self::Store(other),
        }
    }
}

/// A newly created key: the clear key, to show once, and the stored record.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The full key string. Redacted in `Debug`; read with `.expose()`.
    pub key: SecretString,
    pub record: KeyRecord,
}

/// The result of a revoke.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// The record as now stored, with status `revoked`.
    pub record: KeyRecord,
    /// The key was already revoked before this call (the call still succeeded).
    pub already: bool,
}

/// Which key `revoke` should act on.
#[derive(Debug, Clone)]
pub enum RevokeTarget {
    /// A public ID, `CLIENT.KID`.
    Id(KeyId),
    /// A full key string, as leaked or as the operator has it at hand.
    Key(SecretString),
}

impl FromStr for RevokeTarget {
    type Err = std::convert::Infallible;
    /// A key ID always holds a `.`; a key string never does.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse::<KeyId>() {
            Ok(id) => Self::Id(id),
            Err(_) => Self::Key(SecretString::new(s.to_owned())),
        })
    }
}

// === Operations ===

/// Creates a key for `client` with default metadata and `changes` applied, stores
/// its record, and returns the clear key (the only time it exists).
pub async fn issue(
    store: &dyn KeyStore,
    prefix: &str,
    client: &str,
    changes: MetaChanges,
    now: Timestamp,
) -> Result<Issued, OpsError> {
    key::validate_client_id(client).map_err(|e| OpsError::key_format("client", e))?;
    check_changes(&changes, now)?;
    let mut meta = KeyMeta::new(now);
    changes.apply(&mut meta);
    check_meta(&meta)?;
    insert_new(store, prefix, client, meta).await
}

/// All records, or those of one client, sorted by ID.
pub async fn list(store: &dyn KeyStore, client: Option<&str>) -> Result<Vec<KeyRecord>, OpsError> {
    if let Some(client) = client {
        key::validate_client_id(client).map_err(|e| OpsError::key_format("client", e))?;
    }
    Ok(store.list(client).await?)
}

/// One page of [`list`]: at most `limit` records whose ID sorts after
/// `after`, in ID order (see [`KeyStore::list_page`]).
pub async fn list_page(
    store: &dyn KeyStore,
    client: Option<&str>,
    after: Option<&KeyId>,
    limit: usize,
) -> Result<Page<KeyRecord>, OpsError> {
    if let Some(client) = client {
        key::validate_client_id(client).map_err(|e| OpsError::key_format("client", e))?;
    }
    Ok(store.list_page(client, after, limit).await?)
}

/// The record with this ID.
pub async fn show(store: &dyn KeyStore, id: &KeyId) -> Result<KeyRecord, OpsError> {
    store.get(id).await?.ok_or_else(|| OpsError::NotFound(id.clone()))
}

/// Applies `changes` to an existing key's metadata and stores the result.
///
/// Status is not among the changes: revoking is [`revoke`], and a revoked key
/// is never brought back (issue a new one).
pub async fn update(
    store: &dyn KeyStore,
    id: &KeyId,
    changes: MetaChanges,
    now: Timestamp,
) -> Result<KeyRecord, OpsError> {
    check_changes(&changes, now)?;
    let mut record = show(store, id).await?;
    changes.apply(&mut record.meta);
    check_meta(&record.meta)?;
    store.update(&record).await?;
    Ok(record)
}

/// Marks a key revoked, found by ID or by its full key string.
///
/// Idempotent: revoking a revoked key succeeds with `already: true`. It still
/// writes the record, which re-announces the invalidation; an operator who
/// fears a gateway missed it can simply revoke again.
pub async fn revoke(store: &dyn KeyStore, target: &RevokeTarget, prefix: &str) -> Result<Revoked, OpsError> {
    let mut record = match target {
        RevokeTarget::Id(id) => show(store, id).await?,
        RevokeTarget::Key(key) => {
            let parsed = key::parse(key.expose(), prefix).map_err(|e| {
                OpsError::invalid("key", format!("neither a key id (CLIENT.KID) nor a well-formed key: {e}"))
            })?;
            let record = store.find_by_hash(parsed.client, &parsed.secret_hash()).await?;
            // The store matches by hash; the client in the key string must agree too.
            record.filter(|r| r.client() == parsed.client).ok_or(OpsError::UnknownKey)?
        }
    };
    let already = record.meta.status == KeyStatus::Revoked;
    record.meta.status = KeyStatus::Revoked;
    store.update(&record).await?;
    Ok(Revoked { record, already })
}

/// Replaces a key by a new one with the same metadata (new ID, new secret),
/// and lets the old key live on for exactly `grace` from `now`.
///
/// - The new key has no expiry unless `expires_at` asks for one: in
///   particular it never inherits the old key's expiry, which for a key
///   already in its grace period is that grace's end (issue 16, defect 1).
/// - The old key expires at `now + grace`, whatever its expiry was (a
///   second rotation of a key in its grace sets the grace asked for now),
///   and its `rotated_at` is set to `now`.
/// - The new key counts as the old one (`counts_as`, inherited along a
///   chain of rotations): both spend one quota, one rate and one credit
///   budget, so a rotation doubles nothing.
///
/// The new record is written first: if that fails nothing has changed, and if
/// the old record's update then fails the old key simply stays valid as before.
pub async fn rotate(
    store: &dyn KeyStore,
    id: &KeyId,
    grace: Duration,
    expires_at: Option<Timestamp>,
    prefix: &str,
    now: Timestamp,
) -> Result<Issued, OpsError> {
    // Stores keep whole seconds; so do the times written here.
    let now = crate::meta::whole_seconds(now);
    let expires_at = expires_at.map(crate::meta::whole_seconds);
    check_changes(&MetaChanges { expires_at: Some(expires_at), ..MetaChanges::default() }, now)?;
    let mut old = show(store, id).await?;
    if old.meta.status == KeyStatus::Revoked {
        return Err(OpsError::NotUsable { id: id.clone(), why: "revoked" });
    }
    if !old.meta.is_usable_at(now) {
        return Err(OpsError::NotUsable { id: id.clone(), why: "expired" });
    }
    let grace_end = SignedDuration::try_from(grace)
        .ok()
        .and_then(|g| now.checked_add(g).ok())
        .ok_or_else(|| OpsError::invalid("grace", "too long"))?;

    let new_meta = KeyMeta {
        created_at: now,
        rotated_at: None,
        expires_at,
        counts_as: Some(old.counts_as().clone()),
        ..old.meta.clone()
    };
    let issued = insert_new(store, prefix, old.client(), new_meta).await?;

    old.meta.expires_at = Some(grace_end);
    old.meta.rotated_at = Some(now);
    store.update(&old).await?;
    Ok(issued)
}

// === Helpers ===

/// Generates a key and inserts its record, retrying with a fresh ID if taken.
/// A revoked client gets no new key (issue and rotate both come here).
async fn insert_new(
    store: &dyn KeyStore,
    prefix: &str,
    client: &str,
    meta: KeyMeta,
) -> Result<Issued, OpsError> {
    clients::check_may_have_new_keys(store, client).await?;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let generated = key::generate(prefix, client).map_err(|e| match e {
            KeyFormatError::InvalidPrefix(_) => OpsError::key_format("prefix", e),
            _ => OpsError::key_format("client", e),
        })?;
        let record = KeyRecord { id: generated.id, secret_hash: generated.hash, meta: meta.clone() };
        match store.insert(&record).await {
            Ok(()) => return Ok(Issued { key: generated.key, record }),
            Err(StoreError::AlreadyExists(_)) if attempts < ID_ATTEMPTS => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Rules on the changes themselves: a new expiry must lie in the future
/// (ending a key now is what `revoke` is for), scopes must not be emptied.
fn check_changes(changes: &MetaChanges, now: Timestamp) -> Result<(), OpsError> {
    if let Some(Some(at)) = changes.expires_at
        && at <= now
    {
        return Err(OpsError::invalid(
            "expires",
            format!("{at} is not in the future; to end a key now, revoke it"),
        ));
    }
    check_credit_changes(changes)?;
    if changes.scopes.as_ref().is_some_and(Vec::is_empty) {
        return Err(OpsError::invalid("scopes", "at least one scope is needed"));
    }
    Ok(())
}

/// `--uses none --refill N/W` asks for two contradicting things: refused,
/// for keys and clients alike.
pub(crate) fn check_credit_changes(changes: &MetaChanges) -> Result<(), OpsError> {
    if changes.uses == Some(None) && matches!(changes.refill, Some(Some(_))) {
        return Err(OpsError::invalid("refill", "a refill needs credits, and `--uses none` removes them"));
    }
    Ok(())
}

/// Rules on the resulting metadata as a whole.
fn check_meta(meta: &KeyMeta) -> Result<(), OpsError> {
    if meta.burst.is_some() && meta.rate.is_none() {
        return Err(OpsError::invalid("burst", "a burst needs a rate (set --rate too)"));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod test_store {
    //! An in-memory [`KeyStore`] for unit tests of the operations' logic. The
    //! real stores have their own tests against real Redis and real folders.

    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use async_trait::async_trait;
    use tokio::sync::broadcast;

    use crate::client::ClientRecord;
    use crate::key::{KeyId, SecretHash};
    use crate::store::{Invalidation, KeyRecord, KeyStore, StoreError};

    pub struct MemStore {
        // A std Mutex: no `.await` happens while it is held.
        records: Mutex<BTreeMap<KeyId, KeyRecord>>,
        clients: Mutex<BTreeMap<String, ClientRecord>>,
        events: broadcast::Sender<Invalidation>,
    }

    impl MemStore {
        pub fn new() -> Self {
            Self {
                records: Mutex::new(BTreeMap::new()),
                clients: Mutex::new(BTreeMap::new()),
                events: broadcast::channel(64).0,
            }
        }

        pub fn len(&self) -> usize {
            self.records.lock().unwrap().len()
        }
    }

    #[async_trait]
    impl KeyStore for MemStore {
        async fn find_by_hash(
            &self,
            client: &str,
            hash: &SecretHash,
        ) -> Result<Option<KeyRecord>, StoreError> {
            let records = self.records.lock().unwrap();
            Ok(records.values().find(|r| r.client() == client && r.secret_hash == *hash).cloned())
        }

        async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
            Ok(self.records.lock().unwrap().get(id).cloned())
        }

        async fn list(&self, client: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
            let records = self.records.lock().unwrap();
            Ok(records.values().filter(|r| client.is_none_or(|c| r.client() == c)).cloned().collect())
        }

        async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
            let mut records = self.records.lock().unwrap();
            if records.contains_key(&record.id) {
                return Err(StoreError::AlreadyExists(record.id.clone()));
            }
            records.insert(record.id.clone(), record.clone());
            Ok(())
        }

        async fn update(&self, record: &KeyRecord) -> Result<(), StoreError> {
            let mut records = self.records.lock().unwrap();
            let slot = records.get_mut(&record.id).ok_or_else(|| StoreError::NotFound(record.id.clone()))?;
            *slot = record.clone();
            let _ = self.events.send(Invalidation::Key(record.secret_hash));
            Ok(())
        }

        async fn get_client(&self, id: &str) -> Result<Option<ClientRecord>, StoreError> {
            Ok(self.clients.lock().unwrap().get(id).cloned())
        }

        async fn list_clients(&self) -> Result<Vec<ClientRecord>, StoreError> {
            Ok(self.clients.lock().unwrap().values().cloned().collect())
        }

        async fn insert_client(&self, record: &ClientRecord) -> Result<(), StoreError> {
            let mut clients = self.clients.lock().unwrap();
            if clients.contains_key(&record.id) {
                return Err(StoreError::ClientExists(record.id.clone()));
            }
            clients.insert(record.id.clone(), record.clone());
            let _ = self.events.send(Invalidation::Client(record.id.clone()));
            Ok(())
        }

        async fn update_client(&self, record: &ClientRecord) -> Result<(), StoreError> {
            let mut clients = self.clients.lock().unwrap();
            let slot =
                clients.get_mut(&record.id).ok_or_else(|| StoreError::ClientNotFound(record.id.clone()))?;
            *slot = record.clone();
            let _ = self.events.send(Invalidation::Client(record.id.clone()));
            Ok(())
        }

        fn subscribe(&self) -> broadcast::Receiver<Invalidation> {
            self.events.subscribe()
        }

        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_store::MemStore;
    use super::*;
    use crate::key::{DEFAULT_PREFIX as P, hash_secret, parse};
    use crate::store::Invalidation;

    fn now() -> Timestamp {
        "2026-11-24T12:00:00Z".parse().unwrap()
    }

    fn changes(query: &str) -> MetaChanges {
        MetaChanges::from_query(query, now()).unwrap()
    }

    #[tokio::test]
    async fn issue_stores_only_the_hash_and_applies_changes() {
        let store = MemStore::new();
        let issued =
            issue(&store, P, "acme", changes("scope=orders:write&rate=10/s&label=ci"), now()).await.unwrap();
        let parsed = parse(issued.key.expose(), P).unwrap();
        assert_eq!(parsed.client, "acme");
        let stored = store.get(&issued.record.id).await.unwrap().unwrap();
        assert_eq!(stored, issued.record);
        assert_eq!(stored.secret_hash, hash_secret(parsed.secret));
        assert_eq!(stored.meta.scopes, ["orders:write"]);
        assert_eq!(stored.meta.rate.unwrap().to_string(), "10/s");
        assert_eq!(stored.meta.label.as_deref(), Some("ci"));
        assert_eq!(stored.meta.created_at, now());
        assert!(!format!("{stored:?}").contains(parsed.secret));
    }

    #[tokio::test]
    async fn issue_refuses_bad_input_naming_the_field() {
        let store = MemStore::new();
        let field = |r: Result<Issued, OpsError>| match r {
            Err(OpsError::Invalid { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?}"),
        };
        assert_eq!(field(issue(&store, P, "bad client", MetaChanges::default(), now()).await), "client");
        assert_eq!(field(issue(&store, "kg", "c", MetaChanges::default(), now()).await), "prefix");
        assert_eq!(field(issue(&store, P, "c", changes("burst=5"), now()).await), "burst");
        let past = MetaChanges { expires_at: Some(Some(now())), ..MetaChanges::default() };
        assert_eq!(field(issue(&store, P, "c", past, now()).await), "expires");
        let no_scopes = MetaChanges { scopes: Some(vec![]), ..MetaChanges::default() };
        assert_eq!(field(issue(&store, P, "c", no_scopes, now()).await), "scopes");
        assert_eq!(store.len(), 0, "nothing was written");
    }

    #[tokio::test]
    async fn list_filters_by_client_and_show_finds_by_id() {
        let store = MemStore::new();
        let a = issue(&store, P, "a", MetaChanges::default(), now()).await.unwrap();
        issue(&store, P, "b", MetaChanges::default(), now()).await.unwrap();
        assert_eq!(list(&store, None).await.unwrap().len(), 2);
        let only_a = list(&store, Some("a")).await.unwrap();
        assert_eq!(only_a, std::slice::from_ref(&a.record));
        assert!(matches!(list(&store, Some("a.b")).await, Err(OpsError::Invalid { .. })));
        assert_eq!(show(&store, &a.record.id).await.unwrap(), a.record);
    }

    #[tokio::test]
    async fn unknown_ids_are_a_clear_not_found() {
        let store = MemStore::new();
        let id: KeyId = "acme.nope1234".parse().unwrap();
        for result in [
            show(&store, &id).await.map(drop),
            update(&store, &id, MetaChanges::default(), now()).await.map(drop),
            revoke(&store, &RevokeTarget::Id(id.clone()), P).await.map(drop),
            rotate(&store, &id, Duration::from_secs(60), None, P, now()).await.map(drop),
        ] {
            let err = result.unwrap_err();
            assert!(matches!(&err, OpsError::NotFound(missing) if *missing == id), "{err:?}");
            assert_eq!(err.to_string(), "no key with id acme.nope1234");
        }
    }

    #[tokio::test]
    async fn update_changes_only_what_is_named_and_announces_it() {
        let store = MemStore::new();
        let issued = issue(&store, P, "c", changes("rate=5/s&label=old"), now()).await.unwrap();
        let mut events = store.subscribe();
        let updated =
            update(&store, &issued.record.id, changes("label=new&quota=100/day"), now()).await.unwrap();
        assert_eq!(updated.meta.label.as_deref(), Some("new"));
        assert_eq!(updated.meta.quota.unwrap().to_string(), "100/day");
        assert_eq!(updated.meta.rate, issued.record.meta.rate, "untouched");
        assert_eq!(updated.secret_hash, issued.record.secret_hash);
        assert_eq!(store.get(&updated.id).await.unwrap().unwrap(), updated);
        assert_eq!(events.try_recv().unwrap(), Invalidation::Key(updated.secret_hash));

        let cleared = update(&store, &updated.id, changes("rate="), now()).await.unwrap();
        assert_eq!(cleared.meta.rate, None);
    }

    #[tokio::test]
    async fn revoke_by_id_or_by_key_and_is_idempotent() {
        let store = MemStore::new();
        let a = issue(&store, P, "c", MetaChanges::default(), now()).await.unwrap();
        let first = revoke(&store, &RevokeTarget::Id(a.record.id.clone()), P).await.unwrap();
        assert_eq!(first.record.meta.status, KeyStatus::Revoked);
        assert!(!first.already);
        let again = revoke(&store, &RevokeTarget::Id(a.record.id.clone()), P).await.unwrap();
        assert!(again.already);
        assert_eq!(store.get(&a.record.id).await.unwrap().unwrap().meta.status, KeyStatus::Revoked);

        let b = issue(&store, P, "c", MetaChanges::default(), now()).await.unwrap();
        let target: RevokeTarget = b.key.expose().parse().unwrap();
        assert!(matches!(target, RevokeTarget::Key(_)));
        let by_key = revoke(&store, &target, P).await.unwrap();
        assert_eq!(by_key.record.id, b.record.id);
        assert_eq!(store.get(&b.record.id).await.unwrap().unwrap().meta.status, KeyStatus::Revoked);
    }

    #[tokio::test]
    async fn revoke_by_key_refuses_malformed_and_unknown_keys_without_echoing_them() {
        let store = MemStore::new();
        let issued = issue(&store, P, "c", MetaChanges::default(), now()).await.unwrap();
        let key = issued.key.expose();
        let typo = format!("{}{}", &key[..key.len() - 1], if key.ends_with('0') { '1' } else { '0' });
        let err = revoke(&store, &typo.parse().unwrap(), P).await.unwrap_err();
        assert!(matches!(err, OpsError::Invalid { ref field, .. } if field == "key"), "{err:?}");
        assert!(!err.to_string().contains(&key[10..30]), "{err}");

        let stranger = crate::key::generate(P, "c").unwrap();
        let err = revoke(&store, &RevokeTarget::Key(stranger.key), P).await.unwrap_err();
        assert!(matches!(err, OpsError::UnknownKey), "{err:?}");
    }

    #[tokio::test]
    async fn rotate_copies_metadata_gives_the_old_key_exactly_the_grace_and_the_new_one_no_expiry() {
        let store = MemStore::new();
        let old = issue(&store, P, "c", changes("scope=read&rate=7/s&expires=2027-01-01T00:00:00Z"), now())
            .await
            .unwrap();
        let later = now() + SignedDuration::from_hours(1);
        let new =
            rotate(&store, &old.record.id, Duration::from_secs(24 * 3600), None, P, later).await.unwrap();

        assert_ne!(new.record.id, old.record.id);
        assert_ne!(new.record.secret_hash, old.record.secret_hash);
        assert_eq!(parse(new.key.expose(), P).unwrap().secret_hash(), new.record.secret_hash);
        assert_eq!(new.record.meta.scopes, ["read"]);
        assert_eq!(new.record.meta.rate, old.record.meta.rate);
        assert_eq!(new.record.meta.expires_at, None, "no expiry unless asked");
        assert_eq!(new.record.meta.created_at, later);
        assert_eq!(new.record.meta.rotated_at, None);
        assert_eq!(new.record.meta.counts_as.as_ref(), Some(&old.record.id), "one budget for both");
        assert_eq!(new.record.counts_as(), &old.record.id);

        let old_now = store.get(&old.record.id).await.unwrap().unwrap();
        assert_eq!(old_now.meta.expires_at, Some(later + SignedDuration::from_hours(24)));
        assert_eq!(old_now.meta.rotated_at, Some(later));
        assert_eq!(old_now.meta.status, KeyStatus::Active, "still valid during the grace period");
        assert_eq!(old_now.counts_as(), &old.record.id);
    }

    /// Regression (issue 16, defect 1): rotating a key already in its grace
    /// gave the new key the earlier grace's expiry, and ignored `--grace`.
    #[tokio::test]
    async fn rotating_a_key_in_its_grace_gives_the_new_key_no_expiry_and_the_old_exactly_the_new_grace() {
        let store = MemStore::new();
        let first = issue(&store, P, "c", changes("quota=100/day"), now()).await.unwrap();
        let second =
            rotate(&store, &first.record.id, Duration::from_secs(3600), None, P, now()).await.unwrap();
        // The first key is in its one-hour grace; rotate it again, with a day.
        let later = now() + SignedDuration::from_mins(10);
        let third =
            rotate(&store, &first.record.id, Duration::from_secs(86_400), None, P, later).await.unwrap();
        assert_eq!(third.record.meta.expires_at, None);
        let first_now = store.get(&first.record.id).await.unwrap().unwrap();
        assert_eq!(first_now.meta.expires_at, Some(later + SignedDuration::from_hours(24)));
        // A shorter grace is honoured as well.
        let fourth = rotate(&store, &first.record.id, Duration::from_secs(60), None, P, later).await.unwrap();
        let first_now = store.get(&first.record.id).await.unwrap().unwrap();
        assert_eq!(first_now.meta.expires_at, Some(later + SignedDuration::from_mins(1)));
        // Every key of the line counts as the first.
        for key in [&second, &third, &fourth] {
            assert_eq!(key.record.counts_as(), &first.record.id);
        }
        // And a rotation of the second key keeps counting as the first.
        let fifth = rotate(&store, &second.record.id, Duration::from_secs(60), None, P, later).await.unwrap();
        assert_eq!(fifth.record.counts_as(), &first.record.id);
    }

    #[tokio::test]
    async fn a_rotation_may_give_the_new_key_an_expiry_in_the_future_only() {
        let store = MemStore::new();
        let old = issue(&store, P, "c", MetaChanges::default(), now()).await.unwrap();
        let at = now() + SignedDuration::from_hours(48);
        let new = rotate(&store, &old.record.id, Duration::from_secs(60), Some(at), P, now()).await.unwrap();
        assert_eq!(new.record.meta.expires_at, Some(at));
        let err =
            rotate(&store, &new.record.id, Duration::from_secs(60), Some(now()), P, now()).await.unwrap_err();
        assert!(matches!(&err, OpsError::Invalid { field, .. } if field == "expires"), "{err:?}");
        assert_eq!(store.len(), 2, "nothing was written");
    }

    #[tokio::test]
    async fn rotate_refuses_dead_keys() {
        let store = MemStore::new();
        let soon = now() + SignedDuration::from_mins(5);
        let old =
            issue(&store, P, "c", MetaChanges { expires_at: Some(Some(soon)), ..Default::default() }, now())
                .await
                .unwrap();
        let err = rotate(&store, &old.record.id, Duration::ZERO, None, P, soon).await.unwrap_err();
        assert!(matches!(err, OpsError::NotUsable { why: "expired", .. }), "{err:?}");

        let revoked = issue(&store, P, "c", MetaChanges::default(), now()).await.unwrap();
        revoke(&store, &RevokeTarget::Id(revoked.record.id.clone()), P).await.unwrap();
        let err = rotate(&store, &revoked.record.id, Duration::ZERO, None, P, now()).await.unwrap_err();
        assert!(matches!(err, OpsError::NotUsable { why: "revoked", .. }), "{err:?}");
    }
}
