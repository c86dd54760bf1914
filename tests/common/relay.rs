//! A TCP relay in front of the test Redis that can cut a connection in the
//! middle of Redis's replies: the commands reached Redis and ran, but the
//! client never hears so. The one failure that can make a retry count
//! twice, on demand and at a chosen byte, instead of by racing a restart.
//!
//! ```ignore
//! let relay = Relay::start(redis.port()).await;   // connect clients to relay.url()
//! relay.cut_replies_after(2_000);                 // the next 2 000 reply bytes pass, then the cut
//! /* ... the client sees a dropped connection; it reconnects through the relay ... */
//! assert_eq!(relay.cuts(), 1);
//! ```
//!
//! It also counts round trips ([`Relay::round_trips`]): bursts of commands
//! a client sent before Redis answered, so a pipeline counts once.
//!
//! The relay connects to Redis anew for every client connection, so it
//! follows a Redis restarted on the same port.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// No cut armed.
const NEVER: u64 = u64::MAX;

pub struct Relay {
    port: u16,
    /// Reply bytes that may still pass before the cut ([`NEVER`]: no cut).
    allowance: Arc<AtomicU64>,
    cuts: Arc<AtomicUsize>,
    round_trips: Arc<AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Listens on a free loopback port and relays every connection to the
    /// Redis on `redis_port`. Must run inside a tokio runtime.
    pub async fn start(redis_port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the relay");
        let port = listener.local_addr().expect("relay address").port();
        let allowance = Arc::new(AtomicU64::new(NEVER));
        let cuts = Arc::new(AtomicUsize::new(0));
        let round_trips = Arc::new(AtomicUsize::new(0));
        let (a, c, r) = (Arc::clone(&allowance), Arc::clone(&cuts), Arc::clone(&round_trips));
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)).await else { continue };
                let counters =
                    Counters { allowance: Arc::clone(&a), cuts: Arc::clone(&c), round_trips: Arc::clone(&r) };
                tokio::spawn(relay(client, server, counters));
            }
        });
        Relay { port, allowance, cuts, round_trips, accept }
    }

    /// `redis://127.0.0.1:<relay port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Lets `bytes` more bytes of replies through, then closes the
    /// connection carrying them (both sides). Once.
    pub fn cut_replies_after(&self, bytes: u64) {
        self.allowance.store(bytes, Ordering::SeqCst);
    }

    /// How many connections were cut.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }

    /// Round trips since the last call (on every connection): a client's
    /// bytes arriving after Redis last answered it start one. Exact while
    /// one caller at a time talks and each burst fits Redis's reading of it
    /// before its first reply (small pipelines).
    pub fn round_trips(&self) -> usize {
        self.round_trips.swap(0, Ordering::SeqCst)
    }
}

struct Counters {
    allowance: Arc<AtomicU64>,
    cuts: Arc<AtomicUsize>,
    round_trips: Arc<AtomicUsize>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, counters: Counters) {
    let Counters { allowance, cuts, round_trips } = counters;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Set while the client's latest bytes have had no answer yet.
    let asking = Arc::new(AtomicBool::new(false));
    let asked = Arc::clone(&asking);
    let commands = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !asked.swap(true, Ordering::SeqCst) {
                round_trips.fetch_add(1, Ordering::SeqCst);
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match server_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        asking.store(false, Ordering::SeqCst);
        let left = allowance.load(Ordering::SeqCst);
        if left != NEVER && n as u64 > left {
            // The cut: part of this read reaches the client, then both
            // connections close. Disarmed first, so only one cut happens.
            allowance.store(NEVER, Ordering::SeqCst);
            let _ = client_write.write_all(&buf[..left as usize]).await;
            cuts.fetch_add(1, Ordering::SeqCst);
            break;
        }
        if left != NEVER {
            allowance.fetch_sub(n as u64, Ordering::SeqCst);
        }
        if client_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    commands.abort();
    // Dropping the halves closes both connections: Redis discards whatever
    // it had not run yet (an open MULTI included).
}
