//! Graceful shutdown: stop accepting, finish what is in flight, then exit.

mod common;

use std::time::Duration;

use common::gateway::{TestGateway, get};
use common::upstream::Upstream;
use keygate::server::Drained;

fn config(upstream: &Upstream, drain: &str) -> String {
    format!(
        "[server]\ndrain_timeout = \"{drain}\"\n\n[[route]]\npath = \"/\"\nupstream = \"api\"\npublic = true\n\n[upstream.api]\ntargets = [\"{}\"]\n",
        upstream.url()
    )
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_slow_request_finish_and_refuses_new_connections() {
    let (upstream, arrived, release) = Upstream::gated().await;
    let mut gateway = TestGateway::start(&config(&upstream, "30s")).await;
    let url = gateway.url("/slow");
    let in_flight = tokio::spawn(async move { get(&url).await });
    arrived.notified().await;

    let drained = gateway.begin_shutdown();
    // Wait until the listener is closed: new connections are refused.
    let addr = gateway.addr;
    tokio::time::timeout(Duration::from_secs(10), async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("listener closed after shutdown began");
    assert!(!drained.is_finished(), "drain must wait for the in-flight request");

    release.add_permits(1);
    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "finished");
    assert_eq!(drained.await.unwrap(), Drained::Clean);
}

#[tokio::test(start_paused = true)]
async fn drain_gives_up_after_the_drain_timeout() {
    let (upstream, arrived, _release) = Upstream::gated().await;
    let mut gateway = TestGateway::start(&config(&upstream, "2s")).await;
    let url = gateway.url("/stuck");
    let _in_flight = tokio::spawn(async move { get(&url).await });
    arrived.notified().await;
    // With the clock paused, tokio advances time only when everything idles,
    // so the 2 s drain timeout passes without a real wait.
    assert_eq!(gateway.begin_shutdown().await.unwrap(), Drained::TimedOut);
}
