//! Usage tracking against a real Redis: counts recorded from many tasks reach
//! Redis exactly once, survive a Redis outage, and are read back by
//! `query()`, `keygate usage` and `last_used()`; the audit trail is appended
//! in order and capped.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis::RedisServer;
use common::relay::Relay;
use jiff::Timestamp;
use keygate::usage::{
    self, FlushConfig, Granularity, Limits, UsageEvent, UsageFlusher, UsageQuery, UsageRecorder,
};

const PREFIX: &str = "kg:";

fn event(client: &str, at: Timestamp) -> UsageEvent<'_> {
    UsageEvent {
        client: Some(client),
        key_id: Some("k1"),
        route: "/api",
        status: 200,
        refusal: None,
        bytes_in: 3,
        bytes_out: 10,
        credits: 0,
        upstream_latency: Some(Duration::from_micros(100)),
        tunnel: None,
        at,
    }
}

fn flusher(redis: &RedisServer, recorder: &Arc<UsageRecorder>, config: FlushConfig) -> Arc<UsageFlusher> {
    let conn = usage::connect(&redis.url()).unwrap();
    UsageFlusher::new(Arc::clone(recorder), conn, PREFIX, config)
}

/// Records `per_task` events for each client from `tasks` tasks per client,
/// on the runtime's worker threads at once.
async fn record_concurrently(
    recorder: &Arc<UsageRecorder>,
    clients: &[&'static str],
    tasks: usize,
    per_task: u64,
    at: Timestamp,
) {
    let mut handles = Vec::new();
    for &client in clients {
        for _ in 0..tasks {
            let recorder = Arc::clone(recorder);
            handles.push(tokio::spawn(async move {
                for i in 0..per_task {
                    recorder.record(&event(client, at));
                    if i % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
    }
    for handle in handles {
        handle.await.unwrap();
    }
}

fn bucket(client: &str, by: Granularity, at: Timestamp) -> String {
    format!("{PREFIX}{{{client}}}:usage:{by}:{}", by.label(by.bucket_start(at.as_second())))
}

fn hget(redis: &RedisServer, key: &str, field: &str) -> u64 {
    redis.query::<Option<u64>>(redis::cmd("HGET").arg(key).arg(field)).unwrap_or(0)
}

/// `HGET`s in one pipeline on one connection (missing fields read as 0).
fn hgets(redis: &RedisServer, fields: &[(String, &str)]) -> Vec<u64> {
    let mut pipe = redis::pipe();
    for (key, field) in fields {
        pipe.cmd("HGET").arg(key).arg(*field);
    }
    let values: Vec<Option<u64>> = pipe.query(&mut redis.connection()).unwrap();
    values.into_iter().map(|v| v.unwrap_or(0)).collect()
}

/// Every client's day requests and top-clients score, in `clients` order.
fn day_and_top(redis: &RedisServer, clients: &[String], at: Timestamp) -> Vec<(u64, u64)> {
    let fields: Vec<(String, &str)> =
        clients.iter().map(|c| (bucket(c, Granularity::Day, at), "requests")).collect();
    let days = hgets(redis, &fields);
    let top_key = format!(
        "{PREFIX}usage:top:{}",
        Granularity::Day.label(Granularity::Day.bucket_start(at.as_second()))
    );
    let mut pipe = redis::pipe();
    for client in clients {
        pipe.cmd("ZSCORE").arg(&top_key).arg(client);
    }
    let scores: Vec<Option<u64>> = pipe.query(&mut redis.connection()).unwrap();
    days.into_iter().zip(scores.into_iter().map(|s| s.unwrap_or(0))).collect()
}

/// Retries `flush_now` until it succeeds: right after Redis returns, the
/// connection manager may still be reconnecting.
async fn flush_until_ok(flusher: &UsageFlusher) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match flusher.flush_now().await {
            Ok(_) => return,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("flush never succeeded: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await, // retry poll, bounded
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_events_reach_redis_exactly_once() {
    let redis = RedisServer::start();
    let recorder = Arc::new(UsageRecorder::new());
    let flusher = flusher(&redis, &recorder, FlushConfig::default());
    let now = Timestamp::now();

    // 3 clients x 8 tasks x 1000 events, flushed twice midway and once at the end.
    record_concurrently(&recorder, &["acme", "globex", "initech"], 4, 1000, now).await;
    flusher.flush_now().await.unwrap();
    record_concurrently(&recorder, &["acme", "globex", "initech"], 4, 1000, now).await;
    let report = flusher.flush_now().await.unwrap();
    assert_eq!(
        (report.transactions, report.round_trips),
        (3, 2),
        "a transaction per client; top-clients apart"
    );
    assert_eq!(flusher.flush_now().await.unwrap().series, 0, "nothing left");

    for client in ["acme", "globex", "initech"] {
        for by in Granularity::ALL {
            let key = bucket(client, by, now);
            assert_eq!(hget(&redis, &key, "requests"), 8000, "{key}");
            assert_eq!(hget(&redis, &key, "status_2xx"), 8000, "{key}");
            assert_eq!(hget(&redis, &key, "bytes_in"), 24_000, "{key}");
            assert_eq!(hget(&redis, &key, "bytes_out"), 80_000, "{key}");
            assert_eq!(hget(&redis, &key, "upstream_latency_us"), 800_000, "{key}");
            assert_eq!(hget(&redis, &key, "key:k1:requests"), 8000, "{key}");
            assert_eq!(hget(&redis, &key, "route:/api:requests"), 8000, "{key}");
            assert_eq!(hget(&redis, &key, "status_5xx"), 0, "zero counters are not written");
            let ttl: i64 = redis.query(redis::cmd("TTL").arg(&key));
            let keep = by.seconds() + FlushConfig::default().retention.of(by).as_secs() as i64;
            assert!(ttl > 0 && ttl <= keep, "{key} TTL {ttl}");
        }
        let last: i64 = redis.query(redis::cmd("HGET").arg(format!("kg:{{{client}}}:last_used")).arg("k1"));
        assert_eq!(last, now.as_second());
    }
    let day = Granularity::Day.label(Granularity::Day.bucket_start(now.as_second()));
    let top: Vec<(String, u64)> = redis
        .query(redis::cmd("ZREVRANGE").arg(format!("kg:usage:top:{day}")).arg(0).arg(-1).arg("WITHSCORES"));
    assert_eq!(top.len(), 3);
    assert!(top.iter().all(|(_, score)| *score == 8000), "{top:?}");

    let id = "acme.k1".parse().unwrap();
    let mut conn = usage::connect(&redis.url()).unwrap();
    assert_eq!(
        usage::last_used(&mut conn, PREFIX, &id).await.unwrap(),
        Some(Timestamp::from_second(now.as_second()).unwrap())
    );
    assert_eq!(usage::last_used(&mut conn, PREFIX, &"acme.never".parse().unwrap()).await.unwrap(), None);
    assert_eq!(flusher.stats().dropped_events, 0);
}

#[tokio::test]
async fn a_flush_of_many_clients_is_one_transaction_per_client_and_exact() {
    let redis = RedisServer::start();
    let recorder = Arc::new(UsageRecorder::new());
    let flusher = flusher(&redis, &recorder, FlushConfig::default());
    let now = Timestamp::now();
    // 500 clients, 1 to 7 requests each over two keys.
    let clients: Vec<String> = (0..500).map(|i| format!("client-{i:03}")).collect();
    let expected = |i: usize| (i % 7 + 1) as u64;
    for (i, client) in clients.iter().enumerate() {
        for n in 0..expected(i) {
            let key = format!("{client}.k{}", n % 2);
            recorder.record(&UsageEvent { client: Some(client), key_id: Some(&key), ..event(client, now) });
        }
    }

    redis.reset_stats();
    let report = flusher.flush_now().await.unwrap();
    assert_eq!((report.series, report.transactions), (500 + 428, 500), "{report:?}");
    assert!(report.round_trips > 2, "the flush is spread over round trips: {report:?}");
    // One EXEC per client and one for the day's top-clients set: no
    // transaction holds Redis for the whole flush.
    assert_eq!((redis.command_count("multi"), redis.command_count("exec")), (501, 501));

    for (i, (day, top)) in day_and_top(&redis, &clients, now).into_iter().enumerate() {
        assert_eq!((day, top), (expected(i), expected(i)), "{}", clients[i]);
    }
    let fields: Vec<(String, &str)> = clients
        .iter()
        .flat_map(|c| {
            [
                (bucket(c, Granularity::Minute, now), "key:k0:requests"),
                (bucket(c, Granularity::Hour, now), "key:k1:bytes_out"),
            ]
        })
        .collect();
    let values = hgets(&redis, &fields);
    for (i, pair) in values.chunks(2).enumerate() {
        let (k0, k1) = (expected(i).div_ceil(2), expected(i) / 2);
        assert_eq!(pair, [k0, k1 * 10], "{}", clients[i]);
    }
}

#[tokio::test]
async fn a_client_too_large_for_one_transaction_is_split_and_exact() {
    let redis = RedisServer::start();
    let recorder = Arc::new(UsageRecorder::new());
    // A series here costs 55 increments (6 counters x 3 dimensions x 3
    // buckets, and last_used): two do not fit in 100.
    let limits = Limits { transaction_increments: 100, round_trip_increments: 400 };
    let flusher = flusher(&redis, &recorder, FlushConfig { limits, ..FlushConfig::default() });
    let now = Timestamp::now();
    let keys: Vec<String> = (0..50).map(|i| format!("big.k{i:02}")).collect();
    for key in &keys {
        for _ in 0..3 {
            recorder.record(&UsageEvent { client: Some("big"), key_id: Some(key), ..event("big", now) });
        }
    }

    let report = flusher.flush_now().await.unwrap();
    assert_eq!((report.series, report.transactions), (50, 50), "{report:?}");
    for by in Granularity::ALL {
        assert_eq!(hget(&redis, &bucket("big", by, now), "requests"), 150, "{by}");
        assert_eq!(hget(&redis, &bucket("big", by, now), "key:k49:requests"), 3, "{by}");
    }
    assert_eq!(day_and_top(&redis, &["big".to_owned()], now), [(150, 150)]);
}

/// The one way to count twice: Redis ran a round trip's transactions but
/// the connection died before their replies arrived, so they are retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_mid_flush_loses_nothing_and_double_counts_one_round_trip_at_most() {
    let mut redis = RedisServer::start();
    let relay = Relay::start(redis.port()).await;
    let recorder = Arc::new(UsageRecorder::new());
    // Each client below is one transaction of 55 increments: 10 clients per
    // round trip (9 fill 495 of the 500, the 10th passes it).
    let limits = Limits { transaction_increments: 2_048, round_trip_increments: 500 };
    let conn = usage::connect(&relay.url()).unwrap();
    let flusher = UsageFlusher::new(
        Arc::clone(&recorder),
        conn,
        PREFIX,
        FlushConfig { limits, ..FlushConfig::default() },
    );
    let now = Timestamp::now();
    let clients: Vec<String> = (0..200).map(|i| format!("client-{i:03}")).collect();
    for client in &clients {
        for _ in 0..10 {
            recorder.record(&UsageEvent { client: Some(client), key_id: Some("k1"), ..event(client, now) });
        }
    }

    // About 1 KiB of replies per client: the cut falls in the third round trip.
    relay.cut_replies_after(25_000);
    assert!(flusher.flush_now().await.is_err(), "the cut fails the flush");
    assert_eq!(relay.cuts(), 1);
    let written = day_and_top(&redis, &clients, now).iter().filter(|(day, _)| *day > 0).count();
    assert!((10..200).contains(&written), "the cut came mid-flush: {written} clients written");

    // Redis restarts (its data saved) while the gateway is cut off.
    redis.shutdown_saving();
    redis.restart();
    flush_until_ok(&flusher).await;

    let counts = day_and_top(&redis, &clients, now);
    assert!(counts.iter().all(|(day, top)| [10, 20].contains(day) && [10, 20].contains(top)), "{counts:?}");
    let doubled = counts.iter().filter(|(day, _)| *day == 20).count();
    assert!(doubled <= 10, "at most the round trip in flight counts twice: {doubled} clients did");
    assert_eq!(flusher.stats().dropped_events, 0);
}

/// Tests that spawn a flusher thread hold this while it lives. The thread is
/// found by its name in `/proc/self/task`, and `cargo test` runs this file's
/// tests as threads of one process: another test's flusher thread would
/// otherwise answer for this one's.
static FLUSHER_THREAD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The flusher and its Redis connection live on a thread of their own: no
/// task lands on the runtime that spawned them (in the gateway, the control
/// runtime, which drives key lookups), and they flush while that runtime is
/// blocked and cannot poll anything.
#[tokio::test(flavor = "current_thread")]
async fn the_flusher_flushes_on_its_own_thread_while_the_callers_runtime_is_blocked() {
    let _only_flusher_thread = FLUSHER_THREAD.lock().await;
    let redis = RedisServer::start();
    let recorder = Arc::new(UsageRecorder::new());
    let config = FlushConfig { interval: Duration::from_millis(20), ..FlushConfig::default() };
    let flusher = flusher(&redis, &recorder, config);
    let callers_tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let before = callers_tasks();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = flusher.spawn(async move {
        let _ = stopped.await;
    });
    assert_eq!(callers_tasks(), before, "spawn put a task on the caller's runtime");
    let now = Timestamp::now();
    let key = bucket("acme", Granularity::Minute, now);
    recorder.record(&event("acme", now));

    // This blocks the test's only runtime thread: nothing spawned on it can
    // run until the loop ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while hget(&redis, &key, "requests") != 1 {
        assert!(std::time::Instant::now() < deadline, "no flush while the caller's runtime was blocked");
        std::thread::sleep(Duration::from_millis(10)); // polling a condition, bounded
    }
    assert!(thread_names().iter().any(|name| name == "keygate-usage"), "{:?}", thread_names());

    stop.send(()).unwrap();
    task.join().await.unwrap();
    // Joined, so the thread has run to its end; the kernel wakes the joiner
    // a moment before it drops the thread's `/proc` entry.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while thread_names().iter().any(|name| name == "keygate-usage") {
        assert!(std::time::Instant::now() < deadline, "the thread ends with the flusher");
        std::thread::sleep(Duration::from_millis(1)); // polling a condition, bounded
    }
}

/// The names of this process's threads (Linux).
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_outage_loses_nothing() {
    let mut redis = RedisServer::start();
    let recorder = Arc::new(UsageRecorder::new());
    let flusher = flusher(&redis, &recorder, FlushConfig::default());
    let now = Timestamp::now();

    record_concurrently(&recorder, &["acme", "globex"], 4, 500, now).await;
    flusher.flush_now().await.unwrap();
    // Persist what was flushed so far: the restarted server loads it back.
    let _: String = redis.query(&mut redis::cmd("SAVE"));
    redis.stop();

    record_concurrently(&recorder, &["acme", "globex"], 4, 500, now).await;
    assert!(flusher.flush_now().await.is_err(), "Redis is down");
    record_concurrently(&recorder, &["acme", "globex"], 4, 500, now).await;
    assert!(flusher.flush_now().await.is_err(), "Redis is still down");
    let stats = flusher.stats();
    assert!(stats.flush_errors >= 2 && stats.pending_series == 2, "{stats:?}");

    redis.restart();
    record_concurrently(&recorder, &["acme", "globex"], 4, 500, now).await;
    flush_until_ok(&flusher).await;

    for client in ["acme", "globex"] {
        assert_eq!(hget(&redis, &bucket(client, Granularity::Minute, now), "requests"), 8000);
        assert_eq!(hget(&redis, &bucket(client, Granularity::Day, now), "bytes_out"), 80_000);
    }
    let stats = flusher.stats();
    assert_eq!((stats.dropped_events, stats.pending_series), (0, 0), "{stats:?}");
}

#[tokio::test]
async fn a_full_buffer_drops_and_counts() {
    let mut redis = RedisServer::start();
    let recorder = Arc::new(UsageRecorder::new());
    let flusher = flusher(&redis, &recorder, FlushConfig { max_series: 5, ..FlushConfig::default() });
    let now = Timestamp::now();
    redis.stop();

    let routes: Vec<String> = (0..10).map(|i| format!("/r{i}")).collect();
    for route in &routes[..5] {
        recorder.record(&UsageEvent { route, ..event("acme", now) });
    }
    assert!(flusher.flush_now().await.is_err());
    // Known series still count; new ones no longer fit.
    recorder.record(&UsageEvent { route: &routes[0], ..event("acme", now) });
    for route in &routes[5..] {
        recorder.record(&UsageEvent { route, ..event("acme", now) });
        recorder.record(&UsageEvent { route, ..event("acme", now) });
    }
    assert!(flusher.flush_now().await.is_err());
    assert_eq!(flusher.dropped_events(), 10);

    redis.restart();
    flush_until_ok(&flusher).await;
    assert_eq!(hget(&redis, &bucket("acme", Granularity::Hour, now), "requests"), 6);
    assert_eq!(hget(&redis, &bucket("acme", Granularity::Hour, now), "route:/r0:requests"), 2);
}

#[tokio::test]
async fn the_spawned_flusher_flushes_on_ticks_and_at_shutdown() {
    let _only_flusher_thread = FLUSHER_THREAD.lock().await;
    let redis = RedisServer::start();
    let recorder = Arc::new(UsageRecorder::new());
    let config = FlushConfig { interval: Duration::from_millis(20), ..FlushConfig::default() };
    let flusher = flusher(&redis, &recorder, config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = flusher.spawn(async move {
        let _ = stopped.await;
    });
    let now = Timestamp::now();
    let key = bucket("acme", Granularity::Minute, now);

    recorder.record(&event("acme", now));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while hget(&redis, &key, "requests") != 1 {
        assert!(std::time::Instant::now() < deadline, "a tick never flushed");
        tokio::time::sleep(Duration::from_millis(10)).await; // polling a condition, bounded
    }

    for _ in 0..99 {
        recorder.record(&event("acme", now));
    }
    stop.send(()).unwrap();
    task.join().await.unwrap();
    assert_eq!(hget(&redis, &key, "requests"), 100, "the final flush wrote the rest");
}

#[tokio::test]
async fn query_reads_buckets_clients_keys_and_routes() {
    let redis = RedisServer::start();
    let recorder = Arc::new(UsageRecorder::new());
    let flusher = flusher(&redis, &recorder, FlushConfig::default());
    let now = Timestamp::now();
    let earlier = now - jiff::SignedDuration::from_hours(2);
    for _ in 0..5 {
        recorder.record(&event("acme", now));
    }
    recorder.record(&event("acme", earlier));
    recorder.record(&UsageEvent { key_id: Some("globex.k9"), status: 503, ..event("globex", now) });
    recorder.record(&UsageEvent {
        client: None,
        key_id: None,
        status: 401,
        refusal: Some(usage::Refusal::Unauthorized),
        upstream_latency: None,
        tunnel: None,
        ..event("x", now)
    });
    flusher.flush_now().await.unwrap();

    let mut conn = usage::connect(&redis.url()).unwrap();
    let q = |client: Option<&str>, since: Timestamp, by| UsageQuery {
        client: client.map(str::to_owned),
        since,
        until: now,
        by,
    };
    let day_ago = now - jiff::SignedDuration::from_hours(24);
    let report = usage::query(&mut conn, PREFIX, &q(None, day_ago, Granularity::Hour)).await.unwrap();
    assert_eq!(report.totals.requests, 8);
    assert_eq!(report.totals.refused_401, 1);
    let names: Vec<&str> = report.clients.iter().map(|c| c.client.as_str()).collect();
    assert_eq!(names, ["acme", "_anonymous", "globex"], "most requests first");
    let acme = &report.clients[0];
    assert_eq!(acme.buckets.len(), 2, "two hours with usage");
    assert_eq!(acme.keys["acme.k1"].requests, 6);
    assert_eq!(acme.routes["/api"].bytes_out, 60);
    assert_eq!(report.clients[2].totals.status_5xx, 1);

    let since = now - jiff::SignedDuration::from_mins(30);
    let report = usage::query(&mut conn, PREFIX, &q(Some("acme"), since, Granularity::Minute)).await.unwrap();
    assert_eq!((report.totals.requests, report.clients.len()), (5, 1));

    let far = now - jiff::SignedDuration::from_hours(24 * 60);
    let err = usage::query(&mut conn, PREFIX, &q(None, far, Granularity::Minute)).await.unwrap_err();
    assert!(err.to_string().contains("coarser --by"), "{err}");
}

/// Runs the `keygate` binary against `redis` from an empty folder (no
/// `gateway.toml`), returning stdout; fails the test on a non-zero exit.
fn keygate(redis: &RedisServer, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(args)
        .args(["--redis", &redis.url()])
        .current_dir(dir.path())
        .env_remove("KEYGATE_REDIS_URL")
        .env("USER", "alice")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "keygate {args:?}: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test]
async fn keygate_usage_prints_totals_by_bucket_and_client() {
    let redis = RedisServer::start();
    let recorder = Arc::new(UsageRecorder::new());
    let flusher = flusher(&redis, &recorder, FlushConfig::default());
    let now = Timestamp::now();
    let three_hours_ago = now - jiff::SignedDuration::from_hours(3);
    for _ in 0..4 {
        recorder.record(&event("acme", now));
    }
    recorder.record(&event("acme", three_hours_ago));
    recorder.record(&UsageEvent { key_id: Some("globex.k2"), status: 404, ..event("globex", now) });
    flusher.flush_now().await.unwrap();

    let report = json(&keygate(&redis, &["usage", "--json"]));
    assert_eq!(report["totals"]["requests"], 6);
    assert_eq!(report["totals"]["status_4xx"], 1);
    assert_eq!(report["by"], "hour");
    assert_eq!(report["clients"][0]["client"], "acme");
    assert_eq!(report["clients"][0]["buckets"].as_array().unwrap().len(), 2);
    assert_eq!(report["clients"][0]["keys"]["acme.k1"]["requests"], 5);

    let report = json(&keygate(&redis, &["usage", "--json", "--since", "1h", "--by", "minute"]));
    assert_eq!(report["totals"]["requests"], 5, "the event 3 hours ago is out of range");
    assert_eq!(report["by"], "minute");

    let report = json(&keygate(&redis, &["usage", "--json", "--client", "globex", "--by", "day"]));
    assert_eq!(report["totals"]["requests"], 1);
    assert_eq!(report["clients"].as_array().unwrap().len(), 1);

    let date = now.to_zoned(jiff::tz::TimeZone::UTC).date().to_string();
    let report = json(&keygate(&redis, &["usage", "--json", "--since", &date, "--by", "day"]));
    let expected =
        if three_hours_ago.to_zoned(jiff::tz::TimeZone::UTC).date().to_string() == date { 6 } else { 5 };
    assert_eq!(report["totals"]["requests"], expected, "since midnight UTC");

    let table = keygate(&redis, &["usage", "--client", "acme"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("BUCKET") && lines[0].contains("REQUESTS"), "{table}");
    assert_eq!(lines.len(), 4, "header, two hours, total: {table}");
    assert!(lines[3].starts_with("TOTAL") && lines[3].split_whitespace().nth(2) == Some("5"), "{table}");
}

#[tokio::test]
async fn key_operations_are_audited_and_listed_in_order() {
    let redis = RedisServer::start();
    let key = keygate(&redis, &["keys", "issue", "--client", "acme", "--rate", "5/s"]);
    let listed = json(&keygate(&redis, &["keys", "list", "--json"]));
    let id = listed[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(listed[0]["last_used"], serde_json::Value::Null, "never used yet");
    keygate(&redis, &["keys", "update", &id, "--label", "ci"]);
    let new_key = keygate(&redis, &["keys", "rotate", &id, "--grace", "1h"]);
    keygate(&redis, &["keys", "revoke", &id]);
    keygate(&redis, &["keys", "issue", "--client", "globex"]);

    let trail = json(&keygate(&redis, &["keys", "audit", "--json", "--client", "acme"]));
    let actions: Vec<&str> =
        trail.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["issue", "update", "rotate", "revoke"]);
    assert!(
        trail.as_array().unwrap().iter().all(|e| e["actor"] == "cli:alice" && e["key_id"] == id.as_str())
    );
    assert!(trail[2]["detail"].as_str().unwrap().starts_with("new key acme."), "{trail}");
    let all = json(&keygate(&redis, &["keys", "audit", "--json"]));
    assert_eq!(all.as_array().unwrap().len(), 5);
    assert_eq!(all[4]["key_id"].as_str().unwrap().split('.').next(), Some("globex"));

    let table = keygate(&redis, &["keys", "audit"]);
    assert_eq!(table.lines().count(), 6, "a header and five entries: {table}");
    assert!(table.starts_with("AT "), "{table}");
    // No key string reaches the trail.
    let dump = format!("{:?}", redis.dump());
    for secret in [key.trim(), new_key.trim()] {
        assert!(!dump.contains(secret));
    }

    // last_used as `keys show` prints it, once usage was flushed for the key.
    let recorder = Arc::new(UsageRecorder::new());
    let flusher = flusher(&redis, &recorder, FlushConfig::default());
    let now = Timestamp::now();
    recorder.record(&UsageEvent { key_id: Some(&id), ..event("acme", now) });
    flusher.flush_now().await.unwrap();
    let shown = json(&keygate(&redis, &["keys", "show", &id, "--json"]));
    assert_eq!(shown["last_used"], Timestamp::from_second(now.as_second()).unwrap().to_string());
    let table = keygate(&redis, &["keys", "list"]);
    assert!(table.lines().next().unwrap().contains("LAST_USED"), "{table}");
}

#[tokio::test]
async fn the_audit_stream_is_capped() {
    let redis = RedisServer::start();
    let conn = usage::connect(&redis.url()).unwrap();
    let id = "acme.k1".parse().unwrap();
    let entry = |n: usize| {
        usage::AuditEntry::key(
            "cli:test".into(),
            usage::AuditAction::Update,
            &id,
            Timestamp::now(),
            format!("#{n}"),
        )
    };
    let total = usage::audit::AUDIT_MAX_LEN + 2_000;
    for chunk in (0..total).collect::<Vec<_>>().chunks(500) {
        let appends = chunk.iter().map(|&n| {
            let mut conn = conn.clone();
            async move { usage::append_audit(&mut conn, PREFIX, &entry(n)).await.unwrap() }
        });
        futures_util::future::join_all(appends).await;
    }
    // Concurrent appends may land in any order; the last three go one by one
    // so "latest" has a defined answer.
    let total = total + 3;
    for n in total - 3..total {
        usage::append_audit(&mut conn.clone(), PREFIX, &entry(n)).await.unwrap();
    }
    let len: usize = redis.query(redis::cmd("XLEN").arg("kg:audit"));
    assert!((usage::audit::AUDIT_MAX_LEN..usage::audit::AUDIT_MAX_LEN + 200).contains(&len), "XLEN {len}");

    let latest = usage::read_audit(&mut conn.clone(), PREFIX, None, 3).await.unwrap();
    let details: Vec<&str> = latest.iter().map(|r| r.entry.detail.as_str()).collect();
    let last = total - 1;
    assert_eq!(details, [format!("#{}", last - 2), format!("#{}", last - 1), format!("#{last}")]);
}
