//! Real upstream servers on ephemeral ports for the gateway to forward to.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub type UpstreamBody = BoxBody<Bytes, hyper::Error>;

pub fn full(body: impl Into<Bytes>) -> UpstreamBody {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

/// An upstream server answering every request with `handler`. Stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    /// Connections accepted so far (to see connection reuse).
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<UpstreamBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(handler);
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let handler = Arc::clone(&handler);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let handler = Arc::clone(&handler);
                        async move { Ok::<_, Infallible>(handler(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, connections, task }
    }

    /// Answers with JSON describing what it received: method, path, query,
    /// headers (first value of each), and the body as text.
    pub async fn mirror() -> Upstream {
        Self::start(|req: Request<Incoming>| async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let headers: serde_json::Map<String, serde_json::Value> = parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned().into())
                })
                .collect();
            let json = serde_json::json!({
                "method": parts.method.as_str(),
                "path": parts.uri.path(),
                "query": parts.uri.query(),
                "version": format!("{:?}", parts.version),
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
            });
            Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .header("x-upstream", "mirror")
                .body(full(json.to_string()))
                .unwrap()
        })
        .await
    }

    /// An upstream that holds every request until released: each arrival is
    /// announced on the `Notify`, and each permit added to the `Semaphore`
    /// lets one held request answer `finished`.
    pub async fn gated() -> (Upstream, Arc<tokio::sync::Notify>, Arc<tokio::sync::Semaphore>) {
        let arrived = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let (a, r) = (Arc::clone(&arrived), Arc::clone(&release));
        let upstream = Self::start(move |_req| {
            let (arrived, release) = (Arc::clone(&a), Arc::clone(&r));
            async move {
                arrived.notify_one();
                if let Ok(permit) = release.acquire().await {
                    permit.forget();
                }
                Response::builder().body(full("finished")).unwrap()
            }
        })
        .await;
        (upstream, arrived, release)
    }

    /// `http://ADDR` for a config's `targets`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A loopback address with nothing listening on it (bound, then released).
pub async fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}
