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
use keygate::usage::schema::without_writer;
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

/// A usage counter as readers see it: every gateway's field of that name
/// added up (`requests`, `requests@<writer>`, ...).
fn hget(redis: &RedisServer, key: &str, field: &str) -> u64 {
    let all: Vec<(String, u64)> = redis.query(redis::cmd("HGETALL").arg(key));
    sum_field(&all, field)
}

fn sum_field(all: &[(String, u64)], field: &str) -> u64 {
    all.iter().filter(|(name, _)| without_writer(name) == field).map(|(_, value)| value).sum()
}

/// [`hget`]s in one pipeline on one connection (missing fields read as 0).
fn hgets(redis: &RedisServer, fields: &[(String, &str)]) -> Vec<u64> {
    let mut pipe = redis::pipe();
    for (key, _) in fields {
        pipe.cmd("HGETALL").arg(key);
    }
    let hashes: Vec<Vec<(String, u64)>> = pipe.query(&mut redis.connection()).unwrap();
    hashes.iter().zip(fields).map(|(all, (_, field))| sum_field(all, field)).collect()
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
        (report.buckets, report.round_trips),
        (9, 1),
        "a write per client and bucket, all in one round trip"
    );
    let report = flusher.flush_now().await.unwrap();
    assert_eq!((report.commands, report.round_trips), (0, 0), "nothing left");
    let version: u32 = redis.query(redis::cmd("GET").arg("kg:usage:schema"));
    assert_eq!(version, usage::schema::SCHEMA_VERSION);

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
            let fields: Vec<(String, u64)> = redis.query(redis::cmd("HGETALL").arg(&key));
            assert!(fields.iter().all(|(name, _)| name.contains('@')), "one writer's totals: {fields:?}");
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
async fn a_flush_of_many_clients_is_one_hset_per_client_and_bucket_and_exact() {
    let redis = RedisServer::start();
    let recorder = Arc::new(UsageRecorder::new());
    let limits = Limits { round_trip_fields: 2_000 };
    let flusher = flusher(&redis, &recorder, FlushConfig { limits, ..FlushConfig::default() });
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
    assert_eq!(report.buckets, 1500, "{report:?}");
    assert!(report.round_trips > 2, "the flush is spread over round trips: {report:?}");
    // Per client: 3 buckets (HSET + EXPIREAT), last_used, the top-clients
    // score; and the day set's expiry and the schema version once per trip.
    assert_eq!(redis.command_count("hset"), 1500 + 500);
    assert_eq!(redis.command_count("zincrby"), 500);
    assert_eq!(redis.command_count("hincrby") + redis.command_count("multi"), 0);

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

/// Issue 18's usage-at-scale case: 10 000 distinct keys (1 000 clients of 10
/// keys), each used a few times, then ten times as much. Redis's work follows
/// clients and buckets, not keys or requests, and the totals are exact.
#[tokio::test]
async fn ten_thousand_keys_cost_a_few_commands_per_client_whatever_the_requests() {
    let redis = RedisServer::start();
    let recorder = Arc::new(UsageRecorder::new());
    let flusher = flusher(&redis, &recorder, FlushConfig::default());
    let now = Timestamp::now();
    let clients: Vec<String> = (0..1000).map(|i| format!("c{i:04}")).collect();
    let keys: Vec<Vec<String>> =
        clients.iter().map(|c| (0..10).map(|k| format!("{c}.k{k}")).collect()).collect();
    let record = |times: usize| {
        for (client, keys) in clients.iter().zip(&keys) {
            for key in keys {
                for _ in 0..times {
                    recorder.record(&UsageEvent {
                        client: Some(client),
                        key_id: Some(key),
                        ..event(client, now)
                    });
                }
            }
        }
    };

    let total_commands = |redis: &RedisServer| -> u64 {
        let info: String = redis.query(redis::cmd("INFO").arg("commandstats"));
        info.lines()
            .filter(|line| line.starts_with("cmdstat_") && !line.starts_with("cmdstat_info"))
            .filter(|line| !line.starts_with("cmdstat_config"))
            .filter_map(|line| line.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
            .sum()
    };
    redis.reset_stats();
    record(3); // 30 000 requests
    flusher.flush_now().await.unwrap();
    let first = total_commands(&redis);
    // 3 x (HSET + EXPIREAT) + last_used + ZINCRBY per client, plus a few.
    assert!(first <= 1000 * 8 + 50, "{first} commands for 1000 clients");

    redis.reset_stats();
    record(30); // 300 000 more
    flusher.flush_now().await.unwrap();
    let second = total_commands(&redis);
    assert!(second <= 1000 * 5 + 50, "{second} commands: no expiries again, and no more for more requests");
    println!("10k keys: {first} commands for 30k requests, {second} for 300k");

    for (i, (day, top)) in day_and_top(&redis, &clients, now).into_iter().enumerate() {
        assert_eq!((day, top), (330, 330), "{}", clients[i]);
    }
    let key_fields: Vec<(String, &str)> =
        clients.iter().map(|c| (bucket(c, Granularity::Minute, now), "key:k9:requests")).collect();
    assert!(hgets(&redis, &key_fields).iter().all(|n| *n == 33));
}

/// A tick writes every client of a minute that has ended (so a finished
/// minute is complete), and of the open buckets only what the freshness
/// budget allows; the final flush writes the rest.
#[tokio::test]
async fn a_tick_writes_ended_minutes_whole_and_open_buckets_within_the_budget() {
    let redis = RedisServer::start();
    let recorder = Arc::new(UsageRecorder::new());
    let config = FlushConfig {
        fresh_commands: 10,
        fresh_per_mille: 0,
        rollup_interval: Duration::from_secs(3_600),
        ..FlushConfig::default()
    };
    let flusher = flusher(&redis, &recorder, config);
    let now = Timestamp::now();
    let before = now - jiff::SignedDuration::from_mins(5);
    let clients: Vec<String> = (0..100).map(|i| format!("c{i:03}")).collect();
    for client in &clients {
        recorder.record(&event(client, before));
        recorder.record(&event(client, before));
        recorder.record(&event(client, now));
    }

    let report = flusher.flush_tick().await.unwrap();
    let ended: Vec<(String, &str)> =
        clients.iter().map(|c| (bucket(c, Granularity::Minute, before), "requests")).collect();
    assert_eq!(hgets(&redis, &ended), vec![2; 100], "the ended minute is complete");
    let open: Vec<(String, &str)> =
        clients.iter().map(|c| (bucket(c, Granularity::Minute, now), "requests")).collect();
    let fresh = hgets(&redis, &open).iter().filter(|n| **n > 0).count();
    assert!(fresh <= 10, "{fresh} open minutes written on a budget of 10 commands ({report:?})");

    flusher.flush_now().await.unwrap();
    assert_eq!(hgets(&redis, &open), vec![1; 100]);
    let days: Vec<(String, &str)> =
        clients.iter().map(|c| (bucket(c, Granularity::Day, now), "requests")).collect();
    let expected_day = if Granularity::Day.bucket_start(before.as_second())
        == Granularity::Day.bucket_start(now.as_second())
    {
        3
    } else {
        1
    };
    assert_eq!(hgets(&redis, &days), vec![expected_day; 100]);
}

/// Totals are written under the writer's name, so a minute written and
/// dropped from memory that gets a late request adds a field of its own
/// rather than overwriting the first; two gateways' totals add up alike.
#[tokio::test]
async fn late_events_and_other_gateways_add_to_a_written_bucket_instead_of_overwriting_it() {
    let redis = RedisServer::start();
    let recorder = Arc::new(UsageRecorder::new());
    let flusher_a = flusher(&redis, &recorder, FlushConfig::default());
    let other = Arc::new(UsageRecorder::new());
    let flusher_b = flusher(&redis, &other, FlushConfig::default());
    let past = Timestamp::now() - jiff::SignedDuration::from_mins(10);
    let key = bucket("acme", Granularity::Minute, past);

    for _ in 0..5 {
        recorder.record(&event("acme", past));
    }
    flusher_a.flush_tick().await.unwrap(); // ended: written, then dropped
    assert_eq!(hget(&redis, &key, "requests"), 5);
    recorder.record(&event("acme", past));
    flusher_a.flush_now().await.unwrap();
    for _ in 0..7 {
        other.record(&event("acme", past));
    }
    flusher_b.flush_now().await.unwrap();

    assert_eq!(hget(&redis, &key, "requests"), 13);
    let all: Vec<(String, u64)> = redis.query(redis::cmd("HGETALL").arg(&key));
    let writers: std::collections::BTreeSet<&str> =
        all.iter().filter_map(|(name, _)| name.strip_prefix("requests@")).collect();
    assert_eq!(writers.len(), 3, "two generations of one gateway and another gateway: {all:?}");
    let mut conn = usage::connect(&redis.url()).unwrap();
    let query =
        UsageQuery { client: Some("acme".to_owned()), since: past, until: past, by: Granularity::Minute };
    let report = usage::query(&mut conn, PREFIX, &query).await.unwrap();
    assert_eq!(report.totals.requests, 13, "{report:?}");
}

/// A connection that dies mid-flush, after Redis ran some writes but before
/// their replies arrived: everything is written again, and since the
/// hashes hold totals, nothing counts twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_mid_flush_loses_nothing_and_counts_nothing_twice() {
    let mut redis = RedisServer::start();
    let relay = Relay::start(redis.port()).await;
    let recorder = Arc::new(UsageRecorder::new());
    let limits = Limits { round_trip_fields: 500 };
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

    // About 10 bytes of replies per bucket (`:18`, `:1`): the cut falls
    // among the minute buckets, a few round trips in.
    relay.cut_replies_after(1_500);
    assert!(flusher.flush_now().await.is_err(), "the cut fails the flush");
    assert_eq!(relay.cuts(), 1);
    let minutes: Vec<(String, &str)> =
        clients.iter().map(|c| (bucket(c, Granularity::Minute, now), "requests")).collect();
    let written = hgets(&redis, &minutes).iter().filter(|n| **n > 0).count();
    assert!((10..200).contains(&written), "the cut came mid-flush: {written} clients written");

    // Redis restarts (its data saved) while the gateway is cut off.
    redis.shutdown_saving();
    redis.restart();
    flush_until_ok(&flusher).await;

    assert_eq!(hgets(&redis, &minutes), vec![10; 200], "every minute exact");
    let counts = day_and_top(&redis, &clients, now);
    assert!(counts.iter().all(|c| *c == (10, 10)), "{counts:?}");
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
    // 2 clients x (total, key, route) x (minute, hour, day), held whole.
    assert!(stats.flush_errors >= 2 && stats.tracked_series == 18, "{stats:?}");

    redis.restart();
    record_concurrently(&recorder, &["acme", "globex"], 4, 500, now).await;
    flush_until_ok(&flusher).await;

    for client in ["acme", "globex"] {
        assert_eq!(hget(&redis, &bucket(client, Granularity::Minute, now), "requests"), 8000);
        assert_eq!(hget(&redis, &bucket(client, Granularity::Day, now), "bytes_out"), 80_000);
    }
    let stats = flusher.stats();
    assert_eq!((stats.dropped_events, stats.tracked_series), (0, 18), "{stats:?}");
}

#[tokio::test]
async fn a_full_buffer_drops_and_counts() {
    let mut redis = RedisServer::start();
    let recorder = Arc::new(UsageRecorder::new());
    // Room for acme's total, key and 5 routes in its minute, hour and day.
    let flusher = flusher(&redis, &recorder, FlushConfig { max_series: 21, ..FlushConfig::default() });
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
    let per_bucket: Vec<u64> = acme.buckets.iter().map(|b| b.route_requests["/api"]).collect();
    assert_eq!(per_bucket, [1, 5], "a route's requests by bucket, oldest first");
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
