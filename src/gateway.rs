//! The gateway's shared state: what every request reads.
//!
//! Split in two by how it changes:
//! - [`Live`]: everything built from `gateway.toml` (routes, upstream pools).
//!   Swapped whole on reload (build the new one, then swap), so a request
//!   sees one consistent config from start to end.
//! - the long-lived parts (key store, verification cache) that survive reloads.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::Verifier;
use crate::config::Config;
use crate::limit::Limits;
use crate::limit::credits::Credits;
use crate::proxy::Upstreams;
use crate::route::RouteTable;
use crate::server::limits::ConnectionLimits;
use crate::store::SharedStore;
use crate::usage::{FlushConfig, UsageFlusher, UsageRecorder};

/// Everything derived from one config file.
pub struct Live {
    pub config: Arc<Config>,
    pub routes: RouteTable,
    pub upstreams: Upstreams,
}

impl Live {
    /// Builds what `config` describes; targets `previous` also had keep
    /// their health state (an ejection survives a reload).
    pub fn build(config: Config, previous: Option<&Live>) -> Self {
        let upstreams =
            Upstreams::new(&config.upstreams, config.server.workers, previous.map(|live| &live.upstreams));
        Self { routes: RouteTable::new(&config.routes), upstreams, config: Arc::new(config) }
    }
}

/// The state shared by every connection and request.
pub struct Gateway {
    /// Read with one atomic load per request; replaced whole on reload.
    pub live: ArcSwap<Live>,
    /// Verifies keys through the in-process cache; outlives reloads so the
    /// cache stays warm.
    pub verifier: Arc<Verifier>,
    /// Rate limiters and quota leases; outlive reloads so a reload does not
    /// hand every key a fresh burst.
    pub limits: Limits,
    /// Usage counted in memory on the request path, flushed to the store's
    /// Redis. `None` with the file store: there is nowhere to flush to, and
    /// counting without flushing would only grow.
    pub usage: Option<Arc<UsageRecorder>>,
    pub store: SharedStore,
    /// Open connections, capped globally and per source address; shared by
    /// every worker's listener. Sized at start (listeners do not reload).
    pub connections: Arc<ConnectionLimits>,
    /// The TLS listeners, set once they are bound (none: cleartext only).
    /// Reloads swap their certificates; `tls_only` routes redirect to the
    /// first one's port.
    pub tls: std::sync::OnceLock<crate::tls::TlsEdge>,
    /// Access tokens (`[tokens] enabled`): their signing keys (a key file,
    /// or the store's ring, followed) and the verified-token cache. Built
    /// at start (a reload keeps them, so tokens issued before it stay
    /// valid); `None` when off.
    pub tokens: Option<Arc<crate::auth::jwt::TokenVerifier>>,
    /// External token issuers (`[[jwt.issuer]]`): their JWKS keys, kept
    /// fresh by one background task each, and the verified-token cache.
    /// Built at start (a change needs a restart); `None` when none are set.
    pub issuers: Option<Arc<crate::auth::issuer::Issuers>>,
    /// Where refresh tokens live (beside the keys: the store's Redis or its
    /// folder); `None` when tokens are off.
    pub refresh: Option<crate::refresh::SharedRefreshStore>,
    /// OpenTelemetry tracing (`[tracing]`): the span exporter and tracer.
    /// Built at start (a change needs a restart); `None` when off, and then
    /// the request path does no span work at all.
    pub otel: Option<crate::otel::Tracing>,
}

impl Gateway {
    /// Builds the gateway on an open store and starts following the store's
    /// invalidations (and its signing key ring, with `[tokens]`). Must run
    /// inside a tokio runtime.
    pub fn new(config: Config, store: SharedStore) -> Arc<Self> {
        Self::with_clock(config, store, crate::clock::Clock::System)
    }

    /// [`Gateway::new`], access tokens issued and checked by `clock` (tests
    /// pass tokio's, to advance it).
    pub fn with_clock(config: Config, store: SharedStore, clock: crate::clock::Clock) -> Arc<Self> {
        let verifier = Verifier::new(Arc::clone(&store), &config.keys);
        verifier.spawn_invalidation_listener();
        let redis = store.redis();
        let limits = Limits::new(&config.limits, redis.as_ref().map(|r| (r.conn.clone(), r.prefix.as_str())))
            .with_credits(Credits::for_store(&*store, &config.store));
        let usage = (redis.is_some() && config.usage.enabled).then(|| Arc::new(UsageRecorder::new()));
        let connections = ConnectionLimits::new(&config.server.edge);
        let tokens = crate::auth::jwt::TokenVerifier::for_config(&config.tokens, clock).map(Arc::new);
        if let (Some(tokens), Some(ring)) = (&tokens, crate::signing::for_store(&*store, &config.store)) {
            tokens.follow_ring(ring);
        }
        let refresh = tokens.as_ref().and_then(|_| crate::refresh::for_store(&*store, &config.store));
        let issuers = (!config.jwt_issuers.is_empty())
            .then(|| crate::auth::issuer::Issuers::start(&config.jwt_issuers, config.tokens.cache_capacity));
        let otel = config.tracing.as_ref().and_then(|tracing| match crate::otel::Tracing::start(tracing) {
            Ok(otel) => Some(otel),
            Err(error) => {
                tracing::error!(%error, "tracing is off");
                None
            }
        });
        Arc::new(Self {
            live: ArcSwap::from_pointee(Live::build(config, None)),
            verifier,
            limits,
            usage,
            store,
            connections,
            tls: std::sync::OnceLock::new(),
            tokens,
            issuers,
            refresh,
            otel,
        })
    }

    /// A flusher writing this gateway's usage to the store's Redis, if both
    /// exist, on a connection of its own: key lookups on the store's
    /// connection never wait behind usage writes. Must run inside a tokio
    /// runtime (the connection is made on first use).
    pub fn usage_flusher(&self) -> Option<Arc<UsageFlusher>> {
        let recorder = self.usage.as_ref()?;
        let redis = self.store.redis()?;
        let usage = &self.live.load().config.usage;
        let config = FlushConfig {
            interval: usage.flush_interval,
            rollup_interval: usage.rollup_interval,
            max_series: usage.max_buffered_series,
            ..FlushConfig::default()
        };
        let conn = match crate::usage::connect_target(&redis.target) {
            Ok(conn) => conn,
            Err(error) => {
                tracing::warn!(%error, "usage writes share the store's Redis connection");
                redis.conn
            }
        };
        Some(UsageFlusher::new(Arc::clone(recorder), conn, &redis.prefix, config))
    }

    /// Installs a new, already validated config. In-flight requests keep the
    /// one they started with.
    pub fn reload(&self, config: Config) {
        let live = Live::build(config, Some(&self.live.load()));
        self.live.store(Arc::new(live));
    }
}
