//! The flusher's numbers for `/metrics`, behind small functions so that
//! `crate::metrics` can take them in one line each. Until it does, the
//! same numbers are in [`super::FlushStats`] (`interval`,
//! `last_flush_redis_time`) and in the flusher's debug log.

use std::time::Duration;

use super::FlushReport;

/// The time between flushes the write budget sets now, and how much of it
/// is extra lag (beyond `[usage] flush_interval`). Called after every
/// successful flush.
///
/// To wire: a gauge `keygate_usage_flush_interval_seconds` set to
/// `interval` (and, if wanted, `keygate_usage_flush_stretch_seconds` to
/// `stretch`).
pub fn flush_interval(interval: Duration, stretch: Duration) {
    let _ = (interval, stretch);
}

/// One successful flush: how long it kept Redis busy and how much it wrote.
///
/// To wire: a histogram `keygate_usage_flush_redis_seconds` observing
/// `report.redis_time`, and a counter `keygate_usage_transactions_total`
/// increased by `report.transactions`.
pub fn flush_written(report: &FlushReport) {
    let _ = report;
}
