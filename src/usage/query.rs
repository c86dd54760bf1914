//! Reading usage back: [`query`] (for `keygate usage` and the admin API) and
//! [`last_used`] / [`last_used_of`] (for `keys list/show`, CLI and admin API).
//!
//! A query reads the buckets of one granularity between `since` and `until`.
//! Without a client it finds the clients from the daily top-clients sets of
//! the days in range, so it reads no key it does not need (no `SCAN`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use std::time::Duration;

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde::Serialize;

use super::UsageError;
use super::schema::{ANONYMOUS, Counts, Dimension, Granularity, UsageKeys, parse_field, valid_client};
use crate::key::KeyId;
use crate::store::KeyRecord;

/// `--since`, kept relative until the command's `now` is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    Ago(Duration),
    At(Timestamp),
}

impl Since {
    pub fn resolve(self, now: Timestamp) -> Result<Timestamp, String> {
        match self {
            Self::At(at) => Ok(at),
            Self::Ago(ago) => {
                let ago = jiff::SignedDuration::try_from(ago).map_err(|e| e.to_string())?;
                now.checked_sub(ago).map_err(|e| e.to_string())
            }
        }
    }
}

/// Parses `--since` / `?since=`: a duration ago, a date (UTC midnight) or an RFC 3339 time.
pub fn since_flag(s: &str) -> Result<Since, String> {
    if let Ok(ago) = humantime::parse_duration(s) {
        return Ok(Since::Ago(ago));
    }
    if let Ok(at) = s.parse::<Timestamp>() {
        return Ok(Since::At(at));
    }
    s.parse::<Date>()
        .ok()
        .and_then(|date| date.to_zoned(TimeZone::UTC).ok())
        .map(|zoned| Since::At(zoned.timestamp()))
        .ok_or_else(|| "expected a duration (1h, 7d) or a date (2026-11-01) or RFC 3339 time".to_owned())
}

/// Parses `--client` / `?client=`: a client ID, or the anonymous bucket's name.
pub fn client_flag(s: &str) -> Result<String, String> {
    if s == ANONYMOUS {
        return Ok(s.to_owned());
    }
    crate::key::validate_client_id(s).map(|()| s.to_owned()).map_err(|e| e.to_string())
}

/// The most buckets one query may read per client (e.g. 7 days by minute is
/// 10 080): keeps a typo like `--since 2020-01-01 --by minute` cheap.
pub const MAX_BUCKETS: i64 = 20_000;

/// What to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    /// One client, or every client seen in the range.
    pub client: Option<String>,
    pub since: Timestamp,
    pub until: Timestamp,
    pub by: Granularity,
}

/// Usage in a time range: totals, then per client (with per key, per route
/// and per bucket breakdowns). Serialised as the `--json` output and the
/// admin API's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct UsageReport {
    /// Start of the first bucket read (`since`, rounded down to a bucket).
    #[schema(value_type = String, format = DateTime)]
    pub since: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub until: Timestamp,
    pub by: Granularity,
    /// Every client's counts added up.
    pub totals: Counts,
    /// Clients with any usage in range, most requests first.
    pub clients: Vec<ClientUsage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ClientUsage {
    pub client: String,
    pub totals: Counts,
    /// By key ID (`<client>.<kid>`).
    pub keys: BTreeMap<String, Counts>,
    /// By route path prefix.
    pub routes: BTreeMap<String, Counts>,
    /// Buckets with any usage, oldest first.
    pub buckets: Vec<BucketUsage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BucketUsage {
    /// The bucket's start (UTC).
    #[schema(value_type = String, format = DateTime)]
    pub start: Timestamp,
    #[serde(flatten)]
    pub counts: Counts,
    /// Requests in this bucket by route path prefix, for charts over time
    /// (the client's `routes` has every counter, for the whole range).
    pub route_requests: BTreeMap<String, u64>,
}

/// Reads usage from Redis (see `docs/redis-schema.md`, "Usage"): one
/// pipeline for the clients (unless given), one `HGETALL` pipeline per client.
pub async fn query(
    conn: &mut impl redis::aio::ConnectionLike,
    prefix: &str,
    q: &UsageQuery,
) -> Result<UsageReport, UsageError> {
    let keys = UsageKeys::new(prefix);
    let first = q.by.bucket_start(q.since.as_second());
    let last = q.by.bucket_start(q.until.as_second());
    if last < first {
        return Err(UsageError::Invalid(format!("since ({}) is after until ({})", q.since, q.until)));
    }
    let count = (last - first) / q.by.seconds() + 1;
    if count > MAX_BUCKETS {
        return Err(UsageError::Invalid(format!(
            "{count} {}s in range (at most {MAX_BUCKETS}); use a later --since or a coarser --by",
            q.by
        )));
    }
    let starts: Vec<i64> = (0..count).map(|i| first + i * q.by.seconds()).collect();

    let clients: Vec<String> = match &q.client {
        Some(client) if !valid_client(client) && client != super::ANONYMOUS => {
            return Err(UsageError::Invalid(format!("`{client}` is not a client ID")));
        }
        Some(client) => vec![client.clone()],
        None => {
            let day = Granularity::Day;
            let mut pipe = redis::pipe();
            let (first_day, last_day) = (day.bucket_start(first), day.bucket_start(last));
            for start in (first_day..=last_day).step_by(86_400) {
                pipe.cmd("ZRANGE").arg(keys.top_clients(start)).arg(0).arg(-1);
            }
            let days: Vec<Vec<String>> = pipe.query_async(conn).await.map_err(redis_error)?;
            days.into_iter().flatten().collect::<BTreeSet<_>>().into_iter().collect()
        }
    };

    let mut report = UsageReport {
        since: timestamp(first),
        until: q.until,
        by: q.by,
        totals: Counts::default(),
        clients: Vec::new(),
    };
    for client in clients {
        let mut pipe = redis::pipe();
        for &start in &starts {
            pipe.cmd("HGETALL").arg(keys.bucket(&client, q.by, start));
        }
        let hashes: Vec<HashMap<String, u64>> = pipe.query_async(conn).await.map_err(redis_error)?;
        let usage = client_usage(client, &starts, &hashes);
        if usage.totals.requests > 0 || !usage.buckets.is_empty() {
            report.totals.add(&usage.totals);
            report.clients.push(usage);
        }
    }
    report.clients.sort_by(|a, b| b.totals.requests.cmp(&a.totals.requests).then(a.client.cmp(&b.client)));
    Ok(report)
}

fn client_usage(client: String, starts: &[i64], hashes: &[HashMap<String, u64>]) -> ClientUsage {
    let mut usage = ClientUsage {
        client,
        totals: Counts::default(),
        keys: BTreeMap::new(),
        routes: BTreeMap::new(),
        buckets: Vec::new(),
    };
    for (&start, fields) in starts.iter().zip(hashes) {
        if fields.is_empty() {
            continue;
        }
        let mut bucket = Counts::default();
        let mut route_requests = BTreeMap::new();
        for (name, &value) in fields {
            match parse_field(name) {
                (Dimension::Total, metric) => {
                    bucket.add_field(metric, value);
                }
                (Dimension::Key(kid), metric) => {
                    let id = format!("{}.{kid}", usage.client);
                    usage.keys.entry(id).or_default().add_field(metric, value);
                }
                (Dimension::Route(route), metric) => {
                    usage.routes.entry(route.to_owned()).or_default().add_field(metric, value);
                    if metric == "requests" {
                        *route_requests.entry(route.to_owned()).or_default() += value;
                    }
                }
            }
        }
        usage.totals.add(&bucket);
        usage.buckets.push(BucketUsage { start: timestamp(start), counts: bucket, route_requests });
    }
    usage
}

/// When `id` was last used, as the flushes saw it (approximate: up to one
/// flush interval behind); `None` if it never was.
pub async fn last_used(
    conn: &mut impl redis::aio::ConnectionLike,
    prefix: &str,
    id: &KeyId,
) -> Result<Option<Timestamp>, UsageError> {
    let key = UsageKeys::new(prefix).last_used(id.client());
    let secs: Option<i64> =
        redis::cmd("HGET").arg(key).arg(id.kid()).query_async(conn).await.map_err(redis_error)?;
    Ok(secs.and_then(|s| Timestamp::from_second(s).ok()))
}

/// `last_used` of `records` by key ID, for `keys list/show` and the admin
/// API's key records: one `HGETALL` per client, in one pipeline. Best
/// effort: an empty map if Redis cannot say (a listing does not fail for it).
pub async fn last_used_of(
    conn: &mut impl redis::aio::ConnectionLike,
    prefix: &str,
    records: &[KeyRecord],
) -> HashMap<KeyId, Timestamp> {
    let keys = UsageKeys::new(prefix);
    let clients: Vec<&str> =
        records.iter().map(KeyRecord::client).collect::<BTreeSet<_>>().into_iter().collect();
    let mut found = HashMap::new();
    if clients.is_empty() {
        return found;
    }
    let mut pipe = redis::pipe();
    for client in &clients {
        pipe.cmd("HGETALL").arg(keys.last_used(client));
    }
    let hashes: Vec<HashMap<String, i64>> = match pipe.query_async(conn).await {
        Ok(hashes) => hashes,
        Err(error) => {
            tracing::debug!(error = %crate::redis_target::explain(&error), "last_used not read");
            return found;
        }
    };
    let by_client: HashMap<&str, HashMap<String, i64>> = clients.into_iter().zip(hashes).collect();
    for record in records {
        let secs = by_client.get(record.client()).and_then(|kids| kids.get(record.id.kid()));
        if let Some(at) = secs.and_then(|&s| Timestamp::from_second(s).ok()) {
            found.insert(record.id.clone(), at);
        }
    }
    found
}

fn timestamp(secs: i64) -> Timestamp {
    Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH)
}

pub(super) fn redis_error(error: redis::RedisError) -> UsageError {
    UsageError::Redis(crate::redis_target::explain(&error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_dates_and_times() {
        let now: Timestamp = "2026-11-24T12:00:00Z".parse().unwrap();
        assert_eq!(since_flag("1h").unwrap().resolve(now).unwrap().to_string(), "2026-11-24T11:00:00Z");
        assert_eq!(
            since_flag("2026-11-01").unwrap().resolve(now).unwrap().to_string(),
            "2026-11-01T00:00:00Z"
        );
        let at = since_flag("2026-11-01T06:30:00Z").unwrap().resolve(now).unwrap();
        assert_eq!(at.to_string(), "2026-11-01T06:30:00Z");
        assert!(since_flag("yesterday-ish").is_err());
    }
}
