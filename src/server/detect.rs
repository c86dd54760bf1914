//! Telling HTTP/1.1 from h2c by a connection's first bytes, and handing those
//! bytes to hyper again.
//!
//! The first read is ours, and hyper is handed its bytes again ([`Replay`]):
//! a peek would cost one more syscall per connection (strace, a connection
//! per request: 3 `recvfrom` against nginx's 2). The read takes up to hyper's
//! own first buffer size, so hyper still gets the whole request head at once.
//! Reading goes on only while the bytes so far are a prefix of the HTTP/2
//! preface (even the single byte `P`): the caller bounds the whole detection
//! with the header read timeout, so a client cannot park a connection here.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What an HTTP/2 client sends first (RFC 9113 §3.4); h2c with prior knowledge.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How much one read takes: hyper's first read buffer (8 KiB), so that what
/// hyper is handed fits it as a read of its own would.
const FIRST_READ: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// h2c with prior knowledge: the client's first bytes are the preface.
    Http2,
}

thread_local! {
    /// Where each read lands before its bytes are copied out at their size:
    /// one buffer per thread instead of an 8 KiB allocation per connection.
    /// Borrowed only between awaits.
    static READ_BUFFER: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; FIRST_READ].into_boxed_slice());
}

/// Reads until the first bytes name the protocol, and returns them. `None`:
/// the client closed before they did (nothing to serve).
pub async fn read_protocol(stream: &TcpStream) -> std::io::Result<Option<(Protocol, Bytes)>> {
    let mut first = read_some(stream).await?;
    loop {
        if first.is_empty() {
            return Ok(None);
        }
        if let Some(protocol) = protocol_of(&first) {
            return Ok(Some((protocol, first)));
        }
        // A prefix of the preface: rare (a client writing it in pieces), so
        // joining the pieces may allocate.
        let more = read_some(stream).await?;
        if more.is_empty() {
            return Ok(None);
        }
        let mut joined = BytesMut::with_capacity(first.len() + more.len());
        joined.extend_from_slice(&first);
        joined.extend_from_slice(&more);
        first = joined.freeze();
    }
}

/// One read, waiting until something (or the end of the stream: then
/// nothing) arrives. Plain TCP only: behind TLS, ALPN names the protocol.
async fn read_some(stream: &TcpStream) -> std::io::Result<Bytes> {
    loop {
        stream.readable().await?;
        let read = READ_BUFFER.with_borrow_mut(|buffer| match stream.try_read(buffer) {
            Ok(n) => Ok(Some(Bytes::copy_from_slice(&buffer[..n]))),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(error) => Err(error),
        });
        if let Some(first) = read? {
            return Ok(first);
        }
    }
}

/// The protocol the first bytes announce; `None` while they are a prefix of
/// the HTTP/2 preface and more must be read to know.
pub fn protocol_of(first: &[u8]) -> Option<Protocol> {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        Some(Protocol::Http1)
    } else if n == H2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

/// A stream that first gives back bytes already read from it, then reads on.
/// The bytes are dropped once handed over, so an idle connection keeps none.
pub struct Replay<S> {
    first: Option<Bytes>,
    inner: S,
}

impl<S> Replay<S> {
    pub fn new(first: Bytes, inner: S) -> Self {
        Self { first: (!first.is_empty()).then_some(first), inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(first) = &mut self.first {
            let n = first.len().min(buf.remaining());
            buf.put_slice(&first.split_to(n));
            if first.is_empty() {
                self.first = None;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

// hyper-util's `Rewind` does the same but is private; tokio's `chain` only reads.
impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair: (client, the server's accepted side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[test]
    fn first_bytes_tell_http1_from_h2c() {
        assert_eq!(protocol_of(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Some(Protocol::Http1));
        assert_eq!(protocol_of(b"POST /orders HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(protocol_of(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(protocol_of(&[H2_PREFACE, b"\x00\x00\x12\x04"].concat()), Some(Protocol::Http2));
        assert_eq!(protocol_of(&H2_PREFACE[..8]), None);
        assert_eq!(protocol_of(b"P"), None);
        assert_eq!(protocol_of(b"PUT / HTTP/1.1\r\n"), Some(Protocol::Http1));
    }

    #[tokio::test]
    async fn a_preface_in_pieces_is_read_to_its_end() {
        let (mut client, server) = pair().await;
        let reading = tokio::spawn(async move { read_protocol(&server).await.unwrap() });
        for piece in H2_PREFACE.chunks(5) {
            client.write_all(piece).await.unwrap();
            client.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        let (protocol, first) = reading.await.unwrap().expect("protocol known");
        assert_eq!(protocol, Protocol::Http2);
        assert_eq!(&first[..], H2_PREFACE);
    }

    #[tokio::test]
    async fn a_client_that_closes_before_the_protocol_is_known_is_nothing_to_serve() {
        let (mut client, server) = pair().await;
        client.write_all(b"PRI * HT").await.unwrap();
        client.shutdown().await.unwrap();
        assert!(read_protocol(&server).await.unwrap().is_none());
        let (client, server) = pair().await;
        drop(client);
        assert!(read_protocol(&server).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn replay_hands_back_the_first_bytes_in_pieces_then_reads_on() {
        let (mut client, server) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let (_, first) = read_protocol(&server).await.unwrap().unwrap();
        assert_eq!(&first[..], b"GET / HTTP/1.1\r\n");
        client.write_all(b"Host: x\r\n\r\n").await.unwrap();
        client.shutdown().await.unwrap();

        let mut replay = Replay::new(first, server);
        // A reader with less room than the replayed bytes gets them in order.
        let mut small = [0u8; 5];
        replay.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"GET /");
        let mut rest = Vec::new();
        replay.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b" HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(replay.first.is_none(), "nothing kept once handed over");

        // Writes go straight to the stream.
        let (mut client, server) = pair().await;
        let mut replay = Replay::new(Bytes::new(), server);
        replay.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        let mut got = [0u8; 17];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"HTTP/1.1 200 OK\r\n");
    }
}
