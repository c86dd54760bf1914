//! The Redis commands of a flush: one `MULTI`/`EXEC` transaction per
//! client, several transactions per round trip.
//!
//! Why one transaction per client:
//! - Redis runs a transaction without serving anyone else. One transaction
//!   for a whole flush (what this replaced) held Redis for as long as the
//!   whole flush took to apply: 90 to 230 ms with 100 000 active keys, while
//!   the key lookups and limit leases of every gateway waited behind it. A
//!   client's transaction is its three bucket hashes and `last_used`: a few
//!   hundred increments at most for a client with tens of active keys, well
//!   under a millisecond, and Redis serves other connections between two.
//! - Every key a client's transaction writes carries the client's hash tag,
//!   so in Redis Cluster the transaction stays in one slot. The daily
//!   top-clients sets are global keys: they get transactions of their own
//!   ([`Trip::top`]), written once the clients' transactions are in.
//! - A client's counters for one flush are applied whole or not at all. A
//!   client whose counters need more than [`Limits::transaction_increments`]
//!   is split into several transactions of whole series (each still whole or
//!   not at all): that bounds how long one transaction can hold Redis.
//!
//! Transactions travel in pipelines ([`Trip`]) of about
//! [`Limits::round_trip_increments`] increments, one pipeline in flight at a
//! time: memory stays bounded whatever the flush's size, and so does the
//! one window for double counting (a connection lost while a pipeline is in
//! flight: its transactions may or may not have run, and are all retried).

use std::collections::BTreeMap;
use std::iter::Peekable;

use redis::Value;

use super::recorder::{Series, SeriesKey};
use super::schema::{
    ANONYMOUS, Counts, Dimension, Granularity, Retention, UsageKeys, valid_client, write_field,
};

/// Size bounds of the writes, in increments (`HINCRBY`, `ZINCRBY`): Redis's
/// unit of work here, one to two microseconds each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most increments in one transaction. A client with more in one
    /// flush is split into several transactions.
    pub transaction_increments: usize,
    /// The increments after which a round trip takes no further
    /// transaction (so it may pass this by one transaction).
    pub round_trip_increments: usize,
}

impl Default for Limits {
    /// 2 048 increments hold Redis for about 2 to 4 ms at most; a round
    /// trip of about 8 192 is some 600 KiB of commands.
    fn default() -> Self {
        Self { transaction_increments: 2_048, round_trip_increments: 8_192 }
    }
}

/// Some series of one client, written by one transaction.
pub type Run = Vec<(SeriesKey, Series)>;

/// Requests per day and client, for the daily top-clients sets: the
/// requests of the clients' transactions that were applied.
pub type TopCounts = BTreeMap<(i64, Box<str>), u64>;

/// Some entries of [`TopCounts`], written by one transaction.
pub type TopRun = Vec<((i64, Box<str>), u64)>;

/// One round trip: a pipeline of whole transactions, each with what it
/// carries (to be put back if it did not run).
pub struct Trip<P> {
    pipe: redis::Pipeline,
    /// Commands in `pipe` so far: where the next reply will be.
    commands: usize,
    transactions: Vec<Transaction<P>>,
    increments: usize,
}

struct Transaction<P> {
    /// Where this transaction's `EXEC` answer is among the replies.
    exec: usize,
    payload: P,
}

/// What became of one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Redis ran it.
    Applied,
    /// Redis ran it but some commands failed (e.g. `WRONGTYPE`: a usage key
    /// holds another type): some counters were written, so a retry would
    /// write those twice. Not retried.
    Refused(String),
    /// Redis did not run it (`EXECABORT`, e.g. out of memory or a read-only
    /// replica): nothing was written, a retry is safe.
    NotRun(String),
}

/// The client a series is counted under: invalid names are anonymous.
pub fn client_of(client: &str) -> &str {
    if valid_client(client) { client } else { ANONYMOUS }
}

/// The most increments a series can add to a transaction: each non-zero
/// counter in each of its dimensions and buckets (fewer when other series
/// of the client share the total and route fields), plus `last_used`.
fn cost(key: &SeriesKey, series: &Series) -> usize {
    let dimensions = 1 + usize::from(!key.key_id().is_empty()) + usize::from(!key.route().is_empty());
    series.counts().nonzero() * dimensions * Granularity::ALL.len() + 1
}

// === impl Trip ===

impl<P> Trip<P> {
    fn new() -> Self {
        let mut pipe = redis::pipe();
        // Every reply comes back, errors included, so each transaction's
        // fate can be read from its `EXEC` answer.
        pipe.ignore_errors();
        Self { pipe, commands: 0, transactions: Vec::new(), increments: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.transactions.is_empty()
    }

    pub fn pipeline(&self) -> &redis::Pipeline {
        &self.pipe
    }

    pub fn transactions(&self) -> usize {
        self.transactions.len()
    }

    pub fn increments(&self) -> usize {
        self.increments
    }

    /// Pairs what each transaction carried with what became of it, from the
    /// pipeline's replies (one per command, as `ignore_errors` returns them).
    pub fn outcomes(self, replies: Value) -> Vec<(P, Outcome)> {
        let replies = match replies {
            Value::Array(replies) => replies,
            other => vec![other],
        };
        self.transactions
            .into_iter()
            .map(|transaction| (transaction.payload, outcome(replies.get(transaction.exec))))
            .collect()
    }

    /// What every transaction carried, for a round trip whose replies were
    /// lost (any of them may have run, or none).
    pub fn payloads(self) -> impl Iterator<Item = P> {
        self.transactions.into_iter().map(|transaction| transaction.payload)
    }

    fn cmd(&mut self, name: &str) -> &mut redis::Pipeline {
        self.commands += 1;
        self.pipe.cmd(name)
    }

    /// [`cmd`](Self::cmd) for a command built beforehand.
    fn add_command(&mut self, cmd: redis::Cmd) {
        self.commands += 1;
        self.pipe.add_command(cmd);
    }

    fn end_transaction(&mut self, payload: P) {
        self.cmd("EXEC");
        self.transactions.push(Transaction { exec: self.commands - 1, payload });
    }
}

impl Trip<Run> {
    /// Takes series from `source` (sorted by client, see [`SeriesKey`]) for
    /// one round trip: whole clients, one transaction each, until the round
    /// trip holds [`Limits::round_trip_increments`].
    pub fn series(
        source: &mut Peekable<impl Iterator<Item = (SeriesKey, Series)>>,
        keys: &UsageKeys,
        retention: &Retention,
        limits: Limits,
    ) -> Self {
        let mut trip = Trip::new();
        let mut name = String::new();
        while trip.increments < limits.round_trip_increments {
            let Some((first, _)) = source.peek() else { break };
            let client = client_of(first.client()).to_owned();
            let mut run = Run::new();
            let mut increments = 0;
            while let Some((key, series)) = source.peek() {
                let more = cost(key, series);
                let full = !run.is_empty() && increments + more > limits.transaction_increments;
                if full || client_of(key.client()) != client {
                    break;
                }
                increments += more;
                run.extend(source.next());
            }
            trip.push_client(&client, run, keys, retention, &mut name);
            trip.increments += increments;
        }
        trip
    }

    /// One client's transaction: its series projected onto the client's
    /// minute, hour and day hashes (client total, per key, per route), each
    /// hash's expiry, and `last_used`.
    fn push_client(
        &mut self,
        client: &str,
        run: Run,
        keys: &UsageKeys,
        retention: &Retention,
        name: &mut String,
    ) {
        {
            let mut buckets: BTreeMap<(Granularity, i64), Fields<'_>> = BTreeMap::new();
            let mut last_used: BTreeMap<&str, i64> = BTreeMap::new();
            for (key, series) in &run {
                let counts = series.counts();
                for granularity in Granularity::ALL {
                    let bucket = (granularity, granularity.bucket_start(key.minute));
                    buckets.entry(bucket).or_default().add(key, &counts);
                }
                if client != ANONYMOUS && !key.key_id().is_empty() {
                    let last_at = series.last_at(key.minute);
                    let at = last_used.entry(key.key_id()).or_insert(last_at);
                    *at = (*at).max(last_at);
                }
            }

            self.cmd("MULTI");
            for ((granularity, start), fields) in &buckets {
                let key = keys.bucket(client, *granularity, *start);
                self.hincrby(&key, &Dimension::Total, &fields.total, name);
                for (kid, counts) in &fields.keys {
                    self.hincrby(&key, &Dimension::Key(kid), counts, name);
                }
                for (route, counts) in &fields.routes {
                    self.hincrby(&key, &Dimension::Route(route), counts, name);
                }
                self.cmd("EXPIREAT").arg(&key).arg(retention.expire_at(*granularity, *start));
            }
            if !last_used.is_empty() {
                let hset = self.cmd("HSET").arg(keys.last_used(client));
                for (kid, at) in &last_used {
                    hset.arg(*kid).arg(*at);
                }
            }
        }
        self.end_transaction(run);
    }

    /// `HINCRBY key <field> <value>` for each non-zero counter of `counts`.
    ///
    /// Each command is built with room for its arguments: a flush builds
    /// one per counter, bucket and dimension of every active series, and
    /// growing their buffers argument by argument cost a quarter of a big
    /// flush's CPU (callgrind, 1000 active keys).
    fn hincrby(&mut self, key: &str, dimension: &Dimension<'_>, counts: &Counts, name: &mut String) {
        for (metric, value) in counts.fields() {
            if value > 0 {
                write_field(name, dimension, metric);
                // `HINCRBY`, key, field and an i64 of at most 20 digits.
                let mut cmd = redis::Cmd::with_capacity(4, 7 + key.len() + name.len() + 20);
                cmd.arg("HINCRBY").arg(key).arg(name.as_str()).arg(as_i64(value));
                self.add_command(cmd);
            }
        }
    }
}

impl Trip<TopRun> {
    /// Takes entries from `top` for one round trip: one transaction per day
    /// (and per [`Limits::transaction_increments`] clients), each its
    /// `ZINCRBY`s and the set's expiry.
    pub fn top(top: &mut TopCounts, keys: &UsageKeys, retention: &Retention, limits: Limits) -> Self {
        let mut trip = Trip::new();
        while trip.increments < limits.round_trip_increments {
            let Some(((day, _), _)) = top.first_key_value() else { break };
            let day = *day;
            let mut run = TopRun::new();
            while run.len() < limits.transaction_increments.max(1) {
                match top.first_entry() {
                    Some(entry) if entry.key().0 == day => run.push(entry.remove_entry()),
                    _ => break,
                }
            }
            let key = keys.top_clients(day);
            trip.cmd("MULTI");
            for ((_, client), requests) in &run {
                trip.cmd("ZINCRBY").arg(&key).arg(as_i64(*requests)).arg(&**client);
            }
            trip.cmd("EXPIREAT").arg(&key).arg(retention.expire_at(Granularity::Day, day));
            trip.increments += run.len();
            trip.end_transaction(run);
        }
        trip
    }
}

/// Adds the requests of an applied run to the top-clients counts.
pub fn add_to_top(top: &mut TopCounts, run: &Run) {
    for (key, series) in run {
        let day = Granularity::Day.bucket_start(key.minute);
        let requests = top.entry((day, client_of(key.client()).into())).or_default();
        *requests = requests.saturating_add(series.requests());
    }
}

/// One bucket hash's increments, by dimension.
#[derive(Default)]
struct Fields<'a> {
    total: Counts,
    keys: BTreeMap<&'a str, Counts>,
    routes: BTreeMap<&'a str, Counts>,
}

impl<'a> Fields<'a> {
    fn add(&mut self, key: &'a SeriesKey, counts: &Counts) {
        self.total.add(counts);
        if !key.key_id().is_empty() {
            self.keys.entry(key.key_id()).or_default().add(counts);
        }
        if !key.route().is_empty() {
            self.routes.entry(key.route()).or_default().add(counts);
        }
    }
}

/// Reads a transaction's `EXEC` answer.
fn outcome(exec: Option<&Value>) -> Outcome {
    match exec {
        Some(Value::Array(results)) => match results.iter().find_map(|result| match result {
            Value::ServerError(error) => Some(server_error(error)),
            _ => None,
        }) {
            None => Outcome::Applied,
            Some(error) => Outcome::Refused(error),
        },
        // `EXECABORT`: a command was refused while queueing, none ran.
        Some(Value::ServerError(error)) => Outcome::NotRun(server_error(error)),
        // An aborted transaction (`WATCH`, which the flusher never uses).
        Some(Value::Nil) => Outcome::NotRun("transaction aborted".to_owned()),
        // Cannot happen with a Redis that answers `EXEC` as documented. It
        // may have run: not retried, so it cannot count twice.
        Some(other) => Outcome::Refused(format!("unexpected EXEC answer {other:?}")),
        None => Outcome::Refused("no EXEC answer".to_owned()),
    }
}

/// An error as Redis wrote it: `WRONGTYPE Operation against a key ...`.
fn server_error(error: &redis::ServerError) -> String {
    match error.details() {
        Some(details) => format!("{} {details}", error.code()),
        None => error.code().to_owned(),
    }
}

fn as_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(client: &str, kid: &str, minute: i64, requests: u64) -> (SeriesKey, Series) {
        let counts = Counts { requests, status_2xx: requests, ..Counts::default() };
        (SeriesKey::new(client, kid, "/api", minute), Series::from_counts(&counts, 5))
    }

    /// The commands of a trip as text, one per line.
    fn commands<P>(trip: &Trip<P>) -> Vec<String> {
        trip.pipeline()
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
            .collect()
    }

    fn sorted(mut all: Vec<(SeriesKey, Series)>) -> Peekable<std::vec::IntoIter<(SeriesKey, Series)>> {
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.into_iter().peekable()
    }

    const T: i64 = 1_800_000_000; // 2027-01-15T08:00:00Z

    #[test]
    fn one_series_is_one_transaction_of_three_buckets_and_last_used() {
        let mut source = sorted(vec![series("acme", "k1", T, 3)]);
        let trip =
            Trip::series(&mut source, &UsageKeys::new("kg:"), &Retention::default(), Limits::default());
        let commands = commands(&trip);
        assert_eq!(commands.first().map(String::as_str), Some("MULTI"));
        assert_eq!(commands.last().map(String::as_str), Some("EXEC"));
        let hincrby: Vec<&String> = commands.iter().filter(|c| c.starts_with("HINCRBY")).collect();
        assert_eq!(hincrby.len(), 2 * 3 * 3, "(requests, 2xx) x (total, key, route) x (minute, hour, day)");
        assert!(commands.contains(&"HINCRBY kg:{acme}:usage:hour:2027011508 key:k1:requests 3".to_owned()));
        assert!(
            commands.contains(&"HINCRBY kg:{acme}:usage:day:20270115 route:/api:status_2xx 3".to_owned())
        );
        assert!(commands.contains(&"HINCRBY kg:{acme}:usage:minute:202701150800 requests 3".to_owned()));
        assert_eq!(commands.iter().filter(|c| c.starts_with("EXPIREAT")).count(), 3);
        assert!(commands.contains(&format!("HSET kg:{{acme}}:last_used k1 {}", T + 5)));
        assert!(!commands.iter().any(|c| c.contains("usage:top")), "the global set is written apart");
        assert_eq!((trip.transactions(), trip.increments()), (1, 19));
    }

    #[test]
    fn each_client_gets_its_own_transaction_and_shares_its_totals() {
        let all = vec![
            series("acme", "k1", T, 1),
            series("globex", "k9", T, 4),
            series("acme", "k2", T, 2),
            series("acme", "k2", T + 60, 5), // the next minute: a fourth bucket
        ];
        let mut source = sorted(all);
        let trip =
            Trip::series(&mut source, &UsageKeys::new("kg:"), &Retention::default(), Limits::default());
        assert_eq!(trip.transactions(), 2);
        let commands = commands(&trip);
        let acme: Vec<&String> = commands.iter().skip(1).take_while(|c| c.as_str() != "EXEC").collect();
        assert!(acme.iter().all(|c| c.contains("{acme}")), "{acme:#?}");
        assert!(acme.contains(&&"HINCRBY kg:{acme}:usage:hour:2027011508 requests 8".to_owned()));
        assert!(acme.contains(&&"HINCRBY kg:{acme}:usage:minute:202701150801 key:k2:requests 5".to_owned()));
        assert_eq!(acme.iter().filter(|c| c.starts_with("EXPIREAT")).count(), 4, "2 minutes, 1 hour, 1 day");
        assert!(acme.contains(&&format!("HSET kg:{{acme}}:last_used k1 {} k2 {}", T + 5, T + 65)));
        let outcomes = trip.outcomes(Value::Array(Vec::new()));
        assert_eq!(outcomes[0].0.len(), 3, "acme's three series");
        assert_eq!(outcomes[1].0[0].0.client(), "globex");
    }

    #[test]
    fn a_large_client_is_split_and_round_trips_are_bounded() {
        let all: Vec<_> = (0..100).map(|i| series("acme", &format!("k{i:03}"), T, 1)).collect();
        let limits = Limits { transaction_increments: 100, round_trip_increments: 250 };
        let mut source = sorted(all);
        let keys = UsageKeys::new("kg:");
        let mut trips = Vec::new();
        while source.peek().is_some() {
            trips.push(Trip::series(&mut source, &keys, &Retention::default(), limits));
        }
        // Each series costs 2 x 3 x 3 + 1 = 19: 5 per transaction, 3
        // transactions (285 increments) per round trip.
        assert!(trips.iter().all(|t| t.increments() <= limits.round_trip_increments + 100));
        assert_eq!(trips.iter().map(Trip::transactions).sum::<usize>(), 20);
        assert_eq!(trips.len(), 7);
        let written: usize =
            trips.into_iter().flat_map(|t| t.outcomes(Value::Nil)).map(|(run, _)| run.len()).sum();
        assert_eq!(written, 100, "every series in exactly one transaction");
    }

    #[test]
    fn invalid_and_missing_clients_are_anonymous_without_last_used() {
        let mut source = sorted(vec![series("", "k1", T, 1), series("bad{tag}", "", T, 1)]);
        let trip =
            Trip::series(&mut source, &UsageKeys::new("kg:"), &Retention::default(), Limits::default());
        let commands = commands(&trip);
        assert!(commands.iter().filter(|c| c.starts_with("HINCRBY")).all(|c| c.contains("{_anonymous}")));
        assert!(!commands.iter().any(|c| c.starts_with("HSET")));
    }

    #[test]
    fn top_counts_are_written_per_day() {
        let mut top = TopCounts::new();
        add_to_top(&mut top, &vec![series("acme", "k1", T, 3), series("acme", "k2", T, 4)]);
        add_to_top(&mut top, &vec![series("globex", "k1", T - 86_400, 1), series("", "k1", T, 2)]);
        let trip = Trip::top(&mut top, &UsageKeys::new("kg:"), &Retention::default(), Limits::default());
        assert!(top.is_empty());
        assert_eq!(trip.transactions(), 2, "one per day");
        let commands = commands(&trip);
        assert!(commands.contains(&"ZINCRBY kg:usage:top:20270115 7 acme".to_owned()));
        assert!(commands.contains(&"ZINCRBY kg:usage:top:20270115 2 _anonymous".to_owned()));
        assert!(commands.contains(&"ZINCRBY kg:usage:top:20270114 1 globex".to_owned()));
    }

    #[test]
    fn exec_answers_decide_what_is_retried() {
        let answer = |resp: &str| redis::parse_redis_value(resp.as_bytes()).unwrap();
        assert_eq!(outcome(Some(&answer("*2\r\n:1\r\n:5\r\n"))), Outcome::Applied);
        let partly =
            answer("*2\r\n:1\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n");
        assert!(matches!(outcome(Some(&partly)), Outcome::Refused(e) if e.contains("WRONGTYPE")));
        let aborted = answer("-EXECABORT Transaction discarded because of previous errors.\r\n");
        assert!(matches!(outcome(Some(&aborted)), Outcome::NotRun(e) if e.contains("EXECABORT")));
        assert!(matches!(outcome(Some(&Value::Nil)), Outcome::NotRun(_)));
        assert!(matches!(outcome(Some(&Value::Okay)), Outcome::Refused(_)), "may have run: never twice");
        assert!(matches!(outcome(None), Outcome::Refused(_)));
    }
}
