//! The Redis side of recording: [`UsageFlusher`] drains the recorder every
//! interval and writes the counters, one `MULTI`/`EXEC` transaction per
//! client (see [`super::writes`]).
//!
//! Reliability:
//! - Drained counters move into a *pending* buffer first and leave it only
//!   when Redis has applied their transaction. A transaction that did not
//!   run stays pending and is merged with newer counters and retried on the
//!   next flush, so a Redis outage loses nothing until the buffer holds
//!   [`FlushConfig::max_series`] distinct series; past that, events of new
//!   series are dropped and counted ([`FlushStats::dropped_events`], plus a
//!   warning).
//! - A client's transaction is applied whole or not at all, so retrying one
//!   that Redis refused, or that never reached it, cannot count twice. The
//!   exception: transactions in flight when the connection drops may have
//!   run before their replies were lost. They are retried, so they count
//!   twice; that is at most one round trip of writes per lost connection
//!   (about [`Limits::round_trip_increments`] increments).
//! - The daily top-clients sets are written after the clients' hashes, from
//!   the requests of the transactions that were applied, in transactions of
//!   their own (they are global keys, in another Cluster slot) and retried
//!   on their own: a client may appear there a flush after its hashes.
//! - [`UsageFlusher::flush_now`] is the final flush on shutdown; the thread
//!   from [`UsageFlusher::spawn`] calls it itself when its shutdown future
//!   completes.
//!
//! CPU: a big flush is seconds of work for the gateway too (building the
//! commands, reading hundreds of thousands of replies). It runs on a thread
//! of its own (`keygate-usage`, with a single-threaded runtime), never on
//! the control runtime whose single thread drives the store's connection:
//! key lookups there would wait for it. It writes on a connection of its
//! own, so no lookup queues behind its commands either.
//!
//! Flushes are serialised by an async mutex around the pending buffer, held
//! across the Redis calls on purpose: a second flush must not write the same
//! counters, and the request path never touches this lock.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::store::conn::RedisConn;

use super::UsageError;
use super::recorder::{Batch, Series, SeriesKey, UsageRecorder};
use super::schema::{Retention, UsageKeys};
use super::writes::{Limits, Outcome, TopCounts, Trip, add_to_top};

/// How the flusher runs. The defaults suit one gateway in front of a busy API.
#[derive(Debug, Clone)]
pub struct FlushConfig {
    /// Time between flushes.
    pub interval: Duration,
    /// The most distinct series (client, key, route, minute) kept while
    /// Redis is unreachable (about 150 bytes each).
    pub max_series: usize,
    /// The size of transactions and round trips.
    pub limits: Limits,
    /// How long buckets live in Redis.
    pub retention: Retention,
    /// Limit on one round trip.
    pub call_timeout: Duration,
}

impl Default for FlushConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            max_series: 100_000,
            limits: Limits::default(),
            retention: Retention::default(),
            call_timeout: Duration::from_secs(5),
        }
    }
}

/// Counters for `/metrics`. A snapshot; see [`UsageFlusher::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Client transactions Redis applied.
    pub flushed_transactions: u64,
    /// Flushes that failed (their counts kept for a retry, unless Redis
    /// refused their content).
    pub flush_errors: u64,
    /// Requests whose counts were thrown away: the buffer was full, or
    /// Redis refused a transaction (e.g. `WRONGTYPE` on a hand-edited key).
    pub dropped_events: u64,
    /// Series waiting for Redis after a failed flush (0 when healthy).
    pub pending_series: u64,
    /// Time since the last successful flush (or since the flusher started).
    pub last_flush_lag: Duration,
}

/// What one [`UsageFlusher::flush_now`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Series written to Redis.
    pub series: usize,
    /// Client transactions applied (the top-clients sets' not included).
    pub transactions: usize,
    /// Pipelines sent, top-clients sets included.
    pub round_trips: usize,
    /// Summed round-trip time: how long the flush kept Redis busy, about.
    pub redis_time: Duration,
}

/// The flusher's thread, from [`UsageFlusher::spawn`]. Dropping it leaves
/// the thread running until its shutdown future completes.
#[must_use = "join it after the server has drained, so the final flush is awaited"]
#[derive(Debug)]
pub struct UsageThread {
    /// Fires (or is dropped, if the thread panicked) when the thread is past
    /// its final flush.
    finished: tokio::sync::oneshot::Receiver<()>,
    thread: std::io::Result<std::thread::JoinHandle<()>>,
}

impl UsageThread {
    /// Waits, without blocking the caller's runtime, until the final flush
    /// is done and the thread has ended.
    pub async fn join(self) -> Result<(), UsageError> {
        let thread = self.thread.map_err(|e| UsageError::Thread(format!("could not start: {e}")))?;
        // Err: `done` was dropped unsent because the thread panicked; the
        // join says so.
        let _ = self.finished.await;
        // The thread is past its last statement: this join is brief, but
        // still kept off the caller's runtime threads.
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(UsageError::Thread("panicked; unflushed usage is lost".into())),
        }
    }
}

/// What waits for Redis.
#[derive(Debug, Default)]
struct Pending {
    /// Drained series not yet applied.
    series: Batch,
    /// Requests per day and client of applied series, not yet in the
    /// top-clients sets.
    top: TopCounts,
}

/// Drains a [`UsageRecorder`] into Redis. Share it behind an `Arc`.
pub struct UsageFlusher {
    recorder: Arc<UsageRecorder>,
    /// Auto-reconnecting; may be created lazily (see [`super::connect`]), so
    /// a gateway starts and counts while Redis is still down. Its own
    /// connection, not the store's: key lookups must not queue behind it.
    conn: RedisConn,
    keys: UsageKeys,
    config: FlushConfig,
    /// Counters not yet accepted by Redis.
    pending: tokio::sync::Mutex<Pending>,
    /// For the lag: `Instant`s are not atomic, milliseconds since `created` are.
    created: Instant,
    last_success_ms: AtomicU64,
    flushed_transactions: AtomicU64,
    flush_errors: AtomicU64,
    dropped_events: AtomicU64,
    pending_series: AtomicU64,
    /// Whether the last flush failed: warn once per outage, not per tick.
    failing: AtomicBool,
}

impl std::fmt::Debug for UsageFlusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageFlusher")
            .field("prefix", &self.keys.prefix())
            .field("stats", &self.stats())
            .finish()
    }
}

// === impl UsageFlusher ===

impl UsageFlusher {
    /// A flusher writing `recorder`'s counters under `prefix` (the store's
    /// prefix, `kg:` by default). Start it with [`spawn`](Self::spawn).
    pub fn new(
        recorder: Arc<UsageRecorder>,
        conn: impl Into<RedisConn>,
        prefix: &str,
        config: FlushConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            recorder,
            conn: conn.into(),
            keys: UsageKeys::new(prefix),
            config,
            pending: tokio::sync::Mutex::new(Pending::default()),
            created: Instant::now(),
            last_success_ms: AtomicU64::new(0),
            flushed_transactions: AtomicU64::new(0),
            flush_errors: AtomicU64::new(0),
            dropped_events: AtomicU64::new(0),
            pending_series: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        })
    }

    /// Flushes every interval until `shutdown` completes, then flushes one
    /// last time and ends; on a thread of its own, `keygate-usage`, whose
    /// runtime also drives the flusher's Redis connection (it is made on
    /// first use, there). Nothing of it runs on the caller's runtime. After
    /// the server has drained, [`UsageThread::join`] the handle, so the last
    /// requests are in the final flush.
    pub fn spawn(self: &Arc<Self>, shutdown: impl Future<Output = ()> + Send + 'static) -> UsageThread {
        let this = Arc::clone(self);
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("keygate-usage".to_owned()).spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(this.run(shutdown)),
                Err(error) => tracing::error!(%error, "cannot start the usage runtime; usage is not written"),
            }
            let _ = done.send(());
        });
        UsageThread { finished, thread }
    }

    /// The flusher's loop (see [`spawn`](Self::spawn)).
    async fn run(&self, shutdown: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate: nothing to flush yet
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = tick.tick() => {
                    // Failures are counted and logged inside; the counts stay pending.
                    let _ = self.flush_now().await;
                }
            }
        }
        if let Err(error) = self.flush_now().await {
            tracing::error!(
                %error,
                pending_series = self.pending_series.load(Ordering::Relaxed),
                "final usage flush failed; unflushed usage is lost"
            );
        }
    }

    /// Drains the recorder and writes everything pending now. On failure the
    /// counters that were not written stay pending for the next call.
    pub async fn flush_now(&self) -> Result<FlushReport, UsageError> {
        let mut pending = self.pending.lock().await;
        let dropped = merge_bounded(&mut pending.series, self.recorder.drain(), self.config.max_series);
        if dropped > 0 {
            self.drop_events(dropped);
            tracing::warn!(
                dropped_events = dropped,
                max_series = self.config.max_series,
                "usage buffer full while Redis is unreachable: dropped events"
            );
        }

        let mut report = FlushReport::default();
        let mut written = self.write_series(&mut pending, &mut report).await;
        if written.is_ok() {
            written = self.write_top(&mut pending.top, &mut report).await;
        }
        self.pending_series.store(pending.series.len() as u64, Ordering::Relaxed);
        drop(pending);

        if let Err(error) = written {
            self.flush_errors.fetch_add(1, Ordering::Relaxed);
            if !self.failing.swap(true, Ordering::Relaxed) {
                tracing::warn!(%error, "usage flush failed; keeping counts and retrying");
            }
            crate::metrics::usage_flush_lag(self.stats().last_flush_lag);
            return Err(UsageError::Redis(error));
        }
        self.last_success_ms.store(self.elapsed_ms(), Ordering::Relaxed);
        crate::metrics::usage_flush_lag(Duration::ZERO);
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("usage flushes succeed again");
        }
        tracing::debug!(
            series = report.series,
            transactions = report.transactions,
            round_trips = report.round_trips,
            redis_ms = report.redis_time.as_secs_f64() * 1e3,
            "usage flushed"
        );
        Ok(report)
    }

    pub fn stats(&self) -> FlushStats {
        let lag_ms = self.elapsed_ms().saturating_sub(self.last_success_ms.load(Ordering::Relaxed));
        FlushStats {
            flushed_transactions: self.flushed_transactions.load(Ordering::Relaxed),
            flush_errors: self.flush_errors.load(Ordering::Relaxed),
            dropped_events: self.dropped_events.load(Ordering::Relaxed),
            pending_series: self.pending_series.load(Ordering::Relaxed),
            last_flush_lag: Duration::from_millis(lag_ms),
        }
    }

    pub fn dropped_events(&self) -> u64 {
        self.dropped_events.load(Ordering::Relaxed)
    }

    /// Writes the pending series, client by client, one round trip at a
    /// time. Stops at the first round trip that failed or that has a
    /// transaction Redis did not run; what was not applied stays pending.
    async fn write_series(&self, pending: &mut Pending, report: &mut FlushReport) -> Result<(), String> {
        // Sorted by client, so each client's series are side by side.
        let mut all: Vec<(SeriesKey, Series)> = std::mem::take(&mut pending.series).into_iter().collect();
        all.sort_unstable_by(|a, b| a.0.client().cmp(b.0.client()));
        let mut source = all.into_iter().peekable();

        let mut failure = None;
        while failure.is_none() && source.peek().is_some() {
            let trip = Trip::series(&mut source, &self.keys, &self.config.retention, self.config.limits);
            let replies = match self.round_trip(trip.pipeline(), report).await {
                Ok(replies) => replies,
                Err(error) => {
                    // Unknown which transactions ran: all are retried.
                    for run in trip.payloads() {
                        put_back(&mut pending.series, run);
                    }
                    failure = Some(error);
                    break;
                }
            };
            for (run, outcome) in trip.outcomes(replies) {
                match outcome {
                    Outcome::Applied => {
                        report.series += run.len();
                        report.transactions += 1;
                        self.flushed_transactions.fetch_add(1, Ordering::Relaxed);
                        add_to_top(&mut pending.top, &run);
                    }
                    Outcome::Refused(error) => {
                        // Retrying would fail the same way, and write the
                        // counters that did go in a second time.
                        let lost: u64 = run.iter().map(|(_, s)| s.requests()).sum();
                        self.drop_events(lost);
                        tracing::error!(
                            dropped_events = lost,
                            %error,
                            "Redis refused part of a usage transaction (a usage key holds another type?); dropped it"
                        );
                    }
                    Outcome::NotRun(error) => {
                        put_back(&mut pending.series, run);
                        failure.get_or_insert(error);
                    }
                }
            }
            tokio::task::yield_now().await;
        }
        put_back(&mut pending.series, source);
        failure.map_or(Ok(()), Err)
    }

    /// Writes the top-clients counts of applied transactions.
    async fn write_top(&self, top: &mut TopCounts, report: &mut FlushReport) -> Result<(), String> {
        while !top.is_empty() {
            let trip = Trip::top(top, &self.keys, &self.config.retention, self.config.limits);
            let replies = match self.round_trip(trip.pipeline(), report).await {
                Ok(replies) => replies,
                Err(error) => {
                    for run in trip.payloads() {
                        put_back_top(top, run);
                    }
                    return Err(error);
                }
            };
            let mut failure = None;
            for (run, outcome) in trip.outcomes(replies) {
                match outcome {
                    Outcome::Applied => {}
                    Outcome::Refused(error) => {
                        tracing::error!(%error, "Redis refused a top-clients update; the daily sets miss some requests");
                    }
                    Outcome::NotRun(error) => {
                        put_back_top(top, run);
                        failure.get_or_insert(error);
                    }
                }
            }
            if let Some(error) = failure {
                return Err(error);
            }
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// Sends one pipeline under the call timeout; its time counts as Redis
    /// time in `report`.
    async fn round_trip(
        &self,
        pipe: &redis::Pipeline,
        report: &mut FlushReport,
    ) -> Result<redis::Value, String> {
        let mut conn = self.conn.clone();
        let started = Instant::now();
        let answer = tokio::time::timeout(self.config.call_timeout, pipe.query_async(&mut conn)).await;
        report.redis_time += started.elapsed();
        report.round_trips += 1;
        match answer {
            Ok(Ok(replies)) => Ok(replies),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.config.call_timeout)),
        }
    }

    fn drop_events(&self, n: u64) {
        self.dropped_events.fetch_add(n, Ordering::Relaxed);
        crate::metrics::usage_dropped(n);
    }

    fn elapsed_ms(&self) -> u64 {
        millis(self.created.elapsed())
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Merges `from` into `into` without letting `into` exceed `max_series`;
/// returns the number of requests dropped.
fn merge_bounded(into: &mut Batch, mut from: Batch, max_series: usize) -> u64 {
    if into.is_empty() {
        // The usual case (nothing failed): take the drained map whole rather
        // than rehash every series into a second one.
        std::mem::swap(into, &mut from);
        if into.len() <= max_series {
            return 0;
        }
        // More than the bound in one go: keep `max_series` of them.
        let over = into.len() - max_series;
        let dropped: Vec<SeriesKey> = into.keys().take(over).cloned().collect();
        return dropped.iter().filter_map(|key| into.remove(key)).map(|series| series.requests()).sum();
    }
    let mut dropped = 0;
    for (key, series) in from {
        if let Some(existing) = into.get_mut(&key) {
            existing.merge(&series);
        } else if into.len() < max_series {
            into.insert(key, series);
        } else {
            dropped += series.requests();
        }
    }
    dropped
}

/// Returns series that were not applied to the pending buffer.
fn put_back(pending: &mut Batch, series: impl IntoIterator<Item = (SeriesKey, Series)>) {
    for (key, series) in series {
        pending.entry(key).or_default().merge(&series);
    }
}

/// Returns top-clients counts that were not applied.
fn put_back_top(top: &mut TopCounts, run: impl IntoIterator<Item = ((i64, Box<str>), u64)>) {
    for (key, requests) in run {
        let slot = top.entry(key).or_default();
        *slot = slot.saturating_add(requests);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(client: &str, minute: i64, requests: u64) -> (SeriesKey, Series) {
        let counts = crate::usage::Counts { requests, ..Default::default() };
        (SeriesKey::new(client, "k1", "/api", minute), Series::from_counts(&counts, 5))
    }

    #[test]
    fn the_bound_drops_new_series_only() {
        let mut pending: Batch = [series("a", 0, 5)].into_iter().collect();
        let dropped =
            merge_bounded(&mut pending, [series("a", 0, 2), series("b", 0, 7)].into_iter().collect(), 1);
        assert_eq!(dropped, 7);
        assert_eq!(pending.values().next().unwrap().requests(), 7);
    }

    #[test]
    fn an_empty_buffer_takes_the_drained_series_up_to_the_bound() {
        let mut pending = Batch::default();
        assert_eq!(
            merge_bounded(&mut pending, [series("a", 0, 5), series("b", 0, 7)].into_iter().collect(), 2),
            0
        );
        assert_eq!(pending.len(), 2);
        let mut pending = Batch::default();
        let dropped =
            merge_bounded(&mut pending, [series("a", 0, 5), series("b", 0, 7)].into_iter().collect(), 1);
        assert_eq!(pending.len(), 1);
        assert_eq!(dropped + pending.values().map(Series::requests).sum::<u64>(), 12);
    }

    #[test]
    fn put_back_merges_with_newer_counts() {
        let mut pending: Batch = [series("a", 0, 5)].into_iter().collect();
        put_back(&mut pending, [series("a", 0, 2), series("b", 0, 1)]);
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[&series("a", 0, 0).0].requests(), 7);
        let mut top = TopCounts::new();
        put_back_top(&mut top, [((0, "a".into()), 2), ((0, "a".into()), 3)]);
        assert_eq!(top[&(0, "a".into())], 5);
    }
}
