//! One Redis connection type over a single node or a Redis Cluster.
//!
//! Every part of keygate that talks to Redis (the key store, limits, usage,
//! the CLI) holds a connection and only needs `redis::aio::ConnectionLike`
//! plus `Clone`; this enum gives them that over either topology, so none of
//! them copies code per topology and new commands (refresh tokens, ...) go
//! through it unchanged. The cluster arm is the `redis` crate's own async
//! cluster client: it routes each command to the slot's primary and follows
//! MOVED/ASK itself, within the response timeout given here. Multi-key
//! commands must still keep their keys in one slot (hash tags, see
//! docs/redis-schema.md); the crate refuses a cross-slot command.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// A cloneable, multiplexed connection to one Redis node or a cluster.
#[derive(Clone)]
pub enum RedisConn {
    /// One node, reconnecting on its own (what keygate used before clusters).
    Single(ConnectionManager),
    /// A Redis Cluster, found from seed nodes; follows slot moves and failovers.
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Connects to a cluster through any of `seeds` (`redis://host:port`).
    /// `deadline` bounds each command, redirects and retries included.
    pub async fn cluster(seeds: &[String], deadline: Duration) -> RedisResult<Self> {
        let client = ClusterClient::builder(seeds.to_vec())
            .connection_timeout(deadline)
            .response_timeout(deadline)
            .build()?;
        Ok(Self::Cluster(client.get_async_connection().await?))
    }
}

impl From<ConnectionManager> for RedisConn {
    fn from(conn: ConnectionManager) -> Self {
        Self::Single(conn)
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
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
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}
