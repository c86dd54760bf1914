//! Refresh tokens in the store's Redis (layout in docs/redis-schema.md,
//! "Refresh tokens"; this module is the only one that knows it).
//!
//! - `<prefix>{<client>}:refresh:<sha256hex>`: a hash, one token's record,
//!   expiring with the token;
//! - `<prefix>{<client>}:rfam:<family>`: a set of the `<sha256hex>` of every
//!   token of the family, expiring with its newest token.
//!
//! Both carry the client's hash tag, so each write is one Lua script on one
//! Cluster slot. The scripts reach the family's records by name from the
//! set's members rather than as declared `KEYS`: the members are not known
//! before the script runs, and every one of them is in the same slot.

use std::sync::LazyLock;

use async_trait::async_trait;
use redis::AsyncCommands as _;

use super::{RefreshRecord, RefreshState, RefreshStore, Rotation, TokenHash};
use crate::key::{KeyId, SecretHash};
use crate::store::StoreError;
use crate::store::conn::RedisConn;

/// Refresh tokens beside the keys, under the store's prefix.
#[derive(Clone)]
pub struct RedisRefreshStore {
    conn: RedisConn,
    prefix: String,
}

impl RedisRefreshStore {
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        Self { conn, prefix: prefix.to_owned() }
    }

    /// `<prefix>{<client>}:`, which every name of the client starts with.
    fn base(&self, client: &str) -> String {
        format!("{}{{{client}}}:", self.prefix)
    }

    fn record_key(&self, client: &str, hash: &TokenHash) -> String {
        format!("{}refresh:{}", self.base(client), hash.to_hex())
    }

    fn family_key(&self, client: &str, family: &str) -> String {
        format!("{}rfam:{family}", self.base(client))
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("refresh tokens: {e}"))
}

/// Seconds from `now` to `expires_at`, at least 1 (`EXPIRE 0` deletes).
fn ttl(record: &RefreshRecord, now: u64) -> u64 {
    record.expires_at.saturating_sub(now).max(1)
}

/// The fields the scripts write for a new record, family and state aside.
fn fields(record: &RefreshRecord) -> [(&'static str, String); 4] {
    [
        ("key_id", record.key_id.as_str().to_owned()),
        ("key_hash", record.key_hash.to_hex()),
        ("scope", record.scope.clone()),
        ("expires_at", record.expires_at.to_string()),
    ]
}

fn decode(what: &str, map: &std::collections::HashMap<String, String>) -> Result<RefreshRecord, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt { what: what.to_owned(), why: why.to_owned() };
    let field = |name: &str| map.get(name).ok_or_else(|| corrupt(&format!("no `{name}`")));
    Ok(RefreshRecord {
        key_id: field("key_id")?.parse::<KeyId>().map_err(|_| corrupt("bad `key_id`"))?,
        key_hash: SecretHash::from_hex(field("key_hash")?).ok_or_else(|| corrupt("bad `key_hash`"))?,
        scope: field("scope")?.clone(),
        family: field("family")?.clone(),
        state: RefreshState::parse(field("state")?).ok_or_else(|| corrupt("bad `state`"))?,
        expires_at: field("expires_at")?.parse().map_err(|_| corrupt("bad `expires_at`"))?,
    })
}

#[async_trait]
impl RefreshStore for RedisRefreshStore {
    async fn insert(&self, hash: &TokenHash, record: &RefreshRecord) -> Result<(), StoreError> {
        let client = record.client();
        let now = unix_now();
        let mut invocation = INSERT.key(self.record_key(client, hash));
        invocation
            .key(self.family_key(client, &record.family))
            .arg(hash.to_hex())
            .arg(ttl(record, now))
            .arg("family")
            .arg(&record.family)
            .arg("state")
            .arg(RefreshState::Active.as_str());
        for (name, value) in fields(record) {
            invocation.arg(name).arg(value);
        }
        let _: i64 = invocation.invoke_async(&mut self.conn.clone()).await.map_err(unavailable)?;
        Ok(())
    }

    async fn get(
        &self,
        client: &str,
        hash: &TokenHash,
        now: u64,
    ) -> Result<Option<RefreshRecord>, StoreError> {
        let key = self.record_key(client, hash);
        let map: std::collections::HashMap<String, String> =
            self.conn.clone().hgetall(&key).await.map_err(unavailable)?;
        if map.is_empty() {
            return Ok(None);
        }
        let record = decode(&key, &map)?;
        // The key's TTL is whole seconds and lags; the record's own time rules.
        Ok((record.expires_at > now && record.client() == client).then_some(record))
    }

    async fn rotate(
        &self,
        client: &str,
        old: &TokenHash,
        new: &TokenHash,
        record: &RefreshRecord,
        now: u64,
    ) -> Result<Rotation, StoreError> {
        let mut invocation = ROTATE.key(self.record_key(client, old));
        invocation
            .key(self.record_key(client, new))
            .arg(self.base(client))
            .arg(now)
            .arg(new.to_hex())
            .arg(ttl(record, now));
        for (name, value) in fields(record) {
            invocation.arg(name).arg(value);
        }
        let code: i64 = invocation.invoke_async(&mut self.conn.clone()).await.map_err(unavailable)?;
        Ok(match code {
            1 => Rotation::Rotated,
            2 => Rotation::Reused,
            _ => Rotation::Gone,
        })
    }

    async fn revoke_family(&self, client: &str, family: &str) -> Result<(), StoreError> {
        let mut invocation = REVOKE_FAMILY.key(self.family_key(client, family));
        invocation.arg(self.base(client));
        let _: i64 = invocation.invoke_async(&mut self.conn.clone()).await.map_err(unavailable)?;
        Ok(())
    }
}

fn unix_now() -> u64 {
    u64::try_from(jiff::Timestamp::now().as_second()).unwrap_or(0)
}

// === Scripts ===

/// Marks every record of the family set `fam` revoked. `base` is the
/// client's name prefix (`<prefix>{<client>}:`).
const REVOKE_LOOP: &str = r"
local function revoke(base, fam)
  for _, member in ipairs(redis.call('SMEMBERS', fam)) do
    local record = base .. 'refresh:' .. member
    if redis.call('EXISTS', record) == 1 then redis.call('HSET', record, 'state', 'revoked') end
  end
end
";

/// KEYS: record, family set. ARGV: hash hex, TTL, then field/value pairs.
static INSERT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        redis.call('HSET', KEYS[1], unpack(ARGV, 3))
        redis.call('EXPIRE', KEYS[1], ARGV[2])
        redis.call('SADD', KEYS[2], ARGV[1])
        if redis.call('TTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
        return 1
        ",
    )
});

/// KEYS: old record, new record. ARGV: client base, now, new hash hex,
/// new TTL, then the new record's field/value pairs (family and state are
/// the script's). 1 = rotated, 2 = reused (family revoked), 0 = gone.
static ROTATE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{REVOKE_LOOP}
        local state = redis.call('HGET', KEYS[1], 'state')
        local family = redis.call('HGET', KEYS[1], 'family')
        local expires = tonumber(redis.call('HGET', KEYS[1], 'expires_at') or '0') or 0
        if not state or not family or expires <= tonumber(ARGV[2]) then return 0 end
        local fam = ARGV[1] .. 'rfam:' .. family
        if state == 'used' then
          revoke(ARGV[1], fam)
          return 2
        end
        if state ~= 'active' then return 0 end
        redis.call('HSET', KEYS[1], 'state', 'used')
        redis.call('HSET', KEYS[2], 'family', family, 'state', 'active', unpack(ARGV, 5))
        redis.call('EXPIRE', KEYS[2], ARGV[4])
        redis.call('SADD', fam, ARGV[3])
        if redis.call('TTL', fam) < tonumber(ARGV[4]) then redis.call('EXPIRE', fam, ARGV[4]) end
        return 1
        "
    ))
});

/// KEYS: family set. ARGV: client base.
static REVOKE_FAMILY: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{REVOKE_LOOP}
        revoke(ARGV[1], KEYS[1])
        return 1
        "
    ))
});
