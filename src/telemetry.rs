//! Logging setup: the diagnostic log, tracing on stderr with a
//! `RUST_LOG`-style filter, text or JSON lines.
//!
//! `RUST_LOG` wins over `[log] filter` so an operator can turn up detail
//! without editing the config. The access log is not here: it has its own
//! destination and writer (`access_log`), and no filter can drop its lines.
//! The filter sits behind a reload layer so a config reload can change it
//! ([`set_filter`]); the format (text or JSON) is fixed at start.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{LogConfig, LogFormat};

/// The handle that swaps the filter; set by the `init` that installed the
/// global subscriber, so a process only ever has one.
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber. Safe to call more than once (later calls
/// are ignored), which keeps tests that start several gateways simple.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    // Colour only for a person at a terminal; files and pipes get plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = match config.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    if tracing_subscriber::registry().with(filter).with(fmt).try_init().is_ok() {
        let _first = FILTER.set(handle);
    }
}

/// Applies a reloaded `[log] filter`. Does nothing while `RUST_LOG` is set
/// (it wins, as at start) or before [`init`]. The filter was validated with
/// the config, so parsing it again cannot fail in practice.
pub fn set_filter(config: &LogConfig) {
    if std::env::var_os("RUST_LOG").is_some() {
        return;
    }
    let (Some(handle), Ok(filter)) = (FILTER.get(), EnvFilter::try_new(&config.filter)) else { return };
    if let Err(error) = handle.reload(filter) {
        tracing::warn!(%error, "cannot apply the reloaded log filter");
    }
}
