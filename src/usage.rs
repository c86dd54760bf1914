//! Usage tracking: counted on the request path, flushed to Redis, read back.
//!
//! ```text
//! handler --record()--> UsageRecorder (sharded, in memory)
//!                           | drain every second
//!                           v
//!                       UsageFlusher -> Ledger (this gateway's totals per client and bucket)
//!                           | one HSET per client and bucket: when it ends, at rollups, within a freshness budget
//!                           v
//!                         Redis <-- query(), dashboards (add up each gateway's fields)
//! ```
//!
//! - [`recorder`]: [`UsageRecorder::record`], the only part on the request
//!   path: no Redis call, no lock shared across cores.
//! - [`ledger`]: the gateway's running totals, why they are totals, and
//!   the writer names that keep gateways' totals apart.
//! - [`flusher`]: [`UsageFlusher`], what is written when (and so how fresh
//!   Redis is), the final flush and counters for `/metrics`.
//! - [`writes`]: the Redis commands of a flush, bounded round trips.
//! - [`schema`]: the Redis layout (key names, buckets, fields, retention),
//!   documented for dashboards in `docs/redis-schema.md` ("Usage").
//! - [`query`]: [`query()`] for `keygate usage` and the admin API;
//!   [`last_used()`] for `keys list/show`.
//! - [`audit`]: the capped stream of key operations behind `keygate keys audit`.
//!
//! Wiring, in `serve`:
//!
//! ```ignore
//! let recorder = Arc::new(UsageRecorder::new());
//! let conn = usage::connect(&redis_url)?;           // lazy: Redis may be down; not the store's connection
//! let flusher = UsageFlusher::new(recorder.clone(), conn, prefix, FlushConfig::default());
//! let flushing = flusher.spawn(shutdown_signal);    // final flush when it fires
//! // per request, after the response: recorder.record(&UsageEvent { .. });
//! // after the server drained: flushing.join().await
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod audit;
pub mod flusher;
pub mod ledger;
pub mod query;
pub mod recorder;
pub mod schema;
pub mod writes;

use std::time::Duration;

use crate::store::conn::{ConnTimeouts, RedisConn, RedisTarget};

pub use audit::{AuditAction, AuditEntry, AuditRecord, append_audit, read_audit};
pub use flusher::{FlushConfig, FlushReport, FlushStats, UsageFlusher, UsageThread};
pub use query::{UsageQuery, UsageReport, last_used, query};
pub use recorder::{Refusal, UsageEvent, UsageRecorder};
pub use schema::{ANONYMOUS, Counts, Granularity, Retention};
pub use writes::Limits;

/// Why reading or writing usage failed. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// Redis could not be reached or refused a command.
    #[error("redis: {0}")]
    Redis(String),
    /// A query asked for something impossible (bad client, range too large).
    #[error("{0}")]
    Invalid(String),
    /// The flusher's thread could not start, or panicked.
    #[error("usage thread: {0}")]
    Thread(String),
}

/// An auto-reconnecting Redis connection for usage and audit, created
/// without connecting: the first command connects, so a gateway can start
/// (and count) while Redis is down. Must run inside a tokio runtime.
pub fn connect(url: &str) -> Result<RedisConn, UsageError> {
    connect_tls(url, &crate::redis_target::RedisTls::default())
}

/// [`connect`] to a `rediss://` Redis with TLS files (`[store] tls_ca`, ...).
pub fn connect_tls(url: &str, tls: &crate::redis_target::RedisTls) -> Result<RedisConn, UsageError> {
    connect_endpoint(&crate::redis_target::Endpoint::Node(url.to_owned()), tls)
}

/// [`connect`] to any topology: one node, a cluster, a Sentinel primary.
pub fn connect_endpoint(
    endpoint: &crate::redis_target::Endpoint,
    tls: &crate::redis_target::RedisTls,
) -> Result<RedisConn, UsageError> {
    // Through the one constructor of Redis clients; its errors never repeat
    // the URL's password.
    let target = RedisTarget::new(endpoint, tls, TIMEOUTS).map_err(|e| UsageError::Invalid(e.to_string()))?;
    connect_target(&target)
}

/// [`connect`] from a target (e.g. the store's, for a connection of usage's
/// own beside the store's).
pub fn connect_target(target: &RedisTarget) -> Result<RedisConn, UsageError> {
    target
        .connect_lazy(TIMEOUTS)
        .map_err(|e| UsageError::Redis(format!("cannot set up a connection ({:?})", e.kind())))
}

/// Usage's deadlines: writes are off the request path and retried, so a
/// slow answer may take longer than a key lookup's.
const TIMEOUTS: ConnTimeouts =
    ConnTimeouts { connect: Duration::from_secs(1), response: Duration::from_secs(2), retries: 1 };
