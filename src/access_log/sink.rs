//! Where access lines go: a bounded in-memory buffer that a thread of its
//! own writes to stdout or a file, so a slow disk never holds up a worker.
//!
//! A request appends its formatted line under a short lock (a `memcpy`,
//! no allocation: the buffer keeps its capacity) and goes on; the writer
//! thread swaps the whole buffer for its spare one and writes it outside
//! the lock. When the buffer is full the line is dropped and counted
//! (`keygate_access_log_dropped_lines_total`), never waited for.
//!
//! Not `tracing-appender`'s `non_blocking`: it allocates a `Vec` per line
//! and wakes its worker for each line it sends while the worker sleeps
//! (a futex syscall on the request path at moderate load). Here a request
//! wakes the writer only when it finds it asleep, and the writer, once
//! woken, lets lines gather for [`LINGER`] before writing them in one
//! `write`, as nginx's `access_log ... buffer= flush=` does.
//!
//! A sink starts nothing until its first line (so `keygate check` opens no
//! file); the file is opened by the writer thread, in append mode. A config
//! reload builds a new sink, which reopens the file: moving a log away and
//! reloading is how it is rotated. [`flush_all`] is called once the workers
//! have drained, so the last requests' lines reach the file before the
//! process exits.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

/// How long the writer lets lines gather once woken: at most this much
/// delay before a line is in the file, and at most one wake-up per period.
pub const LINGER: Duration = Duration::from_millis(50);

/// Bytes of lines held while the writer is behind (a few thousand lines):
/// beyond it, lines are dropped and counted.
pub const BUFFER_BYTES: usize = 4 << 20;

/// `[log] access`: a stream or a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    /// Opened in append mode (created if missing); relative paths were
    /// resolved against the config file's folder.
    File(PathBuf),
}

/// One access log destination, shared by every request of a config.
pub struct Sink {
    destination: Destination,
    capacity: usize,
    /// Started by the first line.
    shared: OnceLock<Arc<Shared>>,
}

/// What the requests and the writer thread share.
struct Shared {
    /// A std Mutex: held for a `memcpy` or a swap, never across I/O or an
    /// `.await`.
    state: Mutex<State>,
    /// Wakes the writer: a line for a sleeping writer, a half-full buffer,
    /// a flush asked for, the sink closed.
    wake: Condvar,
    /// Wakes [`flush_all`] when the writer has written what it was asked to.
    flushed: Condvar,
    /// Lines dropped (buffer full, or the destination failed).
    dropped: AtomicU64,
    /// Bytes of unwritten lines held at most.
    capacity: usize,
}

#[derive(Default)]
struct State {
    lines: Vec<u8>,
    /// The writer sleeps with nothing to write: the next line must wake it.
    writer_asleep: bool,
    /// The sink is gone (its config was replaced): write what is left, then stop.
    closed: bool,
    /// The writer could not open its destination: lines are dropped.
    failed: bool,
    flush_asked: u64,
    flush_done: u64,
}

/// Every started sink, for [`flush_all`] at shutdown; dead ones are pruned
/// when a sink starts.
static STARTED: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("destination", &self.destination).finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the buffer consistent (bytes
    // are appended or not); keep logging.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Sink {
    pub fn new(destination: Destination) -> Self {
        Self::with_capacity(destination, BUFFER_BYTES)
    }

    /// A sink holding at most `capacity` bytes of unwritten lines.
    pub fn with_capacity(destination: Destination, capacity: usize) -> Self {
        Self { destination, capacity, shared: OnceLock::new() }
    }

    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    /// Queues one line (its `\n` included). Never blocks on I/O: with the
    /// buffer full, the line is dropped and counted.
    pub fn write(&self, line: &[u8]) {
        let shared = self.shared.get_or_init(|| self.start());
        let mut state = lock(&shared.state);
        let before = state.lines.len();
        if state.failed || before + line.len() > self.capacity {
            drop(state);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            crate::metrics::access_log_dropped(1);
            return;
        }
        state.lines.extend_from_slice(line);
        // Past half full the writer's linger is cut short.
        let half = self.capacity / 2;
        let wake = state.writer_asleep || (before < half && state.lines.len() >= half);
        state.writer_asleep = false;
        drop(state);
        if wake {
            shared.wake.notify_one();
        }
    }

    /// Lines dropped so far by this sink.
    pub fn dropped(&self) -> u64 {
        self.shared.get().map_or(0, |shared| shared.dropped.load(Ordering::Relaxed))
    }

    fn start(&self) -> Arc<Shared> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { lines: Vec::with_capacity(64 * 1024), ..State::default() }),
            wake: Condvar::new(),
            flushed: Condvar::new(),
            dropped: AtomicU64::new(0),
            capacity: self.capacity,
        });
        {
            let mut started = lock(&STARTED);
            started.retain(|sink| sink.strong_count() > 0);
            started.push(Arc::downgrade(&shared));
        }
        let (writer, destination) = (Arc::clone(&shared), self.destination.clone());
        let spawned = std::thread::Builder::new()
            .name("keygate-access-log".into())
            .spawn(move || run_writer(&writer, &destination));
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the access log writer; access lines are dropped");
            lock(&shared.state).failed = true;
        }
        shared
    }
}

impl Drop for Sink {
    /// Tells the writer to finish; does not wait for it (the last owner may
    /// be a worker ending a request).
    fn drop(&mut self) {
        if let Some(shared) = self.shared.get() {
            lock(&shared.state).closed = true;
            shared.wake.notify_one();
        }
    }
}

/// Waits (up to `timeout` in all) until every started sink has written the
/// lines it holds.
pub fn flush_all(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let sinks: Vec<Arc<Shared>> = lock(&STARTED).iter().filter_map(Weak::upgrade).collect();
    for shared in sinks {
        let mut state = lock(&shared.state);
        if state.failed {
            continue;
        }
        state.flush_asked += 1;
        let asked = state.flush_asked;
        shared.wake.notify_one();
        while state.flush_done < asked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            state = shared.flushed.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

fn open(destination: &Destination) -> std::io::Result<Box<dyn Write + Send>> {
    match destination {
        Destination::Stdout => Ok(Box::new(std::io::stdout())),
        Destination::File(path) => Ok(Box::new(open_file(path)?)),
    }
}

fn open_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

/// The writer thread: sleeps until there are lines, lets more gather for
/// [`LINGER`], writes them all at once, until its sink is closed.
fn run_writer(shared: &Shared, destination: &Destination) {
    let mut out = match open(destination) {
        Ok(out) => out,
        Err(error) => {
            tracing::error!(?destination, %error, "cannot open the access log; access lines are dropped");
            let mut state = lock(&shared.state);
            state.failed = true;
            state.flush_done = u64::MAX;
            shared.flushed.notify_all();
            return;
        }
    };
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut failing = false;
    loop {
        let (closed, asked) = {
            let mut state = lock(&shared.state);
            while state.lines.is_empty() && !state.closed && state.flush_asked == state.flush_done {
                state.writer_asleep = true;
                state = shared.wake.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
            state.writer_asleep = false;
            // Past half full (a burst, or lines that came while the last
            // batch was written), a flush asked for, or closing: no linger.
            let urgent = state.closed
                || state.flush_asked != state.flush_done
                || state.lines.len() >= shared.capacity / 2;
            if !urgent {
                // Writers crossing half the buffer, a flush or the close cut this short.
                state = shared.wake.wait_timeout(state, LINGER).unwrap_or_else(PoisonError::into_inner).0;
            }
            std::mem::swap(&mut state.lines, &mut batch);
            (state.closed, state.flush_asked)
        };
        if !batch.is_empty() {
            match out.write_all(&batch).and_then(|()| out.flush()) {
                Ok(()) => failing = false,
                Err(error) => {
                    let lines = batch.iter().filter(|&&b| b == b'\n').count() as u64;
                    shared.dropped.fetch_add(lines, Ordering::Relaxed);
                    crate::metrics::access_log_dropped(lines);
                    // Once per failing spell, not once per batch.
                    if !failing {
                        tracing::error!(?destination, %error, "cannot write the access log");
                    }
                    failing = true;
                }
            }
            batch.clear();
        }
        let mut state = lock(&shared.state);
        if state.flush_done < asked {
            state.flush_done = asked;
            shared.flushed.notify_all();
        }
        if closed && state.lines.is_empty() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(path: &Path, lines: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.lines().count() >= lines || Instant::now() > deadline {
                return text;
            }
            std::thread::yield_now();
        }
    }

    #[test]
    fn lines_reach_the_file_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let sink = Sink::new(Destination::File(path.clone()));
        for n in 0..1000 {
            sink.write(format!("line {n}\n").as_bytes());
        }
        let text = wait_for(&path, 1000);
        let expected: Vec<String> = (0..1000).map(|n| format!("line {n}")).collect();
        assert_eq!(text.lines().collect::<Vec<_>>(), expected);
        assert_eq!(sink.dropped(), 0);
    }

    #[test]
    fn a_full_buffer_drops_and_counts_lines_instead_of_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        // Room for two 10-byte lines at a time: a thousand written in a
        // tight loop outrun the writer, which takes the buffer at most
        // once per wake-up.
        let sink = Sink::with_capacity(Destination::File(path.clone()), 20);
        for _ in 0..1000 {
            sink.write(b"012345678\n");
        }
        let dropped = sink.dropped();
        assert!(dropped > 0, "a full buffer drops lines");
        flush_all(Duration::from_secs(5));
        let kept = std::fs::read_to_string(&path).unwrap().lines().count() as u64;
        assert!(kept >= 2, "what fitted is written: {kept}");
        assert_eq!(kept + dropped, 1000, "every line is written or counted");
    }

    #[test]
    fn flush_all_writes_what_a_sink_holds_before_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let sink = Sink::new(Destination::File(path.clone()));
        sink.write(b"first\n");
        sink.write(b"second\n");
        flush_all(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "first\nsecond\n");
    }

    #[test]
    fn a_destination_that_cannot_open_drops_and_counts_lines() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::new(Destination::File(dir.path().join("missing").join("access.log")));
        sink.write(b"one\n");
        flush_all(Duration::from_secs(5));
        sink.write(b"two\n");
        assert!(sink.dropped() >= 1, "the line after the failed open is counted");
    }
}
