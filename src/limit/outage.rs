//! Whether the limit store (Redis) is reachable, as the limits last saw it.
//!
//! A failed lease marks the store down for [`RETRY_AFTER`]: until then the
//! limits decide locally (leases, outage allowance, fallback rate limiter)
//! without asking Redis, so an outage costs requests no connect attempts or
//! response timeouts, and a paused Redis cannot make every request wait.
//! The first request after the back-off asks again; its success ends the
//! outage. Each transition is logged once, not per request.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::lock;

/// How long the limits decide alone after a failed store call. Short, as a
/// recovered Redis should count again quickly; long enough that a dead one
/// costs one failed call per second, not one per request.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The store's state as one limit kind (quotas, shared rates) last saw it.
#[derive(Debug)]
pub struct Outage {
    /// What counts: quotas or shared rates (for the log).
    what: &'static str,
    /// Held for a comparison or two, never across an await.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Whether the last call failed: only a change is logged.
    down: bool,
    /// Do not ask the store before this instant.
    retry_at: Option<Instant>,
}

impl Outage {
    pub fn new(what: &'static str) -> Self {
        Self { what, state: Mutex::new(State::default()) }
    }

    /// True while the last store call failed less than [`RETRY_AFTER`] ago:
    /// decide without the store.
    pub fn skip_store(&self) -> bool {
        let state = lock(&self.state);
        state.retry_at.is_some_and(|at| Instant::now() < at)
    }

    /// A store call failed: decide locally for a while.
    pub fn failed(&self, error: &str) {
        let mut state = lock(&self.state);
        state.retry_at = Some(Instant::now() + RETRY_AFTER);
        if !state.down {
            state.down = true;
            tracing::warn!(
                limits = self.what,
                %error,
                "limit store unreachable; deciding locally (leased quota, outage allowance, local rate share)"
            );
        }
    }

    /// A store call succeeded: the outage, if any, is over.
    pub fn succeeded(&self) {
        let mut state = lock(&self.state);
        state.retry_at = None;
        if state.down {
            state.down = false;
            tracing::info!(limits = self.what, "limit store reachable again");
        }
    }
}
