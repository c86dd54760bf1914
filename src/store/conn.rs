//! One Redis connection type over a single node, a Redis Cluster or a
//! Sentinel-managed primary, and the [`RedisTarget`] that opens them.
//!
//! Every part of keygate that talks to Redis (the key store, limits, usage,
//! the CLI) holds a connection and only needs `redis::aio::ConnectionLike`
//! plus `Clone`; this enum gives them that over any topology, so none of
//! them copies code per topology and new commands (refresh tokens, ...) go
//! through it unchanged.
//!
//! - Single: the crate's `ConnectionManager`, reconnecting on its own.
//! - Cluster: the crate's async cluster client. It routes each command to
//!   the slot's primary and follows MOVED/ASK and failovers itself, within
//!   the response timeout given here. It is made on first use, so a gateway
//!   starts while the cluster is down. Multi-key commands must still keep
//!   their keys in one slot (hash tags, see docs/redis-schema.md); the crate
//!   refuses a cross-slot command. A pipeline spanning slots is cut into
//!   one pipeline per slot ([`super::slots`]).
//! - Sentinel: a `ConnectionManager` to the primary the sentinels name. An
//!   error that says the primary moved (refused connection, `READONLY` from a
//!   demoted primary, a dropped connection) makes the next command ask the
//!   sentinels again; a command that cannot have run (refused, `READONLY`)
//!   is retried once on the new primary, others are not, so nothing is
//!   applied twice by this layer.
//!
//! Parts needing a connection of their own (the pub/sub subscriber, the
//! usage flusher) get it from the [`RedisTarget`], which knows the topology.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio::sync::{Mutex, OnceCell};

use crate::redis_target::{Endpoint, Field, RedisTls, TargetError};

/// A cloneable, multiplexed connection to one Redis node, a cluster, or a
/// Sentinel-managed primary.
#[derive(Clone)]
pub enum RedisConn {
    /// One node, reconnecting on its own (what keygate used before clusters).
    Single(ConnectionManager),
    /// A Redis Cluster, found from seed nodes; follows slot moves and failovers.
    Cluster(ClusterConn),
    /// The primary the sentinels name; follows their failovers.
    Sentinel(SentinelConn),
}

/// Deadlines of a connection (see `RedisStoreOptions` for the store's).
#[derive(Debug, Clone, Copy)]
pub struct ConnTimeouts {
    /// Limit on establishing one TCP (and TLS/AUTH) connection.
    pub connect: Duration,
    /// Limit on one command's answer, redirects and retries included.
    pub response: Duration,
    /// Reconnect attempts of a single node's connection manager.
    pub retries: usize,
}

impl ConnTimeouts {
    fn manager_config(self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect))
            .set_response_timeout(Some(self.response))
            .set_number_of_retries(self.retries)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(self.connect)
    }
}

impl RedisConn {
    /// Connects to a cluster through any of `seeds` (`redis://host:port`).
    /// `deadline` bounds each command, redirects and retries included.
    pub async fn cluster(seeds: &[String], deadline: Duration) -> RedisResult<Self> {
        let conn = ClusterConn::new(Arc::new(cluster_client(seeds, None, deadline, deadline)?));
        conn.get().await?;
        Ok(Self::Cluster(conn))
    }
}

impl From<ConnectionManager> for RedisConn {
    fn from(conn: ConnectionManager) -> Self {
        Self::Single(conn)
    }
}

fn cluster_client(
    seeds: &[String],
    certs: Option<redis::TlsCertificates>,
    connect: Duration,
    response: Duration,
) -> RedisResult<ClusterClient> {
    let mut builder = ClusterClient::builder(seeds.to_vec())
        .connection_timeout(connect)
        .response_timeout(response)
        // Retries of one command (redirects, a failover) stay within the
        // response deadline the caller sets on the whole call.
        .min_retry_wait(20)
        .max_retry_wait(500);
    if let Some(certs) = certs {
        builder = builder.certs(certs);
    }
    builder.build()
}

// === impl ConnectionLike for RedisConn ===

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => Box::pin(async move { conn.get().await?.req_packed_command(cmd).await }),
            Self::Sentinel(conn) => Box::pin(async move {
                let result = conn.primary().await?.req_packed_command(cmd).await;
                match result {
                    Err(e) if conn.forget_if_moved(&e) => conn.primary().await?.req_packed_command(cmd).await,
                    other => other,
                }
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => Box::pin(async move {
                let conn = conn.get().await?;
                let Some(groups) = super::slots::split(pipeline, offset, count) else {
                    return conn.clone().req_packed_commands(pipeline, offset, count).await;
                };
                // One pipeline per slot, concurrently; replies back in order.
                let sent = groups.iter().map(|group| {
                    let mut conn = conn.clone();
                    async move { conn.req_packed_commands(&group.pipeline, 0, group.replies.len()).await }
                });
                let answers = futures_util::future::join_all(sent).await;
                let mut replies = vec![Value::Nil; count];
                for (group, answer) in groups.iter().zip(answers) {
                    for (&at, value) in group.replies.iter().zip(answer?) {
                        if let Some(slot) = replies.get_mut(at) {
                            *slot = value;
                        }
                    }
                }
                Ok(replies)
            }),
            Self::Sentinel(conn) => Box::pin(async move {
                let result = conn.primary().await?.req_packed_commands(pipeline, offset, count).await;
                match result {
                    Err(e) if conn.forget_if_moved(&e) => {
                        conn.primary().await?.req_packed_commands(pipeline, offset, count).await
                    }
                    other => other,
                }
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(_) => 0,
            Self::Sentinel(_) => 0,
        }
    }
}

// === impl ClusterConn ===

/// The cluster client's connection, made on first use (and again on the
/// next use after making it failed), shared by every clone.
#[derive(Clone)]
pub struct ClusterConn {
    /// Shared: the client is large, and every clone makes the same connection.
    client: Arc<ClusterClient>,
    conn: Arc<OnceCell<ClusterConnection>>,
}

impl ClusterConn {
    fn new(client: Arc<ClusterClient>) -> Self {
        Self { client, conn: Arc::new(OnceCell::new()) }
    }

    async fn get(&self) -> RedisResult<ClusterConnection> {
        self.conn.get_or_try_init(|| self.client.get_async_connection()).await.cloned()
    }
}

// === impl SentinelConn ===

/// A connection to the primary the sentinels name, found again after an
/// error that says it moved. Clones share the current primary.
#[derive(Clone)]
pub struct SentinelConn {
    /// Asking the sentinels needs `&mut`; one task asks at a time, the
    /// others wait for its answer (no other async work under the lock).
    sentinel: Arc<Mutex<SentinelClient>>,
    current: Arc<ArcSwapOption<ConnectionManager>>,
    config: ConnectionManagerConfig,
    deadline: Duration,
}

impl SentinelConn {
    fn new(sentinel: SentinelClient, timeouts: ConnTimeouts) -> Self {
        Self {
            sentinel: Arc::new(Mutex::new(sentinel)),
            current: Arc::new(ArcSwapOption::empty()),
            config: timeouts.manager_config(),
            deadline: timeouts.connect + timeouts.response,
        }
    }

    /// The current primary's connection, asking the sentinels if there is none.
    async fn primary(&self) -> RedisResult<ConnectionManager> {
        if let Some(conn) = self.current.load_full() {
            return Ok((*conn).clone());
        }
        let mut sentinel = self.sentinel.lock().await;
        // Another task may have found it while this one waited.
        if let Some(conn) = self.current.load_full() {
            return Ok((*conn).clone());
        }
        let find = async {
            let client = sentinel.async_get_client().await?;
            ConnectionManager::new_with_config(client, self.config.clone()).await
        };
        let conn = tokio::time::timeout(self.deadline, find).await.map_err(|_| {
            RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no primary from the sentinels in time",
            ))
        })??;
        self.current.store(Some(Arc::new(conn.clone())));
        Ok(conn)
    }

    /// Forgets the primary after an error that says it moved, so the next
    /// command asks the sentinels. Returns whether the command that failed
    /// cannot have run, and so may be retried on the new primary.
    fn forget_if_moved(&self, error: &RedisError) -> bool {
        let refused = error.is_connection_refusal() || error.code() == Some("READONLY");
        if refused || error.is_io_error() || error.is_connection_dropped() {
            self.current.store(None);
        }
        refused
    }
}

// === impl RedisTarget ===

/// Where the deployment's Redis is, with its clients built (URLs and TLS
/// files checked): opens the connections every part uses. What a bare
/// `redis::Client` was before clusters.
#[derive(Clone)]
pub enum RedisTarget {
    Single(redis::Client),
    /// The cluster client, and one client per seed node for connections
    /// that must go to one node (pub/sub).
    Cluster {
        client: Arc<ClusterClient>,
        nodes: Vec<redis::Client>,
    },
    /// The sentinels, asked for the primary at each (re)connection.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Clients hold connection info with passwords: names only.
        match self {
            Self::Single(client) => write!(f, "Single({})", client.get_connection_info().addr()),
            Self::Cluster { nodes, .. } => write!(f, "Cluster({} seeds)", nodes.len()),
            Self::Sentinel { master, .. } => write!(f, "Sentinel({master})"),
        }
    }
}

impl RedisTarget {
    /// Builds the clients for `endpoint` with `tls`; connects to nothing.
    /// The timeouts are the cluster client's (it keeps them for life).
    pub fn new(endpoint: &Endpoint, tls: &RedisTls, timeouts: ConnTimeouts) -> Result<Self, TargetError> {
        match endpoint {
            Endpoint::Node(url) => Ok(Self::Single(crate::redis_target::client(url, tls)?)),
            Endpoint::Cluster(seeds) => {
                if seeds.is_empty() {
                    return Err(TargetError {
                        field: Field::Url,
                        message: "a cluster needs seed nodes".into(),
                    });
                }
                let nodes = seeds
                    .iter()
                    .map(|url| crate::redis_target::client(url, tls))
                    .collect::<Result<Vec<_>, _>>()?;
                let certs = if tls.is_empty() { None } else { crate::redis_target::certificates(tls)? };
                let client =
                    cluster_client(seeds, certs, timeouts.connect, timeouts.response).map_err(|e| {
                        TargetError {
                            field: Field::Url,
                            message: crate::redis_target::scrub(&seeds[0], format!("cluster seeds: {e}")),
                        }
                    })?;
                Ok(Self::Cluster { client: Arc::new(client), nodes })
            }
            Endpoint::Sentinel { sentinels, master } => {
                crate::redis_target::check(endpoint, tls)?;
                Ok(Self::Sentinel { sentinels: sentinels.clone(), master: master.clone() })
            }
        }
    }

    /// `host:port` of the first node named: what messages say. Never a URL.
    pub fn addr(&self) -> String {
        match self {
            Self::Single(client) => client.get_connection_info().addr().to_string(),
            Self::Cluster { nodes, .. } => match nodes.first() {
                Some(node) => {
                    format!("cluster {} (+{} seeds)", node.get_connection_info().addr(), nodes.len() - 1)
                }
                None => "cluster".to_owned(),
            },
            Self::Sentinel { master, .. } => format!("sentinel master {master}"),
        }
    }

    /// A connection, proven by connecting within the timeouts.
    pub async fn connect(&self, timeouts: ConnTimeouts) -> RedisResult<RedisConn> {
        match self {
            Self::Single(client) => Ok(RedisConn::Single(
                ConnectionManager::new_with_config(client.clone(), timeouts.manager_config()).await?,
            )),
            Self::Cluster { client, .. } => {
                let conn = ClusterConn::new(client.clone());
                conn.get().await?;
                Ok(RedisConn::Cluster(conn))
            }
            Self::Sentinel { .. } => {
                let conn = self.sentinel_conn(timeouts)?;
                conn.primary().await?;
                Ok(RedisConn::Sentinel(conn))
            }
        }
    }

    /// A connection made on first use, so a gateway can start while Redis
    /// is down. Must run inside a tokio runtime.
    pub fn connect_lazy(&self, timeouts: ConnTimeouts) -> RedisResult<RedisConn> {
        match self {
            Self::Single(client) => Ok(RedisConn::Single(ConnectionManager::new_lazy_with_config(
                client.clone(),
                timeouts.manager_config(),
            )?)),
            Self::Cluster { client, .. } => Ok(RedisConn::Cluster(ClusterConn::new(client.clone()))),
            Self::Sentinel { .. } => Ok(RedisConn::Sentinel(self.sentinel_conn(timeouts)?)),
        }
    }

    fn sentinel_conn(&self, timeouts: ConnTimeouts) -> RedisResult<SentinelConn> {
        let Self::Sentinel { sentinels, master } = self else {
            return Err(RedisError::from((redis::ErrorKind::InvalidClientConfig, "not a sentinel target")));
        };
        let client =
            SentinelClient::build(sentinels.clone(), master.as_str(), None, SentinelServerType::Master)?;
        Ok(SentinelConn::new(client, timeouts))
    }

    /// A client for one node to hold a subscription on, for the `attempt`th
    /// (re)subscription. Plain `PUBLISH` reaches every node of a cluster, so
    /// any node will do; successive attempts rotate through the seeds, so a
    /// dead node is left for the next. With Sentinel: the current primary.
    pub async fn pubsub_client(&self, attempt: usize) -> RedisResult<redis::Client> {
        match self {
            Self::Single(client) => Ok(client.clone()),
            Self::Cluster { nodes, .. } => match nodes.get(attempt % nodes.len().max(1)) {
                Some(node) => Ok(node.clone()),
                None => Err(RedisError::from((redis::ErrorKind::InvalidClientConfig, "no cluster nodes"))),
            },
            Self::Sentinel { sentinels, master } => {
                let mut client = SentinelClient::build(
                    sentinels.clone(),
                    master.as_str(),
                    None,
                    SentinelServerType::Master,
                )?;
                client.async_get_client().await
            }
        }
    }
}
