//! What a listener puts between accept and HTTP: nothing ([`Transport::Plain`])
//! or a TLS handshake ([`Transport::Tls`]), and what a finished handshake
//! hands on: the protocol ALPN chose and the request's [`Peer`] with the
//! verified client certificate chain.
//!
//! [`handshake`] is the whole TLS step, so that what the gateway learns
//! from a handshake is decided in one place (and tests drive the very same
//! function).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::detect::Protocol;
use crate::proxy::Peer;
use crate::tls::{HandshakeFailure, TlsListener};

/// A listener's transport.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Cleartext: HTTP/1.1, or h2c with prior knowledge (told by the first bytes).
    Plain,
    /// A TLS handshake first; ALPN then says HTTP/2 or HTTP/1.1, and the
    /// verified client certificate (mTLS) goes on each request's [`Peer`].
    Tls(Arc<TlsListener>),
}

/// A connection whose TLS handshake finished.
pub struct Handshaken {
    pub stream: tokio_rustls::server::TlsStream<TcpStream>,
    /// `h2` over ALPN is HTTP/2; anything else (`http/1.1`, no ALPN) HTTP/1.1.
    pub protocol: Protocol,
    /// Marked TLS, with the client's certificate chain if it sent one
    /// (verified against the listener's `client_ca`: rustls refuses the
    /// handshake otherwise).
    pub peer: Peer,
}

/// Runs the TLS handshake on `stream` from `peer`, within `limit`.
pub async fn handshake(
    tls: &TlsListener,
    stream: TcpStream,
    peer: SocketAddr,
    limit: Duration,
) -> Result<Handshaken, HandshakeFailure> {
    let stream = match tokio::time::timeout(limit, tls.acceptor().accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            let failure = HandshakeFailure::of(&error);
            tracing::debug!(%peer, %error, reason = failure.as_str(), "TLS handshake failed; closing");
            return Err(failure);
        }
        Err(_elapsed) => {
            tracing::debug!(%peer, ?limit, "no TLS handshake within the timeout; closing");
            return Err(HandshakeFailure::Timeout);
        }
    };
    let (_, session) = stream.get_ref();
    let protocol = if session.alpn_protocol() == Some(b"h2") { Protocol::Http2 } else { Protocol::Http1 };
    let client_certs = session.peer_certificates().map(Arc::from);
    Ok(Handshaken { stream, protocol, peer: Peer::over_tls(peer, client_certs) })
}
