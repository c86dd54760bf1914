//! The `tracing` output of code running on the test's thread, in a buffer,
//! so a test can assert what was logged (and how many times).
//!
//! `#[tokio::test]` runs a current-thread runtime, and the in-process gateway
//! ([`super::gateway::TestGateway`]) spawns its tasks there, so its log lines
//! land in the buffer too.

use std::io::Write;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
struct Buffer(Arc<Mutex<String>>);

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().push_str(&String::from_utf8_lossy(bytes));
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Logs captured until the guard is dropped.
pub struct Captured {
    text: Arc<Mutex<String>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Captured {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// The lines logged so far that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text().lines().filter(|l| l.contains(needle)).map(str::to_owned).collect()
    }
}

/// Starts capturing this thread's logs (every level from debug up).
pub fn capture() -> Captured {
    let buffer = Buffer(Arc::default());
    let text = Arc::clone(&buffer.0);
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || buffer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    Captured { text, _guard: tracing::subscriber::set_default(subscriber) }
}
