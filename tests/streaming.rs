//! Large bodies stream through the gateway both ways with flat memory.
//!
//! Its own test binary so that the resident-memory reading is not disturbed by
//! other tests running in the same process.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use common::upstream::{Upstream, UpstreamBody};
use futures_util::stream;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const CHUNK: usize = 256 * 1024;
const TOTAL: u64 = 1024 * 1024 * 1024;

/// A body of `TOTAL` bytes generated chunk by chunk, never held whole.
fn generated_body() -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>>> {
    let chunk = Bytes::from(vec![b'k'; CHUNK]);
    let chunks = (TOTAL / CHUNK as u64) as usize;
    StreamBody::new(stream::iter(std::iter::repeat_n(chunk, chunks).map(|c| Ok(Frame::data(c)))))
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gigabyte_streams_up_and_down_with_flat_memory() {
    // The upstream counts what it receives, then sends the same amount back.
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let upstream = Upstream::start(move |req: Request<hyper::body::Incoming>| {
        let counter = Arc::clone(&counter);
        async move {
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            let body: UpstreamBody = generated_body().map_err(|never| match never {}).boxed();
            Response::new(body)
        }
    })
    .await;
    let config = format!(
        "[[route]]\npath = \"/\"\nupstream = \"api\"\npublic = true\nmax_body = \"unlimited\"\n\n[upstream.api]\ntargets = [\"{}\"]\ntimeout = \"120s\"\n",
        upstream.url()
    );
    let gateway = common::gateway::TestGateway::start(&config).await;

    let before = rss_kib();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let request = Request::post(gateway.url("/upload")).body(generated_body()).unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut downloaded = 0u64;
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            downloaded += data.len() as u64;
        }
    }
    let grown_mib = rss_kib().saturating_sub(before) / 1024;

    assert_eq!(received.load(Ordering::Relaxed), TOTAL, "upload arrived whole");
    assert_eq!(downloaded, TOTAL, "download arrived whole");
    // Buffering either direction would grow memory by hundreds of MiB.
    assert!(
        grown_mib < 64,
        "resident memory grew by {grown_mib} MiB while streaming {} MiB each way",
        TOTAL >> 20
    );
}
