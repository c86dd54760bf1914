//! Active health checks: one task per upstream with `health = {...}`, per
//! process (not per worker), probing each target with `GET path` every
//! `interval` through the target's own pool (so a probe goes over the same
//! TLS and HTTP version as requests do).
//!
//! The task holds the upstream weakly and ends once the upstream is gone:
//! after a reload the new config's upstream starts its own task, and the old
//! one stops when the last request using the old config has finished. The
//! verdicts go to the targets' health state, which the reload carried over.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use http::{Request, header};

use super::balance::Weighted as _;
use super::body::RequestBody;
use super::upstream::UpstreamPool;

/// Starts the checks of `upstream` on the current runtime (none: no checks,
/// as in a unit test building a config without one).
pub fn spawn(upstream: &Arc<UpstreamPool>) {
    let Some(settings) = upstream.active_health().cloned() else { return };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    let upstream: Weak<UpstreamPool> = Arc::downgrade(upstream);
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(settings.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(upstream) = upstream.upgrade() else { return };
            let probes = upstream.targets().map(|target| {
                let settings = &settings;
                async move {
                    let verdict = probe(target.pool(), settings).await;
                    let (passed, why) = match &verdict {
                        Ok(()) => (true, String::new()),
                        Err(why) => (false, why.clone()),
                    };
                    target.health().record_probe(passed, settings, target.label(), &why);
                }
            });
            futures_util::future::join_all(probes).await;
        }
    });
}

/// One probe: `Ok` for a 2xx or 3xx answer within the timeout.
async fn probe(pool: &Arc<super::ConnPool>, settings: &super::health::ActiveSettings) -> Result<(), String> {
    let mut request = Request::new(RequestBody::buffered(Bytes::new()));
    *request.uri_mut() = http::Uri::from(settings.path.clone());
    if let Some(host) = pool.host() {
        request.headers_mut().insert(header::HOST, host.clone());
    }
    request.headers_mut().insert(header::USER_AGENT, http::HeaderValue::from_static("keygate-health-check"));
    let now = tokio::time::Instant::now();
    match tokio::time::timeout(settings.timeout, pool.send(request, now)).await {
        Err(_) => Err(format!("no answer within {:?}", settings.timeout)),
        Ok(Err(error)) => Err(error.to_string()),
        // The response (and its connection) is dropped unread: a probe
        // answer is small, and a fresh connection next time is a fair test.
        Ok(Ok((response, _lease))) => {
            let status = response.status();
            if status.is_success() || status.is_redirection() {
                Ok(())
            } else {
                Err(format!("answered {}", status.as_u16()))
            }
        }
    }
}
