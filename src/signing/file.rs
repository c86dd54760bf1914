//! The signing key ring beside the file store's keys:
//! `<keys dir>/.signing/ring.json`, the ring's JSON, readable by its owner
//! only (it holds private keys).
//!
//! Every call reads (and for writes, replaces by a rename) the file under
//! an exclusive lock on `ring.lock` (flock), held by every process sharing
//! the folder, so a create or a compare-and-set is atomic across gateways
//! and the CLI. The folder is hidden, so the key store's loader and watcher
//! never look at it.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{Ring, RingError, RingStore};
use crate::store::StoreError;

#[derive(Debug, Clone)]
pub struct FileRingStore {
    path: PathBuf,
}

impl FileRingStore {
    pub fn new(key_dir: &Path) -> Self {
        Self { path: key_dir.join(".signing").join("ring.json") }
    }

    /// Runs `change` on the stored ring under the lock, off the async
    /// threads; writes what it answers as the ring to store, if anything.
    async fn with_ring<T: Send + 'static>(
        &self,
        change: impl FnOnce(Option<Ring>) -> Result<(T, Option<Ring>), RingError> + Send + 'static,
    ) -> Result<T, RingError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || with_locked_ring(&path, change))
            .await
            .map_err(|e| RingError::Store(StoreError::Unavailable(format!("signing keys: {e}"))))?
    }
}

fn with_locked_ring<T>(
    path: &Path,
    change: impl FnOnce(Option<Ring>) -> Result<(T, Option<Ring>), RingError>,
) -> Result<T, RingError> {
    let what = path.display().to_string();
    let unavailable = |doing: &str, e: std::io::Error| {
        RingError::Store(StoreError::Unavailable(format!("signing keys {what}: {doing}: {e}")))
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let _lock = crate::store::file::lock_beside(path).map_err(|(doing, e)| unavailable(doing, e))?;

    let stored = match std::fs::read_to_string(path) {
        Ok(text) => Some(Ring::from_json(&text).map_err(|e| match e {
            RingError::Corrupt(why) => RingError::Corrupt(format!("{what}: {why}")),
            other => other,
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(unavailable("reading", e)),
    };
    let (answer, write) = change(stored)?;
    if let Some(ring) = write {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("ring.json");
        crate::store::file::write_file_atomically(dir, name, ring.to_json().as_bytes(), 0o600)
            .map_err(|e| unavailable("writing", e))?;
    }
    // Unlocked when `_lock` is closed, here.
    Ok(answer)
}

#[async_trait]
impl RingStore for FileRingStore {
    async fn load(&self) -> Result<Option<Ring>, RingError> {
        self.with_ring(|stored| Ok((stored, None))).await
    }

    async fn create(&self, ring: &Ring) -> Result<Ring, RingError> {
        let ours = ring.clone();
        self.with_ring(move |stored| match stored {
            Some(theirs) => Ok((theirs, None)),
            None => Ok((ours.clone(), Some(ours))),
        })
        .await
    }

    async fn replace(&self, expected: u64, next: &Ring) -> Result<bool, RingError> {
        let next = next.clone();
        self.with_ring(move |stored| match stored {
            Some(current) if current.version == expected => Ok((true, Some(next))),
            Some(_) => Ok((false, None)),
            None => Err(RingError::Missing),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn create_keeps_the_first_ring_and_replace_is_a_compare_and_set() {
        let dir = tempfile::tempdir().expect("dir");
        let store = FileRingStore::new(dir.path());
        assert_eq!(store.load().await.expect("load"), None);
        assert!(matches!(store.replace(1, &Ring::generate(1).expect("ring")).await, Err(RingError::Missing)));

        let first = Ring::generate(1).expect("ring");
        assert_eq!(store.create(&first).await.expect("create"), first);
        let second = Ring::generate(2).expect("ring");
        assert_eq!(store.create(&second).await.expect("create"), first, "the first ring stays");

        let rotated =
            first.rotated(5, std::time::Duration::ZERO, std::time::Duration::ZERO).expect("rotated");
        assert!(!store.replace(first.version + 7, &rotated).await.expect("cas"), "stale version");
        assert!(store.replace(first.version, &rotated).await.expect("cas"));
        assert_eq!(store.load().await.expect("load"), Some(rotated));

        use std::os::unix::fs::PermissionsExt as _;
        let mode =
            std::fs::metadata(dir.path().join(".signing/ring.json")).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
