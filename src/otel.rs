//! OpenTelemetry tracing (`[tracing]`, off by default): the span exporter,
//! one span per proxied request, and W3C Trace Context in and out.
//!
//! Spans go to an OTLP/HTTP collector as protobuf (`POST {endpoint}/v1/traces`):
//! the HTTP transport needs only the hyper client already in the build,
//! where OTLP/gRPC would bring tonic's stack. A batch processor on the tokio
//! runtime that built the gateway (the control runtime under `keygate
//! serve`, never a worker's) queues ended spans and exports them; the
//! request path only hands a span over (`try_send`; a full queue drops it).
//!
//! The request's span is the OpenTelemetry API's own, not a `tracing` span
//! bridged by `tracing-opentelemetry`: the global `tracing` subscriber is
//! installed once per process, while the tracer belongs to one gateway's
//! config (tests run several gateways in one process). With tracing off,
//! `Gateway::otel` is `None` and the request path does no span work and no
//! allocation: each step is one `if let` on an empty `Option`.
//!
//! The incoming `traceparent` (and `tracestate`) is the span's parent, and
//! its sampled flag is honoured (parent-based sampling); a malformed one is
//! ignored (a new trace). Upstream gets a `traceparent` carrying the
//! gateway's span. With tracing off, both headers pass through untouched.

use std::borrow::Cow;
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, span_processor_with_async_runtime};

use crate::config::TracingConfig;

/// The path OTLP/HTTP collectors take spans on, after the configured base URL.
pub const TRACES_PATH: &str = "/v1/traces";

/// The exporter and the tracer of one gateway.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl Tracing {
    /// Builds the exporter for `config`. Must run inside a tokio runtime:
    /// the batch processor's task is spawned on it.
    pub fn start(config: &TracingConfig) -> Result<Self, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(config.traces_url())
            .with_timeout(config.export_timeout)
            .build()
            .map_err(|error| format!("cannot build the OTLP exporter: {error}"))?;
        let batch = span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_service_name(config.service_name.clone())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batch)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("keygate");
        Ok(Self { provider, tracer, propagator: TraceContextPropagator::new() })
    }

    /// Starts the span of a request whose head is `request`: its parent is
    /// the incoming `traceparent`, when there is a valid one.
    pub fn request_span<B>(&self, request: &http::Request<B>) -> Box<RequestSpan> {
        let parent = self.propagator.extract(&HeaderExtractor(request.headers()));
        let method = request.method().as_str().to_owned();
        let version = match request.version() {
            http::Version::HTTP_09 => "0.9",
            http::Version::HTTP_10 => "1.0",
            http::Version::HTTP_2 => "2",
            http::Version::HTTP_3 => "3",
            _ => "1.1",
        };
        let span = self
            .tracer
            .span_builder(method.clone())
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.clone()),
                KeyValue::new("url.path", request.uri().path().to_owned()),
                KeyValue::new("network.protocol.version", version),
            ])
            .start_with_context(&self.tracer, &parent);
        Box::new(RequestSpan { span, method })
    }

    /// Writes `traceparent` (and `tracestate`, when the trace has one) for
    /// a request the gateway sends on within `span`.
    pub fn inject(&self, span: &RequestSpan, headers: &mut HeaderMap) {
        let context = Context::new().with_remote_span_context(span.span.span_context().clone());
        self.propagator.inject_context(&context, &mut HeaderInjector(headers));
    }

    /// Exports every ended span now (blocks until the collector answered or
    /// the export timeout passed).
    pub fn flush(&self) -> Result<(), String> {
        self.provider.force_flush().map_err(|error| error.to_string())
    }

    /// Exports what is queued and stops the exporter: the last spans of a
    /// graceful stop are not lost. Blocks; call it off the runtime's
    /// threads (`spawn_blocking`), whose task does the export.
    pub fn shutdown(&self) -> Result<(), String> {
        self.provider.shutdown().map_err(|error| error.to_string())
    }
}

impl Drop for Tracing {
    /// The provider's own drop shuts it down, which waits for the batch
    /// task to answer: on a runtime thread (a current-thread runtime's
    /// only one) that task could never run, and the thread would hang. So
    /// the last references go to a blocking thread to be shut down there.
    /// (`keygate serve` shuts the exporter down itself before this.)
    fn drop(&mut self) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (provider, tracer) = (self.provider.clone(), self.tracer.clone());
            drop(runtime.spawn_blocking(move || {
                let _ = provider.shutdown();
                drop(tracer);
            }));
        }
    }
}

/// The span of one request, from its arrival until its response ends (the
/// span ends when this is dropped, by the metering phase).
pub struct RequestSpan {
    span: opentelemetry_sdk::trace::Span,
    method: String,
}

impl RequestSpan {
    /// The route matched: the span is named `METHOD ROUTE` (as the HTTP
    /// semantic conventions ask), with the host asked for.
    pub fn routed(&mut self, route: &str, host: Option<&str>) {
        self.span.update_name(Cow::Owned(format!("{} {route}", self.method)));
        self.span.set_attribute(KeyValue::new("http.route", route.to_owned()));
        if let Some(host) = host {
            self.span.set_attribute(KeyValue::new("server.address", host.to_owned()));
        }
    }

    /// The caller verified: its client and key ID (never the key or token).
    pub fn verified(&mut self, client: &str, key_id: Option<&str>) {
        self.span.set_attribute(KeyValue::new("keygate.client", client.to_owned()));
        if let Some(key_id) = key_id {
            self.span.set_attribute(KeyValue::new("keygate.key_id", key_id.to_owned()));
        }
        self.span.add_event("verified", Vec::new());
    }

    /// A step of the request path done (`admitted`, `upstream.request`, ...).
    pub fn event(&mut self, name: &'static str) {
        self.span.add_event(name, Vec::new());
    }

    /// The upstream answered, after `latency`.
    pub fn upstream_answered(&mut self, latency: Duration) {
        let ms = i64::try_from(latency.as_millis()).unwrap_or(i64::MAX);
        self.span.add_event("upstream.response", vec![KeyValue::new("keygate.upstream.latency_ms", ms)]);
    }

    /// The response head: its status, and the span's error status on a 5xx
    /// (a 4xx is the client's error, not the server span's).
    pub fn answered(&mut self, status: u16, request_id: &str) {
        self.span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        self.span.set_attribute(KeyValue::new("keygate.request_id", request_id.to_owned()));
        if status >= 500 {
            self.span.set_status(Status::error(""));
            self.span.set_attribute(KeyValue::new("error.type", status.to_string()));
        }
    }
}
