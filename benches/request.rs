//! Run with `cargo bench --bench request` (add `-- --warm-up-time 1 --measurement-time 3` for a quick pass).
//!
//! The per-request steps between verification and forwarding: the scope
//! check, and the header rewrite (hop-by-hop removal, `X-Forwarded-*`,
//! identity headers) on a typical browser-sized header set.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use jiff::Timestamp;
use keygate::config::Config;
use keygate::key::{SecretHash, generate};
use keygate::meta::KeyMeta;
use keygate::store::KeyRecord;
use keygate::{proxy, scope};

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

criterion_group!(benches, request_benches);
criterion_main!(benches);
