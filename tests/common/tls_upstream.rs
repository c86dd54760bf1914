//! A real HTTPS upstream on `127.0.0.1:0` for the gateway to forward to:
//! tokio-rustls in front of hyper (HTTP/1.1 and HTTP/2, chosen by ALPN),
//! with a certificate from a [`TestCa`](super::pki::TestCa).
//!
//! It counts the TCP connections it accepts (to see pooling), records the
//! HTTP version of every request it serves (to see HTTP/2 negotiated), and
//! can require a client certificate signed by a given CA (mTLS).
//!
//! Every request is answered by the same handler: a `POST` streams its body
//! straight back (large bodies both ways), anything else gets JSON with
//! the version, path and `Host` it arrived with.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use super::pki::Issued;
use super::upstream::{UpstreamBody, full};

/// How the upstream speaks TLS.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// ALPN protocols it accepts, in its order of preference.
    pub alpn: Vec<&'static [u8]>,
    /// Require a client certificate signed by this CA (PEM).
    pub client_ca: Option<PathBuf>,
}

impl Default for TlsOptions {
    /// HTTP/2 and HTTP/1.1 over ALPN, no client certificate.
    fn default() -> Self {
        Self { alpn: vec![b"h2", b"http/1.1"], client_ca: None }
    }
}

/// An HTTPS upstream serving until dropped.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    /// TCP connections accepted so far (handshakes that fail count too).
    pub connections: Arc<AtomicUsize>,
    versions: Arc<Mutex<Vec<Version>>>,
    /// Each accepted connection's task, so a test can cut them all.
    open: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn chain(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path).expect("certificate file").map(|c| c.expect("certificate")).collect()
}

pub fn server_config(server: &Issued, options: &TlsOptions) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("TLS versions");
    let builder = match &options.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in chain(ca) {
                roots.add(cert).expect("client CA");
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let key = PrivateKeyDer::from_pem_file(&server.key).expect("server key");
    let mut config = builder.with_single_cert(chain(&server.cert), key).expect("server certificate");
    config.alpn_protocols = options.alpn.iter().map(|p| p.to_vec()).collect();
    config
}

impl TlsUpstream {
    /// Serves HTTPS with `server`'s certificate and key.
    pub async fn start(server: &Issued, options: TlsOptions) -> TlsUpstream {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(server, &options)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let versions = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (accepted, seen, tracked) = (Arc::clone(&connections), Arc::clone(&versions), Arc::clone(&open));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (acceptor, seen) = (acceptor.clone(), Arc::clone(&seen));
                let connection = tokio::spawn(async move {
                    // A refused handshake (the gateway distrusts us, or we it) just ends.
                    let Ok(stream) = acceptor.accept(stream).await else { return };
                    let service = service_fn(move |req: Request<Incoming>| {
                        seen.lock().unwrap().push(req.version());
                        async move { Ok::<_, Infallible>(answer(req)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                tracked.lock().unwrap().push(connection.abort_handle());
            }
        });
        TlsUpstream { addr, connections, versions, open, task }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The HTTP version of every request served so far, in order.
    pub fn versions(&self) -> Vec<Version> {
        self.versions.lock().unwrap().clone()
    }

    /// Cuts every open connection (no GOAWAY, no close_notify: the
    /// sockets just close, as when an upstream restarts).
    pub fn cut_connections(&self) {
        for connection in self.open.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn answer(req: Request<Incoming>) -> Response<UpstreamBody> {
    if req.method() == Method::POST {
        // Streamed back frame by frame, never collected.
        return Response::new(req.into_body().boxed());
    }
    let host = req.headers().get(http::header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let json = serde_json::json!({
        "version": format!("{:?}", req.version()),
        "path": req.uri().path(),
        "host": host,
    });
    let mut response = Response::new(full(json.to_string()));
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}
