//! The admin listener in process, beside a [`TestGateway`], and a client for it.
//!
//! The config is written to `gateway.toml` in the gateway's folder so that
//! reloads (`POST /admin/reload`) read a real file, as in production; tests
//! rewrite it with [`TestAdmin::write_config`].

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use keygate::admin::{self, Admin};
use keygate::reload::Reloader;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::gateway::{Answer, TestGateway, http1_client, send};

/// The admin token every test config uses.
pub const TOKEN: &str = "test-admin-token-0123456789abcdef";

/// An `[admin]` section with [`TOKEN`]; the listen address is not used in
/// process (the harness binds its own ephemeral port).
pub fn admin_section() -> String {
    format!("\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\ntoken_name = \"tests\"\n")
}

pub struct TestAdmin {
    pub addr: SocketAddr,
    pub config_path: PathBuf,
    _stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestAdmin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a gateway from `toml` (written to its folder's `gateway.toml`) and
/// an admin listener for it.
pub async fn start(toml: &str) -> (TestGateway, TestAdmin) {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(&config_path, toml).unwrap();
    let gateway = TestGateway::start_in(toml, dir).await;
    let admin = TestAdmin::start(&gateway, config_path).await;
    (gateway, admin)
}

impl TestAdmin {
    pub async fn start(gateway: &TestGateway, config_path: PathBuf) -> TestAdmin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reloader = Reloader::new(config_path.clone(), std::sync::Arc::clone(&gateway.gateway));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(admin::serve(listener, Admin::new(reloader), async move {
            let _ = stopped.await;
        }));
        TestAdmin { addr, config_path, _stop: stop, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn write_config(&self, toml: &str) {
        std::fs::write(&self.config_path, toml).unwrap();
    }

    /// A call with an explicit token (or none) and an optional JSON body.
    pub async fn call_as(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> Answer {
        let mut request = Request::builder().method(method).uri(self.url(path));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let body = Full::new(Bytes::from(body.unwrap_or("").to_owned()));
        send(&http1_client(), request.body(body).unwrap()).await
    }

    /// A call with the right token.
    pub async fn call(&self, method: Method, path: &str, body: Option<&str>) -> Answer {
        self.call_as(Some(TOKEN), method, path, body).await
    }
}
