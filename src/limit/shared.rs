//! Limits shared by many gateway instances through Redis.
//!
//! Two Lua scripts, each touching only one client's hash-tag slot (so they
//! run unchanged on Redis Cluster):
//! - the quota authority hands out quota units in leases (see `quota.rs`),
//!   one subject's counter per call;
//! - the rate-lease script is a token bucket per subject that hands an
//!   instance a slice of the tokens currently in the bucket. The instance
//!   spends its slice locally and asks again only when it runs out, so at
//!   1000 req/s per key with slices of 50 only one request in 50 waits for
//!   Redis. A request limited by its key and its client asks for both
//!   buckets in one call, which grants from both or from neither.
//!
//! Error bound of shared rate limiting, per subject (key or client): the
//! bucket never hands out more than `burst + rate × elapsed` tokens, so the
//! instances together never admit more than that. Tokens leased but not
//! spent within `lease_ttl` are dropped, which under-admits by at most one
//! slice per instance per `lease_ttl`. The layout is in
//! `docs/redis-schema.md`.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moka::sync::Cache;

use super::outage::Outage;
use super::quota::{Lease, LeaseError, QuotaAuthority, ROLLING_BUCKETS, Rolling, Window};
use super::rate::{Allowed, RateSubject, RatesDecision};
use super::{MAX_SUBJECTS, SubjectKind, lock};
use crate::meta::Rate;
use crate::store::conn::RedisConn;

/// Redis key names for limits, all in the client's hash-tag slot:
/// a key's `<prefix>{<client>}:quota:<kid>:<window>` and
/// `<prefix>{<client>}:rate:<kid>`; a client's own (shared by its keys)
/// `<prefix>{<client>}:quota:_client:<window>` and
/// `<prefix>{<client>}:rate:_client`. A kid is alphanumeric, so `_client`
/// can never be a key's name.
#[derive(Debug, Clone)]
pub struct LimitKeys {
    prefix: String,
}

/// Where a client's own counters sit among its keys' kids.
const CLIENT_COUNTER: &str = "_client";

impl LimitKeys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    pub fn quota(&self, kind: SubjectKind, id: &str, window_id: &str) -> String {
        let (client, name) = slot_and_name(kind, id);
        format!("{}{{{client}}}:quota:{name}:{window_id}", self.prefix)
    }

    pub fn rate(&self, kind: SubjectKind, id: &str) -> String {
        let (client, name) = slot_and_name(kind, id);
        format!("{}{{{client}}}:rate:{name}", self.prefix)
    }
}

/// The client (hash tag) and the counter's name within it.
fn slot_and_name(kind: SubjectKind, id: &str) -> (&str, &str) {
    match kind {
        SubjectKind::Key => id.split_once('.').unwrap_or((id, "")),
        SubjectKind::Client => (id, CLIENT_COUNTER),
    }
}

// === Quota authority ===

/// Quota leases from Redis: exact across every instance sharing it.
pub struct RedisQuotaAuthority {
    conn: RedisConn,
    keys: LimitKeys,
}

impl RedisQuotaAuthority {
    pub fn new(conn: impl Into<RedisConn>, keys: LimitKeys) -> Self {
        Self { conn: conn.into(), keys }
    }
}

/// KEYS[1]: the window's hash. ARGV: limit, min, want, expire-at (unix s),
/// settle (units spent during an outage, counted first). Fields: `limit`
/// (the quota), `granted` (units handed to instances, or spent by them
/// without a lease during an outage: it may exceed `limit` by those).
/// Returns {granted now, left after}.
const QUOTA_LEASE: &str = r"
local limit = tonumber(ARGV[1])
local min = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local granted = tonumber(redis.call('HGET', KEYS[1], 'granted') or '0') + tonumber(ARGV[5])
local left = limit - granted
local grant = 0
if left >= min then
  grant = math.min(math.max(math.floor(left / 8), min), math.max(want, min), left)
end
redis.call('HSET', KEYS[1], 'limit', limit, 'granted', granted + grant)
redis.call('EXPIREAT', KEYS[1], ARGV[4])
return {grant, left - grant}
";

#[async_trait::async_trait]
impl QuotaAuthority for RedisQuotaAuthority {
    async fn lease(
        &self,
        kind: SubjectKind,
        id: &str,
        window: &Window,
        limit: u64,
        min: u64,
        want: u64,
        settle: u64,
    ) -> Result<Lease, LeaseError> {
        if let Some(rolling) = &window.rolling {
            let key = self.keys.quota(kind, id, &rolling.counter_id);
            return self.rolling_lease(&key, rolling, limit, min, want, settle).await;
        }
        // Keep a window's counter a day past its end so dashboards can read
        // yesterday's total.
        let expire_at = window.end.as_second() + 86_400;
        let key = self.keys.quota(kind, id, &window.id);
        let (granted, left): (u64, i64) = redis::Script::new(QUOTA_LEASE)
            .key(&key)
            .arg(limit)
            .arg(min)
            .arg(want)
            .arg(expire_at)
            .arg(settle)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| lease_error("quota lease", &key, &e))?;
        Ok(Lease { granted, left: left.max(0) as u64, frees_at: None })
    }
}

/// KEYS[1]: the rolling counter's hash. ARGV: limit, min, want, current
/// sub-bucket, sub-buckets per window, TTL (s), settle (units spent during
/// an outage, added to the current sub-bucket first). Fields: `limit`, and one per
/// live sub-bucket (its index since the epoch) holding the units granted in
/// it. Returns {granted now, left after, oldest live sub-bucket or -1}.
const ROLLING_LEASE: &str = r"
local limit = tonumber(ARGV[1])
local min = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local bucket = tonumber(ARGV[4])
local buckets = tonumber(ARGV[5])
local settle = tonumber(ARGV[7])
if settle > 0 then
  redis.call('HINCRBY', KEYS[1], tostring(bucket), settle)
end
local fields = redis.call('HGETALL', KEYS[1])
local used = 0
local oldest = -1
for i = 1, #fields, 2 do
  local index = tonumber(fields[i])
  if index ~= nil then
    if index <= bucket - buckets then
      redis.call('HDEL', KEYS[1], fields[i])
    else
      used = used + tonumber(fields[i + 1])
      if oldest == -1 or index < oldest then oldest = index end
    end
  end
end
local left = limit - used
local grant = 0
if left >= min then
  grant = math.min(math.max(math.floor(left / 8), min), math.max(want, min), left)
  redis.call('HINCRBY', KEYS[1], tostring(bucket), grant)
  if oldest == -1 or bucket < oldest then oldest = bucket end
end
redis.call('HSET', KEYS[1], 'limit', limit)
redis.call('EXPIRE', KEYS[1], ARGV[6])
return {grant, left - grant, oldest}
";

impl RedisQuotaAuthority {
    async fn rolling_lease(
        &self,
        key: &str,
        rolling: &Rolling,
        limit: u64,
        min: u64,
        want: u64,
        settle: u64,
    ) -> Result<Lease, LeaseError> {
        // Live as long as the oldest sub-bucket can still count.
        let ttl = rolling.bucket_secs * (ROLLING_BUCKETS + 1);
        let (granted, left, oldest): (u64, i64, i64) = redis::Script::new(ROLLING_LEASE)
            .key(key)
            .arg(limit)
            .arg(min)
            .arg(want)
            .arg(rolling.bucket)
            .arg(ROLLING_BUCKETS)
            .arg(ttl)
            .arg(settle)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| lease_error("rolling quota lease", key, &e))?;
        let frees_at = (oldest >= 0).then(|| (oldest + ROLLING_BUCKETS) * rolling.bucket_secs);
        Ok(Lease { granted, left: left.max(0) as u64, frees_at })
    }
}

/// Sorts a failed script call: Redis answering that the key's value cannot
/// be counted (wrong type, a field that is not a number) is about that key;
/// anything else (refused, reset, timed out, loading, busy) is an outage.
fn lease_error(what: &str, redis_key: &str, error: &redis::RedisError) -> LeaseError {
    let text = error.to_string();
    if error.code() == Some("WRONGTYPE") || text.contains("WRONGTYPE") || text.contains("user_script") {
        LeaseError::Broken(format!("{what}: redis key `{redis_key}` cannot be counted: {text}"))
    } else {
        LeaseError::Unreachable(format!("{what}: {text}"))
    }
}

// === Shared rate limits ===

/// KEYS: the buckets of the subjects that need tokens (all in one client's
/// slot). ARGV[1]: now (unix µs); then per bucket: burst, microseconds per
/// token, want, cost. Fields: `tokens` (may be fractional), `ts` (µs).
///
/// All or nothing: if every bucket holds `cost` tokens, each grants a
/// slice (at least `cost`, at most `want`); if any does not, none grants
/// anything. Returns, per bucket, {granted, wait µs until `cost` tokens
/// will be there (0 if there are), tokens left}.
/// `now` comes from the caller's clock, which tests drive by hand; instances
/// are assumed NTP-synchronised (skew shifts refill, never the total).
const RATE_LEASE: &str = r"
local now = tonumber(ARGV[1])
local buckets = {}
local all = true
for i = 1, #KEYS do
  local base = 1 + (i - 1) * 4
  local b = {
    burst = tonumber(ARGV[base + 1]),
    per_token = tonumber(ARGV[base + 2]),
    want = tonumber(ARGV[base + 3]),
    cost = tonumber(ARGV[base + 4]),
  }
  b.tokens = tonumber(redis.call('HGET', KEYS[i], 'tokens') or b.burst)
  b.ts = tonumber(redis.call('HGET', KEYS[i], 'ts') or now)
  if now > b.ts then
    b.tokens = math.min(b.burst, b.tokens + (now - b.ts) / b.per_token)
    b.ts = now
  end
  if b.tokens < b.cost then all = false end
  buckets[i] = b
end
local out = {}
for i = 1, #KEYS do
  local b = buckets[i]
  local grant = 0
  local wait = 0
  if all then
    grant = math.max(b.cost, math.min(b.want, math.floor(b.tokens)))
    b.tokens = b.tokens - grant
  elseif b.tokens < b.cost then
    wait = math.ceil((b.cost - b.tokens) * b.per_token)
  end
  redis.call('HSET', KEYS[i], 'tokens', tostring(b.tokens), 'ts', b.ts)
  redis.call('PEXPIRE', KEYS[i], math.ceil(b.burst * b.per_token / 1000) + 1000)
  out[#out + 1] = grant
  out[#out + 1] = wait
  out[#out + 1] = math.floor(b.tokens)
end
return out
";

/// Wall-clock microseconds, replaceable in tests.
pub trait MicrosClock: Send + Sync + 'static {
    fn now_micros(&self) -> u64;
}

pub struct SystemMicros;

impl MicrosClock for SystemMicros {
    fn now_micros(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
    }
}

/// One subject's local slice of its shared bucket.
#[derive(Debug, Default)]
struct Slice {
    tokens: u64,
    /// The slice is not to be spent after this instant (µs).
    valid_until: u64,
    /// Redis said no tokens until this instant (µs): refuse locally till then.
    refused_until: u64,
    /// Tokens the bucket had left at the last lease (for headers).
    bucket_left: u64,
}

/// What step 1 of a shared check found for one subject.
#[derive(Debug, Clone, Copy)]
enum Local {
    /// `cost` tokens were taken from the local slice (given back if another
    /// subject refuses).
    Reserved,
    /// The slice cannot serve the request: Redis must be asked.
    Needs,
}

/// Rate limits shared through Redis, served from leased slices.
///
/// A request limited by several subjects (its key and its client) is
/// decided for all at once: first from the local slices, reserving `cost`
/// tokens in each that has them; the subjects whose slices cannot serve go
/// to Redis together, in one script that grants to all of them or to none.
/// If Redis refuses one, the reserved tokens go back to their slices, so a
/// refusal by one subject spends nothing of the others. (A concurrent
/// request may see the reserved tokens as spent for the length of one Redis
/// call: at worst it leases a slice of its own, or is refused by Redis when
/// the bucket is truly empty, never admitted beyond the bucket.)
pub struct SharedRates {
    conn: RedisConn,
    keys: LimitKeys,
    /// One map per [`SubjectKind`], like the local limiters.
    slices: [Cache<String, Arc<Mutex<Slice>>>; SubjectKind::COUNT],
    clock: Arc<dyn MicrosClock>,
    /// A slice is this fraction of a second's worth of the subject's rate.
    lease_fraction: f64,
    lease_ttl: Duration,
    /// While set, slices are not asked for: the caller falls back to its
    /// local share of the rate.
    outage: Outage,
}

impl SharedRates {
    pub fn new(
        conn: impl Into<RedisConn>,
        keys: LimitKeys,
        lease_fraction: f64,
        lease_ttl: Duration,
    ) -> Self {
        Self::with_clock(conn, keys, lease_fraction, lease_ttl, Arc::new(SystemMicros))
    }

    pub fn with_clock(
        conn: impl Into<RedisConn>,
        keys: LimitKeys,
        lease_fraction: f64,
        lease_ttl: Duration,
        clock: Arc<dyn MicrosClock>,
    ) -> Self {
        let cache =
            || Cache::builder().max_capacity(1_000_000).time_to_idle(Duration::from_secs(600)).build();
        Self {
            conn: conn.into(),
            keys,
            slices: [cache(), cache()],
            clock,
            lease_fraction,
            lease_ttl,
            outage: Outage::new("shared rates"),
        }
    }

    /// Takes `cost` tokens of one key's bucket: [`check`](Self::check) for
    /// a lone subject.
    pub async fn check_one(
        &self,
        key_id: &str,
        rate: Rate,
        burst: NonZeroU32,
        cost: NonZeroU32,
    ) -> Result<super::rate::RateDecision, String> {
        use super::rate::RateDecision;
        let subject = RateSubject { kind: SubjectKind::Key, id: key_id, rate, burst };
        Ok(match self.check(&[subject], cost).await? {
            RatesDecision::Allowed([Some(a), ..]) => {
                RateDecision::Allowed { remaining: a.remaining, reset: a.reset }
            }
            RatesDecision::Refused { retry_after, .. } => RateDecision::Refused { retry_after },
            RatesDecision::Allowed(_) => RateDecision::Refused { retry_after: rate.period },
        })
    }

    /// Takes `cost` tokens from every subject's bucket, or from none: from
    /// the local slices when they can, else from Redis. An error (Redis
    /// unreachable, or a bucket it cannot count) leaves every slice as it
    /// was, for the caller's fallback to decide.
    pub async fn check(
        &self,
        subjects: &[RateSubject<'_>],
        cost: NonZeroU32,
    ) -> Result<RatesDecision, String> {
        let n = subjects.len();
        if n > MAX_SUBJECTS {
            return Err(format!("rate lease: {n} limit subjects, at most {MAX_SUBJECTS}"));
        }
        let cost = u64::from(cost.get());
        let now = self.clock.now_micros();
        let mut slices: [Option<Arc<Mutex<Slice>>>; MAX_SUBJECTS] = Default::default();
        for (slot, subject) in slices.iter_mut().zip(subjects) {
            let cache = &self.slices[subject.kind.index()];
            *slot = Some(cache.get_with_by_ref(subject.id, || Arc::new(Mutex::new(Slice::default()))));
        }
        let slice = |i: usize| slices[i].as_deref();

        // 1. Local slices: reserve where they can serve, note who needs Redis.
        let mut local = [Local::Needs; MAX_SUBJECTS];
        let mut allowed = [None; MAX_SUBJECTS];
        for (i, subject) in subjects.iter().enumerate() {
            let Some(slice) = slice(i) else { continue };
            let mut state = lock(slice);
            if now < state.refused_until {
                let retry_after = Duration::from_micros(state.refused_until - now);
                drop(state);
                self.give_back(&slices, &local[..i], cost);
                return Ok(RatesDecision::Refused { index: i, retry_after });
            }
            if now <= state.valid_until && state.tokens >= cost {
                state.tokens -= cost;
                local[i] = Local::Reserved;
                allowed[i] = Some(remaining(state.tokens + state.bucket_left, subject));
            }
        }
        let needy: Vec<usize> = (0..n).filter(|&i| matches!(local[i], Local::Needs)).collect();
        if needy.is_empty() {
            return Ok(RatesDecision::Allowed(allowed));
        }

        // 2. Redis, for every subject whose slice could not serve, at once.
        if self.outage.skip_store() {
            self.give_back(&slices, &local[..n], cost);
            return Err("rate lease: limit store unreachable (retried shortly)".to_owned());
        }
        let mut script = RATE_LEASE_SCRIPT.prepare_invoke();
        script.arg(now);
        let mut names = Vec::with_capacity(needy.len());
        for &i in &needy {
            let subject = &subjects[i];
            let per_token_us = per_token_us(subject.rate);
            let per_second = 1e6 / per_token_us;
            let want = ((per_second * self.lease_fraction) as u64)
                .clamp(1, u64::from(subject.burst.get()))
                .max(cost);
            let name = self.keys.rate(subject.kind, subject.id);
            script.key(&name).arg(subject.burst.get()).arg(per_token_us).arg(want).arg(cost);
            names.push(name);
        }
        let leased: Result<Vec<u64>, _> = script.invoke_async(&mut self.conn.clone()).await;
        let answer = match leased {
            Ok(answer) if answer.len() == 3 * needy.len() => {
                self.outage.succeeded();
                answer
            }
            Ok(answer) => {
                self.give_back(&slices, &local[..n], cost);
                return Err(format!("rate lease: {} values for {} buckets", answer.len(), needy.len()));
            }
            Err(error) => {
                self.give_back(&slices, &local[..n], cost);
                return Err(match lease_error("rate lease", &names.join(" "), &error) {
                    LeaseError::Unreachable(error) => {
                        self.outage.failed(&error);
                        error
                    }
                    LeaseError::Broken(error) => error,
                });
            }
        };

        let granted_all = answer.chunks(3).all(|bucket| bucket[0] >= cost);
        let mut refused: Option<(usize, Duration)> = None;
        for (&i, bucket) in needy.iter().zip(answer.chunks(3)) {
            let (granted, wait_us, left) = (bucket[0], bucket[1], bucket[2]);
            let Some(slice) = slice(i) else { continue };
            let mut state = lock(slice);
            state.bucket_left = left;
            if granted_all {
                // Any unspent rest of an older slice is dropped: it has
                // expired or was too small for this request.
                state.tokens = granted - cost;
                state.valid_until = now + self.lease_ttl.as_micros() as u64;
                allowed[i] = Some(remaining(state.tokens + left, &subjects[i]));
            } else if wait_us > 0 {
                // This bucket is short: refuse locally until it refills.
                state.tokens = 0;
                state.refused_until = now + wait_us;
                let retry_after = Duration::from_micros(wait_us.max(1));
                if refused.is_none_or(|(_, longest)| retry_after > longest) {
                    refused = Some((i, retry_after));
                }
            }
        }
        if granted_all {
            return Ok(RatesDecision::Allowed(allowed));
        }
        self.give_back(&slices, &local[..n], cost);
        let (index, retry_after) = refused.unwrap_or((needy[0], Duration::from_micros(1)));
        Ok(RatesDecision::Refused { index, retry_after })
    }

    /// Returns the tokens reserved in step 1 to their slices.
    fn give_back(&self, slices: &[Option<Arc<Mutex<Slice>>>], local: &[Local], cost: u64) {
        for (slice, local) in slices.iter().zip(local) {
            if let (Some(slice), Local::Reserved) = (slice, local) {
                lock(slice).tokens += cost;
            }
        }
    }
}

/// The lease script, hashed once (`EVALSHA`, falling back to `EVAL` when
/// Redis does not know it yet).
static RATE_LEASE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(RATE_LEASE));

fn per_token_us(rate: Rate) -> f64 {
    (rate.period.as_micros() as f64 / f64::from(rate.count.get())).max(1.0)
}

fn remaining(remaining: u64, subject: &RateSubject<'_>) -> Allowed {
    let burst = subject.burst;
    let remaining = remaining.min(u64::from(burst.get())) as u32;
    let missing = f64::from(burst.get() - remaining);
    Allowed { remaining, reset: Duration::from_micros((missing * per_token_us(subject.rate)) as u64) }
}
