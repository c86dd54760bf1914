//! The `keygate` command: `serve`, `check`, and (with the key store) `keys` and `usage`.
//!
//! Everything a script may capture goes to stdout; messages go to stderr.
//! Exit codes: 0 success, 1 runtime failure, 2 invalid config or usage.

pub mod keys;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::gateway::Gateway;
use crate::server;

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
}

#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Path to the config file.
    #[arg(short = 'c', long = "config", default_value = "gateway.toml")]
    pub config: PathBuf,
}

/// Exit code for an invalid config, distinct from runtime failures.
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
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::from(EXIT_INVALID_CONFIG)
            }
        },
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ConfigArg) -> ExitCode {
    // Validate before anything else: an invalid config never binds a port.
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    crate::telemetry::init(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listen = config.server.listen;
        let drain_timeout = config.server.drain_timeout;
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%listen, %error, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        let gateway = Gateway::new(config);
        // The bound address, not the configured one: port 0 picks a free port.
        let address = listener.local_addr().map_or_else(|_| listen.to_string(), |a| a.to_string());
        tracing::info!(%address, "keygate listening");
        server::serve(listener, gateway, server::shutdown_signal(), drain_timeout).await;
        tracing::info!("keygate stopped");
        ExitCode::SUCCESS
    })
}
