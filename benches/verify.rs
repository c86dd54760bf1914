//! Run with `cargo bench --bench verify` (add `-- --warm-up-time 1 --measurement-time 3` for a quick pass).
//!
//! A cache-hit verification, the work every request with a known key pays:
//! parse and checksum the key, hash its secret, look the hash up in the
//! in-process cache, check status and expiry. No store call happens; the
//! store (a `FileStore` in a temporary folder) is only there to warm the cache.
//!
//! The file store is asked where it stands on every verification (one
//! `stat` of its marker file, so a CLI revocation holds for the next
//! request): "verify (cache hit)" pays that, and "verify (cache hit,
//! unversioned store)" runs the same store behind a wrapper that keeps no
//! version, as the Redis store does, so the difference is that check's cost.
//!
//! `verify` is async but never awaits on a cache hit, so the loop runs inside
//! one `block_on` on a current-thread runtime (`iter_custom`): the runtime's
//! per-call entry cost is not measured, and criterion needs no async feature.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use keygate::auth::Verifier;
use keygate::config::Config;
use keygate::key::{KeyId, SecretHash};
use keygate::meta::MetaChanges;
use keygate::store::file::FileStore;
use keygate::store::{Invalidation, KeyRecord, KeyStore, SharedStore, StoreError};

fn verify_benches(c: &mut Criterion) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        panic!("cannot build a tokio runtime for the benchmark");
    };
    let Ok(dir) = tempfile::tempdir() else { panic!("cannot create a temporary folder") };
    let keys = Config::defaults().keys;
    // The peer's address: its failed-authentication budget is checked first.
    let source = std::net::IpAddr::from([192, 0, 2, 1]);

    let (verifier, unversioned, key) = rt.block_on(async {
        let file = match FileStore::open(dir.path()).await {
            Ok(store) => Arc::new(store),
            Err(e) => panic!("opening the file store: {e}"),
        };
        let store: SharedStore = file.clone();
        let issued = match keygate::ops::issue(
            &*store,
            &keys.prefix,
            "12345-ABCDE",
            MetaChanges::default(),
            jiff::Timestamp::now(),
        )
        .await
        {
            Ok(issued) => issued,
            Err(e) => panic!("issuing the benchmark key: {e}"),
        };
        let verifier = Verifier::new(store, &keys);
        let key = issued.key.expose().to_owned();
        // Warm the cache: the first call reads the store, every later one hits.
        if let Err(e) = verifier.verify(&key, source, Instant::now()).await {
            panic!("the issued key must verify: {e}");
        }
        assert_eq!(verifier.cached_len(), 1, "the key is cached");
        let unversioned = Verifier::new(Arc::new(Unversioned(file)), &keys);
        if let Err(e) = unversioned.verify(&key, source, Instant::now()).await {
            panic!("the issued key must verify: {e}");
        }
        (verifier, unversioned, key)
    });

    for (name, verifier) in
        [("verify (cache hit)", &verifier), ("verify (cache hit, unversioned store)", &unversioned)]
    {
        c.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        // The request's arrival instant, which the handler reads
                        // for its own use and passes in.
                        black_box(verifier.verify(black_box(&key), source, start).await).ok();
                    }
                    start.elapsed()
                })
            })
        });
    }
}

/// The file store without its version: every call but `version` and
/// `catch_up` (left to their defaults) goes to the store inside.
struct Unversioned(Arc<FileStore>);

#[async_trait::async_trait]
impl KeyStore for Unversioned {
    async fn find_by_hash(&self, client: &str, hash: &SecretHash) -> Result<Option<KeyRecord>, StoreError> {
        self.0.find_by_hash(client, hash).await
    }
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.0.get(id).await
    }
    async fn list(&self, client: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        self.0.list(client).await
    }
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.0.insert(record).await
    }
    async fn update(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.0.update(record).await
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Invalidation> {
        self.0.subscribe()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.0.ping().await
    }
    async fn get_client(&self, id: &str) -> Result<Option<keygate::client::ClientRecord>, StoreError> {
        self.0.get_client(id).await
    }
    async fn list_clients(&self) -> Result<Vec<keygate::client::ClientRecord>, StoreError> {
        self.0.list_clients().await
    }
    async fn insert_client(&self, record: &keygate::client::ClientRecord) -> Result<(), StoreError> {
        self.0.insert_client(record).await
    }
    async fn update_client(&self, record: &keygate::client::ClientRecord) -> Result<(), StoreError> {
        self.0.update_client(record).await
    }
}

criterion_group!(benches, verify_benches);
criterion_main!(benches);
