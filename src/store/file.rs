//! The file store: key records as TOML files in a folder (`keys/`), the
//! embedded default that needs no external service.
//!
//! One file per key, named `<client>.<kid>.toml` (the key's ID), e.g.
//!
//! ```toml
//! id = "acme.k1"
//! secret_hash = "2f38fa28…"   # SHA-256 of the secret; the secret is never stored
//! scopes = ["read", "orders:write"]
//! rate = "100/s"
//! quota = "10000/day"
//! status = "active"
//! created_at = "2026-11-24T00:00:00Z"
//! credits = 1000                 # optional usage credits granted, with
//! credits_refill = "1000/month"  # an optional refill and the grant's stamp
//! credits_granted_at = "2026-11-24T00:00:00.123Z"
//! ```
//!
//! A client's record, if it has one, is `<client>.toml` beside its keys
//! (a client ID has no `.`, a key ID always one, so the names cannot clash):
//!
//! ```toml
//! id = "acme"
//! quota = "100000/month"
//! label = "Acme Corp"
//! credits = 100000               # optional, spelt as in a key file
//! status = "active"
//! created_at = "2026-11-24T00:00:00Z"
//! updated_at = "2026-11-24T00:00:00Z"
//! ```
//!
//! The credits *left* are not in the key or client file (spending would rewrite it and
//! reload the folder on every request): `limit::credits` keeps them in the
//! hidden `.credits/` folder beside the keys.
//!
//! The whole folder is loaded into memory at [`FileStore::open`]; verification
//! is a `HashMap` lookup on a snapshot read without locks. Writes go to a
//! temporary file in the same folder and are renamed into place, so a reader
//! (this process, another gateway, an editor) never sees half a record.
//!
//! The folder is watched: any change (the CLI in another process, an operator
//! editing or deleting a file) triggers a reload after a short debounce, and if
//! the records changed, [`Invalidation::All`]. A lookup that finds nothing does
//! not wait for that debounce: if the folder's modification time moved since
//! the last load (a file was added, renamed or removed), it reloads at once and
//! looks again, so a key issued by the CLI a moment ago is served on its first
//! request. A flood of unknown keys costs one `stat` of the folder each.
//!
//! A write through this store (the CLI, the admin API) must hold for the very
//! next request on every gateway sharing the folder, which neither the
//! watcher (debounced, asynchronous) nor the folder's modification time (a
//! coarse clock tick: two writes in one tick look like one) can promise. So
//! every write, once its file is renamed into place, appends one byte to the
//! hidden marker file [`MARKER`]: its length only grows, and one `stat` of it
//! tells whether anyone wrote since this process last read the folder.
//! [`KeyStore::version`] does that `stat` on every verification and answers
//! [`StoreVersion::Behind`] if the marker moved; the verifier then calls
//! [`KeyStore::catch_up`], which reloads the folder before the request is
//! answered, and re-checks every cached record filled at an older version.
//! The marker grows by one byte per write; deleting it is harmless while no
//! `keygate keys` command runs (it is recreated by the next write). Hand
//! edits do not touch it: they take effect through the watcher, within about
//! [`DEBOUNCE`].
//!
//! A file that does not parse is skipped with a warning naming it; the rest
//! keep being served. Files that do not end in `.toml`, hidden files
//! (including our temporaries) and `README*` are ignored.
//!
//! Files are flat (metadata fields at top level, not under a `[meta]` table)
//! and unknown fields are refused: in a hand-edited file, `rate_limit = ...`
//! for `rate = ...` must not silently make a key unlimited.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::num::NonZeroU32;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use jiff::Timestamp;
use notify::Watcher;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, broadcast, mpsc};

use super::{Found, Invalidation, KeyRecord, KeyStore, Page, StoreError, StoreVersion};
use crate::client::{ClientMeta, ClientRecord};
use crate::key::{KeyId, SecretHash};
use crate::meta::{CreditGrant, KeyMeta, KeyStatus, Quota, Rate, Refill};

/// Quiet time after the last change event before reloading: an editor's save
/// or a `cp` of many files arrives as a burst of events.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// The marker file every write appends one byte to (see the module doc).
/// Hidden, so loads and the watcher ignore it.
pub const MARKER: &str = ".keygate-writes";

/// See the Redis store: a receiver this far behind sees `Lagged`.
const INVALIDATION_BUFFER: usize = 1024;

/// Key records in a folder of TOML files, served from memory.
///
/// Dropping the store stops watching the folder.
pub struct FileStore {
    shared: Arc<Shared>,
    /// The folder watch; dropping it ends the reload task (its event channel
    /// closes). `None` if the platform refused a watch (see [`FileStore::open`]).
    _watcher: Option<notify::RecommendedWatcher>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore").field("dir", &self.shared.dir).finish()
    }
}

/// State shared between the store's callers and its reload task.
struct Shared {
    dir: PathBuf,
    /// The records, swapped whole on every change so the verification path
    /// reads a consistent snapshot without taking a lock.
    index: ArcSwap<Index>,
    /// Serialises writers (insert, update, reload). Without it a reload that
    /// listed the folder just before a write could swap in a snapshot missing
    /// that write. Async because writers hold it across file I/O.
    write_lock: Mutex<()>,
    invalidations: broadcast::Sender<Invalidation>,
    /// The folder's modification time when it was last read (taken before
    /// listing it, so a change made during a load is seen as a change).
    /// `None` if the file system gives none: then only the watcher reloads.
    loaded_modified: std::sync::Mutex<Option<SystemTime>>,
    /// The path of [`MARKER`] in `dir`.
    marker: PathBuf,
    /// The marker's stamp when the folder was last read (taken before
    /// listing it). Stored only after the index it led to, so a reader that
    /// finds the marker unchanged also finds that index. An `ArcSwap`: read
    /// on every verification, without a lock.
    loaded_marker: ArcSwap<Option<Stamp>>,
    /// Moves whenever the index changes (a write here, a reload that found
    /// changes): cache entries filled at another version are re-checked.
    version: AtomicU64,
}

/// What one `stat` of the marker tells: its length grows with every write;
/// the inode and time catch a marker deleted and written anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

/// What is read before listing the folder, so that a change made during the
/// listing is seen as a change the next time.
#[derive(Debug, Clone, Copy)]
struct Before {
    modified: Option<SystemTime>,
    marker: Option<Stamp>,
}

/// All records, by hash (verification) and by ID (administration), and
/// the client records by client ID.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Index {
    by_hash: HashMap<SecretHash, KeyRecord>,
    by_id: BTreeMap<KeyId, SecretHash>,
    clients: BTreeMap<String, ClientRecord>,
}

impl Index {
    fn add(&mut self, record: KeyRecord) {
        self.by_id.insert(record.id.clone(), record.secret_hash);
        self.by_hash.insert(record.secret_hash, record);
    }
}

/// A file in the folder that was not loaded, and why. The reason names no
/// secret (files hold none) and quotes no file content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedFile {
    pub path: PathBuf,
    pub why: String,
}

// === impl FileStore ===

impl FileStore {
    /// Loads every key file in `dir` and starts watching it. Malformed files
    /// are skipped with a warning. Fails with [`StoreError::Unavailable`] if
    /// the folder cannot be read. If the OS refuses a watch (e.g. inotify
    /// limits), the store still works but logs that changes need a restart.
    ///
    /// Must be called within a Tokio runtime (it spawns the reload task).
    pub async fn open(dir: impl Into<PathBuf>) -> Result<FileStore, StoreError> {
        let dir = dir.into();
        let marker = dir.join(MARKER);
        let before = Before { modified: folder_modified(&dir).await, marker: marker_stamp(&marker) };
        let (index, skipped) = load_dir_blocking(&dir).await?;
        warn_skipped(&skipped);
        tracing::debug!(dir = %dir.display(), keys = index.by_hash.len(), "file key store loaded");

        let (invalidations, _) = broadcast::channel(INVALIDATION_BUFFER);
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            index: ArcSwap::from_pointee(index),
            write_lock: Mutex::new(()),
            invalidations,
            loaded_modified: std::sync::Mutex::new(before.modified),
            marker,
            loaded_marker: ArcSwap::from_pointee(before.marker),
            version: AtomicU64::new(0),
        });

        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let watcher = match watch(&dir, events_tx) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "cannot watch key folder; changes need a restart: {e}");
                None
            }
        };
        tokio::spawn(reload_on_change(Arc::clone(&shared), events_rx));
        Ok(FileStore { shared, _watcher: watcher })
    }

    /// The folder this store reads.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Reads the folder again now (what a change event triggers), sending
    /// [`Invalidation::All`] if the records changed. Returns the files skipped.
    pub async fn reload(&self) -> Result<Vec<SkippedFile>, StoreError> {
        self.shared.reload().await
    }

    /// Writes `record`'s file, announces the write in the marker, and swaps
    /// the new index in; the caller has checked the write is allowed and
    /// holds the write lock.
    async fn write_locked(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let text = to_toml(record)?;
        let dir = self.shared.dir.clone();
        let name = file_name(&record.id);
        let written = tokio::task::spawn_blocking(move || write_atomically(&dir, &name, text.as_bytes()))
            .await
            .map_err(|e| self.unavailable(format!("writing {}: {e}", record.id)))?;
        written.map_err(|e| self.unavailable(format!("writing {}: {e}", file_name(&record.id))))?;
        // After the rename: a reader that sees the marker move then finds
        // the file. Failing here is an error although the file is written:
        // other gateways would otherwise serve the old record until the
        // watcher's reload, and the caller must hear of that.
        bump_marker(&self.shared.marker).map_err(|e| {
            self.unavailable(format!(
                "{} is written, but {MARKER} could not be updated ({e}); running gateways see the change only once their folder watch reloads",
                file_name(&record.id)
            ))
        })?;

        let mut index = Index::clone(&self.shared.index.load());
        index.add(record.clone());
        self.shared.index.store(Arc::new(index));
        self.shared.version.fetch_add(1, Ordering::AcqRel);
        let _ = self.shared.invalidations.send(Invalidation::Key(record.secret_hash));
        Ok(())
    }

    /// Writes a client's file and swaps the new index in; the caller holds
    /// the write lock and has checked the write is allowed.
    async fn write_client_locked(&self, record: &ClientRecord) -> Result<(), StoreError> {
        let text = client_to_toml(record)?;
        let dir = self.shared.dir.clone();
        let name = client_file_name(&record.id);
        let shown = name.clone();
        let written = tokio::task::spawn_blocking(move || write_atomically(&dir, &name, text.as_bytes()))
            .await
            .map_err(|e| self.unavailable(format!("writing {shown}: {e}")))?;
        written.map_err(|e| self.unavailable(format!("writing {shown}: {e}")))?;
        // Announced in the marker as a key write is: a client revocation by
        // the CLI must hold for the very next request on a gateway sharing
        // the folder (its keys' and its certificates'), not only once the
        // folder watch has reloaded.
        bump_marker(&self.shared.marker).map_err(|e| {
            self.unavailable(format!(
                "{shown} is written, but {MARKER} could not be updated ({e}); running gateways see the change only once their folder watch reloads"
            ))
        })?;

        let mut index = Index::clone(&self.shared.index.load());
        index.clients.insert(record.id.clone(), record.clone());
        self.shared.index.store(Arc::new(index));
        self.shared.version.fetch_add(1, Ordering::AcqRel);
        let _ = self.shared.invalidations.send(Invalidation::Client(record.id.clone()));
        Ok(())
    }

    fn unavailable(&self, why: String) -> StoreError {
        StoreError::Unavailable(format!("key folder {}: {why}", self.shared.dir.display()))
    }
}

#[async_trait]
impl KeyStore for FileStore {
    async fn find_by_hash(&self, client: &str, hash: &SecretHash) -> Result<Option<KeyRecord>, StoreError> {
        // Same answer as the Redis store, where the client is part of the key name.
        let find = || self.shared.index.load().by_hash.get(hash).filter(|r| r.client() == client).cloned();
        if let Some(record) = find() {
            return Ok(Some(record));
        }
        // Not loaded: perhaps written a moment ago, before the watcher's
        // debounced reload. A folder that cannot be read now keeps serving
        // the snapshot, as the watcher's reload does; that reload warns
        // once, so a miss that fails the same way logs at debug only.
        match self.shared.reload_if_changed().await {
            Ok(true) => Ok(find()),
            Ok(false) => Ok(None),
            Err(e) => {
                tracing::debug!("key folder reload on a miss failed; serving the previous keys: {e}");
                Ok(None)
            }
        }
    }

    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let index = self.shared.index.load();
        Ok(index.by_id.get(id).and_then(|hash| index.by_hash.get(hash)).cloned())
    }

    async fn list(&self, client: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        let index = self.shared.index.load();
        Ok(index
            .by_id
            .iter()
            .filter(|(id, _)| client.is_none_or(|c| id.client() == c))
            .filter_map(|(_, hash)| index.by_hash.get(hash).cloned())
            .collect())
    }

    /// From the loaded snapshot's ID index: starts at the cursor, reads
    /// only the page.
    async fn list_page(
        &self,
        client: Option<&str>,
        after: Option<&KeyId>,
        limit: usize,
    ) -> Result<Page<KeyRecord>, StoreError> {
        let index = self.shared.index.load();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let records = index
            .by_id
            .range::<KeyId, _>((from, Bound::Unbounded))
            .filter(|(id, _)| client.is_none_or(|c| id.client() == c))
            .filter_map(|(_, hash)| index.by_hash.get(hash).cloned());
        Ok(Page::of(records, limit))
    }

    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        check_id_is_a_file_name(&record.id)?;
        let _writer = self.shared.write_lock.lock().await;
        let index = self.shared.index.load();
        let path = self.shared.dir.join(file_name(&record.id));
        // A file can exist without being loaded (malformed, or not reloaded yet).
        let file_exists = tokio::fs::try_exists(&path)
            .await
            .map_err(|e| self.unavailable(format!("checking {}: {e}", path.display())))?;
        if index.by_id.contains_key(&record.id)
            || index.by_hash.contains_key(&record.secret_hash)
            || file_exists
        {
            return Err(StoreError::AlreadyExists(record.id.clone()));
        }
        self.write_locked(record).await
    }

    async fn update(&self, record: &KeyRecord) -> Result<(), StoreError> {
        check_id_is_a_file_name(&record.id)?;
        let _writer = self.shared.write_lock.lock().await;
        if self.shared.index.load().by_id.get(&record.id) != Some(&record.secret_hash) {
            return Err(StoreError::NotFound(record.id.clone()));
        }
        self.write_locked(record).await
    }

    async fn find_for_verification(
        &self,
        client: &str,
        hash: &SecretHash,
    ) -> Result<Option<Found>, StoreError> {
        // `find_by_hash` reloads a changed folder on a miss; the client is
        // then read from the snapshot that found the key (or a newer one).
        let Some(key) = self.find_by_hash(client, hash).await? else { return Ok(None) };
        let client = self.shared.index.load().clients.get(key.client()).cloned();
        Ok(Some(Found { key, client }))
    }

    async fn get_client(&self, id: &str) -> Result<Option<ClientRecord>, StoreError> {
        Ok(self.shared.index.load().clients.get(id).cloned())
    }

    async fn list_clients(&self) -> Result<Vec<ClientRecord>, StoreError> {
        Ok(self.shared.index.load().clients.values().cloned().collect())
    }

    async fn list_clients_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<ClientRecord>, StoreError> {
        let index = self.shared.index.load();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(Page::of(index.clients.range::<str, _>((from, Bound::Unbounded)).map(|(_, r)| r.clone()), limit))
    }

    async fn insert_client(&self, record: &ClientRecord) -> Result<(), StoreError> {
        check_client_is_a_file_name(&record.id)?;
        let _writer = self.shared.write_lock.lock().await;
        let path = self.shared.dir.join(client_file_name(&record.id));
        // As for keys: a file may exist without being loaded (malformed, or
        // written by another process a moment ago).
        let file_exists = tokio::fs::try_exists(&path)
            .await
            .map_err(|e| self.unavailable(format!("checking {}: {e}", path.display())))?;
        if file_exists || self.shared.index.load().clients.contains_key(&record.id) {
            return Err(StoreError::ClientExists(record.id.clone()));
        }
        self.write_client_locked(record).await
    }

    async fn update_client(&self, record: &ClientRecord) -> Result<(), StoreError> {
        check_client_is_a_file_name(&record.id)?;
        let _writer = self.shared.write_lock.lock().await;
        if !self.shared.index.load().clients.contains_key(&record.id) {
            return Err(StoreError::ClientNotFound(record.id.clone()));
        }
        self.write_client_locked(record).await
    }

    fn subscribe(&self) -> broadcast::Receiver<Invalidation> {
        self.shared.invalidations.subscribe()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        match tokio::fs::metadata(&self.shared.dir).await {
            Ok(meta) if meta.is_dir() => Ok(()),
            Ok(_) => Err(self.unavailable("not a folder".to_owned())),
            Err(e) => Err(self.unavailable(e.to_string())),
        }
    }

    /// One `stat` of the marker, a load of the stamp it is compared with,
    /// and (when current) of the version: the cost every request with a key
    /// pays on this store (`cargo bench --bench verify`).
    fn version(&self) -> StoreVersion {
        let shared = &self.shared;
        if marker_stamp(&shared.marker) != **shared.loaded_marker.load() {
            return StoreVersion::Behind;
        }
        StoreVersion::At(shared.version.load(Ordering::Acquire))
    }

    async fn catch_up(&self) -> Result<u64, StoreError> {
        let shared = &self.shared;
        let _writer = shared.write_lock.lock().await;
        // Checked again under the lock: of many requests that saw the same
        // write, the first reloads and the others find it done.
        let before = shared.before().await;
        if before.marker != **shared.loaded_marker.load() {
            shared.reload_locked(before).await?;
        }
        Ok(shared.version.load(Ordering::Acquire))
    }
}

// === Reloading ===

impl Shared {
    async fn reload(&self) -> Result<Vec<SkippedFile>, StoreError> {
        let _writer = self.write_lock.lock().await;
        let before = self.before().await;
        self.reload_locked(before).await
    }

    /// The folder's modification time and the marker's stamp, read now.
    async fn before(&self) -> Before {
        Before { modified: folder_modified(&self.dir).await, marker: marker_stamp(&self.marker) }
    }

    /// Reloads if the folder's modification time moved since the last load;
    /// says whether it did. Lookups that miss call this, so many of them at
    /// once after one change reload once: each checks again under the lock.
    async fn reload_if_changed(&self) -> Result<bool, StoreError> {
        let changed = |now: Option<SystemTime>| now.is_some() && now != *self.modified_lock();
        if !changed(folder_modified(&self.dir).await) {
            return Ok(false);
        }
        let _writer = self.write_lock.lock().await;
        let before = self.before().await;
        if !changed(before.modified) {
            return Ok(true); // another lookup reloaded meanwhile
        }
        self.reload_locked(before).await.map(|_| true)
    }

    /// Reads the folder and swaps the new index in if it differs; `before`
    /// was read before. The caller holds the write lock.
    async fn reload_locked(&self, before: Before) -> Result<Vec<SkippedFile>, StoreError> {
        let (index, skipped) = load_dir_blocking(&self.dir).await?;
        *self.modified_lock() = before.modified;
        warn_skipped(&skipped);
        if **self.index.load() != index {
            tracing::info!(dir = %self.dir.display(), keys = index.by_hash.len(), "key folder changed; reloaded");
            self.index.store(Arc::new(index));
            self.version.fetch_add(1, Ordering::AcqRel);
            let _ = self.invalidations.send(Invalidation::All);
        }
        // Last: whoever finds the marker current must find this index.
        self.loaded_marker.store(Arc::new(before.marker));
        Ok(skipped)
    }

    /// A std mutex: held only to copy one value, never across an await.
    fn modified_lock(&self) -> std::sync::MutexGuard<'_, Option<SystemTime>> {
        self.loaded_modified.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The folder's modification time, if the file system keeps one.
async fn folder_modified(dir: &Path) -> Option<SystemTime> {
    tokio::fs::metadata(dir).await.and_then(|meta| meta.modified()).ok()
}

/// The marker's stamp, `None` while it does not exist. A synchronous
/// `stat`: it runs on every verification, where a trip through the blocking
/// pool would cost far more than the call.
fn marker_stamp(marker: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(marker).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp { len: meta.len(), modified: meta.modified().ok(), inode })
}

/// Appends one byte to the marker, creating it if needed. An append is one
/// `write` at the end whatever other processes do, so two writers never
/// leave it at a length a reader has already seen.
fn bump_marker(marker: &Path) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().append(true).create(true).open(marker)?;
    file.write_all(b".")
}

/// Watches `dir` (not recursively); every relevant event becomes a `()` on `events`.
fn watch(dir: &Path, events: mpsc::UnboundedSender<()>) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            // Reads change nothing; events only about hidden files are our
            // own temporaries (or an editor's swap files).
            Ok(event) => {
                !matches!(event.kind, notify::EventKind::Access(_))
                    && !event.paths.iter().all(|p| is_hidden(p))
            }
            // A lost event (queue overflow) may hide any change: reload.
            Err(_) => true,
        };
        if relevant {
            let _ = events.send(());
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// The reload task: after each burst of events has been quiet for
/// [`DEBOUNCE`], reloads. Ends when the watcher (and its sender) is dropped.
async fn reload_on_change(shared: Arc<Shared>, mut events: mpsc::UnboundedReceiver<()>) {
    while events.recv().await.is_some() {
        loop {
            match tokio::time::timeout(DEBOUNCE, events.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => return,
                Err(_quiet) => break,
            }
        }
        if let Err(e) = shared.reload().await {
            // Keep serving what was loaded: a folder briefly unreadable (being
            // replaced by a deploy) must not empty the store.
            tracing::warn!("key folder reload failed; serving the previous keys: {e}");
        }
    }
}

fn warn_skipped(skipped: &[SkippedFile]) {
    for file in skipped {
        tracing::warn!(file = %file.path.display(), "skipping key file: {}", file.why);
    }
}

// === Files ===

/// A key file's content: a [`KeyRecord`] flattened, strict about field names.
/// The struct literal in the conversions below lists every [`KeyMeta`] field,
/// so a field added there fails to compile here until it is handled.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    id: KeyId,
    secret_hash: SecretHash,
    scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rate: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    burst: Option<NonZeroU32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    quota: Option<Quota>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    status: KeyStatus,
    created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rotated_at: Option<Timestamp>,
    /// Usage credits granted (the count left is kept apart, in
    /// `.credits/`, so spending does not rewrite this file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    credits: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    credits_refill: Option<Refill>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    credits_granted_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    counts_as: Option<KeyId>,
}

impl From<&KeyRecord> for KeyFile {
    fn from(r: &KeyRecord) -> Self {
        let KeyMeta {
            scopes,
            rate,
            burst,
            quota,
            expires_at,
            label,
            status,
            created_at,
            rotated_at,
            credits,
            counts_as,
        } = r.meta.clone();
        Self {
            id: r.id.clone(),
            secret_hash: r.secret_hash,
            scopes,
            rate,
            burst,
            quota,
            expires_at,
            label,
            status,
            created_at,
            rotated_at,
            credits: credits.map(|c| c.uses),
            credits_refill: credits.and_then(|c| c.refill),
            credits_granted_at: credits.map(|c| c.granted_at),
            counts_as,
        }
    }
}

impl TryFrom<KeyFile> for KeyRecord {
    type Error = String;
    fn try_from(f: KeyFile) -> Result<Self, String> {
        let credits = grant_from_file(f.credits, f.credits_refill, f.credits_granted_at)?;
        let meta = KeyMeta {
            scopes: f.scopes,
            rate: f.rate,
            burst: f.burst,
            quota: f.quota,
            expires_at: f.expires_at,
            label: f.label,
            status: f.status,
            created_at: f.created_at,
            rotated_at: f.rotated_at,
            credits,
            counts_as: f.counts_as,
        };
        Ok(Self { id: f.id, secret_hash: f.secret_hash, meta })
    }
}

/// A credit grant from a file's three `credits*` fields (key and client
/// files spell them alike).
fn grant_from_file(
    credits: Option<u64>,
    refill: Option<Refill>,
    granted_at: Option<Timestamp>,
) -> Result<Option<CreditGrant>, String> {
    match (credits, refill, granted_at) {
        (Some(uses), refill, granted_at) => Ok(Some(CreditGrant {
            uses,
            refill,
            // A hand-written grant without a stamp counts as the oldest one.
            granted_at: granted_at.unwrap_or(Timestamp::UNIX_EPOCH),
        })),
        (None, Some(_), _) => Err("`credits_refill` needs `credits` (the uses granted)".to_owned()),
        (None, None, _) => Ok(None),
    }
}

/// A client file's content: a [`ClientRecord`] flattened, strict about
/// field names as key files are.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    id: String,
    /// The client certificate's scopes; absent: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rate: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    burst: Option<NonZeroU32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    quota: Option<Quota>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    /// Usage credits shared by the client's keys, as in a key file (the
    /// count left is in `.credits/`, under the client's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    credits: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    credits_refill: Option<Refill>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    credits_granted_at: Option<Timestamp>,
    status: KeyStatus,
    created_at: Timestamp,
    updated_at: Timestamp,
}

impl From<&ClientRecord> for ClientFile {
    fn from(r: &ClientRecord) -> Self {
        let ClientMeta { scopes, rate, burst, quota, label, credits, status, created_at, updated_at } =
            r.meta.clone();
        Self {
            id: r.id.clone(),
            scopes,
            rate,
            burst,
            quota,
            label,
            credits: credits.map(|c| c.uses),
            credits_refill: credits.and_then(|c| c.refill),
            credits_granted_at: credits.map(|c| c.granted_at),
            status,
            created_at,
            updated_at,
        }
    }
}

impl TryFrom<ClientFile> for ClientRecord {
    type Error = String;
    fn try_from(f: ClientFile) -> Result<Self, String> {
        let meta = ClientMeta {
            scopes: f.scopes,
            rate: f.rate,
            burst: f.burst,
            quota: f.quota,
            label: f.label,
            credits: grant_from_file(f.credits, f.credits_refill, f.credits_granted_at)?,
            status: f.status,
            created_at: f.created_at,
            updated_at: f.updated_at,
        };
        Ok(Self { id: f.id, meta })
    }
}

fn client_to_toml(record: &ClientRecord) -> Result<String, StoreError> {
    let body = toml::to_string(&ClientFile::from(record))
        .map_err(|e| StoreError::Corrupt { what: format!("client {}", record.id), why: e.to_string() })?;
    Ok(format!(
        "# keygate client {id}: limits and status shared by every key {id}.*. Written by\n\
         # `keygate clients`; may be edited by hand (the gateway reloads this folder).\n{body}",
        id = record.id
    ))
}

/// Parses one client file's text; `expected` is the client its name promises.
fn client_from_toml(text: &str, expected: &str) -> Result<ClientRecord, String> {
    let file: ClientFile = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
    if file.id != expected {
        return Err(format!("`id = \"{}\"` does not match the file name", file.id));
    }
    file.try_into()
}

fn client_file_name(client: &str) -> String {
    format!("{client}.toml")
}

/// Refuses client IDs that are not `[A-Za-z0-9-]{1,64}`, which could name a
/// path outside the folder (or a key's file).
fn check_client_is_a_file_name(client: &str) -> Result<(), StoreError> {
    crate::key::validate_client_id(client)
        .map_err(|e| StoreError::Corrupt { what: format!("client id {client:?}"), why: e.to_string() })
}

/// A TOML error as the message and line only: the error's default rendering
/// quotes the offending line, which could hold a secret pasted by mistake.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => format!("line {}: {}", text[..span.start].lines().count().max(1), e.message()),
        None => e.message().to_owned(),
    }
}

fn to_toml(record: &KeyRecord) -> Result<String, StoreError> {
    let body = toml::to_string(&KeyFile::from(record))
        .map_err(|e| StoreError::Corrupt { what: format!("key {}", record.id), why: e.to_string() })?;
    Ok(format!(
        "# keygate key {id}. Written by `keygate keys`; may be edited by hand (the gateway\n\
         # reloads this folder). `secret_hash` is the SHA-256 of the key's secret: the\n\
         # secret itself is never stored.\n{body}",
        id = record.id
    ))
}

/// Parses one file's text; `expected` is the ID its name promises.
fn from_toml(text: &str, expected: &KeyId) -> Result<KeyRecord, String> {
    let file: KeyFile = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
    if file.id != *expected {
        return Err(format!("`id = \"{}\"` does not match the file name", file.id));
    }
    // A key spends only its own client's budgets.
    if let Some(counts_as) = &file.counts_as
        && counts_as.client() != file.id.client()
    {
        return Err(format!("`counts_as = \"{counts_as}\"` names a key of another client"));
    }
    file.try_into()
}

fn file_name(id: &KeyId) -> String {
    format!("{id}.toml")
}

/// Refuses IDs built with [`KeyId::new`] from unchecked parts, which could
/// name a path outside the folder.
fn check_id_is_a_file_name(id: &KeyId) -> Result<(), StoreError> {
    match id.as_str().parse::<KeyId>() {
        Ok(_) => Ok(()),
        Err(why) => Err(StoreError::Corrupt { what: format!("key id {id:?}"), why }),
    }
}

fn is_hidden(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// What a file in the folder holds, by its name.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    /// `<client>.<kid>.toml`: a key.
    Key(KeyId),
    /// `<client>.toml`: a client record.
    Client(String),
}

/// Which entries of the folder are records: `Some(Ok(..))` for a key or a
/// client file, `Err` for a `.toml` whose name is neither, `None` for
/// everything to ignore silently (other extensions, hidden files, `README*`).
fn key_file_id(path: &Path) -> Option<Result<Entry, String>> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".toml")?;
    if name.starts_with('.') || stem.to_ascii_uppercase().starts_with("README") {
        return None;
    }
    if !stem.contains('.') && crate::key::validate_client_id(stem).is_ok() {
        return Some(Ok(Entry::Client(stem.to_owned())));
    }
    Some(
        stem.parse::<KeyId>().map(Entry::Key).map_err(|_| {
            "file name is not <client>.<kid>.toml (a key) or <client>.toml (a client)".to_owned()
        }),
    )
}

async fn load_dir_blocking(dir: &Path) -> Result<(Index, Vec<SkippedFile>), StoreError> {
    let owned = dir.to_owned();
    let unavailable = |why: String| StoreError::Unavailable(format!("key folder {}: {why}", dir.display()));
    tokio::task::spawn_blocking(move || load_dir(&owned))
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .map_err(|e| unavailable(e.to_string()))
}

/// Reads every key file. Fails only if the folder itself cannot be listed.
fn load_dir(dir: &Path) -> std::io::Result<(Index, Vec<SkippedFile>)> {
    let mut index = Index::default();
    let mut skipped = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    // Sorted so that which of two clashing files wins does not depend on the
    // file system's listing order.
    paths.sort();
    for path in paths {
        let Some(entry) = key_file_id(&path) else { continue };
        let read = || std::fs::read_to_string(&path).map_err(|e| format!("cannot read: {e}"));
        let loaded = match entry {
            Ok(Entry::Client(client)) => {
                match read().and_then(|text| client_from_toml(&text, &client)) {
                    Ok(record) => {
                        index.clients.insert(client, record);
                    }
                    Err(why) => skipped.push(SkippedFile { path, why }),
                }
                continue;
            }
            Ok(Entry::Key(id)) => read().and_then(|text| from_toml(&text, &id)),
            Err(why) => Err(why),
        };
        match loaded {
            Ok(record) if index.by_hash.contains_key(&record.secret_hash) => {
                skipped
                    .push(SkippedFile { path, why: "another key file has the same secret_hash".to_owned() });
            }
            Ok(record) => index.add(record),
            Err(why) => skipped.push(SkippedFile { path, why }),
        }
    }
    Ok((index, skipped))
}

/// Creates `path`'s folder and takes an exclusive lock (flock) on
/// `<path>.lock`, held by every process sharing the folder (gateways and
/// the CLI), for the files kept beside the keys (refresh tokens, the
/// signing key ring). Unlocked when the returned file is closed. Err: what
/// failed, and why.
pub(crate) fn lock_beside(path: &Path) -> Result<std::fs::File, (&'static str, std::io::Error)> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| ("creating its folder", e))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path.with_extension("lock"))
        .map_err(|e| ("opening its lock", e))?;
    lock.lock().map_err(|e| ("locking", e))?;
    Ok(lock)
}

/// Writes `dir/name` so that readers see the old file or the new one, never
/// a mix: a temporary in the same folder (same file system), flushed to disk,
/// renamed over the target, then the folder flushed so the rename survives a
/// crash.
fn write_atomically(dir: &Path, name: &str, contents: &[u8]) -> std::io::Result<()> {
    write_file_atomically(dir, name, contents, 0o666)
}

/// [`write_atomically`] for every file kept beside the keys (refresh
/// tokens, the signing key ring), the new file created with `mode` (less
/// the umask): `0o600` for one only its owner may read.
pub(crate) fn write_file_atomically(
    dir: &Path,
    name: &str,
    contents: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // Hidden, so loads and the watcher ignore it; the pid keeps two processes
    // (a gateway and the CLI) from sharing one.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    // Not every platform can open a folder to flush it; the rename is done either way.
    if let Ok(folder) = std::fs::File::open(dir) {
        let _ = folder.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> KeyRecord {
        let mut meta = KeyMeta::new("2026-11-24T00:00:00.5Z".parse().unwrap());
        meta.rate = Some("100/s".parse().unwrap());
        meta.quota = Some("10000/day".parse().unwrap());
        meta.label = Some("mobile \"app\"".into());
        KeyRecord { id: "acme.k1".parse().unwrap(), secret_hash: SecretHash([7; 32]), meta }
    }

    #[test]
    fn files_are_flat_readable_toml_that_round_trips() {
        let record = record();
        let text = to_toml(&record).unwrap();
        assert!(text.contains("rate = \"100/s\"\n"), "{text}");
        assert!(text.contains("quota = \"10000/day\"\n"), "{text}");
        assert!(!text.contains("[meta]") && !text.contains("burst"), "{text}");
        assert_eq!(from_toml(&text, &record.id).unwrap(), record);
    }

    #[test]
    fn credits_round_trip_and_a_refill_without_credits_is_refused() {
        let mut record = record();
        record.meta.credits = Some(CreditGrant {
            uses: 1000,
            refill: Some("500/day".parse().unwrap()),
            granted_at: "2026-11-24T00:00:00.123Z".parse().unwrap(),
        });
        let text = to_toml(&record).unwrap();
        assert!(
            text.contains("credits = 1000\n") && text.contains("credits_refill = \"500/day\"\n"),
            "{text}"
        );
        assert_eq!(from_toml(&text, &record.id).unwrap(), record);
        let orphan = text.replace("credits = 1000\n", "");
        assert!(from_toml(&orphan, &record.id).unwrap_err().contains("credits_refill"));
    }

    #[test]
    fn unknown_fields_and_mismatched_ids_are_refused() {
        let text = to_toml(&record()).unwrap().replace("rate =", "rate_limit =");
        let why = from_toml(&text, &record().id).unwrap_err();
        assert!(why.contains("rate_limit") && why.starts_with("line "), "{why}");
        let why = from_toml(&to_toml(&record()).unwrap(), &"acme.k2".parse().unwrap()).unwrap_err();
        assert!(why.contains("file name"), "{why}");
    }

    #[test]
    fn client_files_round_trip_and_refuse_key_fields() {
        let mut meta = ClientMeta::new("2026-11-24T00:00:00Z".parse().unwrap());
        meta.quota = Some("100000/month".parse().unwrap());
        meta.label = Some("Acme \"gold\"".into());
        let record = ClientRecord { id: "acme".into(), meta };
        let text = client_to_toml(&record).unwrap();
        assert!(text.contains("quota = \"100000/month\"\n") && !text.contains("rate"), "{text}");
        assert_eq!(client_from_toml(&text, "acme").unwrap(), record);
        let why =
            client_from_toml(&format!("{text}expires_at = 2027-01-01T00:00:00Z\n"), "acme").unwrap_err();
        assert!(why.contains("expires_at"), "{why}");
        // The certificate's scopes are written when there are some, and read back.
        let record =
            ClientRecord { meta: ClientMeta { scopes: vec!["read".into()], ..record.meta }, ..record };
        let text = client_to_toml(&record).unwrap();
        assert!(text.contains("scopes = [\"read\"]\n"), "{text}");
        assert_eq!(client_from_toml(&text, "acme").unwrap(), record);
        assert!(client_from_toml(&text, "other").unwrap_err().contains("file name"));
    }

    #[test]
    fn client_credits_round_trip_and_a_refill_without_credits_is_refused() {
        let mut meta = ClientMeta::new("2026-11-24T00:00:00Z".parse().unwrap());
        meta.credits = Some(CreditGrant {
            uses: 100_000,
            refill: Some("100000/month".parse().unwrap()),
            granted_at: "2026-11-24T00:00:00.123Z".parse().unwrap(),
        });
        let record = ClientRecord { id: "acme".into(), meta };
        let text = client_to_toml(&record).unwrap();
        assert!(
            text.contains("credits = 100000\n") && text.contains("credits_refill = \"100000/month\"\n"),
            "{text}"
        );
        assert_eq!(client_from_toml(&text, "acme").unwrap(), record);
        // Hand-written: no stamp counts as the oldest grant.
        let unstamped = text.lines().filter(|l| !l.starts_with("credits_granted_at")).collect::<Vec<_>>();
        let back = client_from_toml(&unstamped.join("\n"), "acme").unwrap();
        assert_eq!(back.meta.credits.unwrap().granted_at, Timestamp::UNIX_EPOCH);
        let orphan = text.replace("credits = 100000\n", "");
        assert!(client_from_toml(&orphan, "acme").unwrap_err().contains("credits_refill"));
        let bad = text.replace("credits = 100000", "credits = -1");
        assert!(
            client_from_toml(&bad, "acme").unwrap_err().starts_with("line "),
            "a negative count is refused"
        );
    }

    #[test]
    fn parse_errors_do_not_quote_the_file() {
        let why = from_toml("id = \"acme.k1\"\nsecret = kg_acme_TOTALLYSECRET\n", &record().id).unwrap_err();
        assert!(!why.contains("TOTALLYSECRET"), "{why}");
    }

    #[test]
    fn only_key_files_are_considered() {
        assert!(matches!(key_file_id(Path::new("keys/acme.k1.toml")), Some(Ok(Entry::Key(_)))));
        assert_eq!(key_file_id(Path::new("keys/acme-2.toml")), Some(Ok(Entry::Client("acme-2".into()))));
        assert!(matches!(key_file_id(Path::new("keys/notes_v2.toml")), Some(Err(_))));
        assert!(matches!(key_file_id(Path::new("keys/a.b.c.toml")), Some(Err(_))));
        for ignored in
            ["keys/README.md", "keys/README.toml", "keys/acme.k1.toml.bak", "keys/.acme.k1.toml.9.tmp"]
        {
            assert!(key_file_id(Path::new(ignored)).is_none(), "{ignored}");
        }
    }
}
