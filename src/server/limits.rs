//! Caps on open connections: across the whole process, and per source address.
//!
//! One [`ConnectionLimits`] is shared by every worker (it lives in the
//! [`Gateway`](crate::gateway::Gateway)), so the caps hold for the process
//! whatever the kernel's spread of connections over the workers. A connection
//! over a cap is closed right after `accept`, before any byte is read: the
//! cheapest refusal there is, and it never touches the connections already
//! served. The per-address cap is what keeps one client from taking the
//! global one: another client's connections still find room.
//!
//! Counting is exact: a permit is taken at accept and given back when the
//! connection's task ends (dropped), whatever ended it.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::config::EdgeConfig;

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `server.max_connections` are open.
    Global,
    /// `server.max_connections_per_ip` are open from this address.
    PerIp,
}

impl Full {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Global => "max_connections",
            Self::PerIp => "max_connections_per_ip",
        }
    }
}

/// Open connection counts, global and per source address.
#[derive(Debug)]
pub struct ConnectionLimits {
    max: usize,
    max_per_ip: usize,
    open: AtomicUsize,
    /// Sharded, so workers accepting at once rarely meet on one lock; an
    /// address is removed when its last connection closes, so the map holds
    /// only addresses with open connections.
    per_ip: DashMap<IpAddr, usize, foldhash::fast::RandomState>,
}

impl ConnectionLimits {
    pub fn new(edge: &EdgeConfig) -> Arc<Self> {
        Arc::new(Self {
            max: edge.max_connections,
            max_per_ip: edge.max_connections_per_ip,
            open: AtomicUsize::new(0),
            per_ip: DashMap::with_hasher(foldhash::fast::RandomState::default()),
        })
    }

    /// Takes a place for a new connection from `ip`, or says which cap is full.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, Full> {
        // Optimistic add, undone if over: no lock, and a burst of accepts
        // cannot overshoot the cap.
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::Global);
        }
        {
            let mut count = self.per_ip.entry(ip).or_insert(0);
            if *count >= self.max_per_ip {
                drop(count);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Full::PerIp);
            }
            *count += 1;
        }
        crate::metrics::connection_opened();
        Ok(ConnectionPermit { limits: Arc::clone(self), ip })
    }

    /// Connections open now (for `/metrics` and tests).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Connections open now from `ip`.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.per_ip.get(&ip).map_or(0, |count| *count)
    }

    fn release(&self, ip: IpAddr) {
        // Remove the address with its last connection, atomically with the
        // decrement, so a concurrent admit never sees a stale zero entry vanish.
        self.per_ip.remove_if_mut(&ip, |_, count| {
            *count = count.saturating_sub(1);
            *count == 0
        });
        self.open.fetch_sub(1, Ordering::AcqRel);
        crate::metrics::connection_closed();
    }
}

/// One open connection's place; given back on drop.
#[derive(Debug)]
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.limits.release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_ip: usize) -> Arc<ConnectionLimits> {
        let mut edge = crate::config::Config::defaults().server.edge;
        edge.max_connections = max;
        edge.max_connections_per_ip = per_ip;
        ConnectionLimits::new(&edge)
    }

    #[test]
    fn one_address_cannot_take_another_addresss_room() {
        let limits = limits(5, 2);
        let [a, b, c]: [IpAddr; 3] = ["192.0.2.1", "192.0.2.2", "192.0.2.3"].map(|ip| ip.parse().unwrap());
        let a1 = limits.admit(a).unwrap();
        let _a2 = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), Full::PerIp);
        let _b1 = limits.admit(b).unwrap();
        let _b2 = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), Full::PerIp);
        let _c1 = limits.admit(c).unwrap();
        assert_eq!(limits.admit(c).unwrap_err(), Full::Global);
        assert_eq!(limits.open(), 5, "refusals take nothing");
        drop(a1);
        assert_eq!(limits.open_from(a), 1);
        let _c2 = limits.admit(c).unwrap();
        assert_eq!(limits.open(), 5);
    }

    #[test]
    fn the_last_connection_of_an_address_removes_it() {
        let limits = limits(10, 10);
        let a: IpAddr = "::1".parse().unwrap();
        let permits: Vec<_> = (0..3).map(|_| limits.admit(a).unwrap()).collect();
        assert_eq!(limits.open_from(a), 3);
        drop(permits);
        assert_eq!(limits.open(), 0);
        assert!(limits.per_ip.is_empty(), "no entry kept for a closed address");
    }
}
