//! The least a keep-alive HTTP/1.1 proxy on tokio does per request: the floor
//! that `benches/e2e/anatomy.sh` measures keygate's CPU per request against.
//!
//! One single-threaded runtime, as keygate's one worker. Per client
//! connection one upstream connection; each request head is parsed with
//! `httparse`, the `x-api-key` compared with the one key, the head rewritten
//! (key and `Connection` dropped, `X-Forwarded-For` and a client header
//! added) and written upstream; the response head is parsed and the response
//! copied back by its `Content-Length`. Nothing else: GET without a body, no
//! chunked bodies, no limits, no timeouts, no usage, no metrics. It is not a
//! proxy to run anywhere, only the lower bound of what any tokio proxy
//! spends in user space on this workload.
//!
//!   keygate-floor LISTEN UPSTREAM KEY

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BUFFER: usize = 8192;
const MAX_HEADERS: usize = 32;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream), Some(key)) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: keygate-floor LISTEN UPSTREAM KEY");
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(&listen).await?;
        loop {
            let (client, _) = listener.accept().await?;
            let (upstream, key) = (upstream.clone(), key.clone());
            tokio::spawn(async move {
                let _ = proxy(client, &upstream, key.as_bytes()).await;
            });
        }
    })
}

/// Serves one client connection until it closes or sends something this
/// floor does not handle (then the connection is dropped).
async fn proxy(mut client: TcpStream, upstream: &str, key: &[u8]) -> Option<()> {
    client.set_nodelay(true).ok()?;
    let mut upstream = TcpStream::connect(upstream).await.ok()?;
    upstream.set_nodelay(true).ok()?;
    let (mut request, mut buffered) = (vec![0u8; BUFFER], 0);
    let mut response = vec![0u8; BUFFER];
    let mut head = Vec::with_capacity(BUFFER);
    loop {
        let consumed = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(len) = parsed.parse(&request[..buffered]).ok()? {
                let is_key = |h: &httparse::Header| h.name.eq_ignore_ascii_case("x-api-key");
                if !parsed.headers.iter().any(|h| is_key(h) && h.value == key) {
                    return None;
                }
                head.clear();
                for part in [parsed.method?.as_bytes(), b" ", parsed.path?.as_bytes(), b" HTTP/1.1\r\n"] {
                    head.extend_from_slice(part);
                }
                for h in
                    parsed.headers.iter().filter(|h| !is_key(h) && !h.name.eq_ignore_ascii_case("connection"))
                {
                    for part in [h.name.as_bytes(), b": ", h.value, b"\r\n"] {
                        head.extend_from_slice(part);
                    }
                }
                head.extend_from_slice(b"x-forwarded-for: 127.0.0.1\r\nx-keygate-client: bench\r\n\r\n");
                break len;
            }
            let read = client.read(&mut request[buffered..]).await.ok()?;
            if read == 0 {
                return None;
            }
            buffered += read;
        };
        request.copy_within(consumed..buffered, 0);
        buffered -= consumed;
        upstream.write_all(&head).await.ok()?;

        let (mut received, mut total) = (0, None);
        while total.is_none_or(|total| received < total) {
            let read = upstream.read(&mut response[received..]).await.ok()?;
            if read == 0 {
                return None;
            }
            received += read;
            if total.is_none() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut parsed = httparse::Response::new(&mut headers);
                if let httparse::Status::Complete(len) = parsed.parse(&response[..received]).ok()? {
                    let length =
                        parsed.headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-length"))?;
                    let length: usize = std::str::from_utf8(length.value).ok()?.parse().ok()?;
                    // A response that does not fit the buffer is past this floor.
                    total = Some(Some(len + length).filter(|&total| total <= BUFFER)?);
                }
            }
        }
        client.write_all(&response[..received]).await.ok()?;
    }
}
