//! `keygate keys ...`: the operators' key commands (issue, list, show, update,
//! revoke, rotate).
//!
//! A thin layer over [`crate::ops`]: parse flags (through the `meta` parsers,
//! so a bad value is reported against its flag before anything runs), call the
//! operation, print. Output follows the contract scripts rely on: `issue` and
//! `rotate` print the new key **alone** on stdout, everything addressed to a
//! person goes to stderr, and `--json` puts a machine-readable record on stdout
//! instead. No secret is printed except that one-time key.
//!
//! With a Redis store, `issue`/`update`/`rotate`/`revoke` also append to the
//! audit trail (actor `cli:$USER`), `keys audit` prints it, and `list`/`show`
//! include each key's approximate `last_used` (see [`crate::usage`]).

use std::io::{self, BufRead, Write};
use std::num::NonZeroU32;
use std::time::Duration;

use clap::{Args, Subcommand};
use jiff::Timestamp;
use serde::Serialize;

use super::table::{self, printable};
use crate::key::{self, KeyFormatError, KeyId, SecretString};
use crate::limit::credits::Credits;
use crate::meta::{self, MetaChanges, MetaError, Quota, Rate};
use crate::ops::view::{RecordView, remaining_credits, state};
use crate::ops::{self, OpsError, RevokeTarget};
use crate::store::{KeyRecord, KeyStore, SharedStore};
use crate::usage::{self, AuditAction, AuditEntry, AuditRecord};

/// The `keys` subcommands, mounted by the top-level command as `keygate keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key. Prints the key alone on stdout; it is shown this once.
    Issue(IssueArgs),
    /// List keys as a table (or a JSON array with --json).
    List(ListArgs),
    /// Show one key's record.
    Show(ShowArgs),
    /// Change a key's scopes, limits, expiry or label.
    Update(UpdateArgs),
    /// Revoke a key, given its ID or the full key string (`-` reads the key from stdin).
    Revoke(RevokeArgs),
    /// Replace a key by a new one with the same metadata and the same
    /// budgets (it counts as the old key). Prints the new key alone on
    /// stdout; the old key keeps working for exactly the grace period, and
    /// the new key has no expiry unless --expires gives one.
    Rotate(RotateArgs),
    /// Show the audit trail of key operations, oldest first (Redis store only).
    Audit(AuditArgs),
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only this client's keys.
    #[arg(long, value_parser = client_flag)]
    pub client: Option<String>,
    /// How many of the latest entries to show.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What the key commands use Redis for besides the store, when the store is
/// Redis: the audit trail and `last_used`. `None` with the file store.
#[derive(Clone)]
pub struct RedisExtras {
    pub conn: crate::store::conn::RedisConn,
    /// The store's Redis key prefix (`kg:`), not the key-string prefix.
    pub prefix: String,
    /// Who the audit trail names, e.g. `cli:alice`.
    pub actor: String,
}

impl std::fmt::Debug for RedisExtras {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisExtras").field("prefix", &self.prefix).field("actor", &self.actor).finish()
    }
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// Client the key belongs to: 1-64 characters of A-Z a-z 0-9 -.
    #[arg(long, value_parser = client_flag)]
    pub client: String,
    #[command(flatten)]
    pub meta: MetaFlags,
    /// Print the new record, key included, as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this client's keys.
    #[arg(long, value_parser = client_flag)]
    pub client: Option<String>,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Key ID, CLIENT.KID.
    pub id: KeyId,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Key ID, CLIENT.KID.
    pub id: KeyId,
    #[command(flatten)]
    pub meta: MetaFlags,
    /// Print the updated record as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// Key ID (CLIENT.KID), the full key string, or `-` to read the key from
    /// stdin (keeps it out of shell history and the process list).
    #[arg(value_name = "ID|KEY")]
    pub target: String,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Key ID, CLIENT.KID.
    pub id: KeyId,
    /// How long the old key keeps working from now, e.g. 24h, 30m, 7d (also
    /// when it is already in the grace of an earlier rotation).
    #[arg(long, default_value = "24h", value_parser = grace_flag)]
    pub grace: Duration,
    /// The new key's expiry (a duration from now like 30d, or RFC 3339); by
    /// default it has none, whatever the old key's was.
    #[arg(long, value_name = "30d|RFC3339", value_parser = expires_flag)]
    pub expires: Option<Expires>,
    /// Print the new record, key included, as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Metadata flags shared by `issue` and `update`. Explicit flags win over `--meta`.
#[derive(Debug, Clone, Default, Args)]
pub struct MetaFlags {
    /// Comma-separated scopes: read, write, read-write, or named ones like
    /// orders:write. Default when issuing: read (least privilege).
    #[arg(long, value_name = "A,B", value_parser = scopes_flag)]
    pub scopes: Option<Scopes>,
    /// Sustained rate, e.g. 100/s, 1000/min, 10/30s; `none` removes it.
    #[arg(long, value_parser = rate_flag)]
    pub rate: Option<Clearable<Rate>>,
    /// Requests allowed at once above the rate; `none` removes it.
    #[arg(long, value_parser = burst_flag)]
    pub burst: Option<Clearable<NonZeroU32>>,
    /// Request budget per window, e.g. 10000/day, 100000/month; `none` removes it.
    #[arg(long, value_parser = quota_flag)]
    pub quota: Option<Clearable<Quota>>,
    /// Expiry: a duration from now (30d, 12h) or RFC 3339; `never` removes it.
    #[arg(long, value_name = "30d|RFC3339", value_parser = expires_flag)]
    pub expires: Option<Expires>,
    /// Free text for operators; an empty string removes it.
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,
    /// Usage credits: N uses, each admitted request spending its route's cost;
    /// at zero requests get 429 credits_exhausted. On `update`, resets the
    /// remaining count to N (a new grant); `none` removes credits.
    #[arg(long, value_name = "N", value_parser = uses_flag)]
    pub uses: Option<Clearable<u64>>,
    /// Refill the credits to N at the start of every window: N/day, N/month or
    /// N/DURATION (at least 1min, e.g. 500/12h); keeps the current count on
    /// `update`; `none` removes it. Without --uses, grants N to start with.
    #[arg(long, value_name = "N/WINDOW", value_parser = refill_flag)]
    pub refill: Option<Clearable<meta::Refill>>,
    /// Metadata in query syntax, e.g. "scope=read-write&rate_limit=1000"; explicit flags win.
    #[arg(long, value_name = "QUERY", value_parser = meta_flag)]
    pub meta: Option<MetaQuery>,
}

// === Flag values ===
//
// Flags are checked by clap (so errors name the flag) with the `meta` parsers.
// Values that depend on the current time (`--expires 30d`, `--meta expires=..`)
// are checked at parse time and resolved against the command's single `now`.

/// A list of scopes (a newtype, so clap takes `--scopes a,b` as one value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scopes(pub Vec<String>);

/// A flag value that may also remove the field (`none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clearable<T>(pub Option<T>);

/// `--expires`, kept as text until the command's `now` is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expires(String);

/// `--meta`, kept as text until the command's `now` is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaQuery(String);

impl MetaQuery {
    /// The changes the query asks for, with expiries resolved against `now`.
    pub fn changes(&self, now: Timestamp) -> Result<MetaChanges, MetaError> {
        MetaChanges::from_query(&self.0, now)
    }
}

fn client_flag(s: &str) -> Result<String, KeyFormatError> {
    key::validate_client_id(s).map(|()| s.to_owned())
}

pub(super) fn scopes_flag(s: &str) -> Result<Scopes, MetaError> {
    meta::parse_scopes(s).map(Scopes)
}

fn clearable<T>(
    s: &str,
    parse: impl FnOnce(&str) -> Result<T, MetaError>,
) -> Result<Clearable<T>, MetaError> {
    if s == "none" { Ok(Clearable(None)) } else { parse(s).map(|v| Clearable(Some(v))) }
}

pub(super) fn rate_flag(s: &str) -> Result<Clearable<Rate>, MetaError> {
    clearable(s, str::parse)
}

pub(super) fn burst_flag(s: &str) -> Result<Clearable<NonZeroU32>, MetaError> {
    clearable(s, meta::parse_burst)
}

pub(super) fn quota_flag(s: &str) -> Result<Clearable<Quota>, MetaError> {
    clearable(s, str::parse)
}

pub(super) fn uses_flag(s: &str) -> Result<Clearable<u64>, MetaError> {
    clearable(s, meta::parse_uses)
}

pub(super) fn refill_flag(s: &str) -> Result<Clearable<meta::Refill>, MetaError> {
    clearable(s, str::parse)
}

fn expires_flag(s: &str) -> Result<Expires, MetaError> {
    if s != "never" {
        meta::parse_expiry(s, Timestamp::now())?;
    }
    Ok(Expires(s.to_owned()))
}

pub(super) fn meta_flag(s: &str) -> Result<MetaQuery, MetaError> {
    MetaChanges::from_query(s, Timestamp::now())?;
    Ok(MetaQuery(s.to_owned()))
}

fn grace_flag(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|_| "expected a duration like 24h, 30m or 7d".to_owned())
}

impl MetaFlags {
    /// The changes these flags ask for: `--meta` first, explicit flags on top.
    pub fn changes(&self, now: Timestamp) -> Result<MetaChanges, OpsError> {
        let base = match &self.meta {
            Some(MetaQuery(query)) => MetaChanges::from_query(query, now)?,
            None => MetaChanges::default(),
        };
        let expires_at = match &self.expires {
            None => None,
            Some(Expires(s)) if s == "never" => Some(None),
            Some(Expires(s)) => Some(Some(meta::parse_expiry(s, now)?)),
        };
        let flags = MetaChanges {
            scopes: self.scopes.clone().map(|Scopes(s)| s),
            rate: self.rate.map(|Clearable(v)| v),
            burst: self.burst.map(|Clearable(v)| v),
            quota: self.quota.map(|Clearable(v)| v),
            expires_at,
            label: self.label.as_ref().map(|l| (!l.is_empty()).then(|| l.clone())),
            uses: self.uses.map(|Clearable(v)| v),
            refill: self.refill.map(|Clearable(v)| v),
        };
        Ok(base.merge(flags))
    }
}

// === Running ===

/// Why a `keys` command failed. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error("cannot {what}: {source}")]
    Io { what: &'static str, source: io::Error },
    /// `keys update` without a single metadata flag.
    #[error(
        "nothing to change: pass at least one of --scopes, --rate, --burst, --quota, --expires, --label, --uses, --refill, --meta"
    )]
    NothingToChange,
    /// A command the file store cannot serve (what it needs is in Redis).
    #[error(
        "{0} is kept in Redis; give --redis URL (or KEYGATE_REDIS_URL), or a config whose [store] is Redis"
    )]
    NeedsRedis(&'static str),
    /// Reading the audit trail from Redis failed.
    #[error("cannot read the audit trail: {0}")]
    Audit(String),
    /// A flag or value refused before anything changed (exit 2).
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    fn write(source: io::Error) -> Self {
        Self::Io { what: "write output", source }
    }
}

/// Runs a `keys` subcommand against `store`, printing to stdout and stderr.
pub async fn run(
    cmd: KeysCommand,
    store: SharedStore,
    prefix: &str,
    redis: Option<RedisExtras>,
    credits: &Credits,
) -> Result<(), CliError> {
    let (mut out, mut err) = (io::stdout(), io::stderr());
    run_with(cmd, &*store, prefix, redis.as_ref(), credits, Timestamp::now(), &mut out, &mut err).await
}

/// [`run`] with the clock and the output streams passed in, for tests.
#[expect(clippy::too_many_arguments, reason = "run's inputs, plus the clock and streams tests pass in")]
async fn run_with(
    cmd: KeysCommand,
    store: &dyn KeyStore,
    prefix: &str,
    redis: Option<&RedisExtras>,
    credits: &Credits,
    now: Timestamp,
    out: &mut (impl Write + Send),
    err: &mut (impl Write + Send),
) -> Result<(), CliError> {
    match cmd {
        KeysCommand::Issue(args) => {
            let changes = args.meta.changes(now)?;
            let issued = ops::issue(store, prefix, &args.client, changes, now).await?;
            print_new_key(&issued.key, &issued.record, args.json, now, out)?;
            let id = &issued.record.id;
            let detail = summary(&issued.record);
            audit(redis, AuditAction::Issue, id, detail, now, err).await?;
            writeln!(
                err,
                "Issued key {id} for client {}. It is shown once: store it now.",
                issued.record.client()
            )
            .map_err(CliError::write)?;
        }
        KeysCommand::List(args) => {
            let records = ops::list(store, args.client.as_deref()).await?;
            let last_used = last_used_of(redis, &records).await;
            let used = |r: &KeyRecord| last_used.get(&r.id).copied();
            if args.json {
                let views: Vec<_> =
                    records.iter().map(|r| RecordView::new(r, None, now).last_used(used(r))).collect();
                print_json(&views, out)?;
            } else {
                print_table(&records, &used, now, out).map_err(CliError::write)?;
            }
        }
        KeysCommand::Show(args) => {
            let record = ops::show(store, &args.id).await?;
            let used = last_used_of(redis, std::slice::from_ref(&record)).await.get(&record.id).copied();
            let remaining = remaining_credits(credits, &record).await;
            print_record(&record, used, remaining, args.json, now, out)?;
        }
        KeysCommand::Update(args) => {
            let changes = args.meta.changes(now)?;
            if changes == MetaChanges::default() {
                return Err(CliError::NothingToChange);
            }
            let detail = describe_changes(&changes);
            let record = ops::update(store, &args.id, changes, now).await?;
            audit(redis, AuditAction::Update, &record.id, detail, now, err).await?;
            let remaining = remaining_credits(credits, &record).await;
            print_record(&record, None, remaining, args.json, now, out)?;
            writeln!(err, "Updated key {}.", record.id).map_err(CliError::write)?;
        }
        KeysCommand::Revoke(args) => {
            let target = if args.target == "-" {
                let mut line = String::new();
                io::stdin()
                    .lock()
                    .read_line(&mut line)
                    .map_err(|source| CliError::Io { what: "read the key from stdin", source })?;
                RevokeTarget::Key(SecretString::new(line.trim().to_owned()))
            } else {
                // Infallible: anything that is not a key ID is taken as a key string.
                let Ok(target) = args.target.parse();
                target
            };
            let revoked = ops::revoke(store, &target, prefix).await?;
            let id = &revoked.record.id;
            let msg = if revoked.already { "was already revoked" } else { "is revoked" };
            if !revoked.already {
                audit(redis, AuditAction::Revoke, id, String::new(), now, err).await?;
            }
            writeln!(err, "Key {id} {msg}.").map_err(CliError::write)?;
        }
        KeysCommand::Rotate(args) => {
            let expires_at = match &args.expires {
                None => None,
                Some(Expires(s)) if s == "never" => None,
                Some(Expires(s)) => Some(meta::parse_expiry(s, now).map_err(OpsError::from)?),
            };
            let issued = ops::rotate(store, &args.id, args.grace, expires_at, prefix, now).await?;
            print_new_key(&issued.key, &issued.record, args.json, now, out)?;
            let grace = humantime::format_duration(args.grace);
            let detail = format!("new key {}, grace {grace}", issued.record.id);
            audit(redis, AuditAction::Rotate, &args.id, detail, now, err).await?;
            writeln!(
                err,
                "Rotated {} to {}. The old key keeps working for {grace}; the new key is shown once.",
                args.id, issued.record.id,
            )
            .map_err(CliError::write)?;
        }
        KeysCommand::Audit(args) => {
            let Some(redis) = redis else {
                return Err(CliError::NeedsRedis("the audit trail"));
            };
            let records =
                usage::read_audit(&mut redis.conn.clone(), &redis.prefix, args.client.as_deref(), args.limit)
                    .await
                    .map_err(|e| CliError::Audit(e.to_string()))?;
            if args.json {
                print_json(&records, out)?;
            } else {
                print_audit(&records, out).map_err(CliError::write)?;
            }
        }
    }
    Ok(())
}

/// Appends an audit entry when the store is Redis. The operation itself has
/// already succeeded, so a failure here is a warning, not an error: failing
/// would invite a retry that issues a second key.
async fn audit(
    redis: Option<&RedisExtras>,
    action: AuditAction,
    key_id: &KeyId,
    detail: String,
    now: Timestamp,
    err: &mut (impl Write + Send),
) -> Result<(), CliError> {
    let Some(redis) = redis else { return Ok(()) };
    let entry = AuditEntry::key(redis.actor.clone(), action, key_id, now, detail);
    if let Err(e) = usage::append_audit(&mut redis.conn.clone(), &redis.prefix, &entry).await {
        writeln!(err, "warning: {action} of {key_id} done, but its audit entry was not written: {e}")
            .map_err(CliError::write)?;
    }
    Ok(())
}

/// A record's metadata in one line, for the audit trail of `issue`.
fn summary(record: &KeyRecord) -> String {
    let meta = &record.meta;
    let mut parts = vec![format!("scopes={}", meta.scopes.join(","))];
    let optional = [
        ("rate", meta.rate.map(|v| v.to_string())),
        ("burst", meta.burst.map(|v| v.to_string())),
        ("quota", meta.quota.map(|v| v.to_string())),
        ("expires", meta.expires_at.map(|v| v.to_string())),
        ("uses", meta.credits.map(|c| c.uses.to_string())),
        ("refill", meta.credits.and_then(|c| c.refill).map(|r| r.to_string())),
        ("label", meta.label.as_deref().map(quoted)),
    ];
    parts.extend(optional.into_iter().filter_map(|(name, value)| Some(format!("{name}={}", value?))));
    parts.join(" ")
}

/// What an `update` changed, in one line for the audit trail: each field
/// given, with its new value, `none` where it was removed. Destructured, so
/// a field added to [`MetaChanges`] must be described here to compile.
fn describe_changes(changes: &MetaChanges) -> String {
    let MetaChanges { scopes, rate, burst, quota, expires_at, label, uses, refill } = changes;
    fn or_none<T: std::fmt::Display>(value: &Option<T>) -> String {
        value.as_ref().map_or_else(|| "none".to_owned(), ToString::to_string)
    }
    let parts = [
        ("scopes", scopes.as_ref().map(|s| s.join(","))),
        ("rate", rate.as_ref().map(or_none)),
        ("burst", burst.as_ref().map(or_none)),
        ("quota", quota.as_ref().map(or_none)),
        ("expires", expires_at.as_ref().map(or_none)),
        ("label", label.as_ref().map(|l| l.as_deref().map_or_else(|| "none".to_owned(), quoted))),
        ("uses", uses.as_ref().map(or_none)),
        ("refill", refill.as_ref().map(or_none)),
    ];
    parts
        .into_iter()
        .filter_map(|(name, value)| Some(format!("{name}={}", value?)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Free text in an audit detail: quoted, so `label="a b"` reads as one
/// value and `label=none` (removed) differs from `label="none"`.
fn quoted(text: &str) -> String {
    format!("{:?}", text)
}

/// `last_used` of `records`, when the store is Redis.
async fn last_used_of(
    redis: Option<&RedisExtras>,
    records: &[KeyRecord],
) -> std::collections::HashMap<KeyId, Timestamp> {
    match redis {
        Some(redis) => usage::query::last_used_of(&mut redis.conn.clone(), &redis.prefix, records).await,
        None => std::collections::HashMap::new(),
    }
}

fn print_audit(records: &[AuditRecord], out: &mut impl Write) -> io::Result<()> {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|record| {
            let e = &record.entry;
            vec![
                e.at.to_string(),
                printable(&e.actor),
                e.action.to_string(),
                e.subject().to_owned(),
                printable(&e.detail),
            ]
        })
        .collect();
    table::write(out, &["AT", "ACTOR", "ACTION", "SUBJECT", "DETAIL"], &rows, &[])
}

// === Output ===

/// The one place a clear key is printed: alone on its line, or inside `--json`.
fn print_new_key(
    key: &SecretString,
    record: &KeyRecord,
    json: bool,
    now: Timestamp,
    out: &mut impl Write,
) -> Result<(), CliError> {
    if json {
        print_json(&RecordView::new(record, Some(key), now), out)
    } else {
        writeln!(out, "{}", key.expose()).map_err(CliError::write)
    }
}

fn print_json(value: &impl Serialize, out: &mut impl Write) -> Result<(), CliError> {
    serde_json::to_writer(&mut *out, value).map_err(|e| CliError::write(e.into()))?;
    writeln!(out).map_err(CliError::write)
}

fn print_record(
    record: &KeyRecord,
    last_used: Option<Timestamp>,
    remaining: Option<Option<u64>>,
    json: bool,
    now: Timestamp,
    out: &mut impl Write,
) -> Result<(), CliError> {
    if json {
        let view = RecordView::new(record, None, now).last_used(last_used);
        let view = match remaining {
            Some(remaining) => view.credits_remaining(remaining),
            None => view,
        };
        return print_json(&view, out);
    }
    let meta = &record.meta;
    let lines = [
        ("id", record.id.to_string()),
        ("client", record.client().to_owned()),
        ("state", state(record, now).to_owned()),
        ("scopes", meta.scopes.join(",")),
        ("rate", or_dash(meta.rate)),
        ("burst", or_dash(meta.burst)),
        ("quota", or_dash(meta.quota)),
        ("expires", or_dash(meta.expires_at)),
        ("label", meta.label.as_deref().map_or_else(|| "-".to_owned(), printable)),
        ("created", meta.created_at.to_string()),
        ("rotated", or_dash(meta.rotated_at)),
        ("counts as", record.counts_as().to_string()),
        ("last use", or_dash(last_used)),
        ("credits", credits_line(meta.credits, remaining)),
    ];
    for (name, value) in lines {
        writeln!(out, "{name:<9} {value}").map_err(CliError::write)?;
    }
    Ok(())
}

/// `997 left of 1000, refill 1000/month` (or `-` without credits).
pub(super) fn credits_line(grant: Option<meta::CreditGrant>, remaining: Option<Option<u64>>) -> String {
    let Some(grant) = grant else { return "-".to_owned() };
    let left = match remaining {
        Some(Some(n)) => format!("{n} left of {}", grant.uses),
        Some(None) => format!("? left (unavailable) of {}", grant.uses),
        None => format!("{} granted", grant.uses),
    };
    match grant.refill {
        Some(refill) => format!("{left}, refill {refill}"),
        None => left,
    }
}

fn print_table(
    records: &[KeyRecord],
    last_used: &dyn Fn(&KeyRecord) -> Option<Timestamp>,
    now: Timestamp,
    out: &mut impl Write,
) -> io::Result<()> {
    let header = ["ID", "STATE", "SCOPES", "RATE", "QUOTA", "EXPIRES", "LAST_USED", "LABEL"];
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let meta = &r.meta;
            vec![
                r.id.to_string(),
                state(r, now).to_owned(),
                meta.scopes.join(","),
                or_dash(meta.rate),
                or_dash(meta.quota),
                or_dash(meta.expires_at),
                or_dash(last_used(r)),
                meta.label.as_deref().map_or_else(|| "-".to_owned(), printable),
            ]
        })
        .collect();
    table::write(out, &header, &rows, &[])
}

fn or_dash<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::key::{DEFAULT_PREFIX as P, parse};
    use crate::ops::test_store::MemStore;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        keys: KeysCommand,
    }

    fn now() -> Timestamp {
        "2026-11-24T12:00:00Z".parse().unwrap()
    }

    fn cmd(args: &str) -> KeysCommand {
        Cli::try_parse_from(std::iter::once("keys").chain(args.split(' '))).unwrap().keys
    }

    fn parse_err(args: &[&str]) -> String {
        Cli::try_parse_from(std::iter::once(&"keys").chain(args)).unwrap_err().to_string()
    }

    /// Runs a command; returns (stdout, stderr).
    async fn exec(store: &MemStore, cmd: KeysCommand) -> Result<(String, String), CliError> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        run_with(cmd, store, P, None, &Credits::memory(), now(), &mut out, &mut err).await?;
        Ok((String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[tokio::test]
    async fn issue_prints_the_key_alone_on_stdout() {
        let store = MemStore::new();
        let (out, err) =
            exec(&store, cmd("issue --client acme --scopes read,orders:write --rate 100/s")).await.unwrap();
        let key = out.strip_suffix('\n').unwrap();
        assert!(!key.contains('\n'), "exactly one line: {out:?}");
        let parsed = parse(key, P).unwrap();
        assert_eq!(parsed.client, "acme");
        assert!(!err.contains(parsed.secret), "the key is not repeated on stderr");
        assert!(err.contains("acme."), "{err}");

        let record = store.find_by_hash("acme", &parsed.secret_hash()).await.unwrap().unwrap();
        assert_eq!(record.meta.scopes, ["read", "orders:write"]);
        assert_eq!(record.meta.rate.unwrap().to_string(), "100/s");
    }

    #[tokio::test]
    async fn issue_json_holds_the_key_and_the_record() {
        let store = MemStore::new();
        let (out, _) =
            exec(&store, cmd("issue --client acme --quota 10000/day --label ci --json")).await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        let key = json["key"].as_str().unwrap();
        assert_eq!(parse(key, P).unwrap().client, "acme");
        assert_eq!(json["client"], "acme");
        assert_eq!(json["scopes"], serde_json::json!(["read"]), "least privilege when --scopes is omitted");
        assert_eq!(json["quota"], "10000/day");
        assert_eq!(json["rate"], serde_json::Value::Null);
        assert_eq!(json["label"], "ci");
        assert_eq!(json["status"], "active");
        assert!(json.get("secret_hash").is_none());
        assert!(json["id"].as_str().unwrap().starts_with("acme."));
    }

    #[tokio::test]
    async fn explicit_flags_win_over_meta() {
        let store = MemStore::new();
        let args =
            ["issue", "--client", "c", "--meta", "scope=read&rate_limit=1000&label=x", "--rate", "5/s"];
        let cmd = Cli::try_parse_from(std::iter::once("keys").chain(args)).unwrap().keys;
        exec(&store, cmd).await.unwrap();
        let record = &store.list(None).await.unwrap()[0];
        assert_eq!(record.meta.rate.unwrap().to_string(), "5/s", "flag wins");
        assert_eq!(record.meta.scopes, ["read"], "meta still applies");
        assert_eq!(record.meta.label.as_deref(), Some("x"));
    }

    #[test]
    fn bad_flags_are_refused_naming_the_flag() {
        for (args, flag) in [
            (&["issue", "--client", "a b"][..], "--client"),
            (&["issue", "--client", "c", "--rate", "fast"], "--rate"),
            (&["issue", "--client", "c", "--burst", "0"], "--burst"),
            (&["issue", "--client", "c", "--quota", "100"], "--quota"),
            (&["issue", "--client", "c", "--expires", "soonish"], "--expires"),
            (&["issue", "--client", "c", "--scopes", "a b"], "--scopes"),
            (&["issue", "--client", "c", "--meta", "colour=blue"], "--meta"),
            (&["rotate", "c.k", "--grace", "a while"], "--grace"),
        ] {
            let err = parse_err(args);
            assert!(err.contains(flag), "{args:?}: {err}");
        }
        assert!(parse_err(&["show", "no-dot"]).contains("CLIENT.KID"));
    }

    #[tokio::test]
    async fn list_prints_a_table_without_secrets() {
        let store = MemStore::new();
        let (key, _) = exec(&store, cmd("issue --client acme --label line1\nline2")).await.unwrap();
        exec(&store, cmd("issue --client other")).await.unwrap();
        let (out, _) = exec(&store, cmd("list")).await.unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].starts_with("ID") && lines[0].ends_with("LABEL"), "{out}");
        assert!(lines[1].starts_with("acme.") && lines[1].contains("line1?line2"), "{out}");
        let secret = parse(key.trim(), P).unwrap().secret;
        assert!(!out.contains(secret));

        let (out, _) = exec(&store, cmd("list --client other --json")).await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json.as_array().unwrap().len(), 1);
        assert!(json[0].get("key").is_none());
    }

    #[tokio::test]
    async fn show_update_revoke_and_rotate_work_by_id() {
        let store = MemStore::new();
        exec(&store, cmd("issue --client c --rate 5/s")).await.unwrap();
        let id = store.list(None).await.unwrap()[0].id.to_string();

        let (out, _) = exec(&store, cmd(&format!("show {id}"))).await.unwrap();
        assert!(out.contains("rate      5/s"), "{out}");

        let (out, _) =
            exec(&store, cmd(&format!("update {id} --rate none --label new --json"))).await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!((json["rate"].clone(), json["label"].clone()), (serde_json::Value::Null, "new".into()));

        let (out, err) = exec(&store, cmd(&format!("rotate {id} --grace 1h"))).await.unwrap();
        let new_key = out.trim_end();
        assert_eq!(out.lines().count(), 1);
        assert_eq!(parse(new_key, P).unwrap().client, "c");
        assert!(err.contains(&id), "{err}");
        let (out, _) = exec(&store, cmd(&format!("show {id} --json"))).await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["state"], "rotating");
        assert_eq!(json["expires_at"], "2026-11-24T13:00:00Z");
        assert_eq!(json["counts_as"], id.as_str());
        let new_id = parse(new_key, P).unwrap();
        let new_record = store.find_by_hash("c", &new_id.secret_hash()).await.unwrap().unwrap();
        let (out, _) = exec(&store, cmd(&format!("show {}", new_record.id))).await.unwrap();
        assert!(out.contains(&format!("counts as {id}\n")), "the new key spends the old one's budget: {out}");
        assert!(out.contains("expires   -\n"), "no expiry unless asked: {out}");

        let (out, err) = exec(&store, cmd(&format!("revoke {id}"))).await.unwrap();
        assert_eq!(out, "", "revoke prints nothing on stdout");
        assert!(err.contains("is revoked"), "{err}");
        let (_, err) = exec(&store, cmd(&format!("revoke {id}"))).await.unwrap();
        assert!(err.contains("already revoked"), "{err}");

        let (_, err) = exec(&store, cmd(&format!("revoke {new_key}"))).await.unwrap();
        assert!(err.contains("is revoked"), "{err}");
        assert!(!err.contains(new_key));
    }

    #[tokio::test]
    async fn unknown_ids_fail_with_a_clear_message() {
        let store = MemStore::new();
        let err = exec(&store, cmd("show acme.missing1")).await.unwrap_err();
        assert_eq!(err.to_string(), "no key with id acme.missing1");
        let err = exec(&store, cmd("update acme.missing1 --label x")).await.unwrap_err();
        assert_eq!(err.to_string(), "no key with id acme.missing1");
        let err = exec(&store, cmd("update acme.missing1")).await.unwrap_err();
        assert!(matches!(err, CliError::NothingToChange), "{err:?}");
    }

    #[test]
    fn run_is_send_so_it_can_be_spawned() {
        fn assert_send<T: Send>(_: &T) {}
        let store: SharedStore = std::sync::Arc::new(MemStore::new());
        let credits = Credits::memory();
        let fut = run(cmd("list"), store, P, None, &credits);
        assert_send(&fut);
    }
}
