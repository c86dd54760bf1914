//! Refresh tokens beside the file store's keys: one TOML file per client,
//! `<keys dir>/.refresh/<client>.toml`, a table of records by the token's
//! SHA-256 (hex):
//!
//! ```toml
//! [token.9f2c…e1]
//! key_id = "acme.k1"
//! key_hash = "2f38…"      # the key's secret hash when the family was granted
//! scope = "read"
//! family = "5d0e…"
//! state = "active"        # active, used or revoked
//! expires_at = 1800000000 # Unix seconds
//! ```
//!
//! Every call reads and rewrites the client's file under an exclusive lock
//! on `<client>.lock` (flock), held by every process sharing the folder, so
//! a rotation is atomic across gateways and two uses of one token find it
//! in turn. The file is replaced by a rename (no torn file); expired records
//! are dropped whenever the file is written. The folder is hidden, so the
//! key store's loader and watcher never look at it.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{RefreshRecord, RefreshState, RefreshStore, Rotation, TokenHash};
use crate::key::{KeyId, SecretHash};
use crate::store::StoreError;

/// Refresh tokens in `<keys dir>/.refresh/`.
#[derive(Debug, Clone)]
pub struct FileRefreshStore {
    dir: PathBuf,
}

impl FileRefreshStore {
    pub fn new(key_dir: &Path) -> Self {
        Self { dir: key_dir.join(".refresh") }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    #[serde(default)]
    token: BTreeMap<String, FileRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRecord {
    key_id: String,
    key_hash: String,
    scope: String,
    family: String,
    state: String,
    expires_at: u64,
}

impl From<&RefreshRecord> for FileRecord {
    fn from(r: &RefreshRecord) -> Self {
        Self {
            key_id: r.key_id.as_str().to_owned(),
            key_hash: r.key_hash.to_hex(),
            scope: r.scope.clone(),
            family: r.family.clone(),
            state: r.state.as_str().to_owned(),
            expires_at: r.expires_at,
        }
    }
}

impl FileRecord {
    fn decode(&self, what: &str) -> Result<RefreshRecord, StoreError> {
        let corrupt = |why: &str| StoreError::Corrupt { what: what.to_owned(), why: why.to_owned() };
        Ok(RefreshRecord {
            key_id: self.key_id.parse::<KeyId>().map_err(|_| corrupt("bad `key_id`"))?,
            key_hash: SecretHash::from_hex(&self.key_hash).ok_or_else(|| corrupt("bad `key_hash`"))?,
            scope: self.scope.clone(),
            family: self.family.clone(),
            state: RefreshState::parse(&self.state).ok_or_else(|| corrupt("bad `state`"))?,
            expires_at: self.expires_at,
        })
    }
}

impl ClientFile {
    fn revoke(&mut self, family: &str) {
        for record in self.token.values_mut().filter(|r| r.family == family) {
            record.state = RefreshState::Revoked.as_str().to_owned();
        }
    }
}

impl FileRefreshStore {
    /// Runs `change` on `client`'s file under its lock, off the async
    /// threads, and writes the file back if `change` says it changed.
    async fn with_file<T: Send + 'static>(
        &self,
        client: &str,
        change: impl FnOnce(&mut ClientFile, &str) -> Result<(T, bool), StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        // A client ID is `[A-Za-z0-9-]{1,64}` (checked where tokens are
        // parsed and keys issued), so it is a safe file name.
        crate::key::validate_client_id(client)
            .map_err(|e| StoreError::Unavailable(format!("refresh tokens: {e}")))?;
        let path = self.dir.join(format!("{client}.toml"));
        tokio::task::spawn_blocking(move || with_locked_file(&path, change))
            .await
            .map_err(|e| StoreError::Unavailable(format!("refresh tokens: {e}")))?
    }
}

fn with_locked_file<T>(
    path: &Path,
    change: impl FnOnce(&mut ClientFile, &str) -> Result<(T, bool), StoreError>,
) -> Result<T, StoreError> {
    let what = path.display().to_string();
    let unavailable = |doing: &str, e: std::io::Error| {
        StoreError::Unavailable(format!("refresh tokens {what}: {doing}: {e}"))
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let _lock = crate::store::file::lock_beside(path).map_err(|(doing, e)| unavailable(doing, e))?;

    let mut text = String::new();
    let mut file = match std::fs::File::open(path) {
        Ok(mut f) => {
            f.read_to_string(&mut text).map_err(|e| unavailable("reading", e))?;
            toml::from_str::<ClientFile>(&text)
                .map_err(|e| StoreError::Corrupt { what: what.clone(), why: e.message().to_owned() })?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ClientFile::default(),
        Err(e) => return Err(unavailable("opening", e)),
    };
    let (answer, changed) = change(&mut file, &what)?;
    if changed {
        let now = unix_now();
        file.token.retain(|_, r| r.expires_at > now);
        let text = toml::to_string(&file)
            .map_err(|e| StoreError::Corrupt { what: what.clone(), why: e.to_string() })?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        crate::store::file::write_file_atomically(dir, name, text.as_bytes(), 0o666)
            .map_err(|e| unavailable("writing", e))?;
    }
    // Unlocked when `_lock` is closed, here.
    Ok(answer)
}

fn unix_now() -> u64 {
    u64::try_from(jiff::Timestamp::now().as_second()).unwrap_or(0)
}

#[async_trait]
impl RefreshStore for FileRefreshStore {
    async fn insert(&self, hash: &TokenHash, record: &RefreshRecord) -> Result<(), StoreError> {
        let (hex, stored) = (hash.to_hex(), FileRecord::from(record));
        self.with_file(record.client(), move |file, _| {
            file.token.insert(hex, stored);
            Ok(((), true))
        })
        .await
    }

    async fn get(
        &self,
        client: &str,
        hash: &TokenHash,
        now: u64,
    ) -> Result<Option<RefreshRecord>, StoreError> {
        let hex = hash.to_hex();
        let client_owned = client.to_owned();
        self.with_file(client, move |file, what| {
            let found = match file.token.get(&hex) {
                Some(record) => Some(record.decode(what)?),
                None => None,
            };
            let live = found.filter(|r| r.expires_at > now && r.client() == client_owned);
            Ok((live, false))
        })
        .await
    }

    async fn rotate(
        &self,
        client: &str,
        old: &TokenHash,
        new: &TokenHash,
        record: &RefreshRecord,
        now: u64,
    ) -> Result<Rotation, StoreError> {
        let (old, new, mut successor) = (old.to_hex(), new.to_hex(), FileRecord::from(record));
        self.with_file(client, move |file, _| {
            let Some(current) = file.token.get_mut(&old).filter(|r| r.expires_at > now) else {
                return Ok((Rotation::Gone, false));
            };
            match RefreshState::parse(&current.state) {
                Some(RefreshState::Active) => {
                    current.state = RefreshState::Used.as_str().to_owned();
                    successor.family = current.family.clone();
                    successor.state = RefreshState::Active.as_str().to_owned();
                    file.token.insert(new, successor);
                    Ok((Rotation::Rotated, true))
                }
                Some(RefreshState::Used) => {
                    let family = current.family.clone();
                    file.revoke(&family);
                    Ok((Rotation::Reused, true))
                }
                Some(RefreshState::Revoked) | None => Ok((Rotation::Gone, false)),
            }
        })
        .await
    }

    async fn revoke_family(&self, client: &str, family: &str) -> Result<(), StoreError> {
        let family = family.to_owned();
        self.with_file(client, move |file, _| {
            file.revoke(&family);
            Ok(((), true))
        })
        .await
    }
}
