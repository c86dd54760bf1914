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

use common::gateway::{Answer, TestGateway, get, http1_client, send};
use common::upstream::{Upstream, full};
use common::wait::{eventually, within};
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

async fn get_answer(url: String) -> Answer {
    get(&url).await
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

/// An upstream that answers its index, for the balancing tests.
async fn numbered(index: usize) -> Upstream {
    Upstream::start(move |_req| async move { Response::new(full(index.to_string())) }).await
}

async fn key_for(gateway: &TestGateway, client: &str) -> String {
    let now = jiff::Timestamp::now();
    let changes = keygate::meta::MetaChanges::from_query("scopes=read", now).unwrap();
    let issued = keygate::ops::issue(&*gateway.gateway.store, "kg_", client, changes, now).await.unwrap();
    issued.key.expose().to_owned()
}

/// Which target (its index) each client's requests went to, asserting that
/// every one of a client's `rounds` requests went to the same target.
async fn placement(gateway: &TestGateway, keys: &[(String, String)], rounds: usize) -> Vec<String> {
    let client = http1_client();
    let mut placed = Vec::new();
    for (name, key) in keys {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..rounds {
            let request = http::Request::get(gateway.url("/orders"))
                .header("x-api-key", key)
                .body(http_body_util::Full::default())
                .unwrap();
            let answer = send(&client, request).await;
            assert_eq!(answer.status, 200, "{}", answer.text());
            seen.insert(answer.text());
        }
        assert_eq!(seen.len(), 1, "client {name} stays on one target: {seen:?}");
        placed.extend(seen);
    }
    placed
}

fn keyed_config(targets: &[String], extra: &str) -> String {
    config(targets, extra).replace("public = true", "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hash_is_sticky_agreed_by_every_instance_and_a_removal_moves_only_the_removed_targets_clients()
{
    let upstreams = [numbered(0).await, numbered(1).await, numbered(2).await];
    let urls: Vec<String> = upstreams.iter().map(Upstream::url).collect();
    let text = keyed_config(&urls, "balance = \"client_hash\"");
    let first = TestGateway::start(&text).await;
    let second = TestGateway::start(&text).await;
    let clients: Vec<String> = (0..30).map(|i| format!("client-{i}")).collect();
    let mut keys = (Vec::new(), Vec::new());
    for client in &clients {
        keys.0.push((client.clone(), key_for(&first, client).await));
        keys.1.push((client.clone(), key_for(&second, client).await));
    }

    let on_first = placement(&first, &keys.0, 4).await;
    let on_second = placement(&second, &keys.1, 4).await;
    assert_eq!(on_first, on_second, "two gateways send each client to the same target");
    for target in ["0", "1", "2"] {
        let share = on_first.iter().filter(|t| *t == target).count();
        assert!((4..=18).contains(&share), "target {target} has {share} of 30 clients: {on_first:?}");
    }

    // Target 2 leaves the set: its clients move, nobody else does.
    let config = keygate::config::Config::from_toml(
        &keyed_config(&urls[..2], "balance = \"client_hash\""),
        first.dir.path(),
    )
    .unwrap();
    first.gateway.reload(config);
    let after = placement(&first, &keys.0, 2).await;
    for (i, (before, now)) in on_first.iter().zip(&after).enumerate() {
        if before == "2" {
            assert_ne!(now, "2", "client {i} left the removed target");
        } else {
            assert_eq!(before, now, "client {i} was not on the removed target and stays put");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_can_require_a_healthy_target_in_every_upstream() {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut target = Killable::start(any, Arc::new(AtomicUsize::new(0))).await;
    let health =
        r#"health = { path = "/healthz", interval = "50ms", timeout = "50ms", healthy = 1, unhealthy = 1 }"#;
    let mut text = config(&[target.url()], health);
    text.push_str(&common::admin::admin_section());
    text.push_str("readyz_requires_healthy_upstreams = true\n");
    let (_gateway, admin) = common::admin::start(&text).await;
    let ready = || async { admin.call_as(None, http::Method::GET, "/readyz", None).await };
    assert_eq!(ready().await.status, 200, "{}", ready().await.text());

    target.kill().await;
    eventually(Duration::from_secs(10), "readyz says 503 once the only target fails its checks", || async {
        ready().await.status == 503
    })
    .await;
    let answer = ready().await;
    assert_eq!(answer.json()["error"], "not_ready", "{}", answer.text());

    let _back = Killable::start(target.addr, Arc::clone(&target.served)).await;
    eventually(Duration::from_secs(10), "readyz says 200 once the target passes again", || async {
        ready().await.status == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_max_pending_a_request_waiting_for_a_connection_gets_503() {
    let (upstream, arrived, release) = Upstream::gated().await;
    let extra = "max_connections = 1\nmax_pending = 1";
    let gateway = TestGateway::start(&config(&[upstream.url()], extra)).await;
    let url = gateway.url("/held");
    let holder = tokio::spawn(get_owned(url.clone()));
    arrived.notified().await;

    // The one connection is taken: one of the next two waits for it (the
    // one pending connection allowed) and the other is refused at once.
    let waiting: Vec<_> = (0..2).map(|_| tokio::spawn(get_answer(url.clone()))).collect();
    let mut waiting = futures_util::future::select_all(waiting);
    let (refused, _, rest) = within(10, "one of the two is refused", &mut waiting).await;
    let refused = refused.unwrap();
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(refused.json()["error"], "upstream_overloaded");

    release.add_permits(2);
    assert_eq!(holder.await.unwrap(), 200);
    for request in rest {
        assert_eq!(request.await.unwrap().status, 200, "the waiting request gets the connection");
    }
    assert_eq!(
        metric("keygate_upstream_overloaded_total{upstream=\"api\",limit=\"max_pending\"}"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_attempt_ends_at_try_timeout_and_is_retried_within_the_overall_timeout() {
    let hung_hits = Arc::new(AtomicUsize::new(0));
    let hits = Arc::clone(&hung_hits);
    let hung = Upstream::start(move |_req| {
        hits.fetch_add(1, Ordering::SeqCst);
        async {
            std::future::pending::<()>().await;
            Response::new(full("never"))
        }
    })
    .await;
    let live = numbered(1).await;
    let extra = "retries = 1\ntry_timeout = \"200ms\"\npassive = { failures = 100 }";
    let gateway = TestGateway::start(&config(&[hung.url(), live.url()], extra)).await;
    let started = std::time::Instant::now();
    for _ in 0..4 {
        let answer = get(&gateway.url("/slow")).await;
        assert_eq!((answer.status, answer.text()), (http::StatusCode::OK, "1".to_owned()));
    }
    assert_eq!(
        hung_hits.load(Ordering::SeqCst),
        2,
        "round robin sent half the first attempts to the hung target"
    );
    // Far under `timeout = "5s"`: each hung attempt was cut at its own deadline.
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_within_retry_buffer_is_replayed_whole_and_a_bigger_one_is_not_retried() {
    let refusals = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&refusals);
    // Reads the whole body, then answers 503: a retryable answer.
    let busy = Upstream::start(move |req: http::Request<hyper::body::Incoming>| {
        let counted = Arc::clone(&counted);
        async move {
            use http_body_util::BodyExt as _;
            let _ = req.into_body().collect().await;
            counted.fetch_add(1, Ordering::SeqCst);
            Response::builder().status(503).body(full("busy")).unwrap()
        }
    })
    .await;
    let mirror = Upstream::mirror().await;
    let extra = "retries = 1\nretry_buffer = \"8KiB\"\npassive = { failures = 100 }";
    let gateway = TestGateway::start(&config(&[busy.url(), mirror.url()], extra)).await;
    let client = http1_client();
    let put = |size: usize| {
        http::Request::put(gateway.url("/doc"))
            .body(http_body_util::Full::new(bytes::Bytes::from(vec![b'x'; size])))
            .unwrap()
    };

    for _ in 0..4 {
        let answer = send(&client, put(6 * 1024)).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.json()["body"].as_str().map(str::len), Some(6 * 1024), "the whole body, again");
    }
    let replayed = refusals.load(Ordering::SeqCst);
    assert_eq!(replayed, 2, "half the first attempts met the busy target and were replayed");

    // Over retry_buffer the body streams, so a 503 reaches the client as is.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(send(&client, put(32 * 1024)).await.status.as_u16());
    }
    let busy_answers = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(busy_answers, 2, "not retried: {statuses:?}");
    assert_eq!(refusals.load(Ordering::SeqCst), replayed + 2);
}
