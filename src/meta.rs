//! A key's scope metadata: what the key may reach and how much.
//!
//! Lives with the key in the store and is never trusted from the client.
//! Operators write it with explicit CLI flags or with the seed notes' query
//! syntax (`--meta "scope=read-write&rate_limit=1000"`); both end up as a
//! [`MetaChanges`] applied to a [`KeyMeta`].

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::key::KeyId;

/// Everything a store keeps about a key besides its identity and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyMeta {
    /// Scopes granted: `read`, `write`, `read-write`, or named ones like `orders:write`.
    pub scopes: Vec<String>,
    /// Sustained request rate, e.g. `100/s`; `None` means unlimited.
    pub rate: Option<Rate>,
    /// Requests allowed at once above the sustained rate; defaults to the rate's count.
    pub burst: Option<NonZeroU32>,
    /// Total requests per window, e.g. `10000/day`; `None` means no quota.
    pub quota: Option<Quota>,
    /// After this instant the key is refused.
    pub expires_at: Option<Timestamp>,
    /// Free text for operators ("mobile app prod").
    pub label: Option<String>,
    pub status: KeyStatus,
    pub created_at: Timestamp,
    /// When this key was last rotated (it is then the old key, living out its grace).
    pub rotated_at: Option<Timestamp>,
    /// Usage credits (`--uses 1000`): a number of uses spent by admitted
    /// requests (the route's cost each), optionally refilled per window.
    /// `None`: unmetered. The count left lives with the credit authority
    /// (`limit::credits`), not here.
    pub credits: Option<CreditGrant>,
    /// The key ID whose counters this key spends (its quota, rate and
    /// credits): set by a rotation to the old key's counter identity, so the
    /// old and the new key share one budget, during the grace and after.
    /// `None` means the key's own ID. Always a key of the same client.
    pub counts_as: Option<KeyId>,
}

/// The scope of a key issued without any (CLI `--scopes` omitted, admin API
/// body without `scopes`): `read`, least privilege. Writing needs asking for.
pub const DEFAULT_SCOPE: &str = "read";

impl KeyMeta {
    /// Fresh metadata for a key issued now: scope [`DEFAULT_SCOPE`], no
    /// limits. Times are kept to whole seconds, as the Redis layout stores them.
    pub fn new(now: Timestamp) -> Self {
        let now = whole_seconds(now);
        Self {
            scopes: vec![DEFAULT_SCOPE.to_owned()],
            rate: None,
            burst: None,
            quota: None,
            expires_at: None,
            label: None,
            status: KeyStatus::Active,
            created_at: now,
            rotated_at: None,
            credits: None,
            counts_as: None,
        }
    }

    /// Whether the key may be used at `now` (active and not expired).
    pub fn is_usable_at(&self, now: Timestamp) -> bool {
        self.status == KeyStatus::Active && self.expires_at.is_none_or(|at| now < at)
    }
}

/// `at` without its fraction of a second: stores keep Unix seconds, so a
/// record read back compares equal to the one written.
pub fn whole_seconds(at: Timestamp) -> Timestamp {
    Timestamp::from_second(at.as_second()).unwrap_or(at)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Revoked,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
        }
    }
}

impl FromStr for KeyStatus {
    type Err = MetaError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(Self::Active),
            "revoked" => Ok(Self::Revoked),
            _ => Err(MetaError::new("status", s, "expected `active` or `revoked`")),
        }
    }
}

// === Rate ===

/// A sustained rate: `count` requests per `period`. Written `100/s`, `1000/min`,
/// `5000/h`, `20000/day`, or `10/30s`; a bare number means per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub period: Duration,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, period_to_str(self.period))
    }
}

impl FromStr for Rate {
    type Err = MetaError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| MetaError::new("rate", s, why);
        let (count, period) = match s.split_once('/') {
            Some((count, period)) => (
                count,
                parse_period(period).ok_or_else(|| bad("unknown period; use s, min, h, day or e.g. 30s"))?,
            ),
            None => (s, Duration::from_secs(1)),
        };
        let count: u32 = count.trim().parse().map_err(|_| bad("count must be a whole number"))?;
        let count = NonZeroU32::new(count).ok_or_else(|| bad("count must be at least 1"))?;
        Ok(Self { count, period })
    }
}

// === Quota ===

/// A budget of requests per window, counted in the store, e.g. `10000/day`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub count: u64,
    pub window: QuotaWindow,
}

/// How a quota's window resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaWindow {
    /// Calendar day, UTC; resets at midnight.
    Day,
    /// Calendar month, UTC; resets on the 1st.
    Month,
    /// A fixed-length window of this duration, aligned to the Unix epoch;
    /// resets at each boundary.
    Every(Duration),
    /// A sliding window: at any moment, the requests of the last `Duration`
    /// count. Written `10000/rolling-30d`.
    Rolling(Duration),
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.window {
            QuotaWindow::Day => write!(f, "{}/day", self.count),
            QuotaWindow::Month => write!(f, "{}/month", self.count),
            QuotaWindow::Every(d) => write!(f, "{}/{}", self.count, period_to_str(d)),
            QuotaWindow::Rolling(d) => write!(f, "{}/rolling-{}", self.count, rolling_period_to_str(d)),
        }
    }
}

impl FromStr for Quota {
    type Err = MetaError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| MetaError::new("quota", s, why);
        let (count, window) =
            s.split_once('/').ok_or_else(|| bad("expected COUNT/WINDOW, e.g. 10000/day or 100000/month"))?;
        let count: u64 = count.trim().parse().map_err(|_| bad("count must be a whole number"))?;
        if count == 0 {
            return Err(bad("count must be at least 1"));
        }
        let window = match window.trim() {
            "day" | "d" => QuotaWindow::Day,
            "month" | "mo" => QuotaWindow::Month,
            rolling if rolling.starts_with("rolling-") => {
                QuotaWindow::Rolling(parse_period(&rolling["rolling-".len()..]).ok_or_else(|| {
                    bad("a rolling window needs a duration, e.g. rolling-30d or rolling-24h")
                })?)
            }
            other => QuotaWindow::Every(
                parse_period(other).ok_or_else(|| bad("window must be day, month or a duration like 1h"))?,
            ),
        };
        // A quota is an allowance over a billing-like period; under a minute
        // it is a rate limit by another name, and belongs in `rate`.
        if let QuotaWindow::Every(period) | QuotaWindow::Rolling(period) = window
            && period < Duration::from_secs(60)
        {
            return Err(bad(
                "a quota window must be at least a minute; for shorter ones use a rate limit (--rate)",
            ));
        }
        Ok(Self { count, window })
    }
}

// === Credits ===

/// A grant of usage credits, as the key's (or client's) record keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditGrant {
    /// Uses granted (`--uses N`); the count starts here.
    pub uses: u64,
    /// Optional periodic refill (`--refill 1000/month`).
    pub refill: Option<Refill>,
    /// When this grant was given, to the millisecond. It names the grant:
    /// the authority starts a fresh count when it sees a newer grant (so
    /// `keys update --uses N` resets the count on every gateway at once), and
    /// ignores an older one (a gateway whose cache still holds the previous
    /// record does not undo the reset).
    pub granted_at: Timestamp,
}

/// A refill: at the start of every window the count is set to `amount`
/// (not added to: unused credits do not pile up), e.g. `1000/month`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refill {
    pub amount: u64,
    pub window: RefillWindow,
}

/// When credits are refilled: UTC calendar day or month, or a fixed length
/// of at least a minute aligned to the Unix epoch (as quota windows are).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefillWindow {
    Day,
    Month,
    Every(Duration),
}

impl RefillWindow {
    /// The same window, as quotas count them (which share the window arithmetic).
    pub fn as_quota_window(self) -> QuotaWindow {
        match self {
            Self::Day => QuotaWindow::Day,
            Self::Month => QuotaWindow::Month,
            Self::Every(length) => QuotaWindow::Every(length),
        }
    }
}

impl fmt::Display for Refill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.window {
            RefillWindow::Day => write!(f, "{}/day", self.amount),
            RefillWindow::Month => write!(f, "{}/month", self.amount),
            RefillWindow::Every(d) => write!(f, "{}/{}", self.amount, period_to_str(d)),
        }
    }
}

impl FromStr for Refill {
    type Err = MetaError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| MetaError::new("refill", s, why);
        let (amount, window) =
            s.split_once('/').ok_or_else(|| bad("expected AMOUNT/WINDOW, e.g. 1000/month or 100/day"))?;
        let amount: u64 = amount.trim().parse().map_err(|_| bad("amount must be a whole number"))?;
        if amount == 0 {
            return Err(bad("amount must be at least 1"));
        }
        check_credit_count("refill", s, amount)?;
        let window = match window.trim() {
            "day" | "d" => RefillWindow::Day,
            "month" | "mo" => RefillWindow::Month,
            other => RefillWindow::Every(
                parse_period(other).ok_or_else(|| bad("window must be day, month or a duration like 1h"))?,
            ),
        };
        if let RefillWindow::Every(period) = window
            && period < Duration::from_secs(60)
        {
            return Err(bad("a refill window must be at least a minute"));
        }
        Ok(Self { amount, window })
    }
}

/// `--uses N`: a whole number of uses (0 is allowed: a key that starts
/// empty and waits for its refill).
pub fn parse_uses(value: &str) -> Result<u64, MetaError> {
    let uses = value
        .trim()
        .parse::<u64>()
        .map_err(|_| MetaError::new("uses", value, "must be a whole number (0 or more)"))?;
    check_credit_count("uses", value, uses)
}

/// The largest count of credits: the Redis script counts in Lua numbers
/// (doubles), exact to 2^53; 10^15 leaves room for any cost on top.
pub const MAX_CREDITS: u64 = 1_000_000_000_000_000;

fn check_credit_count(field: &str, value: &str, count: u64) -> Result<u64, MetaError> {
    if count > MAX_CREDITS {
        return Err(MetaError::new(field, value, "at most 10^15 (1000000000000000)"));
    }
    Ok(count)
}

/// A stamp for a new grant: now to the millisecond, and always after
/// `previous` (two updates within one millisecond still name two grants).
pub fn grant_stamp(now: Timestamp, previous: Option<Timestamp>) -> Timestamp {
    let ms = now.as_millisecond();
    let ms = previous.map_or(ms, |p| ms.max(p.as_millisecond().saturating_add(1)));
    Timestamp::from_millisecond(ms).unwrap_or(now)
}

fn parse_period(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = if digits.is_empty() { 1 } else { digits.parse().ok()? };
    let unit_secs = match unit {
        "s" | "sec" | "second" => 1,
        "m" | "min" | "minute" => 60,
        "h" | "hour" => 3600,
        "d" | "day" => 86_400,
        _ => return None,
    };
    let secs = n.checked_mul(unit_secs)?;
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// Like [`period_to_str`], but always with a count (`1d`, not `day`), so
/// `rolling-1d` reads as a duration.
fn rolling_period_to_str(d: Duration) -> String {
    match d.as_secs() {
        n if n % 86_400 == 0 => format!("{}d", n / 86_400),
        n if n % 3600 == 0 => format!("{}h", n / 3600),
        n if n % 60 == 0 => format!("{}min", n / 60),
        n => format!("{n}s"),
    }
}

fn period_to_str(d: Duration) -> String {
    match d.as_secs() {
        1 => "s".into(),
        60 => "min".into(),
        3600 => "h".into(),
        86_400 => "day".into(),
        n if n % 86_400 == 0 => format!("{}d", n / 86_400),
        n if n % 3600 == 0 => format!("{}h", n / 3600),
        n if n % 60 == 0 => format!("{}min", n / 60),
        n => format!("{n}s"),
    }
}

// Rate and Quota travel as their text form in JSON, TOML and Redis hashes.
macro_rules! serde_as_text {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_text!(Rate);
serde_as_text!(Quota);
serde_as_text!(Refill);

// === Changes ===

/// A set of changes to a key's metadata, from CLI flags, `--meta` or the admin API.
/// `Some(None)` clears an optional field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaChanges {
    pub scopes: Option<Vec<String>>,
    pub rate: Option<Option<Rate>>,
    pub burst: Option<Option<NonZeroU32>>,
    pub quota: Option<Option<Quota>>,
    pub expires_at: Option<Option<Timestamp>>,
    pub label: Option<Option<String>>,
    /// `--uses N` (a new grant: the count starts again at N) or `none`.
    pub uses: Option<Option<u64>>,
    /// `--refill N/WINDOW` or `none`; keeps the current count.
    pub refill: Option<Option<Refill>>,
}

impl MetaChanges {
    /// Parses the seed notes' syntax, `scope=read-write&rate_limit=1000&quota=10000/day`.
    ///
    /// Accepted names: `scope`/`scopes` (comma-separated), `rate_limit`/`rate`,
    /// `burst`, `quota`, `expires`/`expires_at` (RFC 3339 or a duration from
    /// `now` like `30d`), `label`, `uses`, `refill`. An empty value clears an
    /// optional field.
    pub fn from_query(query: &str, now: Timestamp) -> Result<Self, MetaError> {
        let mut changes = Self::default();
        let mut seen: Vec<&str> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, raw) = pair.split_once('=').unwrap_or((pair, ""));
            // `scope=read&scope=write` would silently keep the last value:
            // refuse it, and say how to give several scopes.
            let field = match name {
                "scopes" => "scope",
                "rate" => "rate_limit",
                "expires_at" => "expires",
                other => other,
            };
            if seen.contains(&field) {
                return Err(MetaError::new(
                    name,
                    raw,
                    "given twice; give each field once (several scopes: scope=read,orders:write)",
                ));
            }
            seen.push(field);
            let value = percent_encoding::percent_decode_str(&raw.replace('+', " "))
                .decode_utf8()
                .map_err(|_| MetaError::new(name, raw, "not valid UTF-8 after percent-decoding"))?
                .into_owned();
            let value = value.trim();
            match name {
                "scope" | "scopes" => changes.scopes = Some(parse_scopes(value)?),
                "rate_limit" | "rate" => changes.rate = Some(optional(value, str::parse)?),
                "burst" => changes.burst = Some(optional(value, parse_burst)?),
                "quota" => changes.quota = Some(optional(value, str::parse)?),
                "expires" | "expires_at" => {
                    changes.expires_at = Some(optional(value, |v| parse_expiry(v, now))?)
                }
                "label" => changes.label = Some((!value.is_empty()).then(|| value.to_owned())),
                "uses" => changes.uses = Some(optional(value, parse_uses)?),
                "refill" => changes.refill = Some(optional(value, str::parse)?),
                other => {
                    return Err(MetaError::new(
                        other,
                        value,
                        "unknown field; known: scope, rate_limit, burst, quota, expires, label, uses, refill",
                    ));
                }
            }
        }
        Ok(changes)
    }

    /// Layers `other` on top of `self` (later flags win over `--meta`).
    pub fn merge(mut self, other: MetaChanges) -> Self {
        self.scopes = other.scopes.or(self.scopes);
        self.rate = other.rate.or(self.rate);
        self.burst = other.burst.or(self.burst);
        self.quota = other.quota.or(self.quota);
        self.expires_at = other.expires_at.or(self.expires_at);
        self.label = other.label.or(self.label);
        self.uses = other.uses.or(self.uses);
        self.refill = other.refill.or(self.refill);
        self
    }

    pub fn apply(self, meta: &mut KeyMeta) {
        if let Some(v) = self.scopes {
            meta.scopes = v;
        }
        if let Some(v) = self.rate {
            meta.rate = v;
        }
        if let Some(v) = self.burst {
            meta.burst = v;
        }
        if let Some(v) = self.quota {
            meta.quota = v;
        }
        if let Some(v) = self.expires_at {
            meta.expires_at = v;
        }
        if let Some(v) = self.label {
            meta.label = v;
        }
        meta.credits = credits_after(meta.credits, self.uses, self.refill, Timestamp::now());
    }
}

/// A record's credits after `uses` and `refill` changes. `uses` makes a new
/// grant (stamped `now`: the count restarts); `refill` alone keeps the grant
/// and its count; a refill on a key without credits grants its amount.
/// Shared by keys and client records ([`crate::client::ClientMeta::apply`]).
pub fn credits_after(
    current: Option<CreditGrant>,
    uses: Option<Option<u64>>,
    refill: Option<Option<Refill>>,
    now: Timestamp,
) -> Option<CreditGrant> {
    let previous = current.map(|c| c.granted_at);
    match (uses, current) {
        (Some(None), _) => None,
        (Some(Some(uses)), current) => Some(CreditGrant {
            uses,
            refill: refill.unwrap_or(current.and_then(|c| c.refill)),
            granted_at: grant_stamp(now, previous),
        }),
        (None, Some(current)) => Some(CreditGrant { refill: refill.unwrap_or(current.refill), ..current }),
        (None, None) => match refill {
            Some(Some(refill)) => Some(CreditGrant {
                uses: refill.amount,
                refill: Some(refill),
                granted_at: grant_stamp(now, None),
            }),
            _ => None,
        },
    }
}

fn optional<T>(
    value: &str,
    parse: impl FnOnce(&str) -> Result<T, MetaError>,
) -> Result<Option<T>, MetaError> {
    if value.is_empty() { Ok(None) } else { parse(value).map(Some) }
}

/// Scopes: comma-separated names of `[A-Za-z0-9:._-]`, at least one.
pub fn parse_scopes(value: &str) -> Result<Vec<String>, MetaError> {
    let scopes: Vec<String> =
        value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    if scopes.is_empty() {
        return Err(MetaError::new("scopes", value, "at least one scope is needed"));
    }
    if let Some(bad) = scopes.iter().find(|s| {
        s.len() > 128 || !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '_' | '-'))
    }) {
        return Err(MetaError::new("scopes", bad, "a scope is letters, digits and : . _ - (at most 128)"));
    }
    Ok(scopes)
}

pub fn parse_burst(value: &str) -> Result<NonZeroU32, MetaError> {
    value
        .parse::<NonZeroU32>()
        .map_err(|_| MetaError::new("burst", value, "must be a whole number of at least 1"))
}

/// An expiry: an RFC 3339 instant, or a duration from `now` such as `30d` or `12h`.
pub fn parse_expiry(value: &str, now: Timestamp) -> Result<Timestamp, MetaError> {
    if let Ok(at) = value.parse::<Timestamp>() {
        return Ok(whole_seconds(at));
    }
    let span = humantime::parse_duration(value).map_err(|_| {
        MetaError::new("expires", value, "expected RFC 3339 (2026-12-31T00:00:00Z) or a duration like 30d")
    })?;
    let span = jiff::SignedDuration::try_from(span)
        .map_err(|_| MetaError::new("expires", value, "duration too large"))?;
    now.checked_add(span)
        .map(whole_seconds)
        .map_err(|_| MetaError::new("expires", value, "duration too large"))
}

/// A metadata value that did not parse; names the field and the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} `{value}`: {why}")]
pub struct MetaError {
    pub field: String,
    pub value: String,
    pub why: String,
}

impl MetaError {
    pub fn new(field: &str, value: &str, why: &str) -> Self {
        Self { field: field.to_owned(), value: value.to_owned(), why: why.to_owned() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_window_under_a_minute_is_refused_as_a_rate_in_disguise() {
        // Regression (issue 16, defect 12): `--quota 10/s` was accepted.
        for text in ["10/s", "10/30s", "10/rolling-59s"] {
            let error = text.parse::<Quota>().unwrap_err().to_string();
            assert!(error.contains("at least a minute"), "{text}: {error}");
        }
        for text in ["10/1m", "10/60s", "10/rolling-1m", "10/day"] {
            assert!(text.parse::<Quota>().is_ok(), "{text}");
        }
    }

    #[test]
    fn a_field_given_twice_in_meta_is_refused_not_silently_overwritten() {
        // Regression (issue 16, defect 12): the last `scope=` silently won.
        let now = Timestamp::now();
        for query in ["scope=read&scope=write", "rate=1/s&rate_limit=2/s", "label=a&label=b"] {
            let error = MetaChanges::from_query(query, now).unwrap_err().to_string();
            assert!(error.contains("given twice"), "{query}: {error}");
        }
        let both = MetaChanges::from_query("scope=read,orders:write&rate=5/s", now).unwrap();
        assert_eq!(both.scopes.unwrap(), ["read", "orders:write"]);
    }

    fn now() -> Timestamp {
        "2026-11-24T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn uses_and_refills_parse_and_bad_ones_name_the_field() {
        assert_eq!(parse_uses("0").unwrap(), 0);
        assert_eq!(parse_uses("1000").unwrap(), 1000);
        for bad in ["-1", "x", "1.5", "1000000000000001"] {
            assert_eq!(parse_uses(bad).unwrap_err().field, "uses", "{bad}");
        }
        for (text, printed) in
            [("1000/month", "1000/month"), ("5/d", "5/day"), ("50/12h", "50/12h"), ("1/1m", "1/min")]
        {
            assert_eq!(text.parse::<Refill>().unwrap().to_string(), printed);
            assert_eq!(printed.parse::<Refill>().unwrap(), text.parse::<Refill>().unwrap());
        }
        for bad in ["0/day", "5/30s", "5", "5/fortnight", "5/rolling-1d", "x/day"] {
            assert_eq!(bad.parse::<Refill>().unwrap_err().field, "refill", "{bad}");
        }
    }

    #[test]
    fn uses_makes_a_new_grant_and_refill_alone_keeps_the_count() {
        let t0 = now();
        let one = credits_after(None, Some(Some(10)), None, t0).unwrap();
        assert_eq!((one.uses, one.refill, one.granted_at), (10, None, t0));
        // Refill alone: same grant (the count goes on).
        let refill: Refill = "5/day".parse().unwrap();
        let two = credits_after(Some(one), None, Some(Some(refill)), t0).unwrap();
        assert_eq!((two.uses, two.refill, two.granted_at), (10, Some(refill), t0));
        // The same uses again, even in the same millisecond: a newer grant.
        let three = credits_after(Some(two), Some(Some(10)), None, t0).unwrap();
        assert!(three.granted_at > two.granted_at);
        assert_eq!(three.refill, Some(refill), "kept");
        assert_eq!(credits_after(Some(three), Some(None), None, t0), None, "--uses none");
        // A refill on a key without credits grants its amount.
        let four = credits_after(None, None, Some(Some(refill)), t0).unwrap();
        assert_eq!(four.uses, 5);
        let query = MetaChanges::from_query("uses=7&refill=7/month", t0).unwrap();
        assert_eq!(query.uses, Some(Some(7)));
        assert_eq!(MetaChanges::from_query("uses=", t0).unwrap().uses, Some(None));
    }

    #[test]
    fn rates_parse_and_print_round_trip() {
        for (text, count, secs, printed) in [
            ("100/s", 100, 1, "100/s"),
            ("1000/min", 1000, 60, "1000/min"),
            ("5/h", 5, 3600, "5/h"),
            ("7/day", 7, 86_400, "7/day"),
            ("10/30s", 10, 30, "10/30s"),
            ("1000", 1000, 1, "1000/s"),
        ] {
            let rate: Rate = text.parse().unwrap();
            assert_eq!((rate.count.get(), rate.period.as_secs()), (count, secs), "{text}");
            assert_eq!(rate.to_string(), printed);
            assert_eq!(printed.parse::<Rate>().unwrap(), rate);
        }
    }

    #[test]
    fn bad_rates_name_the_problem() {
        for text in ["0/s", "x/s", "10/fortnight", "-1/s", "10/0s", ""] {
            let err = text.parse::<Rate>().unwrap_err();
            assert_eq!(err.field, "rate", "{text}");
        }
    }

    #[test]
    fn quotas_parse_calendar_and_fixed_windows() {
        assert_eq!("10000/day".parse::<Quota>().unwrap(), Quota { count: 10000, window: QuotaWindow::Day });
        assert_eq!("5/month".parse::<Quota>().unwrap(), Quota { count: 5, window: QuotaWindow::Month });
        let hourly: Quota = "50/h".parse().unwrap();
        assert_eq!(hourly.window, QuotaWindow::Every(Duration::from_secs(3600)));
        assert_eq!(hourly.to_string(), "50/h");
        let rolling: Quota = "10000/rolling-30d".parse().unwrap();
        assert_eq!(rolling.window, QuotaWindow::Rolling(Duration::from_secs(30 * 86_400)));
        assert_eq!(rolling.to_string(), "10000/rolling-30d");
        assert_eq!("5/rolling-1d".parse::<Quota>().unwrap().to_string(), "5/rolling-1d");
        assert!("5/rolling-".parse::<Quota>().is_err());
        assert!("0/day".parse::<Quota>().is_err());
        assert!("100".parse::<Quota>().is_err());
    }

    #[test]
    fn seed_notes_query_syntax_sets_fields() {
        let changes = MetaChanges::from_query(
            "scope=read-write&rate_limit=1000&quota=10000/day&label=mobile+app&expires=30d",
            now(),
        )
        .unwrap();
        let mut meta = KeyMeta::new(now());
        changes.apply(&mut meta);
        assert_eq!(meta.scopes, ["read-write"]);
        assert_eq!(meta.rate.unwrap().to_string(), "1000/s");
        assert_eq!(meta.quota.unwrap().to_string(), "10000/day");
        assert_eq!(meta.label.as_deref(), Some("mobile app"));
        assert_eq!(meta.expires_at.unwrap(), "2026-12-24T00:00:00Z".parse::<Timestamp>().unwrap());
    }

    #[test]
    fn query_rejects_unknown_fields_and_bad_values() {
        assert_eq!(MetaChanges::from_query("colour=blue", now()).unwrap_err().field, "colour");
        assert_eq!(MetaChanges::from_query("rate_limit=fast", now()).unwrap_err().field, "rate");
        assert_eq!(MetaChanges::from_query("scope=a b", now()).unwrap_err().field, "scopes");
    }

    #[test]
    fn empty_value_clears_and_later_changes_win() {
        let first = MetaChanges::from_query("rate_limit=10&label=x", now()).unwrap();
        let second = MetaChanges::from_query("label=", now()).unwrap();
        let merged = first.merge(second);
        assert_eq!(merged.label, Some(None));
        assert_eq!(merged.rate.unwrap().unwrap().to_string(), "10/s");
    }

    #[test]
    fn expired_and_revoked_keys_are_not_usable() {
        let mut meta = KeyMeta::new(now());
        assert!(meta.is_usable_at(now()));
        meta.expires_at = Some(now());
        assert!(!meta.is_usable_at(now()), "expiry instant itself is past");
        meta.expires_at = None;
        meta.status = KeyStatus::Revoked;
        assert!(!meta.is_usable_at(now()));
    }
}
