//! Which worker thread the current code runs on.
//!
//! Each worker is a single-threaded runtime with its own listener and its own
//! upstream connection pools (`proxy/pool.rs`); the index picks the pool. It
//! lives below both `server` (which sets it) and `proxy` (which reads it), so
//! neither imports the other for it.

use std::cell::Cell;

thread_local! {
    /// This thread's worker index (0 outside workers, e.g. in tests).
    static WORKER_INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The current worker's index.
pub fn worker_index() -> usize {
    WORKER_INDEX.with(Cell::get)
}

/// Marks the current thread as worker `index`.
pub fn set_worker_index(index: usize) {
    WORKER_INDEX.with(|w| w.set(index));
}
