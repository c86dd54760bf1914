//! Rate limits and quotas, and the headers that report them.
//!
//! A request is limited by its **subjects**: its key, and its client when the
//! client's record carries limits shared by all of the client's keys (and
//! by its tokens and certificates). [`Limits::admit`] is the handler's one
//! call; it takes the subjects as [`Subject`]s, so this layer knows nothing
//! of where their limits come from. It commits all or nothing, across every
//! subject and every kind of limit:
//!
//! 1. **Quotas**, every subject's in turn. Taken units can be given back
//!    exactly, so when one subject's quota refuses, the units already taken
//!    from the others go back.
//! 2. **Credits** (`credits.rs`), every subject's in turn, spent exactly
//!    (never leased). When one subject's credits refuse, the credits spent
//!    from the others and every quota unit go back.
//! 3. **Rates**, every subject's in one decision (`rate.rs` locally,
//!    `shared.rs` through Redis): a cell is taken from each or from none.
//!    If the rates refuse, every credit and quota unit taken above goes back.
//!
//! So a request refused by any limit of any subject spends nothing of any
//! other.
//!
//! Counters are kept per subject under its kind and ID (a key's under the
//! ID it counts as: a rotated key's successor counts with it), so a key
//! and a client never share one, whatever their IDs.
//!
//! - `rate.rs`: local mode, one governor limiter per subject (the default).
//! - `shared.rs`: shared mode (`[limits] mode = "redis"`), leased slices of
//!   Redis token buckets, and the Redis quota authority.
//! - `quota.rs`: quota windows and exact leasing.
//! - `outage.rs`: when Redis is unreachable, decide locally for a while.
//! - `credits.rs`: usage credits, spent exactly (never leased) per request.
//!
//! While Redis is unreachable (`fail_open = true`), a quota spends what this
//! instance leased plus `outage_allowance` of it, then answers 503; a shared
//! rate limit falls back to a local limiter at `rate / instances`. The bound
//! this gives is in `docs/limits.md`, and holds for client limits as for
//! key limits.

pub mod credits;
pub mod outage;
pub mod quota;
pub mod rate;
pub mod shared;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use jiff::Timestamp;

use crate::client::ClientRecord;
use crate::config::{LimitMode, LimitsConfig};
use crate::error::{GatewayError, Refusal};
use crate::meta::{CreditGrant, Quota, Rate};
use crate::store::KeyRecord;
use quota::{ProcessAuthority, QuotaAuthority, QuotaDecision, Quotas};
use rate::{LocalRates, RateSubject, RatesDecision};
use shared::{LimitKeys, RedisQuotaAuthority, SharedRates};

/// The most subjects one admission takes (a key and its client need two;
/// room for two more). More are refused as an internal error.
pub const MAX_SUBJECTS: usize = 4;

/// What a subject is: its counters and header names depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SubjectKind {
    /// One key (its own limits).
    Key,
    /// A client: limits shared by all of its keys.
    Client,
}

impl SubjectKind {
    /// How many kinds there are: the per-kind maps are arrays of this size.
    pub(crate) const COUNT: usize = 2;

    pub(crate) fn index(self) -> usize {
        match self {
            Self::Key => 0,
            Self::Client => 1,
        }
    }

    /// The RateLimit header items of this kind's rate and quota.
    fn policy_names(self) -> (&'static str, &'static str) {
        match self {
            Self::Key => ("rate", "quota"),
            Self::Client => ("client-rate", "client-quota"),
        }
    }
}

/// One subject of an admission: who is counted, and its limits.
///
/// All subjects of one admission belong to one client, so that in shared
/// mode their counters sit in one Redis slot (one script decides them all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject<'a> {
    pub kind: SubjectKind,
    /// The counters' identity: for a key the ID it counts as
    /// ([`KeyRecord::counts_as`]), for a client its ID.
    pub id: &'a str,
    pub rate: Option<Rate>,
    /// Defaults to the rate's count.
    pub burst: Option<NonZeroU32>,
    pub quota: Option<Quota>,
    /// Usage credits granted; the count left lives with the credit authority.
    pub credits: Option<&'a CreditGrant>,
}

impl<'a> Subject<'a> {
    /// A key's own limits, counted under the ID it counts as.
    pub fn key(record: &'a KeyRecord) -> Self {
        let meta = &record.meta;
        Self {
            kind: SubjectKind::Key,
            id: record.counts_as().as_str(),
            rate: meta.rate,
            burst: meta.burst,
            quota: meta.quota,
            credits: meta.credits.as_ref(),
        }
    }

    /// A client's limits, shared by all of its keys.
    pub fn client(id: &'a str, rate: Option<Rate>, burst: Option<NonZeroU32>, quota: Option<Quota>) -> Self {
        Self { kind: SubjectKind::Client, id, rate, burst, quota, credits: None }
    }

    /// The same subject with usage credits.
    pub fn with_credits(self, credits: Option<&'a CreditGrant>) -> Self {
        Self { credits, ..self }
    }

    fn credit_owner(&self) -> credits::Owner<'a> {
        match self.kind {
            SubjectKind::Key => credits::Owner::Key(self.id),
            SubjectKind::Client => credits::Owner::Client(self.id),
        }
    }

    fn rate(&self) -> Option<RateSubject<'a>> {
        let rate = self.rate?;
        Some(RateSubject { kind: self.kind, id: self.id, rate, burst: self.burst.unwrap_or(rate.count) })
    }
}

/// Where rate limits are counted.
enum Rates {
    Local(LocalRates),
    /// Shared through Redis, and this instance's share of each rate,
    /// enforced locally while Redis is unreachable.
    Shared {
        /// Boxed: much larger than a local map, and only one per gateway.
        shared: Box<SharedRates>,
        fallback: LocalRates,
    },
}

/// The limits of every key and client, on this instance.
/// Built once at start: the mode and lease sizes need a restart to change;
/// `fail_open` and the header switches are read from the running config.
pub struct Limits {
    rates: Rates,
    quotas: Quotas,
    /// Where usage credits are counted (the store's Redis or key folder).
    credits: credits::Credits,
}

/// What an admitted request may report in its headers: each subject's
/// policies (a refusal reports only the one that refused).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admission {
    pub key: Policies,
    pub client: Policies,
    /// Credits left after this request: the fewest of any subject with
    /// credits (what the client can still spend); `None` if none has any.
    pub credits: Option<u64>,
}

impl Admission {
    fn of(&mut self, kind: SubjectKind) -> &mut Policies {
        match kind {
            SubjectKind::Key => &mut self.key,
            SubjectKind::Client => &mut self.client,
        }
    }
}

/// One subject's policies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policies {
    pub rate: Option<PolicyState>,
    pub quota: Option<PolicyState>,
}

/// One policy's numbers, as the RateLimit headers give them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyState {
    /// The policy's size (burst for rate, count for quota).
    pub limit: u64,
    /// Its window in seconds.
    pub window_secs: u64,
    pub remaining: u64,
    /// Seconds until fully replenished / reset.
    pub reset_secs: u64,
}

/// A refusal, and the policy that refused as its headers report it
/// (nothing remaining).
struct Refused {
    error: GatewayError,
    policy: Admission,
}

impl Refused {
    /// A refusal no policy stands for (the limit store failed).
    fn unavailable(what: String) -> Self {
        Self { error: GatewayError::StoreUnavailable(what), policy: Admission::default() }
    }

    fn rate(subject: &RateSubject<'_>, retry_after: Duration) -> Self {
        let mut policy = Admission::default();
        policy.of(subject.kind).rate = Some(PolicyState {
            limit: u64::from(subject.burst.get()),
            window_secs: subject.rate.period.as_secs().max(1),
            remaining: 0,
            reset_secs: ceil_secs(retry_after),
        });
        Self { error: GatewayError::RateLimited { retry_after }, policy }
    }

    fn quota(kind: SubjectKind, quota: Quota, retry_after: Duration, now: Timestamp) -> Self {
        let mut policy = Admission::default();
        policy.of(kind).quota = Some(PolicyState {
            limit: quota.count,
            window_secs: quota::Window::containing(quota.window, now).policy_secs(),
            remaining: 0,
            reset_secs: ceil_secs(retry_after),
        });
        Self { error: GatewayError::QuotaExceeded { retry_after }, policy }
    }
}

impl Limits {
    /// Limits on this instance. `redis` is the store's Redis connection when
    /// the store is Redis: quotas are then counted there (exact across
    /// instances), and in shared mode rate limits too.
    pub fn new(config: &LimitsConfig, redis: Option<(crate::store::conn::RedisConn, &str)>) -> Self {
        let max_keys = config.max_tracked_keys;
        let (rates, authority): (Rates, Arc<dyn QuotaAuthority>) = match redis {
            Some((ref conn, prefix)) => {
                let conn = conn.clone();
                let keys = LimitKeys::new(prefix);
                let authority = Arc::new(RedisQuotaAuthority::new(conn.clone(), keys.clone()));
                let rates = match config.mode {
                    LimitMode::Local => Rates::Local(LocalRates::new(max_keys, config.idle_eviction)),
                    LimitMode::Redis => Rates::Shared {
                        shared: Box::new(SharedRates::new(
                            conn,
                            keys,
                            config.lease_fraction,
                            config.lease_ttl,
                        )),
                        fallback: LocalRates::new(max_keys, config.idle_eviction),
                    },
                };
                (rates, authority)
            }
            None => (
                Rates::Local(LocalRates::new(max_keys, config.idle_eviction)),
                Arc::new(ProcessAuthority::default()),
            ),
        };
        let credits = match redis {
            Some((conn, prefix)) => credits::Credits::redis(conn, prefix),
            None => credits::Credits::memory(),
        };
        Self { rates, quotas: Quotas::new(authority, config.quota_lease, max_keys), credits }
    }

    /// Where this gateway counts usage credits (`keys show` reads them here).
    pub fn credits(&self) -> &credits::Credits {
        &self.credits
    }

    /// The same limits with credits counted by `credits` (e.g. the file
    /// store's folder, which [`Limits::new`] does not know).
    pub fn with_credits(mut self, credits: credits::Credits) -> Self {
        self.credits = credits;
        self
    }

    /// Admits a request of `cost` units for all of `subjects` (the key
    /// first, then its client), or refuses it with 429 and, when the config
    /// asks for them, the RateLimit headers of the policy that refused.
    /// A refusal spends nothing of any subject. If the limit store fails,
    /// the running config's `fail_open` decides: bounded local decisions
    /// (leases, the outage allowance, the instance's share of the rate), or
    /// 503.
    pub async fn admit(
        &self,
        subjects: &[Subject<'_>],
        cost: NonZeroU32,
        live: &LimitsConfig,
    ) -> Result<Admission, Refusal> {
        self.decide(subjects, cost, live).await.map_err(|Refused { error, policy }| {
            let mut headers = HeaderMap::new();
            if live.headers {
                write_headers(&mut headers, &policy, live.legacy_headers);
            }
            if let GatewayError::CreditsExhausted { remaining, .. } = &error {
                headers.insert(CREDITS_REMAINING, HeaderValue::from(*remaining));
            }
            Refusal { error, headers }
        })
    }

    /// [`Limits::admit`] for a verified caller's subjects: its key's own
    /// limits (if a key was presented), then its client's record's (shared
    /// by all of the client's keys and certificates). The proxy and
    /// `POST /admin/verify` spend through this one call.
    pub async fn admit_caller(
        &self,
        key: Option<&KeyRecord>,
        client: Option<&ClientRecord>,
        cost: NonZeroU32,
        live: &LimitsConfig,
    ) -> Result<Admission, Refusal> {
        let key = key.map(Subject::key);
        let client = client.map(|client| {
            let meta = &client.meta;
            Subject::client(&client.id, meta.rate, meta.burst, meta.quota).with_credits(meta.credits.as_ref())
        });
        let (both, one);
        let subjects: &[Subject<'_>] = match (key, client) {
            (Some(key), Some(client)) => {
                both = [key, client];
                &both
            }
            (Some(subject), None) | (None, Some(subject)) => {
                one = [subject];
                &one
            }
            (None, None) => &[],
        };
        self.admit(subjects, cost, live).await
    }

    async fn decide(
        &self,
        subjects: &[Subject<'_>],
        cost: NonZeroU32,
        live: &LimitsConfig,
    ) -> Result<Admission, Refused> {
        if subjects.len() > MAX_SUBJECTS {
            let error = format!("{} limit subjects, at most {MAX_SUBJECTS}", subjects.len());
            return Err(Refused { error: GatewayError::Internal(error), policy: Admission::default() });
        }
        // The clock is read only when a subject has a quota (a read per
        // request is measurable here), and once: a refund must name the
        // window the units were taken from.
        let now = subjects.iter().any(|s| s.quota.is_some()).then(Timestamp::now);
        let mut admission = Admission::default();

        // 1. Quotas first: taken units can be given back exactly.
        if let Some(now) = now {
            self.take_quotas(subjects, cost, now, live, &mut admission).await?;
        }

        // 2. Credits, spent exactly: a refusal returns the quota units.
        let mut spent = [None; MAX_SUBJECTS];
        if let Err(refused) = self.take_credits(subjects, cost, &mut spent, &mut admission).await {
            if let Some(now) = now {
                self.refund_quotas(subjects, cost, now);
            }
            return Err(refused);
        }

        // 3. Rates, all subjects at once: a refusal returns the quota units
        // and the credits.
        if let Err(refused) = self.check_rates(subjects, cost, live, &mut admission).await {
            if let Some(now) = now {
                self.refund_quotas(subjects, cost, now);
            }
            self.refund_credits(subjects, &spent).await;
            return Err(refused);
        }
        Ok(admission)
    }

    /// Spends `cost` of every subject's credits, or of none; `spent[i]`
    /// records what subject `i` spent, for a later refund.
    async fn take_credits(
        &self,
        subjects: &[Subject<'_>],
        cost: NonZeroU32,
        spent: &mut [Option<credits::Taken>; MAX_SUBJECTS],
        admission: &mut Admission,
    ) -> Result<(), Refused> {
        for (i, subject) in subjects.iter().enumerate() {
            let Some(grant) = subject.credits else { continue };
            let refused = match self.credits.take(subject.credit_owner(), grant, cost).await {
                Ok(credits::Take::Taken(taken)) => {
                    admission.credits =
                        Some(admission.credits.map_or(taken.remaining, |left| left.min(taken.remaining)));
                    spent[i] = Some(taken);
                    continue;
                }
                Ok(credits::Take::Exhausted { remaining, retry_after }) => Refused {
                    error: GatewayError::CreditsExhausted { remaining, retry_after },
                    policy: Admission::default(),
                },
                // Credits cannot be vouched for: neither spent nor refused.
                Err(error) => Refused::unavailable(format!("{:?} credits: {error}", subject.kind)),
            };
            self.refund_credits(&subjects[..i], &spent[..i]).await;
            return Err(refused);
        }
        Ok(())
    }

    /// Gives back what [`take_credits`](Self::take_credits) spent.
    async fn refund_credits(&self, subjects: &[Subject<'_>], spent: &[Option<credits::Taken>]) {
        for (subject, taken) in subjects.iter().zip(spent) {
            if let Some(taken) = taken {
                self.credits.refund(subject.credit_owner(), taken).await;
            }
        }
    }

    /// Takes `cost` units of every subject's quota, or of none.
    async fn take_quotas(
        &self,
        subjects: &[Subject<'_>],
        cost: NonZeroU32,
        now: Timestamp,
        live: &LimitsConfig,
        admission: &mut Admission,
    ) -> Result<(), Refused> {
        for (i, subject) in subjects.iter().enumerate() {
            let Some(quota) = subject.quota else { continue };
            let allowance = if live.fail_open { outage_units(quota.count, live.outage_allowance) } else { 0 };
            let taken = self.quotas.take_within(subject.kind, subject.id, quota, cost, now, allowance).await;
            let refused = match taken {
                Ok(QuotaDecision::Taken { remaining, reset, window_secs }) => {
                    admission.of(subject.kind).quota = Some(PolicyState {
                        limit: quota.count,
                        window_secs,
                        remaining,
                        reset_secs: reset.as_secs(),
                    });
                    continue;
                }
                Ok(QuotaDecision::Exhausted { retry_after }) => {
                    Refused::quota(subject.kind, quota, retry_after, now)
                }
                // The leases and the allowance are spent: the gateway cannot
                // vouch that the subject has quota left, nor that it has none.
                Err(error) => Refused::unavailable(format!("{:?} quota limit: {error}", subject.kind)),
            };
            self.refund_quotas(&subjects[..i], cost, now);
            return Err(refused);
        }
        Ok(())
    }

    /// Gives back the units [`take_quotas`](Self::take_quotas) took from
    /// `subjects`.
    fn refund_quotas(&self, subjects: &[Subject<'_>], cost: NonZeroU32, now: Timestamp) {
        for subject in subjects {
            if let Some(quota) = subject.quota {
                self.quotas.refund(subject.kind, subject.id, quota, cost, now);
            }
        }
    }

    /// Takes `cost` cells of every subject's rate, or of none.
    async fn check_rates(
        &self,
        subjects: &[Subject<'_>],
        cost: NonZeroU32,
        live: &LimitsConfig,
        admission: &mut Admission,
    ) -> Result<(), Refused> {
        let mut rated = [RateSubject {
            kind: SubjectKind::Key,
            id: "",
            rate: Rate { count: NonZeroU32::MIN, period: Duration::from_secs(1) },
            burst: NonZeroU32::MIN,
        }; MAX_SUBJECTS];
        let mut count = 0;
        for subject in subjects.iter().filter_map(Subject::rate) {
            rated[count] = subject;
            count += 1;
        }
        let rated = &rated[..count];
        if rated.is_empty() {
            return Ok(());
        }
        let decision = match &self.rates {
            Rates::Local(local) => Ok(local.check(rated, cost)),
            Rates::Shared { shared, fallback } => match shared.check(rated, cost).await {
                Err(error) if live.fail_open => {
                    tracing::debug!(%error, "shared rate unavailable; local share decides");
                    let mut shares = [rated[0]; MAX_SUBJECTS];
                    for (share, subject) in shares.iter_mut().zip(rated) {
                        (share.rate, share.burst) =
                            instance_share(subject.rate, subject.burst, live.instances);
                    }
                    Ok(fallback.check(&shares[..count], cost))
                }
                decided => decided,
            },
        };
        match decision {
            Ok(RatesDecision::Allowed(allowed)) => {
                for (subject, allowed) in rated.iter().zip(allowed) {
                    let Some(allowed) = allowed else { continue };
                    admission.of(subject.kind).rate = Some(PolicyState {
                        limit: u64::from(subject.burst.get()),
                        window_secs: subject.rate.period.as_secs().max(1),
                        remaining: u64::from(allowed.remaining),
                        reset_secs: ceil_secs(allowed.reset),
                    });
                }
                Ok(())
            }
            Ok(RatesDecision::Refused { index, retry_after }) => {
                Err(Refused::rate(&rated[index.min(count - 1)], retry_after))
            }
            Err(error) => Err(Refused::unavailable(format!("rate limit: {error}"))),
        }
    }
}

/// Whole seconds, rounded up: a client told to come back after a truncated
/// time would be refused again.
fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// The units of a `count` quota one instance may spend per window beyond
/// its leases while the store is unreachable: `fraction` of it, rounded
/// down (so the documented bound `Q × (1 + N × fraction)` holds exactly).
fn outage_units(count: u64, fraction: f64) -> u64 {
    // The epsilon keeps 0.07 × 100 at 7: the product is 7.000000000000001.
    ((count as f64) * fraction + 1e-9).floor() as u64
}

/// One instance's share of a rate shared by `instances`: the same count
/// over `instances` times the period, and the burst divided (rounded up,
/// at least 1) — together at most the shared limit, plus rounding.
fn instance_share(rate: Rate, burst: NonZeroU32, instances: NonZeroU32) -> (Rate, NonZeroU32) {
    let n = instances.get();
    let period = rate.period.saturating_mul(n);
    let burst = NonZeroU32::new(burst.get().div_ceil(n)).unwrap_or(NonZeroU32::MIN);
    (Rate { count: rate.count, period }, burst)
}

/// Locks a limiter's small state. The locks here are held for a few
/// arithmetic operations, never across an await, and nothing inside can
/// panic, so a poisoned lock still holds consistent numbers.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `Keygate-Credits-Remaining: N`: the credits left, on every admitted
/// response of a key (or client) with credits, and on a credits refusal.
pub const CREDITS_REMAINING: HeaderName = HeaderName::from_static("keygate-credits-remaining");

/// Writes [`CREDITS_REMAINING`] when a subject has credits. Not switched off
/// by `[limits] headers`: a client spending credits needs its balance.
pub fn write_credits_header(headers: &mut HeaderMap, admission: &Admission) {
    if let Some(remaining) = admission.credits {
        headers.insert(CREDITS_REMAINING, HeaderValue::from(remaining));
    }
}

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Writes the IETF httpapi RateLimit headers (structured-field form):
/// `RateLimit-Policy: "rate";q=10;w=1, "quota";q=10000;w=86400` and
/// `RateLimit: "rate";r=7;t=1, "quota";r=9993;t=51000`, plus the older
/// `X-RateLimit-Limit/Remaining/Reset` (for the tightest policy) when asked.
/// A client's shared policies follow the key's as `"client-rate"` and
/// `"client-quota"`: each policy is its own item, so a client sees which
/// budget it is about to run out of.
///
/// Every limited request pays for this, so each value is written on the stack
/// and copied once into its header value, without formatting machinery.
pub fn write_headers(headers: &mut HeaderMap, admission: &Admission, legacy: bool) {
    let (key_rate, key_quota) = SubjectKind::Key.policy_names();
    let (client_rate, client_quota) = SubjectKind::Client.policy_names();
    let policies = [
        (key_rate, admission.key.rate),
        (key_quota, admission.key.quota),
        (client_rate, admission.client.rate),
        (client_quota, admission.client.quota),
    ];
    let present = || policies.iter().filter_map(|(name, state)| Some((*name, (*state)?)));
    let mut state = ValueBuf::default();
    let mut tightest: Option<PolicyState> = None;
    for (name, p) in present() {
        if tightest.is_some() {
            state.push(b", ");
        }
        structured_item(&mut state, name, (b"r", p.remaining), (b"t", p.reset_secs));
        if tightest.is_none_or(|t| p.remaining < t.remaining) {
            tightest = Some(p);
        }
    }
    let Some(tightest) = tightest else { return };
    // The policy value changes only with the limits themselves: a worker
    // keeps the last one it wrote and reuses it while the limits are the
    // same (one key, or keys of one tier), which spares formatting it and
    // allocating it per request.
    let shape = policies.map(|(_, state)| state.map(|p| (p.limit, p.window_secs)));
    let policy = LAST_POLICY.with_borrow_mut(|last| match last {
        Some((last_shape, value)) if *last_shape == shape => Some(value.clone()),
        _ => {
            let mut policy = ValueBuf::default();
            for (at, (name, p)) in present().enumerate() {
                if at > 0 {
                    policy.push(b", ");
                }
                structured_item(&mut policy, name, (b"q", p.limit), (b"w", p.window_secs));
            }
            let value = policy.value();
            *last = value.clone().map(|value| (shape, value));
            value
        }
    });
    // Names and digits only: always valid header values.
    if let Some(v) = policy {
        headers.insert(RATELIMIT_POLICY, v);
    }
    if let Some(v) = state.value() {
        headers.insert(RATELIMIT, v);
    }
    if legacy {
        headers.insert(X_RATELIMIT_LIMIT, HeaderValue::from(tightest.limit));
        headers.insert(X_RATELIMIT_REMAINING, HeaderValue::from(tightest.remaining));
        headers.insert(X_RATELIMIT_RESET, HeaderValue::from(tightest.reset_secs));
    }
}

/// Each policy's (limit, window) in `write_headers`' order; `None` where
/// the admission has none.
type PolicyShape = [Option<(u64, u64)>; 4];

thread_local! {
    /// The `RateLimit-Policy` value this thread (a worker) wrote last, and
    /// the limits it describes.
    static LAST_POLICY: std::cell::RefCell<Option<(PolicyShape, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

/// A RateLimit header value written on the stack, so that the value itself
/// is the only allocation. Four items of two `u64` parameters take at most
/// 225 bytes (`"rate";q=<20 digits>;w=<20 digits>` is 50, `"quota"` 51,
/// `"client-rate"` 57, `"client-quota"` 58, and three `, `).
struct ValueBuf {
    bytes: [u8; 256],
    len: usize,
    /// Set if a write did not fit: the value is then left out, never cut.
    overflowed: bool,
}

impl Default for ValueBuf {
    fn default() -> Self {
        Self { bytes: [0; 256], len: 0, overflowed: false }
    }
}

impl ValueBuf {
    fn push(&mut self, part: &[u8]) {
        match self.bytes.get_mut(self.len..self.len + part.len()) {
            Some(room) => {
                room.copy_from_slice(part);
                self.len += part.len();
            }
            None => self.overflowed = true,
        }
    }

    fn value(&self) -> Option<HeaderValue> {
        if self.overflowed {
            return None;
        }
        HeaderValue::from_bytes(&self.bytes[..self.len]).ok()
    }
}

/// Appends one structured-field list item: `"name";a=1;b=2`.
fn structured_item(out: &mut ValueBuf, name: &str, first: (&[u8], u64), second: (&[u8], u64)) {
    out.push(b"\"");
    out.push(name.as_bytes());
    out.push(b"\"");
    for (param, value) in [first, second] {
        out.push(b";");
        out.push(param);
        out.push(b"=");
        out.push(itoa::Buffer::new().format(value).as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_policies(rate: Option<PolicyState>, quota: Option<PolicyState>) -> Admission {
        Admission { key: Policies { rate, quota }, ..Admission::default() }
    }

    #[test]
    fn a_clients_policies_follow_the_keys_and_the_legacy_headers_show_the_tightest_of_all() {
        let mut headers = HeaderMap::new();
        let admission = Admission {
            key: Policies {
                rate: Some(PolicyState { limit: 10, window_secs: 1, remaining: 9, reset_secs: 1 }),
                quota: None,
            },
            client: Policies {
                rate: None,
                quota: Some(PolicyState { limit: 1000, window_secs: 86400, remaining: 3, reset_secs: 500 }),
            },
            credits: None,
        };
        write_headers(&mut headers, &admission, true);
        assert_eq!(headers["ratelimit-policy"], "\"rate\";q=10;w=1, \"client-quota\";q=1000;w=86400");
        assert_eq!(headers["ratelimit"], "\"rate\";r=9;t=1, \"client-quota\";r=3;t=500");
        assert_eq!(headers["x-ratelimit-limit"], "1000");
        assert_eq!(headers["x-ratelimit-remaining"], "3");
    }

    #[tokio::test]
    async fn a_refusal_by_the_clients_quota_names_it_and_spends_nothing_of_the_keys() {
        let limits = Limits::new(&crate::config::Config::defaults().limits, None);
        let live = crate::config::Config::defaults().limits;
        let one = NonZeroU32::MIN;
        let key_quota: Quota = "5/day".parse().unwrap();
        let client_quota: Quota = "2/day".parse().unwrap();
        let key = Subject {
            kind: SubjectKind::Key,
            id: "acme.k1",
            rate: None,
            burst: None,
            quota: Some(key_quota),
            credits: None,
        };
        let client = Subject::client("acme", None, None, Some(client_quota));
        for _ in 0..2 {
            assert!(limits.admit(&[key, client], one, &live).await.is_ok());
        }
        for _ in 0..4 {
            let refusal = limits.admit(&[key, client], one, &live).await.unwrap_err();
            assert!(matches!(refusal.error, GatewayError::QuotaExceeded { .. }));
            let policy = refusal.headers["ratelimit-policy"].to_str().unwrap();
            assert_eq!(policy, "\"client-quota\";q=2;w=86400");
        }
        // The key alone: 3 of its 5 left, the refusals took none.
        let mut passed = 0;
        for _ in 0..5 {
            passed += usize::from(limits.admit(&[key], one, &live).await.is_ok());
        }
        assert_eq!(passed, 3);
    }

    #[test]
    fn the_reused_policy_value_follows_every_change_of_limits_on_the_same_thread() {
        let rate = |limit, remaining| Some(PolicyState { limit, window_secs: 1, remaining, reset_secs: 1 });
        let quota = Some(PolicyState { limit: 50, window_secs: 86400, remaining: 40, reset_secs: 9 });
        let cases = [
            (key_policies(rate(10, 9), None), "\"rate\";q=10;w=1", "\"rate\";r=9;t=1"),
            (key_policies(rate(10, 8), None), "\"rate\";q=10;w=1", "\"rate\";r=8;t=1"),
            (key_policies(rate(20, 8), None), "\"rate\";q=20;w=1", "\"rate\";r=8;t=1"),
            (
                key_policies(rate(20, 8), quota),
                "\"rate\";q=20;w=1, \"quota\";q=50;w=86400",
                "\"rate\";r=8;t=1, \"quota\";r=40;t=9",
            ),
            (key_policies(None, quota), "\"quota\";q=50;w=86400", "\"quota\";r=40;t=9"),
            (key_policies(rate(10, 9), None), "\"rate\";q=10;w=1", "\"rate\";r=9;t=1"),
        ];
        for (admission, policy, state) in cases {
            let mut headers = HeaderMap::new();
            write_headers(&mut headers, &admission, false);
            assert_eq!(headers["ratelimit-policy"], policy);
            assert_eq!(headers["ratelimit"], state);
        }
        // No policy at all: no header, and the next one is still right.
        let mut headers = HeaderMap::new();
        write_headers(&mut headers, &Admission::default(), false);
        assert!(headers.is_empty());
    }

    #[test]
    fn headers_list_each_policy_and_the_legacy_ones_show_the_tightest() {
        let mut headers = HeaderMap::new();
        let admission = key_policies(
            Some(PolicyState { limit: 10, window_secs: 1, remaining: 7, reset_secs: 1 }),
            Some(PolicyState { limit: 10000, window_secs: 86400, remaining: 9993, reset_secs: 51000 }),
        );
        write_headers(&mut headers, &admission, true);
        assert_eq!(headers["ratelimit-policy"], "\"rate\";q=10;w=1, \"quota\";q=10000;w=86400");
        assert_eq!(headers["ratelimit"], "\"rate\";r=7;t=1, \"quota\";r=9993;t=51000");
        assert_eq!(headers["x-ratelimit-remaining"], "7");
        assert_eq!(headers["x-ratelimit-limit"], "10");
    }

    #[test]
    fn the_legacy_headers_follow_the_tighter_policy_and_a_lone_policy_has_no_separator() {
        let mut headers = HeaderMap::new();
        let admission = key_policies(
            Some(PolicyState { limit: 100, window_secs: 60, remaining: 99, reset_secs: 60 }),
            Some(PolicyState { limit: 5, window_secs: 3600, remaining: 0, reset_secs: 1200 }),
        );
        write_headers(&mut headers, &admission, true);
        assert_eq!(headers["x-ratelimit-limit"], "5");
        assert_eq!(headers["x-ratelimit-remaining"], "0");
        assert_eq!(headers["x-ratelimit-reset"], "1200");

        let mut headers = HeaderMap::new();
        let admission = key_policies(None, admission.key.quota);
        write_headers(&mut headers, &admission, false);
        assert_eq!(headers["ratelimit-policy"], "\"quota\";q=5;w=3600");
        assert_eq!(headers["ratelimit"], "\"quota\";r=0;t=1200");
        assert!(!headers.contains_key("x-ratelimit-limit"));
    }

    #[test]
    fn the_longest_values_fit() {
        let max =
            PolicyState { limit: u64::MAX, window_secs: u64::MAX, remaining: u64::MAX, reset_secs: u64::MAX };
        let mut headers = HeaderMap::new();
        let all = Policies { rate: Some(max), quota: Some(max) };
        write_headers(&mut headers, &Admission { key: all, client: all, credits: None }, false);
        let m = u64::MAX;
        assert_eq!(
            headers["ratelimit-policy"],
            format!(
                "\"rate\";q={m};w={m}, \"quota\";q={m};w={m}, \"client-rate\";q={m};w={m}, \"client-quota\";q={m};w={m}"
            )
        );
        assert_eq!(
            headers["ratelimit"],
            format!(
                "\"rate\";r={m};t={m}, \"quota\";r={m};t={m}, \"client-rate\";r={m};t={m}, \"client-quota\";r={m};t={m}"
            )
        );
    }

    #[test]
    fn the_outage_allowance_rounds_down() {
        assert_eq!(outage_units(100, 0.01), 1);
        assert_eq!(outage_units(100, 0.07), 7);
        assert_eq!(outage_units(50, 0.01), 0);
        assert_eq!(outage_units(10_000, 0.0), 0);
        assert_eq!(outage_units(u64::MAX, 1.0), u64::MAX);
    }

    #[test]
    fn an_instance_share_is_the_rate_over_the_instances() {
        let rate: Rate = "10/min".parse().unwrap();
        let three = NonZeroU32::new(3).unwrap();
        let (share, burst) = instance_share(rate, NonZeroU32::new(10).unwrap(), three);
        assert_eq!(share.period, std::time::Duration::from_secs(180));
        assert_eq!(share.count, rate.count);
        assert_eq!(burst.get(), 4);
        let (same, burst) = instance_share(rate, NonZeroU32::MIN, NonZeroU32::MIN);
        assert_eq!((same, burst), (rate, NonZeroU32::MIN));
    }

    #[test]
    fn no_limits_means_no_headers() {
        let mut headers = HeaderMap::new();
        write_headers(&mut headers, &Admission::default(), true);
        assert!(headers.is_empty());
    }
}
