//! `keygate clients ...`: the operators' client commands (create, list,
//! show, update, revoke).
//!
//! A thin layer over [`crate::ops::clients`], in the style of `keys`: flags
//! are checked by clap with the same parsers as the key flags (so
//! `--quota 10000/day` and `--meta "rate_limit=100"` mean the same on a
//! client), the operation runs, the result is printed: a table or lines for
//! a person, or `--json` ([`ClientView`]) on stdout for scripts. Messages go
//! to stderr. With a Redis store every write appends to the audit trail, as
//! key writes do.
//!
//! `show` reads the client's remaining credits from the credit authority
//! (`Owner::Client`), as `keys show` does for a key.
//!
//! Exit codes are the table in [`super::exit`]: 0 success; 1 runtime
//! failure (store unreachable, a record already there, a revoked client);
//! 2 usage (a bad flag, a key-only field, nothing to change); 3 no such
//! client.

use std::io::{self, Write};
use std::num::NonZeroU32;

use clap::{Args, Subcommand};
use jiff::Timestamp;

use super::keys::{
    Clearable, CliError, MetaQuery, RedisExtras, Scopes, burst_flag, credits_line, meta_flag, quota_flag,
    rate_flag, refill_flag, scopes_flag, uses_flag,
};
use crate::client::ClientRecord;
use crate::limit::credits::Credits;
use crate::meta::{MetaChanges, Quota, Rate, Refill};
use crate::ops::OpsError;
use crate::ops::clients::{self as ops, ClientView};
use crate::ops::view::client_remaining_credits;
use crate::store::{KeyStore, SharedStore};
use crate::usage::{self, AuditAction, AuditEntry};

/// The `clients` subcommands, mounted as `keygate clients ...`.
#[derive(Debug, Subcommand)]
pub enum ClientsCommand {
    /// Create a client record: limits and quota shared by all its keys.
    Create(WriteArgs),
    /// List client records as a table (or a JSON array with --json).
    List(ListArgs),
    /// Show a client's record and its keys (IDs and status).
    Show(ShowArgs),
    /// Change a client's shared limits, quota or label.
    Update(WriteArgs),
    /// Revoke a client: every one of its keys is refused at once, on every
    /// gateway, and it can have no new keys. Final.
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
pub struct WriteArgs {
    /// Client ID, as in its keys: 1-64 characters of A-Z a-z 0-9 -.
    #[arg(value_parser = client_arg)]
    pub id: String,
    #[command(flatten)]
    pub meta: ClientFlags,
    /// Print the record as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[arg(value_parser = client_arg)]
    pub id: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    #[arg(value_parser = client_arg)]
    pub id: String,
    /// Print the revoked record as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The metadata a client takes: the key flags minus the key-only ones.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientFlags {
    /// Sustained rate shared by all the client's keys, e.g. 100/s; `none` removes it.
    #[arg(long, value_parser = rate_flag)]
    pub rate: Option<Clearable<Rate>>,
    /// Requests allowed at once above the shared rate; `none` removes it.
    #[arg(long, value_parser = burst_flag)]
    pub burst: Option<Clearable<NonZeroU32>>,
    /// Request budget per window shared by all the client's keys, e.g. 100000/month; `none` removes it.
    #[arg(long, value_parser = quota_flag)]
    pub quota: Option<Clearable<Quota>>,
    /// Free text for operators; an empty string removes it.
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,
    /// Usage credits shared by all the client's keys (spent on top of each
    /// key's own): N uses. On `update`, resets the count left to N (a new
    /// grant); `none` removes them.
    #[arg(long, value_name = "N", value_parser = uses_flag)]
    pub uses: Option<Clearable<u64>>,
    /// Refill the client's credits to N at the start of every window: N/day,
    /// N/month or N/DURATION (at least 1min); keeps the count on `update`;
    /// `none` removes it. Without --uses, grants N to start with.
    #[arg(long, value_name = "N/WINDOW", value_parser = refill_flag)]
    pub refill: Option<Clearable<Refill>>,
    /// Metadata in query syntax, e.g. "rate_limit=1000&quota=100000/month"; explicit flags win.
    #[arg(long, value_name = "QUERY", value_parser = meta_flag)]
    pub meta: Option<MetaQuery>,
    /// Scopes of the client's certificate callers (routes with
    /// `auth = ["cert"]`), e.g. read,orders:write; none until given. The
    /// client's keys keep their own scopes (keys issue/update --scopes).
    #[arg(long, value_name = "A,B", value_parser = scopes_flag)]
    pub scopes: Option<Scopes>,
    /// Key-only: accepted only to explain that a client is ended by revoking it.
    #[arg(long, hide = true)]
    pub expires: Option<String>,
}

fn client_arg(s: &str) -> Result<String, crate::key::KeyFormatError> {
    crate::key::validate_client_id(s).map(|()| s.to_owned())
}

impl ClientFlags {
    /// The changes these flags ask for: `--meta` first, explicit flags on
    /// top, exactly as for keys. Key-only fields are refused by the
    /// operation (from `--meta`) or here (as flags), naming the field.
    pub fn changes(&self, now: Timestamp) -> Result<MetaChanges, OpsError> {
        let refuse =
            |field: &str, why: &str| OpsError::Invalid { field: field.to_owned(), reason: why.to_owned() };
        if self.expires.is_some() {
            return Err(refuse(
                "expires",
                "expiry belongs to keys, not to clients; to end a client, revoke it",
            ));
        }
        let base = match &self.meta {
            Some(query) => query.changes(now)?,
            None => MetaChanges::default(),
        };
        let flags = MetaChanges {
            scopes: self.scopes.clone().map(|Scopes(s)| s),
            rate: self.rate.map(|Clearable(v)| v),
            burst: self.burst.map(|Clearable(v)| v),
            quota: self.quota.map(|Clearable(v)| v),
            label: self.label.as_ref().map(|l| (!l.is_empty()).then(|| l.clone())),
            uses: self.uses.map(|Clearable(v)| v),
            refill: self.refill.map(|Clearable(v)| v),
            ..MetaChanges::default()
        };
        Ok(base.merge(flags))
    }
}

// === Running ===

/// Runs a `clients` subcommand against `store`, printing to stdout and stderr.
pub async fn run(
    cmd: ClientsCommand,
    store: SharedStore,
    redis: Option<RedisExtras>,
    credits: &Credits,
) -> Result<(), CliError> {
    let (mut out, mut err) = (io::stdout(), io::stderr());
    run_with(cmd, &*store, redis.as_ref(), credits, Timestamp::now(), &mut out, &mut err).await
}

/// [`run`] with the clock and the output streams passed in, for tests.
async fn run_with(
    cmd: ClientsCommand,
    store: &dyn KeyStore,
    redis: Option<&RedisExtras>,
    credits: &Credits,
    now: Timestamp,
    out: &mut (impl Write + Send),
    err: &mut (impl Write + Send),
) -> Result<(), CliError> {
    match cmd {
        ClientsCommand::Create(args) => {
            let changes = args.meta.changes(now)?;
            let record = ops::create(store, &args.id, changes, now).await?;
            audit(redis, AuditAction::ClientCreate, &record, now, err).await?;
            print_record(&record, None, args.json, out)?;
            writeln!(err, "Created client {}.", record.id).map_err(write_error)?;
        }
        ClientsCommand::List(args) => {
            let records = ops::list(store).await?;
            if args.json {
                let views: Vec<_> = records.iter().map(ClientView::new).collect();
                print_json(&views, out)?;
            } else {
                print_table(&records, out).map_err(write_error)?;
            }
        }
        ClientsCommand::Show(args) => {
            let detail = ops::show(store, &args.id).await?;
            let remaining = client_remaining_credits(credits, &detail.record).await;
            if args.json {
                print_json(&with_remaining(ClientView::with_keys(&detail), remaining), out)?;
            } else {
                print_lines(&detail.record, remaining, out)?;
                let keys = if detail.keys.is_empty() {
                    "-".to_owned()
                } else {
                    let list: Vec<String> = detail
                        .keys
                        .iter()
                        .map(|k| format!("{} ({})", k.id, k.meta.status.as_str()))
                        .collect();
                    list.join(", ")
                };
                writeln!(out, "{:<8} {keys}", "keys").map_err(write_error)?;
            }
        }
        ClientsCommand::Update(args) => {
            let changes = args.meta.changes(now)?;
            if changes == MetaChanges::default() {
                return Err(CliError::Usage(
                    "nothing to change: pass at least one of --scopes, --rate, --burst, --quota, --label, --uses, --refill, --meta"
                        .to_owned(),
                ));
            }
            let record = ops::update(store, &args.id, changes, now).await?;
            audit(redis, AuditAction::ClientUpdate, &record, now, err).await?;
            // As `keys update`: after `--uses N` the count shown is the new one.
            let remaining = client_remaining_credits(credits, &record).await;
            print_record(&record, remaining, args.json, out)?;
            writeln!(err, "Updated client {}.", record.id).map_err(write_error)?;
        }
        ClientsCommand::Revoke(args) => {
            let revoked = ops::revoke(store, &args.id, now).await?;
            if !revoked.already {
                audit(redis, AuditAction::ClientRevoke, &revoked.record, now, err).await?;
            }
            if args.json {
                print_json(&ClientView::new(&revoked.record), out)?;
            }
            let msg = if revoked.already {
                "was already revoked"
            } else {
                "is revoked: all its keys are refused from now on"
            };
            writeln!(err, "Client {} {msg}.", revoked.record.id).map_err(write_error)?;
        }
    }
    Ok(())
}

/// Appends an audit entry when the store is Redis; as for keys, a failure
/// is a warning (the write has happened; failing would invite a retry).
async fn audit(
    redis: Option<&RedisExtras>,
    action: AuditAction,
    record: &ClientRecord,
    now: Timestamp,
    err: &mut (impl Write + Send),
) -> Result<(), CliError> {
    let Some(redis) = redis else { return Ok(()) };
    let entry = AuditEntry::client(redis.actor.clone(), action, &record.id, now, summary(record));
    if let Err(e) = usage::append_audit(&mut redis.conn.clone(), &redis.prefix, &entry).await {
        writeln!(
            err,
            "warning: {action} of client {} done, but its audit entry was not written: {e}",
            record.id
        )
        .map_err(write_error)?;
    }
    Ok(())
}

/// A client's metadata in one line, for the audit trail.
fn summary(record: &ClientRecord) -> String {
    let meta = &record.meta;
    let mut parts = vec![format!("status={}", meta.status.as_str())];
    let optional = [
        ("scopes", (!meta.scopes.is_empty()).then(|| meta.scopes.join(","))),
        ("rate", meta.rate.map(|v| v.to_string())),
        ("burst", meta.burst.map(|v| v.to_string())),
        ("quota", meta.quota.map(|v| v.to_string())),
        ("label", meta.label.as_deref().map(printable)),
        ("uses", meta.credits.map(|c| c.uses.to_string())),
        ("refill", meta.credits.and_then(|c| c.refill).map(|r| r.to_string())),
    ];
    parts.extend(optional.into_iter().filter_map(|(name, value)| Some(format!("{name}={}", value?))));
    parts.join(" ")
}

// === Output ===

fn write_error(source: io::Error) -> CliError {
    CliError::Io { what: "write output", source }
}

fn print_json(value: &impl serde::Serialize, out: &mut impl Write) -> Result<(), CliError> {
    serde_json::to_writer(&mut *out, value).map_err(|e| write_error(e.into()))?;
    writeln!(out).map_err(write_error)
}

/// `remaining`: as [`client_remaining_credits`] answers, `None` where not asked.
fn print_record(
    record: &ClientRecord,
    remaining: Option<Option<u64>>,
    json: bool,
    out: &mut impl Write,
) -> Result<(), CliError> {
    if json {
        print_json(&with_remaining(ClientView::new(record), remaining), out)
    } else {
        print_lines(record, remaining, out)
    }
}

fn with_remaining(view: ClientView<'_>, remaining: Option<Option<u64>>) -> ClientView<'_> {
    match remaining {
        Some(remaining) => view.credits_remaining(remaining),
        None => view,
    }
}

fn print_lines(
    record: &ClientRecord,
    remaining: Option<Option<u64>>,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let meta = &record.meta;
    let lines = [
        ("client", record.id.clone()),
        ("status", meta.status.as_str().to_owned()),
        ("scopes", if meta.scopes.is_empty() { "-".to_owned() } else { meta.scopes.join(",") }),
        ("rate", or_dash(meta.rate)),
        ("burst", or_dash(meta.burst)),
        ("quota", or_dash(meta.quota)),
        ("label", meta.label.as_deref().map_or_else(|| "-".to_owned(), printable)),
        ("credits", credits_line(meta.credits, remaining)),
        ("created", meta.created_at.to_string()),
        ("updated", meta.updated_at.to_string()),
    ];
    for (name, value) in lines {
        writeln!(out, "{name:<8} {value}").map_err(write_error)?;
    }
    Ok(())
}

fn print_table(records: &[ClientRecord], out: &mut impl Write) -> io::Result<()> {
    let header = ["ID", "STATUS", "RATE", "BURST", "QUOTA", "LABEL"].map(str::to_owned);
    let rows: Vec<[String; 6]> = records
        .iter()
        .map(|r| {
            let meta = &r.meta;
            [
                r.id.clone(),
                meta.status.as_str().to_owned(),
                or_dash(meta.rate),
                or_dash(meta.burst),
                or_dash(meta.quota),
                meta.label.as_deref().map_or_else(|| "-".to_owned(), printable),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> =
            row.iter().zip(widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        writeln!(out, "{}", cells.join("  ").trim_end())?;
    }
    Ok(())
}

fn or_dash<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Labels are free text: keep control characters off the terminal.
fn printable(label: &str) -> String {
    label.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::ops::test_store::MemStore;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        clients: ClientsCommand,
    }

    fn now() -> Timestamp {
        "2026-11-24T12:00:00Z".parse().unwrap()
    }

    fn cmd(args: &[&str]) -> ClientsCommand {
        Cli::try_parse_from(std::iter::once(&"clients").chain(args)).unwrap().clients
    }

    async fn exec(store: &MemStore, args: &[&str]) -> Result<(String, String), CliError> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        run_with(cmd(args), store, None, &Credits::memory(), now(), &mut out, &mut err).await?;
        Ok((String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[tokio::test]
    async fn create_prints_the_record_and_json_has_a_fixed_shape() {
        let store = MemStore::new();
        let (out, err) = exec(
            &store,
            &["create", "acme", "--quota", "1000/day", "--meta", "rate_limit=5&label=gold", "--rate", "9/s"],
        )
        .await
        .unwrap();
        assert!(out.contains("quota    1000/day") && out.contains("rate     9/s"), "flag wins: {out}");
        assert!(err.contains("Created client acme"), "{err}");
        let (out, _) = exec(&store, &["show", "acme", "--json"]).await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!((json["id"].as_str(), json["label"].as_str()), (Some("acme"), Some("gold")));
        assert_eq!(json["burst"], serde_json::Value::Null);
        assert_eq!(json["keys"], serde_json::json!([]));
    }

    #[tokio::test]
    async fn scopes_are_set_with_flag_or_meta_and_shown_for_certificate_callers() {
        let store = MemStore::new();
        let (out, _) = exec(&store, &["create", "acme"]).await.unwrap();
        assert!(out.contains("scopes   -"), "none by default: {out}");
        let (out, _) = exec(&store, &["update", "acme", "--scopes", "read,orders:write"]).await.unwrap();
        assert!(out.contains("scopes   read,orders:write"), "{out}");
        exec(&store, &["update", "acme", "--meta", "scope=write"]).await.unwrap();
        let (out, _) = exec(&store, &["show", "acme", "--json"]).await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["scopes"], serde_json::json!(["write"]));
        assert!(
            Cli::try_parse_from(["clients", "update", "acme", "--scopes", "a b"]).is_err(),
            "bad scope names"
        );
    }

    #[tokio::test]
    async fn key_only_fields_and_empty_updates_are_usage_errors() {
        let store = MemStore::new();
        for args in [&["create", "c", "--expires", "30d"][..], &["create", "c", "--meta", "expires=1d"]] {
            let error = exec(&store, args).await.unwrap_err();
            assert_eq!(error.exit().code(), 2, "{args:?}: {error}");
            assert!(error.to_string().contains("belong"), "{args:?}: {error}");
        }
        assert!(store.list_clients().await.unwrap().is_empty(), "nothing written");
        exec(&store, &["create", "c"]).await.unwrap();
        let error = exec(&store, &["update", "c"]).await.unwrap_err();
        assert_eq!(error.exit().code(), 2);
        let error = exec(&store, &["create", "c"]).await.unwrap_err();
        assert_eq!((error.exit().code(), error.to_string().contains("already has a record")), (1, true));
        let error = exec(&store, &["show", "nobody"]).await.unwrap_err();
        assert_eq!(error.exit().code(), 3, "not found, as for keys");
        assert!(Cli::try_parse_from(["clients", "create", "a.b"]).is_err(), "bad IDs are refused by clap");
    }

    #[tokio::test]
    async fn list_show_update_and_revoke() {
        let store = MemStore::new();
        exec(&store, &["create", "acme", "--label", "line1\nline2"]).await.unwrap();
        exec(&store, &["create", "beta", "--rate", "10/s"]).await.unwrap();
        let key =
            crate::ops::issue(&store, crate::key::DEFAULT_PREFIX, "acme", MetaChanges::default(), now())
                .await
                .unwrap();

        let (out, _) = exec(&store, &["list"]).await.unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].starts_with("ID") && lines[0].ends_with("LABEL"), "{out}");
        assert!(lines[1].starts_with("acme ") && lines[1].ends_with("line1?line2"), "{out}");

        let (out, _) = exec(&store, &["show", "acme"]).await.unwrap();
        assert!(out.contains(&format!("keys     {} (active)", key.record.id)), "{out}");

        let (out, _) =
            exec(&store, &["update", "beta", "--rate", "none", "--quota", "5/day", "--json"]).await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!((json["rate"].clone(), json["quota"].clone()), (serde_json::Value::Null, "5/day".into()));

        let (out, err) = exec(&store, &["revoke", "acme"]).await.unwrap();
        assert_eq!(out, "");
        assert!(err.contains("is revoked"), "{err}");
        let (_, err) = exec(&store, &["revoke", "acme"]).await.unwrap();
        assert!(err.contains("already revoked"), "{err}");
        assert!(store.get_client("acme").await.unwrap().unwrap().meta.is_revoked());
    }
}
