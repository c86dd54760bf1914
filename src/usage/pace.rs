//! The write budget: how often the flusher may write, so that usage writes
//! take a bounded share of Redis's time however many series are active.
//!
//! A flush costs Redis roughly one `HINCRBY` per counter per series, and the
//! number of series grows with the number of *active keys*, not with the
//! request rate: 100 000 keys used once a second each are 100 000 series a
//! second. Flushing those every second would keep Redis busy most of the
//! time (and every gateway shares that Redis for key lookups and limits).
//!
//! [`Pace`] stretches the time between flushes instead: after a flush that
//! kept Redis busy for `busy`, the next one waits at least `busy / budget`
//! (never less than the configured interval, never more than the maximum).
//! A longer interval costs no more per flush once every active key is in it
//! (each key is one series per minute whatever its request count), so the
//! share of Redis time converges to the budget. The price is lag: counts
//! reach Redis up to one (stretched) interval late.
//!
//! Pure arithmetic, no clock: the flusher feeds it measured durations, and
//! the tests feed it numbers.

use std::time::Duration;

/// The pace of flushes: the configured interval, stretched by the budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    /// The shortest interval (`[usage] flush_interval`): used whenever the
    /// budget allows it.
    min: Duration,
    /// The longest interval the budget may stretch to: bounds the lag.
    max: Duration,
    /// The share of wall time flushes may keep Redis busy, in (0, 1].
    budget: f64,
    /// The interval before the next flush.
    current: Duration,
}

impl Pace {
    /// A pace starting at `min`. `max` below `min` is read as `min`; a
    /// budget outside (0, 1] as 1 (no stretching).
    pub fn new(min: Duration, max: Duration, budget: f64) -> Self {
        let budget = if budget > 0.0 && budget <= 1.0 { budget } else { 1.0 };
        Self { min, max: max.max(min), budget, current: min }
    }

    /// The interval to wait before the next flush.
    pub fn interval(&self) -> Duration {
        self.current
    }

    /// Takes note of a flush that kept Redis busy for `busy` (the summed
    /// round trips of its writes) and returns the interval from its start
    /// to the next flush.
    pub fn after_flush(&mut self, busy: Duration) -> Duration {
        let wanted = Duration::try_from_secs_f64(busy.as_secs_f64() / self.budget).unwrap_or(self.max);
        self.current = wanted.clamp(self.min, self.max);
        self.current
    }

    /// The extra lag the budget adds now: how much longer than the
    /// configured interval the flusher waits.
    pub fn stretch(&self) -> Duration {
        self.current.saturating_sub(self.min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_cheap_flush_keeps_the_configured_interval() {
        let mut pace = Pace::new(S, 60 * S, 0.1);
        assert_eq!(pace.after_flush(Duration::from_millis(20)), S);
        assert_eq!(pace.stretch(), Duration::ZERO);
    }

    #[test]
    fn an_expensive_flush_stretches_the_interval_to_the_budget() {
        let mut pace = Pace::new(S, 60 * S, 0.1);
        assert_eq!(pace.after_flush(Duration::from_millis(500)), 5 * S);
        assert_eq!(pace.stretch(), 4 * S);
        // Redis got faster (or there are fewer active keys): back down.
        assert_eq!(pace.after_flush(Duration::from_millis(200)), 2 * S);
    }

    #[test]
    fn the_stretch_is_capped() {
        let mut pace = Pace::new(S, 30 * S, 0.1);
        assert_eq!(pace.after_flush(10 * S), 30 * S);
        assert_eq!(pace.after_flush(Duration::MAX), 30 * S);
    }

    #[test]
    fn nonsense_budgets_mean_no_stretching() {
        for budget in [0.0, -1.0, 2.0, f64::NAN] {
            let mut pace = Pace::new(S, 60 * S, budget);
            assert_eq!(pace.after_flush(Duration::from_millis(900)), S, "budget {budget}");
        }
        assert_eq!(Pace::new(5 * S, S, 0.5).after_flush(60 * S), 5 * S, "max below min");
    }
}
