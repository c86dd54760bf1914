//! A real `redis-server` for one test, on a free ephemeral port.
//!
//! ```ignore
//! let redis = RedisServer::start();          // waits until it answers PING
//! let store = RedisStore::connect(&redis.url(), "kg:").await?;
//! redis.reset_stats();
//! /* ... */
//! assert_eq!(redis.command_count("hgetall"), 1);
//! redis.stop();                              // like a crash: SIGKILL
//! redis.restart();                           // same port, empty data
//! ```
//!
//! Why it is built this way:
//! - Never the machine's shared 6379 and never a fixed port: a port comes from
//!   binding `127.0.0.1:0`; if something grabs it before Redis binds, Redis
//!   exits and we try another, so parallel tests cannot collide.
//! - No persistence (`--save "" --appendonly no`) and a private temp `--dir`:
//!   tests start empty and leave nothing behind. A restart therefore also
//!   loses all data, like a cache node being replaced.
//! - Readiness is polled (PING, with a deadline), never slept for, and the
//!   answering server's `process_id` is checked to be ours.
//! - The server is killed on `Drop`, so a failing test does not leak it.
//!
//! The binary is `redis-server` from `PATH`, or `$REDIS_SERVER_BIN`. The
//! helpers talk to Redis with the redis crate's blocking client: they are
//! called from test code between awaits, briefly, and never from a store.
//!
//! Over TLS (`RedisServer::start_tls(&ca)`, `start_mtls`): the server listens
//! only on `--tls-port` (`--port 0`), with a certificate for `127.0.0.1` and
//! `localhost` from a [`TestCa`] made in the test; [`url`](RedisServer::url)
//! is then `rediss://`. The certificate files are copied into the server's
//! own folder, so a restart finds them even after the CA is dropped. The
//! helpers connect over TLS too, trusting that CA (with a client certificate
//! from it when the server demands one).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::pki::{Issued, TestCa};

/// How long a starting server may take to answer PING.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// Ports to try if the chosen one is taken before Redis binds it.
const START_ATTEMPTS: usize = 5;

/// A `redis-server` child process owned by one test.
pub struct RedisServer {
    port: u16,
    /// Redis's `--dir` and log file; deleted when the server is dropped.
    dir: tempfile::TempDir,
    /// `None` while stopped.
    child: Option<Child>,
    /// `Some`: the server speaks only TLS.
    tls: Option<ServerTls>,
}

/// A TLS server's files, inside its `--dir`.
#[derive(Debug, Clone)]
struct ServerTls {
    /// The CA that signed the server certificate; client certificates must
    /// chain to it too.
    ca: PathBuf,
    server: Issued,
    /// The harness's own client certificate, when clients must present one
    /// (`--tls-auth-clients yes`).
    client: Option<Issued>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    /// Panics (failing the test) with the server's log if it cannot start.
    pub fn start() -> Self {
        let dir =
            tempfile::Builder::new().prefix("keygate-redis-").tempdir().expect("create a temp dir for redis");
        Self::start_in(dir, None)
    }

    /// A server speaking only TLS, with a certificate for `127.0.0.1` and
    /// `localhost` signed by `ca`; clients need no certificate.
    pub fn start_tls(ca: &TestCa) -> Self {
        Self::start_tls_with(ca, false)
    }

    /// [`start_tls`](Self::start_tls), and every client must present a
    /// certificate signed by `ca` (`--tls-auth-clients yes`).
    pub fn start_mtls(ca: &TestCa) -> Self {
        Self::start_tls_with(ca, true)
    }

    fn start_tls_with(ca: &TestCa, auth_clients: bool) -> Self {
        let dir =
            tempfile::Builder::new().prefix("keygate-redis-").tempdir().expect("create a temp dir for redis");
        let copy = |from: &Path, name: &str| {
            let to = dir.path().join(name);
            std::fs::copy(from, &to).expect("copy a TLS file into the redis dir");
            to
        };
        let server = ca.issue_server("redis-server", &["127.0.0.1", "localhost"]);
        let client = auth_clients.then(|| ca.issue_client("redis-harness"));
        let tls = ServerTls {
            ca: copy(&ca.ca_pem(), "ca.pem"),
            server: Issued {
                cert: copy(&server.cert, "server.pem"),
                key: copy(&server.key, "server-key.pem"),
            },
            client: client
                .map(|c| Issued { cert: copy(&c.cert, "harness.pem"), key: copy(&c.key, "harness-key.pem") }),
        };
        Self::start_in(dir, Some(tls))
    }

    fn start_in(dir: tempfile::TempDir, tls: Option<ServerTls>) -> Self {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match spawn_ready(port, dir.path(), tls.as_ref()) {
                Ok(child) => return Self { port, dir, child: Some(child), tls },
                Err(why) => failures.push(format!("port {port}: {why}")),
            }
        }
        panic!("redis-server did not start:\n{}", failures.join("\n"));
    }

    /// `redis://127.0.0.1:<port>/` (`rediss://` over TLS), for
    /// `RedisStore::connect` and friends.
    /// The usage of `client` over the last two hours, by day, as
    /// `keygate usage --json` reads it (prefix `kg:`, the default).
    pub async fn usage_report(&self, client: &str) -> keygate::usage::UsageReport {
        let mut conn =
            redis::Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let now = jiff::Timestamp::now();
        let query = keygate::usage::UsageQuery {
            client: Some(client.to_owned()),
            since: now.checked_sub(jiff::SignedDuration::from_hours(2)).unwrap(),
            until: now,
            by: keygate::usage::Granularity::Day,
        };
        keygate::usage::query(&mut conn, "kg:", &query).await.unwrap()
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server process is running (not stopped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit.
    /// Clients see their connections reset. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Saves the data and stops, in one step (`SHUTDOWN SAVE`): nothing
    /// written after the save is lost by the stop. A later [`restart`]
    /// loads the saved data back.
    ///
    /// [`restart`]: Self::restart
    pub fn shutdown_saving(&mut self) {
        // The server exits without answering, so the command's error is expected.
        let _ = redis::cmd("SHUTDOWN").arg("SAVE").query::<()>(&mut self.connection());
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Stops the server if running and starts a new one on the same port,
    /// waiting until it answers. The data is gone unless it was saved
    /// (`SAVE`, [`shutdown_saving`](Self::shutdown_saving)).
    pub fn restart(&mut self) {
        self.stop();
        match spawn_ready(self.port, self.dir.path(), self.tls.as_ref()) {
            Ok(child) => self.child = Some(child),
            Err(why) => panic!("redis-server did not restart on port {}: {why}", self.port),
        }
    }

    /// A blocking connection, for a test's own inspection of Redis.
    pub fn connection(&self) -> redis::Connection {
        let client = harness_client(&self.url(), self.tls.as_ref()).expect("valid redis url");
        let conn = client.get_connection_with_timeout(Duration::from_secs(2)).expect("connect to test redis");
        conn.set_read_timeout(Some(Duration::from_secs(5))).expect("set read timeout");
        conn
    }

    /// Runs one command and returns its answer, e.g.
    /// `redis.query::<String>(redis::cmd("GET").arg("k"))`.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        cmd.query(&mut self.connection()).expect("redis command in test")
    }

    /// How many times `name` (e.g. `"hgetall"`, `"evalsha"`) has run since
    /// start or the last [`reset_stats`](Self::reset_stats), from
    /// `INFO commandstats`. Lets a test assert that something made exactly
    /// one round trip, or none at all. The harness's own `ping`/`info`/
    /// `config` calls count too.
    pub fn command_count(&self, name: &str) -> u64 {
        let info: String = self.query(redis::cmd("INFO").arg("commandstats"));
        let prefix = format!("cmdstat_{}:", name.to_ascii_lowercase());
        info.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|stats| stats.split(',').find_map(|kv| kv.strip_prefix("calls=")))
            .map_or(0, |calls| calls.parse().expect("calls= is a number"))
    }

    /// Zeroes `INFO commandstats` (`CONFIG RESETSTAT`).
    pub fn reset_stats(&self) {
        let _: () = self.query(redis::cmd("CONFIG").arg("RESETSTAT"));
    }

    /// Every key with its type and contents rendered as text, sorted by key:
    /// for asserting what is (and is not) stored, e.g. that no clear secret
    /// ever reaches Redis.
    pub fn dump(&self) -> Vec<(String, String)> {
        let mut conn = self.connection();
        let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).expect("KEYS");
        keys.sort();
        keys.into_iter()
            .map(|key| {
                let kind: String = redis::cmd("TYPE").arg(&key).query(&mut conn).expect("TYPE");
                let value: Vec<String> = match kind.as_str() {
                    "string" => vec![redis::cmd("GET").arg(&key).query(&mut conn).expect("GET")],
                    "hash" => redis::cmd("HGETALL").arg(&key).query(&mut conn).expect("HGETALL"),
                    "set" => redis::cmd("SMEMBERS").arg(&key).query(&mut conn).expect("SMEMBERS"),
                    "list" => redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).query(&mut conn).expect("LRANGE"),
                    "zset" => redis::cmd("ZRANGE")
                        .arg(&key)
                        .arg(0)
                        .arg(-1)
                        .arg("WITHSCORES")
                        .query(&mut conn)
                        .expect("ZRANGE"),
                    other => vec![format!("<{other}>")],
                };
                (key, format!("{kind} {}", value.join(" ")))
            })
            .collect()
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(log_path(self.dir.path())).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port the kernel considers free right now (never 6379).
pub(super) fn free_port() -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = listener.local_addr().expect("bound address").port();
        if port != 6379 {
            return port;
        }
    }
}

fn log_path(dir: &std::path::Path) -> PathBuf {
    dir.join("redis.log")
}

/// The harness's own client: over TLS it trusts the server's CA (and
/// presents the harness's certificate when the server demands one).
fn harness_client(url: &str, tls: Option<&ServerTls>) -> redis::RedisResult<redis::Client> {
    let Some(tls) = tls else { return redis::Client::open(url) };
    let read = |path: &Path| std::fs::read(path).expect("read a TLS file of the test redis");
    let client_tls = tls
        .client
        .as_ref()
        .map(|c| redis::ClientTlsConfig { client_cert: read(&c.cert), client_key: read(&c.key) });
    redis::Client::build_with_tls(url, redis::TlsCertificates { client_tls, root_cert: Some(read(&tls.ca)) })
}

/// Starts `redis-server` on `port` and waits until *it* answers PING.
fn spawn_ready(port: u16, dir: &std::path::Path, tls: Option<&ServerTls>) -> Result<Child, String> {
    let scheme = if tls.is_some() { "rediss" } else { "redis" };
    let client = harness_client(&format!("{scheme}://127.0.0.1:{port}/"), tls).map_err(|e| e.to_string())?;
    let binary = std::env::var_os("REDIS_SERVER_BIN").unwrap_or_else(|| "redis-server".into());
    let mut command = Command::new(&binary);
    match tls {
        None => command.args(["--port", &port.to_string()]),
        Some(tls) => command
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&tls.server.cert)
            .arg("--tls-key-file")
            .arg(&tls.server.key)
            .arg("--tls-ca-cert-file")
            .arg(&tls.ca)
            .args(["--tls-auth-clients", if tls.client.is_some() { "yes" } else { "no" }]),
    };
    let child = command
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(log_path(dir))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {binary:?}: {e}. Install Redis (Debian: apt-get install redis-server, \
                 as .ci/run does) or set REDIS_SERVER_BIN"
            )
        });

    wait_until_answering(child, &client, &log_path(dir))
}

/// Waits until the `redis-server` just started as `child` (its log at
/// `log`) is the one answering PING on `client`'s port; kills it when it
/// does not within [`START_DEADLINE`], or when another server holds the port.
pub(super) fn wait_until_answering(
    mut child: Child,
    client: &redis::Client,
    log: &std::path::Path,
) -> Result<Child, String> {
    let log_tail = || {
        let log = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    };
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}; log:\n{}", log_tail()));
        }
        if let Ok(pid) = answering_pid(client) {
            if pid == child.id() {
                return Ok(child);
            }
            // Someone else's server holds the port: ours will fail to bind.
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("port taken by another redis (pid {pid})"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no PING answer within {START_DEADLINE:?}; log:\n{}", log_tail()));
        }
        std::thread::sleep(Duration::from_millis(10)); // poll interval, bounded by the deadline
    }
}

/// PINGs the server on `client`'s port and returns its `process_id`.
fn answering_pid(client: &redis::Client) -> redis::RedisResult<u32> {
    let mut conn = client.get_connection_with_timeout(Duration::from_millis(200))?;
    conn.set_read_timeout(Some(Duration::from_millis(500)))?;
    let _: String = redis::cmd("PING").query(&mut conn)?;
    let info: String = redis::cmd("INFO").arg("server").query(&mut conn)?;
    let pid = info
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or(0);
    Ok(pid)
}
