//! TLS clients for the gateway's TLS listeners: a rustls client trusting a
//! test CA (see [`super::pki`]), optionally with a client certificate, and
//! HTTP/1.1 or HTTP/2 over the connection it makes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::gateway::Answer;
use super::pki::Issued;

/// A client config trusting the CA in `ca_pem`, offering `alpn`, and
/// presenting `identity` when the server asks for a certificate.
pub fn client_config(ca_pem: &Path, alpn: &[&[u8]], identity: Option<&Issued>) -> Arc<rustls::ClientConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("CA usable");
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(issued) => {
            let chain = CertificateDer::pem_file_iter(&issued.cert)
                .expect("client cert file")
                .collect::<Result<Vec<_>, _>>()
                .expect("client cert");
            let key = PrivateKeyDer::from_pem_file(&issued.key).expect("client key");
            builder.with_client_auth_cert(chain, key).expect("client identity")
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Connects and finishes a handshake with SNI `name` (a DNS name or an IP).
pub async fn connect(
    addr: SocketAddr,
    name: &str,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_owned()).expect("a server name");
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
    tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("handshake took over 10 s")))
}

/// The certificate the server presented (DER).
pub fn presented(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().expect("the server sent a certificate")[0].clone()
}

/// The DNS names in a certificate's SAN.
pub fn names_of(cert: &CertificateDer<'_>) -> Vec<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).expect("certificate parses");
    let san = parsed.subject_alternative_name().expect("SAN parses").expect("a SAN");
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect()
}

/// The leaf certificate (DER) in a PEM file.
pub fn der_of(pem: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(pem).expect("certificate file")
}

/// ALPN the server chose.
pub fn alpn(stream: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

/// HTTP/1.1 or HTTP/2 (per `http2`) over one TLS connection.
pub struct TlsHttp {
    send: Sender,
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl TlsHttp {
    pub async fn over(stream: TlsStream<TcpStream>, http2: bool) -> TlsHttp {
        let io = TokioIo::new(stream);
        let send = if http2 {
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("h2 handshake");
            tokio::spawn(conn);
            Sender::Http2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.expect("http1 handshake");
            tokio::spawn(conn);
            Sender::Http1(send)
        };
        TlsHttp { send }
    }

    /// Sends `request` (HTTP/2 wants an absolute URI; HTTP/1.1 a Host header).
    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Answer {
        let response = match &mut self.send {
            Sender::Http1(send) => {
                send.ready().await.expect("connection ready");
                send.send_request(request).await
            }
            Sender::Http2(send) => {
                send.ready().await.expect("connection ready");
                send.send_request(request).await
            }
        };
        let response = response.expect("the gateway answered");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        Answer { status: parts.status, headers: parts.headers, body }
    }

    /// A GET of `path` for `host`, the request form the protocol wants.
    pub async fn get(&mut self, host: &str, path: &str) -> Answer {
        let request = match &self.send {
            Sender::Http1(_) => Request::get(path).header("host", host),
            Sender::Http2(_) => Request::get(format!("https://{host}{path}")),
        };
        self.send(request.body(Full::default()).unwrap()).await
    }
}
