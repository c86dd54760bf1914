//! The request-path side: [`UsageRecorder::record`] adds one request to
//! in-memory counters. It makes no Redis call and takes no lock another core
//! is likely to hold: the counters are split into shards, and each thread
//! sticks to its own shard (threads are dealt shards round-robin on their
//! first event). The flusher swaps the shards' maps out once per interval.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use jiff::Timestamp;

use super::schema::Counts;

/// Why the gateway itself refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// 401: missing, malformed, unknown, expired or revoked key.
    Unauthorized,
    /// 403: the key lacks the route's scope.
    Forbidden,
    /// 429: the key's rate limit.
    RateLimited,
    /// 429: the key's quota.
    QuotaExceeded,
}

/// One finished request, as the handler reports it.
#[derive(Debug, Clone, Copy)]
pub struct UsageEvent<'a> {
    /// The verified client. `None` (no key, or a key that did not verify) is
    /// counted under [`super::ANONYMOUS`]. Pass only verified clients: a
    /// client read from an unverified key string would let anyone create
    /// series at will.
    pub client: Option<&'a str>,
    /// The verified key's ID, `<client>.<kid>` (or the bare kid).
    pub key_id: Option<&'a str>,
    /// The matched route's path prefix (`-` or empty when no route matched).
    pub route: &'a str,
    /// The status sent to the client.
    pub status: u16,
    /// Set when the gateway refused the request itself.
    pub refusal: Option<Refusal>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Time to the upstream's response head; `None` when no upstream answered.
    pub upstream_latency: Option<Duration>,
    /// When the request happened (picks the minute bucket).
    pub at: Timestamp,
}

/// One series' counters and the time of its latest event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Series {
    pub counts: Counts,
    /// Unix seconds of the latest event: the key's `last_used`.
    pub last_at: i64,
}

impl Series {
    pub fn merge(&mut self, other: &Series) {
        self.counts.add(&other.counts);
        self.last_at = self.last_at.max(other.last_at);
    }

    fn add(&mut self, event: &UsageEvent<'_>, at: i64) {
        let c = &mut self.counts;
        c.requests += 1;
        match event.status {
            200..=299 => c.status_2xx += 1,
            300..=399 => c.status_3xx += 1,
            400..=499 => c.status_4xx += 1,
            500..=599 => c.status_5xx += 1,
            _ => {}
        }
        match event.refusal {
            None => {}
            Some(Refusal::Unauthorized) => c.refused_401 += 1,
            Some(Refusal::Forbidden) => c.refused_403 += 1,
            Some(Refusal::RateLimited) => c.refused_429_rate += 1,
            Some(Refusal::QuotaExceeded) => c.refused_429_quota += 1,
        }
        c.bytes_in = c.bytes_in.saturating_add(event.bytes_in);
        c.bytes_out = c.bytes_out.saturating_add(event.bytes_out);
        if let Some(latency) = event.upstream_latency {
            c.upstream_requests += 1;
            let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
            c.upstream_latency_us = c.upstream_latency_us.saturating_add(micros);
        }
        self.last_at = self.last_at.max(at);
    }
}

/// What counters are kept per: client, key, route and minute. Empty strings
/// stand for "none" (anonymous, no key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesKey {
    pub client: Box<str>,
    pub key_id: Box<str>,
    pub route: Box<str>,
    /// Unix seconds of the minute's start.
    pub minute: i64,
}

/// Drained counters, by series.
pub type Batch = HashMap<SeriesKey, Series>;

/// The in-memory aggregator. Share it behind an `Arc`; `record` takes `&self`.
#[derive(Debug)]
pub struct UsageRecorder {
    /// One map per shard. `std` mutexes: nothing awaits while one is held,
    /// and each is normally touched by one thread only (plus the flusher once
    /// per interval), so locking is an uncontended atomic operation.
    shards: Box<[Shard]>,
}

/// A cache-line-aligned shard, so two threads' shards never share a line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    series: Mutex<Batch>,
}

/// Deals shard numbers to threads, round-robin.
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard number (modulo the recorder's shard count).
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
}

impl Default for UsageRecorder {
    fn default() -> Self {
        Self::new()
    }
}

// === impl UsageRecorder ===

impl UsageRecorder {
    /// A recorder with four shards per core, so runtime worker threads (one
    /// per core) and a few blocking threads each get a shard of their own.
    pub fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        Self::with_shards(cores * 4)
    }

    pub fn with_shards(shards: usize) -> Self {
        Self { shards: (0..shards.max(1)).map(|_| Shard::default()).collect() }
    }

    /// Counts one request. Allocates only for a series (client, key, route,
    /// minute) this shard has not seen since the last flush.
    pub fn record(&self, event: &UsageEvent<'_>) {
        let at = event.at.as_second();
        let minute = at - at.rem_euclid(60);
        // `<client>.<kid>` -> `<kid>`: the client is already in the series.
        let (client, key_id) = match (event.client, event.key_id) {
            (Some(client), Some(id)) => {
                (client, id.strip_prefix(client).and_then(|rest| rest.strip_prefix('.')).unwrap_or(id))
            }
            (Some(client), None) => (client, ""),
            (None, Some(id)) => id.split_once('.').unwrap_or(("", id)),
            (None, None) => ("", ""),
        };
        let view = View { client, key_id, route: event.route, minute };

        let mut series = self.shard().lock().unwrap_or_else(PoisonError::into_inner);
        match series.get_mut(&view as &dyn AsView) {
            Some(found) => found.add(event, at),
            None => {
                let mut fresh = Series::default();
                fresh.add(event, at);
                series.insert(view.to_owned(), fresh);
            }
        }
    }

    /// Takes every counter recorded so far, leaving the shards empty.
    pub fn drain(&self) -> Batch {
        let mut all = Batch::new();
        for shard in &self.shards {
            let taken = std::mem::take(&mut *lock(&shard.series));
            if all.is_empty() {
                all = taken;
            } else {
                merge_into(&mut all, taken);
            }
        }
        all
    }

    fn shard(&self) -> &Mutex<Batch> {
        let n = SHARD.try_with(|n| *n).unwrap_or(0);
        &self.shards[n % self.shards.len()].series
    }
}

fn lock(mutex: &Mutex<Batch>) -> MutexGuard<'_, Batch> {
    // A panic while holding the lock leaves at worst one event half-counted.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Adds `from` into `into`, series by series.
pub fn merge_into(into: &mut Batch, from: Batch) {
    for (key, series) in from {
        into.entry(key).or_default().merge(&series);
    }
}

// === Borrowed lookups ===
//
// Looking a series up by `&str`s without building an owned key: the map's
// key type borrows as `dyn AsView`, whose hash and equality go through the
// same `View` as the owned key's.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct View<'a> {
    client: &'a str,
    key_id: &'a str,
    route: &'a str,
    minute: i64,
}

impl View<'_> {
    fn to_owned(self) -> SeriesKey {
        SeriesKey {
            client: self.client.into(),
            key_id: self.key_id.into(),
            route: self.route.into(),
            minute: self.minute,
        }
    }
}

trait AsView {
    fn view(&self) -> View<'_>;
}

impl AsView for View<'_> {
    fn view(&self) -> View<'_> {
        *self
    }
}

impl AsView for SeriesKey {
    fn view(&self) -> View<'_> {
        View { client: &self.client, key_id: &self.key_id, route: &self.route, minute: self.minute }
    }
}

impl<'a> Borrow<dyn AsView + 'a> for SeriesKey {
    fn borrow(&self) -> &(dyn AsView + 'a) {
        self
    }
}

impl Hash for SeriesKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.view().hash(state);
    }
}

impl Hash for dyn AsView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.view().hash(state);
    }
}

impl PartialEq for dyn AsView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.view() == other.view()
    }
}

impl Eq for dyn AsView + '_ {}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(client: &str, status: u16) -> UsageEvent<'_> {
        UsageEvent {
            client: Some(client),
            key_id: Some("acme.k1"),
            route: "/api",
            status,
            refusal: None,
            bytes_in: 10,
            bytes_out: 100,
            upstream_latency: Some(Duration::from_micros(250)),
            at: "2026-11-24T12:00:30Z".parse().unwrap(),
        }
    }

    #[test]
    fn events_of_one_series_add_up() {
        let recorder = UsageRecorder::with_shards(2);
        recorder.record(&event("acme", 200));
        recorder.record(&event("acme", 503));
        let refused = UsageEvent {
            refusal: Some(Refusal::RateLimited),
            upstream_latency: None,
            at: "2026-11-24T12:00:59Z".parse().unwrap(),
            ..event("acme", 429)
        };
        recorder.record(&refused);

        let batch = recorder.drain();
        assert_eq!(batch.len(), 1);
        let (key, series) = batch.iter().next().unwrap();
        assert_eq!((&*key.client, &*key.key_id, &*key.route), ("acme", "k1", "/api"));
        assert_eq!(key.minute, "2026-11-24T12:00:00Z".parse::<Timestamp>().unwrap().as_second());
        let c = series.counts;
        assert_eq!((c.requests, c.status_2xx, c.status_4xx, c.status_5xx), (3, 1, 1, 1));
        assert_eq!((c.refused_429_rate, c.bytes_in, c.bytes_out), (1, 30, 300));
        assert_eq!((c.upstream_requests, c.upstream_latency_us), (2, 500));
        assert_eq!(series.last_at, key.minute + 59);
        assert!(recorder.drain().is_empty(), "drain empties the shards");
    }

    #[test]
    fn series_are_split_by_client_key_route_and_minute() {
        let recorder = UsageRecorder::with_shards(1);
        recorder.record(&event("acme", 200));
        recorder.record(&UsageEvent { client: Some("other"), key_id: Some("other.k1"), ..event("x", 200) });
        recorder.record(&UsageEvent { route: "/b", ..event("acme", 200) });
        recorder.record(&UsageEvent { at: "2026-11-24T12:01:00Z".parse().unwrap(), ..event("acme", 200) });
        recorder.record(&UsageEvent { client: None, key_id: None, ..event("acme", 401) });
        assert_eq!(recorder.drain().len(), 5);
    }

    #[test]
    fn shards_of_many_threads_merge() {
        let recorder = UsageRecorder::with_shards(3);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| (0..1000).for_each(|_| recorder.record(&event("acme", 200))));
            }
        });
        let batch = recorder.drain();
        assert_eq!(batch.len(), 1);
        assert_eq!(batch.values().next().unwrap().counts.requests, 8000);
    }
}
