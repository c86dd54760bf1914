//! OpenTelemetry tracing over OTLP (issue 19, "Observability"), end to end:
//! an OTLP/HTTP receiver in the test (a hyper server on `127.0.0.1:0`
//! taking `POST /v1/traces`, decoded with the collector protocol's own
//! protobuf types), a real upstream that mirrors the `traceparent` it got,
//! and the real gateway in process with `[tracing]` on.
//!
//! A request that brings a `traceparent` yields a span of that trace whose
//! parent is the caller's span, and upstream gets the same trace with the
//! gateway's span as parent; one that brings none (or a malformed one)
//! starts a new trace; the span carries the route, method, status, client
//! and key ID and no key material (the exported bytes are searched for
//! the key); a 5xx is an error span; a graceful stop exports the last
//! span. With tracing off, `traceparent` and `tracestate` reach the
//! upstream as the client sent them.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::gateway::{Answer, TestGateway, http1_client, send};
use common::upstream::{Upstream, closed_port_url, full};
use common::wait::poll_until;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use jiff::Timestamp;
use keygate::meta::MetaChanges;
use keygate::ops;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode as SpanStatus};
use prost::Message as _;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP collector: keeps the body of every `POST /v1/traces`.
struct Receiver {
    server: Upstream,
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&bodies);
        let server = Upstream::start(move |request: Request<hyper::body::Incoming>| {
            let kept = Arc::clone(&kept);
            async move {
                let right = request.method() == http::Method::POST
                    && request.uri().path() == "/v1/traces"
                    && request.headers()["content-type"] == "application/x-protobuf";
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let status = if right {
                    kept.lock().unwrap().push(body);
                    StatusCode::OK
                } else {
                    StatusCode::NOT_FOUND
                };
                // An empty ExportTraceServiceResponse: all accepted.
                Response::builder()
                    .status(status)
                    .header("content-type", "application/x-protobuf")
                    .body(full(Bytes::new()))
                    .unwrap()
            }
        })
        .await;
        Receiver { server, bodies }
    }

    /// Every span received so far.
    fn spans(&self) -> Vec<Span> {
        let bodies = self.bodies.lock().unwrap();
        let mut spans = Vec::new();
        for body in bodies.iter() {
            let export = ExportTraceServiceRequest::decode(body.clone()).expect("an OTLP protobuf body");
            for resource in export.resource_spans {
                let name = resource.resource.as_ref().and_then(|r| {
                    r.attributes.iter().find(|a| a.key == "service.name").and_then(|a| text(a.value.as_ref()))
                });
                assert_eq!(name.as_deref(), Some("keygate-test"), "the configured service.name");
                spans.extend(resource.scope_spans.into_iter().flat_map(|scope| scope.spans));
            }
        }
        spans
    }

    fn raw(&self) -> Vec<u8> {
        self.bodies.lock().unwrap().concat()
    }

    /// Waits until a span of `trace_id` (hex) has arrived, asking the
    /// gateway to export what it holds between looks.
    async fn span_of(&self, gw: &TestGateway, trace_id: &str) -> Span {
        let find = || self.spans().into_iter().find(|span| hex::encode(&span.trace_id) == trace_id);
        poll_until(Duration::from_secs(20), &format!("a span of trace {trace_id} is exported"), || async {
            flush(gw).await;
            find().is_some()
        })
        .await;
        find().unwrap()
    }
}

/// Exports the ended spans now (blocking: off the test's runtime thread,
/// which runs the export).
async fn flush(gw: &TestGateway) {
    let gateway = Arc::clone(&gw.gateway);
    tokio::task::spawn_blocking(move || gateway.otel.as_ref().expect("tracing is on").flush().unwrap())
        .await
        .unwrap();
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> Option<String> {
    match value?.value.as_ref()? {
        Value::StringValue(text) => Some(text.clone()),
        Value::IntValue(n) => Some(n.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| text(a.value.as_ref()))
}

fn config(upstream: &str, down: &str, receiver: Option<&Receiver>) -> String {
    let tracing = receiver.map_or_else(String::new, |r| {
        format!(
            "[tracing]\notlp_endpoint = \"http://{}\"\nservice_name = \"keygate-test\"\nsample_ratio = 1.0\n",
            r.server.addr
        )
    });
    format!(
        r#"{tracing}
[[route]]
path = "/api"
upstream = "api"

[[route]]
path = "/down"
upstream = "down"
public = true

[upstream.api]
targets = ["{upstream}"]

[upstream.down]
targets = ["{down}"]
"#
    )
}

/// The headers the mirror upstream says it received.
fn upstream_header(answer: &Answer, name: &str) -> Option<String> {
    answer.json()["headers"][name].as_str().map(str::to_owned)
}

async fn get(gw: &TestGateway, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = Request::get(gw.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(&http1_client(), request.body(Full::default()).unwrap()).await
}

async fn issue(gw: &TestGateway) -> (String, String) {
    let changes = MetaChanges::from_query("scope=read", Timestamp::now()).unwrap();
    let issued = ops::issue(&*gw.gateway.store, "kg_", "acme", changes, Timestamp::now()).await.unwrap();
    (issued.key.expose().to_owned(), issued.record.id.to_string())
}

/// `traceparent`'s parts: (trace ID, parent ID, flags).
fn parts(traceparent: &str) -> (String, String, String) {
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{traceparent}");
    assert_eq!(fields[0], "00", "{traceparent}");
    (fields[1].to_owned(), fields[2].to_owned(), fields[3].to_owned())
}

async fn start(receiver: Option<&Receiver>) -> (TestGateway, Upstream) {
    let upstream = Upstream::mirror().await;
    let gw = TestGateway::start(&config(&upstream.url(), &closed_port_url().await, receiver)).await;
    (gw, upstream)
}

#[tokio::test]
async fn an_incoming_traceparent_is_the_parent_of_the_request_span_and_upstream_gets_the_gateways() {
    let receiver = Receiver::start().await;
    let (gw, _upstream) = start(Some(&receiver)).await;
    let (key, key_id) = issue(&gw).await;

    let incoming = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let answer = get(
        &gw,
        "/api/orders/7",
        &[("x-api-key", &key), ("traceparent", &incoming), ("tracestate", "vendor=abc")],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let sent = upstream_header(&answer, "traceparent").expect("upstream got a traceparent");
    let (trace, parent, flags) = parts(&sent);
    assert_eq!(trace, TRACE_ID, "upstream's request is in the caller's trace");
    assert_ne!(parent, PARENT_ID, "upstream's parent is the gateway's span, not the caller's");
    assert_eq!(flags, "01", "sampled, as the caller said");
    assert_eq!(upstream_header(&answer, "tracestate").as_deref(), Some("vendor=abc"), "tracestate kept");

    let span = receiver.span_of(&gw, TRACE_ID).await;
    assert_eq!(hex::encode(&span.parent_span_id), PARENT_ID, "the caller's span is the parent");
    assert_eq!(hex::encode(&span.span_id), parent, "upstream was told the gateway's span");
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(span.name, "GET /api");
    assert_eq!(attribute(&span, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(attribute(&span, "http.route").as_deref(), Some("/api"));
    assert_eq!(attribute(&span, "url.path").as_deref(), Some("/api/orders/7"));
    assert_eq!(attribute(&span, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attribute(&span, "network.protocol.version").as_deref(), Some("1.1"));
    assert_eq!(attribute(&span, "server.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(attribute(&span, "keygate.client").as_deref(), Some("acme"));
    assert_eq!(attribute(&span, "keygate.key_id").as_deref(), Some(key_id.as_str()));
    let request_id = answer.headers["x-request-id"].to_str().unwrap();
    assert_eq!(attribute(&span, "keygate.request_id").as_deref(), Some(request_id));
    let events: Vec<&str> = span.events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(events, ["verified", "admitted", "upstream.request", "upstream.response"]);
    assert_ne!(span.status.as_ref().map_or(0, |s| s.code), SpanStatus::Error as i32, "a 200 is no error");

    // No key material anywhere in what was exported: not the key, not its secret part.
    let raw = receiver.raw();
    let secret = &key[key.len() - 20..];
    for needle in [key.as_str(), secret] {
        assert!(!raw.windows(needle.len()).any(|w| w == needle.as_bytes()), "{needle} was exported");
    }
}

#[tokio::test]
async fn without_a_valid_traceparent_a_new_trace_starts_and_a_graceful_stop_exports_it() {
    let receiver = Receiver::start().await;
    let (mut gw, _upstream) = start(Some(&receiver)).await;
    let (key, _) = issue(&gw).await;

    // None at all, then a malformed one: each a new trace, never an error.
    let mut traces = Vec::new();
    for headers in [
        vec![],
        vec![("traceparent", "00-not-a-trace-01")],
        vec![("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01")],
    ] {
        let mut headers = headers;
        headers.push(("x-api-key", key.as_str()));
        let answer = get(&gw, "/api/new", &headers).await;
        assert_eq!(answer.status, StatusCode::OK, "{headers:?}: {}", answer.text());
        let (trace, parent, flags) = parts(&upstream_header(&answer, "traceparent").expect("a traceparent"));
        assert_eq!((trace.len(), parent.len(), flags.as_str()), (32, 16, "01"), "sampled at ratio 1");
        assert_ne!(trace, "0".repeat(32));
        traces.push((trace, parent));
    }
    assert_ne!(traces[0].0, traces[1].0, "each request its own trace");
    assert_ne!(traces[1].0, traces[2].0, "each request its own trace");

    // A graceful stop: no flush asked for, the exporter's shutdown sends
    // what is queued (as `keygate serve` does once the workers drained).
    let drained = gw.begin_shutdown().await.unwrap();
    assert_eq!(drained, keygate::server::Drained::Clean);
    let gateway = Arc::clone(&gw.gateway);
    tokio::task::spawn_blocking(move || gateway.otel.as_ref().unwrap().shutdown().unwrap()).await.unwrap();
    let spans = receiver.spans();
    for (trace, parent) in &traces {
        let span = spans.iter().find(|s| &hex::encode(&s.trace_id) == trace).expect("the span was exported");
        assert!(span.parent_span_id.is_empty(), "a root span: {span:?}");
        assert_eq!(&hex::encode(&span.span_id), parent);
    }
}

#[tokio::test]
async fn an_unsampled_caller_is_followed_and_a_5xx_is_an_error_span() {
    let receiver = Receiver::start().await;
    let (gw, _upstream) = start(Some(&receiver)).await;
    let (key, _) = issue(&gw).await;

    // Parent-based: the caller's "not sampled" holds, and is passed on.
    let unsampled = format!("00-{TRACE_ID}-{PARENT_ID}-00");
    let answer = get(&gw, "/api/quiet", &[("x-api-key", &key), ("traceparent", &unsampled)]).await;
    let (trace, parent, flags) = parts(&upstream_header(&answer, "traceparent").unwrap());
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE_ID, "00"));
    assert_ne!(parent, PARENT_ID);

    let failing = "0af7651916cd43dd8448eb211c80319c";
    let answer = get(&gw, "/down", &[("traceparent", &format!("00-{failing}-b7ad6b7169203331-01"))]).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let span = receiver.span_of(&gw, failing).await;
    assert_eq!(attribute(&span, "http.response.status_code").as_deref(), Some("502"));
    assert_eq!(span.status.as_ref().map(|s| s.code), Some(SpanStatus::Error as i32));
    assert!(
        receiver.spans().iter().all(|s| hex::encode(&s.trace_id) != TRACE_ID),
        "the unsampled request's span was not exported (the 502's, after it, was)"
    );
}

#[tokio::test]
async fn with_tracing_off_traceparent_and_tracestate_pass_through_untouched() {
    let (gw, _upstream) = start(None).await;
    assert!(gw.gateway.otel.is_none());
    let (key, _) = issue(&gw).await;
    let incoming = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let answer =
        get(&gw, "/api", &[("x-api-key", &key), ("traceparent", &incoming), ("tracestate", "a=1,b=2")]).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(upstream_header(&answer, "traceparent"), Some(incoming));
    assert_eq!(upstream_header(&answer, "tracestate").as_deref(), Some("a=1,b=2"));
    // And none is made up when the client sent none.
    let answer = get(&gw, "/api", &[("x-api-key", &key)]).await;
    assert_eq!(upstream_header(&answer, "traceparent"), None);
}
