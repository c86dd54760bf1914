//! The `keygate` command. The top-level command (`serve`, `check`, and the
//! store options) lives here; each group of subcommands has its own file.
//!
//! Everything a script may capture goes to stdout; messages go to stderr.
//! Exit codes are one table for every command: see [`exit`].
//!
//! The config file: `-c`/`--config`, or `KEYGATE_CONFIG` when the flag is
//! not given (a systemd unit or a container sets the variable once for every
//! command run there); the flag wins over the variable.
//!
//! The store: every command that touches it (`serve` included) reads the
//! config file's `[store]`, and `--redis URL` or `KEYGATE_REDIS_URL`
//! replaces it (the flag winning over the variable). Only `serve` and
//! `check --env` read the admin token's variable (`[admin] token_env`).

pub mod clients;
pub mod exit;
pub mod keys;
mod table;
pub mod tokens;
pub mod usage;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use self::exit::Exit;
use crate::admin::{self, Admin};
use crate::config::{Config, ConfigError, Purpose, StoreConfig};
use crate::gateway::Gateway;
use crate::redis_target::{Endpoint, RedisTls};
use crate::reload::{self, Reloader};
use crate::server;
use crate::store::{self, SharedStore};

#[derive(Debug, Parser)]
#[command(
    name = "keygate",
    version = crate::build_info::LONG_VERSION,
    about = "An API-key gateway: verifies, scopes, rate-limits and meters API keys.",
    after_help = "Exit codes: 0 done, 1 failed while running (store unreachable, ...), \
                  2 usage or config error, 3 key not found."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Validate a config file and exit (0 valid, 2 invalid).
    Check(CheckArgs),
    /// Issue, list, show, update, revoke and rotate keys in the configured store.
    Keys {
        #[command(flatten)]
        store: StoreArgs,
        #[command(subcommand)]
        command: Box<keys::KeysCommand>,
    },
    /// Create, list, show, update and revoke client records: limits and a
    /// quota shared by all of a client's keys, and revoking all of them at once.
    Clients {
        #[command(flatten)]
        store: StoreArgs,
        #[command(subcommand)]
        command: clients::ClientsCommand,
    },
    /// Print usage (requests, status classes, refusals, bytes, latency) read from Redis.
    Usage(usage::UsageArgs),
    /// List and rotate the keys access tokens are signed with (the ring in
    /// the store, shared by every gateway).
    Tokens {
        #[command(flatten)]
        store: StoreArgs,
        #[command(subcommand)]
        command: tokens::TokensCommand,
    },
}

#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Path to the config file.
    #[arg(short = 'c', long = "config", env = "KEYGATE_CONFIG", default_value = "gateway.toml")]
    pub config: PathBuf,
}

/// `--redis URL`, or `KEYGATE_REDIS_URL`: replaces the config's `[store]`.
/// Repeated, or `--redis-nodes` / `KEYGATE_REDIS_NODES` (comma-separated):
/// a cluster's seed nodes.
#[derive(Debug, clap::Args)]
pub struct RedisArg {
    /// Use this Redis as the store instead of the config's [store]; repeat
    /// it to name the seed nodes of a Redis Cluster.
    #[arg(long = "redis", env = "KEYGATE_REDIS_URL", value_name = "URL", hide_env_values = true)]
    pub redis: Vec<String>,
    /// The seed nodes of a Redis Cluster, comma-separated (instead of --redis).
    #[arg(
        long = "redis-nodes",
        env = "KEYGATE_REDIS_NODES",
        value_name = "URLS",
        value_delimiter = ',',
        hide_env_values = true,
        conflicts_with = "redis"
    )]
    pub redis_nodes: Vec<String>,
}

impl RedisArg {
    /// The URLs given, however they were given; empty: none.
    pub fn urls(&self) -> &[String] {
        if self.redis.is_empty() { &self.redis_nodes } else { &self.redis }
    }
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    #[command(flatten)]
    pub store: RedisArg,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    #[command(flatten)]
    pub store: RedisArg,
    /// Also check what `serve` reads from the environment: the variable
    /// named by [admin] token_env must be set (and long enough).
    #[arg(long)]
    pub env: bool,
}

/// How commands that touch the store find it: the config's `[store]`,
/// overridden by `--redis` or `KEYGATE_REDIS_URL`.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// Path to the config file (its [store] and [keys] sections are used).
    #[arg(short = 'c', long = "config", env = "KEYGATE_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Use this Redis instead of the config's store.
    #[arg(
        long = "redis",
        env = "KEYGATE_REDIS_URL",
        global = true,
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis: Vec<String>,
    /// The seed nodes of a Redis Cluster, comma-separated (instead of --redis).
    #[arg(
        long = "redis-nodes",
        env = "KEYGATE_REDIS_NODES",
        global = true,
        value_name = "URLS",
        value_delimiter = ',',
        hide_env_values = true,
        conflicts_with = "redis"
    )]
    pub redis_nodes: Vec<String>,
    /// CA certificates (PEM) a rediss:// Redis must be signed by, instead of
    /// the config's store.tls_ca (without either: the system's roots).
    #[arg(long = "redis-ca", env = "KEYGATE_REDIS_CA", global = true, value_name = "FILE")]
    pub redis_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a Redis that requires one, instead of store.tls_cert.
    #[arg(long = "redis-cert", env = "KEYGATE_REDIS_CERT", global = true, value_name = "FILE")]
    pub redis_cert: Option<PathBuf>,
    /// Private key (PEM) of --redis-cert, instead of store.tls_key.
    #[arg(long = "redis-key", env = "KEYGATE_REDIS_KEY", global = true, value_name = "FILE")]
    pub redis_key: Option<PathBuf>,
}

impl StoreArgs {
    /// The URLs given, however they were given; empty: none.
    pub fn urls(&self) -> &[String] {
        if self.redis.is_empty() { &self.redis_nodes } else { &self.redis }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => check(&args),
        Command::Serve(args) => serve(&args),
        Command::Keys { store, command } => {
            let config = match store_config(&store) {
                Ok(config) => config,
                Err(code) => return code,
            };
            block_on(async move {
                let store = match open_store(&config).await {
                    Ok(store) => store,
                    Err(code) => return code,
                };
                let redis = key_redis_extras(&store);
                let credits = crate::limit::credits::Credits::for_store(&*store, &config.store);
                match keys::run(*command, store, &config.keys.prefix, redis, &credits).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("error: {error}");
                        error.exit().into()
                    }
                }
            })
        }
        Command::Clients { store, command } => {
            let config = match store_config(&store) {
                Ok(config) => config,
                Err(code) => return code,
            };
            block_on(async move {
                let opened = match open_store(&config).await {
                    Ok(opened) => opened,
                    Err(code) => return code,
                };
                let redis = key_redis_extras(&opened);
                let credits = crate::limit::credits::Credits::for_store(&*opened, &config.store);
                match clients::run(command, opened, redis, &credits).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("error: {error}");
                        error.exit().into()
                    }
                }
            })
        }
        Command::Usage(args) => {
            let config = match store_config(&args.store) {
                Ok(config) => config,
                Err(code) => return code,
            };
            block_on(usage::run(args, &config))
        }
        Command::Tokens { store, command } => {
            let config = match store_config(&store) {
                Ok(config) => config,
                Err(code) => return code,
            };
            block_on(async move {
                let opened = match open_store(&config).await {
                    Ok(opened) => opened,
                    Err(code) => return code,
                };
                let Some(ring) = crate::signing::for_store(&*opened, &config.store) else {
                    return invalid_usage("this store keeps no signing keys");
                };
                tokens::run(command, &*ring, &config.tokens).await
            })
        }
    }
}

/// `keygate check`: the file, the store override, and with `--env` what
/// `serve` reads from the environment.
fn check(args: &CheckArgs) -> ExitCode {
    let purpose = if args.env { Purpose::Serve } else { Purpose::Inspect };
    let path = &args.config.config;
    let config = match load(path, purpose, args.store.urls()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    eprintln!(
        "{}: OK ({} routes, {} upstreams; store: {}){}",
        path.display(),
        config.routes.len(),
        config.upstreams.len(),
        describe_store(&config.store),
        if args.env { "" } else { "; the environment was not checked (--env checks it)" },
    );
    for line in describe_listeners(&config) {
        eprintln!("{line}");
    }
    eprintln!("{}", describe_tracing(config.tracing.as_ref()));
    ExitCode::SUCCESS
}

/// Where spans go, if anywhere (`[tracing]`).
fn describe_tracing(tracing: Option<&crate::config::TracingConfig>) -> String {
    match tracing {
        None => "tracing: off".to_owned(),
        Some(t) => format!(
            "tracing: OTLP/HTTP to {} as service {:?}, sampling {} of new traces (parent-based)",
            t.traces_url(),
            t.service_name,
            t.sample_ratio
        ),
    }
}

/// One line per listener and one per certificate: its names and expiry, so
/// an operator sees what each TLS listener will present, and when it lapses.
fn describe_listeners(config: &Config) -> Vec<String> {
    let provider = crate::redis_target::provider();
    let now = jiff::Timestamp::now().as_second();
    let mut lines = Vec::new();
    for listener in &config.server.listeners {
        let Some(tls) = &listener.tls else {
            lines.push(format!("listener {}: plain HTTP", listener.listen));
            continue;
        };
        let mtls = match &tls.client_auth {
            None => String::new(),
            Some(auth) => format!(
                "; client certificates {} (CA {})",
                match auth.mode {
                    crate::config::ClientAuthMode::Required => "required",
                    crate::config::ClientAuthMode::Optional => "optional",
                },
                auth.ca.display()
            ),
        };
        lines.push(format!("listener {}: TLS{mtls}", listener.listen));
        for (i, files) in tls.certs.iter().enumerate() {
            // Validation loaded each file already; a failure here means it
            // changed in between.
            let line = match crate::tls::certs::load(&files.cert, &files.key, &provider) {
                Ok(cert) => format!(
                    "  certificate {}{}: names {}; expires {} (in {} days)",
                    files.cert.display(),
                    if i == 0 { " (default)" } else { "" },
                    cert.names.join(", "),
                    cert.expires(),
                    (cert.not_after - now).div_euclid(86_400),
                ),
                Err(error) => format!("  certificate {}: {error}", files.cert.display()),
            };
            lines.push(line);
        }
    }
    lines
}

/// Loads `path` for `purpose` and applies `--redis`/`KEYGATE_REDIS_URL`;
/// either failing is a usage error (exit 2), reported here.
fn load(path: &Path, purpose: Purpose, redis: &[String]) -> Result<Config, ExitCode> {
    let mut config = Config::load_for(path, purpose).map_err(|error| invalid_config(&error))?;
    if !redis.is_empty() {
        config.use_redis_nodes(redis).map_err(|why| {
            eprintln!("error: --redis / KEYGATE_REDIS_URL: {why}");
            ExitCode::from(Exit::Usage)
        })?;
    }
    Ok(config)
}

/// The store in a line for people: the kind, and where (a Redis URL with
/// its password replaced).
fn describe_store(store: &StoreConfig) -> String {
    match store {
        StoreConfig::File { dir } => format!("file {}", dir.display()),
        StoreConfig::Redis { endpoint, prefix, .. } => format!("{} prefix {prefix}", endpoint.describe()),
    }
}

/// The Redis that usage and the audit trail live in.
#[derive(Debug)]
pub struct RedisTarget {
    pub endpoint: Endpoint,
    pub tls: RedisTls,
    /// The store's Redis key prefix (`kg:`).
    pub prefix: String,
}

/// The Redis (URL, TLS files and key prefix) that usage and the audit trail
/// live in: the store's, once `--redis`/`KEYGATE_REDIS_URL` and the TLS
/// overrides have been applied. `None` for the file store.
pub fn redis_target(config: &Config) -> Option<RedisTarget> {
    match &config.store {
        StoreConfig::Redis { endpoint, prefix, tls } => {
            Some(RedisTarget { endpoint: endpoint.clone(), tls: tls.clone(), prefix: prefix.clone() })
        }
        StoreConfig::File { .. } => None,
    }
}

/// `config` with the command line's Redis overrides in its `[store]`:
/// `--redis` replaces the URL, `--redis-ca`, `--redis-cert` and
/// `--redis-key` (or their variables) the TLS files, each on its own; the
/// config's TLS files apply to a `--redis` URL. The result is checked as
/// `keygate check` checks a config, so a bad override is refused (exit 2)
/// before anything connects.
fn with_store_overrides(mut config: Config, args: &StoreArgs) -> Result<Config, String> {
    let tls_given = args.redis_ca.is_some() || args.redis_cert.is_some() || args.redis_key.is_some();
    let given = args.urls();
    if given.is_empty() && !tls_given {
        return Ok(config);
    }
    let given = match given {
        [] => None,
        [url] => Some(Endpoint::Node(url.clone())),
        seeds => Some(Endpoint::Cluster(seeds.to_vec())),
    };
    let (endpoint, prefix, mut tls) = match (&config.store, given) {
        (StoreConfig::Redis { endpoint, prefix, tls }, given) => {
            (given.unwrap_or_else(|| endpoint.clone()), prefix.clone(), tls.clone())
        }
        (StoreConfig::File { .. }, Some(endpoint)) => {
            (endpoint, store::redis::DEFAULT_PREFIX.to_owned(), RedisTls::default())
        }
        (StoreConfig::File { .. }, None) => {
            return Err("--redis-ca, --redis-cert and --redis-key (KEYGATE_REDIS_CA, KEYGATE_REDIS_CERT, \
                        KEYGATE_REDIS_KEY) are for a Redis store: give --redis URL, or a config whose \
                        [store] is kind = \"redis\""
                .to_owned());
        }
    };
    for (given, file) in
        [(&args.redis_ca, &mut tls.ca), (&args.redis_cert, &mut tls.cert), (&args.redis_key, &mut tls.key)]
    {
        if given.is_some() {
            file.clone_from(given);
        }
    }
    if let Err(error) = crate::redis_target::check(&endpoint, &tls) {
        return Err(format!("{} or {}: {}", error.field.flag(), error.field.config_name(), error.message));
    }
    config.store = StoreConfig::Redis { endpoint, prefix, tls };
    Ok(config)
}

/// The audit trail and `last_used` connection for the key commands, when
/// the store is Redis: a connection of its own to the store's Redis (same
/// client, so the same TLS set-up). Lazy: connects on first use.
fn key_redis_extras(store: &SharedStore) -> Option<keys::RedisExtras> {
    let redis = store.redis()?;
    match crate::usage::connect_target(&redis.target) {
        Ok(conn) => {
            Some(keys::RedisExtras { conn, prefix: redis.prefix, actor: crate::usage::audit::cli_actor() })
        }
        Err(error) => {
            eprintln!("warning: no audit trail: {error}");
            None
        }
    }
}

fn invalid_config(error: &ConfigError) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(Exit::Usage)
}

fn invalid_usage(why: &str) -> ExitCode {
    eprintln!("error: {why}");
    ExitCode::from(Exit::Usage)
}

/// The config a store command runs with: the named file, or `./gateway.toml`,
/// or (with `--redis` and no file at all) the defaults; then the store
/// overrides (`--redis`, the TLS files), refused with exit 2 when bad.
/// The environment is not read: these commands do not serve.
fn store_config(args: &StoreArgs) -> Result<Config, ExitCode> {
    let config = file_store_config(args)?;
    with_store_overrides(config, args).map_err(|why| invalid_usage(&why))
}

/// [`store_config`] before the TLS overrides.
fn file_store_config(args: &StoreArgs) -> Result<Config, ExitCode> {
    let redis = args.urls();
    match &args.config {
        Some(path) => load(path, Purpose::Inspect, redis),
        None if Path::new("gateway.toml").exists() || redis.is_empty() => {
            load(Path::new("gateway.toml"), Purpose::Inspect, redis)
        }
        None => {
            let mut config = Config::defaults();
            if !redis.is_empty() {
                config.use_redis_nodes(redis).map_err(|why| {
                    eprintln!("error: --redis / KEYGATE_REDIS_URL: {why}");
                    ExitCode::from(Exit::Usage)
                })?;
            }
            Ok(config)
        }
    }
}

async fn open_store(config: &Config) -> Result<SharedStore, ExitCode> {
    store::open(&config.store, None).await.map_err(|error| {
        eprintln!("error: {error}");
        ExitCode::from(Exit::Failure)
    })
}

fn block_on(future: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(future),
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let path = args.config.config.as_path();
    let redis = args.store.urls();
    // Validate before anything else: an invalid config never binds a port.
    let config = match load(path, Purpose::Serve, redis) {
        Ok(config) => config,
        Err(code) => return code,
    };
    crate::telemetry::init(&config.log);
    // What this process runs, in one line an operator can check: the
    // version and commit, the file, and the store (where it came from, its
    // URL with any password replaced).
    let store_from = match redis {
        [] => "config",
        [url] if std::env::var("KEYGATE_REDIS_URL").is_ok_and(|env| env == *url) => "KEYGATE_REDIS_URL",
        _ if !args.store.redis_nodes.is_empty() => "KEYGATE_REDIS_NODES",
        _ => "--redis",
    };
    let store = describe_store(&config.store);
    tracing::info!(
        version = crate::build_info::VERSION,
        commit = crate::build_info::COMMIT,
        config = %path.display(),
        store = store.as_str(),
        store_from,
        "keygate starting"
    );
    // Every connection is a file descriptor: lift the soft limit to the hard
    // one, as nginx's worker_rlimit_nofile does, so a default of 1024 does
    // not cap the gateway's connections.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::info!(limit, "open file limit");
            // Upstream connections, Redis and the listeners need descriptors
            // too: a cap the process cannot reach would fail at accept instead.
            let cap = config.server.edge.max_connections as u64;
            if cap.saturating_mul(2) > limit {
                tracing::warn!(
                    max_connections = cap,
                    limit,
                    "server.max_connections needs about two descriptors each (client and upstream); \
                     raise the hard open file limit or lower max_connections"
                );
            }
        }
        Err(error) => tracing::warn!(%error, "cannot raise the open file limit"),
    }
    // The control runtime drives what is not per request: the store's
    // connections, invalidations, usage flushes, the admin API, signals.
    // Requests run on the worker threads (see `server::run_workers`).
    let control = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build();
    let control = match control {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    control.block_on(async move {
        let (drain_timeout, workers, reuse_port) =
            (config.server.drain_timeout, config.server.workers, config.server.reuse_port);
        let admin_listen = config.admin.as_ref().map(|admin| admin.listen);
        // A Redis down at start is waited for in the background, not fatal.
        let store = match store::open_for_serving(&config.store).await {
            Ok(store) => store,
            Err(error) => {
                tracing::error!(%error, "cannot open the key store");
                return ExitCode::FAILURE;
            }
        };
        // Every listener's certificates load before any port is bound.
        let mut transports = Vec::with_capacity(config.server.listeners.len());
        for (index, listener) in config.server.listeners.iter().enumerate() {
            transports.push(match &listener.tls {
                None => server::Transport::Plain,
                Some(tls) => match crate::tls::TlsListener::build(index, listener.listen, tls) {
                    Ok(tls) => server::Transport::Tls(tls),
                    Err(error) => {
                        tracing::error!(%error, "cannot set up TLS");
                        return ExitCode::FAILURE;
                    }
                },
            });
        }
        let mut bound = Vec::with_capacity(transports.len());
        let mut tls_edge = crate::tls::TlsEdge::default();
        for (listener, transport) in config.server.listeners.iter().zip(transports) {
            let listen = listener.listen;
            let sockets = match server::bind_workers(listen, workers, reuse_port) {
                Ok(sockets) => sockets,
                Err(error) => {
                    tracing::error!(%listen, %error, "cannot listen");
                    return ExitCode::FAILURE;
                }
            };
            // The bound address, not the configured one: port 0 picks a
            // free port, and tests read the address from this line.
            let address = sockets[0].local_addr().map_or(listen, |a| a);
            let tls = match &transport {
                server::Transport::Plain => false,
                server::Transport::Tls(tls) => {
                    tls.publish_metrics();
                    tls_edge.https_port.get_or_insert(address.port());
                    tls_edge.listeners.push(Arc::clone(tls));
                    true
                }
            };
            tracing::info!(%address, workers, tls, "keygate listening");
            bound.push((sockets, transport));
        }
        let listeners = server::per_worker(bound);
        let admin_listener = match admin_listen {
            Some(at) => match bind(at, "admin API listening").await {
                Ok(listener) => Some(listener),
                Err(()) => return ExitCode::FAILURE,
            },
            None => None,
        };
        let gateway = Gateway::new(config, store);
        // The store's signing key ring is read (or made) in the background;
        // serving before it is there would answer tokens with 503.
        if let Some(tokens) = &gateway.tokens
            && !tokens.wait_loaded(std::time::Duration::from_secs(10)).await
        {
            tracing::warn!("serving before the signing keys are read: tokens get 503 until they are");
        }
        let _ = gateway.tls.set(tls_edge);
        let reloader = Reloader::with_store_override(path.to_owned(), Arc::clone(&gateway), redis.to_vec());
        // Certificate files changing on disk reload the certificates (only).
        let _certificate_watch = reload::watch_certificates(&reloader);

        // One shutdown signal for the workers, the admin listener and the
        // SIGHUP task; usage gets its final flush only once workers drained.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let on = |signal: &tokio::sync::watch::Receiver<bool>| {
            let mut signal = signal.clone();
            async move {
                // Err: the sender is gone, which also means stop.
                let _ = signal.wait_for(|set| *set).await;
            }
        };
        let (drained, drained_rx) = tokio::sync::watch::channel(false);
        let usage = gateway.usage_flusher().map(|flusher| flusher.spawn(on(&drained_rx)));
        // Both signal handlers are installed here, before READY below.
        let sighup = tokio::spawn(reload::on_sighup(Arc::clone(&reloader), on(&stopped)));
        let shutdown = server::shutdown_signal();
        let admin = admin_listener
            .map(|listener| tokio::spawn(admin::serve(listener, Admin::new(reloader), on(&stopped))));

        let worker_gateway = Arc::clone(&gateway);
        let worker_count = listeners.len();
        let (runtimes_tx, mut runtimes_rx) = tokio::sync::mpsc::unbounded_channel();
        let watchdog_stop = on(&stopped);
        let mut serving = tokio::task::spawn_blocking(move || {
            server::run_workers(listeners, &worker_gateway, stopped, drain_timeout, runtimes_tx)
        });
        // Ready for systemd once every worker's runtime runs: the sockets
        // are bound and listening since `bind_workers`, so a connection
        // made from now on is queued and answered. The channel closes early
        // only if a worker failed to start (then `serving` ends with why).
        let mut runtimes = Vec::with_capacity(worker_count);
        while runtimes.len() < worker_count
            && let Some(runtime) = runtimes_rx.recv().await
        {
            runtimes.push(runtime);
        }
        if runtimes.len() == worker_count {
            crate::systemd::ready();
        }
        let watchdog = crate::systemd::spawn_watchdog(runtimes, watchdog_stop);
        let outcome = tokio::select! {
            () = shutdown => {
                crate::systemd::stopping();
                let _ = stop.send(true);
                (&mut serving).await
            }
            // Workers only end on their own if something broke.
            ended = &mut serving => {
                crate::systemd::stopping();
                let _ = stop.send(true);
                ended
            }
        };
        let _ = drained.send(true);
        for task in [Some(sighup), admin, watchdog].into_iter().flatten() {
            if let Err(error) = task.await {
                tracing::error!(%error, "a background task ended abnormally");
            }
        }
        if let Some(usage) = usage
            && let Err(error) = usage.join().await
        {
            tracing::error!(%error, "usage flusher");
        }
        // Every request has ended, its span with it: the last spans go to
        // the collector before the exit. Blocking (it waits for the export,
        // at most the export timeout), so off the runtime's threads, whose
        // task does the export.
        if gateway.otel.is_some() {
            let otel = Arc::clone(&gateway);
            let flushed =
                tokio::task::spawn_blocking(move || otel.otel.as_ref().map(|otel| otel.shutdown())).await;
            if let Ok(Some(Err(error))) = flushed {
                tracing::warn!(%error, "the last spans were not exported");
            }
        }
        match outcome {
            Ok(Ok(_)) => {
                tracing::info!("keygate stopped");
                ExitCode::SUCCESS
            }
            Ok(Err(error)) => {
                tracing::error!(%error, "a worker failed");
                ExitCode::FAILURE
            }
            Err(error) => {
                tracing::error!(%error, "workers panicked");
                ExitCode::FAILURE
            }
        }
    })
}

/// Binds `at` and logs the bound address (not the configured one: port 0
/// picks a free port, and tests read the address from this line).
async fn bind(at: SocketAddr, what: &'static str) -> Result<tokio::net::TcpListener, ()> {
    match tokio::net::TcpListener::bind(at).await {
        Ok(listener) => {
            let address = listener.local_addr().map_or_else(|_| at.to_string(), |a| a.to_string());
            tracing::info!(%address, "{what}");
            Ok(listener)
        }
        Err(error) => {
            tracing::error!(listen = %at, %error, "cannot listen");
            Err(())
        }
    }
}
