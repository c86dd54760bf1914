//! This gateway's own running totals of usage, per bucket and client, kept
//! until Redis holds them.
//!
//! Why totals rather than increments: Redis has no command that adds to many
//! hash fields at once, so writing increments costs one `HINCRBY` per field,
//! per bucket, per flush (about 50 per active key each second, which is what
//! made usage writes grow with the number of active keys). A total is
//! written with one `HSET` of every field of a client's bucket, and it can
//! be written again at any time: a retry after a lost reply, or a second
//! write of the same bucket, cannot count twice. So every gateway writes its
//! totals under a name of its own (`requests@<writer>`), and readers add the
//! writers up (see `docs/redis-schema.md`, "Usage").
//!
//! A writer is this process's random name plus a generation. The generation
//! grows whenever buckets are dropped from memory, so a bucket that comes
//! back after being dropped (a late event for a minute already written) gets
//! a field of its own instead of overwriting the total written before.
//!
//! Memory: each tracked series (a client, key or route total in a minute,
//! hour or day bucket) is about 130 bytes; the open hour and day buckets stay
//! until they close. [`Ledger::add`] refuses new series past its bound.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::recorder::{Batch, Series, SeriesKey};
use super::schema::{ANONYMOUS, Granularity, valid_client};

/// A bucket: its granularity and its start, Unix seconds.
pub type BucketId = (Granularity, i64);

/// One client's totals in one bucket, as this gateway counted them.
#[derive(Debug, Default)]
pub struct ClientTotals {
    pub total: Series,
    /// By kid (the part after `<client>.`).
    pub keys: HashMap<Box<str>, Series>,
    /// By route prefix.
    pub routes: HashMap<Box<str>, Series>,
    /// The generation of the writer name these totals are written under.
    pub generation: u32,
    /// Counted since Redis last acknowledged these totals.
    pub dirty: bool,
    /// Whether this bucket's key has had its `EXPIREAT` from us.
    pub expiry_set: bool,
}

impl ClientTotals {
    /// Series this entry holds (the total, each key, each route).
    fn series(&self) -> usize {
        1 + self.keys.len() + self.routes.len()
    }
}

/// The totals of every open (or not yet written) bucket, plus what goes to
/// `last_used` and the top-clients sets. Owned by the flusher.
#[derive(Debug)]
pub struct Ledger {
    writer: Box<str>,
    generation: u32,
    pub(super) buckets: BTreeMap<BucketId, HashMap<Box<str>, ClientTotals>>,
    /// Latest use per client and kid, not yet written.
    pub(super) last_used: HashMap<Box<str>, HashMap<Box<str>, i64>>,
    /// Requests per client and day not yet added to the top-clients sets.
    pub(super) top: HashMap<Box<str>, BTreeMap<i64, u64>>,
    /// Clients with something unwritten, oldest first: the order in which
    /// the freshness writes visit them.
    fresh_queue: VecDeque<Box<str>>,
    queued: HashSet<Box<str>>,
    series: usize,
    max_series: usize,
}

impl Ledger {
    /// An empty ledger holding at most `max_series` series, under a random
    /// writer name (8 characters, 48 random bits).
    pub fn new(max_series: usize) -> Self {
        let mut bytes = [0u8; 6];
        if getrandom::fill(&mut bytes).is_err() {
            // No OS randomness: a name from the clock and the process still
            // differs between gateways, if less surely.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            bytes[..4].copy_from_slice(&nanos.to_le_bytes());
            bytes[4..].copy_from_slice(&(std::process::id() as u16).to_le_bytes());
        }
        Self::with_writer(&URL_SAFE_NO_PAD.encode(bytes), max_series)
    }

    /// [`new`](Self::new) with a chosen writer name (tests).
    pub fn with_writer(writer: &str, max_series: usize) -> Self {
        Self {
            writer: writer.into(),
            generation: 0,
            buckets: BTreeMap::new(),
            last_used: HashMap::new(),
            top: HashMap::new(),
            fresh_queue: VecDeque::new(),
            queued: HashSet::new(),
            series: 0,
            max_series,
        }
    }

    /// The writer name of a generation: the suffix after `@` in field names.
    pub fn writer(&self, generation: u32) -> String {
        format!("{}.{generation:x}", self.writer)
    }

    /// Series held now, across every bucket.
    pub fn series(&self) -> usize {
        self.series
    }

    /// Adds drained counters; returns the requests dropped because they
    /// would have grown the ledger past its bound.
    pub fn add(&mut self, batch: Batch) -> u64 {
        let mut dropped = 0;
        for (key, series) in batch {
            let client = client_of(key.client());
            if self.series >= self.max_series && self.would_grow(client, &key) {
                dropped += series.requests();
                continue;
            }
            for granularity in Granularity::ALL {
                let bucket = (granularity, granularity.bucket_start(key.minute));
                self.add_to(bucket, client, &key, &series);
            }
            if client != ANONYMOUS && !key.key_id().is_empty() {
                note_last_used(&mut self.last_used, client, key.key_id(), series.last_at(key.minute));
            }
            let day = Granularity::Day.bucket_start(key.minute);
            let days = match self.top.get_mut(client) {
                Some(days) => days,
                None => self.top.entry(client.into()).or_default(),
            };
            let requests = days.entry(day).or_default();
            *requests = requests.saturating_add(series.requests());
            self.enqueue(client);
        }
        dropped
    }

    fn add_to(&mut self, bucket: BucketId, client: &str, key: &SeriesKey, series: &Series) {
        let generation = self.generation;
        let clients = self.buckets.entry(bucket).or_default();
        // Looked up by `&str` first: an entry (and its key's allocation) is
        // made once per client and bucket, not per drained series.
        let totals = match clients.get_mut(client) {
            Some(totals) => totals,
            None => {
                self.series += 1;
                clients.entry(client.into()).or_insert(ClientTotals { generation, ..ClientTotals::default() })
            }
        };
        totals.total.merge(series);
        if !key.key_id().is_empty() {
            merge_named(&mut totals.keys, key.key_id(), series, &mut self.series);
        }
        if !key.route().is_empty() {
            merge_named(&mut totals.routes, key.route(), series, &mut self.series);
        }
        totals.dirty = true;
    }

    /// Whether `key` needs a series the ledger does not hold yet. The minute
    /// bucket is enough to ask: the hour and day hold all its series.
    fn would_grow(&self, client: &str, key: &SeriesKey) -> bool {
        let minute = (Granularity::Minute, key.minute);
        let Some(totals) = self.buckets.get(&minute).and_then(|clients| clients.get(client)) else {
            return true;
        };
        (!key.key_id().is_empty() && !totals.keys.contains_key(key.key_id()))
            || (!key.route().is_empty() && !totals.routes.contains_key(key.route()))
    }

    fn enqueue(&mut self, client: &str) {
        if !self.queued.contains(client) {
            self.queued.insert(client.into());
            self.fresh_queue.push_back(client.into());
        }
    }

    /// Buckets that ended at least `grace` before `now` (Unix seconds).
    pub fn closed(&self, now: i64, grace: i64) -> Vec<BucketId> {
        self.buckets
            .keys()
            .filter(|(granularity, start)| start + granularity.seconds() + grace <= now)
            .copied()
            .collect()
    }

    /// Every open bucket of one granularity.
    pub fn open_of(&self, granularity: Granularity, now: i64, grace: i64) -> Vec<BucketId> {
        self.buckets
            .keys()
            .filter(|(g, start)| *g == granularity && start + g.seconds() + grace > now)
            .copied()
            .collect()
    }

    /// The clients of `bucket` with unwritten counts.
    pub fn dirty_clients(&self, bucket: BucketId) -> Vec<Box<str>> {
        self.buckets
            .get(&bucket)
            .map(|clients| clients.iter().filter(|(_, t)| t.dirty).map(|(c, _)| c.clone()).collect())
            .unwrap_or_default()
    }

    /// Every client with unwritten counts in some bucket, `last_used` or
    /// the top-clients sets, in no particular order.
    pub fn all_dirty_clients(&self) -> Vec<Box<str>> {
        let mut clients: HashSet<Box<str>> = HashSet::new();
        for totals in self.buckets.values() {
            clients.extend(totals.iter().filter(|(_, t)| t.dirty).map(|(c, _)| c.clone()));
        }
        clients.extend(self.last_used.keys().cloned());
        clients.extend(self.top.keys().cloned());
        clients.into_iter().collect()
    }

    /// The next client for a freshness write, oldest unwritten first.
    pub fn next_fresh(&mut self) -> Option<Box<str>> {
        let client = self.fresh_queue.pop_front()?;
        self.queued.remove(&client);
        Some(client)
    }

    pub fn totals(&self, bucket: BucketId, client: &str) -> Option<&ClientTotals> {
        self.buckets.get(&bucket)?.get(client)
    }

    /// Redis holds `client`'s totals of `bucket` as they are now (and its
    /// expiry, if `expires`).
    pub fn mark_written(&mut self, bucket: BucketId, client: &str, expires: bool) {
        if let Some(totals) = self.buckets.get_mut(&bucket).and_then(|c| c.get_mut(client)) {
            totals.dirty = false;
            totals.expiry_set |= expires;
        }
    }

    /// Drops a bucket whose clients are all written; returns false (and
    /// keeps it) if some are not. The generation moves on, so the bucket
    /// coming back is written under another name.
    pub fn drop_if_written(&mut self, bucket: BucketId) -> bool {
        let Some(clients) = self.buckets.get(&bucket) else { return true };
        if clients.values().any(|t| t.dirty) {
            return false;
        }
        if let Some(clients) = self.buckets.remove(&bucket) {
            self.series -= clients.values().map(ClientTotals::series).sum::<usize>();
            self.generation = self.generation.wrapping_add(1);
        }
        true
    }

    /// Forgets a bucket's client whose totals Redis refused (a key of
    /// another type): returns the requests lost.
    pub fn forget(&mut self, bucket: BucketId, client: &str) -> u64 {
        let Some(clients) = self.buckets.get_mut(&bucket) else { return 0 };
        let Some(totals) = clients.remove(client) else { return 0 };
        self.series -= totals.series();
        totals.total.requests()
    }
}

/// Keeps the latest use of `kid`, allocating only for a client or key not
/// seen since the last write (this runs for every drained series).
pub(super) fn note_last_used(
    last_used: &mut HashMap<Box<str>, HashMap<Box<str>, i64>>,
    client: &str,
    kid: &str,
    at: i64,
) {
    let kids = match last_used.get_mut(client) {
        Some(kids) => kids,
        None => last_used.entry(client.into()).or_default(),
    };
    match kids.get_mut(kid) {
        Some(latest) => *latest = (*latest).max(at),
        None => {
            kids.insert(kid.into(), at);
        }
    }
}

fn merge_named(map: &mut HashMap<Box<str>, Series>, name: &str, series: &Series, count: &mut usize) {
    match map.get_mut(name) {
        Some(found) => found.merge(series),
        None => {
            *count += 1;
            map.insert(name.into(), *series);
        }
    }
}

/// The client a series is counted under: invalid names are anonymous.
pub fn client_of(client: &str) -> &str {
    if valid_client(client) { client } else { ANONYMOUS }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Counts;

    fn batch(items: &[(&str, &str, &str, i64, u64)]) -> Batch {
        items
            .iter()
            .map(|(client, kid, route, minute, requests)| {
                let counts = Counts { requests: *requests, ..Counts::default() };
                (SeriesKey::new(client, kid, route, *minute), Series::from_counts(&counts, 7))
            })
            .collect()
    }

    const DAY: i64 = 1_764_000_000 - 1_764_000_000 % 86_400;

    #[test]
    fn a_series_counts_in_its_minute_hour_and_day() {
        let mut ledger = Ledger::with_writer("w", 100);
        ledger.add(batch(&[("acme", "k1", "/api", DAY + 60, 2), ("acme", "k2", "/api", DAY + 120, 3)]));
        for bucket in [(Granularity::Hour, DAY), (Granularity::Day, DAY)] {
            let totals = ledger.totals(bucket, "acme").unwrap();
            assert_eq!(totals.total.requests(), 5);
            assert_eq!(totals.keys["k2"].requests(), 3);
            assert_eq!(totals.routes["/api"].requests(), 5);
        }
        assert_eq!(ledger.totals((Granularity::Minute, DAY + 60), "acme").unwrap().total.requests(), 2);
        // Minutes: 2 x (total, key, route); hour and day: total, 2 keys, route.
        assert_eq!(ledger.series(), 6 + 4 + 4);
        assert_eq!(ledger.last_used["acme"]["k2"], DAY + 127);
        assert_eq!(ledger.top["acme"][&DAY], 5);
    }

    #[test]
    fn a_dropped_bucket_comes_back_under_another_generation() {
        let mut ledger = Ledger::with_writer("w", 100);
        let minute = (Granularity::Minute, DAY);
        ledger.add(batch(&[("acme", "", "", DAY, 1)]));
        assert!(!ledger.drop_if_written(minute), "unwritten buckets stay");
        ledger.mark_written(minute, "acme", true);
        assert!(ledger.drop_if_written(minute));
        ledger.add(batch(&[("acme", "", "", DAY, 1)]));
        let again = ledger.totals(minute, "acme").unwrap();
        assert_eq!((again.generation, again.total.requests()), (1, 1), "a new field, not an overwrite");
        assert_eq!(ledger.writer(again.generation), "w.1");
        assert_eq!(ledger.totals((Granularity::Day, DAY), "acme").unwrap().generation, 0);
    }

    #[test]
    fn the_bound_refuses_new_series_but_not_known_ones() {
        let mut ledger = Ledger::with_writer("w", 3);
        assert_eq!(ledger.add(batch(&[("acme", "", "", DAY, 1)])), 0);
        assert_eq!(ledger.series(), 3);
        assert_eq!(ledger.add(batch(&[("acme", "", "", DAY, 4), ("other", "", "", DAY, 9)])), 9);
        assert_eq!(ledger.totals((Granularity::Day, DAY), "acme").unwrap().total.requests(), 5);
        assert!(ledger.totals((Granularity::Day, DAY), "other").is_none());
    }

    #[test]
    fn invalid_clients_are_anonymous_and_fresh_writes_visit_clients_in_order() {
        let mut ledger = Ledger::with_writer("w", 100);
        ledger.add(batch(&[("b", "", "", DAY, 1)]));
        ledger.add(batch(&[("{x}", "", "", DAY, 1), ("b", "", "", DAY, 1)]));
        assert!(ledger.totals((Granularity::Day, DAY), ANONYMOUS).is_some());
        assert_eq!(ledger.next_fresh().as_deref(), Some("b"));
        assert_eq!(ledger.next_fresh().as_deref(), Some(ANONYMOUS));
        assert_eq!(ledger.next_fresh(), None);
        assert_eq!(ledger.closed(DAY + 86_400 + 2, 2).len(), 3, "minute, hour and day have ended");
        assert_eq!(ledger.closed(DAY + 61, 2).len(), 0, "within the grace");
    }
}
