//! Upstreams that stay up: retries around a killed target, active checks
//! bringing it back, least-outstanding balancing around a slow target, the
//! retry budget under a full outage, and the circuit breaker; through the
//! real gateway in front of real upstream servers on ephemeral ports.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::gateway::{TestGateway, get};
use common::upstream::{Upstream, full};
use common::wait::eventually;
use http::Response;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// An upstream that can be killed (its listener and every open connection
/// closed at once, as when its process dies) and restarted on the same port.
struct Killable {
    addr: SocketAddr,
    /// Requests answered (probes not counted).
    served: Arc<AtomicUsize>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Killable {
    async fn start(addr: SocketAddr, served: Arc<AtomicUsize>) -> Killable {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counter = Arc::clone(&served);
        let task = tokio::spawn(async move {
            // Dropped with the task: aborting it aborts every connection.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let counter = Arc::clone(&counter);
                connections.spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        if req.uri().path() != "/healthz" {
                            counter.fetch_add(1, Ordering::SeqCst);
                        }
                        async move { Ok::<_, Infallible>(Response::new(full("ok"))) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Killable { addr, served, task: Some(task) }
    }

    async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn config(targets: &[String], extra: &str) -> String {
    let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        r#"
[[route]]
path = "/"
upstream = "api"
public = true

[upstream.api]
targets = [{}]
timeout = "5s"
{extra}
"#,
        targets.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_target_costs_no_client_errors_and_returns_once_its_checks_pass() {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut targets = Vec::new();
    for _ in 0..3 {
        targets.push(Killable::start(any, Arc::new(AtomicUsize::new(0))).await);
    }
    let urls: Vec<String> = targets.iter().map(Killable::url).collect();
    let extra = r#"retries = 2
passive = { failures = 2, ejection = "30s" }
health = { path = "/healthz", interval = "50ms", timeout = "50ms", healthy = 2, unhealthy = 2 }"#;
    let gateway = TestGateway::start(&config(&urls, extra)).await;

    let mut errors = 0;
    for i in 0..300 {
        if i == 100 {
            targets[2].kill().await;
        }
        if get(&gateway.url("/orders")).await.status != 200 {
            errors += 1;
        }
    }
    assert_eq!(errors, 0, "every GET was retried on a live target");
    let served_while_dead = targets[2].served.load(Ordering::SeqCst);
    assert!(served_while_dead <= 40, "the dead target answered only before it died: {served_while_dead}");
    let metrics = keygate::metrics::render();
    let dead = format!("keygate_upstream_target_healthy{{upstream=\"api\",target=\"{}\"}} 0", urls[2]);
    assert!(metrics.contains(&dead), "the dead target shows as out:\n{metrics}");

    // Back on its port: the health checks see it and it gets traffic again.
    let served = Arc::clone(&targets[2].served);
    let _restarted = Killable::start(targets[2].addr, Arc::clone(&served)).await;
    let before = served.load(Ordering::SeqCst);
    eventually(Duration::from_secs(10), "the restarted target gets requests again", || {
        let url = gateway.url("/orders");
        let served = Arc::clone(&served);
        async move {
            assert_eq!(get(&url).await.status, 200);
            served.load(Ordering::SeqCst) > before
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_outstanding_keeps_requests_off_a_slow_target() {
    let slow_hits = Arc::new(AtomicUsize::new(0));
    let hits = Arc::clone(&slow_hits);
    let slow = Upstream::start(move |_req| {
        hits.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Response::new(full("slow"))
        }
    })
    .await;
    let fast_a = Upstream::start(|_req| async { Response::new(full("fast")) }).await;
    let fast_b = Upstream::start(|_req| async { Response::new(full("fast")) }).await;
    let urls = [slow.url(), fast_a.url(), fast_b.url()];
    let gateway = TestGateway::start(&config(&urls, "balance = \"least_outstanding\"")).await;

    // Eight clients draining 200 requests: each request the slow target
    // holds counts against it, and it loses every draw to a fast target
    // carrying fewer. (One client alone would leave it nothing to count:
    // outstanding requests are all this policy sees, not latency.)
    let url = gateway.url("/x");
    let left = Arc::new(AtomicUsize::new(200));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (url, left) = (url.clone(), Arc::clone(&left));
            tokio::spawn(async move {
                while left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                    assert_eq!(get(&url).await.status, 200);
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let slow_count = slow_hits.load(Ordering::SeqCst);
    assert!(slow_count <= 8, "the slow target got {slow_count} of 200 requests");
}

#[tokio::test]
async fn the_retry_budget_holds_under_a_full_outage() {
    // Targets that accept and hang up at once: every attempt fails, and
    // each is counted where it lands.
    let attempts = Arc::new(AtomicUsize::new(0));
    let mut urls = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        urls.push(format!("http://{}", listener.local_addr().unwrap()));
        let attempts = Arc::clone(&attempts);
        tasks.push(tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                attempts.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        }));
    }
    let extra = "retries = 3\nretry_budget = 0.2\npassive = { failures = 0 }";
    let gateway = TestGateway::start(&config(&urls, extra)).await;
    let requests = 200;
    for _ in 0..requests {
        assert_eq!(get(&gateway.url("/x")).await.status, 502);
    }
    let attempts = attempts.load(Ordering::SeqCst);
    // 200 first attempts, a fifth of that in retries, the burst of 10.
    let bound = requests + requests / 5 + keygate::proxy::retry::BUDGET_BURST as usize + 1;
    assert!(attempts > requests, "some requests were retried: {attempts}");
    assert!(attempts <= bound, "{attempts} attempts for {requests} requests; the budget allows {bound}");
    for task in tasks {
        task.abort();
    }
}

#[tokio::test]
async fn above_max_requests_the_breaker_answers_503_with_retry_after() {
    let (upstream, arrived, release) = Upstream::gated().await;
    let gateway = TestGateway::start(&config(&[upstream.url()], "max_requests = 2")).await;
    let url = gateway.url("/held");
    let held: Vec<_> = (0..2).map(|_| tokio::spawn(get_owned(url.clone()))).collect();
    for _ in 0..2 {
        arrived.notified().await;
    }
    let refused = get(&url).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(refused.json()["error"], "upstream_overloaded");
    release.add_permits(2);
    for request in held {
        assert_eq!(request.await.unwrap(), 200);
    }
    assert_eq!(get_after_release(&url, &release).await, 200, "the breaker closes once requests end");
    let metrics = keygate::metrics::render();
    assert!(
        metrics.contains("keygate_upstream_overloaded_total{upstream=\"api\",limit=\"max_requests\"} 1"),
        "{metrics}"
    );
}

async fn get_owned(url: String) -> http::StatusCode {
    get(&url).await.status
}

async fn get_after_release(url: &str, release: &tokio::sync::Semaphore) -> http::StatusCode {
    release.add_permits(1);
    get(url).await.status
}

/// The value of one series line in `/metrics`, or `None` when absent.
fn metric(name_and_labels: &str) -> Option<f64> {
    keygate::metrics::render()
        .lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
}

#[tokio::test]
async fn a_reload_keeps_an_ejected_target_ejected() {
    let live = Upstream::start(|_req| async { Response::new(full("ok")) }).await;
    let dead = common::upstream::closed_port_url().await;
    let extra = "retries = 1\npassive = { failures = 1, ejection = \"5m\" }";
    let text = config(&[live.url(), dead.clone()], extra);
    let gateway = TestGateway::start(&text).await;
    for _ in 0..4 {
        assert_eq!(get(&gateway.url("/x")).await.status, 200, "the dead target's share is retried");
    }
    let failures = format!("keygate_upstream_target_failures_total{{upstream=\"api\",target=\"{dead}\"}}");
    let healthy = format!("keygate_upstream_target_healthy{{upstream=\"api\",target=\"{dead}\"}}");
    let failed_before = metric(&failures).expect("the dead target failed");
    assert_eq!(metric(&healthy), Some(0.0), "ejected");

    let config = keygate::config::Config::from_toml(&text, gateway.dir.path()).unwrap();
    gateway.gateway.reload(config);
    for _ in 0..20 {
        assert_eq!(get(&gateway.url("/x")).await.status, 200);
    }
    assert_eq!(metric(&healthy), Some(0.0), "still ejected after the reload");
    assert_eq!(
        metric(&failures),
        Some(failed_before),
        "no request went to the ejected target after the reload"
    );
}
