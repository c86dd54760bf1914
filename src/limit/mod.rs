//! Per-key rate limits and quotas, and the headers that report them.
//!
//! [`Limits::admit`] is the handler's one call. It commits all or nothing:
//! quota is taken first (it can be refunded exactly), then the rate limit is
//! checked; if the rate limit refuses, the quota units go back. So a request
//! refused by one limit spends nothing from the other.
//!
//! - `rate.rs`: local mode, one governor limiter per key (the default).
//! - `shared.rs`: shared mode (`[limits] mode = "redis"`), leased slices of a
//!   Redis token bucket, and the Redis quota authority.
//! - `quota.rs`: quota windows and exact leasing.
//! - `outage.rs`: when Redis is unreachable, decide locally for a while.
//! - `credits.rs`: usage credits, spent exactly (never leased) per request.
//!
//! While Redis is unreachable (`fail_open = true`), a quota spends what this
//! instance leased plus `outage_allowance` of it, then answers 503; a shared
//! rate limit falls back to a local limiter at `rate / instances`. The bound
//! this gives is in `docs/limits.md`.

pub mod credits;
pub mod outage;
pub mod quota;
pub mod rate;
pub mod shared;

use std::num::NonZeroU32;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use jiff::Timestamp;

use crate::config::{LimitMode, LimitsConfig};
use crate::error::{GatewayError, Refusal};
use crate::meta::Rate;
use crate::store::KeyRecord;
use quota::{ProcessAuthority, QuotaAuthority, QuotaDecision, Quotas};
use rate::{LocalRates, RateDecision};
use shared::{LimitKeys, RedisQuotaAuthority, SharedRates};

/// Where rate limits are counted.
enum Rates {
    Local(LocalRates),
    /// Shared through Redis, and this instance's share of each rate,
    /// enforced locally while Redis is unreachable.
    Shared {
        shared: SharedRates,
        fallback: LocalRates,
    },
}

/// The limits of every key, on this instance.
/// Built once at start: the mode and lease sizes need a restart to change;
/// `fail_open` and the header switches are read from the running config.
pub struct Limits {
    rates: Rates,
    quotas: Quotas,
    /// Where usage credits are counted (the store's Redis or key folder).
    credits: credits::Credits,
}

/// What an admitted request may report in its headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admission {
    pub rate: Option<PolicyState>,
    pub quota: Option<PolicyState>,
    /// Credits left after this request, for a key with credits.
    pub credits: Option<u64>,
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

impl Limits {
    /// Limits on this instance. `redis` is the store's Redis connection when
    /// the store is Redis: quotas are then counted there (exact across
    /// instances), and in shared mode rate limits too.
    pub fn new(config: &LimitsConfig, redis: Option<(redis::aio::ConnectionManager, &str)>) -> Self {
        let max_keys = config.max_tracked_keys;
        let (rates, authority): (Rates, Arc<dyn QuotaAuthority>) = match redis {
            Some((ref conn, prefix)) => {
                let conn = conn.clone();
                let keys = LimitKeys::new(prefix);
                let authority = Arc::new(RedisQuotaAuthority::new(conn.clone(), keys.clone()));
                let rates = match config.mode {
                    LimitMode::Local => Rates::Local(LocalRates::new(max_keys, config.idle_eviction)),
                    LimitMode::Redis => Rates::Shared {
                        shared: SharedRates::new(conn, keys, config.lease_fraction, config.lease_ttl),
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

    /// Admits a request of `cost` units for `record`, or refuses it with 429
    /// and, when the config asks for them, the RateLimit headers of the
    /// policy that refused. If the limit store fails, the running config's
    /// `fail_open` decides: bounded local decisions (leases, the outage
    /// allowance, the instance's share of the rate), or 503.
    pub async fn admit(
        &self,
        record: &KeyRecord,
        cost: NonZeroU32,
        live: &LimitsConfig,
    ) -> Result<Admission, Refusal> {
        self.decide(record, cost, live).await.map_err(|error| {
            let mut headers = HeaderMap::new();
            if live.headers {
                write_refusal_headers(&mut headers, record, &error, live.legacy_headers);
            }
            if let GatewayError::CreditsExhausted { remaining, .. } = &error {
                headers.insert(CREDITS_REMAINING, HeaderValue::from(*remaining));
            }
            Refusal { error, headers }
        })
    }

    async fn decide(
        &self,
        record: &KeyRecord,
        cost: NonZeroU32,
        live: &LimitsConfig,
    ) -> Result<Admission, GatewayError> {
        let key_id = record.id.as_str();
        let meta = &record.meta;
        // The clock is read only for a key with a quota (a read per request
        // is measurable here), and once: a refund must name the window the
        // units were taken from.
        let quota = meta.quota.map(|quota| (quota, Timestamp::now()));
        let mut admission = Admission::default();

        // 1. Quota first: taken units can be given back exactly.
        if let Some((quota, now)) = quota {
            let allowance = if live.fail_open { outage_units(quota.count, live.outage_allowance) } else { 0 };
            match self.quotas.take_within(key_id, quota, cost, now, allowance).await {
                Ok(QuotaDecision::Taken { remaining, reset, window_secs }) => {
                    admission.quota = Some(PolicyState {
                        limit: quota.count,
                        window_secs,
                        remaining,
                        reset_secs: reset.as_secs(),
                    });
                }
                Ok(QuotaDecision::Exhausted { retry_after }) => {
                    return Err(GatewayError::QuotaExceeded { retry_after });
                }
                // The leases and the allowance are spent: the gateway cannot
                // vouch that the key has quota left, nor that it has none.
                Err(error) => return Err(GatewayError::StoreUnavailable(format!("quota limit: {error}"))),
            }
        }

        // 2. Credits: spent exactly; a refusal returns the quota units.
        let mut spent = None;
        if let Some(grant) = &meta.credits {
            let owner = credits::Owner::Key(key_id);
            let refused = match self.credits.take(owner, grant, cost).await {
                Ok(credits::Take::Taken(taken)) => {
                    admission.credits = Some(taken.remaining);
                    spent = Some(taken);
                    None
                }
                Ok(credits::Take::Exhausted { remaining, retry_after }) => {
                    Some(GatewayError::CreditsExhausted { remaining, retry_after })
                }
                // Credits cannot be vouched for: neither spent nor refused.
                Err(error) => Some(GatewayError::StoreUnavailable(format!("credits: {error}"))),
            };
            if let Some(error) = refused {
                if let Some((quota, now)) = quota {
                    self.quotas.refund(key_id, quota, cost, now);
                }
                return Err(error);
            }
        }

        // 3. Rate: a refusal returns the quota units and credits taken above.
        if let Some(rate) = meta.rate {
            let burst = meta.burst.unwrap_or(rate.count);
            let decision = match &self.rates {
                Rates::Local(local) => Ok(local.check(key_id, rate, burst, cost)),
                Rates::Shared { shared, fallback } => match shared.check(key_id, rate, burst, cost).await {
                    Err(error) if live.fail_open => {
                        tracing::debug!(%error, "shared rate unavailable; local share decides");
                        let (rate, burst) = instance_share(rate, burst, live.instances);
                        Ok(fallback.check(key_id, rate, burst, cost))
                    }
                    decided => decided,
                },
            };
            match decision {
                Ok(RateDecision::Allowed { remaining, reset }) => {
                    admission.rate = Some(PolicyState {
                        limit: u64::from(burst.get()),
                        window_secs: rate.period.as_secs().max(1),
                        remaining: u64::from(remaining),
                        reset_secs: reset.as_secs() + u64::from(reset.subsec_nanos() > 0),
                    });
                }
                Ok(RateDecision::Refused { retry_after }) => {
                    if let Some((quota, now)) = quota {
                        self.quotas.refund(key_id, quota, cost, now);
                    }
                    if let Some(taken) = &spent {
                        self.credits.refund(credits::Owner::Key(key_id), taken).await;
                    }
                    return Err(GatewayError::RateLimited { retry_after });
                }
                Err(error) => {
                    if let Some((quota, now)) = quota {
                        self.quotas.refund(key_id, quota, cost, now);
                    }
                    if let Some(taken) = &spent {
                        self.credits.refund(credits::Owner::Key(key_id), taken).await;
                    }
                    return Err(GatewayError::StoreUnavailable(format!("rate limit: {error}")));
                }
            }
        }
        Ok(admission)
    }
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

/// `Keygate-Credits-Remaining: N`: the credits a key has left, on every
/// admitted response of a key with credits (and `0` on its refusal).
pub const CREDITS_REMAINING: HeaderName = HeaderName::from_static("keygate-credits-remaining");

/// Writes [`CREDITS_REMAINING`] for a key with credits. Not switched off by
/// `[limits] headers`: a client spending credits needs its balance.
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
/// `X-RateLimit-Limit/Remaining/Reset` (for the tighter policy) when asked.
///
/// Every limited request pays for this, so each value is written on the stack
/// and copied once into its header value, without formatting machinery.
pub fn write_headers(headers: &mut HeaderMap, admission: &Admission, legacy: bool) {
    let policies = [("rate", admission.rate), ("quota", admission.quota)];
    let policies = policies.iter().filter_map(|(name, state)| Some((*name, (*state)?)));
    let mut policy = ValueBuf::default();
    let mut state = ValueBuf::default();
    let mut tightest: Option<PolicyState> = None;
    for (name, p) in policies {
        if tightest.is_some() {
            policy.push(b", ");
            state.push(b", ");
        }
        structured_item(&mut policy, name, (b"q", p.limit), (b"w", p.window_secs));
        structured_item(&mut state, name, (b"r", p.remaining), (b"t", p.reset_secs));
        if tightest.is_none_or(|t| p.remaining < t.remaining) {
            tightest = Some(p);
        }
    }
    let Some(tightest) = tightest else { return };
    // Names and digits only: always valid header values.
    if let Some(v) = policy.value() {
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

/// A RateLimit header value written on the stack, so that the value itself
/// is the only allocation. Two items of two `u64` parameters take at most
/// 108 bytes (`"quota";q=<20 digits>;w=<20 digits>` twice, and `, `).
struct ValueBuf {
    bytes: [u8; 128],
    len: usize,
    /// Set if a write did not fit: the value is then left out, never cut.
    overflowed: bool,
}

impl Default for ValueBuf {
    fn default() -> Self {
        Self { bytes: [0; 128], len: 0, overflowed: false }
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

/// A refusal's headers: the policy that refused, with nothing remaining.
fn write_refusal_headers(headers: &mut HeaderMap, record: &KeyRecord, error: &GatewayError, legacy: bool) {
    let meta = &record.meta;
    let (name, limit, window_secs, retry_after) = match (error, meta.rate, meta.quota) {
        (GatewayError::RateLimited { retry_after }, Some(rate), _) => (
            "rate",
            u64::from(meta.burst.unwrap_or(rate.count).get()),
            rate.period.as_secs().max(1),
            *retry_after,
        ),
        (GatewayError::QuotaExceeded { retry_after }, _, Some(quota)) => (
            "quota",
            quota.count,
            quota::Window::containing(quota.window, Timestamp::now()).policy_secs(),
            *retry_after,
        ),
        _ => return,
    };
    let reset_secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    let state = PolicyState { limit, window_secs, remaining: 0, reset_secs };
    let admission = if name == "rate" {
        Admission { rate: Some(state), quota: None, credits: None }
    } else {
        Admission { rate: None, quota: Some(state), credits: None }
    };
    write_headers(headers, &admission, legacy);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_list_each_policy_and_the_legacy_ones_show_the_tightest() {
        let mut headers = HeaderMap::new();
        let admission = Admission {
            rate: Some(PolicyState { limit: 10, window_secs: 1, remaining: 7, reset_secs: 1 }),
            quota: Some(PolicyState { limit: 10000, window_secs: 86400, remaining: 9993, reset_secs: 51000 }),
            credits: None,
        };
        write_headers(&mut headers, &admission, true);
        assert_eq!(headers["ratelimit-policy"], "\"rate\";q=10;w=1, \"quota\";q=10000;w=86400");
        assert_eq!(headers["ratelimit"], "\"rate\";r=7;t=1, \"quota\";r=9993;t=51000");
        assert_eq!(headers["x-ratelimit-remaining"], "7");
        assert_eq!(headers["x-ratelimit-limit"], "10");
    }

    #[test]
    fn the_legacy_headers_follow_the_tighter_policy_and_a_lone_policy_has_no_separator() {
        let mut headers = HeaderMap::new();
        let admission = Admission {
            rate: Some(PolicyState { limit: 100, window_secs: 60, remaining: 99, reset_secs: 60 }),
            quota: Some(PolicyState { limit: 5, window_secs: 3600, remaining: 0, reset_secs: 1200 }),
            credits: None,
        };
        write_headers(&mut headers, &admission, true);
        assert_eq!(headers["x-ratelimit-limit"], "5");
        assert_eq!(headers["x-ratelimit-remaining"], "0");
        assert_eq!(headers["x-ratelimit-reset"], "1200");

        let mut headers = HeaderMap::new();
        let admission = Admission { rate: None, quota: admission.quota, credits: None };
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
        write_headers(&mut headers, &Admission { rate: Some(max), quota: Some(max), credits: None }, false);
        let m = u64::MAX;
        assert_eq!(headers["ratelimit-policy"], format!("\"rate\";q={m};w={m}, \"quota\";q={m};w={m}"));
        assert_eq!(headers["ratelimit"], format!("\"rate\";r={m};t={m}, \"quota\";r={m};t={m}"));
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
