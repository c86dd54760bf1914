//! `keygate serve` under a service manager: the built binary is run with a
//! real `NOTIFY_SOCKET` (a datagram socket this test binds in its temp
//! dir, as systemd's is), and the test reads what it is told: READY once
//! the port answers, RELOADING then READY around each reload, STOPPING at
//! shutdown, and watchdog pings when `WATCHDOG_USEC` asks for them.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::admin::{TOKEN, admin_section};
use common::binary::Served;
use common::gateway::{get, http1_client, send};
use common::wait::within;
use http_body_util::Full;
use tokio::net::UnixDatagram;

/// The service manager's side of `NOTIFY_SOCKET`.
struct Manager {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl Manager {
    fn bind(dir: &Path) -> Manager {
        let path = dir.join("notify.sock");
        Manager { socket: UnixDatagram::bind(&path).unwrap(), path }
    }

    /// The next notification, as its `NAME=value` lines (10 s at most).
    async fn next(&self, what: &str) -> Vec<String> {
        let mut buffer = vec![0; 4096];
        let n = within(10, what, self.socket.recv(&mut buffer)).await.unwrap();
        String::from_utf8(buffer[..n].to_vec()).unwrap().lines().map(str::to_owned).collect()
    }
}

fn config(routes: &[&str]) -> String {
    let mut text = "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n".to_owned();
    for path in routes {
        text += &format!("\n[[route]]\npath = \"{path}\"\nupstream = \"builtin:echo\"\npublic = true\n");
    }
    text + &admin_section()
}

fn value<'a>(message: &'a [String], name: &str) -> Option<&'a str> {
    message.iter().find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
}

#[tokio::test]
async fn ready_after_the_port_answers_reloading_then_ready_around_reloads_and_stopping_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let manager = Manager::bind(dir.path());
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config(&["/old"])).unwrap();
    // Started as the unit starts it: `keygate serve`, the file named by KEYGATE_CONFIG.
    let mut served = Served::start_from_env(&path, &[("NOTIFY_SOCKET", manager.path.to_str().unwrap())]);

    // The first thing the gateway says is READY, and when it says it the
    // port answers (the address is logged before).
    let first = manager.next("READY=1 at start").await;
    assert_eq!(value(&first, "READY"), Some("1"), "{first:?}");
    assert_eq!(value(&first, "STATUS"), Some("serving"), "{first:?}");
    let addr = served.gateway_address();
    let admin = served.address("admin API listening");
    assert_eq!(get(&format!("http://{addr}/old")).await.status, 200);
    let started = served.wait_for_line("keygate starting");
    assert!(started.contains(&format!("config={}", path.display())), "{started}");

    // SIGHUP: RELOADING (with the monotonic clock systemd 253+ requires), then READY.
    std::fs::write(&path, config(&["/old", "/new"])).unwrap();
    served.signal("HUP");
    let reloading = manager.next("RELOADING=1 on SIGHUP").await;
    assert_eq!(value(&reloading, "RELOADING"), Some("1"), "{reloading:?}");
    let usec: u64 = value(&reloading, "MONOTONIC_USEC").expect("MONOTONIC_USEC").parse().unwrap();
    assert!(usec > 0);
    let ready = manager.next("READY=1 after the SIGHUP reload").await;
    assert_eq!(value(&ready, "READY"), Some("1"), "{ready:?}");
    assert!(value(&ready, "STATUS").unwrap().contains("config reloaded (2 routes"), "{ready:?}");
    assert_eq!(get(&format!("http://{addr}/new")).await.status, 200, "READY came after the swap");

    // POST /admin/reload of a broken file: RELOADING, then READY (the old
    // config stays) with a status naming the field, not its value.
    std::fs::write(&path, config(&["/old"]).replace("builtin:echo", "no-such-upstream")).unwrap();
    let request = http::Request::post(format!("http://{admin}/admin/reload"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&http1_client(), request).await.status, 400);
    let reloading = manager.next("RELOADING=1 on /admin/reload").await;
    assert_eq!(value(&reloading, "RELOADING"), Some("1"), "{reloading:?}");
    let refused = manager.next("READY=1 after a refused reload").await;
    assert_eq!(value(&refused, "READY"), Some("1"), "{refused:?}");
    let status = value(&refused, "STATUS").unwrap();
    assert!(status.contains("reload refused: invalid route[0].upstream"), "{status}");
    assert!(!status.contains("no-such-upstream"), "field names only: {status}");
    assert_eq!(get(&format!("http://{addr}/new")).await.status, 200, "the running config stays");

    served.signal("TERM");
    let stopping = manager.next("STOPPING=1 on SIGTERM").await;
    assert_eq!(value(&stopping, "STOPPING"), Some("1"), "{stopping:?}");
    let (status, log) = tokio::task::spawn_blocking(move || served.wait_exit()).await.unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(!log.contains("cannot notify"), "{log}");
}

#[tokio::test]
async fn watchdog_pings_come_at_half_the_interval_systemd_asks_for() {
    let dir = tempfile::tempdir().unwrap();
    let manager = Manager::bind(dir.path());
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config(&["/"])).unwrap();
    // 400 ms asked for: a ping every 200 ms, each after both workers answered.
    let mut served = Served::start(
        &path,
        &[("NOTIFY_SOCKET", manager.path.to_str().unwrap()), ("WATCHDOG_USEC", "400000")],
    );
    let first = manager.next("READY=1").await;
    assert_eq!(value(&first, "READY"), Some("1"), "{first:?}");
    for n in 0..3 {
        let ping = manager.next(&format!("watchdog ping {n}")).await;
        assert_eq!(ping, ["WATCHDOG=1"]);
    }
    // The interval from the gateway's own line, not from arrival times (a
    // loaded test machine delays the receiver, not the pings).
    let line = served.wait_for_line("service manager watchdog: pinging");
    assert!(line.contains("every=200ms") && line.contains("workers=2"), "{line}");
}

#[tokio::test]
async fn without_notify_socket_nothing_is_sent_and_the_gateway_serves() {
    // A socket exists but nobody names it: the gateway must not find it.
    let dir = tempfile::tempdir().unwrap();
    let manager = Manager::bind(dir.path());
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config(&["/"])).unwrap();
    let mut served = Served::start(&path, &[("WATCHDOG_USEC", "100000")]);
    let addr = served.gateway_address();
    assert_eq!(get(&format!("http://{addr}/")).await.status, 200);
    served.signal("TERM");
    let (status, log) = tokio::task::spawn_blocking(move || served.wait_exit()).await.unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    let mut buffer = [0; 64];
    assert!(manager.socket.try_recv(&mut buffer).is_err(), "nothing was sent");
    assert!(!log.contains("service manager watchdog"), "no watchdog without NOTIFY_SOCKET: {log}");
}

/// SIGHUP's and SIGTERM's default action is to kill the process: their
/// handlers must exist by the time READY is sent, since systemd may reload
/// or stop a unit the moment it is ready.
#[tokio::test]
async fn a_reload_and_a_stop_sent_the_moment_ready_arrives_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let manager = Manager::bind(dir.path());
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config(&["/"])).unwrap();
    let served = Served::start(&path, &[("NOTIFY_SOCKET", manager.path.to_str().unwrap())]);
    assert_eq!(value(&manager.next("READY=1").await, "READY"), Some("1"));
    served.signal("HUP");
    assert_eq!(value(&manager.next("RELOADING=1").await, "RELOADING"), Some("1"));
    assert_eq!(value(&manager.next("READY=1 after the reload").await, "READY"), Some("1"));
    served.signal("TERM");
    assert_eq!(value(&manager.next("STOPPING=1").await, "STOPPING"), Some("1"));
    let (status, log) = tokio::task::spawn_blocking(move || served.wait_exit()).await.unwrap();
    assert_eq!(status.code(), Some(0), "drained, not killed by the signal: {log}");
}
