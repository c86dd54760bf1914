//! Authentication hardening (issue 14, items 7-9), end to end: the real
//! gateway on a real `redis-server`, keys issued as the CLI issues them.
//!
//! - a flood of well-formed unknown keys from one source is cut off after
//!   its failure budget, and the store sees a bounded number of lookups,
//!   while another source's valid key still passes;
//! - store lookups for uncached keys are capped globally;
//! - a victim's secret presented under another client ID does not make the
//!   victim's own key unknown;
//! - a record that stops decoding is refused after an invalidation, not
//!   served from the stale cache;
//! - after an invalidation of everything, a cached key is served at once and
//!   re-checked in the background while Redis is stalled.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::gateway::{Answer, TestClient, TestGateway, send};
use common::redis::RedisServer;
use common::wait::within;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jiff::Timestamp;
use keygate::config::Config;
use keygate::key::{self, SecretHash};
use keygate::meta::MetaChanges;
use keygate::store::redis::{RedisStore, RedisStoreOptions};
use keygate::store::{Invalidation, SharedStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const PREFIX: &str = "kg_";

/// The attacker's source; the victim's is another loopback address
/// (Linux routes all of 127/8 to lo).
const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn config(redis_url: &str, keys: &str) -> String {
    format!(
        "[store]\nkind = \"redis\"\nurl = \"{redis_url}\"\n\n[keys]\n{keys}\n\n[usage]\nenabled = false\n\n\
         [[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n"
    )
}

async fn store_at(url: &str, options: RedisStoreOptions) -> SharedStore {
    Arc::new(within(5, "connect", RedisStore::connect_with(url, "kg:", options)).await.expect("connect"))
}

async fn gateway(redis_url: &str, keys: &str, options: RedisStoreOptions) -> TestGateway {
    let config =
        Config::from_toml(&config(redis_url, keys), std::path::Path::new(".")).expect("valid config");
    let store = store_at(redis_url, options).await;
    TestGateway::start_with(config, store, tempfile::tempdir().unwrap()).await
}

async fn issue(store: &SharedStore, client: &str) -> (String, SecretHash) {
    let issued = keygate::ops::issue(&**store, PREFIX, client, MetaChanges::default(), Timestamp::now())
        .await
        .expect("issue");
    (issued.key.expose().to_owned(), issued.record.secret_hash)
}

/// An HTTP/1.1 client whose connections come from `source`.
fn client_from(source: IpAddr) -> TestClient {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(source));
    Client::builder(TokioExecutor::new()).build(connector)
}

async fn keyed(client: &TestClient, gateway: &TestGateway, key: &str) -> Answer {
    let request =
        Request::get(gateway.url("/hello")).header("x-api-key", key).body(Full::<Bytes>::default()).unwrap();
    send(client, request).await
}

/// `n` well-formed keys (valid checksum) that no store holds.
fn unknown_keys(n: usize) -> Vec<String> {
    (0..n).map(|_| key::generate(PREFIX, "mallory").unwrap().key.expose().to_owned()).collect()
}

/// Sends every key from `source`, 8 at a time; returns the answers' statuses
/// and how long it took.
async fn flood(gateway: &TestGateway, source: IpAddr, keys: Vec<String>) -> (Vec<Answer>, Duration) {
    let client = client_from(source);
    let started = Instant::now();
    let chunks: Vec<Vec<String>> = keys.chunks(keys.len().div_ceil(8)).map(<[String]>::to_vec).collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let (client, url) = (client.clone(), gateway.url("/hello"));
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for key in chunk {
                let request =
                    Request::get(&url).header("x-api-key", key).body(Full::<Bytes>::default()).unwrap();
                answers.push(send(&client, request).await);
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.extend(within(120, "the flood", task).await.unwrap());
    }
    (answers, started.elapsed())
}

fn count(answers: &[Answer], status: u16) -> usize {
    answers.iter().filter(|a| a.status == status).count()
}

// === Item 7: failed authentications ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_keys_from_one_source_is_cut_off_and_another_source_still_passes() {
    let redis = RedisServer::start();
    let keys = "auth_failures_per_ip = \"20/s\"\nauth_failures_burst = 50\nstore_lookups_per_second = 0";
    let gateway = gateway(&redis.url(), keys, RedisStoreOptions::default()).await;
    let (valid, _) = issue(&gateway.gateway.store, "acme").await;
    let garbage = unknown_keys(5_000);
    redis.reset_stats();

    let (answers, took) = flood(&gateway, ATTACKER, garbage).await;

    // Lookups: the burst, plus what the rate refilled while the flood ran,
    // plus the 8 requests in flight when the burst ran out.
    // A lookup reads the key's and its client's hashes in one pipeline.
    let lookups = redis.command_count("hgetall") / 2;
    let bound = 50 + 20 * took.as_secs_f64().ceil() as u64 + 8;
    assert!(lookups <= bound, "{lookups} Redis lookups for 5,000 unknown keys in {took:?}; bound {bound}");
    assert_eq!(count(&answers, 401) + count(&answers, 429), 5_000);
    assert!(count(&answers, 429) >= 5_000 - bound as usize, "{} refused", count(&answers, 429));
    let refused = answers.iter().find(|a| a.status == 429).expect("some 429");
    assert_eq!(refused.json()["error"], "too_many_auth_failures");
    assert!(refused.headers.contains_key("retry-after"));

    // Another source's valid key is not the attacker's problem.
    let other = keyed(&client_from(OTHER), &gateway, &valid).await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.text());

    let metrics = keygate::metrics::render();
    assert!(metrics.contains("# HELP keygate_auth_failures_refused "), "{metrics}");
    assert!(!metrics.contains("keygate_auth_failures_refused_total 0\n"), "the refusals are counted");
}

#[tokio::test]
async fn a_blocked_source_still_uses_the_keys_the_cache_vouches_for() {
    // One refill an hour: once the burst of 5 failures is spent, the address
    // stays blocked for the whole test, whatever the machine's speed.
    let redis = RedisServer::start();
    let keys = "auth_failures_per_ip = \"1/h\"\nauth_failures_burst = 5\nstore_lookups_per_second = 0";
    let gateway = gateway(&redis.url(), keys, RedisStoreOptions::default()).await;
    let (cached, _) = issue(&gateway.gateway.store, "acme").await;
    let (uncached, _) = issue(&gateway.gateway.store, "acme").await;
    let attacker = client_from(ATTACKER);
    assert_eq!(keyed(&attacker, &gateway, &cached).await.status, 200);
    let (answers, _) = flood(&gateway, ATTACKER, unknown_keys(20)).await;
    // The burst, plus what the flood had in flight (8 at a time) when it ran out.
    let failed = count(&answers, 401);
    assert!((5..=13).contains(&failed), "{failed} verified failures");
    assert_eq!(count(&answers, 429), 20 - failed);

    redis.reset_stats();
    // A neighbour behind the same address keeps its working key...
    assert_eq!(keyed(&attacker, &gateway, &cached).await.status, 200, "cached keys pass");
    // ...and a key that would need the store waits, costing no lookup.
    let waits = keyed(&attacker, &gateway, &uncached).await;
    assert_eq!(waits.status, 429, "{}", waits.text());
    assert_eq!(redis.command_count("hgetall"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_lookups_for_uncached_keys_are_capped_globally_and_cached_keys_pass() {
    let redis = RedisServer::start();
    let keys = "auth_failures_per_ip = \"off\"\nstore_lookups_per_second = 100";
    let gateway = gateway(&redis.url(), keys, RedisStoreOptions::default()).await;
    let (valid, _) = issue(&gateway.gateway.store, "acme").await;
    let other = client_from(OTHER);
    assert_eq!(keyed(&other, &gateway, &valid).await.status, 200, "cached now");
    redis.reset_stats();

    let (answers, took) = flood(&gateway, ATTACKER, unknown_keys(2_000)).await;

    // A lookup reads the key's and its client's hashes in one pipeline.
    let lookups = redis.command_count("hgetall") / 2;
    let bound = 100 + 100 * took.as_secs_f64().ceil() as u64;
    assert!(lookups <= bound, "{lookups} Redis lookups in {took:?}; bound {bound}");
    let busy = answers.iter().find(|a| a.status == 503).expect("some lookups throttled");
    assert_eq!(busy.json()["error"], "store_busy");
    assert!(busy.headers.contains_key("retry-after"));
    assert_eq!(count(&answers, 401) + count(&answers, 503), 2_000);

    assert_eq!(keyed(&other, &gateway, &valid).await.status, 200, "a cached key needs no lookup");
    assert!(keygate::metrics::render().contains("# HELP keygate_store_lookups_throttled "));
}

// === Item 8: the negative cache is per (client, secret hash) ===

/// The key string `client` would have with `secret`: a valid checksum, so
/// it passes the format check and reaches the cache and the store.
fn key_with(client: &str, secret: &str) -> String {
    const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let signed = format!("{PREFIX}{client}_{secret}");
    let mut crc = crc32fast::hash(signed.as_bytes());
    let mut checksum = [b'0'; key::CHECKSUM_LEN];
    for digit in checksum.iter_mut().rev() {
        *digit = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
    format!("{signed}{}", std::str::from_utf8(&checksum).unwrap())
}

#[tokio::test]
async fn a_victims_secret_under_another_client_id_does_not_lock_the_victim_out() {
    let redis = RedisServer::start();
    let gateway = gateway(&redis.url(), "", RedisStoreOptions::default()).await;
    let (victim, _) = issue(&gateway.gateway.store, "victim").await;
    let secret = key::parse(&victim, PREFIX).unwrap().secret.to_owned();
    let forged = key_with("mallory", &secret);
    let client = client_from(ATTACKER);

    assert_eq!(keyed(&client, &gateway, &forged).await.status, 401, "mallory has no such key");
    let answer = keyed(&client_from(OTHER), &gateway, &victim).await;
    assert_eq!(answer.status, 200, "the victim's uncached key: {}", answer.text());

    // And once the victim's entry is cached but due for a re-check, the
    // forged key is refused without disturbing it.
    gateway.gateway.verifier.invalidate(&Invalidation::All);
    redis.reset_stats();
    assert_eq!(keyed(&client, &gateway, &forged).await.status, 401);
    assert_eq!(redis.command_count("hgetall"), 0, "a hash cached for another client needs no lookup");
    assert_eq!(keyed(&client_from(OTHER), &gateway, &victim).await.status, 200);
}

// === Item 9: fail closed on undecodable records; refresh in the background ===

#[tokio::test]
async fn a_record_that_stops_decoding_is_refused_after_an_invalidation() {
    for invalidation in [Invalidation::All, Invalidation::Key(SecretHash([0; 32]))] {
        let redis = RedisServer::start();
        let gateway = gateway(&redis.url(), "", RedisStoreOptions::default()).await;
        let (valid, hash) = issue(&gateway.gateway.store, "acme").await;
        let client = client_from(OTHER);
        assert_eq!(keyed(&client, &gateway, &valid).await.status, 200, "cached");

        let record_key = format!("kg:{{acme}}:key:{}", hash.to_hex());
        let _: i64 = redis.query(redis::cmd("HSET").arg(&record_key).arg("status").arg("disabled"));
        let invalidation = match invalidation {
            Invalidation::Key(_) => Invalidation::Key(hash),
            other => other,
        };
        gateway.gateway.verifier.invalidate(&invalidation);

        if invalidation == Invalidation::All {
            // Served while it is re-checked in the background (one store
            // round trip), then dropped for good.
            let _ = keyed(&client, &gateway, &valid).await;
            within(5, "the refresh to drop the corrupt record", async {
                while gateway.gateway.verifier.cached_len() > 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await; // poll interval
                }
            })
            .await;
        }
        for _ in 0..3 {
            let answer = keyed(&client, &gateway, &valid).await;
            assert_eq!(answer.status, 503, "after {invalidation:?}: {}", answer.text());
            assert_eq!(answer.json()["error"], "key_record_unreadable");
        }
        // A field of the wrong type is the same: refused, not served stale.
        let _: i64 = redis.query(redis::cmd("HSET").arg(&record_key).arg("status").arg("active"));
        assert_eq!(keyed(&client, &gateway, &valid).await.status, 200, "readable again");
        let _: i64 = redis.query(redis::cmd("HSET").arg(&record_key).arg("rate").arg("very fast"));
        gateway.gateway.verifier.invalidate(&Invalidation::Key(hash));
        assert_eq!(keyed(&client, &gateway, &valid).await.status, 503);
    }
}

/// A TCP relay in front of Redis that can hold Redis's replies back (the
/// commands still reach Redis): a store that stalls for as long as a test
/// wants, with no timing guess.
struct StallRelay {
    port: u16,
    stalled: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl StallRelay {
    async fn start(redis_port: u16) -> StallRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stalled, watching) = watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)).await else { continue };
                tokio::spawn(relay(client, server, watching.clone()));
            }
        });
        StallRelay { port, stalled, accept }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn stall(&self, on: bool) {
        self.stalled.send_replace(on);
    }
}

impl Drop for StallRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, mut stalled: watch::Receiver<bool>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let commands = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n @ 1..) = server_read.read(&mut buf).await {
        if stalled.wait_for(|stalled| !*stalled).await.is_err()
            || client_write.write_all(&buf[..n]).await.is_err()
        {
            break;
        }
    }
    commands.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_invalidation_of_everything_cached_keys_do_not_wait_for_a_stalled_store() {
    let redis = RedisServer::start();
    let relay = StallRelay::start(redis.port()).await;
    // Long deadlines: a request that waited for the store would hang for
    // 30 s, far past the 5 s each request below is given.
    let patient = RedisStoreOptions {
        response_timeout: Duration::from_secs(30),
        call_timeout: Duration::from_secs(30),
        ..RedisStoreOptions::default()
    };
    let gateway = gateway(&relay.url(), "", patient).await;
    let (valid, hash) = issue(&gateway.gateway.store, "acme").await;
    let client = client_from(OTHER);
    assert_eq!(keyed(&client, &gateway, &valid).await.status, 200, "cached");

    relay.stall(true);
    redis.reset_stats();
    gateway.gateway.verifier.invalidate(&Invalidation::All);
    for _ in 0..20 {
        let answer = within(5, "a cached key while Redis is stalled", keyed(&client, &gateway, &valid)).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    // One refresh, not one per request: it reached Redis and waits for its reply.
    within(5, "the background refresh to reach Redis", async {
        while redis.command_count("hgetall") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await; // poll interval
        }
    })
    .await;
    assert!(!gateway.gateway.verifier.is_current(&hash), "the refresh has no answer yet");

    relay.stall(false);
    within(5, "the refresh to land", async {
        while !gateway.gateway.verifier.is_current(&hash) {
            tokio::time::sleep(Duration::from_millis(10)).await; // poll interval
        }
    })
    .await;
    assert_eq!(keyed(&client, &gateway, &valid).await.status, 200);
    assert_eq!(
        redis.command_count("hgetall"),
        2,
        "one refresh (key and client) for 21 requests, then cache hits"
    );

    // A revocation still drops the entry at once, stalled store or not.
    relay.stall(true);
    gateway.gateway.verifier.invalidate(&Invalidation::Key(hash));
    assert_eq!(gateway.gateway.verifier.cached_len(), 0);
    relay.stall(false);
}
