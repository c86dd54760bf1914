//! The Redis commands of a flush: one `HSET` per client and bucket, carrying
//! every field of this gateway's totals (see [`super::ledger`] for why
//! totals), plus `last_used` and the top-clients sets.
//!
//! - A client's bucket is one `HSET` of all its fields: atomic on its own,
//!   so no `MULTI` is needed, and idempotent, so a command whose reply was
//!   lost is simply written again. Nothing here can count twice.
//! - Each key carries its client's hash tag; a bucket's `EXPIREAT` follows
//!   its first `HSET` from this gateway only (the same value whoever sets
//!   it). The top-clients sets are global keys, one per day; `ZINCRBY`
//!   adds the requests since the last write, so a reply lost in flight may
//!   count those twice there (the sets rank clients; the hashes are the
//!   exact totals).
//! - Commands travel in pipelines of about [`Limits::round_trip_fields`]
//!   fields, one in flight at a time, so memory stays bounded whatever a
//!   flush's size; on Redis Cluster the connection splits a pipeline per
//!   slot (`src/store/slots.rs`).

use std::collections::HashMap;

use redis::Value;

use super::ledger::{BucketId, ClientTotals};
use super::schema::{Counts, Dimension, Granularity, Retention, SCHEMA_VERSION, UsageKeys, write_field};

/// Size bounds of the writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The fields after which a round trip takes no further command (so it
    /// may pass this by one client's bucket).
    pub round_trip_fields: usize,
}

impl Default for Limits {
    /// 8 192 fields are some 400 KiB of commands, 2 to 5 ms of Redis time.
    fn default() -> Self {
        Self { round_trip_fields: 8_192 }
    }
}

/// What one command of a round trip writes, to mark it done (or put it
/// back) once the reply is in.
#[derive(Debug)]
pub enum Item {
    /// A client's totals in one bucket (they stay in the ledger).
    Bucket { bucket: BucketId, client: Box<str> },
    /// A client's latest uses, taken out of the ledger.
    LastUsed { client: Box<str>, used: HashMap<Box<str>, i64> },
    /// Requests to add to a day's top-clients set, taken out of the ledger.
    Top { day: i64, client: Box<str>, requests: u64 },
    /// The layout's version.
    Schema,
}

/// What became of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Redis refused it for its content (`WRONGTYPE`: a usage key holds
    /// another type): retrying would fail the same way.
    Refused(String),
    /// It did not run (out of memory, a read-only replica, a moved slot):
    /// written again on the next flush.
    NotRun(String),
}

/// One round trip: a pipeline of commands, each with what it writes.
pub struct Trip {
    pipe: redis::Pipeline,
    /// Commands in `pipe` so far: where the next reply will be.
    commands: usize,
    /// Each item with where its command's reply is, and its bucket's
    /// `EXPIREAT`'s, if sent.
    items: Vec<(usize, Option<usize>, Item)>,
    fields: usize,
    /// Days whose top-clients set has its `EXPIREAT` in this trip.
    top_days: Vec<i64>,
}

impl Default for Trip {
    fn default() -> Self {
        Self::new()
    }
}

impl Trip {
    pub fn new() -> Self {
        let mut pipe = redis::pipe();
        // Every reply comes back, errors included, so each command's fate
        // can be read on its own.
        pipe.ignore_errors();
        Self { pipe, commands: 0, items: Vec::new(), fields: 0, top_days: Vec::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Fields (and members) written so far: the measure of a trip's size.
    pub fn fields(&self) -> usize {
        self.fields
    }

    /// Commands in the pipeline.
    pub fn commands(&self) -> usize {
        self.commands
    }

    pub fn pipeline(&self) -> &redis::Pipeline {
        &self.pipe
    }

    /// `HSET <bucket> <field>@<writer> <total> ...` with every non-zero
    /// counter of the client's total, keys and routes, then the bucket's
    /// `EXPIREAT` unless this gateway set it already.
    pub fn push_bucket(
        &mut self,
        keys: &UsageKeys,
        retention: &Retention,
        (bucket, client): (BucketId, &str),
        totals: &ClientTotals,
        writer: &str,
    ) {
        let (granularity, start) = bucket;
        let key = keys.bucket(client, granularity, start);
        let mut cmd = redis::cmd("HSET");
        cmd.arg(&key);
        let mut name = String::new();
        let mut fields = 0;
        let mut put = |dimension: &Dimension<'_>, counts: &Counts| {
            for (metric, value) in counts.fields() {
                if value > 0 {
                    write_field(&mut name, dimension, metric);
                    name.push('@');
                    name.push_str(writer);
                    cmd.arg(name.as_str()).arg(as_i64(value));
                    fields += 1;
                }
            }
        };
        put(&Dimension::Total, &totals.total.counts());
        for (kid, series) in &totals.keys {
            put(&Dimension::Key(kid), &series.counts());
        }
        for (route, series) in &totals.routes {
            put(&Dimension::Route(route), &series.counts());
        }
        if fields == 0 {
            // Nothing counted (cannot happen: every series has a request);
            // an `HSET` without fields would be an error.
            cmd.arg("requests@".to_owned() + writer).arg(0);
            fields = 1;
        }
        self.add(cmd, Item::Bucket { bucket, client: client.into() }, fields);
        if !totals.expiry_set {
            self.pipe.cmd("EXPIREAT").arg(&key).arg(retention.expire_at(granularity, start));
            if let Some(last) = self.items.last_mut() {
                last.1 = Some(self.commands);
            }
            self.commands += 1;
        }
    }

    /// `HSET kg:{<client>}:last_used <kid> <unix secs> ...`
    pub fn push_last_used(&mut self, keys: &UsageKeys, client: Box<str>, used: HashMap<Box<str>, i64>) {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(keys.last_used(&client));
        for (kid, at) in &used {
            cmd.arg(&**kid).arg(*at);
        }
        let fields = used.len();
        self.add(cmd, Item::LastUsed { client, used }, fields);
    }

    /// `ZINCRBY kg:usage:top:<day> <requests> <client>` and the set's expiry.
    pub fn push_top(
        &mut self,
        keys: &UsageKeys,
        retention: &Retention,
        day: i64,
        client: Box<str>,
        requests: u64,
    ) {
        let key = keys.top_clients(day);
        let mut cmd = redis::cmd("ZINCRBY");
        cmd.arg(&key).arg(as_i64(requests)).arg(&*client);
        self.add(cmd, Item::Top { day, client, requests }, 1);
        if !self.top_days.contains(&day) {
            self.top_days.push(day);
            self.pipe.cmd("EXPIREAT").arg(&key).arg(retention.expire_at(Granularity::Day, day));
            self.commands += 1;
        }
    }

    /// `SET kg:usage:schema 2`
    pub fn push_schema(&mut self, keys: &UsageKeys) {
        let mut cmd = redis::cmd("SET");
        cmd.arg(keys.schema_version()).arg(SCHEMA_VERSION);
        self.add(cmd, Item::Schema, 1);
    }

    fn add(&mut self, cmd: redis::Cmd, item: Item, fields: usize) {
        self.pipe.add_command(cmd);
        self.items.push((self.commands, None, item));
        self.commands += 1;
        self.fields += fields;
    }

    /// Pairs each item with what became of its command, and whether its
    /// bucket now expires (its `EXPIREAT` went in, or was not needed), from
    /// the pipeline's replies (one per command, as `ignore_errors` returns them).
    pub fn outcomes(self, replies: Value) -> Vec<(Item, Outcome, bool)> {
        let replies = match replies {
            Value::Array(replies) => replies,
            other => vec![other],
        };
        self.items
            .into_iter()
            .map(|(at, expiry, item)| {
                let expires = expiry.is_none_or(|at| outcome(replies.get(at)) == Outcome::Applied);
                (item, outcome(replies.get(at)), expires)
            })
            .collect()
    }

    /// Every item, for a round trip whose replies were lost.
    pub fn items(self) -> impl Iterator<Item = Item> {
        self.items.into_iter().map(|(_, _, item)| item)
    }
}

/// Reads one command's reply.
fn outcome(reply: Option<&Value>) -> Outcome {
    match reply {
        Some(Value::ServerError(error)) if error.code() == "WRONGTYPE" => {
            Outcome::Refused(server_error(error))
        }
        Some(Value::ServerError(error)) => Outcome::NotRun(server_error(error)),
        Some(_) => Outcome::Applied,
        None => Outcome::NotRun("no reply".to_owned()),
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
    use crate::usage::ledger::Ledger;
    use crate::usage::recorder::{Batch, Series, SeriesKey};

    /// The commands of a trip as text, one per line.
    fn commands(trip: &Trip) -> Vec<String> {
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

    const T: i64 = 1_800_000_000; // 2027-01-15T08:00:00Z

    fn ledger(items: &[(&str, &str, u64)]) -> Ledger {
        let mut ledger = Ledger::with_writer("w", 1000);
        let batch: Batch = items
            .iter()
            .map(|(client, kid, requests)| {
                let counts = Counts { requests: *requests, status_2xx: *requests, ..Counts::default() };
                (SeriesKey::new(client, kid, "/api", T), Series::from_counts(&counts, 5))
            })
            .collect();
        ledger.add(batch);
        ledger
    }

    #[test]
    fn a_clients_bucket_is_one_hset_of_every_field_under_the_writer_then_its_expiry() {
        let ledger = ledger(&[("acme", "k1", 3), ("acme", "k2", 4)]);
        let bucket = (Granularity::Hour, T);
        let mut trip = Trip::new();
        let keys = UsageKeys::new("kg:");
        trip.push_bucket(
            &keys,
            &Retention::default(),
            (bucket, "acme"),
            ledger.totals(bucket, "acme").unwrap(),
            "w.0",
        );
        let commands = commands(&trip);
        assert_eq!(commands.len(), 2, "{commands:#?}");
        let hset = &commands[0];
        assert!(hset.starts_with("HSET kg:{acme}:usage:hour:2027011508 "), "{hset}");
        for field in
            ["requests@w.0 7", "status_2xx@w.0 7", "key:k2:requests@w.0 4", "route:/api:status_2xx@w.0 7"]
        {
            assert!(hset.contains(field), "{field} in {hset}");
        }
        assert_eq!(trip.fields(), 2 * 4, "(requests, 2xx) x (total, k1, k2, route)");
        assert_eq!(
            commands[1],
            format!("EXPIREAT kg:{{acme}}:usage:hour:2027011508 {}", T + 3_600 + 35 * 86_400)
        );
    }

    #[test]
    fn an_expiry_once_set_is_not_sent_again() {
        let mut ledger = ledger(&[("acme", "k1", 1)]);
        let bucket = (Granularity::Minute, T);
        ledger.mark_written(bucket, "acme", true);
        let mut trip = Trip::new();
        trip.push_bucket(
            &UsageKeys::new("kg:"),
            &Retention::default(),
            (bucket, "acme"),
            ledger.totals(bucket, "acme").unwrap(),
            "w.0",
        );
        assert_eq!(trip.commands(), 1);
    }

    #[test]
    fn last_used_top_and_schema() {
        let keys = UsageKeys::new("kg:");
        let mut trip = Trip::new();
        trip.push_last_used(&keys, "acme".into(), [("k1".into(), T + 5)].into_iter().collect());
        trip.push_top(&keys, &Retention::default(), T - T % 86_400, "acme".into(), 7);
        trip.push_schema(&keys);
        let commands = commands(&trip);
        assert_eq!(commands[0], format!("HSET kg:{{acme}}:last_used k1 {}", T + 5));
        assert_eq!(commands[1], "ZINCRBY kg:usage:top:20270115 7 acme");
        assert!(commands[2].starts_with("EXPIREAT kg:usage:top:20270115 "));
        assert_eq!(commands[3], "SET kg:usage:schema 2");
        assert_eq!(trip.outcomes(Value::Array(Vec::new())).len(), 3);
    }

    #[test]
    fn replies_decide_what_is_written_again() {
        let answer = |resp: &str| redis::parse_redis_value(resp.as_bytes()).unwrap();
        assert_eq!(outcome(Some(&answer(":5\r\n"))), Outcome::Applied);
        let wrong = answer("-WRONGTYPE Operation against a key holding the wrong kind of value\r\n");
        assert!(matches!(outcome(Some(&wrong)), Outcome::Refused(e) if e.contains("WRONGTYPE")));
        let oom = answer("-OOM command not allowed when used memory > 'maxmemory'.\r\n");
        assert!(matches!(outcome(Some(&oom)), Outcome::NotRun(e) if e.starts_with("OOM")));
        assert!(matches!(outcome(None), Outcome::NotRun(_)));
    }
}
