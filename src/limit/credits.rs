//! Usage credits (Unkey's "remaining"): a count of uses granted to a key or
//! a client (`--uses 1000`), spent by each admitted request (the route's
//! `cost`), optionally refilled per window (`--refill 1000/month`).
//!
//! Unlike a quota, credits are money-like: they are never leased, never
//! estimated, never spent beyond zero. Every admitted request with credits
//! makes one check-and-decrement at the authority that holds the count:
//!
//! - Redis (the store's Redis): one Lua script per request on
//!   `<prefix>{<client>}:credits:key:<kid>` (or `...:credits:client`), a hash
//!   `{remaining, window, granted}` in the client's slot. Exact across every
//!   gateway sharing that Redis. Redis unreachable: the gateway cannot vouch
//!   for the count, so the request gets 503 (`fail_open` does not apply).
//! - The file store's folder: the same state as a small TOML file per owner in
//!   `<dir>/.credits/`, read and rewritten under an exclusive file lock (flock)
//!   for each request. Exact for every process sharing the folder on a local
//!   file system, and it survives a restart. The files are hidden, so the
//!   key folder's watcher ignores them.
//! - In memory: for a gateway built without either (tests, benches); exact in
//!   one process, forgotten at exit.
//!
//! A refill is applied lazily: the state names the refill window it was last
//! filled in, and the first request in a later window sets the count to the
//! refill amount. The window is computed here from the caller's clock and
//! passed to the authority, so tests drive refills with explicit timestamps.
//!
//! The grant's stamp (`granted_at`, see [`CreditGrant`]) makes a new grant
//! (`keys update --uses N`) restart the count without the CLI touching the
//! authority: a state of an older grant is replaced, one of a newer grant is
//! kept (a gateway still caching the old record cannot undo the reset).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::quota::Window;
use crate::meta::CreditGrant;

/// Whose credits: a key's own, or its client's (shared by all its keys).
/// The two never share a counter: the Redis names and file names differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner<'a> {
    /// A key ID, `<client>.<kid>`.
    Key(&'a str),
    /// A client ID.
    Client(&'a str),
}

impl Owner<'_> {
    /// The client whose Redis slot holds the count.
    fn client(&self) -> &str {
        match self {
            Self::Key(id) => id.split_once('.').map_or(*id, |(client, _)| client),
            Self::Client(client) => client,
        }
    }

    /// `<prefix>{<client>}:credits:key:<kid>` or `<prefix>{<client>}:credits:client`.
    pub fn redis_key(&self, prefix: &str) -> String {
        let client = self.client();
        match self {
            Self::Key(id) => {
                let kid = id.split_once('.').map_or("", |(_, kid)| kid);
                format!("{prefix}{{{client}}}:credits:key:{kid}")
            }
            Self::Client(_) => format!("{prefix}{{{client}}}:credits:client"),
        }
    }

    /// The state file's name in `.credits/`: `key.<client>.<kid>.toml` or
    /// `client.<client>.toml`. IDs hold only `[A-Za-z0-9._-]`, checked at
    /// parse, so the name stays inside the folder.
    fn file_stem(&self) -> Option<String> {
        let (kind, id) = match self {
            Self::Key(id) => ("key", *id),
            Self::Client(id) => ("client", *id),
        };
        let safe = !id.is_empty()
            && !id.starts_with('.')
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        safe.then(|| format!("{kind}.{id}"))
    }

    fn memory_key(&self) -> String {
        match self {
            Self::Key(id) => format!("key:{id}"),
            Self::Client(id) => format!("client:{id}"),
        }
    }
}

/// The outcome of [`Credits::take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// `cost` credits were spent; hand this to [`Credits::refund`] if a
    /// later step refuses the request.
    Taken(Taken),
    /// Fewer than `cost` credits are left; nothing was spent.
    /// `retry_after`: until the next refill, if the grant has one.
    Exhausted { remaining: u64, retry_after: Option<Duration> },
}

/// Credits spent by one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// What is left after this request.
    pub remaining: u64,
    /// Which grant and refill window they came from: a refund puts them back
    /// only into the same ones (never into a fresh grant or refill).
    state: Stamp,
    cost: u64,
}

/// Why the authority could not decide. Never holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum CreditsError {
    /// Redis or the folder could not be reached or written.
    #[error("credits unavailable: {0}")]
    Unavailable(String),
    /// The stored count cannot be read (hand-edited, truncated by a crash).
    /// Not replaced by a fresh grant: that would hand out credits.
    #[error("credits state unreadable: {0}")]
    Corrupt(String),
}

/// The count held for one owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    remaining: u64,
    /// Start (Unix seconds) of the refill window last filled in; 0 without refill.
    window: i64,
    /// The grant's stamp, Unix milliseconds.
    granted: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    window: i64,
    granted: i64,
}

/// What a request asks of the authority, computed from the grant and the clock.
#[derive(Debug, Clone, Copy)]
struct Ask {
    uses: u64,
    /// 0: no refill.
    refill: u64,
    window: i64,
    granted: i64,
    /// Until the next refill, if any.
    next_refill: Option<Duration>,
}

impl Ask {
    fn new(grant: &CreditGrant, now: Timestamp) -> Self {
        let (refill, window, next_refill) = match grant.refill {
            Some(refill) => {
                let window = Window::containing(refill.window.as_quota_window(), now);
                (refill.amount, window.start.as_second(), Some(window.until_reset(now)))
            }
            None => (0, 0, None),
        };
        Self { uses: grant.uses, refill, window, granted: grant.granted_at.as_millisecond(), next_refill }
    }

    /// The state a request sees before spending: a fresh grant, a refill, or
    /// what was stored. The Redis script below does exactly this in Lua.
    fn settle(&self, stored: Option<State>) -> State {
        match stored {
            Some(s) if s.granted > self.granted => s,
            Some(s) if s.granted == self.granted => {
                if self.refill > 0 && s.window < self.window {
                    State { remaining: self.refill, window: self.window, ..s }
                } else {
                    s
                }
            }
            _ => State { remaining: self.uses, window: self.window, granted: self.granted },
        }
    }

    fn outcome(&self, state: State, cost: u64, spent: bool) -> Take {
        if spent {
            let stamp = Stamp { window: state.window, granted: state.granted };
            Take::Taken(Taken { remaining: state.remaining, state: stamp, cost })
        } else {
            Take::Exhausted { remaining: state.remaining, retry_after: self.next_refill }
        }
    }
}

/// Spends `cost` of `state` if it holds that much; says whether it did.
fn spend(state: &mut State, cost: u64) -> bool {
    match state.remaining.checked_sub(cost) {
        Some(left) => {
            state.remaining = left;
            true
        }
        None => false,
    }
}

// === The authority ===

/// The credit authority of this gateway (or CLI): where counts are kept.
#[derive(Clone)]
pub struct Credits {
    authority: Authority,
}

#[derive(Clone)]
enum Authority {
    Redis {
        conn: crate::store::conn::RedisConn,
        prefix: String,
    },
    Folder(PathBuf),
    /// A std mutex: held for a map lookup and a subtraction, never across an await.
    Memory(Arc<Mutex<HashMap<String, State>>>),
}

impl Credits {
    /// Counts in the store's Redis, under the store's prefix.
    pub fn redis(conn: impl Into<crate::store::conn::RedisConn>, prefix: &str) -> Self {
        Self { authority: Authority::Redis { conn: conn.into(), prefix: prefix.to_owned() } }
    }

    /// Counts in `<key folder>/.credits/`.
    pub fn folder(key_dir: &Path) -> Self {
        Self { authority: Authority::Folder(key_dir.join(".credits")) }
    }

    /// Counts in this process only.
    pub fn memory() -> Self {
        Self { authority: Authority::Memory(Arc::default()) }
    }

    /// The authority for a store: its Redis if it has one, else the file
    /// store's folder named by `config`.
    pub fn for_store(store: &dyn crate::store::KeyStore, config: &crate::config::StoreConfig) -> Self {
        match (store.redis(), config) {
            (Some(redis), _) => Self::redis(redis.conn, &redis.prefix),
            (None, crate::config::StoreConfig::File { dir }) => Self::folder(dir),
            (None, crate::config::StoreConfig::Redis { .. }) => Self::memory(),
        }
    }

    /// Spends `cost` of `owner`'s credits under `grant`, now.
    pub async fn take(
        &self,
        owner: Owner<'_>,
        grant: &CreditGrant,
        cost: NonZeroU32,
    ) -> Result<Take, CreditsError> {
        self.take_at(owner, grant, cost, Timestamp::now()).await
    }

    /// [`Credits::take`] at `now` (which picks the refill window).
    pub async fn take_at(
        &self,
        owner: Owner<'_>,
        grant: &CreditGrant,
        cost: NonZeroU32,
        now: Timestamp,
    ) -> Result<Take, CreditsError> {
        let ask = Ask::new(grant, now);
        let cost = u64::from(cost.get());
        match &self.authority {
            Authority::Redis { conn, prefix } => {
                let key = owner.redis_key(prefix);
                let (spent, remaining, window, granted): (i64, u64, i64, i64) = scripts::TAKE
                    .key(&key)
                    .arg(ask.uses)
                    .arg(ask.refill)
                    .arg(ask.window)
                    .arg(ask.granted)
                    .arg(cost)
                    .invoke_async(&mut conn.clone())
                    .await
                    .map_err(|e| redis_error(&key, &e))?;
                Ok(ask.outcome(State { remaining, window, granted }, cost, spent == 1))
            }
            Authority::Folder(dir) => {
                let path = state_path(dir, owner)?;
                let (state, spent) = blocking(move || {
                    with_state_file(&path, |stored| {
                        let mut state = ask.settle(stored);
                        let spent = spend(&mut state, cost);
                        (Some(state), (state, spent))
                    })
                })
                .await?;
                Ok(ask.outcome(state, cost, spent))
            }
            Authority::Memory(map) => {
                let mut map = super::lock(map);
                let entry = map.entry(owner.memory_key());
                let state = match entry {
                    std::collections::hash_map::Entry::Occupied(mut e) => {
                        let settled = ask.settle(Some(*e.get()));
                        e.insert(settled);
                        e.into_mut()
                    }
                    std::collections::hash_map::Entry::Vacant(e) => e.insert(ask.settle(None)),
                };
                let spent = spend(state, cost);
                Ok(ask.outcome(*state, cost, spent))
            }
        }
    }

    /// Gives back what `taken` spent, when a later step refused the request.
    /// Only into the same grant and refill window: after a reset or a refill
    /// the credits are not given twice. Best effort: a refund that fails is
    /// logged and the credits stay spent (under-serving, never over-serving).
    pub async fn refund(&self, owner: Owner<'_>, taken: &Taken) {
        if let Err(error) = self.try_refund(owner, taken).await {
            tracing::warn!(%error, "credits refund failed; the credits stay spent");
        }
    }

    async fn try_refund(&self, owner: Owner<'_>, taken: &Taken) -> Result<(), CreditsError> {
        let Stamp { window, granted } = taken.state;
        let cost = taken.cost;
        match &self.authority {
            Authority::Redis { conn, prefix } => {
                let key = owner.redis_key(prefix);
                let _: i64 = scripts::REFUND
                    .key(&key)
                    .arg(window)
                    .arg(granted)
                    .arg(cost)
                    .invoke_async(&mut conn.clone())
                    .await
                    .map_err(|e| redis_error(&key, &e))?;
                Ok(())
            }
            Authority::Folder(dir) => {
                let path = state_path(dir, owner)?;
                blocking(move || {
                    with_state_file(&path, |stored| match stored {
                        Some(mut s) if s.window == window && s.granted == granted => {
                            s.remaining = s.remaining.saturating_add(cost);
                            (Some(s), ())
                        }
                        other => (other, ()),
                    })
                })
                .await
            }
            Authority::Memory(map) => {
                if let Some(s) = super::lock(map).get_mut(&owner.memory_key())
                    && s.window == window
                    && s.granted == granted
                {
                    s.remaining = s.remaining.saturating_add(cost);
                }
                Ok(())
            }
        }
    }

    /// What `owner` has left under `grant` at `now`, without spending
    /// (`keys show`). A refill due is counted as done.
    pub async fn remaining_at(
        &self,
        owner: Owner<'_>,
        grant: &CreditGrant,
        now: Timestamp,
    ) -> Result<u64, CreditsError> {
        let ask = Ask::new(grant, now);
        let stored = match &self.authority {
            Authority::Redis { conn, prefix } => {
                let key = owner.redis_key(prefix);
                let fields: (Option<String>, Option<String>, Option<String>) = redis::cmd("HMGET")
                    .arg(&key)
                    .arg("remaining")
                    .arg("window")
                    .arg("granted")
                    .query_async(&mut conn.clone())
                    .await
                    .map_err(|e| redis_error(&key, &e))?;
                match fields {
                    (None, _, _) => None,
                    (Some(remaining), window, granted) => {
                        let number = |v: Option<&str>| v.unwrap_or("0").parse::<i64>().ok();
                        match (
                            remaining.parse::<u64>().ok(),
                            number(window.as_deref()),
                            number(granted.as_deref()),
                        ) {
                            (Some(remaining), Some(window), Some(granted)) => {
                                Some(State { remaining, window, granted })
                            }
                            _ => {
                                return Err(CreditsError::Corrupt(format!("redis key `{key}`: not numbers")));
                            }
                        }
                    }
                }
            }
            Authority::Folder(dir) => {
                let path = state_path(dir, owner)?;
                blocking(move || read_state(&path)).await?
            }
            Authority::Memory(map) => super::lock(map).get(&owner.memory_key()).copied(),
        };
        Ok(ask.settle(stored).remaining)
    }

    /// [`Credits::remaining_at`] now.
    pub async fn remaining(&self, owner: Owner<'_>, grant: &CreditGrant) -> Result<u64, CreditsError> {
        self.remaining_at(owner, grant, Timestamp::now()).await
    }
}

fn redis_error(key: &str, error: &redis::RedisError) -> CreditsError {
    // A script error means the hash holds something that is not a count.
    if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) {
        CreditsError::Corrupt(format!("redis key `{key}`: {error}"))
    } else {
        CreditsError::Unavailable(error.to_string())
    }
}

// === Folder authority ===

fn state_path(dir: &Path, owner: Owner<'_>) -> Result<PathBuf, CreditsError> {
    let stem = owner
        .file_stem()
        .ok_or_else(|| CreditsError::Corrupt(format!("owner {owner:?} is not a file name")))?;
    Ok(dir.join(format!("{stem}.toml")))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, CreditsError> + Send + 'static,
) -> Result<T, CreditsError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| CreditsError::Unavailable(e.to_string()))?
}

/// Runs `change` on the owner's state under an exclusive lock on
/// `<file>.lock` (held by every process that reads or writes the state), and
/// writes what it returns. The state itself is replaced by a rename, so a
/// crash mid-write leaves the old count or the new one, never a torn file.
fn with_state_file<T>(
    path: &Path,
    change: impl FnOnce(Option<State>) -> (Option<State>, T),
) -> Result<T, CreditsError> {
    let unavailable = |what: &str, e: std::io::Error| {
        CreditsError::Unavailable(format!("credits file {}: {what}: {e}", path.display()))
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| unavailable("creating its folder", e))?;
    let lock_path = path.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| unavailable("opening its lock", e))?;
    lock.lock().map_err(|e| unavailable("locking", e))?;
    let before = read_state(path)?;
    let (after, answer) = change(before);
    if let Some(after) = after.filter(|a| Some(*a) != before) {
        let text = toml::to_string(&after).map_err(|e| CreditsError::Corrupt(e.to_string()))?;
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let written = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(text.as_bytes())?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(unavailable("writing", e));
        }
    }
    // Unlocked when `lock` is closed, here.
    Ok(answer)
}

/// The stored state; `None` if there is none yet. A file that exists but
/// does not parse is an error, never a fresh grant.
fn read_state(path: &Path) -> Result<Option<State>, CreditsError> {
    let mut text = String::new();
    match std::fs::File::open(path) {
        Ok(mut file) => file.read_to_string(&mut text).map_err(|e| {
            CreditsError::Unavailable(format!("credits file {}: reading: {e}", path.display()))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CreditsError::Unavailable(format!("credits file {}: {e}", path.display()))),
    };
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| CreditsError::Corrupt(format!("credits file {}: {}", path.display(), e.message())))
}

// === Scripts ===

mod scripts {
    use std::sync::LazyLock;

    /// KEYS[1]: the owner's credits hash. ARGV: uses, refill amount (0 =
    /// none), current refill window start, grant stamp, cost.
    /// Returns {spent (1/0), remaining, window, granted}. Mirrors `Ask::settle`.
    /// Counts are Lua numbers (doubles): exact because `meta` caps them at 10^15.
    pub(super) static TAKE: LazyLock<redis::Script> = LazyLock::new(|| {
        redis::Script::new(
            r"
            local raw = redis.call('HMGET', KEYS[1], 'remaining', 'window', 'granted')
            local uses, refill = tonumber(ARGV[1]), tonumber(ARGV[2])
            local window, granted, cost = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
            local remaining, w, g = tonumber(raw[1]), tonumber(raw[2] or '0'), tonumber(raw[3] or '0')
            if raw[1] and (remaining == nil or w == nil or g == nil) then
                return redis.error_reply('credits state is not numbers')
            end
            if remaining == nil or g < granted then
                remaining, w, g = uses, window, granted
            elseif g == granted and refill > 0 and w < window then
                remaining, w = refill, window
            end
            local spent = 0
            if remaining >= cost then
                remaining = remaining - cost
                spent = 1
            end
            redis.call('HSET', KEYS[1], 'remaining', string.format('%d', remaining),
                'window', string.format('%d', w), 'granted', string.format('%d', g))
            return {spent, string.format('%d', remaining), string.format('%d', w), string.format('%d', g)}
            ",
        )
    });

    /// KEYS[1]: the owner's credits hash. ARGV: window, grant stamp, cost.
    /// Gives `cost` back only if the hash is still in that grant and window.
    pub(super) static REFUND: LazyLock<redis::Script> = LazyLock::new(|| {
        redis::Script::new(
            r"
            local raw = redis.call('HMGET', KEYS[1], 'window', 'granted')
            if raw[1] == ARGV[1] and raw[2] == ARGV[2] then
                redis.call('HINCRBY', KEYS[1], 'remaining', ARGV[3])
                return 1
            end
            return 0
            ",
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{Refill, RefillWindow};

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn grant(uses: u64, refill: Option<&str>, granted_at: &str) -> CreditGrant {
        CreditGrant { uses, refill: refill.map(|r| r.parse().unwrap()), granted_at: at(granted_at) }
    }

    const COST: NonZeroU32 = NonZeroU32::MIN;

    async fn take(credits: &Credits, grant: &CreditGrant, now: &str) -> Take {
        credits.take_at(Owner::Key("acme.k1"), grant, COST, at(now)).await.unwrap()
    }

    fn remaining(take: Take) -> Option<u64> {
        match take {
            Take::Taken(t) => Some(t.remaining),
            Take::Exhausted { .. } => None,
        }
    }

    #[test]
    fn owners_of_a_key_and_of_a_client_never_share_a_name() {
        assert_eq!(Owner::Key("acme.k1").redis_key("kg:"), "kg:{acme}:credits:key:k1");
        assert_eq!(Owner::Client("acme").redis_key("kg:"), "kg:{acme}:credits:client");
        assert_eq!(Owner::Key("acme.k1").file_stem().unwrap(), "key.acme.k1");
        assert_eq!(Owner::Client("acme").file_stem().unwrap(), "client.acme");
        assert!(Owner::Key("../etc").file_stem().is_none());
        assert!(Owner::Key("a/b").file_stem().is_none());
    }

    #[tokio::test]
    async fn memory_credits_count_down_to_zero_then_refuse_without_retry_after() {
        let credits = Credits::memory();
        let g = grant(2, None, "2026-01-01T00:00:00Z");
        assert_eq!(remaining(take(&credits, &g, "2026-01-02T00:00:00Z").await), Some(1));
        assert_eq!(remaining(take(&credits, &g, "2026-01-02T00:00:00Z").await), Some(0));
        assert_eq!(
            take(&credits, &g, "2026-01-02T00:00:00Z").await,
            Take::Exhausted { remaining: 0, retry_after: None }
        );
    }

    #[tokio::test]
    async fn a_refill_sets_the_count_at_the_next_window_and_says_when() {
        let credits = Credits::memory();
        let g = grant(1, Some("5/day"), "2026-01-01T00:00:00Z");
        assert_eq!(remaining(take(&credits, &g, "2026-01-02T10:00:00Z").await), Some(0));
        assert_eq!(
            take(&credits, &g, "2026-01-02T23:59:00Z").await,
            Take::Exhausted { remaining: 0, retry_after: Some(Duration::from_secs(60)) }
        );
        // Next day: refilled to 5 (set, not added), one spent.
        assert_eq!(remaining(take(&credits, &g, "2026-01-03T00:00:01Z").await), Some(4));
        let left = credits.remaining_at(Owner::Key("acme.k1"), &g, at("2026-01-04T00:00:00Z")).await.unwrap();
        assert_eq!(left, 5, "a refill due is shown as done");
    }

    #[tokio::test]
    async fn a_newer_grant_restarts_the_count_and_an_older_one_does_not_undo_it() {
        let credits = Credits::memory();
        let old = grant(3, None, "2026-01-01T00:00:00Z");
        let new = grant(10, None, "2026-01-05T00:00:00Z");
        take(&credits, &old, "2026-01-02T00:00:00Z").await;
        assert_eq!(remaining(take(&credits, &new, "2026-01-06T00:00:00Z").await), Some(9));
        // A gateway still caching the old record spends from the new count.
        assert_eq!(remaining(take(&credits, &old, "2026-01-06T00:00:00Z").await), Some(8));
    }

    #[tokio::test]
    async fn a_refund_returns_credits_only_to_the_grant_and_window_they_came_from() {
        let credits = Credits::memory();
        let owner = Owner::Key("acme.k1");
        let g = grant(2, Some("2/day"), "2026-01-01T00:00:00Z");
        let Take::Taken(taken) = take(&credits, &g, "2026-01-02T10:00:00Z").await else { panic!() };
        credits.refund(owner, &taken).await;
        assert_eq!(credits.remaining_at(owner, &g, at("2026-01-02T10:00:00Z")).await.unwrap(), 2);
        let Take::Taken(taken) = take(&credits, &g, "2026-01-02T23:00:00Z").await else { panic!() };
        take(&credits, &g, "2026-01-03T01:00:00Z").await; // refilled to 2, one spent
        credits.refund(owner, &taken).await; // from yesterday: not given again
        assert_eq!(credits.remaining_at(owner, &g, at("2026-01-03T01:00:00Z")).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn folder_credits_persist_and_a_torn_file_is_refused_not_regranted() {
        let dir = tempfile::tempdir().unwrap();
        let g = grant(3, None, "2026-01-01T00:00:00Z");
        let credits = Credits::folder(dir.path());
        assert_eq!(remaining(take(&credits, &g, "2026-01-02T00:00:00Z").await), Some(2));
        // Another authority on the same folder (a restart, another process) continues.
        let again = Credits::folder(dir.path());
        assert_eq!(remaining(take(&again, &g, "2026-01-02T00:00:00Z").await), Some(1));
        let file = dir.path().join(".credits/key.acme.k1.toml");
        std::fs::write(&file, "remaining = ").unwrap();
        let error = again.take_at(Owner::Key("acme.k1"), &g, COST, at("2026-01-02T00:00:00Z")).await;
        assert!(matches!(error, Err(CreditsError::Corrupt(_))), "{error:?}");
    }

    #[test]
    fn refill_windows_are_those_of_quotas() {
        let refill: Refill = "10/h".parse().unwrap();
        assert_eq!(refill.window, RefillWindow::Every(Duration::from_secs(3600)));
        let ask = Ask::new(
            &CreditGrant { uses: 1, refill: Some(refill), granted_at: at("2026-01-01T00:00:00Z") },
            at("2026-01-01T10:30:00Z"),
        );
        assert_eq!(ask.window, at("2026-01-01T10:00:00Z").as_second());
        assert_eq!(ask.next_refill, Some(Duration::from_secs(1800)));
    }
}
