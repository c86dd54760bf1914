//! The signing key ring in the store's Redis (docs/redis-schema.md,
//! "Signing keys"; this module is the only one that knows the name):
//! one string, `<prefix>tokens:signing-ring`, the ring's JSON. One key, so
//! on a Cluster it lives on one slot and each write is atomic there.

use std::sync::LazyLock;

use async_trait::async_trait;
use redis::AsyncCommands as _;

use super::{Ring, RingError, RingStore};
use crate::store::StoreError;
use crate::store::conn::RedisConn;

/// Replaces the ring if its `version` is still `ARGV[1]`: 1 written,
/// 0 changed meanwhile, -1 no ring (or one that is not JSON).
static REPLACE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        local current = redis.call('GET', KEYS[1])
        if not current then return -1 end
        local ok, ring = pcall(cjson.decode, current)
        if not ok or type(ring) ~= 'table' then return -1 end
        if tonumber(ring.version) ~= tonumber(ARGV[1]) then return 0 end
        redis.call('SET', KEYS[1], ARGV[2])
        return 1
        ",
    )
});

#[derive(Clone)]
pub struct RedisRingStore {
    conn: RedisConn,
    name: String,
}

impl RedisRingStore {
    pub fn new(conn: RedisConn, prefix: &str) -> Self {
        Self { conn, name: format!("{prefix}tokens:signing-ring") }
    }
}

fn unavailable(e: redis::RedisError) -> RingError {
    RingError::Store(StoreError::Unavailable(format!("signing keys: {e}")))
}

#[async_trait]
impl RingStore for RedisRingStore {
    async fn load(&self) -> Result<Option<Ring>, RingError> {
        let text: Option<String> = self.conn.clone().get(&self.name).await.map_err(unavailable)?;
        text.as_deref().map(Ring::from_json).transpose()
    }

    async fn create(&self, ring: &Ring) -> Result<Ring, RingError> {
        // SET NX ... GET (Redis 7): stores ours, or answers theirs, in one
        // atomic step.
        let theirs: Option<String> = redis::cmd("SET")
            .arg(&self.name)
            .arg(ring.to_json())
            .arg("NX")
            .arg("GET")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        match theirs {
            Some(text) => Ring::from_json(&text),
            None => Ok(ring.clone()),
        }
    }

    async fn replace(&self, expected: u64, next: &Ring) -> Result<bool, RingError> {
        let written: i64 = REPLACE
            .key(&self.name)
            .arg(expected)
            .arg(next.to_json())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        match written {
            1 => Ok(true),
            0 => Ok(false),
            _ => Err(RingError::Corrupt(format!("`{}` is missing or not JSON", self.name))),
        }
    }
}
