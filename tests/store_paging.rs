//! Page reads of keys and clients (`KeyStore::list_page`,
//! `KeyStore::list_clients_page`) on the file store, a real Redis and a real
//! Redis Cluster: ID order, walks that never repeat or skip a record while
//! others are added between pages, and the Redis store's bounded number of
//! round trips, counted by a relay in front of the test Redis.

mod common;

use std::collections::BTreeSet;

use common::cluster::RedisCluster;
use common::redis::RedisServer;
use common::relay::Relay;
use common::wait::within;
use jiff::Timestamp;
use keygate::client::{ClientMeta, ClientRecord};
use keygate::key::{KeyId, SecretHash};
use keygate::meta::{KeyMeta, KeyStatus};
use keygate::redis_target::Endpoint;
use keygate::store::file::FileStore;
use keygate::store::redis::{RedisStore, RedisStoreOptions};
use keygate::store::{KeyRecord, KeyStore};
use sha2::{Digest, Sha256};

fn now() -> Timestamp {
    Timestamp::from_second(1_764_000_000).unwrap()
}

fn key(client: &str, kid: &str) -> KeyRecord {
    let secret = format!("S3cretPart{client}{kid}xxxxxxxxxxxxxxxxxxxxxxxxxxxx");
    let hash = SecretHash(Sha256::digest(secret.as_bytes()).into());
    KeyRecord { id: KeyId::new(client, kid), secret_hash: hash, meta: KeyMeta::new(now()) }
}

fn client(id: &str) -> ClientRecord {
    ClientRecord { id: id.to_owned(), meta: ClientMeta::new(now()) }
}

/// Clients whose IDs sort differently from their key IDs (`a-b.k` sorts
/// before `a.k`, since `-` comes before `.`), some with a record, some with
/// keys only.
async fn fill(store: &dyn KeyStore) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for (c, kids) in [("a", 3), ("a-b", 2), ("a0", 1), ("b", 4), ("zz-top", 2)] {
        for k in 0..kids {
            let record = key(c, &format!("k{k}"));
            store.insert(&record).await.unwrap();
            ids.insert(record.id.to_string());
        }
    }
    for c in ["a", "a0", "b", "c-only-record", "zz-top"] {
        store.insert_client(&client(c)).await.unwrap();
    }
    ids
}

/// Walks every key page of `limit`, adding a key and revoking one between
/// pages; returns the IDs seen, failing on a repeat or a page out of order.
async fn walk_keys(store: &dyn KeyStore, limit: usize) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    let mut after: Option<KeyId> = None;
    for page_no in 0.. {
        let page = store.list_page(None, after.as_ref(), limit).await.unwrap();
        assert!(page.items.len() <= limit);
        for record in &page.items {
            let id = record.id.to_string();
            assert!(seen.last().is_none_or(|last| *last < id), "{id} after {seen:?}");
            seen.push(id);
        }
        if !page.more {
            break;
        }
        after = page.items.last().map(|r| r.id.clone());
        // Changes between pages: a new key before the cursor, one after it,
        // and a revocation (records are never deleted).
        store.insert(&key("a", &format!("new{page_no}"))).await.unwrap();
        store.insert(&key("zz-top", &format!("new{page_no}"))).await.unwrap();
        let mut revoked = key("b", "k1");
        revoked.meta.status = KeyStatus::Revoked;
        store.update(&revoked).await.unwrap();
    }
    seen
}

async fn walk_clients(store: &dyn KeyStore, limit: usize) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    for page_no in 0.. {
        let page = store.list_clients_page(after.as_deref(), limit).await.unwrap();
        for record in &page.items {
            assert!(seen.last().is_none_or(|last| *last < record.id), "{} after {seen:?}", record.id);
            seen.push(record.id.clone());
        }
        if !page.more {
            break;
        }
        after = page.items.last().map(|r| r.id.clone());
        store.insert_client(&client(&format!("a-new{page_no}"))).await.unwrap();
        store.insert_client(&client(&format!("zz-new{page_no}"))).await.unwrap();
    }
    seen
}

/// The contract every store keeps, checked on a fresh one.
async fn pages_keep_the_contract(store: &dyn KeyStore) {
    let ids = fill(store).await;
    let all: Vec<String> = store.list(None).await.unwrap().iter().map(|r| r.id.to_string()).collect();
    assert_eq!(all, ids.iter().cloned().collect::<Vec<_>>(), "list is in ID order");

    let first = store.list_page(None, None, 4).await.unwrap();
    assert!(first.more);
    let first: Vec<&str> = first.items.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(first, ["a-b.k0", "a-b.k1", "a.k0", "a.k1"]);
    let whole = store.list_page(None, None, 1000).await.unwrap();
    assert_eq!((whole.items.len(), whole.more), (ids.len(), false));
    let exact = store.list_page(None, None, ids.len()).await.unwrap();
    assert!(!exact.more, "a page that ends at the last record says so");
    let of_b = store.list_page(Some("b"), Some(&"b.k1".parse().unwrap()), 10).await.unwrap();
    let of_b: Vec<&str> = of_b.items.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(of_b, ["b.k2", "b.k3"]);
    // A cursor need not be a stored ID: the page starts after it.
    let past = store.list_page(None, Some(&"a.k0zz".parse().unwrap()), 2).await.unwrap();
    assert_eq!(past.items.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["a.k1", "a.k2"]);

    // Every key there for the whole walk is seen once; added ones may be.
    let seen = walk_keys(store, 3).await;
    for id in &ids {
        assert_eq!(seen.iter().filter(|s| *s == id).count(), 1, "{id} in {seen:?}");
    }
    assert!(seen.iter().any(|s| s.starts_with("zz-top.new")), "keys added past the cursor appear: {seen:?}");

    let clients = walk_clients(store, 2).await;
    for c in ["a", "a0", "b", "c-only-record", "zz-top"] {
        assert_eq!(clients.iter().filter(|s| *s == c).count(), 1, "{c} in {clients:?}");
    }
    assert!(!clients.contains(&"a-b".to_owned()), "a client with keys but no record is no record");
    let page = store.list_clients_page(Some("b"), 1).await.unwrap();
    assert_eq!(page.items.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["c-only-record"]);
    assert!(page.more);
}

#[tokio::test]
async fn file_store_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).await.unwrap();
    pages_keep_the_contract(&store).await;
}

#[tokio::test]
async fn redis_store_pages() {
    let redis = RedisServer::start();
    let store = within(5, "connect", RedisStore::connect(&redis.url(), "kg:")).await.unwrap();
    pages_keep_the_contract(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_store_pages() {
    let cluster = RedisCluster::start();
    let endpoint = Endpoint::Cluster(cluster.urls());
    let connect = RedisStore::connect_endpoint(&endpoint, "kg:", RedisStoreOptions::default());
    let store = within(10, "connect to the cluster", connect).await.unwrap();
    pages_keep_the_contract(&store).await;
}

/// A key page costs at most four round trips and a client page at most
/// three, whatever the page size and the number of clients.
#[tokio::test]
async fn redis_pages_take_a_bounded_number_of_round_trips() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.port()).await;
    let store = within(5, "connect", RedisStore::connect(&relay.url(), "kg:")).await.unwrap();
    for (clients, limit) in [(3, 2), (3, 50), (40, 2), (40, 50), (40, 1000)] {
        for c in 0..clients {
            let id = format!("c{c:03}");
            // Writes of clients already there fail harmlessly.
            let _ = store.insert_client(&client(&id)).await;
            let _ = store.insert(&key(&id, "k1")).await;
            let _ = store.insert(&key(&id, "k2")).await;
        }
        relay.round_trips();
        let keys = store.list_page(None, Some(&"c001.k1".parse().unwrap()), limit).await.unwrap();
        let key_trips = relay.round_trips();
        let mine = store.list_page(Some("c002"), None, limit).await.unwrap();
        let one_client_trips = relay.round_trips();
        let listed = store.list_clients_page(Some("c000"), limit).await.unwrap();
        let client_trips = relay.round_trips();
        assert_eq!(keys.items.len(), limit.min(clients * 2 - 3));
        assert_eq!(mine.items.len(), 2.min(limit));
        assert_eq!(listed.items.len(), limit.min(clients - 1));
        let trips = (key_trips, one_client_trips, client_trips);
        assert_eq!(trips, (4, 3, 3), "{clients} clients, limit {limit}");
    }
    let whole = store.list(None).await.unwrap();
    assert_eq!((whole.len(), relay.round_trips()), (80, 4), "the unpaged list is one page");
}
