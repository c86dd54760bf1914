//! The Redis store: key records in plain Redis hashes, the production store.
//!
//! Layout (documented for operators and dashboards in `docs/redis-schema.md`;
//! keep the two in step). With the default prefix `kg:`:
//!
//! | key                              | type   | holds                                   |
//! |----------------------------------|--------|-----------------------------------------|
//! | `kg:{<client>}:key:<sha256hex>`  | hash   | one key record (fields below)           |
//! | `kg:{<client>}:id:<kid>`         | string | the record's `<sha256hex>`              |
//! | `kg:{<client>}:keys`             | set    | the client's kids                       |
//! | `kg:{<client>}:client`           | hash   | the client's record, if it has one      |
//! | `kg:clients`                     | set    | every client that ever had a key or a record |
//! | `kg:invalidate`                  | channel| hash hex of each written record, `client:<id>`, or `*` |
//!
//! Why this shape:
//! - Verification knows the client (it is readable in the key string) and the
//!   secret's hash, so it names the record's key directly: one `HGETALL`, one
//!   round trip, no index lookup.
//! - Every key of one client carries the hash tag `{<client>}`, so in Redis
//!   Cluster they share a slot and a client's writes can be one atomic script.
//!   `kg:clients` lives in another slot and is written separately, first, so a
//!   record never exists without its client being listed.
//! - Writes are Lua scripts rather than `MULTI`/`EXEC`: `insert` must fail if
//!   the ID exists and `update` if it does not, and a check-then-write is only
//!   atomic inside a script (`WATCH` needs a dedicated connection, and
//!   [`ConnectionManager`] multiplexes one). The script publishes the
//!   invalidation itself, so a write and its announcement cannot come apart.
//! - A client's record carries the same hash tag as its keys, so a
//!   verification reads the key and its client in one pipelined round trip
//!   (two `HGETALL`s on one node), and client writes are one script too.
//! - Fields are plain strings (`rate` = `100/s`, timestamps = Unix seconds) so
//!   `redis-cli` and any dashboard read them without keygate's help.
//!
//! Invalidations reach other gateways through pub/sub. A background task holds
//! a dedicated pub/sub connection, reconnects with backoff when it drops, and
//! after every (re)subscription sends [`Invalidation::All`]: whatever was
//! published while it was away is lost, so every cached record is suspect.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use jiff::Timestamp;
use tokio::sync::{broadcast, oneshot};

use super::conn::{ConnTimeouts, RedisConn, RedisTarget};
use super::{Found, Invalidation, KeyRecord, KeyStore, Page, StoreError};
use crate::client::{ClientMeta, ClientRecord};
use crate::key::{KeyId, SecretHash};
use crate::meta::{CreditGrant, KeyMeta, KeyStatus};
use crate::redis_target::{Endpoint, RedisTls};

/// How many invalidations a slow subscriber may fall behind before it sees
/// `RecvError::Lagged` (which it must treat like [`Invalidation::All`]).
const INVALIDATION_BUFFER: usize = 1024;

/// The prefix used when the configuration does not name one.
pub const DEFAULT_PREFIX: &str = "kg:";

/// What starts an invalidation message about a client record: `client:acme`.
const CLIENT_MESSAGE: &str = "client:";

/// Timeouts and backoff of a [`RedisStore`]. The defaults suit a Redis on the
/// same network: a dead Redis costs a request at most `call_timeout`.
#[derive(Debug, Clone)]
pub struct RedisStoreOptions {
    /// Limit on establishing one TCP (and TLS/AUTH) connection.
    pub connect_timeout: Duration,
    /// Limit on one command's answer on an established connection.
    pub response_timeout: Duration,
    /// Limit on a whole store call, including waiting for a reconnect in
    /// progress. This is what bounds the gateway's latency when Redis is down.
    pub call_timeout: Duration,
    /// Connection attempts the connection manager makes per reconnect before
    /// failing the calls waiting on it (the next call starts a new reconnect).
    pub reconnect_retries: usize,
    /// First and longest pause between the pub/sub task's reconnect attempts.
    pub resubscribe_min_delay: Duration,
    pub resubscribe_max_delay: Duration,
    /// How often the pub/sub task pings its connection, to notice a connection
    /// that died without a TCP reset (a silent network partition).
    pub pubsub_ping_interval: Duration,
    /// If Redis does not answer at connect: fail (the CLI, which should say
    /// so and exit) or return a store that connects on first use and
    /// answers `Unavailable` until then (`keygate serve`, which must come
    /// up and serve what needs no store even while Redis is down).
    pub connect_lazily_if_down: bool,
    /// TLS files for a `rediss://` URL (`[store] tls_ca`, ...); none: the
    /// system's roots, no client certificate.
    pub tls: RedisTls,
}

impl Default for RedisStoreOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            call_timeout: Duration::from_secs(2),
            reconnect_retries: 2,
            resubscribe_min_delay: Duration::from_millis(50),
            resubscribe_max_delay: Duration::from_secs(5),
            pubsub_ping_interval: Duration::from_secs(5),
            connect_lazily_if_down: false,
            tls: RedisTls::default(),
        }
    }
}

/// Key records in Redis. Cheap to share behind an `Arc`; every call clones the
/// multiplexed connection handle, so calls from many tasks run concurrently.
///
/// Dropping the store stops its pub/sub task.
pub struct RedisStore {
    /// Auto-reconnecting multiplexed connection for every command (one
    /// node, a cluster or a Sentinel-managed primary).
    conn: RedisConn,
    /// For parts that need a connection of their own (usage writes, whose
    /// pipelines must not hold up key lookups on `conn`).
    target: RedisTarget,
    names: KeyNames,
    options: RedisStoreOptions,
    /// `host:port` (or socket path): what error messages name. Never the URL,
    /// which may hold a password.
    addr: String,
    redactor: Redactor,
    /// Kept to hand out receivers; the pub/sub task holds a clone to send.
    invalidations: broadcast::Sender<Invalidation>,
    /// Dropped with the store; the pub/sub task sees the channel close and ends.
    _stop_subscriber: oneshot::Sender<()>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore").field("addr", &self.addr).field("prefix", &self.names.prefix).finish()
    }
}

// === impl RedisStore ===

impl RedisStore {
    /// Connects with the default [`RedisStoreOptions`]. `prefix` starts every
    /// Redis key ([`DEFAULT_PREFIX`] unless configured otherwise).
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        Self::connect_with(url, prefix, RedisStoreOptions::default()).await
    }

    /// Connects, failing with [`StoreError::Unavailable`] if Redis does not
    /// answer within the options' timeouts, and starts the pub/sub task.
    /// Returns once the task has subscribed (or failed to within the timeouts;
    /// it then keeps retrying in the background).
    pub async fn connect_with(
        url: &str,
        prefix: &str,
        options: RedisStoreOptions,
    ) -> Result<RedisStore, StoreError> {
        Self::connect_endpoint(&Endpoint::Node(url.to_owned()), prefix, options).await
    }

    /// [`Self::connect_with`] for any topology: one node, a cluster (seed
    /// nodes) or a primary found through Sentinel.
    pub async fn connect_endpoint(
        endpoint: &Endpoint,
        prefix: &str,
        options: RedisStoreOptions,
    ) -> Result<RedisStore, StoreError> {
        let redactor = Redactor::from_urls(endpoint.urls());
        let timeouts = ConnTimeouts {
            connect: options.connect_timeout,
            response: options.response_timeout,
            retries: options.reconnect_retries,
        };
        // The one constructor every Redis connection goes through (URL,
        // `rediss://` and its TLS files, `#insecure` refused).
        let target = RedisTarget::new(endpoint, &options.tls, timeouts)
            .map_err(|e| StoreError::Unavailable(redactor.scrub(format!("invalid Redis target: {e}"))))?;
        let addr = target.addr();

        let unavailable =
            |why: String| StoreError::Unavailable(redactor.scrub(format!("redis at {addr}: {why}")));
        let connected = match tokio::time::timeout(options.call_timeout, target.connect(timeouts)).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(unavailable(format!("cannot connect: {}", crate::redis_target::explain(&e)))),
            Err(_) => Err(unavailable(match &target {
                RedisTarget::Single(client) => {
                    format!(
                        "cannot connect: {}",
                        crate::redis_target::no_answer(client, options.call_timeout)
                    )
                }
                _ => format!("cannot connect: no answer within {:?}", options.call_timeout),
            })),
        };
        let conn = match connected {
            Ok(conn) => conn,
            Err(error) if options.connect_lazily_if_down => {
                // The connection is made again on the next command after an
                // error, so the first call once Redis is up succeeds.
                let lazy = target
                    .connect_lazy(timeouts)
                    .map_err(|e| unavailable(format!("cannot set up a connection: {e}")))?;
                tracing::warn!(
                    %error,
                    "Redis is unreachable at start; serving anyway: keys not yet verified get 503 \
                     until it answers"
                );
                lazy
            }
            Err(error) => return Err(error),
        };

        let names = KeyNames { prefix: prefix.to_owned() };
        let (invalidations, _) = broadcast::channel(INVALIDATION_BUFFER);
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let subscriber = Subscriber {
            target: target.clone(),
            channel: names.channel(),
            tx: invalidations.clone(),
            options: options.clone(),
            addr: addr.clone(),
            redactor: redactor.clone(),
        };
        tokio::spawn(subscriber.run(stop_rx, ready_tx));
        // Waiting makes "connected" mean "hears invalidations", so a caller
        // that subscribes right after connect misses nothing published later.
        let ready_within = options.connect_timeout + options.response_timeout;
        if tokio::time::timeout(ready_within, ready_rx).await.is_err() {
            tracing::warn!(redis = %addr, "pub/sub not subscribed yet; invalidations may be late");
        }

        Ok(RedisStore {
            conn,
            target,
            names,
            options,
            addr,
            redactor,
            invalidations,
            _stop_subscriber: stop_tx,
        })
    }

    /// The key prefix this store writes under.
    pub fn prefix(&self) -> &str {
        &self.names.prefix
    }

    /// Runs one Redis call under `call_timeout`, mapping its failure.
    /// `redis_key` names the key concerned, for [`StoreError::Corrupt`].
    async fn run<T>(
        &self,
        what: &str,
        redis_key: &str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.run_pipeline(what, &[redis_key], call).await
    }

    /// [`Self::run`] for a pipeline whose commands act on `redis_keys` in
    /// order: a `WRONGTYPE` names the key of the command that failed (the
    /// redis crate reports a pipeline's server errors by index).
    async fn run_pipeline<T>(
        &self,
        what: &str,
        redis_keys: &[&str],
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.options.call_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if let Some(index) = wrong_type_at(&e) => Err(StoreError::Corrupt {
                what: format!("redis key `{}`", redis_keys.get(index).or(redis_keys.first()).unwrap_or(&"?")),
                why: "holds a value of the wrong Redis type".to_owned(),
            }),
            Ok(Err(e)) => Err(self.unavailable(what, crate::redis_target::explain(&e))),
            Err(_) => {
                Err(self.unavailable(what, format!("no answer within {:?}", self.options.call_timeout)))
            }
        }
    }

    fn unavailable(&self, what: &str, why: impl fmt::Display) -> StoreError {
        StoreError::Unavailable(self.redactor.scrub(format!("redis at {}: {what}: {why}", self.addr)))
    }

    /// `HGETALL` of one record key, decoded; `None` if the key does not exist.
    async fn load(&self, record_key: &str) -> Result<Option<KeyRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let fields: HashMap<Vec<u8>, Vec<u8>> = self
            .run("HGETALL", record_key, redis::cmd("HGETALL").arg(record_key).query_async(&mut conn))
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        decode(record_key, &fields).map(Some)
    }

    /// `command key` for each of `keys`, in one pipeline (one round trip;
    /// in a cluster one pipeline per slot, concurrently); the replies in order.
    async fn each<T: redis::FromRedisValue>(&self, command: &str, keys: &[String]) -> Result<T, StoreError> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd(command).arg(key);
        }
        let names: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut conn = self.conn.clone();
        self.run_pipeline(command, &names, pipe.query_async(&mut conn)).await
    }

    /// One page of key records in ID order (of every client, or of one), in
    /// at most four pipelined round trips whatever the page size and the
    /// number of clients: `SMEMBERS` of the client set (skipped for one
    /// client), `SMEMBERS` of every candidate client's kid set, `GET` of the
    /// page's `id` indexes, `HGETALL` of the page's records. IDs are sorted
    /// here, so the layout needs no index of its own. In a cluster a round
    /// trip is one pipeline per slot, sent concurrently ([`RedisConn`]).
    async fn key_page(
        &self,
        client: Option<&str>,
        after: Option<&KeyId>,
        limit: usize,
    ) -> Result<Page<KeyRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let mut clients: Vec<String> = match client {
            Some(client) => vec![client.to_owned()],
            None => {
                let clients_key = self.names.clients();
                self.run(
                    "SMEMBERS",
                    &clients_key,
                    redis::cmd("SMEMBERS").arg(&clients_key).query_async(&mut conn),
                )
                .await?
            }
        };
        // Every ID of a client sorts below `<client>/` (`/` follows `.`, and
        // kids are alphanumeric): clients wholly at or before the cursor are
        // not read.
        clients.retain(|c| valid_client(c) && after.is_none_or(|a| format!("{c}/").as_str() > a.as_str()));
        if clients.is_empty() {
            return Ok(Page::of(Vec::new(), limit));
        }

        let set_keys: Vec<String> = clients.iter().map(|c| self.names.client_keys(c)).collect();
        let kid_sets: Vec<Vec<String>> = self.each("SMEMBERS", &set_keys).await?;
        let mut ids = Vec::new();
        for ((client, set_key), kids) in clients.iter().zip(&set_keys).zip(kid_sets) {
            for kid in kids {
                let id: KeyId = format!("{client}.{kid}").parse().map_err(|why| StoreError::Corrupt {
                    what: format!("redis key `{set_key}`"),
                    why: format!("member `{kid}`: {why}"),
                })?;
                if after.is_none_or(|a| id > *a) {
                    ids.push(id);
                }
            }
        }
        ids.sort();
        let page = Page::of(ids, limit);
        if page.items.is_empty() {
            return Ok(Page { items: Vec::new(), more: page.more });
        }

        let id_keys: Vec<String> = page.items.iter().map(|id| self.names.id(id.client(), id.kid())).collect();
        let hashes: Vec<Option<String>> = self.each("GET", &id_keys).await?;

        let mut record_keys = Vec::with_capacity(page.items.len());
        for ((id, id_key), hash) in page.items.iter().zip(&id_keys).zip(hashes) {
            let hash = hash.ok_or_else(|| StoreError::Corrupt {
                what: format!("redis key `{id_key}`"),
                why: format!("missing, but its kid is listed in `{}`", self.names.client_keys(id.client())),
            })?;
            record_keys.push(self.names.record_hex(id.client(), &hash));
        }
        let all_fields: Vec<HashMap<Vec<u8>, Vec<u8>>> = self.each("HGETALL", &record_keys).await?;

        let mut records = Vec::with_capacity(record_keys.len());
        for (record_key, fields) in record_keys.iter().zip(&all_fields) {
            if fields.is_empty() {
                return Err(StoreError::Corrupt {
                    what: format!("redis key `{record_key}`"),
                    why: "missing, but the id index points to it".to_owned(),
                });
            }
            records.push(decode(record_key, fields)?);
        }
        Ok(Page { items: records, more: page.more })
    }

    /// One page of client records in ID order, in at most three pipelined
    /// round trips whatever the page size and the number of clients:
    /// `SMEMBERS` of the client set, `EXISTS` of every candidate's record
    /// (a listed client may have keys but no record), `HGETALL` of the
    /// page's records.
    async fn client_page(&self, after: Option<&str>, limit: usize) -> Result<Page<ClientRecord>, StoreError> {
        let clients_key = self.names.clients();
        let mut conn = self.conn.clone();
        let mut clients: Vec<String> = self
            .run("SMEMBERS", &clients_key, redis::cmd("SMEMBERS").arg(&clients_key).query_async(&mut conn))
            .await?;
        clients.retain(|c| valid_client(c) && after.is_none_or(|a| c.as_str() > a));
        clients.sort();
        if clients.is_empty() {
            return Ok(Page::of(Vec::new(), limit));
        }

        let client_keys: Vec<String> = clients.iter().map(|c| self.names.client(c)).collect();
        let exists: Vec<bool> = self.each("EXISTS", &client_keys).await?;
        let page =
            Page::of(clients.iter().zip(&client_keys).zip(exists).filter(|(_, e)| *e).map(|(c, _)| c), limit);
        if page.items.is_empty() {
            return Ok(Page { items: Vec::new(), more: page.more });
        }

        let page_keys: Vec<String> = page.items.iter().map(|(_, key)| (*key).clone()).collect();
        let all_fields: Vec<HashMap<Vec<u8>, Vec<u8>>> = self.each("HGETALL", &page_keys).await?;
        let mut records = Vec::with_capacity(page.items.len());
        for ((client, client_key), fields) in page.items.iter().zip(&all_fields) {
            // Records are never deleted, so one that existed a moment ago is
            // still there; `decode_client_checked` reads an empty hash as none.
            records.extend(decode_client_checked(client_key, client, fields)?);
        }
        Ok(Page { items: records, more: page.more })
    }

    /// Runs the insert or update script for `record`; returns its status code.
    async fn write(&self, script: &redis::Script, what: &str, record: &KeyRecord) -> Result<i64, StoreError> {
        let client = record.client();
        let hex = record.secret_hash.to_hex();
        let record_key = self.names.record_hex(client, &hex);
        let mut conn = self.conn.clone();

        // Outside the script: `clients` lives in another Cluster slot. Written
        // first, so a listed record always has its client listed.
        let clients_key = self.names.clients();
        let _: i64 = self
            .run(
                "SADD",
                &clients_key,
                redis::cmd("SADD").arg(&clients_key).arg(client).query_async(&mut conn),
            )
            .await?;

        let mut invocation = script.key(&record_key);
        invocation
            .key(self.names.id(client, record.id.kid()))
            .key(self.names.client_keys(client))
            .arg(&hex)
            .arg(record.id.kid())
            .arg(self.names.channel());
        for (field, value) in encode(record) {
            invocation.arg(field).arg(value);
        }
        self.run(what, &record_key, invocation.invoke_async(&mut conn)).await
    }

    /// Runs a client write script; returns its status code (1 = done).
    async fn write_client(
        &self,
        script: &redis::Script,
        what: &str,
        record: &ClientRecord,
    ) -> Result<i64, StoreError> {
        let client = record.id.as_str();
        if !valid_client(client) {
            return Err(StoreError::Corrupt {
                what: format!("client id {client:?}"),
                why: "not [A-Za-z0-9-]{1,64}".to_owned(),
            });
        }
        let mut conn = self.conn.clone();
        // As for keys: `clients` is in another slot, written first, so a
        // client with a record is always listed.
        let clients_key = self.names.clients();
        let _: i64 = self
            .run(
                "SADD",
                &clients_key,
                redis::cmd("SADD").arg(&clients_key).arg(client).query_async(&mut conn),
            )
            .await?;
        let record_key = self.names.client(client);
        let mut invocation = script.key(&record_key);
        invocation.arg(self.names.channel()).arg(format!("{CLIENT_MESSAGE}{client}"));
        for (field, value) in encode_client(record) {
            invocation.arg(field).arg(value);
        }
        self.run(what, &record_key, invocation.invoke_async(&mut conn)).await
    }
}

#[async_trait]
impl KeyStore for RedisStore {
    async fn find_by_hash(&self, client: &str, hash: &SecretHash) -> Result<Option<KeyRecord>, StoreError> {
        // A client ID that cannot exist costs no Redis traffic (and cannot
        // smuggle braces into the hash tag).
        if !valid_client(client) {
            return Ok(None);
        }
        let record_key = self.names.record_hex(client, &hash.to_hex());
        let Some(record) = self.load(&record_key).await? else {
            return Ok(None);
        };
        // The key name already says client and hash; a record saying otherwise
        // was hand-edited or copied, and must not be trusted.
        if record.client() != client || record.secret_hash != *hash {
            return Err(StoreError::Corrupt {
                what: format!("redis key `{record_key}`"),
                why: "field `id` or `secret_hash` disagrees with the key's name".to_owned(),
            });
        }
        Ok(Some(record))
    }

    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let id_key = self.names.id(id.client(), id.kid());
        let mut conn = self.conn.clone();
        let hash: Option<String> =
            self.run("GET", &id_key, redis::cmd("GET").arg(&id_key).query_async(&mut conn)).await?;
        let Some(hash) = hash else {
            return Ok(None);
        };
        let record_key = self.names.record_hex(id.client(), &hash);
        match self.load(&record_key).await? {
            Some(record) if record.id == *id => Ok(Some(record)),
            Some(_) => Err(StoreError::Corrupt {
                what: format!("redis key `{record_key}`"),
                why: format!("field `id` is not {id}, which `{id_key}` points here"),
            }),
            None => Err(StoreError::Corrupt {
                what: format!("redis key `{id_key}`"),
                why: "points to a record that does not exist".to_owned(),
            }),
        }
    }

    async fn list(&self, client: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        Ok(self.key_page(client, None, usize::MAX).await?.items)
    }

    async fn list_page(
        &self,
        client: Option<&str>,
        after: Option<&KeyId>,
        limit: usize,
    ) -> Result<Page<KeyRecord>, StoreError> {
        self.key_page(client, after, limit).await
    }

    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        match self.write(&scripts::INSERT, "insert script", record).await? {
            1 => Ok(()),
            // 0: the ID is taken. -1: another ID has this secret hash, which
            // only a reused secret can cause; refusing keeps lookups unambiguous.
            _ => Err(StoreError::AlreadyExists(record.id.clone())),
        }
    }

    async fn update(&self, record: &KeyRecord) -> Result<(), StoreError> {
        match self.write(&scripts::UPDATE, "update script", record).await? {
            1 => Ok(()),
            // 0: no such ID. -1: the ID holds a different secret hash; updates
            // never change a hash, so there is no record to replace.
            _ => Err(StoreError::NotFound(record.id.clone())),
        }
    }

    async fn find_for_verification(
        &self,
        client: &str,
        hash: &SecretHash,
    ) -> Result<Option<Found>, StoreError> {
        if !valid_client(client) {
            return Ok(None);
        }
        // Both keys carry the client's hash tag: one node, one round trip.
        let record_key = self.names.record_hex(client, &hash.to_hex());
        let client_key = self.names.client(client);
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(&record_key).cmd("HGETALL").arg(&client_key);
        let mut conn = self.conn.clone();
        let (key_fields, client_fields): (HashMap<Vec<u8>, Vec<u8>>, HashMap<Vec<u8>, Vec<u8>>) =
            self.run_pipeline("HGETALL", &[&record_key, &client_key], pipe.query_async(&mut conn)).await?;
        if key_fields.is_empty() {
            return Ok(None);
        }
        let key = decode(&record_key, &key_fields)?;
        if key.client() != client || key.secret_hash != *hash {
            return Err(StoreError::Corrupt {
                what: format!("redis key `{record_key}`"),
                why: "field `id` or `secret_hash` disagrees with the key's name".to_owned(),
            });
        }
        let client = decode_client_checked(&client_key, client, &client_fields)?;
        Ok(Some(Found { key, client }))
    }

    async fn get_client(&self, id: &str) -> Result<Option<ClientRecord>, StoreError> {
        if !valid_client(id) {
            return Ok(None);
        }
        let client_key = self.names.client(id);
        let mut conn = self.conn.clone();
        let fields: HashMap<Vec<u8>, Vec<u8>> = self
            .run("HGETALL", &client_key, redis::cmd("HGETALL").arg(&client_key).query_async(&mut conn))
            .await?;
        decode_client_checked(&client_key, id, &fields)
    }

    async fn list_clients(&self) -> Result<Vec<ClientRecord>, StoreError> {
        Ok(self.client_page(None, usize::MAX).await?.items)
    }

    async fn list_clients_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<ClientRecord>, StoreError> {
        self.client_page(after, limit).await
    }

    async fn insert_client(&self, record: &ClientRecord) -> Result<(), StoreError> {
        match self.write_client(&scripts::INSERT_CLIENT, "client insert script", record).await? {
            1 => Ok(()),
            _ => Err(StoreError::ClientExists(record.id.clone())),
        }
    }

    async fn update_client(&self, record: &ClientRecord) -> Result<(), StoreError> {
        match self.write_client(&scripts::UPDATE_CLIENT, "client update script", record).await? {
            1 => Ok(()),
            _ => Err(StoreError::ClientNotFound(record.id.clone())),
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<Invalidation> {
        self.invalidations.subscribe()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = self.run("PING", "", redis::cmd("PING").query_async(&mut conn)).await?;
        Ok(())
    }

    fn redis(&self) -> Option<super::RedisHandle> {
        Some(super::RedisHandle {
            conn: self.conn.clone(),
            target: self.target.clone(),
            prefix: self.names.prefix.clone(),
        })
    }
}

/// Where a call failed with `WRONGTYPE`: 0 for a single command, the
/// command's index for a pipeline (whose errors carry no top-level code).
fn wrong_type_at(error: &redis::RedisError) -> Option<usize> {
    if error.code() == Some("WRONGTYPE") {
        return Some(0);
    }
    let failed = error.clone().into_server_errors()?;
    failed.iter().find(|(_, e)| e.code() == "WRONGTYPE").map(|(index, _)| *index)
}

/// Client IDs as the key format allows them: `[A-Za-z0-9-]{1,64}`.
fn valid_client(client: &str) -> bool {
    !client.is_empty() && client.len() <= 64 && client.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

// === Key names ===

/// Builds every Redis key name, so the layout lives in one place.
#[derive(Debug, Clone)]
struct KeyNames {
    prefix: String,
}

impl KeyNames {
    fn record_hex(&self, client: &str, hash_hex: &str) -> String {
        format!("{}{{{client}}}:key:{hash_hex}", self.prefix)
    }

    fn id(&self, client: &str, kid: &str) -> String {
        format!("{}{{{client}}}:id:{kid}", self.prefix)
    }

    fn client_keys(&self, client: &str) -> String {
        format!("{}{{{client}}}:keys", self.prefix)
    }

    fn clients(&self) -> String {
        format!("{}clients", self.prefix)
    }

    fn client(&self, client: &str) -> String {
        format!("{}{{{client}}}:client", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}invalidate", self.prefix)
    }
}

// === Scripts ===

/// The write scripts. KEYS: record hash, id index, client's key set (one slot).
/// ARGV: hash hex, kid, invalidation channel, then field/value pairs.
mod scripts {
    use std::sync::LazyLock;

    /// 1 = inserted, 0 = ID taken, -1 = hash taken by another ID.
    pub(super) static INSERT: LazyLock<redis::Script> = LazyLock::new(|| {
        redis::Script::new(
            r"
            if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
            if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
            redis.call('HSET', KEYS[1], unpack(ARGV, 4))
            redis.call('SET', KEYS[2], ARGV[1])
            redis.call('SADD', KEYS[3], ARGV[2])
            redis.call('PUBLISH', ARGV[3], '+' .. ARGV[1])
            return 1
            ",
        )
    });

    /// 1 = replaced, 0 = no such ID, -1 = the ID has another hash.
    /// `DEL` first so fields that became empty (e.g. a cleared label) vanish.
    pub(super) static UPDATE: LazyLock<redis::Script> = LazyLock::new(|| {
        redis::Script::new(
            r"
            local current = redis.call('GET', KEYS[2])
            if not current then return 0 end
            if current ~= ARGV[1] then return -1 end
            redis.call('DEL', KEYS[1])
            redis.call('HSET', KEYS[1], unpack(ARGV, 4))
            redis.call('SADD', KEYS[3], ARGV[2])
            redis.call('PUBLISH', ARGV[3], ARGV[1])
            return 1
            ",
        )
    });

    /// Client writes. KEYS: the client's record hash. ARGV: invalidation
    /// channel, message, then field/value pairs. 1 = written, 0 = refused
    /// (insert: a record exists; update: none does). A new record also
    /// announces itself: keys cached before it carry no client record.
    pub(super) static INSERT_CLIENT: LazyLock<redis::Script> = LazyLock::new(|| {
        redis::Script::new(
            r"
            if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
            redis.call('HSET', KEYS[1], unpack(ARGV, 3))
            redis.call('PUBLISH', ARGV[1], ARGV[2])
            return 1
            ",
        )
    });

    /// `DEL` first so fields that became empty vanish, as for keys.
    pub(super) static UPDATE_CLIENT: LazyLock<redis::Script> = LazyLock::new(|| {
        redis::Script::new(
            r"
            if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
            redis.call('DEL', KEYS[1])
            redis.call('HSET', KEYS[1], unpack(ARGV, 3))
            redis.call('PUBLISH', ARGV[1], ARGV[2])
            return 1
            ",
        )
    });
}

// === Record encoding ===

/// A record as hash fields. `None` fields are left out.
fn encode(record: &KeyRecord) -> Vec<(&'static str, String)> {
    let meta = &record.meta;
    let mut fields = vec![
        ("id", record.id.to_string()),
        ("client", record.client().to_owned()),
        ("secret_hash", record.secret_hash.to_hex()),
        ("scopes", meta.scopes.join(",")),
        ("status", meta.status.as_str().to_owned()),
        ("created_at", meta.created_at.as_second().to_string()),
    ];
    let optional = [
        ("rate", meta.rate.map(|r| r.to_string())),
        ("burst", meta.burst.map(|b| b.to_string())),
        ("quota", meta.quota.map(|q| q.to_string())),
        ("expires_at", meta.expires_at.map(|t| t.as_second().to_string())),
        ("label", meta.label.clone()),
        ("rotated_at", meta.rotated_at.map(|t| t.as_second().to_string())),
        ("counts_as", meta.counts_as.as_ref().map(KeyId::to_string)),
    ];
    fields.extend(optional.into_iter().filter_map(|(name, value)| Some((name, value?))));
    fields.extend(encode_credits(meta.credits));
    fields
}

/// A credit grant as hash fields (`credits`, `credits_refill`,
/// `credits_granted_at` in ms), spelt alike in key and client records;
/// nothing without a grant.
fn encode_credits(credits: Option<CreditGrant>) -> Vec<(&'static str, String)> {
    let Some(grant) = credits else { return Vec::new() };
    let mut fields = vec![
        ("credits", grant.uses.to_string()),
        ("credits_granted_at", grant.granted_at.as_millisecond().to_string()),
    ];
    if let Some(refill) = grant.refill {
        fields.push(("credits_refill", refill.to_string()));
    }
    fields
}

/// The credit grant in a key or client record's fields, if it has one.
fn decode_credits(fields: &Fields<'_>) -> Result<Option<CreditGrant>, StoreError> {
    match fields.parse_optional("credits", crate::meta::parse_uses)? {
        None => Ok(None),
        Some(uses) => Ok(Some(CreditGrant {
            uses,
            refill: fields.parse_optional("credits_refill", str::parse::<crate::meta::Refill>)?,
            granted_at: fields.parse("credits_granted_at", unix_millis)?,
        })),
    }
}

/// A record from its hash fields. Unknown fields are ignored (room for later
/// additions); a missing or unreadable field is [`StoreError::Corrupt`] naming
/// the Redis key and the field.
fn decode(redis_key: &str, raw: &HashMap<Vec<u8>, Vec<u8>>) -> Result<KeyRecord, StoreError> {
    let fields = Fields { redis_key, raw };
    let id: KeyId = fields.parse("id", |s| s.parse::<KeyId>())?;
    if fields.required("client")? != id.client() {
        return Err(fields.corrupt("client", "differs from the client in `id`"));
    }
    let secret_hash =
        fields.parse("secret_hash", |s| SecretHash::from_hex(s).ok_or("not 64 hex characters"))?;
    let meta = KeyMeta {
        scopes: fields
            .optional("scopes")?
            .map(|s| s.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
        rate: fields.parse_optional("rate", str::parse)?,
        burst: fields.parse_optional("burst", str::parse::<std::num::NonZeroU32>)?,
        quota: fields.parse_optional("quota", str::parse)?,
        expires_at: fields.parse_optional("expires_at", unix_seconds)?,
        label: fields.optional("label")?.map(str::to_owned),
        status: fields.parse("status", str::parse::<KeyStatus>)?,
        created_at: fields.parse("created_at", unix_seconds)?,
        rotated_at: fields.parse_optional("rotated_at", unix_seconds)?,
        credits: decode_credits(&fields)?,
        counts_as: fields.parse_optional("counts_as", |s| match s.parse::<KeyId>() {
            Ok(counts_as) if counts_as.client() == id.client() => Ok(counts_as),
            Ok(_) => Err("names a key of another client".to_owned()),
            Err(e) => Err(e.to_string()),
        })?,
    };
    Ok(KeyRecord { id, secret_hash, meta })
}

/// A client record as hash fields. `None` fields are left out.
fn encode_client(record: &ClientRecord) -> Vec<(&'static str, String)> {
    let meta = &record.meta;
    let mut fields = vec![
        ("id", record.id.clone()),
        ("status", meta.status.as_str().to_owned()),
        ("created_at", meta.created_at.as_second().to_string()),
        ("updated_at", meta.updated_at.as_second().to_string()),
    ];
    let optional = [
        ("scopes", (!meta.scopes.is_empty()).then(|| meta.scopes.join(","))),
        ("rate", meta.rate.map(|r| r.to_string())),
        ("burst", meta.burst.map(|b| b.to_string())),
        ("quota", meta.quota.map(|q| q.to_string())),
        ("label", meta.label.clone()),
    ];
    fields.extend(optional.into_iter().filter_map(|(name, value)| Some((name, value?))));
    fields.extend(encode_credits(meta.credits));
    fields
}

/// A client record from its hash fields, `None` for an empty hash (no
/// record). The record's `id` must be the client its key names.
fn decode_client_checked(
    redis_key: &str,
    client: &str,
    raw: &HashMap<Vec<u8>, Vec<u8>>,
) -> Result<Option<ClientRecord>, StoreError> {
    if raw.is_empty() {
        return Ok(None);
    }
    let fields = Fields { redis_key, raw };
    let id = fields.required("id")?;
    if id != client {
        return Err(fields.corrupt("id", "differs from the client in the key's name"));
    }
    let meta = ClientMeta {
        scopes: fields
            .optional("scopes")?
            .map(|s| s.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
        rate: fields.parse_optional("rate", str::parse)?,
        burst: fields.parse_optional("burst", str::parse::<std::num::NonZeroU32>)?,
        quota: fields.parse_optional("quota", str::parse)?,
        label: fields.optional("label")?.map(str::to_owned),
        credits: decode_credits(&fields)?,
        status: fields.parse("status", str::parse::<KeyStatus>)?,
        created_at: fields.parse("created_at", unix_seconds)?,
        updated_at: fields.parse("updated_at", unix_seconds)?,
    };
    Ok(Some(ClientRecord { id: id.to_owned(), meta }))
}

fn unix_seconds(s: &str) -> Result<Timestamp, String> {
    let secs: i64 = s.parse().map_err(|_| "expected Unix seconds".to_owned())?;
    Timestamp::from_second(secs).map_err(|e| e.to_string())
}

fn unix_millis(s: &str) -> Result<Timestamp, String> {
    let ms: i64 = s.parse().map_err(|_| "expected Unix milliseconds".to_owned())?;
    Timestamp::from_millisecond(ms).map_err(|e| e.to_string())
}

/// One record's raw fields, with the Redis key for error messages.
struct Fields<'a> {
    redis_key: &'a str,
    raw: &'a HashMap<Vec<u8>, Vec<u8>>,
}

impl Fields<'_> {
    fn corrupt(&self, field: &str, why: impl fmt::Display) -> StoreError {
        StoreError::Corrupt {
            what: format!("redis key `{}`", self.redis_key),
            why: format!("field `{field}`: {why}"),
        }
    }

    /// The field's text; empty counts as absent.
    fn optional(&self, field: &str) -> Result<Option<&str>, StoreError> {
        match self.raw.get(field.as_bytes()) {
            None => Ok(None),
            Some(bytes) => match std::str::from_utf8(bytes) {
                Ok("") => Ok(None),
                Ok(text) => Ok(Some(text)),
                Err(_) => Err(self.corrupt(field, "not UTF-8")),
            },
        }
    }

    fn required(&self, field: &str) -> Result<&str, StoreError> {
        self.optional(field)?.ok_or_else(|| self.corrupt(field, "missing"))
    }

    fn parse<T, E: fmt::Display>(
        &self,
        field: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<T, StoreError> {
        parse(self.required(field)?).map_err(|e| self.corrupt(field, e))
    }

    fn parse_optional<T, E: fmt::Display>(
        &self,
        field: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<Option<T>, StoreError> {
        self.optional(field)?.map(parse).transpose().map_err(|e| self.corrupt(field, e))
    }
}

// === Pub/sub ===

/// The background task feeding [`RedisStore::subscribe`]'s receivers.
struct Subscriber {
    target: RedisTarget,
    channel: String,
    tx: broadcast::Sender<Invalidation>,
    options: RedisStoreOptions,
    addr: String,
    redactor: Redactor,
}

impl Subscriber {
    /// Subscribes, forwards messages, and on any failure waits (doubling up to
    /// the maximum) and starts over, until `stop`'s sender is dropped.
    async fn run(self, mut stop: oneshot::Receiver<()>, ready: oneshot::Sender<()>) {
        let mut ready = Some(ready);
        let mut delay = self.options.resubscribe_min_delay;
        let mut attempt = 0;
        loop {
            let (subscribed, why) = tokio::select! {
                _ = &mut stop => return,
                ended = self.session(attempt, &mut ready) => ended,
            };
            crate::metrics::pubsub_subscribed(false);
            attempt += 1;
            if subscribed {
                delay = self.options.resubscribe_min_delay;
            }
            tracing::warn!(
                redis = %self.addr,
                retry_in = ?delay,
                "invalidation subscription lost: {}",
                self.redactor.scrub(why)
            );
            tokio::select! {
                _ = &mut stop => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(self.options.resubscribe_max_delay);
        }
    }

    /// One connection's life. Returns whether it got as far as subscribing,
    /// and why it ended.
    /// `attempt` counts the sessions before this one: on a cluster each
    /// picks the next node, so a dead node is not tried forever.
    async fn session(&self, attempt: usize, ready: &mut Option<oneshot::Sender<()>>) -> (bool, String) {
        let find = tokio::time::timeout(self.options.connect_timeout, self.target.pubsub_client(attempt));
        let client = match find.await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return (false, format!("cannot find a node: {}", crate::redis_target::explain(&e)));
            }
            Err(_) => return (false, "cannot find a node: no answer in time".to_owned()),
        };
        let connect = tokio::time::timeout(self.options.connect_timeout, client.get_async_pubsub());
        let pubsub = match connect.await {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(e)) => return (false, format!("cannot connect: {}", crate::redis_target::explain(&e))),
            Err(_) => {
                let why = crate::redis_target::no_answer(&client, self.options.connect_timeout);
                return (false, format!("cannot connect: {why}"));
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        match tokio::time::timeout(self.options.response_timeout, sink.subscribe(&self.channel)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return (false, format!("SUBSCRIBE failed: {e}")),
            Err(_) => return (false, "SUBSCRIBE timed out".to_owned()),
        }
        tracing::debug!(redis = %self.addr, channel = %self.channel, "subscribed to invalidations");
        crate::metrics::pubsub_subscribed(true);
        // Whatever was published before this point (while disconnected, or
        // before the first subscription) was missed.
        let _ = self.tx.send(Invalidation::All);
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }

        let mut ping = tokio::time::interval(self.options.pubsub_ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await; // the first tick is immediate; the connection was just proven
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else {
                        return (true, "connection closed".to_owned());
                    };
                    // No receivers is fine: nobody caches yet.
                    let _ = self.tx.send(parse_invalidation(message.get_payload_bytes()));
                }
                _ = ping.tick() => {
                    let pong = sink.ping::<redis::Value>();
                    match tokio::time::timeout(self.options.response_timeout, pong).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return (true, format!("PING failed: {e}")),
                        Err(_) => return (true, "PING timed out".to_owned()),
                    }
                }
            }
        }
    }
}

/// A message on the invalidation channel: a hash hex (changed or revoked),
/// `+` and a hash hex (newly issued), `client:` and a client ID (the
/// client's record changed), or `*` for everything (operators may
/// `PUBLISH kg:invalidate '*'`). Anything else is treated as `*`, since
/// dropping too much from a cache is safe and too little is not.
fn parse_invalidation(payload: &[u8]) -> Invalidation {
    let text = std::str::from_utf8(payload).unwrap_or("");
    if let Some(hash) = text.strip_prefix('+').and_then(SecretHash::from_hex) {
        return Invalidation::Issued(hash);
    }
    if let Some(client) = text.strip_prefix(CLIENT_MESSAGE).filter(|c| valid_client(c)) {
        return Invalidation::Client(client.to_owned());
    }
    match SecretHash::from_hex(text) {
        Some(hash) => Invalidation::Key(hash),
        None => {
            if text != "*" {
                tracing::warn!(
                    len = payload.len(),
                    "unrecognised invalidation message; dropping every cached key"
                );
            }
            Invalidation::All
        }
    }
}

// === Redaction ===

/// Keeps the URL's password out of error messages and logs.
#[derive(Clone)]
struct Redactor {
    password: Option<String>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Redactor(..)")
    }
}

impl Redactor {
    /// Finds the password in `redis://user:password@host/...` or in a
    /// `?pass=...` query (the redis crate's Unix-socket form).
    fn from_url(url: &str) -> Self {
        Self { password: crate::redis_target::password(url).map(str::to_owned) }
    }

    /// The first password among `urls` (a cluster's seeds share one).
    fn from_urls(urls: &[String]) -> Self {
        urls.iter()
            .map(|url| Self::from_url(url))
            .find(|r| r.password.is_some())
            .unwrap_or(Self { password: None })
    }

    /// `text` with every occurrence of the password (raw and percent-decoded)
    /// replaced by `***`.
    fn scrub(&self, text: String) -> String {
        match &self.password {
            Some(password) => crate::redis_target::scrub_password(password, text),
            None => text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> KeyRecord {
        let mut meta = KeyMeta::new(Timestamp::from_second(1_764_000_000).unwrap());
        meta.scopes = vec!["read".into(), "orders:write".into()];
        meta.rate = Some("100/s".parse().unwrap());
        meta.quota = Some("10000/day".parse().unwrap());
        meta.label = Some("mobile app".into());
        meta.credits = Some(CreditGrant {
            uses: 1000,
            refill: Some("1000/month".parse().unwrap()),
            granted_at: Timestamp::from_millisecond(1_764_000_000_123).unwrap(),
        });
        KeyRecord { id: "acme.k1".parse().unwrap(), secret_hash: SecretHash([7; 32]), meta }
    }

    fn raw(fields: Vec<(&'static str, String)>) -> HashMap<Vec<u8>, Vec<u8>> {
        fields.into_iter().map(|(k, v)| (k.as_bytes().to_vec(), v.into_bytes())).collect()
    }

    #[test]
    fn records_survive_encoding() {
        let record = record();
        assert_eq!(decode("kg:x", &raw(encode(&record))).unwrap(), record);
    }

    #[test]
    fn client_records_survive_encoding_and_name_their_client() {
        let mut meta = ClientMeta::new(Timestamp::from_second(1_764_000_000).unwrap());
        meta.quota = Some("100000/month".parse().unwrap());
        meta.label = Some("Acme, gold".into());
        let record = ClientRecord { id: "acme".into(), meta };
        let fields = raw(encode_client(&record));
        assert!(!fields.contains_key(b"rate".as_slice()), "unset fields are absent");
        assert_eq!(decode_client_checked("kg:{acme}:client", "acme", &fields).unwrap(), Some(record));
        assert_eq!(decode_client_checked("kg:{acme}:client", "acme", &HashMap::new()).unwrap(), None);
        let err = decode_client_checked("kg:{other}:client", "other", &fields).unwrap_err().to_string();
        assert!(err.contains("kg:{other}:client") && err.contains("field `id`"), "{err}");
    }

    #[test]
    fn client_scopes_are_a_comma_separated_field_absent_when_none() {
        let mut meta = ClientMeta::new(Timestamp::from_second(1_764_000_000).unwrap());
        let record = ClientRecord { id: "acme".into(), meta: meta.clone() };
        assert!(!raw(encode_client(&record)).contains_key(b"scopes".as_slice()), "no scopes, no field");
        meta.scopes = vec!["read".into(), "orders:write".into()];
        let record = ClientRecord { id: "acme".into(), meta };
        let fields = raw(encode_client(&record));
        assert_eq!(fields[b"scopes".as_slice()], b"read,orders:write");
        assert_eq!(decode_client_checked("kg:{acme}:client", "acme", &fields).unwrap(), Some(record));
    }

    #[test]
    fn client_credits_survive_encoding_with_the_keys_field_names() {
        let mut meta = ClientMeta::new(Timestamp::from_second(1_764_000_000).unwrap());
        meta.credits = Some(CreditGrant {
            uses: 100_000,
            refill: Some("100000/month".parse().unwrap()),
            granted_at: Timestamp::from_millisecond(1_764_000_000_123).unwrap(),
        });
        let record = ClientRecord { id: "acme".into(), meta };
        let fields = raw(encode_client(&record));
        assert_eq!(fields[b"credits".as_slice()], b"100000");
        assert_eq!(fields[b"credits_refill".as_slice()], b"100000/month");
        assert_eq!(fields[b"credits_granted_at".as_slice()], b"1764000000123");
        assert_eq!(decode_client_checked("kg:{acme}:client", "acme", &fields).unwrap(), Some(record.clone()));

        let mut no_refill = record.clone();
        no_refill.meta.credits = Some(CreditGrant { refill: None, ..record.meta.credits.unwrap() });
        let fields = raw(encode_client(&no_refill));
        assert!(!fields.contains_key(b"credits_refill".as_slice()));
        assert_eq!(decode_client_checked("kg:{acme}:client", "acme", &fields).unwrap(), Some(no_refill));

        let mut fields = raw(encode_client(&record));
        fields.remove(b"credits_granted_at".as_slice());
        let err = decode_client_checked("kg:{acme}:client", "acme", &fields).unwrap_err().to_string();
        assert!(err.contains("field `credits_granted_at`: missing"), "{err}");
        let mut fields = raw(encode_client(&record));
        fields.insert(b"credits".to_vec(), b"-5".to_vec());
        let err = decode_client_checked("kg:{acme}:client", "acme", &fields).unwrap_err().to_string();
        assert!(err.contains("field `credits`"), "{err}");
    }

    #[test]
    fn none_fields_are_left_out() {
        let mut record = record();
        record.meta.label = None;
        let names: Vec<_> = encode(&record).into_iter().map(|(name, _)| name).collect();
        assert!(!names.contains(&"label") && !names.contains(&"burst") && !names.contains(&"expires_at"));
    }

    #[test]
    fn corrupt_fields_name_the_key_and_the_field() {
        let mut fields = raw(encode(&record()));
        fields.insert(b"rate".to_vec(), b"lots".to_vec());
        let err = decode("kg:{acme}:key:07", &fields).unwrap_err().to_string();
        assert!(err.contains("kg:{acme}:key:07") && err.contains("field `rate`"), "{err}");

        let mut fields = raw(encode(&record()));
        fields.remove(b"status".as_slice());
        let err = decode("kg:{acme}:key:07", &fields).unwrap_err().to_string();
        assert!(err.contains("field `status`: missing"), "{err}");
    }

    #[test]
    fn key_names_share_the_client_hash_tag() {
        let names = KeyNames { prefix: "kg:".into() };
        assert_eq!(names.record_hex("acme", "ab"), "kg:{acme}:key:ab");
        assert_eq!(names.id("acme", "k1"), "kg:{acme}:id:k1");
        assert_eq!(names.client_keys("acme"), "kg:{acme}:keys");
        assert_eq!(names.clients(), "kg:clients");
        assert_eq!(names.client("acme"), "kg:{acme}:client");
        assert_eq!(names.channel(), "kg:invalidate");
    }

    #[test]
    fn passwords_are_redacted() {
        let r = Redactor::from_url("redis://user:s3cr%40t@db:6380/0");
        assert_eq!(r.scrub("redis://user:s3cr%40t@db:6380/0".into()), "redis://user:***@db:6380/0");
        assert_eq!(r.scrub("auth s3cr@t failed".into()), "auth *** failed");
        let r = Redactor::from_url("redis+unix:///run/redis.sock?db=1&pass=hunter2");
        assert!(!r.scrub("redis+unix:///run/redis.sock?db=1&pass=hunter2".into()).contains("hunter2"));
        assert_eq!(Redactor::from_url("redis://db:6380").scrub("redis://db:6380".into()), "redis://db:6380");
    }

    #[test]
    fn invalidation_messages_parse() {
        let hash = SecretHash([9; 32]);
        assert_eq!(parse_invalidation(hash.to_hex().as_bytes()), Invalidation::Key(hash));
        assert_eq!(parse_invalidation(b"*"), Invalidation::All);
        let issued = format!("+{}", hash.to_hex());
        assert_eq!(parse_invalidation(issued.as_bytes()), Invalidation::Issued(hash));
        assert_eq!(parse_invalidation(b"+nothex"), Invalidation::All);
        assert_eq!(parse_invalidation(b"client:acme-1"), Invalidation::Client("acme-1".into()));
        assert_eq!(parse_invalidation(b"client:a{b}"), Invalidation::All, "not a client id");
        assert_eq!(parse_invalidation(b"garbage"), Invalidation::All);
    }
}
