//! gRPC through the gateway: a real tonic client (with a pass-through byte
//! codec, so no protobuf code generation), the gateway over h2c, and an h2c
//! upstream answering in gRPC's framing. Trailers and `grpc-status` from the
//! upstream reach the client; the gateway's own refusals arrive as gRPC
//! statuses a gRPC client understands.

mod common;

use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use common::gateway::TestGateway;
use common::upstream::{Upstream, UpstreamBody};
use futures_util::stream;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use jiff::Timestamp;
use keygate::meta::MetaChanges;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// Messages as raw bytes: enough to speak gRPC without generated code.
#[derive(Debug, Default, Clone, Copy)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// What the upstream saw of the last call.
#[derive(Debug, Default, Clone)]
struct Seen {
    version: Option<http::Version>,
    headers: HeaderMap,
}

/// An h2c gRPC upstream: answers each call with the request's message
/// reversed, and trailers carrying `grpc-status` (0, or 9 with a message
/// when the message is `refuse`) and a custom `x-upstream-trailer`.
async fn grpc_upstream() -> (Upstream, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let record = Arc::clone(&seen);
    let upstream = Upstream::start(move |req: Request<Incoming>| {
        let record = Arc::clone(&record);
        async move {
            *record.lock().unwrap() = Seen { version: Some(req.version()), headers: req.headers().clone() };
            let body = req.into_body().collect().await.unwrap().to_bytes();
            // One length-prefixed message: a flag byte, a 4-byte length, the bytes.
            let message: Vec<u8> = body[5..].iter().rev().copied().collect();
            let mut trailers = HeaderMap::new();
            trailers.insert("x-upstream-trailer", HeaderValue::from_static("kept"));
            let mut frames = Vec::new();
            if message == b"esufer" {
                trailers.insert("grpc-status", HeaderValue::from_static("9"));
                trailers.insert("grpc-message", HeaderValue::from_static("upstream%20says%20no"));
            } else {
                let mut framed = BytesMut::new();
                framed.put_u8(0);
                framed.put_u32(message.len() as u32);
                framed.put_slice(&message);
                frames.push(Ok(Frame::data(framed.freeze())));
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
            }
            frames.push(Ok(Frame::trailers(trailers)));
            let body: UpstreamBody = StreamBody::new(stream::iter(frames)).boxed();
            Response::builder().header("content-type", "application/grpc").body(body).unwrap()
        }
    })
    .await;
    (upstream, seen)
}

fn config(upstream: &str) -> String {
    format!(
        r#"
[[route]]
path = "/echo.Echo"
upstream = "grpc"
scopes = ["echo"]

[upstream.grpc]
targets = ["{upstream}"]
protocol = "http2"
"#
    )
}

async fn issue(gateway: &TestGateway, meta: &str) -> String {
    let changes = MetaChanges::from_query(meta, Timestamp::now()).unwrap();
    let issued =
        keygate::ops::issue(&*gateway.gateway.store, "kg_", "acme", changes, Timestamp::now()).await.unwrap();
    issued.key.expose().to_owned()
}

/// One unary call `/echo.Echo/Say` through the gateway with a real gRPC client.
async fn call(
    gateway: &TestGateway,
    key: Option<&str>,
    message: &'static str,
) -> Result<tonic::Response<Bytes>, Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gateway.addr))
        .unwrap()
        .connect()
        .await
        .expect("h2c connection to the gateway");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(Bytes::from_static(message.as_bytes()));
    if let Some(key) = key {
        request.metadata_mut().insert("x-api-key", key.parse().unwrap());
    }
    let path = http::uri::PathAndQuery::from_static("/echo.Echo/Say");
    grpc.unary(request, path, RawCodec).await
}

#[tokio::test]
async fn a_call_goes_through_h2c_with_its_trailers_and_grpc_status() {
    let (upstream, seen) = grpc_upstream().await;
    let gateway = TestGateway::start(&config(&upstream.url())).await;
    let key = issue(&gateway, "scope=echo").await;

    let response = call(&gateway, Some(&key), "ping").await.expect("call succeeds");
    let trailer = response.metadata().get("x-upstream-trailer").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(response.into_inner(), Bytes::from_static(b"gnip"));
    assert_eq!(trailer.as_deref(), Some("kept"), "the upstream's trailers reach the client");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.version, Some(http::Version::HTTP_2), "h2c to the upstream");
    assert_eq!(seen.headers["te"], "trailers", "gRPC's TE: trailers is forwarded");
    assert!(!seen.headers.contains_key("x-api-key"), "the key is not forwarded");
    assert_eq!(seen.headers["x-keygate-client"], "acme");

    // A failure the upstream reports in its trailers is the client's status.
    let status = call(&gateway, Some(&key), "refuse").await.expect_err("the upstream refused");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), "upstream says no");
}

#[tokio::test]
async fn a_call_without_a_key_is_unauthenticated_to_a_grpc_client() {
    let (upstream, seen) = grpc_upstream().await;
    let gateway = TestGateway::start(&config(&upstream.url())).await;
    let status = call(&gateway, None, "ping").await.expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(status.message(), "an API key is required");
    assert!(seen.lock().unwrap().version.is_none(), "nothing reached the upstream");
}

#[tokio::test]
async fn a_key_lacking_the_scope_is_permission_denied_and_an_unknown_path_not_found() {
    let (upstream, _seen) = grpc_upstream().await;
    let gateway = TestGateway::start(&config(&upstream.url())).await;
    let key = issue(&gateway, "scope=other").await;
    let status = call(&gateway, Some(&key), "ping").await.expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("`echo`"), "{}", status.message());

    // No route for another service: NOT_FOUND, still in gRPC's form.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gateway.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/other.Service/Call");
    let status = grpc.unary(tonic::Request::new(Bytes::new()), path, RawCodec).await.expect_err("no route");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}
