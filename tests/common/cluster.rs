//! A real Redis Cluster (3 primaries + 3 replicas) and a real Sentinel setup
//! (1 primary, 1 replica, 3 sentinels), from `redis-server` processes on
//! free loopback ports, for one test.
//!
//! ```ignore
//! let cluster = RedisCluster::start();   // waits for cluster_state:ok on all 6
//! let seeds = cluster.urls();            // redis://127.0.0.1:<port>/ for each node
//! let old = cluster.kill_primary_of("kg:{k1}:key");
//! cluster.wait_for_promotion(old);       // a replica took over its slots
//!
//! let sentinel = RedisSentinel::start(); // sentinels agree on the primary
//! sentinel.kill_primary();
//! sentinel.wait_for_failover();          // the replica is the primary now
//! ```
//!
//! Why it is built this way:
//! - Ports come from binding `127.0.0.1:0` (never 6379). The cluster bus gets
//!   its own free port (`cluster-port`, Redis 7), rather than the default
//!   port + 10000 which may be out of range or taken.
//! - Each node has a private temp dir (its `nodes.conf`, log, sentinel
//!   config) and no persistence; everything is killed on `Drop`.
//! - `cluster-node-timeout` and `down-after-milliseconds` are 1 s so a
//!   failover test finishes in seconds; readiness and promotion are polled
//!   with deadlines, never slept for.
//! - The cluster is formed by `redis-cli --cluster create`, exactly what an
//!   operator runs (see `scripts/cluster.sh`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::{free_port, wait_until_answering};

/// How long the cluster may take to agree (`cluster_state:ok` everywhere),
/// and a failover to finish.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(30);
/// Poll interval while waiting on a condition (bounded by a deadline).
const POLL: Duration = Duration::from_millis(20);
/// The master name the sentinels monitor.
pub const SENTINEL_MASTER: &str = "keygate";

/// One `redis-server` process (a cluster node, a primary/replica or a sentinel).
pub struct Node {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Node {
    /// Starts `redis-server` with `args` (plus port, bind, dir, log, no
    /// persistence) and waits until it answers PING. `config` is written to
    /// the node's dir and passed as the config file when given (sentinels
    /// need a writable one).
    fn start(args: &[String], config: Option<&str>, sentinel: bool) -> Self {
        Self::start_with(|| args.to_vec(), config, sentinel)
    }

    /// As [`Node::start`], with the arguments made afresh for each attempt:
    /// a port in them (a cluster bus port) taken meanwhile by another test
    /// is then chosen again, not retried five times.
    fn start_with(args: impl Fn() -> Vec<String>, config: Option<&str>, sentinel: bool) -> Self {
        let mut failures = Vec::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new().prefix("keygate-cluster-").tempdir().expect("temp dir");
            let port = free_port();
            match spawn(port, dir.path(), &args(), config, sentinel) {
                Ok(child) => return Self { port, dir, child: Some(child) },
                Err(why) => failures.push(format!("port {port}: {why}")),
            }
        }
        panic!("redis-server did not start:\n{}", failures.join("\n"));
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, like a crash. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A blocking connection to this node alone (no cluster redirection).
    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        let conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(conn)
    }

    /// Runs one command on this node.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> redis::RedisResult<T> {
        cmd.query(&mut self.connection()?)
    }

    /// `INFO <section>` as text; empty if the node does not answer.
    pub fn info(&self, section: &str) -> String {
        self.query(redis::cmd("INFO").arg(section)).unwrap_or_default()
    }

    /// For a primary: every replica has acknowledged everything written so
    /// far (its `offset` has reached `master_repl_offset`). Replication is
    /// asynchronous: a write the primary answered may still be missing on
    /// the replica that a failover promotes, and then it is lost, as it
    /// would be in production. Tests that kill a primary wait on this first
    /// when they need their writes to survive.
    pub fn replicated(&self) -> bool {
        let info = self.info("replication");
        let field = |name: &str| info.lines().find_map(|l| l.trim().strip_prefix(name)).map(str::to_owned);
        let Some(written) = field("master_repl_offset:").and_then(|v| v.parse::<u64>().ok()) else {
            return false;
        };
        let acked: Vec<u64> = info
            .lines()
            .filter(|l| l.starts_with("slave") && l.contains("offset="))
            .filter_map(|l| l.split(',').find_map(|kv| kv.strip_prefix("offset="))?.parse().ok())
            .collect();
        !acked.is_empty() && acked.iter().all(|offset| *offset >= written)
    }

    /// `role:master` / `role:slave` from `INFO replication`.
    pub fn is_primary(&self) -> bool {
        self.is_running() && self.info("replication").lines().any(|l| l.trim() == "role:master")
    }

    /// Calls of `name` since start or `CONFIG RESETSTAT`, from `INFO commandstats`.
    pub fn command_count(&self, name: &str) -> u64 {
        let prefix = format!("cmdstat_{}:", name.to_ascii_lowercase());
        self.info("commandstats")
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|stats| stats.split(',').find_map(|kv| kv.strip_prefix("calls=")))
            .map_or(0, |calls| calls.parse().unwrap_or(0))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A 3-primary + 3-replica Redis Cluster on loopback.
pub struct RedisCluster {
    pub nodes: Vec<Node>,
}

impl RedisCluster {
    /// Starts 6 nodes, joins them with `redis-cli --cluster create
    /// --cluster-replicas 1`, and waits until every node reports
    /// `cluster_state:ok` with all 16384 slots assigned and 6 known nodes.
    pub fn start() -> Self {
        let nodes: Vec<Node> = (0..6)
            .map(|_| {
                let args = || {
                    let bus = free_port().to_string();
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                        "--cluster-port",
                        &bus,
                        // Replicas sync at once: a replica that never synced
                        // cannot be promoted.
                        "--repl-diskless-sync-delay",
                        "0",
                    ]
                    .map(String::from)
                    .to_vec()
                };
                Node::start_with(args, None, false)
            })
            .collect();
        let cli = std::env::var_os("REDIS_CLI_BIN").unwrap_or_else(|| "redis-cli".into());
        let output = Command::new(&cli)
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(Node::addr))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cli:?}: {e}"));
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = Self { nodes };
        cluster.wait_until("cluster_state:ok on all 6 nodes, replicas in sync", |c| {
            c.converged(6) && c.primaries().len() == 3 && c.replicas_in_sync()
        });
        cluster
    }

    /// Seed URLs, one per node, as `[store] nodes` takes them.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// The running primaries.
    pub fn primaries(&self) -> Vec<&Node> {
        self.nodes.iter().filter(|n| n.is_primary()).collect()
    }

    /// The index of the node currently serving `key`'s slot as primary.
    pub fn primary_index_of(&self, key: &str) -> usize {
        let slot: u16 =
            self.any_running().query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).expect("CLUSTER KEYSLOT");
        let shards: Vec<redis::Value> =
            self.any_running().query(redis::cmd("CLUSTER").arg("SLOTS")).expect("CLUSTER SLOTS");
        for shard in shards {
            let redis::Value::Array(parts) = shard else { continue };
            let (
                Some(redis::Value::Int(from)),
                Some(redis::Value::Int(to)),
                Some(redis::Value::Array(primary)),
            ) = (parts.first(), parts.get(1), parts.get(2))
            else {
                continue;
            };
            if (*from..=*to).contains(&i64::from(slot)) {
                let Some(redis::Value::Int(port)) = primary.get(1) else { continue };
                return self.nodes.iter().position(|n| i64::from(n.port) == *port).expect("a node of ours");
            }
        }
        panic!("no primary serves slot {slot}");
    }

    /// Kills (SIGKILL) the primary serving `key`'s slot; returns its index.
    pub fn kill_primary_of(&mut self, key: &str) -> usize {
        let index = self.primary_index_of(key);
        self.nodes[index].kill();
        index
    }

    /// Waits until the surviving nodes agree again: `cluster_state:ok` on
    /// every running node and 3 running primaries (a replica of the killed
    /// one was promoted). Returns how long it took.
    pub fn wait_for_promotion(&self) -> Duration {
        let started = Instant::now();
        self.wait_until("a replica promoted and cluster_state:ok", |c| {
            c.converged(5) && c.primaries().len() == 3
        });
        started.elapsed()
    }

    /// `INFO commandstats` calls of `name`, summed over the running nodes.
    pub fn command_count(&self, name: &str) -> u64 {
        self.nodes.iter().filter(|n| n.is_running()).map(|n| n.command_count(name)).sum()
    }

    /// `CONFIG RESETSTAT` on every running node.
    pub fn reset_stats(&self) {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let _: redis::RedisResult<()> = node.query(redis::cmd("CONFIG").arg("RESETSTAT"));
        }
    }

    /// Waits until every running primary's replicas acknowledged all its
    /// writes (see [`Node::replicated`]).
    pub fn wait_replicated(&self) {
        self.wait_until("every replica caught up with its primary", |c| {
            c.nodes.iter().filter(|n| n.is_primary()).all(Node::replicated)
        });
    }

    /// Every running replica has finished its sync (`master_link_status:up`).
    fn replicas_in_sync(&self) -> bool {
        self.nodes
            .iter()
            .filter(|n| n.is_running() && !n.is_primary())
            .all(|n| n.info("replication").lines().any(|l| l.trim() == "master_link_status:up"))
    }

    /// Every running node says `cluster_state:ok`, all slots are assigned,
    /// and it knows at least `alive` nodes.
    fn converged(&self, alive: usize) -> bool {
        let running: Vec<&Node> = self.nodes.iter().filter(|n| n.is_running()).collect();
        running.len() >= alive
            && running.iter().all(|n| {
                let info: String = n.query(redis::cmd("CLUSTER").arg("INFO")).unwrap_or_default();
                let field = |name: &str| {
                    info.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("").to_owned()
                };
                field("cluster_state:") == "ok"
                    && field("cluster_slots_ok:") == "16384"
                    && field("cluster_known_nodes:").parse::<usize>().unwrap_or(0) >= alive
            })
    }

    fn any_running(&self) -> &Node {
        self.nodes.iter().find(|n| n.is_running()).expect("a running node")
    }

    fn wait_until(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + CONVERGE_DEADLINE;
        while !check(self) {
            if Instant::now() > deadline {
                let logs: Vec<String> =
                    self.nodes.iter().map(|n| format!("--- {}\n{}", n.port, tail(&n.log()))).collect();
                panic!("cluster: not within {CONVERGE_DEADLINE:?}: {what}\n{}", logs.join("\n"));
            }
            std::thread::sleep(POLL); // poll interval, bounded by the deadline
        }
    }
}

/// One primary, one replica and three sentinels monitoring them as
/// [`SENTINEL_MASTER`] with quorum 2.
pub struct RedisSentinel {
    pub primary: Node,
    pub replica: Node,
    pub sentinels: Vec<Node>,
}

impl RedisSentinel {
    /// Starts the data nodes, then the sentinels, and waits until every
    /// sentinel sees the primary, its replica and the two other sentinels.
    pub fn start() -> Self {
        let fast_sync = ["--repl-diskless-sync-delay".to_owned(), "0".to_owned()];
        let primary = Node::start(&fast_sync, None, false);
        let replica = Node::start(
            &[&fast_sync[..], &["--replicaof".into(), "127.0.0.1".into(), primary.port.to_string()]].concat(),
            None,
            false,
        );
        let config = format!(
            "sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {port} 2\n\
             sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
             sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
             sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
            port = primary.port
        );
        let sentinels = (0..3).map(|_| Node::start(&[], Some(&config), true)).collect();
        let setup = Self { primary, replica, sentinels };
        setup.wait_until("every sentinel sees 1 replica and 3 sentinels", |s| {
            let synced = s.replica.info("replication").lines().any(|l| l.trim() == "master_link_status:up");
            synced
                && s.sentinels.iter().all(|n| {
                    let info = n.info("sentinel");
                    info.contains(&format!(
                        "status=ok,address=127.0.0.1:{},slaves=1,sentinels=3",
                        s.primary.port
                    ))
                })
        });
        setup
    }

    /// Sentinel URLs, as `[store] sentinels` takes them.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(Node::url).collect()
    }

    /// SIGKILLs the current primary.
    pub fn kill_primary(&mut self) {
        self.primary.kill();
    }

    /// The `[store]` section of a gateway config on this setup.
    pub fn store_toml(&self) -> String {
        let sentinels =
            self.sentinel_urls().iter().map(|url| format!("\"{url}\"")).collect::<Vec<_>>().join(", ");
        format!(
            "[store]\nkind = \"redis-sentinel\"\nsentinels = [{sentinels}]\nmaster = \"{SENTINEL_MASTER}\"\n"
        )
    }

    /// Waits until the replica acknowledged all the primary's writes (see
    /// [`Node::replicated`]).
    pub fn wait_replicated(&self) {
        self.wait_until("the replica caught up with the primary", |s| s.primary.replicated());
    }

    /// Waits until every running sentinel names the replica as the primary
    /// and the replica says `role:master`. Returns how long it took.
    pub fn wait_for_failover(&self) -> Duration {
        let started = Instant::now();
        let wanted = self.replica.port.to_string();
        self.wait_until("the replica promoted by the sentinels", |s| {
            s.replica.is_primary()
                && s.sentinels.iter().all(|n| {
                    n.query::<Vec<String>>(
                        redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME").arg(SENTINEL_MASTER),
                    )
                    .is_ok_and(|addr| addr.get(1) == Some(&wanted))
                })
        });
        started.elapsed()
    }

    fn wait_until(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + CONVERGE_DEADLINE;
        while !check(self) {
            if Instant::now() > deadline {
                let logs: Vec<String> =
                    self.sentinels.iter().map(|n| format!("--- {}\n{}", n.port, tail(&n.log()))).collect();
                panic!("sentinel: not within {CONVERGE_DEADLINE:?}: {what}\n{}", logs.join("\n"));
            }
            std::thread::sleep(POLL); // poll interval, bounded by the deadline
        }
    }
}

/// The last lines of a log, for failure messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// Starts one `redis-server` and waits until *it* answers PING.
fn spawn(
    port: u16,
    dir: &Path,
    args: &[String],
    config: Option<&str>,
    sentinel: bool,
) -> Result<Child, String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).map_err(|e| e.to_string())?;
    let binary = std::env::var_os("REDIS_SERVER_BIN").unwrap_or_else(|| "redis-server".into());
    let mut command = Command::new(&binary);
    if let Some(config) = config {
        let path = dir.join("node.conf");
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        command.arg(&path);
    }
    if sentinel {
        command.arg("--sentinel");
    } else {
        command.args(["--save", "", "--appendonly", "no"]);
    }
    let child = command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {binary:?}: {e}. Install Redis or set REDIS_SERVER_BIN"));
    wait_until_answering(child, &client, &dir.join("redis.log"))
}
