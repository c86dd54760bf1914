//! An access log file in the test's own folder, and waiting (with a
//! deadline) for the line a request wrote once its response ended.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `[log] access` pointed at `access.log` in a fresh temporary folder.
pub struct AccessLog {
    pub path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl AccessLog {
    pub fn new() -> AccessLog {
        let dir = tempfile::tempdir().unwrap();
        AccessLog { path: dir.path().join("access.log"), _dir: Some(dir) }
    }

    /// The log a config already names (a test's own folder).
    pub fn at(path: PathBuf) -> AccessLog {
        AccessLog { path, _dir: None }
    }

    /// The `[log]` table that sends access lines here, in `format`.
    pub fn toml(&self, format: &str) -> String {
        format!("[log]\naccess = {:?}\naccess_format = \"{format}\"\n", self.path.display().to_string())
    }

    /// Everything written so far.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }

    /// Every JSON line written so far.
    pub fn entries(&self) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
            .collect()
    }

    /// The first JSON line for which `wanted` holds, waited for up to 10 s
    /// (the writer thread batches lines for up to 50 ms).
    pub async fn wait_for(
        &self,
        what: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(entry) = self.entries().into_iter().find(|entry| wanted(entry)) {
                return entry;
            }
            assert!(Instant::now() < deadline, "no access line {what} within 10 s; log:\n{}", self.text());
            tokio::task::yield_now().await;
        }
    }

    /// The JSON line of request `id`.
    pub async fn line_of(&self, id: &str) -> serde_json::Value {
        self.wait_for(&format!("with request_id {id}"), |entry| entry["request_id"] == id).await
    }

    /// The first text line containing `needle`, waited for up to 10 s.
    pub async fn wait_for_text(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self.text().lines().find(|line| line.contains(needle)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no access line with `{needle}` within 10 s:\n{}",
                self.text()
            );
            tokio::task::yield_now().await;
        }
    }
}
