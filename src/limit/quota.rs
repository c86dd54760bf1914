//! Quotas: a budget of requests per window (calendar day or month in UTC,
//! or a fixed-length window), counted exactly.
//!
//! Exactness without a store round trip per request comes from leases: an
//! instance takes a block of units from the authority (Redis, or this
//! process alone for the file store) and spends them locally. The authority
//! hands each unit out once, so no interleaving of any number of instances
//! can admit more than the quota. The price is under-admission: units leased
//! but unspent when a window ends are lost, at most one lease per instance.
//! Leases shrink as the window's budget runs low (an eighth of what is left),
//! so near the end instances take units one at a time.
//!
//! While the authority cannot be reached, an instance spends what it has
//! leased, then at most an outage allowance per key and window, and
//! refuses after that (see `outage.rs` and `docs/limits.md`). What it spent
//! beyond its leases is written to the authority with its next lease, so
//! the window's counter ends up counting every admitted request.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use moka::sync::Cache;

use super::outage::Outage;
use super::{SubjectKind, lock};
use crate::meta::{Quota, QuotaWindow};

/// One window of a quota: where it starts, where it ends, and its stable name
/// (part of the Redis key, so dashboards can find "this month's" counter).
///
/// For a rolling quota this is the current sub-bucket (a 24th of the
/// window): leases are per sub-bucket, and the authority counts the
/// sub-buckets of the last full window ([`Rolling`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub id: String,
    pub start: Timestamp,
    pub end: Timestamp,
    pub rolling: Option<Rolling>,
}

/// How many sub-buckets a rolling window is counted in. A unit keeps
/// counting until its sub-bucket leaves the window, at most a 24th of the
/// window longer than exact: a rolling quota may under-admit by that much,
/// never over-admit.
pub const ROLLING_BUCKETS: i64 = 24;

/// A rolling window's counting: the counter's name, the sub-bucket length
/// and the current sub-bucket's index since the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rolling {
    pub counter_id: String,
    /// The whole window's length.
    pub length_secs: i64,
    pub bucket_secs: i64,
    pub bucket: i64,
}

impl Window {
    /// The window of `kind` that contains `now`.
    pub fn containing(kind: QuotaWindow, now: Timestamp) -> Window {
        let utc = now.to_zoned(TimeZone::UTC);
        match kind {
            QuotaWindow::Day => {
                let start = utc.date().to_zoned(TimeZone::UTC).map(|z| z.timestamp()).unwrap_or(now);
                let end = start.checked_add(jiff::SignedDuration::from_hours(24)).unwrap_or(start);
                Window { id: format!("d{}", utc.date().strftime("%Y%m%d")), start, end, rolling: None }
            }
            QuotaWindow::Month => {
                let first = utc.date().first_of_month();
                let start = first.to_zoned(TimeZone::UTC).map(|z| z.timestamp()).unwrap_or(now);
                let end = first
                    .checked_add(jiff::Span::new().months(1))
                    .ok()
                    .and_then(|d| d.to_zoned(TimeZone::UTC).ok())
                    .map_or(start, |z| z.timestamp());
                Window { id: format!("m{}", first.strftime("%Y%m")), start, end, rolling: None }
            }
            QuotaWindow::Every(length) => {
                let length_s = length.as_secs().max(1) as i64;
                let index = now.as_second().div_euclid(length_s);
                let start = Timestamp::from_second(index * length_s).unwrap_or(now);
                let end = Timestamp::from_second((index + 1) * length_s).unwrap_or(now);
                Window { id: format!("e{length_s}-{index}"), start, end, rolling: None }
            }
            QuotaWindow::Rolling(length) => {
                let length_s = length.as_secs().max(1) as i64;
                let bucket_secs = (length_s / ROLLING_BUCKETS).max(1);
                let bucket = now.as_second().div_euclid(bucket_secs);
                let start = Timestamp::from_second(bucket * bucket_secs).unwrap_or(now);
                let end = Timestamp::from_second((bucket + 1) * bucket_secs).unwrap_or(now);
                let rolling = Rolling {
                    counter_id: format!("r{length_s}"),
                    length_secs: length_s,
                    bucket_secs,
                    bucket,
                };
                Window { id: format!("r{length_s}-{bucket}"), start, end, rolling: Some(rolling) }
            }
        }
    }

    /// The window's length as `RateLimit-Policy` reports it: the whole
    /// window, also for a rolling one (counted in shorter sub-buckets).
    pub fn policy_secs(&self) -> u64 {
        let secs = match &self.rolling {
            Some(rolling) => rolling.length_secs,
            None => self.end.as_second().saturating_sub(self.start.as_second()),
        };
        secs.max(1) as u64
    }

    /// Time from `now` until the window resets (at least one second).
    pub fn until_reset(&self, now: Timestamp) -> Duration {
        let left = self.end.as_second().saturating_sub(now.as_second()).max(1);
        Duration::from_secs(left as u64)
    }
}

/// Where leases come from: hands out units of one subject's quota window
/// (a key's, or a client's shared by its keys), each once.
// The lease's inputs are distinct numbers each documented below; a struct
// would only rename them.
#[allow(clippy::too_many_arguments)]
#[async_trait::async_trait]
pub trait QuotaAuthority: Send + Sync + 'static {
    /// First counts `settle` units as granted (spent by this instance beyond
    /// its leases while the authority was unreachable), then grants between
    /// `min` and `want` units of `limit` for this window, or 0 if fewer than
    /// `min` are left. Returns what it granted and how many units (granted
    /// to anyone) remain unspent in the authority afterwards.
    async fn lease(
        &self,
        kind: SubjectKind,
        id: &str,
        window: &Window,
        limit: u64,
        min: u64,
        want: u64,
        settle: u64,
    ) -> Result<Lease, LeaseError>;
}

/// Why a lease failed: an outage, or a counter that cannot be counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The authority could not be reached or did not answer in time: the
    /// outage rules apply (leases, allowance, then 503).
    #[error("{0}")]
    Unreachable(String),
    /// The authority answered, with an error about this key's counter (a
    /// value of the wrong Redis type, say). Not an outage: the key is
    /// refused, and the other keys still count in the authority.
    #[error("{0}")]
    Broken(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub granted: u64,
    /// Units the authority still has for this window after this grant.
    pub left: u64,
    /// Rolling windows: when the oldest counted units stop counting (unix
    /// seconds), i.e. when an exhausted quota has room again.
    pub frees_at: Option<i64>,
}

/// A key's local view of its current quota window.
#[derive(Debug, Default)]
struct Local {
    window_id: String,
    /// The quota size the knowledge below is about; a `keys update` that
    /// changes it makes `authority_left` unknown again.
    limit: u64,
    /// Leased units not yet spent.
    available: u64,
    /// The authority's units left after our last lease. Other instances only
    /// lower it, so it is a safe upper bound for refusing without asking.
    authority_left: Option<u64>,
    /// Rolling windows: when room frees up, from the authority's last word.
    frees_at: Option<i64>,
    /// Units spent beyond the leases in this window while the authority
    /// was unreachable; never above the outage allowance.
    outage_spent: u64,
    /// Of those, the units the authority has not counted yet.
    unsettled: u64,
}

/// The outcome of taking quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaDecision {
    Taken { remaining: u64, reset: Duration, window_secs: u64 },
    Exhausted { retry_after: Duration },
}

/// Per-subject quota state on one instance, backed by an authority.
pub struct Quotas {
    /// One map per [`SubjectKind`]: a key and a client never share a state.
    subjects: [Cache<String, Arc<KeyQuota>>; SubjectKind::COUNT],
    authority: Arc<dyn QuotaAuthority>,
    max_lease: u64,
    /// While set, leases are not asked for: the outage allowance decides.
    outage: Outage,
}

struct KeyQuota {
    local: Mutex<Local>,
    /// Serialises refills so a burst of requests makes one authority call.
    refill: tokio::sync::Mutex<()>,
}

impl Quotas {
    pub fn new(authority: Arc<dyn QuotaAuthority>, max_lease: u64, max_subjects: u64) -> Self {
        let cache =
            || Cache::builder().max_capacity(max_subjects).time_to_idle(Duration::from_secs(3600)).build();
        Self {
            subjects: [cache(), cache()],
            authority,
            max_lease: max_lease.max(1),
            outage: Outage::new("quotas"),
        }
    }

    /// Takes `cost` units of the subject's quota, all or nothing, with no
    /// outage allowance: once the leases are spent, an unreachable
    /// authority is an error.
    pub async fn take(
        &self,
        kind: SubjectKind,
        id: &str,
        quota: Quota,
        cost: NonZeroU32,
        now: Timestamp,
    ) -> Result<QuotaDecision, String> {
        self.take_within(kind, id, quota, cost, now, 0).await
    }

    /// Takes `cost` units of the subject's quota, all or nothing. While the
    /// authority is unreachable, at most `allowance` units per window may be
    /// spent beyond what this instance leased; past that, an error.
    pub async fn take_within(
        &self,
        kind: SubjectKind,
        id: &str,
        quota: Quota,
        cost: NonZeroU32,
        now: Timestamp,
        allowance: u64,
    ) -> Result<QuotaDecision, String> {
        let cost = u64::from(cost.get());
        let window = Window::containing(quota.window, now);
        let state = self.subjects[kind.index()].get_with(id.to_owned(), || {
            Arc::new(KeyQuota { local: Mutex::new(Local::default()), refill: tokio::sync::Mutex::new(()) })
        });
        loop {
            let missing = match spend(&state.local, &window, quota.count, cost, now) {
                Spend::Decided(decision) => return Ok(decision),
                Spend::Missing(_) => {
                    // Not enough leased here: one task refills, the others wait.
                    let _refilling = state.refill.lock().await;
                    match spend(&state.local, &window, quota.count, cost, now) {
                        Spend::Decided(decision) => return Ok(decision),
                        Spend::Missing(missing) => missing,
                    }
                }
            };
            if self.outage.skip_store() {
                return outage_spend(&state.local, &window, cost, allowance, now);
            }
            let settle = {
                let local = lock(&state.local);
                if local.window_id == window.id { local.unsettled } else { 0 }
            };
            // Ask for at least what is missing, so a grant always completes
            // the request; a refusal (0) records how little is left.
            let want = self.max_lease.max(missing);
            let lease =
                match self.authority.lease(kind, id, &window, quota.count, missing, want, settle).await {
                    Ok(lease) => {
                        self.outage.succeeded();
                        lease
                    }
                    Err(LeaseError::Unreachable(error)) => {
                        self.outage.failed(&error);
                        return outage_spend(&state.local, &window, cost, allowance, now);
                    }
                    Err(LeaseError::Broken(error)) => return Err(error),
                };
            let mut local = lock(&state.local);
            if local.window_id == window.id {
                local.available += lease.granted;
                local.authority_left = Some(lease.left);
                local.frees_at = lease.frees_at;
                local.unsettled = local.unsettled.saturating_sub(settle);
            }
        }
    }

    /// Gives back units taken for a request that another limit refused, so a
    /// refused request spends nothing.
    pub fn refund(&self, kind: SubjectKind, id: &str, quota: Quota, cost: NonZeroU32, now: Timestamp) {
        let window = Window::containing(quota.window, now);
        if let Some(state) = self.subjects[kind.index()].get(id) {
            let mut local = lock(&state.local);
            if local.window_id == window.id {
                local.available += u64::from(cost.get());
            }
        }
    }
}

enum Spend {
    Decided(QuotaDecision),
    /// This many more units must be leased before the request can be decided.
    Missing(u64),
}

/// Spends from the local lease if it can decide now: taken, or exhausted
/// when the authority's last word says not enough is left anywhere.
fn spend(local: &Mutex<Local>, window: &Window, limit: u64, cost: u64, now: Timestamp) -> Spend {
    let mut local = lock(local);
    if local.window_id != window.id {
        *local = Local { window_id: window.id.clone(), limit, ..Local::default() };
    }
    if local.limit != limit {
        local.limit = limit;
        local.authority_left = None;
    }
    if local.available >= cost {
        local.available -= cost;
        let remaining = local.available + local.authority_left.unwrap_or(0);
        let taken = QuotaDecision::Taken {
            remaining,
            reset: window.until_reset(now),
            window_secs: window.policy_secs(),
        };
        return Spend::Decided(taken);
    }
    match local.authority_left {
        Some(left) if local.available + left < cost => {
            let retry_after = match local.frees_at {
                Some(at) => Duration::from_secs(at.saturating_sub(now.as_second()).max(1) as u64),
                None => window.until_reset(now),
            };
            Spend::Decided(QuotaDecision::Exhausted { retry_after })
        }
        _ => Spend::Missing(cost - local.available),
    }
}

/// Spends from the outage allowance, the authority being unreachable: the
/// leased units are gone (else `spend` would have decided), so the
/// allowance is all this instance may still admit in this window.
fn outage_spend(
    local: &Mutex<Local>,
    window: &Window,
    cost: u64,
    allowance: u64,
    now: Timestamp,
) -> Result<QuotaDecision, String> {
    let mut local = lock(local);
    if local.window_id != window.id {
        // A window began between `spend` and now: `spend` resets it on the next request.
        return Err("quota store unreachable".to_owned());
    }
    // A lease may have landed while this request waited for its turn.
    if local.available >= cost {
        local.available -= cost;
        let reset = window.until_reset(now);
        return Ok(QuotaDecision::Taken {
            remaining: local.available,
            reset,
            window_secs: window.policy_secs(),
        });
    }
    let left = allowance.saturating_sub(local.outage_spent);
    if left < cost {
        return Err(format!(
            "quota store unreachable and the outage allowance ({allowance}) of this window is spent"
        ));
    }
    local.outage_spent += cost;
    local.unsettled += cost;
    Ok(QuotaDecision::Taken {
        remaining: left - cost,
        reset: window.until_reset(now),
        window_secs: window.policy_secs(),
    })
}

/// Lease size: an eighth of what is left, at least `min`, at most `want`.
pub fn lease_size(left: u64, min: u64, want: u64) -> u64 {
    if left < min { 0 } else { (left / 8).clamp(min, want.max(min)).min(left) }
}

// === The in-process authority (file store, single instance) ===

/// A rolling counter's units granted, by sub-bucket index.
type SubBuckets = std::collections::BTreeMap<i64, u64>;

/// Counts quota in this process only: the file store's single-instance mode.
/// Counters start again when the process restarts.
#[derive(Default)]
pub struct ProcessAuthority {
    /// Units granted per (subject, window).
    granted: Mutex<std::collections::HashMap<(SubjectKind, String, String), u64>>,
    /// Rolling windows: units granted per (subject, counter), by sub-bucket.
    rolling: Mutex<std::collections::HashMap<(SubjectKind, String, String), SubBuckets>>,
}

#[async_trait::async_trait]
impl QuotaAuthority for ProcessAuthority {
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
            let mut counters = lock(&self.rolling);
            let buckets = counters.entry((kind, id.to_owned(), rolling.counter_id.clone())).or_default();
            // Sub-buckets that left the window no longer count.
            buckets.retain(|&bucket, _| bucket > rolling.bucket - ROLLING_BUCKETS);
            if settle > 0 {
                *buckets.entry(rolling.bucket).or_insert(0) += settle;
            }
            let used: u64 = buckets.values().sum();
            let grant = lease_size(limit.saturating_sub(used), min, want);
            if grant > 0 {
                *buckets.entry(rolling.bucket).or_insert(0) += grant;
            }
            let frees_at =
                buckets.keys().next().map(|&oldest| (oldest + ROLLING_BUCKETS) * rolling.bucket_secs);
            return Ok(Lease { granted: grant, left: limit.saturating_sub(used + grant), frees_at });
        }
        let mut granted = lock(&self.granted);
        // Forget other windows of this subject: they are over.
        granted.retain(|(k, s, w), _| *k != kind || s != id || *w == window.id);
        let used = granted.entry((kind, id.to_owned(), window.id.clone())).or_insert(0);
        *used += settle;
        let grant = lease_size(limit.saturating_sub(*used), min, want);
        *used += grant;
        Ok(Lease { granted: grant, left: limit.saturating_sub(*used), frees_at: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn calendar_windows_are_utc_days_and_months() {
        let day = Window::containing(QuotaWindow::Day, at("2026-11-24T13:45:00Z"));
        assert_eq!(
            (day.id.as_str(), day.start, day.end),
            ("d20261124", at("2026-11-24T00:00:00Z"), at("2026-11-25T00:00:00Z"))
        );
        let month = Window::containing(QuotaWindow::Month, at("2026-12-31T23:59:59Z"));
        assert_eq!(
            (month.id.as_str(), month.start, month.end),
            ("m202612", at("2026-12-01T00:00:00Z"), at("2027-01-01T00:00:00Z"))
        );
        let hour =
            Window::containing(QuotaWindow::Every(Duration::from_secs(3600)), at("2026-11-24T13:45:00Z"));
        assert_eq!((hour.start, hour.end), (at("2026-11-24T13:00:00Z"), at("2026-11-24T14:00:00Z")));
        assert_eq!(day.until_reset(at("2026-11-24T23:59:30Z")), Duration::from_secs(30));
    }

    #[test]
    fn leases_shrink_as_the_budget_runs_out() {
        assert_eq!(lease_size(10_000, 1, 100), 100);
        assert_eq!(lease_size(400, 1, 100), 50);
        assert_eq!(lease_size(7, 1, 100), 1);
        assert_eq!(lease_size(7, 3, 100), 3);
        assert_eq!(lease_size(2, 3, 100), 0);
    }

    const KEY: SubjectKind = SubjectKind::Key;

    fn quotas() -> Quotas {
        Quotas::new(Arc::new(ProcessAuthority::default()), 100, 1000)
    }

    fn one() -> NonZeroU32 {
        NonZeroU32::new(1).unwrap()
    }

    #[tokio::test]
    async fn exactly_the_quota_is_admitted_by_many_concurrent_takers() {
        let quotas = Arc::new(quotas());
        let quota: Quota = "1000/day".parse().unwrap();
        let now = at("2026-11-24T12:00:00Z");
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let quotas = Arc::clone(&quotas);
            tasks.push(tokio::spawn(async move {
                let mut taken = 0;
                for _ in 0..100 {
                    if let QuotaDecision::Taken { .. } =
                        quotas.take(KEY, "k.1", quota, one(), now).await.unwrap()
                    {
                        taken += 1;
                    }
                }
                taken
            }));
        }
        let mut total = 0;
        for task in tasks {
            total += task.await.unwrap();
        }
        assert_eq!(total, 1000);
        let refused = quotas.take(KEY, "k.1", quota, one(), now).await.unwrap();
        assert_eq!(refused, QuotaDecision::Exhausted { retry_after: Duration::from_secs(12 * 3600) });
    }

    #[tokio::test]
    async fn a_new_window_brings_a_new_budget() {
        let quotas = quotas();
        let quota: Quota = "2/day".parse().unwrap();
        let today = at("2026-11-24T23:00:00Z");
        for _ in 0..2 {
            assert!(matches!(
                quotas.take(KEY, "k.1", quota, one(), today).await.unwrap(),
                QuotaDecision::Taken { .. }
            ));
        }
        assert!(matches!(
            quotas.take(KEY, "k.1", quota, one(), today).await.unwrap(),
            QuotaDecision::Exhausted { .. }
        ));
        let tomorrow = at("2026-11-25T00:00:01Z");
        assert!(matches!(
            quotas.take(KEY, "k.1", quota, one(), tomorrow).await.unwrap(),
            QuotaDecision::Taken { .. }
        ));
    }

    #[tokio::test]
    async fn a_refused_costly_request_leaves_room_for_cheap_ones() {
        let quotas = quotas();
        let quota: Quota = "12/day".parse().unwrap();
        let now = at("2026-11-24T12:00:00Z");
        let five = NonZeroU32::new(5).unwrap();
        for _ in 0..2 {
            assert!(matches!(
                quotas.take(KEY, "k.1", quota, five, now).await.unwrap(),
                QuotaDecision::Taken { .. }
            ));
        }
        assert!(matches!(
            quotas.take(KEY, "k.1", quota, five, now).await.unwrap(),
            QuotaDecision::Exhausted { .. }
        ));
        for _ in 0..2 {
            assert!(matches!(
                quotas.take(KEY, "k.1", quota, one(), now).await.unwrap(),
                QuotaDecision::Taken { .. }
            ));
        }
        assert!(matches!(
            quotas.take(KEY, "k.1", quota, one(), now).await.unwrap(),
            QuotaDecision::Exhausted { .. }
        ));
    }

    #[tokio::test]
    async fn a_raised_quota_applies_at_once() {
        let quotas = quotas();
        let now = at("2026-11-24T12:00:00Z");
        let small: Quota = "1/day".parse().unwrap();
        assert!(matches!(
            quotas.take(KEY, "k.1", small, one(), now).await.unwrap(),
            QuotaDecision::Taken { .. }
        ));
        assert!(matches!(
            quotas.take(KEY, "k.1", small, one(), now).await.unwrap(),
            QuotaDecision::Exhausted { .. }
        ));
        let raised: Quota = "3/day".parse().unwrap();
        for _ in 0..2 {
            assert!(matches!(
                quotas.take(KEY, "k.1", raised, one(), now).await.unwrap(),
                QuotaDecision::Taken { .. }
            ));
        }
        assert!(matches!(
            quotas.take(KEY, "k.1", raised, one(), now).await.unwrap(),
            QuotaDecision::Exhausted { .. }
        ));
    }

    #[tokio::test]
    async fn a_rolling_quota_frees_units_as_they_leave_the_window() {
        let quotas = quotas();
        let quota: Quota = "10/rolling-1d".parse().unwrap();
        let start = at("2026-11-24T00:00:00Z");
        let hours = |h: i64| start.checked_add(jiff::SignedDuration::from_hours(h)).unwrap();
        // 6 at midnight, 4 at 06:00: the budget is spent.
        for _ in 0..6 {
            assert!(matches!(
                quotas.take(KEY, "k.1", quota, one(), start).await.unwrap(),
                QuotaDecision::Taken { .. }
            ));
        }
        for _ in 0..4 {
            assert!(matches!(
                quotas.take(KEY, "k.1", quota, one(), hours(6)).await.unwrap(),
                QuotaDecision::Taken { .. }
            ));
        }
        // At 12:00 nothing has left the window; room frees at midnight.
        match quotas.take(KEY, "k.1", quota, one(), hours(12)).await.unwrap() {
            QuotaDecision::Exhausted { retry_after } => {
                assert_eq!(retry_after, Duration::from_secs(12 * 3600))
            }
            other => panic!("{other:?}"),
        }
        // A calendar day would reset at midnight in full; a rolling one frees
        // only the 6 from midnight, while the 4 from 06:00 still count.
        let mut taken = 0;
        for _ in 0..10 {
            if let QuotaDecision::Taken { .. } =
                quotas.take(KEY, "k.1", quota, one(), hours(24)).await.unwrap()
            {
                taken += 1;
            }
        }
        assert_eq!(taken, 6);
    }

    #[tokio::test]
    async fn refunded_units_are_spent_again() {
        let quotas = quotas();
        let quota: Quota = "1/day".parse().unwrap();
        let now = at("2026-11-24T12:00:00Z");
        assert!(matches!(
            quotas.take(KEY, "k.1", quota, one(), now).await.unwrap(),
            QuotaDecision::Taken { remaining: 0, .. }
        ));
        quotas.refund(KEY, "k.1", quota, one(), now);
        assert!(matches!(
            quotas.take(KEY, "k.1", quota, one(), now).await.unwrap(),
            QuotaDecision::Taken { .. }
        ));
        assert!(matches!(
            quotas.take(KEY, "k.1", quota, one(), now).await.unwrap(),
            QuotaDecision::Exhausted { .. }
        ));
    }
}
