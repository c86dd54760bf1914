//! Key verification: the in-process cache in front of the key store, and
//! the limits that keep a flood of bad keys away from both.
//!
//! A known key costs no store round trip: verified records are cached by the
//! hash of their secret. The store's invalidations (Redis pub/sub, the file
//! store's folder watch) drop entries at once on every running gateway, and
//! `cache_ttl` bounds staleness if a message is ever lost. Unknown keys are
//! remembered briefly (`negative_ttl`) per (client, secret hash): the answer
//! "client A has no key with this secret" says nothing about client B, so
//! presenting a victim's secret under another client ID cannot lock the
//! victim out. Malformed keys never reach the cache or the store at all.
//!
//! Two limits keep garbage cheap (see `[keys]` in `gateway.toml`):
//! - every rejected key counts one failure against its source IP (an IPv6
//!   source by its /64); a source over `auth_failures_per_ip` (with
//!   `auth_failures_burst`) gets 429 for its keyed requests, before any cache
//!   or store lookup, until its budget recovers;
//! - store lookups for keys not in the cache are capped globally at
//!   `store_lookups_per_second`; past it such a key gets 503 with
//!   `Retry-After` and the store is not asked. Cached keys are unaffected.
//!
//! When the store is unreachable, cached records keep working for
//! `stale_window` past their `cache_ttl`; a key the gateway cannot vouch for
//! gets 503, never a silent allow. A record the store has but cannot decode
//! is not an outage: the store answered, and its answer is unusable, so the
//! key is refused at once (503 `key_record_unreadable`, logged as an error
//! naming the record) and the stale window does not apply.
//!
//! A key is cached together with its client's record (read with it on a
//! miss, in one round trip): a revoked client refuses all its keys, and
//! [`Invalidation::Client`] drops every cached key of that client at once.
//! A key whose client has no record carries `client: None` and works as
//! before.
//! A store that versions its records (the file store, whose writers may be
//! other processes: see `KeyStore::version`) is asked where it stands on
//! every verification, before the cache is trusted; an entry filled at
//! another version is checked with the store again, in front of the
//! request. A CLI revocation on the file store thus holds for the very next
//! request, not only once the folder watch has reloaded.
//!
//! After an invalidation of everything ([`Invalidation::All`], sent on a
//! Redis reconnect), a cached record still within `cache_ttl` is served as
//! is and re-checked in the background, one refresh per key: a slow store
//! then costs those requests nothing. A revocation ([`Invalidation::Key`])
//! still drops its entry at once.
//!
//! Credentials are plural, and each resolves to one [`Caller`]: a key
//! ([`Credential::Key`], the above), or a client certificate the TLS
//! listener verified ([`Credential::ClientCert`], in `cert.rs`, see
//! [`Verifier::verify_certificate`]): the certificate names a client
//! ([`crate::client_cert`]) whose record must exist and be active. Client
//! records are cached by client ID like keys (`cache_ttl`, "no record" for
//! `negative_ttl`, the same stale window), dropped at once by
//! [`Invalidation::Client`] and re-checked in front of the request after an
//! [`Invalidation::All`] or a file-store version change. Certificates come
//! from the operator's client CA, not from guesses, so their refusals do not
//! count against the source's failed-authentication budget.
//!
//! A JWT from an external issuer (`[[jwt.issuer]]`, [`Credential::Issued`],
//! checked by `issuer.rs`, see [`Verifier::verify_jwt`]) names a client
//! the same way: its record, through the same client cache, must exist
//! and be active, and supplies limits, quota, credits and usage; the
//! token's scope claim is what the route is checked against. Its refusals
//! count against the source's budget like a key's.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use jiff::Timestamp;
use moka::sync::Cache;
use tokio::sync::broadcast::error::RecvError;

mod cert;
pub mod issuer;
pub mod jwt;
mod refresh;
mod token;

use crate::client::ClientRecord;
use crate::config::{CredentialKind, KeysConfig};
use crate::error::GatewayError;
use crate::key::{self, SecretHash};
use crate::meta::Rate;
use crate::proxy::Identity;
use crate::store::{Found, Invalidation, KeyRecord, SharedStore, StoreError, StoreVersion};

/// A verified caller as the request path uses it, whatever credential it
/// presented: the credential, its client's record, and what is derived
/// from them once per cache fill instead of on every request. Scopes,
/// limits, quotas, credits and usage all read it the same way.
#[derive(Debug)]
pub struct Caller {
    pub credential: Credential,
    /// The caller's client's record: for a key, read with it, `None` if the
    /// client has none (no client limits); for a client certificate, always
    /// there (the client is the caller). Shared, so limits keyed by client
    /// can hold on to it.
    pub client: Option<Arc<ClientRecord>>,
    /// The identity headers sent upstream for this caller.
    pub identity: Identity,
}

/// What a caller presented, verified.
// A `Caller` is built once per cache fill and lives behind an `Arc`: the
// size of the key variant costs nothing per request, and boxing it would
// add a pointer chase to every cached verification.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Credential {
    /// An API key: its record carries the scopes and the key's own limits.
    Key(KeyRecord),
    /// A client certificate verified by the TLS listener: the client itself
    /// is the caller, with the client record's scopes and limits, no key.
    ClientCert { client: Arc<ClientRecord> },
    // An access token (issue 20) becomes `Key` of its source key's record
    // with the token's scopes (see `token.rs`): the key supplies limits,
    // quota and usage exactly as when presented itself.
    /// A JWT from an external issuer (`[[jwt.issuer]]`): the client it
    /// names is the caller, by its record (limits, quota, credits, status,
    /// usage), with the token's scopes.
    Issued { client: Arc<ClientRecord>, issuer: Arc<str>, scopes: Vec<String> },
}

impl Caller {
    fn new(found: Found) -> Self {
        let Found { key: record, client } = found;
        let identity = Identity::new(record.client(), record.id.as_str(), &record.meta.scopes);
        Self { identity, client: client.map(Arc::new), credential: Credential::Key(record) }
    }

    /// A client certificate's caller: the client, by its record.
    fn for_client(record: ClientRecord) -> Self {
        let identity = Identity::for_client(&record.id, &record.meta.scopes);
        let client = Arc::new(record);
        Self { identity, client: Some(Arc::clone(&client)), credential: Credential::ClientCert { client } }
    }

    /// An external token's caller: its client, by its record, with the
    /// token's scopes.
    fn for_issued(client: Arc<ClientRecord>, claims: &issuer::ExternalClaims) -> Self {
        let identity = Identity::for_client(&client.id, &claims.scopes);
        let credential = Credential::Issued {
            client: Arc::clone(&client),
            issuer: Arc::clone(&claims.issuer),
            scopes: claims.scopes.clone(),
        };
        Self { identity, client: Some(client), credential }
    }

    /// The client this caller is or belongs to.
    pub fn client(&self) -> &str {
        match &self.credential {
            Credential::Key(record) => record.client(),
            Credential::ClientCert { client } | Credential::Issued { client, .. } => &client.id,
        }
    }

    /// The key presented, if the credential is one.
    pub fn key(&self) -> Option<&KeyRecord> {
        match &self.credential {
            Credential::Key(record) => Some(record),
            Credential::ClientCert { .. } | Credential::Issued { .. } => None,
        }
    }

    /// The key's ID (`<client>.<kid>`); `None` for a certificate.
    pub fn key_id(&self) -> Option<&str> {
        self.key().map(|record| record.id.as_str())
    }

    /// The scopes the route is checked against: the key's, or for a
    /// certificate the client record's (none unless granted).
    pub fn scopes(&self) -> &[String] {
        match &self.credential {
            Credential::Key(record) => &record.meta.scopes,
            Credential::ClientCert { client } => &client.meta.scopes,
            Credential::Issued { scopes, .. } => scopes,
        }
    }

    /// Which kind of credential this caller presented (the access log's `credential`).
    pub fn kind(&self) -> CredentialKind {
        match &self.credential {
            Credential::Key(_) => CredentialKind::Key,
            Credential::ClientCert { .. } => CredentialKind::Cert,
            Credential::Issued { .. } => CredentialKind::Jwt,
        }
    }
}

/// A record as the cache holds it, with when the store last vouched for it.
#[derive(Debug)]
struct Cached {
    record: Arc<Caller>,
    fetched_at: Instant,
    /// The cache epoch it was fetched in; an older epoch must be re-checked.
    epoch: u64,
    /// The store's version it was fetched at (`None`: the store keeps
    /// none); another version must be re-checked before it is served.
    store_version: Option<u64>,
    /// Set by the request that starts this entry's background refresh, so
    /// the requests behind it do not start another: one refresh per key.
    /// The refresh replaces (or drops) the entry, which clears it.
    refreshing: AtomicBool,
}

/// Verifies presented keys against the store, through the cache.
pub struct Verifier {
    store: SharedStore,
    prefix: String,
    /// Verified records by secret hash. moka shards internally, so lookups
    /// from many cores do not contend on one lock. Keyed by hash alone: a
    /// record names its client, and a hash belongs to one record.
    known: Cache<SecretHash, Arc<Cached>, RandomState>,
    /// Secret hashes the store said the named client does not have. The
    /// value is that client: a hit counts only for the same client, so the
    /// answer is keyed by (client, hash) while invalidations (which carry
    /// only the hash) still find it. Another client's miss overwrites it,
    /// which costs at most a lookup, never a wrong refusal.
    unknown: Cache<SecretHash, Missing, RandomState>,
    /// Store lookups under way: requests that miss the cache for the same
    /// key at the same moment share one lookup instead of each asking the
    /// store (a popular key after an invalidation, a cold start).
    /// Keyed by store version too: a request that comes after a write
    /// must not join a lookup that may have read the store before it.
    in_flight: Cache<(String, SecretHash, Option<u64>), Lookup>,
    /// Certificate callers by client ID (see the module doc). Separate
    /// from `known`: a key entry is found by its secret's hash, a client by
    /// its name, and a client's record must not be mistaken for a key's.
    clients: Cache<String, Arc<cert::CachedClient>, RandomState>,
    /// The source keys of access tokens, by key ID (see `token.rs`): a
    /// token names its key by ID, not by secret, so it cannot use `known`.
    /// Dropped with the key's or client's invalidation like `known`.
    token_keys: Cache<String, Arc<Caller>, RandomState>,
    /// Failed authentications per source IP; `None` when switched off.
    failures: Option<AuthFailures>,
    /// The global cap on store lookups for keys not cached; `None`: off.
    /// A direct governor limiter is one atomic compare-and-swap, no lock.
    lookups: Option<RateLimiter<NotKeyed, InMemoryState, DefaultClock>>,
    cache_ttl: Duration,
    negative_ttl: Duration,
    stale_window: Duration,
    /// Bumped by [`Invalidation::All`]: every entry from an older epoch is
    /// re-checked with the store (in the background while it is within
    /// `cache_ttl`), and stays usable (within the stale window) if the store
    /// cannot answer. Dropping them instead would turn a Redis restart,
    /// which is exactly when `All` arrives, into 503s for keys verified a
    /// moment before.
    epoch: AtomicU64,
    /// Bumped by every invalidation: a lookup that overlapped one does not
    /// cache a "not found", which the store may have given before the key
    /// was issued (a new key must not be refused for `negative_ttl`).
    generation: AtomicU64,
    /// Bumped by [`Invalidation::Key`]: a lookup that overlapped one does
    /// not cache its record, which the store may have read before the
    /// change (a revoked key must not come back for `cache_ttl`). `All` is
    /// covered by the epoch; `Issued` cannot make a found record wrong.
    changes: AtomicU64,
    /// This verifier, for the background refreshes it spawns.
    me: Weak<Verifier>,
}

/// A "not found" answer as the negative cache holds it: whose, and at
/// which store version (see [`Cached::store_version`]).
#[derive(Debug, Clone)]
struct Missing {
    client: Arc<str>,
    store_version: Option<u64>,
}

impl Missing {
    fn holds_for(&self, client: &str, store_version: Option<u64>) -> bool {
        *self.client == *client && self.store_version == store_version
    }
}

/// One store lookup, awaited by every request that needs its answer.
type Lookup = Arc<tokio::sync::OnceCell<Result<Option<Arc<Caller>>, LookupError>>>;

/// Why a store lookup gave no answer. `StoreError` is not `Clone`, and a
/// shared lookup's answer is handed to every request waiting on it.
#[derive(Debug, Clone)]
enum LookupError {
    /// The store could not be asked (down, slow, erroring): cached records
    /// may still be served within the stale window.
    Unavailable(String),
    /// The store has a record it cannot decode: the key is refused.
    Corrupt(String),
    /// The global lookup cap was reached; the store was not asked.
    Throttled(Duration),
}

/// Why verification refused a key, for the log only: the client sees one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Malformed(key::KeyFormatError),
    Unknown,
    ClientMismatch,
    Expired,
    Revoked,
    /// The key's client is revoked (every key of it is refused).
    ClientRevoked,
}

impl Rejection {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Unknown => "unknown",
            Self::ClientMismatch => "client mismatch",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::ClientRevoked => "client revoked",
        }
    }
}

impl From<Rejection> for GatewayError {
    fn from(rejection: Rejection) -> Self {
        GatewayError::KeyRejected(rejection.reason())
    }
}

// === impl Verifier ===

impl Verifier {
    pub fn new(store: SharedStore, keys: &KeysConfig) -> Arc<Self> {
        let known = Cache::builder()
            .max_capacity(keys.cache_capacity)
            // For `Invalidation::Client`: drop every entry of one client.
            .support_invalidation_closures()
            // Past this nobody may use the entry, fresh or stale: let it go.
            .time_to_live(keys.cache_ttl + keys.stale_window)
            .build_with_hasher(RandomState::default());
        let unknown = Cache::builder()
            .max_capacity(keys.cache_capacity)
            .time_to_live(keys.negative_ttl)
            .build_with_hasher(RandomState::default());
        let clients = Cache::builder()
            .max_capacity(keys.cache_capacity)
            .time_to_live(keys.cache_ttl + keys.stale_window)
            .build_with_hasher(RandomState::default());
        let token_keys = Cache::builder()
            .max_capacity(keys.cache_capacity)
            .support_invalidation_closures()
            .time_to_live(keys.cache_ttl)
            .build_with_hasher(RandomState::default());
        // An entry lives only while its lookup runs (it is removed when the
        // answer is in); the TTL only cleans up after a cancelled request.
        let in_flight =
            Cache::builder().max_capacity(keys.cache_capacity).time_to_live(Duration::from_secs(5)).build();
        let failures = keys
            .auth_failures_per_ip
            .map(|rate| AuthFailures::new(rate, keys.auth_failures_burst, keys.cache_capacity));
        let lookups = keys.store_lookups_per_second.map(|n| RateLimiter::direct(Quota::per_second(n)));
        Arc::new_cyclic(|me| Self {
            store,
            prefix: keys.prefix.clone(),
            known,
            unknown,
            clients,
            token_keys,
            in_flight,
            failures,
            lookups,
            cache_ttl: keys.cache_ttl,
            negative_ttl: keys.negative_ttl,
            stale_window: keys.stale_window,
            epoch: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            me: me.clone(),
        })
    }

    /// Verifies a presented key string from `source` (the peer's IP): the
    /// source's failure budget, format and checksum, then the cache, then
    /// the store. Returns the record of a usable key.
    ///
    /// `arrived` is when the request arrived (the handler reads it anyway):
    /// a cached record's age is counted to it, which spares a clock read per
    /// request. A record cached after it counts as fresh.
    pub async fn verify(
        &self,
        presented: &str,
        source: IpAddr,
        arrived: Instant,
    ) -> Result<Arc<Caller>, GatewayError> {
        let rejected = |error: &GatewayError| matches!(error, GatewayError::KeyRejected(_));
        let verifying = self.verify_key(presented, arrived);
        self.within_failure_budget(source, || self.is_cached(presented), rejected, verifying).await
    }

    /// Verifies a key on behalf of a trusted backend (`POST /admin/verify`):
    /// as [`Self::verify`], cache and store alike, but outside any source's
    /// failed-authentication budget. The caller holds the admin token and
    /// asks for many end users at once; counting their bad keys against the
    /// backend's address would lock every user of it out. The global cap
    /// on store lookups still applies. Rejections are not counted in
    /// `keygate_auth_failures_total` either: that counts the public
    /// listener's keyed requests, each charged to a source's budget.
    pub async fn verify_for_backend(&self, presented: &str) -> Result<Arc<Caller>, GatewayError> {
        self.verify_key(presented, Instant::now()).await
    }

    /// Runs `verify` (a key's or a token's verification) under `source`'s
    /// failed-authentication budget: a source over it is refused without
    /// verification, unless `known` (the credential is in the cache); a
    /// `rejected` outcome spends the budget, and a trial's success gives it
    /// back.
    ///
    /// The budget keeps a flood of made-up credentials off the store and the
    /// signature checks. One the cache knows is not made up: verifying it
    /// (even a re-check with the store once its `cache_ttl` is up) is bounded
    /// by the cache, not by the attacker, so it goes on as usual. A
    /// misbehaving client behind the same address (an office NAT, a shared
    /// egress) thus does not lock out its neighbours' working keys.
    pub(crate) async fn within_failure_budget<T>(
        &self,
        source: IpAddr,
        known: impl FnOnce() -> bool,
        rejected: impl Fn(&GatewayError) -> bool,
        verify: impl std::future::Future<Output = Result<T, GatewayError>>,
    ) -> Result<T, GatewayError> {
        let admission = match &self.failures {
            Some(failures) => failures.admit(source),
            None => Admission::Free,
        };
        if let Admission::Refused(retry_after) = admission
            && !known()
        {
            crate::metrics::auth_failures_refused();
            return Err(GatewayError::TooManyAuthFailures { retry_after });
        }
        let verified = verify.await;
        let failed = verified.as_ref().err().is_some_and(&rejected);
        if let Some(failures) = &self.failures {
            if failed {
                failures.failed(source);
            } else if admission == Admission::Trial {
                failures.passed(source);
            }
        }
        if failed {
            crate::metrics::auth_failure();
        }
        verified
    }

    /// Whether the cache holds a record for this key string's secret and
    /// client, whatever its age; never asks the store.
    fn is_cached(&self, presented: &str) -> bool {
        key::parse(presented, &self.prefix).is_ok_and(|parsed| {
            self.known
                .get(&parsed.secret_hash())
                .is_some_and(|cached| cached.record.client() == parsed.client)
        })
    }

    /// Where the store stands, caught up first if another process wrote.
    async fn store_version(&self) -> Result<Option<u64>, GatewayError> {
        Ok(match self.store.version() {
            StoreVersion::Untracked => None,
            StoreVersion::At(version) => Some(version),
            // Another process wrote: read that before answering (boxed: rare).
            StoreVersion::Behind => Some(
                Box::pin(self.store.catch_up())
                    .await
                    .map_err(|e| GatewayError::StoreUnavailable(e.to_string()))?,
            ),
        })
    }

    async fn verify_key(&self, presented: &str, arrived: Instant) -> Result<Arc<Caller>, GatewayError> {
        let parsed = key::parse(presented, &self.prefix).map_err(Rejection::Malformed)?;
        let hash = parsed.secret_hash();
        let store_version = self.store_version().await?;
        let record = self.lookup(parsed.client, &hash, store_version, arrived).await?;
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
        store_version: Option<u64>,
        arrived: Instant,
    ) -> Result<Arc<Caller>, GatewayError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        // An entry from another store version counts as expired: checked
        // in front of this request, and not against the lookup cap.
        let cached = self.known.get(hash);
        if let Some(cached) = &cached {
            let young = cached.store_version == store_version
                && arrived.saturating_duration_since(cached.fetched_at) < self.cache_ttl;
            if young && cached.epoch == epoch {
                crate::metrics::cache_hit();
                return Ok(Arc::clone(&cached.record));
            }
            // A hash belongs to one record, and a record to one client: no
            // store answer for another client can make this key valid, and
            // asking must not disturb the owner's entry.
            if cached.record.client() != client {
                return Err(Rejection::ClientMismatch.into());
            }
            if young {
                // Only the epoch moved (e.g. a Redis reconnect): serve what
                // the store vouched for within `cache_ttl`, and re-check it
                // behind this request instead of in front of it.
                crate::metrics::cache_hit();
                self.refresh_in_background(cached, client, hash, epoch);
                return Ok(Arc::clone(&cached.record));
            }
        }
        crate::metrics::cache_miss();
        if cached.is_none() && self.unknown.get(hash).is_some_and(|m| m.holds_for(client, store_version)) {
            return Err(Rejection::Unknown.into());
        }
        // Boxed: a miss is the rare path, and every connection's request
        // future would otherwise be sized for the store lookup. Only keys
        // not cached at all count against the lookup cap: re-checking a
        // cached key is bounded by the cache itself.
        match Box::pin(self.ask_store(client, hash, epoch, store_version, cached.is_none())).await {
            Ok(Some(record)) => Ok(record),
            Ok(None) => Err(Rejection::Unknown.into()),
            Err(LookupError::Throttled(retry_after)) => Err(GatewayError::LookupsThrottled { retry_after }),
            Err(LookupError::Corrupt(error)) => Err(GatewayError::CorruptRecord(error)),
            Err(LookupError::Unavailable(error)) => match cached {
                // The store is down, but it vouched for this key recently enough.
                Some(cached) if cached.fetched_at.elapsed() < self.cache_ttl + self.stale_window => {
                    tracing::warn!(%error, key_id = cached.record.key_id().unwrap_or("-"), "key store unavailable; serving cached key");
                    Ok(Arc::clone(&cached.record))
                }
                _ => Err(GatewayError::StoreUnavailable(error)),
            },
        }
    }

    /// Re-checks a cached entry with the store on a task of its own, unless
    /// another request already started that. The answer lands in the cache
    /// as a request's would ([`Self::ask_store`]); an unreachable store
    /// leaves the entry as it is, to be re-checked once `cache_ttl` is up.
    fn refresh_in_background(&self, cached: &Arc<Cached>, client: &str, hash: &SecretHash, epoch: u64) {
        if cached.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (Some(me), Ok(runtime)) = (self.me.upgrade(), tokio::runtime::Handle::try_current()) else {
            cached.refreshing.store(false, Ordering::Release);
            return;
        };
        crate::metrics::cache_refresh();
        let (entry, client, hash) = (Arc::clone(cached), client.to_owned(), *hash);
        runtime.spawn(async move {
            // An `All` usually comes from a reconnect, and the store may not
            // answer for a moment after it: retry with a growing pause while
            // the entry is young, so a store that came back empty refuses
            // the key within about a second, not at the end of `cache_ttl`.
            let mut pause = Duration::from_millis(50);
            let mut epoch = epoch;
            let mut warned = false;
            loop {
                match me.ask_store(&client, &hash, epoch, entry.store_version, false).await {
                    Err(LookupError::Unavailable(error)) if entry.fetched_at.elapsed() < me.cache_ttl => {
                        if !warned {
                            tracing::warn!(%error, key_id = entry.record.key_id().unwrap_or("-"), "key store unavailable; re-checking the cached key in the background");
                            warned = true;
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                        epoch = me.epoch.load(Ordering::Acquire);
                    }
                    // Past `cache_ttl` the next request re-checks in front.
                    Err(LookupError::Unavailable(_)) => return,
                    // Normally the entry was replaced or dropped; if another
                    // invalidation kept the answer out, the next request retries.
                    _ => {
                        entry.refreshing.store(false, Ordering::Release);
                        return;
                    }
                }
            }
        });
    }

    /// Asks the store for `client`'s record with this hash, sharing the
    /// lookup with every request asking the same at the same time, and
    /// caches the answer (known, unknown, or neither for a corrupt record).
    /// `capped`: the lookup counts against `store_lookups_per_second`.
    async fn ask_store(
        &self,
        client: &str,
        hash: &SecretHash,
        epoch: u64,
        store_version: Option<u64>,
        capped: bool,
    ) -> Result<Option<Arc<Caller>>, LookupError> {
        let key = (client.to_owned(), *hash, store_version);
        let lookup = self.in_flight.get_with_by_ref(&key, || Arc::new(tokio::sync::OnceCell::new()));
        let answer = lookup
            .get_or_init(|| async {
                // A lookup that finished between this request's cache check
                // and now has already answered: read that, not the store.
                if let Some(hit) = self.known.get(hash)
                    && hit.epoch == epoch
                    && hit.store_version == store_version
                    && hit.fetched_at.elapsed() < self.cache_ttl
                {
                    return Ok(Some(Arc::clone(&hit.record)));
                }
                if self.unknown.get(hash).is_some_and(|m| m.holds_for(client, store_version)) {
                    return Ok(None);
                }
                if capped
                    && let Some(lookups) = &self.lookups
                    && let Err(not_until) = lookups.check()
                {
                    crate::metrics::store_lookup_throttled();
                    return Err(LookupError::Throttled(
                        not_until.wait_time_from(DefaultClock::default().now()),
                    ));
                }
                let (generation, changes) =
                    (self.generation.load(Ordering::Acquire), self.changes.load(Ordering::Acquire));
                let asked = Instant::now();
                let answer = self.store.find_for_verification(client, hash).await;
                crate::metrics::redis_latency(asked.elapsed());
                // An invalidation while the store was asked may postdate
                // the answer: use it for these requests, but do not cache it.
                let cache_found = self.changes.load(Ordering::Acquire) == changes;
                let cache_missing = self.generation.load(Ordering::Acquire) == generation;
                // Cached here, before the lookup leaves `in_flight`, so a
                // request arriving in between finds the answer, not a gap.
                match answer {
                    Ok(Some(record)) => {
                        let record = Arc::new(Caller::new(record));
                        if cache_found {
                            let entry = Cached {
                                record: Arc::clone(&record),
                                fetched_at: Instant::now(),
                                epoch,
                                store_version,
                                refreshing: AtomicBool::new(false),
                            };
                            self.known.insert(*hash, Arc::new(entry));
                        }
                        Ok(Some(record))
                    }
                    Ok(None) => {
                        self.drop_known(client, hash);
                        if cache_missing {
                            self.unknown.insert(*hash, Missing { client: Arc::from(client), store_version });
                        }
                        Ok(None)
                    }
                    Err(error @ StoreError::Corrupt { .. }) => {
                        // Fail closed: whatever was cached is no longer what
                        // the store says, and what it says cannot be used.
                        self.drop_known(client, hash);
                        Err(LookupError::Corrupt(error.to_string()))
                    }
                    Err(error) => {
                        crate::metrics::redis_error();
                        Err(LookupError::Unavailable(error.to_string()))
                    }
                }
            })
            .await
            .clone();
        // The next miss (after an invalidation, or an error) asks afresh.
        self.in_flight.invalidate(&key);
        answer
    }

    /// Drops the cached record with this hash if it is `client`'s: the
    /// store's answer about one client says nothing about another's entry.
    fn drop_known(&self, client: &str, hash: &SecretHash) {
        if self.known.get(hash).is_some_and(|cached| cached.record.client() == client) {
            self.known.invalidate(hash);
        }
    }

    /// Applies one invalidation from the store.
    pub fn invalidate(&self, invalidation: &Invalidation) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        match invalidation {
            Invalidation::Key(hash) => {
                self.changes.fetch_add(1, Ordering::AcqRel);
                self.known.invalidate(hash);
                self.unknown.invalidate(hash);
                let hash = *hash;
                self.forget_token_key(move |caller| caller.key().is_some_and(|key| key.secret_hash == hash));
            }
            // Every cached key of the client carries the client's old record.
            // moka guarantees `get` no longer returns a matching entry once
            // this returns, though it removes them in the background. The
            // client's "unknown" answers stay right: a client record makes
            // no unknown key known.
            Invalidation::Client(client) => {
                self.changes.fetch_add(1, Ordering::AcqRel);
                self.clients.invalidate(client);
                let of_client = client.clone();
                self.forget_token_key(move |caller| caller.client() == of_client);
                let client = client.clone();
                let dropped =
                    self.known.invalidate_entries_if(move |_, cached| cached.record.client() == client);
                if let Err(error) = dropped {
                    // Only if the cache was built without closures, which
                    // `new` does not do; fail safe all the same.
                    tracing::warn!(%error, "cannot drop one client's keys; flushing the key cache");
                    self.known.invalidate_all();
                }
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
                self.token_keys.invalidate_all();
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

    /// Whether a record with this hash is cached and current (fetched in
    /// the current epoch), e.g. once a background refresh is done (tests).
    pub fn is_current(&self, hash: &SecretHash) -> bool {
        let epoch = self.epoch.load(Ordering::Acquire);
        self.known.get(hash).is_some_and(|cached| cached.epoch == epoch)
    }
}

/// Refuses a revoked or expired key, and any caller of a revoked client.
///
/// `now` is called only for a key that expires: most keys never do, and a
/// clock read is a measurable part of a cached verification.
fn check_usable(caller: &Caller, now: impl FnOnce() -> Timestamp) -> Result<(), Rejection> {
    use crate::meta::KeyStatus;
    let key = caller.key();
    if key.is_some_and(|record| record.meta.status == KeyStatus::Revoked) {
        return Err(Rejection::Revoked);
    }
    if caller.client.as_ref().is_some_and(|client| client.meta.is_revoked()) {
        return Err(Rejection::ClientRevoked);
    }
    if key.and_then(|record| record.meta.expires_at).is_some_and(|at| now() >= at) {
        return Err(Rejection::Expired);
    }
    Ok(())
}

// === Failed authentications per source ===

/// The budget of failed authentications of every source IP.
///
/// A moka cache of direct governor limiters rather than governor's keyed
/// limiter: bounded in size by construction, and a source idle for as long
/// as its whole burst takes to refill is dropped (its limiter would be full
/// again anyway, so dropping it forgets nothing). Sources that never failed
/// have no entry, so a good client's check is one sharded lookup that finds
/// nothing: no lock, no allocation, no clock read.
///
/// A source whose failure the limiter refuses is blocked until the limiter
/// has a cell again: its keyed requests are refused without being looked
/// at, and the first one after that is verified (and, if it fails, blocks
/// again). Over time a source thus gets at most the configured rate of
/// failed verifications.
pub struct AuthFailures<C: Clock = DefaultClock> {
    sources: Cache<IpAddr, Arc<FailureBudget<C>>, RandomState>,
    quota: Quota,
    clock: C,
    /// The reference instant `blocked_until` counts from.
    base: C::Instant,
    /// Nanoseconds one failure's cell takes to refill.
    per_cell: u64,
}

/// What [`AuthFailures::admit`] says about a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Not blocked: verify as usual.
    Free,
    /// The block just ended: verify this one request; the others wait.
    Trial,
    /// Blocked for this much longer: refuse unverified.
    Refused(Duration),
}

/// One source's budget.
struct FailureBudget<C: Clock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    /// Nanoseconds since [`AuthFailures::base`] until which this source is
    /// refused; 0 while it never was. An atomic, so the check takes no lock.
    blocked_until: AtomicU64,
}

impl AuthFailures<DefaultClock> {
    pub fn new(rate: Rate, burst: NonZeroU32, max_sources: u64) -> Self {
        Self::with_clock(rate, burst, max_sources, DefaultClock::default())
    }
}

impl<C> AuthFailures<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    pub fn with_clock(rate: Rate, burst: NonZeroU32, max_sources: u64, clock: C) -> Self {
        // A zero period (a rate finer than a nanosecond) means no limit to speak of.
        let per_cell = (rate.period / rate.count.get()).max(Duration::from_nanos(1));
        let quota =
            Quota::with_period(per_cell).unwrap_or(Quota::per_second(NonZeroU32::MIN)).allow_burst(burst);
        let refill = per_cell.saturating_mul(burst.get()).max(Duration::from_secs(1));
        let sources = Cache::builder()
            .max_capacity(max_sources)
            .time_to_idle(refill)
            .build_with_hasher(RandomState::default());
        let base = clock.now();
        let per_cell = u64::try_from(per_cell.as_nanos()).unwrap_or(u64::MAX);
        Self { sources, quota, clock, base, per_cell }
    }

    /// Whether a keyed request from `ip` may be verified now.
    ///
    /// When a block ends, one request (the first to see it end) is let
    /// through on trial and the others are held back for one cell's time:
    /// otherwise every request in flight at that moment would be verified,
    /// and a client with many connections would get its concurrency times
    /// the rate. A trial that does not fail ends the block ([`Self::passed`]).
    pub fn admit(&self, ip: IpAddr) -> Admission {
        let Some(budget) = self.sources.get(&source_of(ip)) else { return Admission::Free };
        let until = budget.blocked_until.load(Ordering::Acquire);
        if until == 0 {
            return Admission::Free;
        }
        let now = self.clock.now().duration_since(self.base).as_u64();
        if now < until {
            return Admission::Refused(Duration::from_nanos(until - now));
        }
        let hold = now.saturating_add(self.per_cell);
        match budget.blocked_until.compare_exchange(until, hold, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Admission::Trial,
            Err(0) => Admission::Free,
            Err(newer) if now < newer => Admission::Refused(Duration::from_nanos(newer - now)),
            Err(_) => Admission::Free,
        }
    }

    /// The request admitted on trial from `ip` did not fail: the block is over.
    pub fn passed(&self, ip: IpAddr) {
        if let Some(budget) = self.sources.get(&source_of(ip)) {
            budget.blocked_until.store(0, Ordering::Release);
        }
    }

    /// Counts one failed authentication from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let budget = self.sources.get_with(source_of(ip), || {
            Arc::new(FailureBudget {
                limiter: RateLimiter::direct_with_clock(self.quota, self.clock.clone()),
                blocked_until: AtomicU64::new(0),
            })
        });
        if let Err(not_until) = budget.limiter.check() {
            let now = self.clock.now();
            let wait = u64::try_from(not_until.wait_time_from(now).as_nanos()).unwrap_or(u64::MAX);
            let until = now.duration_since(self.base).as_u64().saturating_add(wait).max(1);
            budget.blocked_until.fetch_max(until, Ordering::AcqRel);
        }
    }
}

/// What a source IP's failures are counted under: an IPv4 address (also
/// when written IPv4-mapped), or an IPv6 address's /64, since one host or
/// customer is routinely handed a whole /64 and could otherwise rotate
/// through addresses for free.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn budget(rate: &str, burst: u32) -> (AuthFailures<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let rate: Rate = rate.parse().unwrap();
        let failures = AuthFailures::with_clock(rate, NonZeroU32::new(burst).unwrap(), 1000, clock.clone());
        (failures, clock)
    }

    fn refused(admission: Admission) -> bool {
        matches!(admission, Admission::Refused(_))
    }

    #[test]
    fn a_source_is_refused_once_over_its_burst_until_a_cell_refills() {
        let (failures, clock) = budget("10/s", 5);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..6 {
            assert_eq!(failures.admit(ip), Admission::Free);
            failures.failed(ip);
        }
        // The sixth failure was over the burst: from now on, refused.
        let Admission::Refused(wait) = failures.admit(ip) else { panic!("over budget") };
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        clock.advance(Duration::from_millis(50));
        assert!(refused(failures.admit(ip)), "one cell takes 100 ms");
        clock.advance(Duration::from_millis(50));
        // A cell has refilled: one request on trial, the rest held back.
        assert_eq!(failures.admit(ip), Admission::Trial);
        assert!(refused(failures.admit(ip)), "only one trial at a time");
        failures.failed(ip);
        assert!(refused(failures.admit(ip)));
        clock.advance(Duration::from_millis(100));
        assert_eq!(failures.admit(ip), Admission::Trial);
        // A trial that passes ends the block.
        failures.passed(ip);
        assert_eq!(failures.admit(ip), Admission::Free);
    }

    #[test]
    fn a_flood_gets_the_rate_not_its_concurrency_times_the_rate() {
        let (failures, clock) = budget("20/s", 10);
        let ip: IpAddr = "192.0.2.8".parse().unwrap();
        let mut verified = 0;
        // 10 s of 8 requests every millisecond, all failing.
        for _ in 0..10_000 {
            // All eight are admitted (or not) before any of them fails, as
            // concurrent requests are.
            let admitted = (0..8).filter(|_| !refused(failures.admit(ip))).count();
            for _ in 0..admitted {
                verified += 1;
                failures.failed(ip);
            }
            clock.advance(Duration::from_millis(1));
        }
        assert!((200..=10 + 200 + 8).contains(&verified), "{verified} failures verified");
    }

    #[test]
    fn other_sources_are_not_affected_and_v6_counts_per_64() {
        let (failures, _clock) = budget("1/s", 1);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        failures.failed(a);
        failures.failed(same_64);
        assert!(refused(failures.admit(a)));
        assert!(refused(failures.admit(same_64)), "the same /64 shares a budget");
        assert_eq!(failures.admit(other_64), Admission::Free);
        assert_eq!(failures.admit("192.0.2.1".parse().unwrap()), Admission::Free);
        let mapped: IpAddr = "::ffff:192.0.2.9".parse().unwrap();
        failures.failed("192.0.2.9".parse().unwrap());
        failures.failed(mapped);
        assert!(refused(failures.admit("192.0.2.9".parse().unwrap())), "v4-mapped is the v4 source");
    }
}
