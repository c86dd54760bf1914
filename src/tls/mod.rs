//! TLS for the public listeners: certificates, the rustls server config, and
//! the handshake's outcome as the rest of the gateway sees it.
//!
//! - [`certs`]: PEM files in, a checked [`rustls::sign::CertifiedKey`] with its
//!   names and expiry out (config validation, `keygate check`, reloads);
//! - [`acceptor`]: one [`TlsListener`] per `[[server.listener]]` with `tls`:
//!   the SNI resolver (certificates swapped on reload without touching open
//!   connections), ALPN, versions, session resumption and client
//!   certificates, shared by every worker serving that listener.
//!
//! What TLS means for a request travels on [`crate::proxy::Peer`]: whether
//! it came over TLS, and the verified client certificate chain.

pub mod acceptor;
pub mod certs;

use std::sync::Arc;

pub use acceptor::{HandshakeFailure, TlsError, TlsListener};

/// The TLS listeners a running gateway serves, set once when they are bound.
#[derive(Debug, Default)]
pub struct TlsEdge {
    pub listeners: Vec<Arc<TlsListener>>,
    /// The port plain requests to a `tls_only` route are redirected to: the
    /// first TLS listener's bound port.
    pub https_port: Option<u16>,
}

impl TlsEdge {
    /// Loads the certificates `config` names for each listener and swaps them
    /// in, all or nothing: if any listener's files fail, none changes.
    /// A listener is matched by its position and configured address
    /// (listeners themselves do not reload).
    pub fn reload(&self, config: &crate::config::ServerConfig) -> Result<usize, TlsError> {
        let mut staged = Vec::new();
        for listener in &self.listeners {
            let configured = config.listeners.get(listener.index).filter(|l| l.listen == listener.listen);
            let Some(tls) = configured.and_then(|l| l.tls.as_ref()) else {
                // Moved, gone from the file or no longer TLS: only a restart
                // changes listeners, so the running certificates stay.
                continue;
            };
            staged.push((listener, listener.load(tls)?));
        }
        let swapped = staged.len();
        for (listener, set) in staged {
            listener.install(set);
        }
        Ok(swapped)
    }
}
