//! The real gateway, in process on `127.0.0.1:0`, and clients to talk to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keygate::config::Config;
use keygate::gateway::Gateway;
use keygate::server::{self, Drained};
use keygate::store::SharedStore;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A gateway serving on an ephemeral port until `shutdown` or drop.
pub struct TestGateway {
    /// The first listener's address.
    pub addr: SocketAddr,
    /// Every listener's bound address, in `[[server.listener]]` order.
    pub listeners: Vec<SocketAddr>,
    pub gateway: Arc<Gateway>,
    /// The folder relative config paths resolve against (the file store's
    /// `keys/` lives here unless the config says otherwise).
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Drained>>,
}

impl TestGateway {
    /// Starts a gateway from config text, in a fresh temporary folder so the
    /// file store never touches the repository's `keys/`.
    pub async fn start(toml: &str) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(toml, dir).await
    }

    /// Starts a gateway whose relative paths resolve against `dir`.
    pub async fn start_in(toml: &str, dir: tempfile::TempDir) -> TestGateway {
        let config = match Config::from_toml(toml, dir.path()) {
            Ok(config) => config,
            Err(e) => panic!("test config is invalid: {e:?}\n{toml}"),
        };
        let store = keygate::store::open(&config.store, None).await.expect("test store opens");
        Self::start_with(config, store, dir).await
    }

    pub async fn start_with(config: Config, store: SharedStore, dir: tempfile::TempDir) -> TestGateway {
        Self::start_with_clock(config, store, dir, keygate::clock::Clock::System).await
    }

    /// [`Self::start_with`], access tokens issued and checked by `clock`.
    pub async fn start_with_clock(
        config: Config,
        store: SharedStore,
        dir: tempfile::TempDir,
        clock: keygate::clock::Clock,
    ) -> TestGateway {
        let config = quiet(config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = config.server.drain_timeout;
        let gateway = Gateway::with_clock(config, store, clock);
        wait_signing_keys(&gateway).await;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(
            listener,
            Arc::clone(&gateway),
            async move {
                let _ = stopped.await;
            },
            drain,
        ));
        TestGateway { addr, listeners: vec![addr], gateway, dir, stop: Some(stop), task: Some(task) }
    }

    /// Starts a gateway on every `[[server.listener]]` of `toml` (plain or
    /// TLS, each bound where it says: `127.0.0.1:0` picks a free port), as
    /// `keygate serve` does on one worker.
    pub async fn start_listeners(toml: &str) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let config = match Config::from_toml(toml, dir.path()) {
            Ok(config) => config,
            Err(e) => panic!("test config is invalid: {e:?}\n{toml}"),
        };
        let store = keygate::store::open(&config.store, None).await.expect("test store opens");
        let drain = config.server.drain_timeout;
        let config = quiet(config);
        let gateway = Gateway::new(config.clone(), store);
        wait_signing_keys(&gateway).await;
        let mut edge = keygate::tls::TlsEdge::default();
        let mut serving = Vec::new();
        let mut listeners = Vec::new();
        for (index, listener) in config.server.listeners.iter().enumerate() {
            let socket = TcpListener::bind(listener.listen).await.unwrap();
            let addr = socket.local_addr().unwrap();
            let transport = match &listener.tls {
                None => server::Transport::Plain,
                Some(tls) => {
                    let tls =
                        keygate::tls::TlsListener::build(index, listener.listen, tls).expect("TLS set-up");
                    tls.publish_metrics();
                    edge.https_port.get_or_insert(addr.port());
                    edge.listeners.push(Arc::clone(&tls));
                    server::Transport::Tls(tls)
                }
            };
            listeners.push(addr);
            serving.push((socket, transport));
        }
        gateway.tls.set(edge).expect("TLS listeners set once");
        let (stop, stopped) = oneshot::channel::<()>();
        let (stopping, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _ = stopped.await;
            let _ = stopping.send(true);
        });
        let served = Arc::clone(&gateway);
        let task = tokio::spawn(async move {
            let serves = serving.into_iter().map(|(socket, transport)| {
                let mut stop = stop_rx.clone();
                let stop = async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                };
                server::serve_transport(socket, transport, Arc::clone(&served), stop, drain)
            });
            let drained = futures_util::future::join_all(serves).await;
            if drained.iter().all(|d| *d == Drained::Clean) { Drained::Clean } else { Drained::TimedOut }
        });
        TestGateway { addr: listeners[0], listeners, gateway, dir, stop: Some(stop), task: Some(task) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Starts the graceful shutdown and returns a handle that completes when
    /// the drain is over.
    pub fn begin_shutdown(&mut self) -> tokio::task::JoinHandle<Drained> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("shutdown started twice")
    }
}

/// As `keygate serve` does: the store's signing keys are read before the
/// gateway serves (with `[tokens]`).
async fn wait_signing_keys(gateway: &Gateway) {
    if let Some(tokens) = &gateway.tokens {
        assert!(tokens.wait_loaded(Duration::from_secs(10)).await, "the signing keys load");
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The access log goes to stdout by default, which the test harness does
/// not capture (the writer is a thread of its own): in tests it is off
/// unless it goes to a file, as in the tests that read it.
fn quiet(mut config: Config) -> Config {
    let destination = config.log.access.as_deref().map(keygate::access_log::Sink::destination);
    if destination == Some(&keygate::access_log::Destination::Stdout) {
        config.log.access = None;
    }
    config
}

/// What a test usually wants from a response.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 client with keep-alive.
pub fn http1_client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 client with prior knowledge (cleartext h2).
pub fn http2_client() -> TestClient {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

pub async fn send(client: &TestClient, request: Request<Full<Bytes>>) -> Answer {
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .expect("gateway answered within 30 s")
        .expect("request reached the gateway");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("response body read").to_bytes();
    Answer { status: parts.status, headers: parts.headers, body }
}

/// `method path` with `Authorization: Bearer <token>` (an access token, or a key).
pub async fn with_bearer(gw: &TestGateway, method: http::Method, path: &str, token: &str) -> Answer {
    let request = Request::builder()
        .method(method)
        .uri(gw.url(path))
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::default())
        .unwrap();
    send(&http1_client(), request).await
}

pub async fn get(url: &str) -> Answer {
    send(&http1_client(), Request::get(url).body(Full::default()).unwrap()).await
}
