//! Limits shared by many gateway instances through Redis.
//!
//! Two Lua scripts, each touching one key in one client's hash-tag slot (so
//! they run unchanged on Redis Cluster):
//! - the quota authority hands out quota units in leases (see `quota.rs`);
//! - the rate-lease script is a token bucket that hands an instance a slice of
//!   the tokens currently in the bucket. The instance spends its slice locally
//!   and asks again only when it runs out, so at 1000 req/s per key with
//!   slices of 50 only one request in 50 waits for Redis.
//!
//! Error bound of shared rate limiting: the bucket never hands out more than
//! `burst + rate × elapsed` tokens, so the instances together never admit
//! more than that. Tokens leased but not spent within `lease_ttl` are
//! dropped, which under-admits by at most one slice per instance per
//! `lease_ttl`. The layout is in `docs/redis-schema.md`.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moka::sync::Cache;
use redis::aio::ConnectionManager;

use super::lock;
use super::outage::Outage;
use super::quota::{Lease, LeaseError, QuotaAuthority, ROLLING_BUCKETS, Rolling, Window};
use super::rate::RateDecision;
use crate::meta::Rate;

/// Redis key names for limits: `<prefix>{<client>}:quota:<kid>:<window>` and
/// `<prefix>{<client>}:rate:<kid>`.
#[derive(Debug, Clone)]
pub struct LimitKeys {
    prefix: String,
}

impl LimitKeys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    pub fn quota(&self, key_id: &str, window_id: &str) -> String {
        let (client, kid) = split(key_id);
        format!("{}{{{client}}}:quota:{kid}:{window_id}", self.prefix)
    }

    pub fn rate(&self, key_id: &str) -> String {
        let (client, kid) = split(key_id);
        format!("{}{{{client}}}:rate:{kid}", self.prefix)
    }
}

fn split(key_id: &str) -> (&str, &str) {
    key_id.split_once('.').unwrap_or((key_id, ""))
}

// === Quota authority ===

/// Quota leases from Redis: exact across every instance sharing it.
pub struct RedisQuotaAuthority {
    conn: ConnectionManager,
    keys: LimitKeys,
}

impl RedisQuotaAuthority {
    pub fn new(conn: ConnectionManager, keys: LimitKeys) -> Self {
        Self { conn, keys }
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
        key_id: &str,
        window: &Window,
        limit: u64,
        min: u64,
        want: u64,
        settle: u64,
    ) -> Result<Lease, LeaseError> {
        if let Some(rolling) = &window.rolling {
            return self.rolling_lease(key_id, rolling, limit, min, want, settle).await;
        }
        // Keep a window's counter a day past its end so dashboards can read
        // yesterday's total.
        let expire_at = window.end.as_second() + 86_400;
        let key = self.keys.quota(key_id, &window.id);
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
        key_id: &str,
        rolling: &Rolling,
        limit: u64,
        min: u64,
        want: u64,
        settle: u64,
    ) -> Result<Lease, LeaseError> {
        // Live as long as the oldest sub-bucket can still count.
        let ttl = rolling.bucket_secs * (ROLLING_BUCKETS + 1);
        let key = self.keys.quota(key_id, &rolling.counter_id);
        let (granted, left, oldest): (u64, i64, i64) = redis::Script::new(ROLLING_LEASE)
            .key(&key)
            .arg(limit)
            .arg(min)
            .arg(want)
            .arg(rolling.bucket)
            .arg(ROLLING_BUCKETS)
            .arg(ttl)
            .arg(settle)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| lease_error("rolling quota lease", &key, &e))?;
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

/// KEYS[1]: the key's bucket. ARGV: burst, microseconds per token, want,
/// cost, now (unix µs). Fields: `tokens` (may be fractional), `ts` (µs).
/// Returns {granted, wait µs until `cost` tokens will be there, tokens left}.
/// `now` comes from the caller's clock, which tests drive by hand; instances
/// are assumed NTP-synchronised (skew shifts refill, never the total).
const RATE_LEASE: &str = r"
local burst = tonumber(ARGV[1])
local per_token = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local now = tonumber(ARGV[5])
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or ARGV[1])
local ts = tonumber(redis.call('HGET', KEYS[1], 'ts') or ARGV[5])
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) / per_token)
  ts = now
end
local grant = 0
local wait = 0
if tokens >= cost then
  grant = math.max(cost, math.min(want, math.floor(tokens)))
  tokens = tokens - grant
else
  wait = math.ceil((cost - tokens) * per_token)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', ts)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * per_token / 1000) + 1000)
return {grant, wait, math.floor(tokens)}
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

/// One key's local slice of its shared bucket.
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

/// Rate limits shared through Redis, served from leased slices.
pub struct SharedRates {
    conn: ConnectionManager,
    keys: LimitKeys,
    slices: Cache<String, Arc<Mutex<Slice>>>,
    clock: Arc<dyn MicrosClock>,
    /// A slice is this fraction of a second's worth of the key's rate.
    lease_fraction: f64,
    lease_ttl: Duration,
    /// While set, slices are not asked for: the caller falls back to its
    /// local share of the rate.
    outage: Outage,
}

impl SharedRates {
    pub fn new(conn: ConnectionManager, keys: LimitKeys, lease_fraction: f64, lease_ttl: Duration) -> Self {
        Self::with_clock(conn, keys, lease_fraction, lease_ttl, Arc::new(SystemMicros))
    }

    pub fn with_clock(
        conn: ConnectionManager,
        keys: LimitKeys,
        lease_fraction: f64,
        lease_ttl: Duration,
        clock: Arc<dyn MicrosClock>,
    ) -> Self {
        let slices = Cache::builder().max_capacity(1_000_000).time_to_idle(Duration::from_secs(600)).build();
        Self { conn, keys, slices, clock, lease_fraction, lease_ttl, outage: Outage::new("shared rates") }
    }

    /// Takes `cost` tokens, from the local slice when it can, else from Redis.
    pub async fn check(
        &self,
        key_id: &str,
        rate: Rate,
        burst: NonZeroU32,
        cost: NonZeroU32,
    ) -> Result<RateDecision, String> {
        let cost = u64::from(cost.get());
        let slice = self.slices.get_with(key_id.to_owned(), || Arc::new(Mutex::new(Slice::default())));
        let now = self.clock.now_micros();
        let per_token_us = (rate.period.as_micros() as f64 / f64::from(rate.count.get())).max(1.0);
        {
            let mut local = lock(&slice);
            if now < local.refused_until {
                return Ok(RateDecision::Refused {
                    retry_after: Duration::from_micros(local.refused_until - now),
                });
            }
            if now <= local.valid_until && local.tokens >= cost {
                local.tokens -= cost;
                return Ok(allowed(local.tokens + local.bucket_left, burst, per_token_us));
            }
        }
        let per_second = 1e6 / per_token_us;
        let want = ((per_second * self.lease_fraction) as u64).clamp(1, u64::from(burst.get())).max(cost);
        if self.outage.skip_store() {
            return Err("rate lease: limit store unreachable (retried shortly)".to_owned());
        }
        let key = self.keys.rate(key_id);
        let leased: Result<(u64, u64, u64), _> = redis::Script::new(RATE_LEASE)
            .key(&key)
            .arg(burst.get())
            .arg(per_token_us)
            .arg(want)
            .arg(cost)
            .arg(now)
            .invoke_async(&mut self.conn.clone())
            .await;
        let (granted, wait_us, left) = match leased {
            Ok(answer) => {
                self.outage.succeeded();
                answer
            }
            Err(error) => match lease_error("rate lease", &key, &error) {
                LeaseError::Unreachable(error) => {
                    self.outage.failed(&error);
                    return Err(error);
                }
                LeaseError::Broken(error) => return Err(error),
            },
        };
        let mut local = lock(&slice);
        local.bucket_left = left;
        if granted >= cost {
            // Any unspent rest of an older slice is dropped: it has expired
            // or was too small for this request.
            local.tokens = granted - cost;
            local.valid_until = now + self.lease_ttl.as_micros() as u64;
            Ok(allowed(local.tokens + left, burst, per_token_us))
        } else {
            local.tokens = 0;
            local.refused_until = now + wait_us;
            Ok(RateDecision::Refused { retry_after: Duration::from_micros(wait_us.max(1)) })
        }
    }
}

fn allowed(remaining: u64, burst: NonZeroU32, per_token_us: f64) -> RateDecision {
    let remaining = remaining.min(u64::from(burst.get())) as u32;
    let missing = f64::from(burst.get() - remaining);
    RateDecision::Allowed { remaining, reset: Duration::from_micros((missing * per_token_us) as u64) }
}
