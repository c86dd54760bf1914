//! The Redis side of recording: [`UsageFlusher`] drains the recorder every
//! interval into this gateway's running totals ([`super::ledger`]) and
//! writes them ([`super::writes`]): one `HSET` per client and bucket.
//!
//! What is written when, so that Redis's work follows traffic and time, not
//! the number of active keys times the flush rate:
//! - **A bucket that has ended** (plus [`FlushConfig::close_grace`], for the
//!   requests still being counted) is written whole, every client of it,
//!   then dropped from memory: minute buckets are complete in Redis within
//!   `close_grace` + one interval (3 s by default) of the minute's end, hour
//!   and day buckets likewise.
//! - **Open hour and day buckets, `last_used` and the top-clients sets** are
//!   written every [`FlushConfig::rollup_interval`] (5 minutes).
//! - **Freshness**: on each tick, clients with unwritten counts get their
//!   open minute, hour and day, `last_used` and top-clients entry written,
//!   oldest first, within a budget of commands:
//!   [`FlushConfig::fresh_commands`] or [`FlushConfig::fresh_per_mille`] of
//!   the tick's requests, whichever is more (50, or 2 per 1000). A gateway
//!   whose active clients fit the budget (about 8 a second, or one per 3 000
//!   requests) shows every count within one interval; one with many more
//!   shows them at the rollups and ends, and its writes stay near 3
//!   commands per active client and minute.
//! - **On shutdown** ([`UsageFlusher::flush_now`]) everything is written.
//!
//! Reliability: the totals stay in memory until Redis acknowledged them, and
//! writing a total again is harmless, so a failed or lost write is simply
//! repeated on the next tick: an outage loses nothing until the ledger holds
//! [`FlushConfig::max_series`] series (then new series are dropped and
//! counted), and nothing is counted twice (but in the top-clients sets, see
//! [`super::writes`]).
//!
//! CPU: a big flush is seconds of work for the gateway too (building the
//! commands, reading the replies). It runs on a thread of its own
//! (`keygate-usage`, with a single-threaded runtime), never on the control
//! runtime whose single thread drives the store's connection: key lookups
//! there would wait for it. It writes on a connection of its own, so no
//! lookup queues behind its commands either.
//!
//! Flushes are serialised by an async mutex around the ledger, held across
//! the Redis calls on purpose (what a write sends must be what it marks
//! written); the request path never touches this lock.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::store::conn::RedisConn;

use super::UsageError;
use super::ledger::{BucketId, Ledger, note_last_used};
use super::recorder::UsageRecorder;
use super::schema::{Granularity, Retention, UsageKeys};
use super::writes::{Item, Limits, Outcome, Trip};

/// How the flusher runs. The defaults suit one gateway in front of a busy API.
#[derive(Debug, Clone)]
pub struct FlushConfig {
    /// Time between flushes.
    pub interval: Duration,
    /// The most series (a client, key or route total in one minute, hour or
    /// day bucket) kept in memory, about 130 bytes each: the open hour and
    /// day buckets, and whatever Redis has not acknowledged.
    pub max_series: usize,
    /// The size of round trips.
    pub limits: Limits,
    /// How long buckets live in Redis.
    pub retention: Retention,
    /// Limit on one round trip.
    pub call_timeout: Duration,
    /// How long after its end a bucket is written as final: requests that
    /// ended in it are still being recorded for a moment.
    pub close_grace: Duration,
    /// How often open hour and day buckets, `last_used` and the top-clients
    /// sets are written even when the freshness budget did not reach them.
    pub rollup_interval: Duration,
    /// Freshness writes per tick, in commands, at least...
    pub fresh_commands: usize,
    /// ...or this many per thousand requests of the tick, if more.
    pub fresh_per_mille: u64,
}

impl Default for FlushConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            max_series: 1_000_000,
            limits: Limits::default(),
            retention: Retention::default(),
            call_timeout: Duration::from_secs(5),
            close_grace: Duration::from_secs(2),
            rollup_interval: Duration::from_secs(300),
            fresh_commands: 50,
            fresh_per_mille: 2,
        }
    }
}

/// Counters for `/metrics`. A snapshot; see [`UsageFlusher::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Client buckets Redis acknowledged.
    pub written_buckets: u64,
    /// Flushes that failed (their counts kept for a retry, unless Redis
    /// refused their content).
    pub flush_errors: u64,
    /// Requests whose counts were thrown away: the ledger was full, or
    /// Redis refused a bucket (e.g. `WRONGTYPE` on a hand-edited key).
    pub dropped_events: u64,
    /// Series held in memory (open buckets and unwritten ones).
    pub tracked_series: u64,
    /// Time since the last successful flush (or since the flusher started).
    pub last_flush_lag: Duration,
}

/// What one flush did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Client buckets written (one `HSET` each).
    pub buckets: usize,
    /// Commands sent, every kind.
    pub commands: usize,
    /// Pipelines sent.
    pub round_trips: usize,
    /// Summed round-trip time: how long the flush kept Redis busy, about.
    pub redis_time: Duration,
}

/// Which writes a flush makes (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Ended buckets, the rollup when due, freshness within the budget.
    Tick,
    /// Everything unwritten.
    All,
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

/// What the flusher keeps between flushes, under its one lock.
struct FlushState {
    ledger: Ledger,
    /// When the open hours and days were last written whole.
    last_rollup: Instant,
    /// Whether `kg:usage:schema` has been written (with the first flush
    /// that writes anything).
    schema_written: bool,
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
    /// The totals and the flushes' own bookkeeping.
    state: tokio::sync::Mutex<FlushState>,
    /// For the lag: `Instant`s are not atomic, milliseconds since `created` are.
    created: Instant,
    last_success_ms: AtomicU64,
    written_buckets: AtomicU64,
    flush_errors: AtomicU64,
    dropped_events: AtomicU64,
    tracked_series: AtomicU64,
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
        let state = FlushState {
            ledger: Ledger::new(config.max_series),
            last_rollup: Instant::now(),
            schema_written: false,
        };
        Arc::new(Self {
            recorder,
            conn: conn.into(),
            keys: UsageKeys::new(prefix),
            config,
            state: tokio::sync::Mutex::new(state),
            created: Instant::now(),
            last_success_ms: AtomicU64::new(0),
            written_buckets: AtomicU64::new(0),
            flush_errors: AtomicU64::new(0),
            dropped_events: AtomicU64::new(0),
            tracked_series: AtomicU64::new(0),
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
                    let _ = self.flush_tick().await;
                }
            }
        }
        if let Err(error) = self.flush_now().await {
            tracing::error!(
                %error,
                tracked_series = self.tracked_series.load(Ordering::Relaxed),
                "final usage flush failed; unflushed usage is lost"
            );
        }
    }

    /// Drains the recorder and writes everything unwritten now: the final
    /// flush, and what tests call to see their counts in Redis. On failure
    /// what was not written stays for the next call.
    pub async fn flush_now(&self) -> Result<FlushReport, UsageError> {
        self.flush(Scope::All).await
    }

    /// One tick's flush, as the spawned thread makes every interval: ended
    /// buckets, the rollup when due, freshness within the budget.
    pub async fn flush_tick(&self) -> Result<FlushReport, UsageError> {
        self.flush(Scope::Tick).await
    }

    async fn flush(&self, scope: Scope) -> Result<FlushReport, UsageError> {
        let mut guard = self.state.lock().await;
        let FlushState { ledger, last_rollup, schema_written } = &mut *guard;
        let drained = self.recorder.drain();
        let requests: u64 = drained.values().map(|series| series.requests()).sum();
        let dropped = ledger.add(drained);
        if dropped > 0 {
            self.drop_events(dropped);
            tracing::warn!(
                dropped_events = dropped,
                max_series = self.config.max_series,
                "usage ledger full (Redis unreachable, or more active series than [usage] max_buffered_series): dropped events"
            );
        }

        let now = jiff::Timestamp::now().as_second();
        let grace = i64::try_from(self.config.close_grace.as_secs()).unwrap_or(i64::MAX / 4);
        let closed = ledger.closed(now, grace);
        let rollup = scope == Scope::All || last_rollup.elapsed() >= self.config.rollup_interval;
        let plan = plan(ledger, scope, &closed, rollup, self.fresh_budget(requests), now, grace);

        let mut report = FlushReport::default();
        let mut written = Ok(());
        if !*schema_written && !plan.is_empty() {
            let mut trip = Trip::new();
            trip.push_schema(&self.keys);
            written = self.send(ledger, trip, &mut report).await;
            *schema_written = written.is_ok();
        }
        if written.is_ok() {
            written = self.write(ledger, plan, &mut report).await;
        }
        if written.is_ok() && rollup {
            *last_rollup = Instant::now();
        }
        for bucket in closed {
            ledger.drop_if_written(bucket);
        }
        self.tracked_series.store(ledger.series() as u64, Ordering::Relaxed);
        drop(guard);

        if let Err(error) = written {
            self.flush_errors.fetch_add(1, Ordering::Relaxed);
            crate::metrics::usage_flush_failed();
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
            buckets = report.buckets,
            commands = report.commands,
            round_trips = report.round_trips,
            redis_ms = report.redis_time.as_secs_f64() * 1e3,
            "usage flushed"
        );
        Ok(report)
    }

    /// The freshness writes a tick may make, in commands.
    fn fresh_budget(&self, requests: u64) -> usize {
        let share = requests.saturating_mul(self.config.fresh_per_mille) / 1_000;
        self.config.fresh_commands.max(usize::try_from(share).unwrap_or(usize::MAX))
    }

    pub fn stats(&self) -> FlushStats {
        let lag_ms = self.elapsed_ms().saturating_sub(self.last_success_ms.load(Ordering::Relaxed));
        FlushStats {
            written_buckets: self.written_buckets.load(Ordering::Relaxed),
            flush_errors: self.flush_errors.load(Ordering::Relaxed),
            dropped_events: self.dropped_events.load(Ordering::Relaxed),
            tracked_series: self.tracked_series.load(Ordering::Relaxed),
            last_flush_lag: Duration::from_millis(lag_ms),
        }
    }

    pub fn dropped_events(&self) -> u64 {
        self.dropped_events.load(Ordering::Relaxed)
    }

    /// Writes what `plan` names, one round trip at a time; stops at the
    /// first round trip that failed. What was not written stays unwritten
    /// in the ledger (buckets stay dirty; `last_used` and top-clients
    /// entries are put back).
    async fn write(&self, ledger: &mut Ledger, plan: Plan, report: &mut FlushReport) -> Result<(), String> {
        let mut buckets = plan.buckets.into_iter().peekable();
        let mut clients = plan.clients.into_iter().peekable();
        let mut failure = None;
        while buckets.peek().is_some() || clients.peek().is_some() {
            let mut trip = Trip::new();
            while trip.fields() < self.config.limits.round_trip_fields {
                if let Some((bucket, client)) = buckets.next() {
                    if let Some(totals) = ledger.totals(bucket, &client).filter(|t| t.dirty) {
                        let writer = ledger.writer(totals.generation);
                        trip.push_bucket(
                            &self.keys,
                            &self.config.retention,
                            (bucket, &client),
                            totals,
                            &writer,
                        );
                    }
                } else if let Some(client) = clients.next() {
                    if let Some(used) = ledger.last_used.remove(&client) {
                        trip.push_last_used(&self.keys, client.clone(), used);
                    }
                    for (day, requests) in ledger.top.remove(&client).unwrap_or_default() {
                        trip.push_top(&self.keys, &self.config.retention, day, client.clone(), requests);
                    }
                } else {
                    break;
                }
            }
            if trip.is_empty() {
                continue;
            }
            if let Err(error) = self.send(ledger, trip, report).await {
                failure = Some(error);
                break;
            }
            tokio::task::yield_now().await;
        }
        failure.map_or(Ok(()), Err)
    }

    /// Sends one trip and records what became of each of its items.
    async fn send(&self, ledger: &mut Ledger, trip: Trip, report: &mut FlushReport) -> Result<(), String> {
        report.commands += trip.commands();
        let replies = match self.round_trip(trip.pipeline(), report).await {
            Ok(replies) => replies,
            Err(error) => {
                // Unknown what ran: written again (harmless for totals).
                for item in trip.items() {
                    put_back(ledger, item);
                }
                return Err(error);
            }
        };
        let mut failure = None;
        for (item, outcome, expires) in trip.outcomes(replies) {
            match outcome {
                Outcome::Applied => {
                    if let Item::Bucket { bucket, client } = &item {
                        ledger.mark_written(*bucket, client, expires);
                        report.buckets += 1;
                        self.written_buckets.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Outcome::Refused(error) => {
                    // Retrying would fail the same way.
                    let lost = match &item {
                        Item::Bucket { bucket, client } => ledger.forget(*bucket, client),
                        _ => 0,
                    };
                    self.drop_events(lost);
                    tracing::error!(
                        dropped_events = lost,
                        %error,
                        "Redis refused a usage write (a usage key holds another type?); dropped it"
                    );
                }
                Outcome::NotRun(error) => {
                    put_back(ledger, item);
                    failure.get_or_insert(error);
                }
            }
        }
        failure.map_or(Ok(()), Err)
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

/// What one flush writes: client buckets first (ended buckets first of
/// all), then clients' `last_used` and top-clients entries.
#[derive(Debug, Default)]
struct Plan {
    buckets: Vec<(BucketId, Box<str>)>,
    clients: Vec<Box<str>>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.buckets.is_empty() && self.clients.is_empty()
    }
}

/// Chooses a flush's writes (see the module doc for the rules).
fn plan(
    ledger: &mut Ledger,
    scope: Scope,
    closed: &[BucketId],
    rollup: bool,
    mut budget: usize,
    now: i64,
    grace: i64,
) -> Plan {
    let mut plan = Plan::default();
    let mut planned: HashSet<(BucketId, Box<str>)> = HashSet::new();
    let mut push = |plan: &mut Plan, bucket: BucketId, client: Box<str>| {
        if planned.insert((bucket, client.clone())) {
            plan.buckets.push((bucket, client));
        }
    };
    if scope == Scope::All {
        let every: Vec<BucketId> = ledger.buckets.keys().copied().collect();
        for bucket in every {
            for client in ledger.dirty_clients(bucket) {
                push(&mut plan, bucket, client);
            }
        }
        plan.clients = ledger.all_dirty_clients();
        return plan;
    }
    for bucket in closed {
        for client in ledger.dirty_clients(*bucket) {
            push(&mut plan, *bucket, client);
        }
    }
    let open: Vec<BucketId> = Granularity::ALL
        .into_iter()
        .flat_map(|granularity| ledger.open_of(granularity, now, grace))
        .collect();
    let mut clients: HashSet<Box<str>> = HashSet::new();
    if rollup {
        for bucket in open.iter().filter(|(granularity, _)| *granularity != Granularity::Minute) {
            for client in ledger.dirty_clients(*bucket) {
                push(&mut plan, *bucket, client);
            }
        }
        clients.extend(ledger.all_dirty_clients());
    }
    // Freshness: a client's open buckets, last use and top-clients entry,
    // about 2 commands each, oldest unwritten client first.
    // A client already written by a rollup or a close costs nothing here.
    while budget > 0 {
        let Some(client) = ledger.next_fresh() else { break };
        for bucket in &open {
            let Some(totals) = ledger.totals(*bucket, &client).filter(|t| t.dirty) else { continue };
            let commands = if totals.expiry_set { 1 } else { 2 };
            push(&mut plan, *bucket, client.clone());
            budget = budget.saturating_sub(commands);
        }
        let others = usize::from(ledger.last_used.contains_key(&client))
            + ledger.top.get(&client).map_or(0, BTreeMap::len);
        budget = budget.saturating_sub(others);
        clients.insert(client);
    }
    plan.clients = clients.into_iter().collect();
    plan
}

/// Returns what a write that did not happen took out of the ledger.
fn put_back(ledger: &mut Ledger, item: Item) {
    match item {
        // A bucket stays in the ledger, still dirty: nothing to return.
        Item::Bucket { .. } | Item::Schema => {}
        Item::LastUsed { client, used } => {
            for (kid, at) in used {
                note_last_used(&mut ledger.last_used, &client, &kid, at);
            }
        }
        Item::Top { day, client, requests } => {
            let pending = ledger.top.entry(client).or_default().entry(day).or_default();
            *pending = pending.saturating_add(requests);
        }
    }
}
