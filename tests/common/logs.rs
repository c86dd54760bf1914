//! The `tracing` output of code running on the test's thread, in a buffer,
//! so a test can assert what was logged (and how many times).
//!
//! `#[tokio::test]` runs a current-thread runtime, and the in-process gateway
//! ([`super::gateway::TestGateway`]) spawns its tasks there, so its log lines
//! land in the buffer too.
//!
//! One global subscriber (set on the first capture) writes each event to
//! the buffer of the thread it happened on, if that thread is capturing. A
//! subscriber scoped per thread (`set_default`) loses events when tests run
//! in parallel: tracing caches per call site whether anyone listens, and a
//! call site first reached on a thread with no subscriber can stay cached
//! as unheard (seen: the access-log assertion in tests/tokens.rs failed one
//! run in four beside the other tests of its binary).

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Arc, Mutex, Once};

thread_local! {
    static CAPTURING: RefCell<Option<Arc<Mutex<String>>>> = const { RefCell::new(None) };
}

/// Writes to the current thread's capture buffer; drops the bytes of
/// threads that are not capturing.
struct ThreadBuffer;

impl Write for ThreadBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        CAPTURING.with(|buffer| {
            if let Some(buffer) = &*buffer.borrow() {
                buffer.lock().unwrap().push_str(&String::from_utf8_lossy(bytes));
            }
        });
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Logs captured until the guard is dropped.
pub struct Captured {
    text: Arc<Mutex<String>>,
}

impl Drop for Captured {
    fn drop(&mut self) {
        CAPTURING.with(|buffer| *buffer.borrow_mut() = None);
    }
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
    static GLOBAL: Once = Once::new();
    GLOBAL.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(|| ThreadBuffer)
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber in tests");
    });
    let text = Arc::new(Mutex::new(String::new()));
    CAPTURING.with(|buffer| *buffer.borrow_mut() = Some(Arc::clone(&text)));
    Captured { text }
}
