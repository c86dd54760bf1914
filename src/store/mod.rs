//! Key stores: where key records live.
//!
//! The gateway and the CLI talk to a store only through [`KeyStore`], so the
//! production store (Redis, later Redis Cluster) and the embedded file store in
//! `keys/` are interchangeable. A store keeps only the hash of a key's secret;
//! verification looks a record up by that hash.
//!
//! Stores also announce changes: every write publishes an [`Invalidation`], and
//! [`KeyStore::subscribe`] hands the verification cache a receiver so that a
//! revoked key stops working on every running gateway at once.
//!
//! The same store objects hold client records ([`ClientRecord`]) beside the
//! keys: one object for callers, and a verification reads a key and its
//! client together ([`KeyStore::find_for_verification`]).

pub mod conn;
pub mod file;
pub mod redis;
pub mod slots;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::client::ClientRecord;
use crate::key::{KeyId, SecretHash};
use crate::meta::KeyMeta;

/// A key as the store holds it: identity, the hash of its secret, and its
/// scope metadata. Never holds the clear secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Public identifier, `<client>.<kid>`; safe to log and to show.
    pub id: KeyId,
    /// SHA-256 of the secret part of the key string.
    pub secret_hash: SecretHash,
    /// Scopes, limits, expiry, label, status, timestamps.
    pub meta: KeyMeta,
}

impl KeyRecord {
    /// The client this key belongs to.
    pub fn client(&self) -> &str {
        self.id.client()
    }

    /// The key ID its limit counters are kept under: `counts_as` (set by a
    /// rotation), or its own ID. A `counts_as` of another client is never
    /// followed (the stores refuse to read one): a key spends only its own
    /// client's budgets.
    pub fn counts_as(&self) -> &KeyId {
        match &self.meta.counts_as {
            Some(id) if id.client() == self.client() => id,
            _ => &self.id,
        }
    }
}

/// What changed in a store, as announced to every running gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// The record with this secret hash changed or was revoked: drop it from caches.
    Key(SecretHash),
    /// A new record with this secret hash exists: forget that it was unknown.
    /// Nothing cached can be stale (the hash was unknown until now), so a
    /// record verified before this message arrives stays cached.
    Issued(SecretHash),
    /// The record of this client changed (updated, revoked): drop every
    /// cached key of the client, since each carries the client's record.
    Client(String),
    /// Anything may have changed (e.g. a missed pub/sub window after a reconnect,
    /// or the file store's folder changed): drop every cached record.
    All,
}

/// What [`KeyStore::version`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreVersion {
    /// The store keeps no version: changes arrive as invalidations only.
    Untracked,
    /// The records are at this version; a cache entry filled at another
    /// version must be checked again.
    At(u64),
    /// Another writer changed the records since this process last read
    /// them: call [`KeyStore::catch_up`] before answering from a cache.
    Behind,
}

/// Why a store call failed. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or answered with an error (Redis down,
    /// folder unreadable). The gateway answers 503 for keys it cannot vouch for.
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    /// A record in the store could not be decoded (hand-edited file, schema drift).
    #[error("corrupt key record {what}: {why}")]
    Corrupt { what: String, why: String },
    /// `insert` of an ID that already exists.
    #[error("key {0} already exists")]
    AlreadyExists(KeyId),
    /// `update` of an ID that does not exist.
    #[error("no key with id {0}")]
    NotFound(KeyId),
    /// `insert_client` of a client that already has a record.
    #[error("client {0} already has a record")]
    ClientExists(String),
    /// `update_client` of a client without a record.
    #[error("no client record for {0}")]
    ClientNotFound(String),
}

/// What a verification lookup finds: the key's record and, if the client
/// has one, the client's record, read together (one round trip in Redis).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub key: KeyRecord,
    pub client: Option<ClientRecord>,
}

/// One page of records in ID order, and whether more follow its last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Records sort after the last item: ask again from there.
    pub more: bool,
}

impl<T> Page<T> {
    /// The first `limit` of `sorted` (already in ID order and past the
    /// cursor), noting whether any is left over.
    pub fn of(sorted: impl IntoIterator<Item = T>, limit: usize) -> Self {
        let mut sorted = sorted.into_iter();
        let items: Vec<T> = sorted.by_ref().take(limit).collect();
        let more = sorted.next().is_some();
        Self { items, more }
    }
}

/// The store interface shared by the gateway (verification) and the operators'
/// CLI / admin API (issue, list, update, revoke, rotate).
///
/// Implementations must be cheap to share (`Arc<dyn KeyStore>`) and safe to
/// call from many tasks at once.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Verification lookup: the record of `client` whose secret hashes to `hash`.
    /// Called only on a verification-cache miss. The caller checks that the
    /// record's client matches the key string's client.
    async fn find_by_hash(&self, client: &str, hash: &SecretHash) -> Result<Option<KeyRecord>, StoreError>;

    /// The record with this public ID.
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;

    /// All records, or those of one client, sorted by ID.
    async fn list(&self, client: Option<&str>) -> Result<Vec<KeyRecord>, StoreError>;

    /// One page of [`KeyStore::list`]: the first `limit` records (of every
    /// client, or of one) whose ID sorts after `after`, in ID order. A walk
    /// that passes each page's last ID on never repeats a record and never
    /// skips one that exists for the whole walk, whatever is added or
    /// revoked between pages. The default filters [`KeyStore::list`];
    /// stores override it to read less.
    async fn list_page(
        &self,
        client: Option<&str>,
        after: Option<&KeyId>,
        limit: usize,
    ) -> Result<Page<KeyRecord>, StoreError> {
        let records = self.list(client).await?;
        Ok(Page::of(records.into_iter().filter(|r| after.is_none_or(|a| r.id > *a)), limit))
    }

    /// Stores a new record. Fails with [`StoreError::AlreadyExists`] if the ID is taken.
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError>;

    /// Replaces an existing record (same ID and hash) and announces
    /// [`Invalidation::Key`] to every subscriber, including other processes.
    async fn update(&self, record: &KeyRecord) -> Result<(), StoreError>;

    /// Verification lookup of a key and its client's record together, on a
    /// cache miss. The default asks twice; stores override it to read both
    /// at once (the Redis store in one pipelined round trip, the file store
    /// from one snapshot). The client is asked only if the key exists.
    async fn find_for_verification(
        &self,
        client: &str,
        hash: &SecretHash,
    ) -> Result<Option<Found>, StoreError> {
        let Some(key) = self.find_by_hash(client, hash).await? else { return Ok(None) };
        let client = self.get_client(key.client()).await?;
        Ok(Some(Found { key, client }))
    }

    /// The record of this client, if it has one.
    async fn get_client(&self, id: &str) -> Result<Option<ClientRecord>, StoreError>;

    /// Every client record, sorted by ID. (Clients with keys but no record
    /// are not listed.)
    async fn list_clients(&self) -> Result<Vec<ClientRecord>, StoreError>;

    /// One page of [`KeyStore::list_clients`]: the first `limit` records
    /// whose ID sorts after `after`, with the same guarantees as
    /// [`KeyStore::list_page`].
    async fn list_clients_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<ClientRecord>, StoreError> {
        let records = self.list_clients().await?;
        Ok(Page::of(records.into_iter().filter(|r| after.is_none_or(|a| r.id.as_str() > a)), limit))
    }

    /// Stores a new client record. Fails with [`StoreError::ClientExists`]
    /// if the client has one.
    async fn insert_client(&self, record: &ClientRecord) -> Result<(), StoreError>;

    /// Replaces a client's record and announces [`Invalidation::Client`] to
    /// every subscriber. Fails with [`StoreError::ClientNotFound`] if the
    /// client has none.
    async fn update_client(&self, record: &ClientRecord) -> Result<(), StoreError>;

    /// A receiver of invalidations. Redis: fed by pub/sub (and `All` after a
    /// reconnect); file store: fed by a watch on the folder.
    fn subscribe(&self) -> broadcast::Receiver<Invalidation>;

    /// Cheap liveness probe for `/readyz` and for recovery after an outage.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Where this store's records stand, asked on every verification before
    /// the verifier trusts its cache. A store whose writers reach readers
    /// only through [`KeyStore::subscribe`] (Redis: pub/sub) answers
    /// [`StoreVersion::Untracked`], the default, at no cost. The file store
    /// answers a number that moves with every change to its records, and
    /// [`StoreVersion::Behind`] when another process wrote since it last
    /// read the folder: its readers then [`KeyStore::catch_up`] first, so a
    /// CLI revocation holds for the very next request. Synchronous and
    /// cheap (the file store: one `stat`), since every request pays it.
    fn version(&self) -> StoreVersion {
        StoreVersion::Untracked
    }

    /// Reads what [`KeyStore::version`] said this store is behind on, and
    /// returns the version it is at now. Concurrent callers share one reload.
    async fn catch_up(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// The Redis this store lives in, if any. Quotas, shared rate limits and
    /// usage counters are kept beside the keys, under the same prefix.
    fn redis(&self) -> Option<RedisHandle> {
        None
    }
}

/// A multiplexed, auto-reconnecting connection to the store's Redis (one
/// node, a cluster or a Sentinel-managed primary), and the prefix every
/// Redis key of this deployment starts with.
#[derive(Clone)]
pub struct RedisHandle {
    pub conn: conn::RedisConn,
    /// The same Redis, for a part that needs a connection of its own. Built
    /// through [`crate::redis_target::client`], so it carries the store's
    /// TLS set-up; its clients may hold a password: never log them.
    pub target: conn::RedisTarget,
    pub prefix: String,
}

/// A store shared by the gateway's tasks.
pub type SharedStore = Arc<dyn KeyStore>;

/// Opens the store `keygate serve` runs on. Unlike [`open`], a Redis that
/// is down at start is not an error: the gateway comes up, serves public
/// routes, answers 503 for keys it cannot vouch for, and verifies keys as
/// soon as Redis answers, without a restart.
pub async fn open_for_serving(config: &crate::config::StoreConfig) -> Result<SharedStore, StoreError> {
    use crate::config::StoreConfig;
    match config {
        StoreConfig::Redis { endpoint, prefix, tls } => {
            let options = redis::RedisStoreOptions {
                connect_lazily_if_down: true,
                tls: tls.clone(),
                ..Default::default()
            };
            Ok(Arc::new(redis::RedisStore::connect_endpoint(endpoint, prefix, options).await?))
        }
        StoreConfig::File { .. } => open(config, None).await,
    }
}

/// Opens the store a config names: the file store's folder, or a Redis
/// connection (`redis_url` overrides the config's URL, as `--redis` and
/// `KEYGATE_REDIS_URL` do; the config's TLS files still apply to it).
pub async fn open(
    config: &crate::config::StoreConfig,
    redis_url: Option<&str>,
) -> Result<SharedStore, StoreError> {
    use crate::config::StoreConfig;
    use crate::redis_target::Endpoint;
    let options = |tls: &crate::redis_target::RedisTls| redis::RedisStoreOptions {
        tls: tls.clone(),
        ..Default::default()
    };
    match (config, redis_url) {
        (StoreConfig::Redis { prefix, tls, .. }, Some(url)) => Ok(Arc::new(
            redis::RedisStore::connect_endpoint(&Endpoint::Node(url.to_owned()), prefix, options(tls))
                .await?,
        )),
        (StoreConfig::File { .. }, Some(url)) => {
            Ok(Arc::new(redis::RedisStore::connect(url, redis::DEFAULT_PREFIX).await?))
        }
        (StoreConfig::Redis { endpoint, prefix, tls }, None) => {
            Ok(Arc::new(redis::RedisStore::connect_endpoint(endpoint, prefix, options(tls)).await?))
        }
        (StoreConfig::File { dir }, None) => {
            // A newcomer who deleted `keys/` gets an empty store, not an error.
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
            Ok(Arc::new(file::FileStore::open(dir.clone()).await?))
        }
    }
}
