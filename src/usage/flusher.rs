//! The Redis side of recording: [`UsageFlusher`] drains the recorder every
//! interval and writes the counters in one pipelined `MULTI`/`EXEC` batch.
//!
//! Reliability:
//! - Drained counters move into a *pending* buffer first and leave it only
//!   when Redis has accepted them. A failed batch stays pending and is merged
//!   with newer counters and retried on the next tick, so a Redis outage
//!   loses nothing until the buffer holds [`FlushConfig::max_series`]
//!   distinct series; past that, events of new series are dropped and
//!   counted ([`FlushStats::dropped_events`], plus a warning).
//! - A batch is a `MULTI`/`EXEC` transaction: Redis applies it whole or not
//!   at all, so a retry after a refused or dropped connection cannot count
//!   twice. (Only a connection lost *after* `EXEC` ran, before its reply, can
//!   make a retry double-count; that window is one round trip.) In Redis
//!   Cluster a batch would have to be split per slot: each client's keys
//!   share a slot, the daily top-clients sets are elsewhere.
//! - [`UsageFlusher::flush_now`] is the final flush on shutdown; the task
//!   from [`UsageFlusher::spawn`] calls it itself when its shutdown future
//!   completes.
//!
//! Flushes are serialised by an async mutex around the pending buffer, held
//! across the Redis call on purpose: a second flush must not write the same
//! counters, and the request path never touches this lock.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::task::JoinHandle;

use super::UsageError;
use super::recorder::{Batch, Series, UsageRecorder, merge_into};
use super::schema::{ANONYMOUS, Dimension, Granularity, Retention, UsageKeys, field, valid_client};

/// How the flusher runs. The defaults suit one gateway in front of a busy API.
#[derive(Debug, Clone)]
pub struct FlushConfig {
    /// Time between flushes.
    pub interval: Duration,
    /// The most distinct series (client, key, route, minute) kept while
    /// Redis is unreachable. Roughly 200 bytes each.
    pub max_series: usize,
    /// The most series in one transaction; a backlog after an outage is
    /// written in several, so no single `EXEC` blocks Redis for long.
    pub batch_series: usize,
    /// How long buckets live in Redis.
    pub retention: Retention,
    /// Limit on one batch's round trip.
    pub call_timeout: Duration,
}

impl Default for FlushConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            max_series: 100_000,
            batch_series: 5_000,
            retention: Retention::default(),
            call_timeout: Duration::from_secs(5),
        }
    }
}

/// Counters for `/metrics`. A snapshot; see [`UsageFlusher::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Batches Redis accepted.
    pub flushed_batches: u64,
    /// Batches that failed (and were kept for a retry, unless Redis refused
    /// their content).
    pub flush_errors: u64,
    /// Requests whose counts were thrown away: the buffer was full, or
    /// Redis refused the batch (e.g. `WRONGTYPE` on a hand-edited key).
    pub dropped_events: u64,
    /// Series waiting for Redis right now (0 when healthy).
    pub pending_series: u64,
    /// Time since the last successful flush (or since the flusher started).
    pub last_flush_lag: Duration,
}

/// What one [`UsageFlusher::flush_now`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Series written to Redis.
    pub series: usize,
    /// Batches (transactions) written.
    pub batches: usize,
}

/// Drains a [`UsageRecorder`] into Redis. Share it behind an `Arc`.
pub struct UsageFlusher {
    recorder: Arc<UsageRecorder>,
    /// Auto-reconnecting; may be created lazily (see [`super::connect`]), so
    /// a gateway starts and counts while Redis is still down.
    conn: ConnectionManager,
    keys: UsageKeys,
    config: FlushConfig,
    /// Drained counters not yet accepted by Redis.
    pending: tokio::sync::Mutex<Batch>,
    /// For the lag: `Instant`s are not atomic, milliseconds since `created` are.
    created: Instant,
    last_success_ms: AtomicU64,
    flushed_batches: AtomicU64,
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
        conn: ConnectionManager,
        prefix: &str,
        config: FlushConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            recorder,
            conn,
            keys: UsageKeys::new(prefix),
            config,
            pending: tokio::sync::Mutex::new(Batch::new()),
            created: Instant::now(),
            last_success_ms: AtomicU64::new(0),
            flushed_batches: AtomicU64::new(0),
            flush_errors: AtomicU64::new(0),
            dropped_events: AtomicU64::new(0),
            pending_series: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        })
    }

    /// Flushes every interval until `shutdown` completes, then flushes one
    /// last time and ends. Await the handle after the server has drained, so
    /// the last requests are in the final flush.
    pub fn spawn(self: &Arc<Self>, shutdown: impl Future<Output = ()> + Send + 'static) -> JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.config.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate: nothing to flush yet
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    () = &mut shutdown => break,
                    _ = tick.tick() => {
                        // Failures are counted and logged inside; the counts stay pending.
                        let _ = this.flush_now().await;
                    }
                }
            }
            if let Err(error) = this.flush_now().await {
                tracing::error!(
                    %error,
                    pending_series = this.pending_series.load(Ordering::Relaxed),
                    "final usage flush failed; unflushed usage is lost"
                );
            }
        })
    }

    /// Drains the recorder and writes everything pending now. On failure the
    /// counters stay pending for the next call.
    pub async fn flush_now(&self) -> Result<FlushReport, UsageError> {
        let mut pending = self.pending.lock().await;
        let dropped = merge_bounded(&mut pending, self.recorder.drain(), self.config.max_series);
        if dropped > 0 {
            self.dropped_events.fetch_add(dropped, Ordering::Relaxed);
            crate::metrics::usage_dropped(dropped);
            tracing::warn!(
                dropped_events = dropped,
                max_series = self.config.max_series,
                "usage buffer full while Redis is unreachable: dropped events"
            );
        }

        let mut report = FlushReport::default();
        while !pending.is_empty() {
            let chunk = take_chunk(&mut pending, self.config.batch_series);
            match self.write(&chunk).await {
                Ok(()) => {
                    self.flushed_batches.fetch_add(1, Ordering::Relaxed);
                    report.batches += 1;
                    report.series += chunk.len();
                }
                Err(error) => {
                    self.flush_errors.fetch_add(1, Ordering::Relaxed);
                    if error.code() == Some("WRONGTYPE") {
                        // Retrying would fail the same way and block every later batch.
                        let lost: u64 = chunk.values().map(Series::requests).sum();
                        self.dropped_events.fetch_add(lost, Ordering::Relaxed);
                        crate::metrics::usage_dropped(lost);
                        tracing::error!(
                            dropped_events = lost,
                            "Redis refused a usage batch (a usage key holds another type); dropped it"
                        );
                        continue;
                    }
                    merge_into(&mut pending, chunk);
                    self.pending_series.store(pending.len() as u64, Ordering::Relaxed);
                    if !self.failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!(%error, "usage flush failed; keeping counts and retrying");
                    }
                    crate::metrics::usage_flush_lag(self.stats().last_flush_lag);
                    return Err(UsageError::Redis(error.to_string()));
                }
            }
        }
        self.pending_series.store(0, Ordering::Relaxed);
        self.last_success_ms.store(self.elapsed_ms(), Ordering::Relaxed);
        crate::metrics::usage_flush_lag(Duration::ZERO);
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("usage flushes succeed again");
        }
        Ok(report)
    }

    pub fn stats(&self) -> FlushStats {
        let lag_ms = self.elapsed_ms().saturating_sub(self.last_success_ms.load(Ordering::Relaxed));
        FlushStats {
            flushed_batches: self.flushed_batches.load(Ordering::Relaxed),
            flush_errors: self.flush_errors.load(Ordering::Relaxed),
            dropped_events: self.dropped_events.load(Ordering::Relaxed),
            pending_series: self.pending_series.load(Ordering::Relaxed),
            last_flush_lag: Duration::from_millis(lag_ms),
        }
    }

    pub fn dropped_events(&self) -> u64 {
        self.dropped_events.load(Ordering::Relaxed)
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// One transaction, under the call timeout.
    async fn write(&self, chunk: &Batch) -> redis::RedisResult<()> {
        let pipe = pipeline(&self.keys, &self.config.retention, chunk);
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.config.call_timeout, pipe.query_async::<()>(&mut conn)).await {
            Ok(result) => result,
            Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.config.call_timeout),
            ))),
        }
    }
}

/// Merges `from` into `into` without letting `into` exceed `max_series`;
/// returns the number of requests dropped.
fn merge_bounded(into: &mut Batch, from: Batch, max_series: usize) -> u64 {
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

/// Takes up to `n` series out of `pending` (all of them, without copying,
/// when they fit).
fn take_chunk(pending: &mut Batch, n: usize) -> Batch {
    if pending.len() <= n.max(1) {
        return std::mem::take(pending);
    }
    let all = std::mem::take(pending);
    let mut chunk = Batch::with_capacity(n);
    for (i, (key, series)) in all.into_iter().enumerate() {
        if i < n {
            chunk.insert(key, series);
        } else {
            pending.insert(key, series);
        }
    }
    chunk
}

/// A hash's expiry and its field increments.
type HashWrites = (i64, BTreeMap<String, u64>);

/// The batch's Redis commands, as one `MULTI`/`EXEC` pipeline: every series
/// projected onto its client's minute, hour and day hashes (client total,
/// per key, per route), the day's top-clients set, and `last_used`.
fn pipeline(keys: &UsageKeys, retention: &Retention, chunk: &Batch) -> redis::Pipeline {
    let mut hashes: BTreeMap<String, HashWrites> = BTreeMap::new();
    let mut top: BTreeMap<String, (i64, BTreeMap<&str, u64>)> = BTreeMap::new();
    let mut last_used: BTreeMap<String, BTreeMap<&str, i64>> = BTreeMap::new();

    for (series_key, series) in chunk {
        let client = if valid_client(series_key.client()) { series_key.client() } else { ANONYMOUS };
        let counts = series.counts();
        let last_at = series.last_at(series_key.minute);
        let mut dimensions = vec![Dimension::Total];
        if !series_key.key_id().is_empty() {
            dimensions.push(Dimension::Key(series_key.key_id()));
        }
        if !series_key.route().is_empty() {
            dimensions.push(Dimension::Route(series_key.route()));
        }
        for granularity in Granularity::ALL {
            let start = granularity.bucket_start(series_key.minute);
            let (_, fields) = hashes
                .entry(keys.bucket(client, granularity, start))
                .or_insert_with(|| (retention.expire_at(granularity, start), BTreeMap::new()));
            for dimension in &dimensions {
                for (metric, value) in counts.fields() {
                    if value > 0 {
                        let slot = fields.entry(field(dimension, metric)).or_default();
                        *slot = slot.saturating_add(value);
                    }
                }
            }
        }

        let day = Granularity::Day.bucket_start(series_key.minute);
        let (_, scores) = top
            .entry(keys.top_clients(day))
            .or_insert_with(|| (retention.expire_at(Granularity::Day, day), BTreeMap::new()));
        *scores.entry(client).or_default() += counts.requests;

        if client != ANONYMOUS && !series_key.key_id().is_empty() {
            let kids = last_used.entry(keys.last_used(client)).or_default();
            let at = kids.entry(series_key.key_id()).or_insert(last_at);
            *at = (*at).max(last_at);
        }
    }

    let mut pipe = redis::pipe();
    pipe.atomic();
    for (key, (expire_at, fields)) in &hashes {
        for (field, value) in fields {
            pipe.cmd("HINCRBY").arg(key).arg(field).arg(as_i64(*value)).ignore();
        }
        pipe.cmd("EXPIREAT").arg(key).arg(*expire_at).ignore();
    }
    for (key, (expire_at, scores)) in &top {
        for (client, requests) in scores {
            pipe.cmd("ZINCRBY").arg(key).arg(as_i64(*requests)).arg(*client).ignore();
        }
        pipe.cmd("EXPIREAT").arg(key).arg(*expire_at).ignore();
    }
    for (key, kids) in &last_used {
        let mut hset = redis::cmd("HSET");
        hset.arg(key);
        for (kid, at) in kids {
            hset.arg(*kid).arg(*at);
        }
        pipe.add_command(hset).ignore();
    }
    pipe
}

fn as_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Counts;
    use crate::usage::recorder::SeriesKey;

    fn series(client: &str, minute: i64, requests: u64) -> (SeriesKey, Series) {
        let counts = Counts { requests, ..Counts::default() };
        (SeriesKey::new(client, "k1", "/api", minute), Series::from_counts(&counts, 5))
    }

    #[test]
    fn the_bound_drops_new_series_only() {
        let mut pending: Batch = [series("a", 0, 5)].into_iter().collect();
        let dropped = merge_bounded(&mut pending, [series("a", 0, 2), series("b", 0, 7)].into(), 1);
        assert_eq!(dropped, 7);
        assert_eq!(pending.values().next().unwrap().requests(), 7);
    }

    #[test]
    fn chunks_split_the_backlog() {
        let mut pending: Batch = (0..10).map(|i| series("a", i * 60, 1)).collect();
        let chunk = take_chunk(&mut pending, 4);
        assert_eq!((chunk.len(), pending.len()), (4, 6));
        let chunk = take_chunk(&mut pending, 10);
        assert_eq!((chunk.len(), pending.len()), (6, 0));
    }

    #[test]
    fn one_series_becomes_three_buckets_top_and_last_used() {
        let keys = UsageKeys::new("kg:");
        let batch: Batch = [series("acme", 1_800_000_000, 3)].into();
        let pipe = pipeline(&keys, &Retention::default(), &batch);
        let commands: Vec<String> = pipe
            .cmd_iter()
            .map(|cmd| {
                cmd.args_iter()
                    .map(|arg| match arg {
                        redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                        _ => "<other>".into(),
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        let hincrby = commands.iter().filter(|c| c.starts_with("HINCRBY")).count();
        assert_eq!(hincrby, 3 * 3, "requests x (total, key, route) x (minute, hour, day): {commands:#?}");
        assert!(
            commands
                .iter()
                .any(|c| c.starts_with("HINCRBY kg:{acme}:usage:hour:") && c.ends_with(" key:k1:requests 3"))
        );
        assert_eq!(commands.iter().filter(|c| c.starts_with("EXPIREAT")).count(), 4);
        assert!(commands.iter().any(|c| c.starts_with("ZINCRBY kg:usage:top:") && c.ends_with(" 3 acme")));
        assert!(commands.contains(&format!("HSET kg:{{acme}}:last_used k1 {}", 1_800_000_000 + 5)));
    }
}
