//! Run with `cargo bench --bench request` (add `-- --warm-up-time 1 --measurement-time 3` for a quick pass).
//!
//! The per-request steps between verification and forwarding: the scope
//! check, and the header rewrite (hop-by-hop removal, `X-Forwarded-*`,
//! identity headers) on a typical browser-sized header set; and the last
//! phase's access line: the request ID, the query's redaction, the line
//! formatted (JSON and text), and formatted and queued on a real sink (its
//! writer thread writing to `/dev/null`); and one whole request through the
//! gateway in process (the echo route over loopback, optional phases off).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use jiff::Timestamp;
use keygate::config::{Config, LogFormat};
use keygate::key::{SecretHash, generate};
use keygate::meta::KeyMeta;
use keygate::store::KeyRecord;
use keygate::{access_log, proxy, request_id, scope};

fn request_benches(c: &mut Criterion) {
    let config = Config::defaults();
    let route = config.routes[0].clone();
    let granted = vec!["read-write".to_owned()];
    c.bench_function("scope check (default read/write rule)", |b| {
        b.iter(|| black_box(scope::check(black_box(&granted), &route, &Method::GET)))
    });

    let Ok(generated) = generate("kg_", "12345-ABCDE") else { panic!("key generation failed") };
    let record = KeyRecord {
        id: generated.id,
        secret_hash: SecretHash([7; 32]),
        meta: KeyMeta::new(Timestamp::now()),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-GB,en;q=0.9"),
        ("x-request-id", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("connection", "keep-alive"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    // Made once per verified key and once per connection, as the gateway does.
    let identity = proxy::Identity::new(record.client(), record.id.as_str(), &record.meta.scopes);
    let peer = proxy::Peer::new(std::net::SocketAddr::from(([127, 0, 0, 1], 40000)));
    let host = HeaderValue::from_static("api.example.com");
    c.bench_function("header rewrite (hop-by-hop, forwarded, identity)", |b| {
        b.iter_batched_ref(
            || headers.clone(),
            |headers| {
                proxy::remove_hop_by_hop(headers);
                proxy::set_forwarded(headers, &peer, false, "http", Some(host.clone()));
                proxy::set_identity(headers, &config.keys, Some(&identity));
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

/// A typical proxied request's line; the timestamp is read per line, as
/// the gateway does.
fn entry(peer: std::net::IpAddr) -> access_log::Entry<'static> {
    access_log::Entry {
        timestamp: Timestamp::now(),
        request_id: "4bf92f3577b34da6a3ce929d0e0e4736",
        method: "GET",
        path: "/v1/orders/12345",
        query: Some("page=2&sort=created"),
        status: 200,
        route: Some("/v1"),
        upstream: Some("orders"),
        target: Some("10.0.3.17:8080"),
        client: Some("12345-ABCDE"),
        key_id: Some("k7Hq2mW9xPz"),
        credential: Some("key"),
        bytes_in: 0,
        bytes_out: 1834,
        duration_us: 412,
        upstream_us: Some(377),
        peer,
        user_agent: Some("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36"),
        tunnel_end: None,
    }
}

fn access_log_benches(c: &mut Criterion) {
    let config = Config::defaults();
    let header = http::HeaderName::from_static(request_id::DEFAULT_HEADER);
    let mut sent = HeaderMap::new();
    sent.insert(&header, HeaderValue::from_static("4bf92f35-77b3-4da6-a3ce-929d0e0e4736"));
    c.bench_function("request id (kept from the client)", |b| {
        b.iter(|| black_box(request_id::for_request(black_box(&sent), &header)))
    });
    let none = HeaderMap::new();
    c.bench_function("request id (generated)", |b| {
        b.iter(|| black_box(request_id::for_request(black_box(&none), &header)))
    });
    c.bench_function("access query redaction (nothing to redact)", |b| {
        b.iter(|| black_box(access_log::redact_query(black_box("page=2&sort=created"), &config.keys)))
    });

    let peer = std::net::IpAddr::from([192, 0, 2, 44]);
    let mut line = Vec::with_capacity(1024);
    for (name, format) in [("json", LogFormat::Json), ("text", LogFormat::Text)] {
        c.bench_function(&format!("access line formatted ({name})"), |b| {
            b.iter(|| {
                line.clear();
                access_log::format_into(&mut line, format, &entry(peer));
                black_box(line.len())
            })
        });
    }
    let sink = access_log::Sink::new(access_log::Destination::File("/dev/null".into()));
    c.bench_function("access line formatted and queued (json, to /dev/null)", |b| {
        b.iter(|| access_log::write(&sink, LogFormat::Json, &entry(peer)))
    });
    // The writer keeps up with a core formatting lines: few or none dropped.
    println!("access lines dropped while benchmarking: {}", sink.dropped());
}

/// One whole request through the real gateway in process: a keep-alive
/// HTTP/1.1 connection on loopback to the built-in echo route, access log
/// and `[tracing]` off. The request path's fixed cost with the optional
/// phases off, so that adding one (tracing) can be checked to cost nothing
/// while it is off.
fn gateway_benches(c: &mut Criterion) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        panic!("no runtime")
    };
    let dir = std::env::temp_dir();
    let toml = "[log]\naccess = \"off\"\n\n[[route]]\npath = \"/echo\"\nupstream = \"builtin:echo\"\npublic = true\n";
    let Ok(config) = Config::from_toml(toml, &dir) else { panic!("bench config") };
    let mut sender = runtime.block_on(async {
        let Ok(store) = keygate::store::open(&config.store, None).await else { panic!("store") };
        let gateway = keygate::gateway::Gateway::new(config, store);
        let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else { panic!("bind") };
        let Ok(addr) = listener.local_addr() else { panic!("addr") };
        tokio::spawn(keygate::server::serve(
            listener,
            gateway,
            std::future::pending(),
            std::time::Duration::from_secs(1),
        ));
        let Ok(stream) = tokio::net::TcpStream::connect(addr).await else { panic!("connect") };
        let io = hyper_util::rt::TokioIo::new(stream);
        let Ok((sender, connection)) = hyper::client::conn::http1::handshake(io).await else { panic!("h1") };
        tokio::spawn(connection);
        sender
    });
    c.bench_function("request through the gateway (echo route, HTTP/1.1 keep-alive, tracing off)", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let request = http::Request::get("/echo/bench")
                    .header("host", "bench")
                    .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                    .body(http_body_util::Empty::<bytes::Bytes>::new());
                let Ok(request) = request else { panic!("request") };
                let Ok(response) = sender.send_request(request).await else { panic!("sent") };
                let Ok(body) = http_body_util::BodyExt::collect(response.into_body()).await else {
                    panic!("body")
                };
                black_box(body.to_bytes().len())
            })
        })
    });
}

criterion_group!(benches, request_benches, access_log_benches, gateway_benches);
criterion_main!(benches);
