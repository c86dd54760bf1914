//! Usage tracking: counted on the request path, flushed to Redis, read back.
//!
//! ```text
//! handler --record()--> UsageRecorder (sharded, in memory)
//!                           | drain every second
//!                           v
//!                       UsageFlusher --one MULTI/HINCRBY.../EXEC per client--> Redis <-- query(), dashboards
//! ```
//!
//! - [`recorder`]: [`UsageRecorder::record`], the only part on the request
//!   path: no Redis call, no lock shared across cores.
//! - [`flusher`]: [`UsageFlusher`], the writer with its bounded retry
//!   buffer, final flush and counters for `/metrics`.
//! - [`writes`]: the Redis commands of a flush: one transaction per client,
//!   bounded transactions and round trips.
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
pub mod query;
pub mod recorder;
pub mod schema;
pub mod writes;

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

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
pub fn connect(url: &str) -> Result<ConnectionManager, UsageError> {
    connect_tls(url, &crate::redis_target::RedisTls::default())
}

/// [`connect`] to a `rediss://` Redis with TLS files (`[store] tls_ca`, ...).
pub fn connect_tls(url: &str, tls: &crate::redis_target::RedisTls) -> Result<ConnectionManager, UsageError> {
    // The one constructor of Redis clients; its errors never repeat the
    // URL's password.
    let client = crate::redis_target::client(url, tls).map_err(|e| UsageError::Invalid(e.to_string()))?;
    connect_client(client)
}

/// [`connect`] from a client (e.g. the store's, for a connection of usage's
/// own beside the store's).
pub fn connect_client(client: redis::Client) -> Result<ConnectionManager, UsageError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_secs(1));
    ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| UsageError::Redis(format!("cannot set up a connection ({:?})", e.kind())))
}
