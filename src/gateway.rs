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
use crate::proxy::Upstreams;
use crate::route::RouteTable;
use crate::store::SharedStore;

/// Everything derived from one config file.
pub struct Live {
    pub config: Arc<Config>,
    pub routes: RouteTable,
    pub upstreams: Upstreams,
}

impl Live {
    pub fn build(config: Config) -> Self {
        Self {
            routes: RouteTable::new(&config.routes),
            upstreams: Upstreams::new(&config.upstreams, config.server.workers),
            config: Arc::new(config),
        }
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
    pub store: SharedStore,
}

impl Gateway {
    /// Builds the gateway on an open store and starts following the store's
    /// invalidations. Must run inside a tokio runtime.
    pub fn new(config: Config, store: SharedStore) -> Arc<Self> {
        let verifier = Verifier::new(Arc::clone(&store), &config.keys);
        verifier.spawn_invalidation_listener();
        let redis = store.redis();
        let limits = Limits::new(&config.limits, redis.as_ref().map(|r| (r.conn.clone(), r.prefix.as_str())));
        Arc::new(Self { live: ArcSwap::from_pointee(Live::build(config)), verifier, limits, store })
    }

    /// Installs a new, already validated config. In-flight requests keep the
    /// one they started with.
    pub fn reload(&self, config: Config) {
        self.live.store(Arc::new(Live::build(config)));
    }
}
