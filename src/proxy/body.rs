//! The client's request body on its way upstream, with the route's limits.
//!
//! [`RequestBody`] wraps hyper's `Incoming` so that what goes wrong on the
//! client's side is known as the client's doing when the upstream send
//! fails: a malformed chunked body, a client gone mid-body, a body over the
//! route's `max_body`, or an upload that stalls. Its error is a
//! [`ClientBodyError`], which hyper's client hands back as the source of the
//! send error, so the proxy maps it to a 4xx without any shared flag.
//!
//! It also tells the proxy how far the upload has got ([`Progress`]): the
//! upstream's response timeout starts once the request is sent in full, so a
//! slow but steady upload is not cut off as an upstream timeout.
//!
//! Under it, [`CountedBody`] counts the bytes actually read from the client,
//! for usage's `bytes_in`: a chunked upload declares no length, and what
//! hyper knows of it when the head arrives is only a lower bound.
//!
//! A request with no body (the common GET) costs nothing extra: no timer,
//! no shared state; both are made only when a body actually has to wait.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::config::BodyLimits;

/// Why the client's request body could not be passed on whole.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// The body did not parse (bad chunk size, overlong chunk extension,
    /// missing CRLF) or the client went away before its end.
    #[error("reading the request body: {0}")]
    Read(#[source] hyper::Error),
    #[error("request body over the route's limit of {0} bytes")]
    TooLarge(u64),
    #[error("request body stalled for {0:?}")]
    Stalled(Duration),
}

/// How far a request body has got upstream, shared between the body (which
/// hyper's client polls) and the proxy (which times the response).
#[derive(Debug)]
pub struct Progress {
    /// When the exchange started; the times below count from it.
    base: Instant,
    /// Nanoseconds from `base` to the last piece the upstream side took.
    last: AtomicU64,
    /// The body has ended (or failed, or been dropped): nothing more to send.
    done: AtomicBool,
    /// The upstream connection is waiting for the client's next piece: a
    /// pause then is the client's, bounded by the upload idle timeout.
    waiting: AtomicBool,
}

impl Progress {
    fn new(base: Instant) -> Self {
        Self { base, last: AtomicU64::new(0), done: AtomicBool::new(false), waiting: AtomicBool::new(false) }
    }

    fn touch(&self) {
        self.waiting.store(false, Ordering::Relaxed);
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Release);
    }

    fn finish(&self) {
        self.touch();
        self.done.store(true, Ordering::Release);
    }

    /// When the request was last seen moving (or finished sending).
    pub fn last(&self) -> Instant {
        self.base + Duration::from_nanos(self.last.load(Ordering::Acquire))
    }

    /// Whether the whole body has been handed to the upstream connection.
    pub fn done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

/// The client's body as read from the connection, counting its data bytes
/// into a counter the metering phase reads once the request is over.
#[derive(Debug)]
pub struct CountedBody {
    body: Incoming,
    /// `None` for a request that has no body: nothing to count, and no
    /// allocation for the common GET.
    read: Option<Arc<AtomicU64>>,
}

impl CountedBody {
    /// Wraps `body`; the counter is `None` when the body is empty from the start.
    pub fn new(body: Incoming) -> (Self, Option<Arc<AtomicU64>>) {
        let read = (!body.is_end_stream()).then(|| Arc::new(AtomicU64::new(0)));
        (Self { body, read: read.clone() }, read)
    }
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // Both fields are `Unpin`, so no projection is needed.
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(read)) = (&polled, &self.read)
            && let Some(data) = frame.data_ref()
        {
            read.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Where a forwarded body's bytes come from.
enum Source {
    /// Streamed from the client as they arrive.
    Client(CountedBody),
    /// Read whole already (a body kept for retries, or none at all): sent
    /// as one piece, with no limit or stall left to watch.
    Buffered(Option<Bytes>),
}

/// The request body as forwarded upstream; see the module doc.
pub struct RequestBody {
    body: Source,
    /// Bytes still allowed under `max_body` (`u64::MAX` when unlimited).
    left: u64,
    limits: BodyLimits,
    /// Armed the first time the body has to wait for the client.
    stall: Option<Pin<Box<Sleep>>>,
    /// A frame arrived since the stall timer was last armed.
    moved: bool,
    progress: Option<Arc<Progress>>,
}

impl RequestBody {
    /// Wraps `body`; the [`Progress`] is `None` when there is no body to send
    /// (the request is sent once its head is).
    pub fn new(body: CountedBody, limits: &BodyLimits, started: Instant) -> (Self, Option<Arc<Progress>>) {
        let progress = (!body.is_end_stream()).then(|| Arc::new(Progress::new(started)));
        let wrapped = Self {
            body: Source::Client(body),
            left: limits.max.unwrap_or(u64::MAX),
            limits: limits.clone(),
            stall: None,
            moved: false,
            progress: progress.clone(),
        };
        (wrapped, progress)
    }

    /// A body already read whole (or an empty one): what a retry sends.
    pub fn buffered(bytes: Bytes) -> Self {
        Self {
            body: Source::Buffered((!bytes.is_empty()).then_some(bytes)),
            left: u64::MAX,
            limits: BodyLimits::default(),
            stall: None,
            moved: false,
            progress: None,
        }
    }

    fn finish(&mut self) {
        if let Some(progress) = self.progress.take() {
            progress.finish();
        }
    }

    fn fail(&mut self, error: ClientBodyError) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        self.finish();
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        // Every field is `Unpin` (the timer is boxed), so no projection is needed.
        let this = self.get_mut();
        let body = match &mut this.body {
            Source::Client(body) => body,
            Source::Buffered(bytes) => return Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes)))),
        };
        match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.left {
                        return this.fail(ClientBodyError::TooLarge(this.limits.max.unwrap_or(u64::MAX)));
                    }
                    this.left -= len;
                }
                this.moved = true;
                if body.is_end_stream() {
                    this.finish();
                } else if let Some(progress) = &this.progress {
                    progress.touch();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => this.fail(ClientBodyError::Read(error)),
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let idle = this.limits.idle_timeout;
                match &mut this.stall {
                    None => this.stall = Some(Box::pin(tokio::time::sleep(idle))),
                    Some(timer) if this.moved => timer.as_mut().reset(Instant::now() + idle),
                    Some(_) => {}
                }
                this.moved = false;
                if let Some(progress) = &this.progress {
                    progress.waiting.store(true, Ordering::Relaxed);
                }
                if let Some(timer) = &mut this.stall
                    && timer.as_mut().poll(cx).is_ready()
                {
                    return this.fail(ClientBodyError::Stalled(idle));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Source::Client(body) => body.is_end_stream(),
            Source::Buffered(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Source::Client(body) => body.size_hint(),
            Source::Buffered(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        // hyper drops the body when the upstream answered before reading it
        // all, or the connection failed: there is nothing more to send.
        self.finish();
    }
}

/// The client error behind a failed upstream send, if the client's body is
/// what failed it.
pub fn client_fault(error: &hyper::Error) -> Option<&ClientBodyError> {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(fault) = cause.downcast_ref::<ClientBodyError>() {
            return Some(fault);
        }
        source = cause.source();
    }
    None
}

/// The response-headers deadline for a request with a body: `timeout` after
/// the body was sent in full, or after the upstream last took a piece of it
/// while it stops reading. Pauses that are the client's do not count (the
/// body's own stall timer bounds those).
pub async fn response_deadline(progress: &Progress, timeout: Duration) {
    loop {
        let now = Instant::now();
        let deadline = if !progress.done() && progress.waiting.load(Ordering::Relaxed) {
            now + timeout
        } else {
            progress.last() + timeout
        };
        if now >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}
