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
//! The relay connects to Redis anew for every client connection, so it
//! follows a Redis restarted on the same port.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// No cut armed.
const NEVER: u64 = u64::MAX;

pub struct Relay {
    port: u16,
    /// Reply bytes that may still pass before the cut ([`NEVER`]: no cut).
    allowance: Arc<AtomicU64>,
    cuts: Arc<AtomicUsize>,
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
        let (a, c) = (Arc::clone(&allowance), Arc::clone(&cuts));
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)).await else { continue };
                tokio::spawn(relay(client, server, Arc::clone(&a), Arc::clone(&c)));
            }
        });
        Relay { port, allowance, cuts, accept }
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
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, allowance: Arc<AtomicU64>, cuts: Arc<AtomicUsize>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let commands = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match server_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
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
