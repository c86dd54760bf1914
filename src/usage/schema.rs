//! The usage layout in Redis: key names, bucket labels, field names and
//! retention. Everything that decides what a dashboard sees lives here, so
//! the flusher, the query side and `docs/redis-schema.md` agree.
//!
//! With the default prefix `kg:`:
//!
//! | key                                        | type   | holds                                  |
//! |--------------------------------------------|--------|----------------------------------------|
//! | `kg:{<client>}:usage:<gran>:<bucket>`      | hash   | counters of one client in one bucket   |
//! | `kg:usage:top:<YYYYMMDD>`                  | zset   | clients scored by requests that day    |
//! | `kg:{<client>}:last_used`                  | hash   | `<kid>` -> Unix seconds of last use    |
//! | `kg:audit`                                 | stream | key operations (see [`super::audit`])  |
//! | `kg:usage:schema`                          | string | the layout's version, [`SCHEMA_VERSION`] |
//!
//! Since schema 2 a bucket's fields are written by each gateway under its
//! own name, `<field>@<writer>`, holding that gateway's running total (see
//! [`super::ledger`]); readers add the writers up ([`parse_field`] drops the
//! suffix, so adding every field of a name does it). Fields without a
//! suffix are schema 1's (counts added with `HINCRBY`) and add in the same way.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

/// The pseudo-client that requests without a (valid) client are counted
/// under. Client IDs are `[A-Za-z0-9-]`, so `_` cannot collide with one.
pub const ANONYMOUS: &str = "_anonymous";

/// The usage layout's version, written to `kg:usage:schema`. 2: bucket
/// fields carry their writer (`requests@<writer>`), totals per writer.
pub const SCHEMA_VERSION: u32 = 2;

/// The size of a time bucket. Buckets are aligned on UTC.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub const ALL: [Granularity; 3] = [Granularity::Minute, Granularity::Hour, Granularity::Day];

    /// The bucket's length in seconds.
    pub fn seconds(self) -> i64 {
        match self {
            Self::Minute => 60,
            Self::Hour => 3_600,
            Self::Day => 86_400,
        }
    }

    /// The start (Unix seconds) of the bucket holding `unix_secs`.
    pub fn bucket_start(self, unix_secs: i64) -> i64 {
        unix_secs - unix_secs.rem_euclid(self.seconds())
    }

    /// The name used in Redis keys: `minute`, `hour`, `day`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }

    /// The bucket's label in key names: its UTC start as `YYYYMMDDHHMM`
    /// (minute), `YYYYMMDDHH` (hour) or `YYYYMMDD` (day). Sorts like time and
    /// is what `date -u +%Y%m%d%H%M` prints, so dashboards build it easily.
    pub fn label(self, bucket_start: i64) -> String {
        let format = match self {
            Self::Minute => "%Y%m%d%H%M",
            Self::Hour => "%Y%m%d%H",
            Self::Day => "%Y%m%d",
        };
        match Timestamp::from_second(bucket_start) {
            Ok(ts) => ts.to_zoned(TimeZone::UTC).strftime(format).to_string(),
            // Out of jiff's range (year ±9999): cannot come from a real clock.
            Err(_) => bucket_start.to_string(),
        }
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Granularity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "minute" => Ok(Self::Minute),
            "hour" => Ok(Self::Hour),
            "day" => Ok(Self::Day),
            other => Err(format!("`{other}` is not minute, hour or day")),
        }
    }
}

/// How long buckets are kept after they end (Redis `EXPIREAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub minute: Duration,
    pub hour: Duration,
    pub day: Duration,
}

impl Default for Retention {
    /// Minute buckets 48 hours, hour buckets 35 days, day buckets (and the
    /// daily top-clients sets) 400 days.
    fn default() -> Self {
        Self {
            minute: Duration::from_secs(48 * 3_600),
            hour: Duration::from_secs(35 * 86_400),
            day: Duration::from_secs(400 * 86_400),
        }
    }
}

impl Retention {
    pub fn of(&self, granularity: Granularity) -> Duration {
        match granularity {
            Granularity::Minute => self.minute,
            Granularity::Hour => self.hour,
            Granularity::Day => self.day,
        }
    }

    /// When a bucket starting at `bucket_start` expires (Unix seconds): its
    /// end plus the retention. Fixed per bucket, so re-setting it is harmless.
    pub fn expire_at(&self, granularity: Granularity, bucket_start: i64) -> i64 {
        let keep = i64::try_from(self.of(granularity).as_secs()).unwrap_or(i64::MAX / 2);
        bucket_start.saturating_add(granularity.seconds()).saturating_add(keep)
    }
}

/// The counters kept per client, key and route in every bucket. Also the
/// counters the usage report prints: one struct, one list of field names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Counts {
    /// Every request counted: proxied, answered by the gateway, or refused.
    pub requests: u64,
    pub status_2xx: u64,
    pub status_3xx: u64,
    pub status_4xx: u64,
    pub status_5xx: u64,
    /// The gateway's own refusals (subsets of `status_4xx`): missing or bad key.
    pub refused_401: u64,
    /// Valid key without the route's scope.
    pub refused_403: u64,
    /// Rate limit exceeded.
    pub refused_429_rate: u64,
    /// Quota exhausted.
    pub refused_429_quota: u64,
    /// Usage credits exhausted.
    pub refused_429_credits: u64,
    /// Usage credits spent by admitted requests (the routes' costs).
    pub credits: u64,
    /// Request body bytes received from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// Requests that reached an upstream (the divisor for the mean latency).
    pub upstream_requests: u64,
    /// Summed upstream latency in microseconds.
    pub upstream_latency_us: u64,
    /// Summed life of WebSocket tunnels (from the handshake to the close),
    /// in microseconds; each tunnel is also one of `requests`.
    pub tunnel_us: u64,
}

impl Counts {
    /// The counters with their Redis field names, in a fixed order.
    pub fn fields(&self) -> [(&'static str, u64); 16] {
        [
            ("requests", self.requests),
            ("status_2xx", self.status_2xx),
            ("status_3xx", self.status_3xx),
            ("status_4xx", self.status_4xx),
            ("status_5xx", self.status_5xx),
            ("refused_401", self.refused_401),
            ("refused_403", self.refused_403),
            ("refused_429_rate", self.refused_429_rate),
            ("refused_429_quota", self.refused_429_quota),
            ("refused_429_credits", self.refused_429_credits),
            ("credits", self.credits),
            ("bytes_in", self.bytes_in),
            ("bytes_out", self.bytes_out),
            ("upstream_requests", self.upstream_requests),
            ("upstream_latency_us", self.upstream_latency_us),
            ("tunnel_us", self.tunnel_us),
        ]
    }

    /// Adds `value` to the counter named `field`; false for an unknown name
    /// (later versions may add counters; readers ignore them).
    pub fn add_field(&mut self, field: &str, value: u64) -> bool {
        let slot = match field {
            "requests" => &mut self.requests,
            "status_2xx" => &mut self.status_2xx,
            "status_3xx" => &mut self.status_3xx,
            "status_4xx" => &mut self.status_4xx,
            "status_5xx" => &mut self.status_5xx,
            "refused_401" => &mut self.refused_401,
            "refused_403" => &mut self.refused_403,
            "refused_429_rate" => &mut self.refused_429_rate,
            "refused_429_quota" => &mut self.refused_429_quota,
            "refused_429_credits" => &mut self.refused_429_credits,
            "credits" => &mut self.credits,
            "bytes_in" => &mut self.bytes_in,
            "bytes_out" => &mut self.bytes_out,
            "upstream_requests" => &mut self.upstream_requests,
            "upstream_latency_us" => &mut self.upstream_latency_us,
            "tunnel_us" => &mut self.tunnel_us,
            _ => return false,
        };
        *slot = slot.saturating_add(value);
        true
    }

    /// Adds `other` counter by counter (saturating). Field by field rather
    /// than through the names: the flusher adds every series nine times.
    pub fn add(&mut self, other: &Counts) {
        let Counts {
            requests,
            status_2xx,
            status_3xx,
            status_4xx,
            status_5xx,
            refused_401,
            refused_403,
            refused_429_rate,
            refused_429_quota,
            refused_429_credits,
            credits,
            bytes_in,
            bytes_out,
            upstream_requests,
            upstream_latency_us,
            tunnel_us,
        } = *other;
        let add = |slot: &mut u64, value: u64| *slot = slot.saturating_add(value);
        add(&mut self.requests, requests);
        add(&mut self.status_2xx, status_2xx);
        add(&mut self.status_3xx, status_3xx);
        add(&mut self.status_4xx, status_4xx);
        add(&mut self.status_5xx, status_5xx);
        add(&mut self.refused_401, refused_401);
        add(&mut self.refused_403, refused_403);
        add(&mut self.refused_429_rate, refused_429_rate);
        add(&mut self.refused_429_quota, refused_429_quota);
        add(&mut self.refused_429_credits, refused_429_credits);
        add(&mut self.credits, credits);
        add(&mut self.bytes_in, bytes_in);
        add(&mut self.bytes_out, bytes_out);
        add(&mut self.upstream_requests, upstream_requests);
        add(&mut self.upstream_latency_us, upstream_latency_us);
        add(&mut self.tunnel_us, tunnel_us);
    }

    /// How many counters are not zero: the `HINCRBY`s one dimension of
    /// these counts costs in one bucket.
    pub fn nonzero(&self) -> usize {
        self.fields().iter().filter(|(_, value)| *value > 0).count()
    }

    /// Mean upstream latency in microseconds, if any request reached one.
    pub fn mean_latency_us(&self) -> Option<u64> {
        self.upstream_latency_us.checked_div(self.upstream_requests)
    }
}

/// A hash field's dimension: the client total, one key, or one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dimension<'a> {
    Total,
    Key(&'a str),
    Route(&'a str),
}

/// The field name of `metric` in `dimension`: `requests`,
/// `key:<kid>:requests`, `route:<route>:requests`.
pub fn field(dimension: &Dimension<'_>, metric: &str) -> String {
    let mut name = String::new();
    write_field(&mut name, dimension, metric);
    name
}

/// [`field`] into a reusable buffer (cleared first): the flusher names
/// hundreds of thousands of fields per flush without allocating each.
pub fn write_field(name: &mut String, dimension: &Dimension<'_>, metric: &str) {
    name.clear();
    match dimension {
        Dimension::Total => {}
        Dimension::Key(kid) => {
            name.push_str("key:");
            name.push_str(kid);
            name.push(':');
        }
        Dimension::Route(route) => {
            name.push_str("route:");
            name.push_str(route);
            name.push(':');
        }
    }
    name.push_str(metric);
}

/// Splits a field name into its dimension and metric. The metric is after
/// the last `:` (routes may contain `:`, metrics never do).
pub fn parse_field(name: &str) -> (Dimension<'_>, &str) {
    let name = without_writer(name);
    match name.rsplit_once(':') {
        None => (Dimension::Total, name),
        Some((dimension, metric)) => match dimension.split_once(':') {
            Some(("key", kid)) => (Dimension::Key(kid), metric),
            Some(("route", route)) => (Dimension::Route(route), metric),
            _ => (Dimension::Total, name),
        },
    }
}

/// A field name without its writer (`requests@Xy3k9Q.0` -> `requests`).
/// Counter names never hold `@` and writers never hold `:`, so the writer is
/// what follows the last `@` when no `:` follows it; a route prefix holding
/// `@` (`route:/a@b:requests`) is left whole.
pub fn without_writer(name: &str) -> &str {
    match name.rsplit_once('@') {
        Some((field, writer)) if !writer.contains(':') => field,
        _ => name,
    }
}

/// Client IDs as the key format allows them: `[A-Za-z0-9-]{1,64}`. Anything
/// else (braces would break the Cluster hash tag) is counted as anonymous.
pub fn valid_client(client: &str) -> bool {
    !client.is_empty() && client.len() <= 64 && client.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Builds every usage key name, so the layout lives in one place.
#[derive(Debug, Clone)]
pub struct UsageKeys {
    prefix: String,
}

impl UsageKeys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `kg:{<client>}:usage:<gran>:<label>`
    pub fn bucket(&self, client: &str, granularity: Granularity, bucket_start: i64) -> String {
        format!("{}{{{client}}}:usage:{granularity}:{}", self.prefix, granularity.label(bucket_start))
    }

    /// `kg:usage:top:<YYYYMMDD>`
    pub fn top_clients(&self, day_start: i64) -> String {
        format!("{}usage:top:{}", self.prefix, Granularity::Day.label(day_start))
    }

    /// `kg:{<client>}:last_used`
    pub fn last_used(&self, client: &str) -> String {
        format!("{}{{{client}}}:last_used", self.prefix)
    }

    /// `kg:usage:schema`
    pub fn schema_version(&self) -> String {
        format!("{}usage:schema", self.prefix)
    }

    /// `kg:audit`
    pub fn audit(&self) -> String {
        format!("{}audit", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_labels_are_utc_and_aligned() {
        let t = "2026-11-24T12:02:03Z".parse::<Timestamp>().unwrap().as_second();
        assert_eq!(Granularity::Minute.label(Granularity::Minute.bucket_start(t)), "202611241202");
        assert_eq!(Granularity::Hour.label(Granularity::Hour.bucket_start(t)), "2026112412");
        assert_eq!(Granularity::Day.label(Granularity::Day.bucket_start(t)), "20261124");
        assert_eq!(Granularity::Minute.bucket_start(-1), -60, "floors before the epoch too");
    }

    #[test]
    fn key_names_use_the_client_hash_tag() {
        let keys = UsageKeys::new("kg:");
        let day = "2026-11-24T00:00:00Z".parse::<Timestamp>().unwrap().as_second();
        assert_eq!(keys.bucket("acme", Granularity::Day, day), "kg:{acme}:usage:day:20261124");
        assert_eq!(keys.top_clients(day), "kg:usage:top:20261124");
        assert_eq!(keys.last_used("acme"), "kg:{acme}:last_used");
        assert_eq!(keys.audit(), "kg:audit");
    }

    #[test]
    fn fields_round_trip() {
        for dimension in [Dimension::Total, Dimension::Key("k7Qm2x"), Dimension::Route("/api/v1:x")] {
            let name = field(&dimension, "bytes_in");
            assert_eq!(parse_field(&name), (dimension, "bytes_in"), "{name}");
        }
        for (written, read) in [
            ("requests@Xy3k9Q.0", (Dimension::Total, "requests")),
            ("key:k1:bytes_in@Xy3k9Q.12", (Dimension::Key("k1"), "bytes_in")),
            ("route:/a@b:requests@W.1", (Dimension::Route("/a@b"), "requests")),
            ("route:/a@b:requests", (Dimension::Route("/a@b"), "requests")),
        ] {
            assert_eq!(parse_field(written), read, "{written}");
        }
        let mut reused = String::from("leftover");
        write_field(&mut reused, &Dimension::Route("/a"), "requests");
        assert_eq!(reused, "route:/a:requests");
        let mut counts = Counts::default();
        assert!(counts.add_field("refused_403", 2));
        assert!(!counts.add_field("colour", 1));
        assert_eq!(counts.fields()[6], ("refused_403", 2));
    }

    #[test]
    fn counts_add_up_field_by_field() {
        let mut a = Counts { requests: 2, bytes_out: u64::MAX - 1, ..Counts::default() };
        let b =
            Counts { requests: 3, status_5xx: 1, bytes_out: 5, upstream_latency_us: 7, ..Counts::default() };
        a.add(&b);
        assert_eq!((a.requests, a.status_5xx, a.upstream_latency_us), (5, 1, 7));
        assert_eq!(a.bytes_out, u64::MAX, "saturates");
        assert_eq!(a.nonzero(), 4);
        // The same as adding through the names, for every field.
        let mut by_name = Counts::default();
        for (i, (name, _)) in Counts::default().fields().iter().enumerate() {
            by_name.add_field(name, i as u64 + 1);
        }
        let mut direct = Counts::default();
        direct.add(&by_name);
        assert_eq!(direct, by_name);
    }

    #[test]
    fn retention_counts_from_the_bucket_end() {
        let r = Retention::default();
        assert_eq!(r.expire_at(Granularity::Minute, 600), 660 + 48 * 3_600);
        assert_eq!(r.expire_at(Granularity::Day, 0), 86_400 + 400 * 86_400);
    }
}
