//! Hot reload: re-read the config file the gateway started with, build, swap.
//!
//! As in rust-rpxy, a reload builds the whole new [`Config`] first and swaps
//! it in only if it validates ([`Gateway::reload`] stores a new `Live` in an
//! `ArcSwap`); an invalid file is logged and refused, and the old config stays
//! live. Requests in flight keep the `Live` they loaded, and open connections
//! are untouched: each new request on them loads the new one.
//!
//! Triggers: SIGHUP ([`on_sighup`]) and `POST /admin/reload`; either tells
//! the service manager (`RELOADING=1`, then `READY=1`). Some settings
//! are read once at start (listen addresses, the store, the key cache, the
//! log format); a reload that changes them applies the rest and says which
//! ones need a restart.
//!
//! TLS listeners' certificates and keys reload with the config, and also
//! alone when their files change on disk ([`watch_certificates`]). Either
//! way a file that does not load leaves the running certificates in place
//! and says why (in the log, and in the admin reload's answer); open
//! connections keep the certificate they were made with.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::config::{Config, ConfigError};
use crate::gateway::Gateway;

/// Reloads one gateway from one config file.
pub struct Reloader {
    path: PathBuf,
    gateway: Arc<Gateway>,
    /// Serialises reloads (SIGHUP and the admin call may race), so the
    /// restart warnings compare against the config actually replaced. A std
    /// Mutex: nothing awaits while it is held.
    lock: Mutex<()>,
    /// `--redis`/`KEYGATE_REDIS_URL` as `serve` started with it: applied
    /// to every reload too, so a reload reads the store the same way.
    /// `--redis` URLs (several: a cluster's seeds); empty: none.
    store_override: Vec<String>,
}

/// What a successful reload installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub routes: usize,
    pub upstreams: usize,
    /// TLS listeners whose certificates were loaded again.
    pub certificates: usize,
    /// Changed settings that only take effect after a restart, e.g. `server.listen`.
    pub restart_needed: Vec<&'static str>,
}

impl Reloader {
    pub fn new(path: PathBuf, gateway: Arc<Gateway>) -> Arc<Self> {
        Self::with_store_override(path, gateway, Vec::new())
    }

    /// A reloader for a gateway started with `--redis URL` (or the variable).
    pub fn with_store_override(
        path: PathBuf,
        gateway: Arc<Gateway>,
        store_override: Vec<String>,
    ) -> Arc<Self> {
        Arc::new(Self { path, gateway, lock: Mutex::new(()), store_override })
    }

    /// The config file reloads read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Reads, validates and installs the config file; on any error logs it and
    /// keeps the running config.
    ///
    /// Synchronous on purpose: the file is small and local (the same read
    /// `serve` does at start), and keeping the lock free of awaits is simpler
    /// than a blocking-pool round trip.
    ///
    /// The service manager is told (see [`crate::systemd`]): reloading
    /// while it runs, then ready again, with why when it was refused.
    pub fn reload(&self) -> Result<Reloaded, ConfigError> {
        let outcome = self.reload_serialised();
        crate::metrics::config_reload(outcome.is_ok());
        outcome
    }

    fn reload_serialised(&self) -> Result<Reloaded, ConfigError> {
        let _serialised = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        // Under the lock: two racing reloads give RELOADING, READY twice,
        // never two RELOADING in a row.
        crate::systemd::reloading();
        let outcome = self.install();
        match &outcome {
            Ok(reloaded) => crate::systemd::reloaded(reloaded.routes, reloaded.upstreams),
            Err(error) => crate::systemd::reload_refused(error),
        }
        outcome
    }

    /// [`Reloader::reload`]'s work, with the lock held.
    fn install(&self) -> Result<Reloaded, ConfigError> {
        let loaded = Config::load(&self.path).and_then(|mut config| match self.store_override.as_slice() {
            [] => Ok(config),
            // Checked when serve started; a failure here cannot happen, but
            // is refused like any invalid file if it does.
            urls => config.use_redis_nodes(urls).map(|()| config).map_err(|why| ConfigError::Invalid {
                path: self.path.clone(),
                problems: vec![crate::config::ConfigProblem {
                    field: "store.url".into(),
                    line: None,
                    message: why,
                }],
            }),
        });
        let config = match loaded {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(
                    path = %self.path.display(),
                    problems = %one_line(&error),
                    "config reload refused; the running config stays"
                );
                return Err(error);
            }
        };
        let old = self.gateway.live.load_full();
        let restart_needed = restart_needed(&old.config, &config);
        for field in &restart_needed {
            tracing::warn!(
                field,
                "config reload: this setting changed but only takes effect after a restart"
            );
        }
        // Certificates first: if a file broke since validation read it,
        // nothing of the new config is installed.
        let certificates = match self.gateway.tls.get() {
            Some(edge) => edge.reload(&config.server).map_err(|error| {
                tracing::error!(path = %self.path.display(), %error, "config reload refused; the running config and certificates stay");
                ConfigError::Invalid {
                    path: self.path.clone(),
                    problems: vec![crate::config::ConfigProblem {
                        field: error.field,
                        line: None,
                        message: error.message,
                    }],
                }
            })?,
            None => 0,
        };
        crate::telemetry::set_filter(&config.log);
        let reloaded = Reloaded {
            routes: config.routes.len(),
            upstreams: config.upstreams.len(),
            certificates,
            restart_needed,
        };
        self.gateway.reload(config);
        tracing::info!(
            path = %self.path.display(),
            routes = reloaded.routes,
            upstreams = reloaded.upstreams,
            certificates = reloaded.certificates,
            "config reloaded"
        );
        Ok(reloaded)
    }

    /// Loads the running config's certificate files again and swaps them in
    /// (what a change on disk triggers); on an error logs it and keeps the
    /// running certificates. Returns how many listeners were reloaded.
    pub fn reload_certificates(&self) -> Result<usize, crate::tls::TlsError> {
        let _serialised = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(edge) = self.gateway.tls.get() else { return Ok(0) };
        let live = self.gateway.live.load_full();
        match edge.reload(&live.config.server) {
            Ok(reloaded) => {
                tracing::info!(listeners = reloaded, "TLS certificates reloaded from disk");
                Ok(reloaded)
            }
            Err(error) => {
                tracing::error!(%error, "TLS certificate reload failed; the running certificates stay");
                Err(error)
            }
        }
    }
}

/// How long certificate file events must be quiet before a reload: a
/// renewal writes the certificate and the key one after the other.
const CERTIFICATE_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(200);

/// Watches the folders of the TLS listeners' certificate and key files (as
/// the file store watches `keys/`) and reloads the certificates after each
/// burst of changes. Any change in those folders counts, so a renewal by
/// rename or a symlink swap (Kubernetes secrets) is seen as well as a
/// rewrite. The folders are those of the config at start; a reload that
/// names files elsewhere reloads them then, but their changes are watched
/// only after a restart. `None`: no TLS listener, or the OS refused the
/// watch (logged). Must be called within a Tokio runtime; the watch ends
/// when the returned watcher is dropped.
pub fn watch_certificates(reloader: &Arc<Reloader>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let live = reloader.gateway.live.load_full();
    let mut folders: Vec<PathBuf> = live
        .config
        .server
        .listeners
        .iter()
        .filter_map(|listener| listener.tls.as_ref())
        .flat_map(|tls| {
            let pairs = tls.certs.iter().flat_map(|files| [&files.cert, &files.key]);
            pairs.chain(tls.client_auth.as_ref().map(|auth| &auth.ca))
        })
        .map(|file| match file.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        })
        .collect();
    folders.sort();
    folders.dedup();
    if folders.is_empty() {
        return None;
    }
    let (events, mut changed) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads change nothing; a lost event (queue overflow) may hide any change.
        if event.is_err() || event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            let _ = events.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(error) => {
            tracing::warn!(%error, "cannot watch certificate files; they reload on SIGHUP or /admin/reload only");
            return None;
        }
    };
    for folder in &folders {
        if let Err(error) = watcher.watch(folder, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(folder = %folder.display(), %error, "cannot watch a certificate folder; its files reload on SIGHUP or /admin/reload only");
        }
    }
    let reloader = Arc::clone(reloader);
    tokio::spawn(async move {
        while changed.recv().await.is_some() {
            loop {
                match tokio::time::timeout(CERTIFICATE_DEBOUNCE, changed.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_quiet) => break,
                }
            }
            // The outcome is logged inside; the old certificates stay on error.
            let _logged = reloader.reload_certificates();
        }
    });
    Some(watcher)
}

/// A refused config's problems on one log line.
fn one_line(error: &ConfigError) -> String {
    match error {
        ConfigError::Invalid { problems, .. } => {
            problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
        }
        ConfigError::Read { .. } | ConfigError::Syntax { .. } => error.to_string().replace('\n', " "),
    }
}

/// Settings read once at start that differ between `old` and `new`.
pub fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let keys = (&old.keys, &new.keys);
    [
        ("server.listen", old.server.listen != new.server.listen),
        // Addresses, TLS on or off and handshake timeouts are built into
        // the bound listeners; certificates, keys and client CAs (with
        // their mode) reload. The first address is `server.listen` above.
        ("server.listener", {
            let shape = |c: &Config| {
                c.server
                    .listeners
                    .iter()
                    .enumerate()
                    .map(|(i, l)| {
                        let tls = l.tls.as_ref().map(|t| t.handshake_timeout);
                        ((i > 0).then_some(l.listen), tls)
                    })
                    .collect::<Vec<_>>()
            };
            shape(old) != shape(new)
        }),
        ("server.drain_timeout", old.server.drain_timeout != new.server.drain_timeout),
        ("store", old.store != new.store),
        ("keys.prefix", keys.0.prefix != keys.1.prefix),
        ("keys.cache_capacity", keys.0.cache_capacity != keys.1.cache_capacity),
        ("keys.cache_ttl", keys.0.cache_ttl != keys.1.cache_ttl),
        ("keys.negative_ttl", keys.0.negative_ttl != keys.1.negative_ttl),
        ("keys.stale_window", keys.0.stale_window != keys.1.stale_window),
        ("log.format", old.log.format != new.log.format),
        ("server.workers", old.server.workers != new.server.workers),
        ("server.reuse_port", old.server.reuse_port != new.server.reuse_port),
        // Deadlines, caps and head limits are built into each worker's
        // listener; strict_paths, strip_override_headers and
        // trusted_proxies are read per request and reload.
        ("server connection deadlines and limits", {
            let (a, b) = (&old.server.edge, &new.server.edge);
            (a.header_read_timeout, a.idle_timeout, a.send_timeout, a.http2_keepalive_interval)
                != (b.header_read_timeout, b.idle_timeout, b.send_timeout, b.http2_keepalive_interval)
                || (a.http2_keepalive_timeout, a.http2_max_concurrent_streams, a.max_connections)
                    != (b.http2_keepalive_timeout, b.http2_max_concurrent_streams, b.max_connections)
                || (a.max_connections_per_ip, a.max_header_bytes, a.max_headers)
                    != (b.max_connections_per_ip, b.max_header_bytes, b.max_headers)
        }),
        (
            "usage",
            old.usage.enabled != new.usage.enabled || old.usage.flush_interval != new.usage.flush_interval,
        ),
        ("limits.mode", old.limits.mode != new.limits.mode),
        ("limits.lease_fraction", old.limits.lease_fraction != new.limits.lease_fraction),
        ("limits.lease_ttl", old.limits.lease_ttl != new.limits.lease_ttl),
        ("limits.quota_lease", old.limits.quota_lease != new.limits.quota_lease),
        ("limits.idle_eviction", old.limits.idle_eviction != new.limits.idle_eviction),
        ("limits.max_tracked_keys", old.limits.max_tracked_keys != new.limits.max_tracked_keys),
        ("admin.listen", old.admin.as_ref().map(|a| a.listen) != new.admin.as_ref().map(|a| a.listen)),
        // Each issuer's key set and its refresh task are built at start.
        ("jwt.issuer", old.jwt_issuers != new.jwt_issuers),
    ]
    .into_iter()
    .filter_map(|(field, changed)| changed.then_some(field))
    .collect()
}

/// Reloads on every SIGHUP until `shutdown` completes.
///
/// The handler is installed by this call, not when the future is first
/// polled: `serve` calls it before telling systemd it is ready, and a SIGHUP
/// (`systemctl reload`) arriving before a handler exists would kill the
/// process, SIGHUP's default action. Must be called within a Tokio runtime.
pub fn on_sighup(
    reloader: Arc<Reloader>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    async move {
        #[cfg(unix)]
        {
            let mut hangups = match hangups {
                Ok(hangups) => hangups,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGHUP; reload through the admin API only");
                    return;
                }
            };
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    received = hangups.recv() => {
                        if received.is_none() {
                            return;
                        }
                        tracing::info!(path = %reloader.path().display(), "received SIGHUP: reloading the config");
                        // The outcome is logged inside; the old config stays on error.
                        let _logged = reloader.reload();
                    }
                    () = &mut shutdown => return,
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = reloader;
            shutdown.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(text, Path::new("/srv")).unwrap()
    }

    #[test]
    fn only_start_time_settings_need_a_restart() {
        let old = config(
            "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n",
        );
        let routes_only = config(
            "[server]\nlisten = \"127.0.0.1:1\"\n[[route]]\npath = \"/v2\"\nupstream = \"builtin:echo\"\n[log]\nfilter = \"debug\"\n",
        );
        assert!(restart_needed(&old, &routes_only).is_empty());
        let moved = config(
            "[server]\nlisten = \"127.0.0.1:2\"\n[keys]\nprefix = \"xx_\"\n[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n",
        );
        assert_eq!(restart_needed(&old, &moved), ["server.listen", "keys.prefix"]);
        let listeners = |second: &str| {
            config(&format!(
                "[[server.listener]]\nlisten = \"127.0.0.1:1\"\n[[server.listener]]\nlisten = \"{second}\"\n\
                 [[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n"
            ))
        };
        let two = listeners("127.0.0.1:2");
        assert!(restart_needed(&two, &listeners("127.0.0.1:2")).is_empty());
        assert_eq!(restart_needed(&two, &listeners("127.0.0.1:3")), ["server.listener"]);
        // Issuers' key sets and refresh tasks are built at start; a route's
        // `issuers` is read per request and reloads.
        let issuer = |audience: &str| {
            config(&format!(
                "[[jwt.issuer]]\niss = \"https://idp\"\njwks = \"https://idp/jwks\"\naudience = \"{audience}\"\n\
                 [[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\nauth = [\"jwt\"]\n"
            ))
        };
        assert!(restart_needed(&issuer("a"), &issuer("a")).is_empty());
        assert_eq!(restart_needed(&issuer("a"), &issuer("b")), ["jwt.issuer"]);
    }
}
