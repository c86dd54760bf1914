//! Large bodies stream through the gateway both ways with flat memory, and
//! server-sent events / long polls stream unbuffered, past the upstream
//! timeout, until an idle body timeout or the client going away.
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

// === Server-sent events and long polls ===

/// Sets its flag when dropped: the upstream's response stream is gone
/// (hyper drops a response body when its connection or stream closes).
struct DroppedFlag(Arc<tokio::sync::Notify>, Arc<std::sync::atomic::AtomicBool>);

impl Drop for DroppedFlag {
    fn drop(&mut self) {
        self.1.store(true, Ordering::SeqCst);
        self.0.notify_waiters();
    }
}

fn sse_config(upstream: &Upstream, extra: &str) -> String {
    format!(
        "[[route]]\npath = \"/\"\nupstream = \"api\"\npublic = true\n\n[upstream.api]\ntargets = [\"{}\"]\n{extra}\n",
        upstream.url()
    )
}

fn event(i: usize) -> Bytes {
    Bytes::from(format!("id: {i}\ndata: tick {i}\n\n"))
}

fn sse_response(body: UpstreamBody) -> Response<UpstreamBody> {
    Response::builder().header("content-type", "text/event-stream").body(body).unwrap()
}

/// Reads the next data frame, within `secs`.
async fn next_data(body: &mut hyper::body::Incoming, secs: u64) -> Option<Result<Bytes, hyper::Error>> {
    let within = std::time::Duration::from_secs(secs);
    loop {
        match tokio::time::timeout(within, body.frame()).await.expect("a frame in time")? {
            Ok(frame) => match frame.into_data() {
                Ok(data) => return Some(Ok(data)),
                Err(_) => continue,
            },
            Err(error) => return Some(Err(error)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_one_by_one_and_a_long_stream_outlives_the_upstream_timeout() {
    // The upstream sends event N only once the client has event N-1: a
    // gateway that buffered would never deliver the first, and the test
    // would time out. Ten events 200 ms apart last four times the timeout.
    let delivered = Arc::new(tokio::sync::Semaphore::new(1));
    let gate = Arc::clone(&delivered);
    let upstream = Upstream::start(move |_req| {
        let gate = Arc::clone(&gate);
        async move {
            let events = stream::unfold(0usize, move |i| {
                let gate = Arc::clone(&gate);
                async move {
                    if i == 10 {
                        return None;
                    }
                    gate.acquire().await.unwrap().forget();
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    Some((Ok::<_, hyper::Error>(Frame::data(event(i))), i + 1))
                }
            });
            sse_response(BodyExt::boxed(StreamBody::new(events)))
        }
    })
    .await;
    let gateway = common::gateway::TestGateway::start(&sse_config(&upstream, "timeout = \"500ms\"")).await;

    let started = std::time::Instant::now();
    let client = Client::builder(TokioExecutor::new()).build_http::<http_body_util::Empty<Bytes>>();
    let response =
        client.request(Request::get(gateway.url("/events")).body(Default::default()).unwrap()).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut text = String::new();
    for i in 0..10 {
        let data = next_data(&mut body, 5).await.expect("the stream goes on").expect("no error");
        text.push_str(std::str::from_utf8(&data).unwrap());
        assert!(
            text.ends_with(&format!("data: tick {i}\n\n")),
            "event {i} arrived whole before the next was sent: {text:?}"
        );
        delivered.add_permits(1);
    }
    assert!(next_data(&mut body, 5).await.is_none(), "the stream ends cleanly");
    assert!(started.elapsed() >= std::time::Duration::from_secs(2), "four times the 500 ms timeout");
}

#[tokio::test]
async fn a_stream_that_goes_silent_is_ended_by_the_body_idle_timeout() {
    let upstream = Upstream::start(|_req| async {
        let first = stream::iter([Ok::<_, hyper::Error>(Frame::data(event(0)))]);
        let silent = stream::pending();
        sse_response(BodyExt::boxed(StreamBody::new(futures_util::StreamExt::chain(first, silent))))
    })
    .await;
    let config = sse_config(&upstream, "timeout = \"500ms\"\nbody_idle_timeout = \"300ms\"");
    let gateway = common::gateway::TestGateway::start(&config).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<http_body_util::Empty<Bytes>>();
    let response =
        client.request(Request::get(gateway.url("/events")).body(Default::default()).unwrap()).await.unwrap();
    let mut body = response.into_body();
    assert_eq!(next_data(&mut body, 5).await.unwrap().unwrap(), event(0));
    let silent = std::time::Instant::now();
    let ended = next_data(&mut body, 5).await;
    assert!(matches!(ended, Some(Err(_))), "an aborted response, not a complete one: {ended:?}");
    assert!(silent.elapsed() >= std::time::Duration::from_millis(300), "not before the idle timeout");
}

#[tokio::test]
async fn a_client_going_away_cancels_the_upstream_stream_at_once() {
    let gone = Arc::new(tokio::sync::Notify::new());
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (g, d) = (Arc::clone(&gone), Arc::clone(&dropped));
    let upstream = Upstream::start(move |_req| {
        let flag = DroppedFlag(Arc::clone(&g), Arc::clone(&d));
        async move {
            // An endless long poll: an event every 50 ms, for as long as
            // the stream (and with it the flag) lives.
            let events = stream::unfold((0usize, flag), |(i, flag)| async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                Some((Ok::<_, hyper::Error>(Frame::data(event(i))), (i + 1, flag)))
            });
            sse_response(BodyExt::boxed(StreamBody::new(events)))
        }
    })
    .await;
    let gateway = common::gateway::TestGateway::start(&sse_config(&upstream, "")).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<http_body_util::Empty<Bytes>>();
    let response =
        client.request(Request::get(gateway.url("/events")).body(Default::default()).unwrap()).await.unwrap();
    let mut body = response.into_body();
    assert_eq!(next_data(&mut body, 5).await.unwrap().unwrap(), event(0));
    assert!(!dropped.load(Ordering::SeqCst), "the upstream stream is live while read");

    let notified = gone.notified();
    drop(body);
    drop(client);
    tokio::time::timeout(std::time::Duration::from_secs(5), async {
        if !dropped.load(Ordering::SeqCst) {
            notified.await;
        }
    })
    .await
    .expect("the upstream's stream is dropped once the client is gone");
}
