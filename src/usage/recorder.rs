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
    /// 429: the key's usage credits.
    CreditsExhausted,
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
    /// Usage credits this request spent (0 for a key without credits).
    pub credits: u64,
    /// Time to the upstream's response head; `None` when no upstream answered.
    pub upstream_latency: Option<Duration>,
    /// For a WebSocket tunnel, its life from the handshake to the close.
    pub tunnel: Option<Duration>,
    /// When the request happened (picks the minute bucket).
    pub at: Timestamp,
}

/// One series' counters and the second of its latest event, kept compact:
/// with very many active keys a gateway holds hundreds of thousands of
/// these between flushes. The eleven counts are `u32` (a series is one minute
/// of one key and route; four billion requests in it are out of reach, and
/// they saturate rather than wrap), the five sums `u64`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Series {
    requests: u32,
    /// By status class: 2xx, 3xx, 4xx, 5xx.
    status: [u32; 4],
    /// The gateway's refusals: 401, 403, 429 rate, 429 quota, 429 credits.
    refused: [u32; 5],
    upstream_requests: u32,
    bytes_in: u64,
    bytes_out: u64,
    upstream_latency_us: u64,
    tunnel_us: u64,
    /// Usage credits spent.
    credits: u64,
    /// Seconds past the series' minute of its latest event (0 to 59).
    last_second: u8,
}

impl Series {
    /// A series holding `counts` (each count saturating at `u32::MAX`),
    /// latest event `last_second` seconds into its minute.
    pub fn from_counts(counts: &Counts, last_second: u8) -> Self {
        let narrow = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        Self {
            requests: narrow(counts.requests),
            status: [counts.status_2xx, counts.status_3xx, counts.status_4xx, counts.status_5xx].map(narrow),
            refused: [
                counts.refused_401,
                counts.refused_403,
                counts.refused_429_rate,
                counts.refused_429_quota,
                counts.refused_429_credits,
            ]
            .map(narrow),
            credits: counts.credits,
            upstream_requests: narrow(counts.upstream_requests),
            bytes_in: counts.bytes_in,
            bytes_out: counts.bytes_out,
            upstream_latency_us: counts.upstream_latency_us,
            tunnel_us: counts.tunnel_us,
            last_second: last_second.min(59),
        }
    }

    /// The counters, widened to the form Redis and reports use.
    pub fn counts(&self) -> Counts {
        let [status_2xx, status_3xx, status_4xx, status_5xx] = self.status.map(u64::from);
        let [refused_401, refused_403, refused_429_rate, refused_429_quota, refused_429_credits] =
            self.refused.map(u64::from);
        Counts {
            requests: u64::from(self.requests),
            status_2xx,
            status_3xx,
            status_4xx,
            status_5xx,
            refused_401,
            refused_403,
            refused_429_rate,
            refused_429_quota,
            refused_429_credits,
            credits: self.credits,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            upstream_requests: u64::from(self.upstream_requests),
            upstream_latency_us: self.upstream_latency_us,
            tunnel_us: self.tunnel_us,
        }
    }

    pub fn requests(&self) -> u64 {
        u64::from(self.requests)
    }

    /// Unix seconds of the latest event (the key's `last_used`), given the
    /// series' minute.
    pub fn last_at(&self, minute: i64) -> i64 {
        minute + i64::from(self.last_second)
    }

    pub fn merge(&mut self, other: &Series) {
        let sum = |a: &mut u32, b: u32| *a = a.saturating_add(b);
        sum(&mut self.requests, other.requests);
        for (a, b) in self.status.iter_mut().zip(other.status) {
            sum(a, b);
        }
        for (a, b) in self.refused.iter_mut().zip(other.refused) {
            sum(a, b);
        }
        sum(&mut self.upstream_requests, other.upstream_requests);
        self.bytes_in = self.bytes_in.saturating_add(other.bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(other.bytes_out);
        self.credits = self.credits.saturating_add(other.credits);
        self.upstream_latency_us = self.upstream_latency_us.saturating_add(other.upstream_latency_us);
        self.tunnel_us = self.tunnel_us.saturating_add(other.tunnel_us);
        self.last_second = self.last_second.max(other.last_second);
    }

    fn add(&mut self, event: &UsageEvent<'_>, second: u8) {
        let one = |n: &mut u32| *n = n.saturating_add(1);
        one(&mut self.requests);
        match event.status {
            200..=299 => one(&mut self.status[0]),
            300..=399 => one(&mut self.status[1]),
            400..=499 => one(&mut self.status[2]),
            500..=599 => one(&mut self.status[3]),
            _ => {}
        }
        match event.refusal {
            None => {}
            Some(Refusal::Unauthorized) => one(&mut self.refused[0]),
            Some(Refusal::Forbidden) => one(&mut self.refused[1]),
            Some(Refusal::RateLimited) => one(&mut self.refused[2]),
            Some(Refusal::QuotaExceeded) => one(&mut self.refused[3]),
            Some(Refusal::CreditsExhausted) => one(&mut self.refused[4]),
        }
        self.credits = self.credits.saturating_add(event.credits);
        self.bytes_in = self.bytes_in.saturating_add(event.bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(event.bytes_out);
        if let Some(latency) = event.upstream_latency {
            one(&mut self.upstream_requests);
            let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
            self.upstream_latency_us = self.upstream_latency_us.saturating_add(micros);
        }
        if let Some(tunnel) = event.tunnel {
            let micros = u64::try_from(tunnel.as_micros()).unwrap_or(u64::MAX);
            self.tunnel_us = self.tunnel_us.saturating_add(micros);
        }
        self.last_second = self.last_second.max(second);
    }
}

/// What counters are kept per: client, key, route and minute. Empty names
/// stand for "none" (anonymous, no key). The three names share one
/// allocation. Ordered by client first, so a sorted batch holds each
/// client's series together.
#[derive(Clone, PartialEq, Eq)]
pub struct SeriesKey {
    /// Client, key ID and route, back to back.
    names: Box<str>,
    client_len: u32,
    key_len: u32,
    /// Unix seconds of the minute's start.
    pub minute: i64,
}

impl SeriesKey {
    pub fn new(client: &str, key_id: &str, route: &str, minute: i64) -> Self {
        let mut names = String::with_capacity(client.len() + key_id.len() + route.len());
        names.push_str(client);
        names.push_str(key_id);
        names.push_str(route);
        let len = |s: &str| u32::try_from(s.len()).unwrap_or(u32::MAX);
        Self { names: names.into_boxed_str(), client_len: len(client), key_len: len(key_id), minute }
    }

    pub fn client(&self) -> &str {
        self.names.get(..self.client_end()).unwrap_or_default()
    }

    pub fn key_id(&self) -> &str {
        self.names.get(self.client_end()..self.key_end()).unwrap_or_default()
    }

    pub fn route(&self) -> &str {
        self.names.get(self.key_end()..).unwrap_or_default()
    }

    fn client_end(&self) -> usize {
        self.client_len as usize
    }

    fn key_end(&self) -> usize {
        self.client_end() + self.key_len as usize
    }
}

impl std::fmt::Debug for SeriesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeriesKey")
            .field("client", &self.client())
            .field("key_id", &self.key_id())
            .field("route", &self.route())
            .field("minute", &self.minute)
            .finish()
    }
}

impl Ord for SeriesKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.view().cmp(&other.view())
    }
}

impl PartialOrd for SeriesKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Drained counters, by series. foldhash, seeded per process: `record` looks
/// a series up on every request (callgrind: 460 instructions per request fewer
/// than with SipHash). The keys are verified callers and configured routes,
/// never strings a client chooses, so a fast seeded hash gives nothing to flood.
pub type Batch = HashMap<SeriesKey, Series, foldhash::fast::RandomState>;

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
        let second = at.rem_euclid(60);
        let minute = at - second;
        // 0 to 59: fits.
        let second = u8::try_from(second).unwrap_or(59);
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
            Some(found) => found.add(event, second),
            None => {
                let mut fresh = Series::default();
                fresh.add(event, second);
                series.insert(view.to_owned(), fresh);
            }
        }
    }

    /// Takes every counter recorded so far, leaving the shards empty.
    pub fn drain(&self) -> Batch {
        let mut all = Batch::default();
        for shard in &self.shards {
            let taken = {
                let mut series = lock(&shard.series);
                // A shard refills to about the same size by the next drain:
                // it starts at that capacity, so the request path does not
                // pay for rehashing it while it grows back.
                let capacity = series.len();
                std::mem::replace(&mut *series, Batch::with_capacity_and_hasher(capacity, Default::default()))
            };
            if all.is_empty() {
                all = taken;
            } else {
                merge_into(&mut all, taken);
            }
        }
        all
    }

    /// How many series the shards hold now (a series recorded on two
    /// threads counts twice): what the next drain will bring, about.
    pub fn series_len(&self) -> usize {
        self.shards.iter().map(|shard| lock(&shard.series).len()).sum()
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct View<'a> {
    client: &'a str,
    key_id: &'a str,
    route: &'a str,
    minute: i64,
}

impl View<'_> {
    fn to_owned(self) -> SeriesKey {
        SeriesKey::new(self.client, self.key_id, self.route, self.minute)
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
        View { client: self.client(), key_id: self.key_id(), route: self.route(), minute: self.minute }
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
            credits: 0,
            upstream_latency: Some(Duration::from_micros(250)),
            tunnel: None,
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
            tunnel: None,
            at: "2026-11-24T12:00:59Z".parse().unwrap(),
            ..event("acme", 429)
        };
        recorder.record(&refused);

        let batch = recorder.drain();
        assert_eq!(batch.len(), 1);
        let (key, series) = batch.iter().next().unwrap();
        assert_eq!((key.client(), key.key_id(), key.route()), ("acme", "k1", "/api"));
        assert_eq!(key.minute, "2026-11-24T12:00:00Z".parse::<Timestamp>().unwrap().as_second());
        let c = series.counts();
        assert_eq!((c.requests, c.status_2xx, c.status_4xx, c.status_5xx), (3, 1, 1, 1));
        assert_eq!((c.refused_429_rate, c.bytes_in, c.bytes_out), (1, 30, 300));
        assert_eq!((c.upstream_requests, c.upstream_latency_us), (2, 500));
        assert_eq!(series.last_at(key.minute), key.minute + 59);
        assert_eq!(recorder.series_len(), 0, "drain empties the shards");
        assert!(recorder.drain().is_empty());
    }

    #[test]
    fn series_are_split_by_client_key_route_and_minute() {
        let recorder = UsageRecorder::with_shards(1);
        recorder.record(&event("acme", 200));
        recorder.record(&UsageEvent { client: Some("other"), key_id: Some("other.k1"), ..event("x", 200) });
        recorder.record(&UsageEvent { route: "/b", ..event("acme", 200) });
        recorder.record(&UsageEvent { at: "2026-11-24T12:01:00Z".parse().unwrap(), ..event("acme", 200) });
        recorder.record(&UsageEvent { client: None, key_id: None, ..event("acme", 401) });
        assert_eq!(recorder.series_len(), 5);
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
        assert_eq!(batch.values().next().unwrap().requests(), 8000);
    }

    #[test]
    fn keys_and_series_are_compact() {
        // Map entries of 120 bytes plus one small allocation per series
        // (104 before the credits counters: a refusal count and credits
        // spent; 112 before the tunnels' summed life).
        assert_eq!(std::mem::size_of::<SeriesKey>() + std::mem::size_of::<Series>(), 120);
        let key = SeriesKey::new("acme", "k1", "/api:v2", 60);
        assert_eq!((key.client(), key.key_id(), key.route(), key.minute), ("acme", "k1", "/api:v2", 60));
        let empty = SeriesKey::new("", "", "", 0);
        assert_eq!((empty.client(), empty.key_id(), empty.route()), ("", "", ""));
        assert_ne!(SeriesKey::new("ab", "c", "", 0), SeriesKey::new("a", "bc", "", 0));
        assert!(SeriesKey::new("a", "z", "", 0) < SeriesKey::new("b", "a", "", 0), "client first");
    }

    #[test]
    fn counts_survive_the_compact_form_and_saturate() {
        let counts = Counts {
            requests: 7,
            status_2xx: 5,
            status_4xx: 2,
            refused_429_quota: 1,
            refused_429_credits: 1,
            credits: 35,
            bytes_out: u64::MAX,
            upstream_requests: 5,
            upstream_latency_us: 1 << 40,
            tunnel_us: 90_000_000,
            ..Counts::default()
        };
        let series = Series::from_counts(&counts, 12);
        assert_eq!(series.counts(), counts);
        assert_eq!(series.last_at(600), 612);
        let mut big = Series::from_counts(&Counts { requests: u64::MAX, ..Counts::default() }, 70);
        big.merge(&series);
        assert_eq!(big.requests(), u64::from(u32::MAX));
        assert_eq!(big.last_at(0), 59);
    }
}
