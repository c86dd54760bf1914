//! JWTs from external identity providers (`[[jwt.issuer]]`, issue 20)
//! through the real gateway: an "identity provider" made in the test (keys
//! generated with ring, tokens signed with jsonwebtoken) publishes its
//! JWKS from a real HTTP server on an ephemeral port that counts every
//! fetch, or from a file; the gateway verifies the tokens and applies the
//! named client's record (limits, status) exactly as for its other
//! credentials. Refusals are 401 `invalid_token` with the RFC 6750
//! challenge; a rotated `kid` is picked up by one refetch, and a flood of
//! made-up kids costs at most one.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use common::gateway::{Answer, TestGateway, http1_client, send, with_bearer};
use common::upstream::{Upstream, full};
use http::{Method, Request, StatusCode, header};
use http_body_util::Full;
use jiff::Timestamp;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keygate::meta::MetaChanges;
use keygate::ops;
use ring::signature::KeyPair as _;
use serde_json::{Value, json};

const ISS: &str = "https://idp.test";
const AUD: &str = "orders-api";

// === The identity provider ===

/// A signing key of the test's identity provider, with its public JWK.
struct IdpKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
    /// The public key's bytes (what a confused verifier would use as an HMAC secret).
    public: Vec<u8>,
}

impl IdpKey {
    /// A fresh P-256 key (ES256).
    fn es256(kid: &str) -> IdpKey {
        let rng = ring::rand::SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        // Uncompressed point: 0x04, then X and Y (32 bytes each).
        let point = pair.public_key().as_ref().to_vec();
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..]),
        });
        IdpKey {
            kid: kid.to_owned(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk,
            public: point,
        }
    }

    /// The test-only RSA key of `common::rsa_fixture` (RS256: what most
    /// identity providers sign with).
    fn rs256(kid: &str) -> IdpKey {
        use base64::engine::general_purpose::STANDARD;
        let der = STANDARD.decode(common::rsa_fixture::PKCS1_DER_BASE64).unwrap();
        let n = common::rsa_fixture::MODULUS_BASE64URL;
        let jwk = json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": n, "e": "AQAB"});
        IdpKey {
            kid: kid.to_owned(),
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_der(&der),
            jwk,
            public: URL_SAFE_NO_PAD.decode(n).unwrap(),
        }
    }

    /// A fresh Ed25519 key (EdDSA).
    fn ed25519(kid: &str) -> IdpKey {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public = pair.public_key().as_ref().to_vec();
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": URL_SAFE_NO_PAD.encode(&public)});
        IdpKey {
            kid: kid.to_owned(),
            alg: Algorithm::EdDSA,
            encoding: EncodingKey::from_ed_der(pkcs8.as_ref()),
            jwk,
            public,
        }
    }

    /// A token with these claims, signed with this key under its kid.
    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

fn now() -> u64 {
    Timestamp::now().as_second() as u64
}

/// What a typical identity provider puts in an access token for `client`.
fn claims(client: &str) -> Value {
    json!({"iss": ISS, "aud": AUD, "sub": client, "scope": "read orders:read", "iat": now(), "exp": now() + 600})
}

fn jwks(keys: &[&IdpKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
}

/// A JWKS served over HTTP from an ephemeral port: the document can be
/// replaced (a key rotation), and every fetch is counted.
struct JwksServer {
    upstream: Upstream,
    document: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(document: Value) -> JwksServer {
        let document = Arc::new(Mutex::new(document));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (Arc::clone(&document), Arc::clone(&fetches));
        let upstream = Upstream::start(move |_request| {
            counted.fetch_add(1, Ordering::SeqCst);
            let body = served.lock().unwrap().to_string();
            async move {
                http::Response::builder()
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(full(body))
                    .unwrap()
            }
        })
        .await;
        JwksServer { upstream, document, fetches }
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.upstream.addr)
    }

    fn serve(&self, document: Value) {
        *self.document.lock().unwrap() = document;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

// === The gateway ===

/// `/api` takes JWTs; `/keys` keys alone; both echo what reaches them.
fn config(jwks: &str, extra: &str) -> String {
    format!(
        r#"
[[jwt.issuer]]
iss = "{ISS}"
jwks = "{jwks}"
audience = "{AUD}"
{extra}

[[route]]
path = "/api"
upstream = "builtin:echo"
auth = ["jwt"]
scopes = ["read"]

[[route]]
path = "/keys"
upstream = "builtin:echo"
"#
    )
}

async fn create_client(gw: &TestGateway, id: &str, meta: &str) {
    let changes = MetaChanges::from_query(meta, Timestamp::now()).unwrap();
    ops::clients::create(&*gw.gateway.store, id, changes, Timestamp::now()).await.unwrap();
}

async fn call(gw: &TestGateway, token: &str) -> Answer {
    with_bearer(gw, Method::GET, "/api/orders", token).await
}

#[track_caller]
fn assert_invalid_token(answer: &Answer, what: &str) {
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{what}: {}", answer.text());
    assert_eq!(answer.json()["error"], "invalid_token", "{what}");
    assert_eq!(
        answer.headers[header::WWW_AUTHENTICATE],
        "Bearer realm=\"keygate\", error=\"invalid_token\"",
        "{what}"
    );
}

/// Replaces a token's header (keeping payload and signature).
fn with_header(token: &str, header: Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), parts[1], parts[2])
}

/// Replaces a token's payload (keeping header and signature).
fn with_payload(token: &str, payload: Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(payload.to_string()), parts[2])
}

// === Tests ===

#[tokio::test]
async fn an_issuers_token_is_the_credential_of_its_client_whose_limits_apply() {
    let logs = common::logs::capture();
    let log = common::access::AccessLog::new();
    let key = IdpKey::es256("k1");
    let idp = JwksServer::start(jwks(&[&key])).await;
    let gw = TestGateway::start(&format!("{}{}", log.toml("text"), config(&idp.url(), ""))).await;
    // Per minute: no refill to speak of while the test runs.
    create_client(&gw, "acme", "rate=2/m").await;
    let token = key.sign(&claims("acme"));

    let answer = call(&gw, &token).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let seen = &answer.json()["headers"];
    assert_eq!(seen["x-keygate-client"], "acme");
    assert_eq!(seen["x-keygate-scopes"], "read orders:read", "the token's scopes: {seen}");
    assert!(seen.get("x-keygate-key-id").is_none(), "no key stands behind it: {seen}");
    assert!(seen.get("authorization").is_none(), "the token is not forwarded: {seen}");
    let line = log.wait_for_text("path=\"/api/orders\"").await;
    assert!(line.contains("credential=\"jwt\"") && line.contains("client=\"acme\""), "{line}");
    assert!(!logs.text().contains(&token) && !log.text().contains(&token), "no token in any log");

    // The client's rate limit, whatever the credential: the second passes, the third is over.
    assert_eq!(call(&gw, &token).await.status, StatusCode::OK);
    let limited = call(&gw, &token).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS, "{}", limited.text());
    assert_eq!(limited.json()["error"], "rate_limited");
    assert_eq!(idp.fetches(), 1, "the start's fetch only: verified tokens are cached");

    // A scope the token lacks is 403, as for keys (an array of scopes,
    // and `aud` as an array naming ours among others).
    create_client(&gw, "shop", "").await;
    let mut write_only = claims("shop");
    write_only["scope"] = json!(["write"]);
    write_only["aud"] = json!(["other", AUD]);
    let answer = call(&gw, &key.sign(&write_only)).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.text());
}

#[tokio::test]
async fn forged_expired_misaddressed_and_unknown_client_tokens_are_401_invalid_token() {
    let logs = common::logs::capture();
    let key = IdpKey::es256("k1");
    let idp = JwksServer::start(jwks(&[&key])).await;
    let gw = TestGateway::start(&config(&idp.url(), "leeway = \"5s\"")).await;
    create_client(&gw, "acme", "").await;
    create_client(&gw, "gone", "").await;
    ops::clients::revoke(&*gw.gateway.store, "gone", Timestamp::now()).await.unwrap();
    let good = key.sign(&claims("acme"));
    assert_eq!(call(&gw, &good).await.status, StatusCode::OK);

    // alg none: the header says so, the signature is empty.
    let none = with_header(&good, json!({"alg": "none", "typ": "JWT", "kid": "k1"}));
    let unsigned = format!("{}.", none.rsplit_once('.').unwrap().0);
    assert_invalid_token(&call(&gw, &unsigned).await, "alg none, unsigned");
    assert_invalid_token(&call(&gw, &none).await, "alg none, signature kept");

    // HS256 keyed with the published public key: the key-confusion attack.
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("k1".to_owned());
    let confused =
        jsonwebtoken::encode(&hs, &claims("acme"), &EncodingKey::from_secret(&key.public)).unwrap();
    assert_invalid_token(&call(&gw, &confused).await, "HS256 with the public key");
    let jwk_text = key.jwk.to_string();
    let confused =
        jsonwebtoken::encode(&hs, &claims("acme"), &EncodingKey::from_secret(jwk_text.as_bytes())).unwrap();
    assert_invalid_token(&call(&gw, &confused).await, "HS256 with the JWK's text");

    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = claims("acme");
        edit(&mut c);
        key.sign(&c)
    };
    let refused = [
        ("wrong aud", "wrong audience", with(&|c| c["aud"] = json!("another-api"))),
        ("no aud", "wrong audience", with(&|c| drop(c.as_object_mut().unwrap().remove("aud")))),
        ("wrong iss", "issuer not configured", with(&|c| c["iss"] = json!("https://evil.test"))),
        ("expired beyond leeway", "expired", with(&|c| c["exp"] = json!(now() - 10))),
        ("no exp", "no exp", with(&|c| drop(c.as_object_mut().unwrap().remove("exp")))),
        ("nbf in the future", "not yet valid", with(&|c| c["nbf"] = json!(now() + 60))),
        ("unknown client", "no such client", with(&|c| c["sub"] = json!("nobody"))),
        ("revoked client", "client revoked", with(&|c| c["sub"] = json!("gone"))),
        ("not a client ID", "client claim is not a client ID", with(&|c| c["sub"] = json!("auth0|acme"))),
        (
            "tampered",
            "bad signature",
            with_payload(&good, {
                let mut c = claims("acme");
                c["scope"] = json!("read write admin");
                c
            }),
        ),
        ("another key under our kid", "bad signature", IdpKey::es256("k1").sign(&claims("acme"))),
        (
            "EdDSA under an ES256 key's kid",
            "algorithm not allowed",
            IdpKey::ed25519("k1").sign(&claims("acme")),
        ),
    ];
    for (what, reason, token) in &refused {
        assert_invalid_token(&call(&gw, token).await, what);
        let last = logs.lines_with("request refused").pop().unwrap_or_default();
        assert!(last.contains(&format!("access token rejected: {reason}")), "{what}: {last}");
    }
    for (what, reason) in [("alg none", "malformed"), ("HS256", "algorithm not allowed")] {
        let found = logs.lines_with(&format!("access token rejected: {reason}"));
        assert!(!found.is_empty(), "{what} refused as {reason}");
    }
    // Within leeway is fine.
    assert_eq!(call(&gw, &with(&|c| c["exp"] = json!(now() - 1))).await.status, StatusCode::OK);
    // None of those refetched the JWKS: their kid was known.
    assert_eq!(idp.fetches(), 1);
}

#[tokio::test]
async fn an_rs256_issuer_is_accepted_and_its_confusions_are_refused() {
    let key = IdpKey::rs256("rsa-1");
    let idp = JwksServer::start(jwks(&[&key])).await;
    let gw = TestGateway::start(&config(&idp.url(), "")).await;
    create_client(&gw, "acme", "").await;
    let good = key.sign(&claims("acme"));
    let answer = call(&gw, &good).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["headers"]["x-keygate-client"], "acme");

    // HS256 keyed with the RSA modulus, under the RSA key's kid.
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("rsa-1".to_owned());
    let confused =
        jsonwebtoken::encode(&hs, &claims("acme"), &EncodingKey::from_secret(&key.public)).unwrap();
    assert_invalid_token(&call(&gw, &confused).await, "HS256 with the RSA public key");
    let none = with_header(&good, json!({"alg": "none", "kid": "rsa-1"}));
    assert_invalid_token(&call(&gw, &format!("{}.", none.rsplit_once('.').unwrap().0)).await, "alg none");
    // PS256 is RSA too, but not what this key is published for.
    let ps = with_header(&good, json!({"alg": "PS256", "kid": "rsa-1"}));
    assert_invalid_token(&call(&gw, &ps).await, "PS256 header on an RS256 signature");
    let mut widened = claims("acme");
    widened["scope"] = json!("read write admin");
    assert_invalid_token(&call(&gw, &with_payload(&good, widened)).await, "tampered payload");
    assert_eq!(call(&gw, &good).await.status, StatusCode::OK, "the good token still is");
}

#[tokio::test]
async fn a_route_trusts_only_the_issuers_it_names_and_keygates_own_tokens_keep_working() {
    let key = IdpKey::ed25519("ed");
    let idp = JwksServer::start(jwks(&[&key])).await;
    let text = format!(
        r#"
[tokens]
enabled = true

[[jwt.issuer]]
iss = "{ISS}"
jwks = "{}"
audience = "{AUD}"

[[route]]
path = "/idp-only"
upstream = "builtin:echo"
auth = ["jwt"]
issuers = ["{ISS}"]

[[route]]
path = "/own-only"
upstream = "builtin:echo"
auth = ["key", "jwt"]
issuers = ["keygate"]

[[route]]
path = "/"
upstream = "builtin:echo"
auth = ["key", "jwt"]
"#,
        idp.url()
    );
    let gw = TestGateway::start(&text).await;
    create_client(&gw, "acme", "").await;
    let external = key.sign(&claims("acme"));
    let issued =
        ops::issue(&*gw.gateway.store, "kg_", "acme", MetaChanges::default(), Timestamp::now()).await;
    let api_key = issued.unwrap().key.expose().to_owned();
    let request = Request::post(gw.url("/oauth/token"))
        .header(header::AUTHORIZATION, format!("Basic {}", STANDARD.encode(format!("acme:{api_key}"))))
        .body(Full::new(Bytes::from_static(b"grant_type=client_credentials")))
        .unwrap();
    let own = send(&http1_client(), request).await.json()["access_token"].as_str().unwrap().to_owned();

    for (path, token, status) in [
        ("/idp-only/x", &external, StatusCode::OK),
        ("/idp-only/x", &own, StatusCode::UNAUTHORIZED),
        ("/own-only/x", &own, StatusCode::OK),
        ("/own-only/x", &external, StatusCode::UNAUTHORIZED),
        ("/x", &own, StatusCode::OK),
        ("/x", &external, StatusCode::OK),
        ("/x", &api_key, StatusCode::OK),
    ] {
        let answer = with_bearer(&gw, Method::GET, path, token).await;
        assert_eq!(answer.status, status, "{path}: {}", answer.text());
        if status == StatusCode::UNAUTHORIZED {
            assert_invalid_token(&answer, path);
        }
    }
    // Cached now, and still refused where not trusted.
    assert_invalid_token(&with_bearer(&gw, Method::GET, "/own-only/x", &external).await, "cached, untrusted");
}

#[tokio::test]
async fn a_jwks_file_is_read_at_start() {
    let key = IdpKey::ed25519("file-key");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("idp-jwks.json"), jwks(&[&key]).to_string()).unwrap();
    let gw = TestGateway::start_in(&config("idp-jwks.json", "algorithms = [\"EdDSA\"]"), dir).await;
    create_client(&gw, "acme", "").await;
    let answer = call(&gw, &key.sign(&claims("acme"))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    // The issuer allows EdDSA alone: an ES256 token is refused before any key is looked up.
    assert_invalid_token(
        &call(&gw, &IdpKey::es256("file-key").sign(&claims("acme"))).await,
        "ES256 not allowed",
    );
}

/// A JWKS served over HTTPS (HTTP/1.1) with a certificate from `ca`,
/// counting fetches.
async fn https_jwks(ca: &common::pki::TestCa, document: Value) -> (String, Arc<AtomicUsize>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let server = ca.issue_server("idp", &["127.0.0.1"]);
    let options = common::tls_upstream::TlsOptions { alpn: vec![b"http/1.1"], client_ca: None };
    let config = common::tls_upstream::server_config(&server, &options);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/jwks", listener.local_addr().unwrap());
    let fetches = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&fetches);
    let body = document.to_string();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (acceptor, counted, body) = (acceptor.clone(), Arc::clone(&counted), body.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else { return };
                let service = hyper::service::service_fn(move |_request| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let body = body.clone();
                    async move { Ok::<_, std::convert::Infallible>(http::Response::new(full(body))) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, fetches)
}

#[tokio::test]
async fn an_https_jwks_is_verified_against_the_issuers_ca_and_a_failing_fetch_says_why() {
    let logs = common::logs::capture();
    let key = IdpKey::es256("tls");
    let ca = common::pki::TestCa::new("idp");
    let (url, fetches) = https_jwks(&ca, jwks(&[&key])).await;
    let ca_line = format!("ca = \"{}\"", ca.ca_pem().display());
    let gw = TestGateway::start(&config(&url, &ca_line)).await;
    create_client(&gw, "acme", "").await;
    let answer = call(&gw, &key.sign(&claims("acme"))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(fetches.load(Ordering::SeqCst), 1);

    // Without `ca` the system's roots do not know the test CA: no keys ever
    // loaded, one line saying why per fetch, and the issuer's tokens get
    // 503 (the gateway cannot tell good from bad), not 401.
    let gw = TestGateway::start(&config(&url, "")).await;
    create_client(&gw, "acme", "").await;
    let answer = call(&gw, &key.sign(&claims("acme"))).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{}", answer.text());
    assert_eq!(answer.json()["error"], "jwks_unavailable");
    assert_eq!(answer.headers[header::RETRY_AFTER], "30");
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "the handshakes failed: nothing more was served");
    let failed = logs.lines_with("JWKS fetch failed");
    assert!(!failed.is_empty(), "{}", logs.text());
    assert!(
        failed.iter().all(|line| line.contains("issuer=https://idp.test") && line.contains("TLS")),
        "{failed:?}"
    );
}

#[tokio::test]
async fn a_rotated_kid_is_accepted_after_one_refetch_and_a_removed_key_ends_its_tokens() {
    let old = IdpKey::es256("2026-01");
    let idp = JwksServer::start(jwks(&[&old])).await;
    let gw = TestGateway::start(&config(&idp.url(), "")).await;
    create_client(&gw, "acme", "").await;
    let old_token = old.sign(&claims("acme"));
    assert_eq!(call(&gw, &old_token).await.status, StatusCode::OK);
    assert_eq!(idp.fetches(), 1);

    // The provider rotates: the new key only.
    let new = IdpKey::es256("2026-02");
    idp.serve(jwks(&[&new]));
    let answer = call(&gw, &new.sign(&claims("acme"))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(idp.fetches(), 2, "one refetch for the new kid");
    // The old key is gone from the JWKS: its cached token goes with it.
    assert_invalid_token(&call(&gw, &old_token).await, "token of a removed key");

    // A second rotation within refetch_interval (30 s) is not fetched for:
    // an unknown kid is refused without a signature check until then.
    let newer = IdpKey::es256("2026-03");
    idp.serve(jwks(&[&newer]));
    assert_invalid_token(&call(&gw, &newer.sign(&claims("acme"))).await, "within the refetch interval");
    assert_eq!(idp.fetches(), 2);
}

#[tokio::test]
async fn a_flood_of_made_up_kids_costs_at_most_one_jwks_fetch() {
    let key = IdpKey::es256("real");
    let idp = JwksServer::start(jwks(&[&key])).await;
    // No failure budget here, so that every token reaches the key lookup.
    let text = format!("[keys]\nauth_failures_per_ip = \"off\"\n{}", config(&idp.url(), ""));
    let gw = Arc::new(TestGateway::start(&text).await);
    create_client(&gw, "acme", "").await;
    assert_eq!(call(&gw, &key.sign(&claims("acme"))).await.status, StatusCode::OK);

    let attacker = IdpKey::es256("unused");
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let gw = Arc::clone(&gw);
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some(format!("made-up-{i}-{}", fastrand::u64(..)));
            let token = jsonwebtoken::encode(&header, &claims("acme"), &attacker.encoding).unwrap();
            tokio::spawn(async move { call(&gw, &token).await })
        })
        .collect();
    for task in tasks {
        assert_invalid_token(&task.await.unwrap(), "made-up kid");
    }
    assert!(idp.fetches() <= 2, "the start's fetch and at most one refetch: {}", idp.fetches());
    // The real key still works.
    assert_eq!(call(&gw, &key.sign(&claims("acme"))).await.status, StatusCode::OK);
}

#[tokio::test]
async fn refused_tokens_spend_the_addresss_failure_budget() {
    let key = IdpKey::es256("k1");
    let idp = JwksServer::start(jwks(&[&key])).await;
    let text = format!(
        "[keys]\nauth_failures_per_ip = \"1/m\"\nauth_failures_burst = 3\n{}",
        config(&idp.url(), "")
    );
    let gw = TestGateway::start(&text).await;
    create_client(&gw, "acme", "").await;
    let good = key.sign(&claims("acme"));
    assert_eq!(call(&gw, &good).await.status, StatusCode::OK, "cached from now on");

    let forged = IdpKey::es256("k1").sign(&claims("acme"));
    let statuses: Vec<StatusCode> = futures_util::future::join_all((0..6).map(|_| call(&gw, &forged)))
        .await
        .iter()
        .map(|a| a.status)
        .collect();
    assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    let blocked = call(&gw, &forged).await;
    assert_eq!(blocked.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(blocked.json()["error"], "too_many_auth_failures");
    // A token the cache knows is not made up: it still passes.
    assert_eq!(call(&gw, &good).await.status, StatusCode::OK);
}

#[tokio::test]
async fn revoking_the_client_ends_its_verified_tokens_at_once() {
    let key = IdpKey::es256("k1");
    let idp = JwksServer::start(jwks(&[&key])).await;
    let gw = TestGateway::start(&config(&idp.url(), "")).await;
    create_client(&gw, "acme", "").await;
    let token = key.sign(&claims("acme"));
    assert_eq!(call(&gw, &token).await.status, StatusCode::OK, "verified and cached");

    ops::clients::revoke(&*gw.gateway.store, "acme", Timestamp::now()).await.unwrap();
    common::wait::eventually(
        std::time::Duration::from_secs(5),
        "the revocation reaches the gateway",
        || async { call(&gw, &token).await.status == StatusCode::UNAUTHORIZED },
    )
    .await;
    assert_invalid_token(&call(&gw, &token).await, "a revoked client's cached token");
}

#[tokio::test]
async fn usage_of_an_issuers_tokens_is_counted_for_their_client_in_redis() {
    let redis = common::redis::RedisServer::start();
    let key = IdpKey::es256("k1");
    let idp = JwksServer::start(jwks(&[&key])).await;
    let store = format!("[store]\nkind = \"redis\"\nurl = \"{}\"\n", redis.url());
    let gw = TestGateway::start(&format!("{store}{}", config(&idp.url(), ""))).await;
    create_client(&gw, "acme", "").await;
    let token = key.sign(&claims("acme"));
    for _ in 0..4 {
        assert_eq!(call(&gw, &token).await.status, StatusCode::OK);
    }
    let mut write_only = claims("acme");
    write_only["scope"] = json!("write");
    assert_eq!(call(&gw, &key.sign(&write_only)).await.status, StatusCode::FORBIDDEN);
    // Refused tokens are refusals in usage too, under the anonymous client
    // (a token that did not verify names no client).
    let mut expired = claims("acme");
    expired["exp"] = json!(1_000_000_000);
    for _ in 0..2 {
        assert_eq!(call(&gw, &key.sign(&expired)).await.status, StatusCode::UNAUTHORIZED);
    }
    let flusher = gw.gateway.usage_flusher().expect("usage on Redis");
    // Usage is recorded when each response body ends; every body was read.
    flusher.flush_now().await.unwrap();

    let report = redis.usage_report("acme").await;
    assert_eq!(report.totals.requests, 5, "{report:?}");
    assert_eq!(report.totals.status_2xx, 4, "{report:?}");
    assert_eq!(report.totals.refused_403, 1, "{report:?}");
    assert!(serde_json::to_value(&report).unwrap().to_string().contains("/api"), "per route");
    let refused = redis.usage_report(keygate::usage::ANONYMOUS).await;
    assert_eq!((refused.totals.requests, refused.totals.refused_401), (2, 2), "{refused:?}");
}
