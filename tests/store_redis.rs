//! The Redis store against a real `redis-server` (see `common/redis.rs`).

mod common;

use std::time::Duration;

use common::redis::RedisServer;
use common::wait::{wait_for, within};
use jiff::Timestamp;
use keygate::key::{KeyId, SecretHash};
use keygate::meta::{KeyMeta, KeyStatus};
use keygate::store::redis::{RedisStore, RedisStoreOptions};
use keygate::store::{Invalidation, KeyRecord, KeyStore, StoreError};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;

/// A key as the CLI would issue it: a clear secret (returned, shown once) and
/// the record holding only its hash. Timestamps are whole seconds, which is
/// the precision the Redis layout stores.
fn issue(client: &str, kid: &str) -> (String, KeyRecord) {
    let secret = format!("S3cretPart{client}{kid}xxxxxxxxxxxxxxxxxxxxxxxxxxxx");
    let hash = SecretHash(Sha256::digest(secret.as_bytes()).into());
    let meta = KeyMeta::new(Timestamp::from_second(1_764_000_000).unwrap());
    (secret, KeyRecord { id: KeyId::new(client, kid), secret_hash: hash, meta })
}

async fn connect(redis: &RedisServer) -> RedisStore {
    within(5, "connect", RedisStore::connect(&redis.url(), "kg:")).await.expect("connect to test redis")
}

#[tokio::test]
async fn records_round_trip_through_insert_get_list_and_find() {
    let redis = RedisServer::start();
    let store = connect(&redis).await;

    let (_, mut a2) = issue("acme", "k2");
    a2.meta.scopes = vec!["read".into(), "orders:write".into()];
    a2.meta.rate = Some("100/s".parse().unwrap());
    a2.meta.burst = Some(200.try_into().unwrap());
    a2.meta.quota = Some("10000/day".parse().unwrap());
    a2.meta.expires_at = Some(Timestamp::from_second(1_800_000_000).unwrap());
    a2.meta.label = Some("mobile app, prod".into());
    a2.meta.rotated_at = Some(Timestamp::from_second(1_764_000_100).unwrap());
    let (_, a1) = issue("acme", "k1");
    let (_, b1) = issue("beta-co", "k1");
    for record in [&a2, &a1, &b1] {
        store.insert(record).await.unwrap();
    }

    assert_eq!(store.get(&a2.id).await.unwrap(), Some(a2.clone()), "every field survives");
    assert_eq!(store.get(&"acme.nope".parse().unwrap()).await.unwrap(), None);
    assert_eq!(store.find_by_hash("acme", &a1.secret_hash).await.unwrap(), Some(a1.clone()));
    assert_eq!(store.find_by_hash("beta-co", &a1.secret_hash).await.unwrap(), None, "scoped to the client");
    assert_eq!(store.list(Some("acme")).await.unwrap(), [a1.clone(), a2.clone()], "sorted by id");
    assert_eq!(store.list(None).await.unwrap(), [a1.clone(), a2.clone(), b1.clone()]);
    assert_eq!(store.list(Some("nobody")).await.unwrap(), []);

    let again = store.insert(&a1).await.unwrap_err();
    assert!(matches!(again, StoreError::AlreadyExists(ref id) if *id == a1.id), "{again}");
    store.ping().await.unwrap();
}

#[tokio::test]
async fn the_layout_is_the_documented_one() {
    let redis = RedisServer::start();
    let store = connect(&redis).await;
    let (_, record) = issue("acme", "k1");
    store.insert(&record).await.unwrap();

    let hex = record.secret_hash.to_hex();
    let keys: Vec<String> = redis.dump().into_iter().map(|(key, _)| key).collect();
    let expected = [
        "kg:clients".to_owned(),
        "kg:{acme}:id:k1".into(),
        format!("kg:{{acme}}:key:{hex}"),
        "kg:{acme}:keys".into(),
    ];
    assert_eq!(keys, expected, "sorted");
    let fields: std::collections::HashMap<String, String> =
        redis.query(redis::cmd("HGETALL").arg(format!("kg:{{acme}}:key:{hex}")));
    assert_eq!(fields["id"], "acme.k1");
    assert_eq!(fields["client"], "acme");
    assert_eq!(fields["secret_hash"], hex);
    assert_eq!(fields["scopes"], "read", "the default scope (least privilege)");
    assert_eq!(fields["status"], "active");
    assert_eq!(fields["created_at"], "1764000000");
    assert!(!fields.contains_key("label"), "None fields are absent");
    let pointed: String = redis.query(redis::cmd("GET").arg("kg:{acme}:id:k1"));
    assert_eq!(pointed, hex);
}

#[tokio::test]
async fn verification_is_one_round_trip_and_garbage_costs_none() {
    let redis = RedisServer::start();
    let store = connect(&redis).await;
    let (_, record) = issue("acme", "k1");
    store.insert(&record).await.unwrap();

    redis.reset_stats();
    assert!(store.find_by_hash("acme", &record.secret_hash).await.unwrap().is_some());
    assert!(store.find_by_hash("acme", &SecretHash([0; 32])).await.unwrap().is_none());
    assert_eq!(redis.command_count("hgetall"), 2, "one HGETALL per lookup");
    for other in ["get", "smembers", "exists", "evalsha", "eval", "multi"] {
        assert_eq!(redis.command_count(other), 0, "{other}");
    }

    redis.reset_stats();
    assert!(store.find_by_hash("ac{me}", &record.secret_hash).await.unwrap().is_none());
    assert_eq!(redis.command_count("hgetall"), 0, "an impossible client ID is not looked up");
}

#[tokio::test]
async fn the_clear_secret_never_reaches_redis() {
    let redis = RedisServer::start();
    let store = connect(&redis).await;
    let (secret, mut record) = issue("acme", "k1");
    store.insert(&record).await.unwrap();
    record.meta.label = Some("updated".into());
    store.update(&record).await.unwrap();

    let dump = redis.dump();
    assert!(dump.iter().any(|(_, value)| value.contains(&record.secret_hash.to_hex())), "{dump:?}");
    for (key, value) in &dump {
        assert!(!key.contains(&secret) && !value.contains(&secret), "secret found in {key}: {value}");
    }
}

#[tokio::test]
async fn update_replaces_fields_and_announces_to_other_instances() {
    let redis = RedisServer::start();
    let writer = connect(&redis).await;
    let reader = connect(&redis).await;
    let mut invalidations = reader.subscribe();

    let (_, mut record) = issue("acme", "k1");
    record.meta.label = Some("to be cleared".into());
    writer.insert(&record).await.unwrap();
    wait_for(&mut invalidations, Invalidation::Issued(record.secret_hash)).await;

    record.meta.label = None;
    record.meta.status = KeyStatus::Revoked;
    writer.update(&record).await.unwrap();
    wait_for(&mut invalidations, Invalidation::Key(record.secret_hash)).await;
    assert_eq!(reader.find_by_hash("acme", &record.secret_hash).await.unwrap(), Some(record.clone()));

    let (_, unknown) = issue("acme", "k9");
    assert!(matches!(writer.update(&unknown).await, Err(StoreError::NotFound(_))));
    let mut other_hash = record.clone();
    other_hash.secret_hash = SecretHash([1; 32]);
    assert!(
        matches!(writer.update(&other_hash).await, Err(StoreError::NotFound(_))),
        "an update cannot change a key's hash"
    );
}

#[tokio::test]
async fn operators_can_flush_every_cache_by_publishing_a_star() {
    let redis = RedisServer::start();
    let store = connect(&redis).await;
    let mut invalidations = store.subscribe();
    let _: i64 = redis.query(redis::cmd("PUBLISH").arg("kg:invalidate").arg("*"));
    wait_for(&mut invalidations, Invalidation::All).await;
}

#[tokio::test]
async fn an_outage_fails_calls_fast_then_everything_recovers() {
    let mut redis = RedisServer::start();
    let store = connect(&redis).await;
    let mut invalidations = store.subscribe();
    let (_, record) = issue("acme", "k1");
    store.insert(&record).await.unwrap();
    wait_for(&mut invalidations, Invalidation::Issued(record.secret_hash)).await;

    redis.stop();
    let down = within(5, "a failing lookup", store.find_by_hash("acme", &record.secret_hash)).await;
    assert!(matches!(down, Err(StoreError::Unavailable(_))), "{down:?}");
    let down = within(5, "a failing ping", store.ping()).await;
    assert!(matches!(down, Err(StoreError::Unavailable(_))), "{down:?}");

    redis.restart();
    within(15, "ping to recover", async {
        while store.ping().await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await; // retry pace, bounded by `within`
        }
    })
    .await;
    // The pub/sub task resubscribed and says everything may have changed.
    wait_for(&mut invalidations, Invalidation::All).await;

    // The restarted Redis is empty (no persistence); the store works again.
    assert_eq!(store.find_by_hash("acme", &record.secret_hash).await.unwrap(), None);
    store.insert(&record).await.unwrap();
    wait_for(&mut invalidations, Invalidation::Issued(record.secret_hash)).await;
}

#[tokio::test]
async fn a_malformed_record_is_corrupt_naming_key_and_field() {
    let redis = RedisServer::start();
    let store = connect(&redis).await;
    let (_, record) = issue("acme", "k1");
    store.insert(&record).await.unwrap();
    let record_key = format!("kg:{{acme}}:key:{}", record.secret_hash.to_hex());
    let _: i64 = redis.query(redis::cmd("HSET").arg(&record_key).arg("rate").arg("very fast"));

    let err = store.find_by_hash("acme", &record.secret_hash).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{text}");
    assert!(text.contains(&record_key) && text.contains("field `rate`"), "{text}");

    let _: () = redis.query(redis::cmd("SET").arg(&record_key).arg("not a hash"));
    let err = store.find_by_hash("acme", &record.secret_hash).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { ref what, .. } if what.contains(&record_key)), "{err}");
}

#[tokio::test]
async fn errors_never_show_the_url_password() {
    let redis = RedisServer::start();
    // This Redis has no password, so AUTH fails.
    let url = format!("redis://:hunter2-Sup3r@127.0.0.1:{}/", redis.port());
    let err = within(5, "connect", RedisStore::connect(&url, "kg:")).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)));
    assert!(!format!("{err} {err:?}").contains("hunter2-Sup3r"), "{err:?}");

    let mut gone = RedisServer::start();
    gone.stop();
    let url = format!("redis://user:hunter2-Sup3r@127.0.0.1:{}/", gone.port());
    let err = within(5, "connect", RedisStore::connect(&url, "kg:")).await.unwrap_err();
    assert!(!format!("{err} {err:?}").contains("hunter2-Sup3r"), "{err:?}");
    assert!(format!("{err}").contains(&format!("127.0.0.1:{}", gone.port())), "names where: {err}");
}

#[tokio::test]
async fn the_subscription_is_pinged_without_being_torn_down() {
    let redis = RedisServer::start();
    let options = RedisStoreOptions { pubsub_ping_interval: Duration::from_millis(20), ..Default::default() };
    let store = within(5, "connect", RedisStore::connect_with(&redis.url(), "kg:", options)).await.unwrap();
    let mut invalidations = store.subscribe();
    redis.reset_stats();
    within(5, "three pings on the subscribed connection", async {
        while redis.command_count("ping") < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await; // poll pace, bounded by `within`
        }
    })
    .await;
    assert_eq!(redis.command_count("subscribe"), 0, "no resubscription");
    assert!(invalidations.try_recv().is_err(), "no reconnect, so no Invalidation::All");
}

#[tokio::test]
async fn dropping_the_store_ends_its_subscription() {
    let redis = RedisServer::start();
    let store = connect(&redis).await;
    let mut invalidations = store.subscribe();
    drop(store);
    within(5, "the channel to close", async {
        loop {
            match invalidations.recv().await {
                Err(broadcast::error::RecvError::Closed) => return,
                _ => continue,
            }
        }
    })
    .await;
}
