//! keygate: an API-key gateway.
//!
//! A reverse proxy that sits in front of existing HTTP APIs. For every request
//! it finds the route, reads and verifies the API key, checks the key's scopes
//! against the route, applies the key's rate limit and quota, forwards the
//! request upstream and counts the usage.
//!
//! Components, in the order a request meets them:
//! - [`server`]: listeners and connections (HTTP/1.1 + HTTP/2): connection caps,
//!   protocol detection, a deadline for every connection state, graceful shutdown.
//! - [`tls`]: TLS listeners: certificates by SNI, ALPN, client certificates, reloads.
//! - [`handler`]: the request path, top to bottom; the table of contents.
//! - [`sanitize`]: the request's one host, and override headers removed.
//! - [`path`]: the canonical form of a request path (and strict refusals).
//! - [`route`]: longest-prefix route matching on host and canonical path.
//! - [`key`]: the key string format, parsing, generation and hashing.
//! - [`meta`]: a key's scope metadata (scopes, limits, quota, expiry).
//! - [`client`]: client records: limits, quota and status shared by a client's keys.
//! - [`client_cert`]: which client a verified client certificate names (`[client_certs] id_from`).
//! - [`store`]: where key records live (Redis, the `keys/` file store).
//! - [`redis_target`]: a Redis URL and its TLS files, checked; every Redis client is built there.
//! - [`upstream_tls`]: the rustls client config of an `https://` upstream, built at config load.
//! - [`pem`]: reading the PEM files TLS settings name, the same way for every field.
//! - [`proxy`]: the upstream client pools and header rewriting.
//! - [`echo`]: the built-in echo upstream.
//! - [`meter`]: the last phase: usage and metrics once the response has ended.
//! - [`access_log`]: the access log line, written by the last phase, and its non-blocking sink.
//! - [`request_id`]: the request's ID, kept from the client or made here.
//! - [`error`]: the one place mapping errors to responses.
//! - [`config`]: `gateway.toml`, parsed and validated into typed values.
//! - [`credential`]: finding the key in a request and stripping it.
//! - [`auth`]: verification through the in-process cache, invalidations.
//! - [`tokens`]: the token endpoint and JWKS (access tokens, `auth::jwt`).
//! - [`jwks`]: external issuers' JWKS documents: fetched or read, parsed into keys by `kid`.
//! - [`refresh`]: refresh tokens: rotation, reuse detection, their stores and cookie.
//! - [`scope`]: does the key's scope cover the route and method.
//! - [`limit`]: per-key rate limits and quotas, and their headers.
//! - [`ops`]: key operations shared by the CLI and the admin API.
//! - [`usage`]: usage counted in memory, flushed to Redis; the audit trail.
//! - [`otel`]: OpenTelemetry tracing: a span per request, exported over OTLP; W3C trace context.
//! - [`metrics`]: Prometheus counters and histograms, rendered at `/metrics`.
//! - [`admin`]: the admin listener: keys API, reload, `/metrics`, health checks.
//! - [`reload`]: hot reload of the config file (SIGHUP, `POST /admin/reload`).
//! - [`systemd`]: `sd_notify` to the service manager: ready, reloading, stopping, watchdog.
//! - [`cli`]: the `keygate` command.
//! - [`build_info`]: the version and the git commit this binary was built from.
//! - [`worker`]: which worker thread runs the current code (picks its pools).
#![forbid(unsafe_code)]
// A panic on the request path costs a request; outside tests, say why a
// value is there instead of unwrapping it.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod access_log;
pub mod admin;
pub mod auth;
pub mod build_info;
pub mod cli;
pub mod client;
pub mod client_cert;
pub mod clock;
pub mod config;
pub mod credential;
pub mod echo;
pub mod error;
pub mod exposition;
pub mod gateway;
pub mod handler;
pub mod jwks;
pub mod key;
pub mod limit;
pub mod meta;
pub mod meter;
pub mod metrics;
pub mod ops;
pub mod otel;
pub mod path;
pub mod pem;
pub mod process_metrics;
pub mod proxy;
pub mod redis_target;
pub mod refresh;
pub mod reload;
pub mod request_id;
pub mod route;
pub mod sanitize;
pub mod scope;
pub mod server;
pub mod signing;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod tokens;
pub mod upstream_tls;
pub mod usage;
pub mod worker;
