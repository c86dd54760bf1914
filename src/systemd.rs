//! Telling the service manager what the gateway is doing (`sd_notify`), so a
//! `Type=notify` unit (`dist/keygate.service`) knows when it is really up,
//! reloading, stopping, or wedged.
//!
//! - `READY=1` once the listeners are bound, the store is open and every
//!   worker's runtime runs: `systemctl start` returns when connections are
//!   answered, and units ordered after keygate start only then.
//! - `RELOADING=1` with `MONOTONIC_USEC=` when a config reload starts (SIGHUP
//!   or `POST /admin/reload`, both through [`crate::reload::Reloader`]), then
//!   `READY=1` with a `STATUS=` saying how it went: a refused reload keeps
//!   the running config, so the service is ready again either way, and the
//!   status (shown by `systemctl status`) says why it was refused.
//! - `STOPPING=1` when shutdown begins (SIGTERM, SIGINT).
//! - `WATCHDOG=1` at half of `WATCHDOG_USEC` when the unit sets
//!   `WatchdogSec=` ([`spawn_watchdog`]).
//!
//! Without `NOTIFY_SOCKET` (not started by systemd, and in the tests that do
//! not ask for it) every call here does nothing: the `sd-notify` crate checks
//! the variable. A failed notification is logged and never stops the
//! gateway. `STATUS=` texts name config fields only, never values: unlike
//! the journal, `systemctl status` is readable by every local user.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::future::Future;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::config::ConfigError;

/// Sends `states` in one datagram; an error is logged, not returned: the
/// gateway serves the same with or without a service manager listening.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// Start-up is done: the listeners are bound and the store is open.
pub fn ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// A config reload begins. systemd 253+ requires `MONOTONIC_USEC` with
/// `RELOADING=1` (to match the reload with the `systemctl reload` that
/// asked for it); older ones ignore it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now, NotifyState::Status("reloading the config")]),
        Err(error) => {
            tracing::warn!(%error, "cannot read the monotonic clock for the service manager");
            notify(&[NotifyState::Reloading]);
        }
    }
}

/// The reload installed a config of `routes` routes and `upstreams` upstreams.
pub fn reloaded(routes: usize, upstreams: usize) {
    let status = format!("serving; config reloaded ({routes} routes, {upstreams} upstreams)");
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// The reload was refused; the running config stays, so the service is
/// ready again. The status names what was wrong, not the values.
pub fn reload_refused(error: &ConfigError) {
    let why = match error {
        ConfigError::Read { .. } => "the config file cannot be read".to_owned(),
        ConfigError::Syntax { .. } => "the config file is not valid TOML".to_owned(),
        ConfigError::Invalid { problems, .. } => {
            let mut fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
            fields.dedup();
            format!("invalid {}", fields.join(", "))
        }
    };
    let status = format!("serving the previous config; reload refused: {why} (see the log)");
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Shutdown begins: in-flight requests are drained, then the process exits.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("draining in-flight requests")]);
}

/// When the service manager asks for watchdog pings (`WATCHDOG_USEC`, and
/// `WATCHDOG_PID` unset or ours), pings at half that interval until `stop`
/// completes. `None`: no watchdog asked for.
///
/// The task runs on the calling (control) runtime, and before each ping
/// every worker runtime in `workers` must run a no-op task within the ping
/// interval: a wedged control runtime sends nothing, and a wedged worker
/// (a task that never yields, a deadlock) stops the pings too, so systemd
/// restarts a gateway that still holds its ports but no longer answers. A
/// thread pinging on its own would keep a wedged gateway alive.
pub fn spawn_watchdog(
    workers: Vec<Handle>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Option<JoinHandle<()>> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let every = sd_notify::watchdog_enabled()? / 2;
    if every.is_zero() {
        return None;
    }
    tracing::info!(every = ?every, workers = workers.len(), "service manager watchdog: pinging");
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        // A late ping is not made up for with a burst: the next one is a
        // whole interval later.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticks.tick() => {}
            }
            match unanswered(&workers, every).await {
                None => notify(&[NotifyState::Watchdog]),
                Some(worker) => tracing::warn!(
                    worker,
                    within = ?every,
                    "a worker runtime did not run a task in time; no watchdog ping"
                ),
            }
        }
    }))
}

/// The index of the first worker runtime that did not run a no-op task
/// `within` (all are probed at once); `None`: every one did.
async fn unanswered(workers: &[Handle], within: Duration) -> Option<usize> {
    let probes = workers.iter().map(|worker| tokio::time::timeout(within, worker.spawn(async {})));
    // Late, or failed: a failed probe's runtime has shut down.
    futures_util::future::join_all(probes).await.iter().position(|answer| !matches!(answer, Ok(Ok(()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_runtime_that_runs_tasks_answers_the_probe_and_a_wedged_one_does_not() {
        let worker = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let handle = worker.handle().clone();
        let (wedged_tx, wedged_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            worker.block_on(async {
                // A task that never yields holds the only thread of the runtime.
                started_tx.send(()).unwrap();
                wedged_rx.recv().unwrap();
            })
        });
        started_rx.recv().unwrap();
        let live = Handle::current();
        assert_eq!(unanswered(std::slice::from_ref(&live), Duration::from_secs(10)).await, None);
        assert_eq!(unanswered(&[live, handle], Duration::from_millis(200)).await, Some(1));
        wedged_tx.send(()).unwrap();
        thread.join().unwrap();
    }
}
