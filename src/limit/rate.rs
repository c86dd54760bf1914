//! Local rate limits: one governor (GCRA) limiter per subject (a key, or a
//! client whose keys share its rate), each with the subject's own rate and
//! burst, decided for all of a request's subjects at once.
//!
//! **All or nothing across subjects.** A request limited by its key's rate
//! and its client's rate must take a cell from both or from neither: a
//! refusal by the client's limiter must not spend the key's cell. governor
//! has no refund and no "peek", but its state is pluggable: a limiter asks
//! its [`StateStore`] to `measure_and_replace` the theoretical arrival time
//! (TAT) with a closure holding governor's whole GCRA decision. Our store,
//! [`StagedState`], runs that closure against the current TAT and *stages*
//! the TAT it would write instead of writing it. [`LocalRates::check`]
//! locks every subject's gate (in one global order, so two requests cannot
//! deadlock), lets each limiter decide, and only if every one allowed
//! writes the staged TATs. governor keeps doing the arithmetic (cells,
//! bursts, `NotUntil` times, remaining capacity); we only decide whether its
//! answer is written. The gates are held for a few arithmetic operations,
//! never across an await, so an uncontended lock costs nanoseconds.
//!
//! A map of direct limiters per subject kind rather than one keyed limiter,
//! because every subject carries its own rate. The maps are moka caches:
//! bounded in size, and a limiter idle for `idle_eviction` is dropped (an
//! idle GCRA limiter is full again anyway, so dropping it forgets nothing).
//! A subject whose rate changed (after `keys update`) gets a fresh limiter
//! on its next request.

use std::num::{NonZeroU32, NonZeroU64};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use moka::ops::compute;
use moka::sync::Cache;

use super::{MAX_SUBJECTS, SubjectKind, lock};
use crate::meta::Rate;

type Limiter<C> = RateLimiter<NotKeyed, StagedState, C, StateInformationMiddleware>;

/// One subject's rate, as the rate checks take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSubject<'a> {
    pub kind: SubjectKind,
    /// The counter identity (a key's `counts_as` or ID, a client's ID).
    pub id: &'a str,
    pub rate: Rate,
    pub burst: NonZeroU32,
}

/// The outcome of one subject's rate check, with what the headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allowed { remaining: u32, reset: Duration },
    Refused { retry_after: Duration },
}

/// A subject's cells once the request is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    pub remaining: u32,
    pub reset: Duration,
}

/// The outcome of checking all of a request's rated subjects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RatesDecision {
    /// Every subject gave its cells; `allowed[i]` belongs to `subjects[i]`.
    Allowed([Option<Allowed>; MAX_SUBJECTS]),
    /// `subjects[index]` refused (the one whose refusal lasts longest, if
    /// several did): nothing was taken from any subject.
    Refused { index: usize, retry_after: Duration },
}

/// The GCRA state governor decides on, with the decision staged.
///
/// Only read and written while the owner's gate is held (see
/// [`SubjectLimiter`]), so relaxed atomics suffice: the gate's mutex orders
/// them. Atomics rather than a mutex because governor calls
/// `measure_and_replace` while our gate is already held.
#[derive(Debug, Default)]
struct Staged {
    /// The TAT in nanoseconds since the limiter's start; 0 = never used
    /// (governor's own convention: a TAT is never 0 once written).
    tat: AtomicU64,
    /// The TAT the last allowed decision would write.
    staged: AtomicU64,
}

/// A governor state store that stages what it is asked to write.
#[derive(Debug, Clone, Default)]
struct StagedState(Arc<Staged>);

impl StateStore for StagedState {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let current = NonZeroU64::new(self.0.tat.load(Ordering::Relaxed)).map(|n| Nanos::new(n.get()));
        let (outcome, next) = f(current)?;
        self.0.staged.store(next.as_u64(), Ordering::Relaxed);
        Ok(outcome)
    }
}

/// One subject's limiter, the limit it was built for, and its gate.
struct SubjectLimiter<C: Clock> {
    rate: Rate,
    burst: NonZeroU32,
    /// Held from a subject's decision to the write of its TAT, so that no
    /// other request decides on a TAT about to change.
    gate: Mutex<()>,
    state: StagedState,
    limiter: Limiter<C>,
}

impl<C: Clock> SubjectLimiter<C> {
    fn new(rate: Rate, burst: NonZeroU32, clock: C) -> Self {
        let per_cell = (rate.period / rate.count.get()).max(Duration::from_nanos(1));
        // `with_period` only fails for a zero period, which `max` above rules out.
        let quota =
            Quota::with_period(per_cell).unwrap_or_else(|| Quota::per_second(rate.count)).allow_burst(burst);
        let state = StagedState::default();
        let limiter = RateLimiter::<NotKeyed, StagedState, C, StateInformationMiddleware>::new(
            quota,
            state.clone(),
            clock,
        );
        Self { rate, burst, gate: Mutex::new(()), state, limiter }
    }

    fn fits(&self, rate: Rate, burst: NonZeroU32) -> bool {
        self.rate == rate && self.burst == burst
    }

    /// governor's decision for `cost` cells, staged, not written. Call with
    /// the gate held.
    fn decide(&self, cost: NonZeroU32, now: C::Instant) -> RateDecision {
        match self.limiter.check_n(cost) {
            Ok(Ok(snapshot)) => {
                let remaining = snapshot.remaining_burst_capacity();
                let per_cell = self.rate.period / self.rate.count.get();
                RateDecision::Allowed {
                    remaining,
                    reset: per_cell * (self.burst.get() - remaining.min(self.burst.get())),
                }
            }
            Ok(Err(not_until)) => RateDecision::Refused { retry_after: not_until.wait_time_from(now) },
            // The cost can never fit in the burst: refuse for one full period.
            Err(_insufficient) => RateDecision::Refused { retry_after: self.rate.period },
        }
    }

    /// Writes the staged TAT. Call with the gate held, after an allowed
    /// [`decide`](Self::decide).
    fn commit(&self) {
        self.state.0.tat.store(self.state.0.staged.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// Per-subject GCRA limiters on one gateway instance.
pub struct LocalRates<C: Clock = DefaultClock> {
    /// One map per [`SubjectKind`], so a key and a client never share a
    /// limiter whatever their IDs.
    limiters: [Cache<String, Arc<SubjectLimiter<C>>, foldhash::fast::RandomState>; SubjectKind::COUNT],
    clock: C,
}

impl LocalRates<DefaultClock> {
    pub fn new(max_subjects: u64, idle_eviction: Duration) -> Self {
        Self::with_clock(max_subjects, idle_eviction, DefaultClock::default())
    }
}

impl<C> LocalRates<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    pub fn with_clock(max_subjects: u64, idle_eviction: Duration, clock: C) -> Self {
        let cache = || {
            Cache::builder()
                .max_capacity(max_subjects)
                .time_to_idle(idle_eviction)
                .build_with_hasher(foldhash::fast::RandomState::default())
        };
        Self { limiters: [cache(), cache()], clock }
    }

    /// Takes `cost` cells from one key's limiter, all or nothing. A refused
    /// check leaves the limiter untouched, so hammering while limited does
    /// not push the refusal further out.
    pub fn check_one(&self, key_id: &str, rate: Rate, burst: NonZeroU32, cost: NonZeroU32) -> RateDecision {
        let subject = RateSubject { kind: SubjectKind::Key, id: key_id, rate, burst };
        match self.check(&[subject], cost) {
            RatesDecision::Allowed([Some(a), ..]) => {
                RateDecision::Allowed { remaining: a.remaining, reset: a.reset }
            }
            RatesDecision::Refused { retry_after, .. } => RateDecision::Refused { retry_after },
            RatesDecision::Allowed(_) => RateDecision::Refused { retry_after: rate.period },
        }
    }

    /// Takes `cost` cells from every subject's limiter, or from none: if any
    /// refuses, no limiter moves. At most [`MAX_SUBJECTS`] subjects; more
    /// are refused whole (a caller bug, never a client's doing).
    pub fn check(&self, subjects: &[RateSubject<'_>], cost: NonZeroU32) -> RatesDecision {
        let n = subjects.len();
        if n > MAX_SUBJECTS {
            return RatesDecision::Refused { index: 0, retry_after: Duration::from_secs(1) };
        }
        let mut limiters: [Option<Arc<SubjectLimiter<C>>>; MAX_SUBJECTS] = Default::default();
        for (i, subject) in subjects.iter().enumerate() {
            let limiter = self.limiter_for(subject);
            // A subject named twice is one limiter: decided (and locked) once.
            if !limiters[..i].iter().flatten().any(|earlier| Arc::ptr_eq(earlier, &limiter)) {
                limiters[i] = Some(limiter);
            }
        }
        // Gates in one global order (kind, then ID), so requests sharing two
        // subjects cannot each hold one and wait for the other.
        let mut order: [usize; MAX_SUBJECTS] = std::array::from_fn(|i| i);
        let order = &mut order[..n];
        order.sort_unstable_by_key(|&i| (subjects[i].kind, subjects[i].id));
        let mut guards: [Option<MutexGuard<'_, ()>>; MAX_SUBJECTS] = Default::default();
        for &i in order.iter() {
            if let Some(limiter) = &limiters[i] {
                guards[i] = Some(lock(&limiter.gate));
            }
        }

        // Decide every subject (staged), then write only if all allowed.
        let now = self.clock.now();
        let mut allowed = [None; MAX_SUBJECTS];
        let mut refused: Option<(usize, Duration)> = None;
        for (i, limiter) in limiters.iter().enumerate() {
            let Some(limiter) = limiter else { continue };
            match limiter.decide(cost, now) {
                RateDecision::Allowed { remaining, reset } => allowed[i] = Some(Allowed { remaining, reset }),
                RateDecision::Refused { retry_after } => {
                    if refused.is_none_or(|(_, longest)| retry_after > longest) {
                        refused = Some((i, retry_after));
                    }
                }
            }
        }
        if let Some((index, retry_after)) = refused {
            return RatesDecision::Refused { index, retry_after };
        }
        for limiter in limiters.iter().flatten() {
            limiter.commit();
        }
        drop(guards);
        RatesDecision::Allowed(allowed)
    }

    fn limiter_for(&self, subject: &RateSubject<'_>) -> Arc<SubjectLimiter<C>> {
        let RateSubject { kind, id, rate, burst } = *subject;
        let limiters = &self.limiters[kind.index()];
        // Fast path, no lock: the subject's limiter exists and fits its limit.
        if let Some(entry) = limiters.get(id)
            && entry.fits(rate, burst)
        {
            return entry;
        }
        // New subject, or its limit changed: create or replace atomically per
        // subject, so simultaneous first requests share one limiter (two
        // limiters would each grant a full burst).
        let computed = limiters.entry_by_ref(id).and_compute_with(|existing| match existing {
            Some(entry) if entry.value().fits(rate, burst) => compute::Op::Nop,
            _ => compute::Op::Put(Arc::new(SubjectLimiter::new(rate, burst, self.clock.clone()))),
        });
        match computed {
            compute::CompResult::Inserted(entry)
            | compute::CompResult::ReplacedWith(entry)
            | compute::CompResult::Unchanged(entry) => entry.into_value(),
            // The closure never removes nor leaves the key absent; should moka
            // ever say so, a limiter of our own still enforces the limit.
            compute::CompResult::StillNone(_) | compute::CompResult::Removed(_) => {
                Arc::new(SubjectLimiter::new(rate, burst, self.clock.clone()))
            }
        }
    }

    /// Limiters currently tracked, of every kind (after pending evictions).
    pub fn tracked(&self) -> u64 {
        self.limiters
            .iter()
            .map(|limiters| {
                limiters.run_pending_tasks();
                limiters.entry_count()
            })
            .sum()
    }
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

    fn key<'a>(id: &'a str, rate: Rate, burst: u32) -> RateSubject<'a> {
        RateSubject { kind: SubjectKind::Key, id, rate, burst: nz(burst) }
    }

    fn client<'a>(id: &'a str, rate: Rate, burst: u32) -> RateSubject<'a> {
        RateSubject { kind: SubjectKind::Client, id, rate, burst: nz(burst) }
    }

    fn admitted(d: RatesDecision) -> bool {
        matches!(d, RatesDecision::Allowed(_))
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
                            if allowed(rates.check_one("k.1", ten_per_second(), nz(10), nz(1))) {
                                passed.fetch_add(1, Ordering::Relaxed);
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
        let passed =
            (0..20).filter(|_| allowed(rates.check_one("k.1", ten_per_second(), nz(10), nz(1)))).count();
        assert_eq!(passed, 10);
    }

    #[test]
    fn five_seconds_at_three_times_the_rate_admits_the_ideal_within_two_percent() {
        let (rates, clock) = rates();
        let mut admitted = 0u32;
        // 30 requests a second for 5 s, evenly spaced.
        for _ in 0..150 {
            if allowed(rates.check_one("k.1", ten_per_second(), nz(10), nz(1))) {
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
            assert!(allowed(rates.check_one("k.1", ten_per_second(), nz(10), nz(1))));
        }
        // Hammer while limited: 1000 refusals in 50 ms.
        for _ in 0..1000 {
            assert!(!allowed(rates.check_one("k.1", ten_per_second(), nz(10), nz(1))));
            clock.advance(Duration::from_micros(50));
        }
        // 100 ms after the burst one cell is back, however hard we hammered.
        clock.advance(Duration::from_millis(50));
        assert!(allowed(rates.check_one("k.1", ten_per_second(), nz(10), nz(1))));
    }

    #[test]
    fn retry_after_says_when_the_next_cell_is_due() {
        let (rates, clock) = rates();
        for _ in 0..10 {
            rates.check_one("k.1", ten_per_second(), nz(10), nz(1));
        }
        clock.advance(Duration::from_millis(30));
        match rates.check_one("k.1", ten_per_second(), nz(10), nz(1)) {
            RateDecision::Refused { retry_after } => assert_eq!(retry_after, Duration::from_millis(70)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_key_has_its_own_limit_and_a_changed_limit_applies_at_once() {
        let (rates, _clock) = rates();
        let two: Rate = "2/s".parse().unwrap();
        assert_eq!((0..5).filter(|_| allowed(rates.check_one("a.1", two, nz(2), nz(1)))).count(), 2);
        assert_eq!(
            (0..5).filter(|_| allowed(rates.check_one("b.1", ten_per_second(), nz(5), nz(1)))).count(),
            5
        );
        // `keys update` raised a.1's limit: its next request sees the new one.
        assert_eq!(
            (0..5).filter(|_| allowed(rates.check_one("a.1", ten_per_second(), nz(4), nz(1)))).count(),
            4
        );
    }

    #[test]
    fn a_costly_request_takes_several_cells_or_none() {
        let (rates, _clock) = rates();
        assert!(allowed(rates.check_one("k.1", ten_per_second(), nz(10), nz(7))));
        assert!(!allowed(rates.check_one("k.1", ten_per_second(), nz(10), nz(7))), "only 3 left");
        assert_eq!(
            (0..5).filter(|_| allowed(rates.check_one("k.1", ten_per_second(), nz(10), nz(1)))).count(),
            3
        );
        assert!(!allowed(rates.check_one("k.1", ten_per_second(), nz(10), nz(11))), "more than the burst");
    }

    #[test]
    fn remaining_counts_down_for_the_headers() {
        let (rates, _clock) = rates();
        let remaining: Vec<u32> = (0..3)
            .map(|_| match rates.check_one("k.1", ten_per_second(), nz(3), nz(1)) {
                RateDecision::Allowed { remaining, .. } => remaining,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(remaining, [2, 1, 0]);
    }

    #[test]
    fn a_client_refusal_spends_no_cell_of_the_key_and_a_key_refusal_none_of_the_client() {
        let (rates, clock) = rates();
        let per_min = |n: u32| -> Rate { format!("{n}/min").parse().unwrap() };
        // The client allows 3 a minute for all its keys; key a.1 allows 5.
        let both = |id| [key(id, per_min(5), 5), client("a", per_min(3), 3)];
        for _ in 0..3 {
            assert!(admitted(rates.check(&both("a.1"), nz(1))));
        }
        // The client is spent: 10 refusals, each naming the client.
        for _ in 0..10 {
            match rates.check(&both("a.1"), nz(1)) {
                RatesDecision::Refused { index, .. } => assert_eq!(index, 1, "the client refused"),
                other => panic!("{other:?}"),
            }
        }
        // The key alone still has exactly 2 cells: the refusals took none.
        assert_eq!((0..5).filter(|_| allowed(rates.check_one("a.1", per_min(5), nz(5), nz(1)))).count(), 2);

        // And the other way round: a key with 1 a minute, refused by its own
        // limit, spends nothing of a fresh client's 10.
        let tight = [key("b.1", per_min(1), 1), client("b", per_min(10), 10)];
        assert!(admitted(rates.check(&tight, nz(1))));
        for _ in 0..20 {
            match rates.check(&tight, nz(1)) {
                RatesDecision::Refused { index, .. } => assert_eq!(index, 0, "the key refused"),
                other => panic!("{other:?}"),
            }
        }
        let other_key = [key("b.2", per_min(100), 100), client("b", per_min(10), 10)];
        assert_eq!((0..20).filter(|_| admitted(rates.check(&other_key, nz(1)))).count(), 9);
        // A minute later both have room again.
        clock.advance(Duration::from_secs(60));
        assert!(admitted(rates.check(&tight, nz(1))));
    }

    #[test]
    fn a_client_rate_is_shared_by_its_keys_on_many_threads() {
        let (rates, _clock) = rates();
        let client_rate: Rate = "20/min".parse().unwrap();
        let key_rate: Rate = "8/min".parse().unwrap();
        let passed = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for k in 0..4 {
                let (rates, passed) = (&rates, &passed);
                scope.spawn(move || {
                    let id = format!("c.{k}");
                    for _ in 0..20 {
                        let subjects = [client("c", client_rate, 20), key(&id, key_rate, 8)];
                        if admitted(rates.check(&subjects, nz(1))) {
                            passed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        // Four keys of 8 each would be 32; the client allows 20 in all.
        assert_eq!(passed.into_inner(), 20);
    }

    #[test]
    fn a_key_and_a_client_with_the_same_id_are_different_subjects() {
        let (rates, _clock) = rates();
        let one: Rate = "1/min".parse().unwrap();
        assert!(admitted(rates.check(&[key("x", one, 1)], nz(1))));
        assert!(admitted(rates.check(&[client("x", one, 1)], nz(1))));
        assert!(!admitted(rates.check(&[client("x", one, 1)], nz(1))));
    }

    #[test]
    fn the_longest_refusal_is_reported_when_several_subjects_refuse() {
        let (rates, _clock) = rates();
        let subjects = [key("k.1", "1/min".parse().unwrap(), 1), client("k", "1/h".parse().unwrap(), 1)];
        assert!(admitted(rates.check(&subjects, nz(1))));
        match rates.check(&subjects, nz(1)) {
            RatesDecision::Refused { index, retry_after } => {
                assert_eq!(index, 1);
                assert_eq!(retry_after, Duration::from_secs(3600));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn idle_limiters_are_evicted() {
        let rates = LocalRates::with_clock(1000, Duration::from_millis(1), FakeRelativeClock::default());
        rates.check_one("k.1", ten_per_second(), nz(10), nz(1));
        // moka expires on its own (real) clock: wait for the condition.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while rates.tracked() > 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(rates.tracked(), 0);
    }
}
