//! Raw bytes on both sides of the gateway: an upstream that records what it
//! receives and answers scripted bytes, and a client that sends exactly the
//! bytes a test gives it. hyper would refuse to write most of these.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every byte one connection received, shared with the test.
pub type Received = Arc<Mutex<Vec<u8>>>;

/// One accepted upstream connection, with what was read from it so far.
pub struct RawConn {
    pub stream: TcpStream,
    /// Bytes read but not yet handed out by `read_head`.
    pending: Vec<u8>,
    /// Everything received on this connection, for the test to inspect.
    pub received: Received,
}

impl RawConn {
    async fn fill(&mut self) -> bool {
        let mut buf = [0u8; 16 * 1024];
        match self.stream.read(&mut buf).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                self.received.lock().unwrap().extend_from_slice(&buf[..n]);
                true
            }
        }
    }

    /// The next request head (up to the blank line), or `None` at EOF.
    pub async fn read_head(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.pending.drain(..end + 4).collect();
                return Some(String::from_utf8_lossy(&head).into_owned());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Reads until the peer closes; returns whatever followed the last head.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.pending)
    }

    /// Reads until `n` bytes after the last head are there (or EOF).
    pub async fn read_body(&mut self, n: usize) -> Vec<u8> {
        while self.pending.len() < n && self.fill().await {}
        let n = n.min(self.pending.len());
        self.pending.drain(..n).collect()
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }
}

/// A TCP upstream whose every connection is handed to a test's function.
pub struct RawUpstream {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    /// Connections whose handler has returned (the gateway closed them, or the script did).
    pub finished: Arc<AtomicUsize>,
    /// Per connection, in accept order: every byte received.
    pub received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    pub async fn start<F, Fut>(on_conn: F) -> RawUpstream
    where
        F: Fn(RawConn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (c, f, r) = (Arc::clone(&connections), Arc::clone(&finished), Arc::clone(&received));
        let on_conn = Arc::new(on_conn);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let log = Arc::new(Mutex::new(Vec::new()));
                r.lock().unwrap().push(Arc::clone(&log));
                c.fetch_add(1, Ordering::SeqCst);
                let (on_conn, f) = (Arc::clone(&on_conn), Arc::clone(&f));
                tokio::spawn(async move {
                    on_conn(RawConn { stream, pending: Vec::new(), received: log }).await;
                    f.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        RawUpstream { addr, connections, finished, received, task }
    }

    /// Answers every request head on a connection with `answer`, keeping the
    /// connection open until the gateway closes it.
    pub async fn answering(answer: &'static [u8]) -> RawUpstream {
        Self::start(move |mut conn| async move {
            while conn.read_head().await.is_some() {
                conn.write(answer).await;
            }
        })
        .await
    }

    /// Everything connection `i` received.
    pub fn received_on(&self, i: usize) -> Vec<u8> {
        self.received.lock().unwrap()[i].lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Sends `bytes` to `addr` and reads until the gateway closes the connection
/// (or 10 s pass): the raw answer, as text.
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    read_until_close(&mut stream).await
}

/// Reads until EOF, a reset, or 10 s.
pub async fn read_until_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}
