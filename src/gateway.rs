//! The gateway's shared state: what every request reads.
//!
//! Split in two by how it changes:
//! - [`Live`]: everything built from `gateway.toml` (routes, upstream pools).
//!   Swapped whole on reload (build the new one, then swap), so a request
//!   sees one consistent config from start to end.
//! - the long-lived parts (key store, verification cache) that survive reloads.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::proxy::Upstreams;
use crate::route::RouteTable;

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
            upstreams: Upstreams::new(&config.upstreams),
            config: Arc::new(config),
        }
    }
}

/// The state shared by every connection and request.
pub struct Gateway {
    /// Read with one atomic load per request; replaced whole on reload.
    pub live: ArcSwap<Live>,
}

impl Gateway {
    pub fn new(config: Config) -> Arc<Self> {
        Arc::new(Self { live: ArcSwap::from_pointee(Live::build(config)) })
    }

    /// Installs a new, already validated config. In-flight requests keep the
    /// one they started with.
    pub fn reload(&self, config: Config) {
        self.live.store(Arc::new(Live::build(config)));
    }
}
