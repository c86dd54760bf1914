//! Run with `cargo bench --bench tokens` (add `-- --warm-up-time 1 --measurement-time 3` for a quick pass).
//!
//! Access-token verification (`auth::jwt::TokenVerifier::verify`), the two
//! costs issue 20 compares: a token seen for the first time (header,
//! Ed25519 signature, claims), and the same token again (SHA-256 of its
//! text, one cache lookup, its `exp`). Target: cached < 1 µs, no more than
//! a cached key (`benches/verify.rs`). A third row is a forged token under
//! an unknown `kid`: refused before any signature check.
//!
//! The same three for a token of an external issuer
//! (`auth::issuer::Issuers::verify`, ES256 from a JWKS file): first seen
//! (header, `iss`, key by `kid`, P-256 signature, claims), cached, and an
//! unknown `kid` once the refetch for it has been spent.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use keygate::auth::jwt::{TokenKeys, TokenVerifier};
use keygate::config::TokensConfig;

const NOW: u64 = 1_800_000_000;

fn token_benches(c: &mut Criterion) {
    let config = TokensConfig { enabled: true, ..TokensConfig::default() };
    let Ok(keys) = TokenKeys::load(&config) else { panic!("cannot generate a signing key") };
    let keys = Arc::new(keys);
    let scopes = vec!["read".to_owned(), "orders:write".to_owned()];

    // First seen: a fresh verifier (empty cache) per iteration, built
    // outside the measurement.
    let (token, _) = keys.issue("acme", "acme.k1", &scopes, NOW);
    c.bench_function("token verify (first seen)", |b| {
        b.iter_batched(
            || TokenVerifier::new(Arc::clone(&keys), 16),
            |verifier| black_box(verifier.verify(black_box(&token), NOW).is_ok()),
            BatchSize::SmallInput,
        )
    });

    let verifier = TokenVerifier::new(Arc::clone(&keys), 1000);
    assert!(verifier.verify(&token, NOW).is_ok(), "the token verifies");
    c.bench_function("token verify (cached)", |b| {
        b.iter(|| black_box(verifier.verify(black_box(&token), NOW).is_ok()))
    });

    let Ok(other) = TokenKeys::load(&config) else { panic!("cannot generate a signing key") };
    let (forged, _) = other.issue("acme", "acme.k1", &scopes, NOW);
    c.bench_function("token verify (unknown kid, refused)", |b| {
        b.iter(|| black_box(verifier.verify(black_box(&forged), NOW).is_err()))
    });
}

fn issuer_benches(c: &mut Criterion) {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::signature::KeyPair as _;

    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let Ok(pkcs8) = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng) else { panic!("P-256 key") };
    let Ok(pair) = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng) else {
        panic!("key")
    };
    let point = pair.public_key().as_ref();
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])}]});
    let Ok(dir) = tempfile::tempdir() else { panic!("temporary folder") };
    let file = dir.path().join("jwks.json");
    let Ok(()) = std::fs::write(&file, jwks.to_string()) else { panic!("JWKS file") };
    let config = keygate::config::IssuerConfig {
        iss: "https://idp".to_owned(),
        jwks: keygate::jwks::JwksSource::File(file),
        ca: None,
        audience: vec!["api".to_owned()],
        algorithms: keygate::config::DEFAULT_ISSUER_ALGORITHMS.to_vec(),
        client_claim: "sub".to_owned(),
        scope_claim: "scope".to_owned(),
        leeway: std::time::Duration::from_secs(30),
        refresh: std::time::Duration::from_secs(600),
        refetch_interval: std::time::Duration::from_secs(30),
    };
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        panic!("runtime")
    };
    let encoding = jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref());
    let sign = |kid: &str, jti: u64| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        let claims = serde_json::json!({"iss": "https://idp", "aud": "api", "sub": "acme",
            "scope": "read orders:write", "exp": NOW + 600, "jti": jti});
        let Ok(token) = jsonwebtoken::encode(&header, &claims, &encoding) else { panic!("signs") };
        token
    };
    let issuers = keygate::auth::issuer::Issuers::new(std::slice::from_ref(&config), 1_000_000);
    runtime.block_on(issuers.load_now());

    let mut jti = 0;
    c.bench_function("issuer token verify (first seen, ES256)", |b| {
        b.iter_batched(
            || {
                jti += 1;
                sign("k1", jti)
            },
            |token| black_box(runtime.block_on(issuers.verify(&token, |_| true, NOW)).is_ok()),
            BatchSize::SmallInput,
        )
    });

    let token = sign("k1", 0);
    assert!(runtime.block_on(issuers.verify(&token, |_| true, NOW)).is_ok(), "the token verifies");
    c.bench_function("issuer token verify (cached)", |b| {
        b.iter(|| black_box(runtime.block_on(issuers.verify(black_box(&token), |_| true, NOW)).is_ok()))
    });

    let forged = sign("made-up", 0);
    // The first unknown kid spends the refetch; every one after is refused unfetched.
    assert!(runtime.block_on(issuers.verify(&forged, |_| true, NOW)).is_err());
    c.bench_function("issuer token verify (unknown kid, refused)", |b| {
        b.iter(|| black_box(runtime.block_on(issuers.verify(black_box(&forged), |_| true, NOW)).is_err()))
    });
}

criterion_group!(benches, token_benches, issuer_benches);
criterion_main!(benches);
