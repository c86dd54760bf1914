//! The file store against a real folder, with real file-system events.

mod common;

use std::io::Write;
use std::path::Path;

use common::wait::{wait_for, within};
use jiff::Timestamp;
use keygate::key::{KeyId, SecretHash};
use keygate::meta::{KeyMeta, KeyStatus};
use keygate::store::file::FileStore;
use keygate::store::{Invalidation, KeyRecord, KeyStore, StoreError};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;

fn issue(client: &str, kid: &str) -> (String, KeyRecord) {
    let secret = format!("S3cretPart{client}{kid}xxxxxxxxxxxxxxxxxxxxxxxxxxxx");
    let hash = SecretHash(Sha256::digest(secret.as_bytes()).into());
    let meta = KeyMeta::new("2026-11-24T10:00:00.123Z".parse::<Timestamp>().unwrap());
    (secret, KeyRecord { id: KeyId::new(client, kid), secret_hash: hash, meta })
}

/// A key file as an operator or another tool would write it.
fn key_file(record: &KeyRecord) -> String {
    format!(
        "id = \"{}\"\nsecret_hash = \"{}\"\nscopes = [\"read\"]\nrate = \"5/min\"\nstatus = \"active\"\n\
         created_at = \"2026-11-24T10:00:00Z\"\n",
        record.id,
        record.secret_hash.to_hex()
    )
}

/// Writes a file the way an outside tool might: plainly, not atomically.
fn write(dir: &Path, name: &str, text: &str) {
    std::fs::File::create(dir.join(name)).and_then(|mut f| f.write_all(text.as_bytes())).unwrap();
}

#[tokio::test]
async fn records_round_trip_through_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).await.unwrap();
    let (secret, mut a1) = issue("acme", "k1");
    a1.meta.rate = Some("100/s".parse().unwrap());
    a1.meta.quota = Some("10000/day".parse().unwrap());
    a1.meta.label = Some("mobile app".into());
    let (_, b1) = issue("beta-co", "k1");
    store.insert(&a1).await.unwrap();
    store.insert(&b1).await.unwrap();

    assert_eq!(store.find_by_hash("acme", &a1.secret_hash).await.unwrap(), Some(a1.clone()));
    assert_eq!(store.find_by_hash("beta-co", &a1.secret_hash).await.unwrap(), None, "scoped to the client");
    assert_eq!(store.get(&b1.id).await.unwrap(), Some(b1.clone()));
    assert_eq!(store.list(None).await.unwrap(), [a1.clone(), b1.clone()]);
    assert_eq!(store.list(Some("acme")).await.unwrap(), [a1.clone()]);
    assert!(matches!(store.insert(&a1).await, Err(StoreError::AlreadyExists(_))));

    let text = std::fs::read_to_string(dir.path().join("acme.k1.toml")).unwrap();
    assert!(text.contains("rate = \"100/s\"") && text.contains(&a1.secret_hash.to_hex()), "{text}");
    assert!(!text.contains(&secret), "the clear secret is never written");

    let mut invalidations = store.subscribe();
    a1.meta.label = None;
    a1.meta.status = KeyStatus::Revoked;
    store.update(&a1).await.unwrap();
    wait_for(&mut invalidations, Invalidation::Key(a1.secret_hash)).await;
    let (_, unknown) = issue("acme", "k9");
    assert!(matches!(store.update(&unknown).await, Err(StoreError::NotFound(_))));

    // Everything was on disk: a fresh store (a restarted gateway) sees the same.
    let reopened = FileStore::open(dir.path()).await.unwrap();
    assert_eq!(reopened.list(None).await.unwrap(), [a1, b1]);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    // The two records and the write marker (see `FileStore`'s module doc).
    assert_eq!(leftovers.len(), 3, "no temporary files left: {leftovers:?}");
    assert!(leftovers.iter().any(|name| name == keygate::store::file::MARKER), "{leftovers:?}");
    reopened.ping().await.unwrap();
}

#[tokio::test]
async fn files_changed_outside_are_picked_up_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).await.unwrap();
    let mut invalidations = store.subscribe();
    let (_, record) = issue("acme", "k1");

    write(dir.path(), "acme.k1.toml", &key_file(&record));
    wait_for(&mut invalidations, Invalidation::All).await;
    let found = store.find_by_hash("acme", &record.secret_hash).await.unwrap().expect("picked up");
    assert_eq!(found.meta.rate.unwrap().to_string(), "5/min");

    // Deleting the file revokes the key everywhere.
    std::fs::remove_file(dir.path().join("acme.k1.toml")).unwrap();
    wait_for(&mut invalidations, Invalidation::All).await;
    assert_eq!(store.find_by_hash("acme", &record.secret_hash).await.unwrap(), None);
}

#[tokio::test]
async fn a_second_process_writing_keys_is_seen_by_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = FileStore::open(dir.path()).await.unwrap();
    let mut invalidations = gateway.subscribe();
    let cli = FileStore::open(dir.path()).await.unwrap();
    let (_, record) = issue("acme", "k1");
    cli.insert(&record).await.unwrap();
    wait_for(&mut invalidations, Invalidation::All).await;
    assert_eq!(gateway.get(&record.id).await.unwrap(), Some(record));
}

/// Moves the folder's modification time an hour back, so that the next
/// change moves it whatever the file system's timestamp granularity.
fn backdate(dir: &Path) {
    let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::open(dir).and_then(|folder| folder.set_modified(an_hour_ago)).unwrap();
}

#[tokio::test]
async fn a_key_written_a_moment_ago_is_found_on_its_first_lookup() {
    let dir = tempfile::tempdir().unwrap();
    backdate(dir.path());
    let gateway = FileStore::open(dir.path()).await.unwrap();
    let mut invalidations = gateway.subscribe();
    let cli = FileStore::open(dir.path()).await.unwrap();
    let (_, record) = issue("acme", "k1");
    cli.insert(&record).await.unwrap();

    // Straight after the write, well inside the watcher's 100 ms debounce:
    // the miss sees the folder changed and reads it at once.
    assert_eq!(gateway.find_by_hash("acme", &record.secret_hash).await.unwrap(), Some(record.clone()));
    // Misses other instances remembered are cleared, as by the watcher.
    assert!(matches!(invalidations.try_recv(), Ok(Invalidation::All)));

    // The folder has not changed since: an unknown key reads it no more and
    // announces nothing (the watcher's own reload finds the same records).
    let (_, unknown) = issue("acme", "k2");
    assert_eq!(gateway.find_by_hash("acme", &unknown.secret_hash).await.unwrap(), None);
    assert!(matches!(invalidations.try_recv(), Err(broadcast::error::TryRecvError::Empty)));
    assert_eq!(gateway.get(&record.id).await.unwrap(), Some(record));
}

#[tokio::test]
async fn malformed_files_are_skipped_with_a_warning_and_the_rest_served() {
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let (_, good) = issue("acme", "k1");
    let (_, typo) = issue("acme", "k2");
    write(dir.path(), "acme.k1.toml", &key_file(&good));
    write(dir.path(), "acme.k2.toml", &key_file(&typo).replace("rate =", "rate_limit ="));
    write(dir.path(), "acme.k3.toml", "this is = = not toml");
    write(dir.path(), "README.md", "# keys\nOne TOML file per key.\n");
    write(dir.path(), "notes.txt", "not a key");

    let store = FileStore::open(dir.path()).await.unwrap();
    assert_eq!(store.list(None).await.unwrap().len(), 1);
    assert!(store.find_by_hash("acme", &good.secret_hash).await.unwrap().is_some());
    let logged = logs.text();
    assert!(logged.contains("acme.k2.toml") && logged.contains("rate_limit"), "{logged}");
    assert!(logged.contains("acme.k3.toml"), "{logged}");
    assert!(!logged.contains("README") && !logged.contains("notes.txt"), "ignored silently: {logged}");

    // A file broken while the gateway runs does not take the others down.
    let mut invalidations = store.subscribe();
    let (_, later) = issue("beta", "k1");
    write(dir.path(), "acme.k1.toml", "id = [broken");
    write(dir.path(), "beta.k1.toml", &key_file(&later));
    wait_for(&mut invalidations, Invalidation::All).await;
    assert!(store.find_by_hash("beta", &later.secret_hash).await.unwrap().is_some());
    assert!(store.find_by_hash("acme", &good.secret_hash).await.unwrap().is_none(), "broken file is skipped");
}

#[tokio::test]
async fn a_missing_folder_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let err = FileStore::open(dir.path().join("nope")).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(ref m) if m.contains("nope")), "{err}");
}

#[tokio::test]
async fn dropping_the_store_stops_watching() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).await.unwrap();
    let mut invalidations = store.subscribe();
    drop(store);
    within(5, "the channel to close", async {
        while !matches!(invalidations.recv().await, Err(broadcast::error::RecvError::Closed)) {}
    })
    .await;
}
