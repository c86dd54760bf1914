//! Whether a target should get requests: passive health (the outcomes of
//! real requests), active health (probes, run by `probe.rs`), and the count
//! of requests outstanding on it (what `least_outstanding` balances on).
//!
//! Passive: `failures` consecutive failed exchanges (connect errors, resets,
//! timeouts, and 5xx answers unless `count_5xx = false`) eject the target
//! for `ejection`; each further ejection without a success in between
//! doubles it, up to `max_ejection`. When the period ends, one request is
//! let through as a trial: its success returns the target, its failure
//! ejects it again for twice as long. Active: `unhealthy` failed probes in a
//! row take the target out; `healthy` passing probes in a row bring it back
//! and also end any passive ejection (the probe is the proof).
//!
//! Each target's state outlives config reloads that keep the target (the
//! upstream's pools are rebuilt, this is carried over), so a reload neither
//! forgets an ejection nor resets the back-off.
//!
//! Everything here is atomics read with relaxed loads: the request path
//! pays one or two loads to ask "may I send here", no lock and no clock
//! read (times come from the caller's `sent`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// `passive = {...}` on an `[upstream.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassiveSettings {
    /// Consecutive failures that eject a target; 0 turns passive health off.
    pub failures: u32,
    /// Whether a 5xx answer counts as a failure (connect errors, resets and
    /// timeouts always do).
    pub count_5xx: bool,
    /// The first ejection's length; doubled for each one after it.
    pub ejection: Duration,
    pub max_ejection: Duration,
}

impl Default for PassiveSettings {
    fn default() -> Self {
        Self {
            failures: 5,
            count_5xx: true,
            ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
        }
    }
}

/// `health = {...}` on an `[upstream.NAME]`: active checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveSettings {
    /// Path (and query) probed with `GET`; a 2xx or 3xx answer passes.
    pub path: http::uri::PathAndQuery,
    pub interval: Duration,
    pub timeout: Duration,
    /// Passing probes in a row that bring a target back.
    pub healthy: u32,
    /// Failing probes in a row that take it out.
    pub unhealthy: u32,
}

/// What one exchange with a target came to, for passive health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// One target's health and load. Shared by every worker and carried over
/// reloads; see the module doc.
pub struct TargetHealth {
    /// Times below are milliseconds since `base`, plus one (0 means "never").
    base: Instant,
    consecutive_failures: AtomicU32,
    /// Until when the target is ejected (0: in rotation).
    ejected_until: AtomicU64,
    /// Ejections since the last success: the back-off's exponent.
    ejections_in_row: AtomicU32,
    /// A trial request is out after an ejection ended.
    trial: AtomicBool,
    last_failure: AtomicU64,
    /// Active checks' verdict (true until probes say otherwise).
    active_up: AtomicBool,
    /// Probes in a row with the same result as the last one; the sign
    /// is kept in `last_probe_passed`.
    probe_streak: AtomicU32,
    last_probe_passed: AtomicBool,
    /// Requests sent and not yet finished (their response body ended).
    outstanding: AtomicUsize,
    series: crate::metrics::TargetSeries,
}

impl TargetHealth {
    pub fn new(upstream: &str, target: &str) -> Arc<Self> {
        let series = crate::metrics::target_series(upstream, target);
        series.healthy.set(1);
        Arc::new(Self {
            base: Instant::now(),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections_in_row: AtomicU32::new(0),
            trial: AtomicBool::new(false),
            last_failure: AtomicU64::new(0),
            active_up: AtomicBool::new(true),
            probe_streak: AtomicU32::new(0),
            last_probe_passed: AtomicBool::new(true),
            outstanding: AtomicUsize::new(0),
            series,
        })
    }

    fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Whether the target is in rotation now (not ejected, not failing its
    /// probes). An ejection whose time is up counts as in rotation: the
    /// request that [`claim`](Self::claim)s it is the trial.
    pub fn selectable(&self, now: Instant) -> bool {
        if !self.active_up.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || self.millis(now) >= until
    }

    /// Takes the target for one request: true at once when it is healthy;
    /// after an ejection, true for the one request that becomes its trial
    /// (the others keep away until the trial's outcome is known, or until
    /// it is overdue by another ejection period).
    pub fn claim(&self, now: Instant, passive: &PassiveSettings) -> bool {
        if !self.active_up.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        let now_ms = self.millis(now);
        if now_ms < until {
            return false;
        }
        let hold = self.backoff(self.ejections_in_row.load(Ordering::Relaxed), passive);
        let claimed = self
            .ejected_until
            .compare_exchange(
                until,
                now_ms.saturating_add(millis_of(hold)),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok();
        if claimed {
            self.trial.store(true, Ordering::Relaxed);
        }
        claimed
    }

    /// When the target last failed (for panic mode: the least recently
    /// failed target is the best guess when all are out).
    pub fn last_failure(&self) -> u64 {
        self.last_failure.load(Ordering::Relaxed)
    }

    /// Records a real exchange's outcome (passive health).
    pub fn record(&self, outcome: Outcome, now: Instant, passive: &PassiveSettings, target: &str) {
        match outcome {
            Outcome::Success => {
                // The common case touches one cache line with plain loads.
                if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                    self.consecutive_failures.store(0, Ordering::Relaxed);
                }
                if self.ejected_until.load(Ordering::Relaxed) != 0 {
                    self.return_to_rotation(target, "a request succeeded");
                }
            }
            Outcome::Failure => {
                let now_ms = self.millis(now);
                self.last_failure.store(now_ms, Ordering::Relaxed);
                self.series.failures.inc();
                let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
                if passive.failures == 0 || failures < passive.failures {
                    return;
                }
                let until = self.ejected_until.load(Ordering::Relaxed);
                let trial_failed = self.trial.swap(false, Ordering::Relaxed);
                // Failures of requests already in flight when it was
                // ejected do not lengthen the ejection.
                if !trial_failed && until != 0 && now_ms < until {
                    return;
                }
                let row = self.ejections_in_row.fetch_add(1, Ordering::Relaxed).saturating_add(1);
                let hold = self.backoff(row, passive);
                self.ejected_until.store(now_ms.saturating_add(millis_of(hold)), Ordering::Relaxed);
                self.series.ejections.inc();
                self.series.healthy.set(0);
                tracing::warn!(target, failures, ejected_for = ?hold, "upstream target ejected");
            }
        }
    }

    /// Records one active probe.
    pub fn record_probe(&self, passed: bool, active: &ActiveSettings, target: &str, why: &str) {
        let streak = if self.last_probe_passed.swap(passed, Ordering::Relaxed) == passed {
            self.probe_streak.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.probe_streak.store(1, Ordering::Relaxed);
            1
        };
        let up = self.active_up.load(Ordering::Relaxed);
        if passed && streak >= active.healthy {
            if !up {
                self.active_up.store(true, Ordering::Relaxed);
                tracing::info!(target, "upstream target passed its health checks");
            }
            if self.ejected_until.load(Ordering::Relaxed) != 0 {
                self.return_to_rotation(target, "health checks passed");
            } else if !up {
                self.series.healthy.set(1);
            }
        } else if !passed && streak >= active.unhealthy && up {
            self.active_up.store(false, Ordering::Relaxed);
            self.series.healthy.set(0);
            tracing::warn!(target, reason = why, "upstream target failed its health checks");
        }
    }

    fn return_to_rotation(&self, target: &str, why: &str) {
        self.ejected_until.store(0, Ordering::Relaxed);
        self.ejections_in_row.store(0, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.trial.store(false, Ordering::Relaxed);
        if self.active_up.load(Ordering::Relaxed) {
            self.series.healthy.set(1);
        }
        tracing::info!(target, reason = why, "upstream target back in rotation");
    }

    /// The ejection length for the `row`th ejection in a row.
    fn backoff(&self, row: u32, passive: &PassiveSettings) -> Duration {
        let doublings = row.saturating_sub(1).min(20);
        passive.ejection.saturating_mul(1 << doublings).min(passive.max_ejection.max(passive.ejection))
    }

    /// Requests outstanding on this target now.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Whether the target is in rotation as far as `/readyz` and the
    /// metrics are concerned (ejected or failing probes: not).
    pub fn is_healthy(&self, now: Instant) -> bool {
        self.selectable(now) && !self.trial.load(Ordering::Relaxed)
    }

    /// Counts one request outstanding until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        self.series.outstanding.inc();
        self.series.requests.inc();
        InFlight { health: Arc::clone(self), started: Instant::now() }
    }
}

impl Drop for TargetHealth {
    fn drop(&mut self) {
        crate::metrics::forget_target(&self.series);
    }
}

fn millis_of(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A request outstanding on a target, until its response body ends (or
/// it fails): dropped, it stops counting.
pub struct InFlight {
    health: Arc<TargetHealth>,
    /// For the target's duration histogram, observed when this drops.
    started: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.health.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.health.series.outstanding.dec();
        self.health.series.duration.observe(self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passive() -> PassiveSettings {
        PassiveSettings {
            failures: 3,
            count_5xx: true,
            ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(35),
        }
    }

    #[test]
    fn consecutive_failures_eject_and_the_back_off_doubles_until_a_success() {
        let health = TargetHealth::new("health-test", "a:1");
        let settings = passive();
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let fail = |secs| health.record(Outcome::Failure, at(secs), &settings, "a:1");
        fail(0);
        fail(0);
        assert!(health.claim(at(0), &settings), "two failures of three: still in");
        health.record(Outcome::Success, at(0), &settings, "a:1");
        fail(1);
        fail(1);
        assert!(health.claim(at(1), &settings), "the success reset the count");
        fail(1);
        assert!(!health.selectable(at(1)) && !health.claim(at(10), &settings), "ejected for 10 s");
        fail(2); // a request that was already in flight: no longer ejection
        assert!(!health.claim(at(10), &settings));

        // The ejection is over: exactly one trial, the others stay away.
        assert!(health.claim(at(11), &settings));
        assert!(!health.claim(at(11), &settings), "one trial at a time");
        fail(11); // the trial failed: 20 s now
        assert!(!health.claim(at(30), &settings));
        assert!(health.claim(at(31), &settings));
        fail(31); // 40 s, capped at 35
        assert!(!health.claim(at(65), &settings));
        assert!(health.claim(at(66), &settings));
        health.record(Outcome::Success, at(66), &settings, "a:1");
        assert!(health.claim(at(66), &settings) && health.claim(at(66), &settings), "back in rotation");
        fail(67);
        fail(67);
        fail(67);
        assert!(!health.claim(at(76), &settings) && health.claim(at(77), &settings), "back to 10 s");
        assert_eq!(health.last_failure(), 67_001);
    }

    #[test]
    fn passive_health_off_never_ejects() {
        let health = TargetHealth::new("health-test", "b:1");
        let settings = PassiveSettings { failures: 0, ..passive() };
        let now = Instant::now();
        for _ in 0..100 {
            health.record(Outcome::Failure, now, &settings, "b:1");
        }
        assert!(health.claim(now, &settings));
    }

    #[test]
    fn probes_take_a_target_out_and_bring_it_back_ending_an_ejection() {
        let health = TargetHealth::new("health-test", "c:1");
        let active = ActiveSettings {
            path: http::uri::PathAndQuery::from_static("/healthz"),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy: 2,
            unhealthy: 3,
        };
        let settings = passive();
        let now = Instant::now();
        health.record_probe(false, &active, "c:1", "refused");
        health.record_probe(false, &active, "c:1", "refused");
        assert!(health.claim(now, &settings), "two failed probes of three");
        health.record_probe(true, &active, "c:1", "");
        health.record_probe(false, &active, "c:1", "refused");
        health.record_probe(false, &active, "c:1", "refused");
        assert!(health.claim(now, &settings), "the pass broke the streak");
        health.record_probe(false, &active, "c:1", "refused");
        assert!(!health.claim(now, &settings) && !health.is_healthy(now));
        for _ in 0..3 {
            health.record(Outcome::Failure, now, &settings, "c:1");
        }
        health.record_probe(true, &active, "c:1", "");
        assert!(!health.claim(now, &settings), "one pass of two");
        health.record_probe(true, &active, "c:1", "");
        assert!(health.claim(now, &settings), "back, and the passive ejection ended with it");
        assert!(health.is_healthy(now));
    }

    #[test]
    fn outstanding_requests_count_until_their_guard_drops() {
        let health = TargetHealth::new("health-test", "d:1");
        let first = health.start_request();
        let second = health.start_request();
        assert_eq!(health.outstanding(), 2);
        drop(first);
        assert_eq!(health.outstanding(), 1);
        drop(second);
        assert_eq!(health.outstanding(), 0);
    }
}
