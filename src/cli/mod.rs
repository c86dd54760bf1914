//! The `keygate` command. The top-level command (`serve`, `check`, and the
//! store options) lives here; each group of subcommands has its own file.
//!
//! Everything a script may capture goes to stdout; messages go to stderr.
//! Exit codes: 0 success, 1 runtime failure (store unreachable, unknown key),
//! 2 invalid config or usage.

pub mod clients;
pub mod keys;
pub mod usage;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::admin::{self, Admin};
use crate::config::StoreConfig;
use crate::config::{Config, ConfigError};
use crate::gateway::Gateway;
use crate::reload::{self, Reloader};
use crate::server;
use crate::store::{self, SharedStore};

#[derive(Debug, Parser)]
#[command(
    name = "keygate",
    version,
    about = "An API-key gateway: verifies, scopes, rate-limits and meters API keys."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(ConfigArg),
    /// Validate a config file and exit (0 valid, 2 invalid).
    Check(ConfigArg),
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
}

#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Path to the config file.
    #[arg(short = 'c', long = "config", default_value = "gateway.toml")]
    pub config: PathBuf,
}

/// How commands that touch the store find it: the config's `[store]`,
/// overridden by `--redis` or `KEYGATE_REDIS_URL`.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// Path to the config file (its [store] and [keys] sections are used).
    #[arg(short = 'c', long = "config", global = true)]
    pub config: Option<PathBuf>,
    /// Use this Redis instead of the config's store.
    #[arg(long = "redis", env = "KEYGATE_REDIS_URL", global = true, value_name = "URL")]
    pub redis: Option<String>,
}

/// Exit code for an invalid config or usage, distinct from runtime failures.
pub const EXIT_INVALID_CONFIG: u8 = 2;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => match Config::load(&args.config) {
            Ok(config) => {
                eprintln!(
                    "{}: OK ({} routes, {} upstreams)",
                    args.config.display(),
                    config.routes.len(),
                    config.upstreams.len()
                );
                ExitCode::SUCCESS
            }
            Err(error) => invalid_config(&error),
        },
        Command::Serve(args) => serve(&args.config),
        Command::Keys { store, command } => {
            let store_args_redis = store.redis.clone();
            let config = match store_config(&store) {
                Ok(config) => config,
                Err(error) => return invalid_config(&error),
            };
            block_on(async move {
                let store = match open_store(&config, store.redis.as_deref()).await {
                    Ok(store) => store,
                    Err(code) => return code,
                };
                let redis = key_redis_extras(&config, store_args_redis.as_deref());
                let credits = crate::limit::credits::Credits::for_store(&*store, &config.store);
                match keys::run(*command, store, &config.keys.prefix, redis, &credits).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("error: {error}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Clients { store, command } => {
            let config = match store_config(&store) {
                Ok(config) => config,
                Err(error) => return invalid_config(&error),
            };
            block_on(async move {
                let opened = match open_store(&config, store.redis.as_deref()).await {
                    Ok(opened) => opened,
                    Err(code) => return code,
                };
                let redis = key_redis_extras(&config, store.redis.as_deref());
                let credits = crate::limit::credits::Credits::for_store(&*opened, &config.store);
                match clients::run(command, opened, redis, &credits).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("error: {error}");
                        ExitCode::from(clients::exit_code(&error))
                    }
                }
            })
        }
        Command::Usage(args) => {
            let config = match store_config(&args.store) {
                Ok(config) => config,
                Err(error) => return invalid_config(&error),
            };
            block_on(usage::run(args, &config))
        }
    }
}

/// The Redis (URL and key prefix) that usage and the audit trail live in:
/// `--redis`/`KEYGATE_REDIS_URL`, else the config's Redis store. `None` when
/// the store is the file store and no Redis is given.
pub fn redis_target(config: &Config, redis: Option<&str>) -> Option<(String, String)> {
    let prefix = match &config.store {
        StoreConfig::Redis { prefix, .. } => prefix.clone(),
        StoreConfig::File { .. } => store::redis::DEFAULT_PREFIX.to_owned(),
    };
    match (redis, &config.store) {
        (Some(url), _) => Some((url.to_owned(), prefix)),
        (None, StoreConfig::Redis { url, .. }) => Some((url.clone(), prefix)),
        (None, StoreConfig::File { .. }) => None,
    }
}

/// The audit trail and `last_used` connection for the key commands, when
/// the store is Redis. Lazy: connects on first use.
fn key_redis_extras(config: &Config, redis: Option<&str>) -> Option<keys::RedisExtras> {
    let (url, prefix) = redis_target(config, redis)?;
    match crate::usage::connect(&url) {
        Ok(conn) => Some(keys::RedisExtras { conn, prefix, actor: crate::usage::audit::cli_actor() }),
        Err(error) => {
            eprintln!("warning: no audit trail: {error}");
            None
        }
    }
}

fn invalid_config(error: &ConfigError) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(EXIT_INVALID_CONFIG)
}

/// The config a store command runs with: the named file, or `./gateway.toml`,
/// or (with `--redis` and no file at all) the defaults.
fn store_config(args: &StoreArgs) -> Result<Config, ConfigError> {
    match &args.config {
        Some(path) => Config::load(path),
        None if Path::new("gateway.toml").exists() || args.redis.is_none() => {
            Config::load(Path::new("gateway.toml"))
        }
        None => Ok(Config::defaults()),
    }
}

async fn open_store(config: &Config, redis: Option<&str>) -> Result<SharedStore, ExitCode> {
    store::open(&config.store, redis).await.map_err(|error| {
        eprintln!("error: {error}");
        ExitCode::FAILURE
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

fn serve(path: &Path) -> ExitCode {
    // Validate before anything else: an invalid config never binds a port.
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => return invalid_config(&error),
    };
    crate::telemetry::init(&config.log);
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
        let (listen, drain_timeout, workers, reuse_port) = (
            config.server.listen,
            config.server.drain_timeout,
            config.server.workers,
            config.server.reuse_port,
        );
        let admin_listen = config.admin.as_ref().map(|admin| admin.listen);
        // A Redis down at start is waited for in the background, not fatal.
        let store = match store::open_for_serving(&config.store).await {
            Ok(store) => store,
            Err(error) => {
                tracing::error!(%error, "cannot open the key store");
                return ExitCode::FAILURE;
            }
        };
        let listeners = match server::bind_workers(listen, workers, reuse_port) {
            Ok(listeners) => listeners,
            Err(error) => {
                tracing::error!(%listen, %error, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        let admin_listener = match admin_listen {
            Some(at) => match bind(at, "admin API listening").await {
                Ok(listener) => Some(listener),
                Err(()) => return ExitCode::FAILURE,
            },
            None => None,
        };
        let gateway = Gateway::new(config, store);
        let reloader = Reloader::new(path.to_owned(), Arc::clone(&gateway));
        // The bound address, not the configured one: port 0 picks a free
        // port, and tests read the address from this line.
        let address = listeners[0].local_addr().map_or_else(|_| listen.to_string(), |a| a.to_string());
        tracing::info!(%address, workers, "keygate listening");

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
        let sighup = tokio::spawn(reload::on_sighup(Arc::clone(&reloader), on(&stopped)));
        let admin = admin_listener
            .map(|listener| tokio::spawn(admin::serve(listener, Admin::new(reloader), on(&stopped))));

        let worker_gateway = Arc::clone(&gateway);
        let mut serving = tokio::task::spawn_blocking(move || {
            server::run_workers(listeners, &worker_gateway, stopped, drain_timeout)
        });
        let outcome = tokio::select! {
            () = server::shutdown_signal() => {
                let _ = stop.send(true);
                (&mut serving).await
            }
            // Workers only end on their own if something broke.
            ended = &mut serving => {
                let _ = stop.send(true);
                ended
            }
        };
        let _ = drained.send(true);
        for task in [Some(sighup), admin].into_iter().flatten() {
            if let Err(error) = task.await {
                tracing::error!(%error, "a background task ended abnormally");
            }
        }
        if let Some(usage) = usage
            && let Err(error) = usage.join().await
        {
            tracing::error!(%error, "usage flusher");
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
