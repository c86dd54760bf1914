//! Key verification: the in-process cache in front of the key store.
//!
//! A known key costs no store round trip: verified records are cached by the
//! hash of their secret. The store's invalidations (Redis pub/sub, the file
//! store's folder watch) drop entries at once on every running gateway, and
//! `cache_ttl` bounds staleness if a message is ever lost. Unknown hashes are
//! remembered briefly (`negative_ttl`) so a flood of random well-formed keys
//! cannot hammer the store; malformed keys never reach it at all.
//!
//! When the store is unreachable, cached records keep working for
//! `stale_window` past their `cache_ttl`; a key the gateway cannot vouch for
//! gets 503, never a silent allow.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use jiff::Timestamp;
use moka::sync::Cache;
use tokio::sync::broadcast::error::RecvError;

use crate::config::KeysConfig;
use crate::error::GatewayError;
use crate::key::{self, SecretHash};
use crate::proxy::Identity;
use crate::store::{Invalidation, KeyRecord, SharedStore};

/// A verified key as the request path uses it: the store's record, plus
/// what is derived from it once per cache fill instead of on every request.
#[derive(Debug)]
pub struct Caller {
    pub record: KeyRecord,
    /// The identity headers sent upstream for this key.
    pub identity: Identity,
}

impl Caller {
    fn new(record: KeyRecord) -> Self {
        Self { identity: Identity::of(&record), record }
    }
}

impl std::ops::Deref for Caller {
    type Target = KeyRecord;

    fn deref(&self) -> &KeyRecord {
        &self.record
    }
}

/// A record as the cache holds it, with when the store last vouched for it.
#[derive(Debug)]
struct Cached {
    record: Arc<Caller>,
    fetched_at: Instant,
    /// The cache epoch it was fetched in; an older epoch must be re-checked.
    epoch: u64,
}

/// Verifies presented keys against the store, through the cache.
pub struct Verifier {
    store: SharedStore,
    prefix: String,
    /// Verified records by secret hash. moka shards internally, so lookups
    /// from many cores do not contend on one lock.
    known: Cache<SecretHash, Arc<Cached>, RandomState>,
    /// Hashes the store said it does not have.
    unknown: Cache<SecretHash, (), RandomState>,
    /// Store lookups under way: requests that miss the cache for the same
    /// key at the same moment share one lookup instead of each asking the
    /// store (a popular key after an invalidation, a cold start).
    in_flight: Cache<(String, SecretHash), Lookup>,
    cache_ttl: Duration,
    stale_window: Duration,
    /// Bumped by [`Invalidation::All`]: every entry from an older epoch is
    /// re-checked with the store on its next use, but stays usable (within
    /// the stale window) if the store cannot answer. Dropping them instead
    /// would turn a Redis restart, which is exactly when `All` arrives, into
    /// 503s for keys verified a moment before.
    epoch: AtomicU64,
}

/// One store lookup, awaited by every request that needs its answer. The
/// error is kept as text: `StoreError` is not `Clone`.
type Lookup = Arc<tokio::sync::OnceCell<Result<Option<Arc<Caller>>, String>>>;

/// Why verification refused a key, for the log only: the client sees one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Malformed(key::KeyFormatError),
    Unknown,
    ClientMismatch,
    Expired,
    Revoked,
}

impl Rejection {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Unknown => "unknown",
            Self::ClientMismatch => "client mismatch",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }
}

impl From<Rejection> for GatewayError {
    fn from(rejection: Rejection) -> Self {
        GatewayError::KeyRejected(rejection.reason())
    }
}

impl Verifier {
    pub fn new(store: SharedStore, keys: &KeysConfig) -> Arc<Self> {
        let known = Cache::builder()
            .max_capacity(keys.cache_capacity)
            // Past this nobody may use the entry, fresh or stale: let it go.
            .time_to_live(keys.cache_ttl + keys.stale_window)
            .build_with_hasher(RandomState::default());
        let unknown = Cache::builder()
            .max_capacity(keys.cache_capacity)
            .time_to_live(keys.negative_ttl)
            .build_with_hasher(RandomState::default());
        // An entry lives only while its lookup runs (it is removed when the
        // answer is in); the TTL only cleans up after a cancelled request.
        let in_flight =
            Cache::builder().max_capacity(keys.cache_capacity).time_to_live(Duration::from_secs(5)).build();
        Arc::new(Self {
            store,
            prefix: keys.prefix.clone(),
            known,
            unknown,
            in_flight,
            cache_ttl: keys.cache_ttl,
            stale_window: keys.stale_window,
            epoch: AtomicU64::new(0),
        })
    }

    /// Verifies a presented key string: format and checksum, then the cache,
    /// then the store. Returns the record of a usable key.
    ///
    /// `arrived` is when the request arrived (the handler reads it anyway):
    /// a cached record's age is counted to it, which spares a clock read per
    /// request. A record cached after it counts as fresh.
    pub async fn verify(&self, presented: &str, arrived: Instant) -> Result<Arc<Caller>, GatewayError> {
        let parsed = key::parse(presented, &self.prefix).map_err(Rejection::Malformed)?;
        let hash = parsed.secret_hash();
        let record = self.lookup(parsed.client, &hash, arrived).await?;
        if record.client() != parsed.client {
            return Err(Rejection::ClientMismatch.into());
        }
        check_usable(&record, Timestamp::now)?;
        Ok(record)
    }

    async fn lookup(
        &self,
        client: &str,
        hash: &SecretHash,
        arrived: Instant,
    ) -> Result<Arc<Caller>, GatewayError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let cached = self.known.get(hash);
        if let Some(cached) = &cached
            && cached.epoch == epoch
            && arrived.saturating_duration_since(cached.fetched_at) < self.cache_ttl
        {
            crate::metrics::cache_hit();
            return Ok(Arc::clone(&cached.record));
        }
        crate::metrics::cache_miss();
        if cached.is_none() && self.unknown.contains_key(hash) {
            return Err(Rejection::Unknown.into());
        }
        // Boxed: a miss is the rare path, and every connection's request
        // future would otherwise be sized for the store lookup.
        match Box::pin(self.ask_store(client, hash, epoch)).await {
            Ok(Some(record)) => Ok(record),
            Ok(None) => Err(Rejection::Unknown.into()),
            Err(error) => match cached {
                // The store is down, but it vouched for this key recently enough.
                Some(cached) if cached.fetched_at.elapsed() < self.cache_ttl + self.stale_window => {
                    tracing::warn!(%error, key_id = %cached.record.id, "key store unavailable; serving cached key");
                    Ok(Arc::clone(&cached.record))
                }
                _ => Err(GatewayError::StoreUnavailable(error)),
            },
        }
    }

    /// Asks the store for `client`'s record with this hash, sharing the
    /// lookup with every request asking the same at the same time, and
    /// caches the answer (known, or unknown).
    async fn ask_store(
        &self,
        client: &str,
        hash: &SecretHash,
        epoch: u64,
    ) -> Result<Option<Arc<Caller>>, String> {
        let key = (client.to_owned(), *hash);
        let lookup = self.in_flight.get_with_by_ref(&key, || Arc::new(tokio::sync::OnceCell::new()));
        let answer = lookup
            .get_or_init(|| async {
                // A lookup that finished between this request's cache check
                // and now has already answered: read that, not the store.
                if let Some(hit) = self.known.get(hash)
                    && hit.epoch == epoch
                    && hit.fetched_at.elapsed() < self.cache_ttl
                {
                    return Ok(Some(Arc::clone(&hit.record)));
                }
                if self.unknown.contains_key(hash) {
                    return Ok(None);
                }
                let asked = Instant::now();
                let answer = self.store.find_by_hash(client, hash).await;
                crate::metrics::redis_latency(asked.elapsed());
                // Cached here, before the lookup leaves `in_flight`, so a
                // request arriving in between finds the answer, not a gap.
                match answer {
                    Ok(Some(record)) => {
                        let record = Arc::new(Caller::new(record));
                        let entry = Cached { record: Arc::clone(&record), fetched_at: Instant::now(), epoch };
                        self.known.insert(*hash, Arc::new(entry));
                        Ok(Some(record))
                    }
                    Ok(None) => {
                        self.known.invalidate(hash);
                        self.unknown.insert(*hash, ());
                        Ok(None)
                    }
                    Err(error) => {
                        crate::metrics::redis_error();
                        Err(error.to_string())
                    }
                }
            })
            .await
            .clone();
        // The next miss (after an invalidation, or an error) asks afresh.
        self.in_flight.invalidate(&key);
        answer
    }

    /// Applies one invalidation from the store.
    pub fn invalidate(&self, invalidation: &Invalidation) {
        match invalidation {
            Invalidation::Key(hash) => {
                self.known.invalidate(hash);
                self.unknown.invalidate(hash);
            }
            // A new key: only the "unknown" answer can be wrong now. Dropping
            // the record too would undo a verification that raced ahead of
            // this message (seen in CI: a 503 after a Redis restart).
            Invalidation::Issued(hash) => {
                self.unknown.invalidate(hash);
            }
            Invalidation::All => {
                self.epoch.fetch_add(1, Ordering::AcqRel);
                self.unknown.invalidate_all();
            }
        }
    }

    /// Follows the store's invalidations until the store goes away. Spawned
    /// once per gateway; a lagging receiver flushes everything, since it
    /// cannot know which messages it missed.
    pub fn spawn_invalidation_listener(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let mut invalidations = self.store.subscribe();
        let verifier = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let message = invalidations.recv().await;
                let Some(verifier) = verifier.upgrade() else { return };
                match message {
                    Ok(invalidation) => verifier.invalidate(&invalidation),
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "invalidation receiver lagged; flushing the key cache");
                        verifier.invalidate(&Invalidation::All);
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        })
    }

    /// Number of cached verified records (for metrics and tests).
    pub fn cached_len(&self) -> u64 {
        self.known.run_pending_tasks();
        self.known.entry_count()
    }
}

/// Refuses a revoked or expired key.
///
/// `now` is called only for a key that expires: most keys never do, and a
/// clock read is a measurable part of a cached verification.
fn check_usable(record: &KeyRecord, now: impl FnOnce() -> Timestamp) -> Result<(), Rejection> {
    use crate::meta::KeyStatus;
    if record.meta.status == KeyStatus::Revoked {
        return Err(Rejection::Revoked);
    }
    if record.meta.expires_at.is_some_and(|at| now() >= at) {
        return Err(Rejection::Expired);
    }
    Ok(())
}
