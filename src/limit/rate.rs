//! Local rate limits: one governor (GCRA) limiter per key, each with the
//! key's own rate and burst.
//!
//! A map of direct limiters rather than one keyed limiter, because every key
//! carries its own quota. The map is a moka cache: bounded in size, and a
//! limiter idle for `idle_eviction` is dropped (an idle GCRA limiter is full
//! again anyway, so dropping it forgets nothing). A key whose rate changed
//! (after `keys update`) gets a fresh limiter on its next request.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use moka::ops::compute;
use moka::sync::Cache;

use crate::meta::Rate;

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

/// One key's limiter and the limit it was built for.
struct KeyLimiter<C: Clock> {
    rate: Rate,
    burst: NonZeroU32,
    limiter: Limiter<C>,
}

/// The outcome of a rate check, with what the headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allowed { remaining: u32, reset: Duration },
    Refused { retry_after: Duration },
}

/// Per-key GCRA limiters on one gateway instance.
pub struct LocalRates<C: Clock = DefaultClock> {
    limiters: Cache<String, Arc<KeyLimiter<C>>, foldhash::fast::RandomState>,
    clock: C,
}

impl LocalRates<DefaultClock> {
    pub fn new(max_keys: u64, idle_eviction: Duration) -> Self {
        Self::with_clock(max_keys, idle_eviction, DefaultClock::default())
    }
}

impl<C> LocalRates<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    pub fn with_clock(max_keys: u64, idle_eviction: Duration, clock: C) -> Self {
        let limiters = Cache::builder()
            .max_capacity(max_keys)
            .time_to_idle(idle_eviction)
            .build_with_hasher(foldhash::fast::RandomState::default());
        Self { limiters, clock }
    }

    /// Takes `cost` cells from the key's limiter, all or nothing. A refused
    /// check leaves the limiter untouched, so hammering while limited does
    /// not push the refusal further out.
    pub fn check(&self, key_id: &str, rate: Rate, burst: NonZeroU32, cost: NonZeroU32) -> RateDecision {
        let entry = self.limiter_for(key_id, rate, burst);
        match entry.limiter.check_n(cost) {
            Ok(Ok(snapshot)) => {
                let remaining = snapshot.remaining_burst_capacity();
                let per_cell = rate.period / rate.count.get();
                RateDecision::Allowed {
                    remaining,
                    reset: per_cell * (burst.get() - remaining.min(burst.get())),
                }
            }
            Ok(Err(not_until)) => {
                RateDecision::Refused { retry_after: not_until.wait_time_from(self.clock.now()) }
            }
            // The cost can never fit in the burst: refuse for one full period.
            Err(_insufficient) => RateDecision::Refused { retry_after: rate.period },
        }
    }

    fn limiter_for(&self, key_id: &str, rate: Rate, burst: NonZeroU32) -> Arc<KeyLimiter<C>> {
        // Fast path, no lock: the key's limiter exists and fits its limit.
        if let Some(entry) = self.limiters.get(key_id)
            && entry.rate == rate
            && entry.burst == burst
        {
            return entry;
        }
        // New key, or its limit changed: create or replace atomically per key,
        // so simultaneous first requests share one limiter (two limiters would
        // each grant a full burst).
        let fits = |entry: &KeyLimiter<C>| entry.rate == rate && entry.burst == burst;
        let computed = self.limiters.entry_by_ref(key_id).and_compute_with(|existing| match existing {
            Some(entry) if fits(entry.value()) => compute::Op::Nop,
            _ => compute::Op::Put(Arc::new(KeyLimiter {
                rate,
                burst,
                limiter: build(rate, burst, self.clock.clone()),
            })),
        });
        match computed {
            compute::CompResult::Inserted(entry)
            | compute::CompResult::ReplacedWith(entry)
            | compute::CompResult::Unchanged(entry) => entry.into_value(),
            // The closure never removes nor leaves the key absent; should moka
            // ever say so, a limiter of our own still enforces the limit.
            compute::CompResult::StillNone(_) | compute::CompResult::Removed(_) => {
                Arc::new(KeyLimiter { rate, burst, limiter: build(rate, burst, self.clock.clone()) })
            }
        }
    }

    /// Limiters currently tracked (after pending evictions).
    pub fn tracked(&self) -> u64 {
        self.limiters.run_pending_tasks();
        self.limiters.entry_count()
    }
}

fn build<C: Clock>(rate: Rate, burst: NonZeroU32, clock: C) -> Limiter<C> {
    let per_cell = (rate.period / rate.count.get()).max(Duration::from_nanos(1));
    // `with_period` only fails for a zero period, which `max` above rules out.
    let quota =
        Quota::with_period(per_cell).unwrap_or_else(|| Quota::per_second(rate.count)).allow_burst(burst);
    RateLimiter::direct_with_clock(quota, clock).with_middleware::<StateInformationMiddleware>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn ten_per_second() -> Rate {
        "10/s".parse().unwrap()
    }

    fn rates() -> (LocalRates<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (LocalRates::with_clock(1000, Duration::from_secs(600), clock.clone()), clock)
    }

    fn allowed(d: RateDecision) -> bool {
        matches!(d, RateDecision::Allowed { .. })
    }

    /// Regression: simultaneous first requests for a key each built their own
    /// limiter, so 11 of 20 passed a burst of 10 (seen in CI on two threads).
    #[test]
    fn simultaneous_first_requests_on_many_threads_share_one_limiter() {
        for _ in 0..50 {
            let (rates, _clock) = rates();
            let passed = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|scope| {
                for _ in 0..4 {
                    scope.spawn(|| {
                        for _ in 0..5 {
                            if allowed(rates.check("k.1", ten_per_second(), nz(10), nz(1))) {
                                passed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            assert_eq!(passed.into_inner(), 10);
        }
    }

    #[test]
    fn exactly_the_burst_passes_out_of_twenty_simultaneous_requests() {
        let (rates, _clock) = rates();
        let passed = (0..20).filter(|_| allowed(rates.check("k.1", ten_per_second(), nz(10), nz(1)))).count();
        assert_eq!(passed, 10);
    }

    #[test]
    fn five_seconds_at_three_times_the_rate_admits_the_ideal_within_two_percent() {
        let (rates, clock) = rates();
        let mut admitted = 0u32;
        // 30 requests a second for 5 s, evenly spaced.
        for _ in 0..150 {
            if allowed(rates.check("k.1", ten_per_second(), nz(10), nz(1))) {
                admitted += 1;
            }
            clock.advance(Duration::from_micros(33_333));
        }
        // Ideal: the initial burst plus 10/s for the 5 s that passed.
        let ideal = 10.0 + 10.0 * 5.0;
        let error = (f64::from(admitted) - ideal).abs() / ideal;
        assert!(error <= 0.02, "admitted {admitted}, ideal {ideal}");
    }

    #[test]
    fn refused_requests_do_not_extend_the_refusal() {
        let (rates, clock) = rates();
        for _ in 0..10 {
            assert!(allowed(rates.check("k.1", ten_per_second(), nz(10), nz(1))));
        }
        // Hammer while limited: 1000 refusals in 50 ms.
        for _ in 0..1000 {
            assert!(!allowed(rates.check("k.1", ten_per_second(), nz(10), nz(1))));
            clock.advance(Duration::from_micros(50));
        }
        // 100 ms after the burst one cell is back, however hard we hammered.
        clock.advance(Duration::from_millis(50));
        assert!(allowed(rates.check("k.1", ten_per_second(), nz(10), nz(1))));
    }

    #[test]
    fn retry_after_says_when_the_next_cell_is_due() {
        let (rates, clock) = rates();
        for _ in 0..10 {
            rates.check("k.1", ten_per_second(), nz(10), nz(1));
        }
        clock.advance(Duration::from_millis(30));
        match rates.check("k.1", ten_per_second(), nz(10), nz(1)) {
            RateDecision::Refused { retry_after } => assert_eq!(retry_after, Duration::from_millis(70)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_key_has_its_own_limit_and_a_changed_limit_applies_at_once() {
        let (rates, _clock) = rates();
        let two: Rate = "2/s".parse().unwrap();
        assert_eq!((0..5).filter(|_| allowed(rates.check("a.1", two, nz(2), nz(1)))).count(), 2);
        assert_eq!((0..5).filter(|_| allowed(rates.check("b.1", ten_per_second(), nz(5), nz(1)))).count(), 5);
        // `keys update` raised a.1's limit: its next request sees the new one.
        assert_eq!((0..5).filter(|_| allowed(rates.check("a.1", ten_per_second(), nz(4), nz(1)))).count(), 4);
    }

    #[test]
    fn a_costly_request_takes_several_cells_or_none() {
        let (rates, _clock) = rates();
        assert!(allowed(rates.check("k.1", ten_per_second(), nz(10), nz(7))));
        assert!(!allowed(rates.check("k.1", ten_per_second(), nz(10), nz(7))), "only 3 left");
        assert_eq!(
            (0..5).filter(|_| allowed(rates.check("k.1", ten_per_second(), nz(10), nz(1)))).count(),
            3
        );
        assert!(!allowed(rates.check("k.1", ten_per_second(), nz(10), nz(11))), "more than the burst");
    }

    #[test]
    fn remaining_counts_down_for_the_headers() {
        let (rates, _clock) = rates();
        let remaining: Vec<u32> = (0..3)
            .map(|_| match rates.check("k.1", ten_per_second(), nz(3), nz(1)) {
                RateDecision::Allowed { remaining, .. } => remaining,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(remaining, [2, 1, 0]);
    }

    #[test]
    fn idle_limiters_are_evicted() {
        let rates = LocalRates::with_clock(1000, Duration::from_millis(1), FakeRelativeClock::default());
        rates.check("k.1", ten_per_second(), nz(10), nz(1));
        // moka expires on its own (real) clock: wait for the condition.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while rates.tracked() > 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(rates.tracked(), 0);
    }
}
