//! Waiting on conditions with a deadline, never on a fixed sleep.

use std::future::Future;
use std::time::{Duration, Instant};

use keygate::store::Invalidation;
use tokio::sync::broadcast;

/// Fails the test if `fut` takes longer than `secs`; says what was awaited.
pub async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {secs}s waiting for {what}"))
}

/// Receives until an invalidation equal to `wanted` arrives (10 s at most).
pub async fn wait_for(rx: &mut broadcast::Receiver<Invalidation>, wanted: Invalidation) {
    within(10, &format!("{wanted:?}"), async {
        loop {
            match rx.recv().await {
                Ok(got) if got == wanted => return,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(e) => panic!("invalidation channel closed: {e}"),
            }
        }
    })
    .await
}

/// Polls `check` (yielding between tries, no sleep) until it holds or
/// `deadline` passes; returns how long it took. For effects that travel
/// asynchronously, such as a pub/sub invalidation reaching a gateway.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < deadline, "not within {deadline:?}: {what}");
        tokio::task::yield_now().await;
    }
}

/// Polls `check` every 20 ms until it holds, for `deadline` at most. For
/// conditions that take seconds (a token's expiry, a key rotation's
/// publish delay), where [`eventually`]'s spinning would only burn CPU.
pub async fn poll_until<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < deadline, "not within {deadline:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
