//! The audit trail of key and client operations: who issued, updated,
//! rotated or revoked which key, or created, updated or revoked which
//! client record, when. A capped Redis stream, `<prefix>audit`, read by
//! `keygate keys audit` (and by anyone with `redis-cli XRANGE`).
//!
//! Entries hold IDs and operator names only: never a key or a secret.

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use redis::streams::StreamRangeReply;
use serde::Serialize;

use super::UsageError;
use super::query::redis_error;
use super::schema::UsageKeys;
use crate::key::KeyId;

/// About how many entries the stream keeps (`XADD ... MAXLEN ~`): Redis trims
/// whole internal nodes, so it may hold a hundred or so more.
pub const AUDIT_MAX_LEN: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditAction {
    Issue,
    Update,
    Rotate,
    Revoke,
    #[serde(rename = "client-create")]
    ClientCreate,
    #[serde(rename = "client-update")]
    ClientUpdate,
    #[serde(rename = "client-revoke")]
    ClientRevoke,
}

impl AuditAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issue => "issue",
            Self::Update => "update",
            Self::Rotate => "rotate",
            Self::Revoke => "revoke",
            Self::ClientCreate => "client-create",
            Self::ClientUpdate => "client-update",
            Self::ClientRevoke => "client-revoke",
        }
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuditAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "issue" => Ok(Self::Issue),
            "update" => Ok(Self::Update),
            "rotate" => Ok(Self::Rotate),
            "revoke" => Ok(Self::Revoke),
            "client-create" => Ok(Self::ClientCreate),
            "client-update" => Ok(Self::ClientUpdate),
            "client-revoke" => Ok(Self::ClientRevoke),
            other => Err(format!("unknown audit action `{other}`")),
        }
    }
}

/// One key or client operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    /// Who: `cli:<user>` or `admin:<token name>`.
    pub actor: String,
    pub action: AuditAction,
    /// The client acted on, or the client of the key acted on.
    pub client: String,
    /// The key acted on; `None` for a client operation.
    pub key_id: Option<KeyId>,
    pub at: Timestamp,
    /// Free text, e.g. `new key acme.k2, grace 24h`. Never a secret.
    pub detail: String,
}

impl AuditEntry {
    /// An entry about one key.
    pub fn key(actor: String, action: AuditAction, key_id: &KeyId, at: Timestamp, detail: String) -> Self {
        let client = key_id.client().to_owned();
        Self { actor, action, client, key_id: Some(key_id.clone()), at, detail }
    }

    /// An entry about a client's record.
    pub fn client(actor: String, action: AuditAction, client: &str, at: Timestamp, detail: String) -> Self {
        Self { actor, action, client: client.to_owned(), key_id: None, at, detail }
    }

    /// What was acted on, for a table: the key ID, or the client ID.
    pub fn subject(&self) -> &str {
        self.key_id.as_ref().map_or(&self.client, KeyId::as_str)
    }
}

/// An entry as read back, with its stream ID (`<ms>-<seq>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    pub id: String,
    #[serde(flatten)]
    pub entry: AuditEntry,
}

/// Appends `entry` to the audit stream, trimming it to about
/// [`AUDIT_MAX_LEN`] entries. Returns the entry's stream ID.
pub async fn append_audit(
    conn: &mut impl redis::aio::ConnectionLike,
    prefix: &str,
    entry: &AuditEntry,
) -> Result<String, UsageError> {
    redis::cmd("XADD")
        .arg(UsageKeys::new(prefix).audit())
        .arg("MAXLEN")
        .arg("~")
        .arg(AUDIT_MAX_LEN)
        .arg("*")
        .arg("at")
        .arg(entry.at.as_second())
        .arg("actor")
        .arg(&entry.actor)
        .arg("action")
        .arg(entry.action.as_str())
        .arg("key_id")
        .arg(entry.key_id.as_ref().map_or("", KeyId::as_str))
        .arg("client")
        .arg(&entry.client)
        .arg("detail")
        .arg(&entry.detail)
        .query_async(conn)
        .await
        .map_err(redis_error)
}

/// The latest `limit` entries (of `client` only, if given), oldest first.
/// Entries that cannot be read (hand-written ones) are skipped.
pub async fn read_audit(
    conn: &mut impl redis::aio::ConnectionLike,
    prefix: &str,
    client: Option<&str>,
    limit: usize,
) -> Result<Vec<AuditRecord>, UsageError> {
    let mut cmd = redis::cmd("XREVRANGE");
    cmd.arg(UsageKeys::new(prefix).audit()).arg("+").arg("-");
    if client.is_none() {
        cmd.arg("COUNT").arg(limit);
    }
    // With a client filter the whole (capped) stream is read and filtered here.
    let reply: StreamRangeReply = cmd.query_async(conn).await.map_err(redis_error)?;
    let mut records: Vec<AuditRecord> = reply
        .ids
        .into_iter()
        .filter_map(|item| {
            let text = |name: &str| -> Option<String> { item.get::<String>(name) };
            // A client operation has an empty `key_id` and names its client.
            let key_id: Option<KeyId> = match text("key_id").unwrap_or_default() {
                id if id.is_empty() => None,
                id => Some(id.parse().ok()?),
            };
            let subject_client = match &key_id {
                Some(id) => id.client().to_owned(),
                None => text("client").filter(|c| !c.is_empty())?,
            };
            if client.is_some_and(|c| c != subject_client) {
                return None;
            }
            let entry = AuditEntry {
                actor: text("actor")?,
                action: text("action")?.parse().ok()?,
                client: subject_client,
                key_id,
                at: Timestamp::from_second(text("at")?.parse().ok()?).ok()?,
                detail: text("detail").unwrap_or_default(),
            };
            Some(AuditRecord { id: item.id.clone(), entry })
        })
        .take(limit)
        .collect();
    records.reverse();
    Ok(records)
}

/// The CLI's actor name: `cli:$USER` (or `$LOGNAME`); where neither is set
/// (cron, systemd units, containers), the account name the OS has for the
/// process's user ID; failing that, `cli:uid:N`.
pub fn cli_actor() -> String {
    let env = |name| std::env::var(name).ok().map(|v| clean(&v)).filter(|v| !v.is_empty());
    let account = || {
        let uid = nix::unistd::getuid();
        let name = nix::unistd::User::from_uid(uid).ok().flatten().map(|user| clean(&user.name));
        name.filter(|n| !n.is_empty()).unwrap_or_else(|| format!("uid:{uid}"))
    };
    let user = env("USER").or_else(|| env("LOGNAME")).unwrap_or_else(account);
    format!("cli:{user}")
}

/// A user name as the trail holds it: no control characters.
fn clean(name: &str) -> String {
    name.chars().filter(|c| !c.is_control()).collect()
}
