//! Client certificates as credentials, through the real request path.
//!
//! The TLS listener (another part of the gateway) verifies a client's
//! certificate and hands it to the request path on `proxy::Peer`. Here the
//! handshake is stood in for: each test listener accepts real TCP
//! connections on loopback and serves them with `keygate::handler::handle`
//! and a `Peer` carrying the certificate that listener's clients "present"
//! (made with rcgen, signed by a throwaway CA), exactly as the TLS listener
//! will. Everything behind that is the real gateway: store, caches, limits,
//! a real upstream, usage in a real Redis. The real handshake in front of
//! this (listener verification, then the route taking the certificate) is
//! `a_verified_client_certificate_is_the_credential_of_cert_routes` in
//! tests/tls_listener.rs.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::gateway::{Answer, http1_client, send};
use common::redis::RedisServer;
use common::upstream::Upstream;
use common::wait::eventually;
use http::Request;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jiff::Timestamp;
use keygate::client_cert::{self, CertIdentityError, IdFrom};
use keygate::config::Config;
use keygate::gateway::Gateway;
use keygate::meta::MetaChanges;
use keygate::ops;
use keygate::proxy::Peer;
use rcgen::{CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;

// === Certificates (rcgen) ===

/// A throwaway CA issuing client certificates as DER, in memory: nothing
/// is written, no key outlives the test.
struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "keygate test client CA");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    /// A client certificate with subject CN `cn` (if any) and these SANs.
    fn client(&self, cn: Option<&str>, sans: Vec<SanType>) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        // rcgen's default subject has a CN of its own; start from none.
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.signed_by(&KeyPair::generate().unwrap(), &self.0).unwrap().der().clone()
    }

    fn cn(&self, cn: &str) -> CertificateDer<'static> {
        self.client(Some(cn), vec![])
    }
}

fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().unwrap())
}

fn uri(uri: &str) -> SanType {
    SanType::URI(uri.try_into().unwrap())
}

fn email(address: &str) -> SanType {
    SanType::Rfc822Name(address.try_into().unwrap())
}

// === The gateway behind a stand-in TLS listener ===

/// The real gateway; its listeners hand every connection's requests to
/// `handler::handle` with a `Peer` carrying one fixed certificate.
struct CertGateway {
    gateway: Arc<Gateway>,
    dir: tempfile::TempDir,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for CertGateway {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|task| task.abort());
    }
}

impl CertGateway {
    /// A gateway on the file store in a fresh folder (or on `redis`).
    async fn start(toml: &str) -> CertGateway {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::from_toml(toml, dir.path()).unwrap_or_else(|e| panic!("{e:?}\n{toml}"));
        let store = keygate::store::open(&config.store, None).await.unwrap();
        CertGateway { gateway: Gateway::new(config, store), dir, tasks: Vec::new() }
    }

    /// A listener whose every connection presents `cert` (a verified
    /// client certificate), or none; returns its address.
    async fn listener(&mut self, cert: Option<CertificateDer<'static>>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gateway = Arc::clone(&self.gateway);
        self.tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, from)) = listener.accept().await else { continue };
                // What the TLS listener does once the handshake verified the chain.
                let peer = match &cert {
                    Some(cert) => Peer::over_tls(from, Some(Arc::from(vec![cert.clone()]))),
                    None => Peer::new(from),
                };
                let gateway = Arc::clone(&gateway);
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let (gateway, peer) = (Arc::clone(&gateway), peer.clone());
                        async move { Ok::<_, Infallible>(keygate::handler::handle(gateway, request, peer).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }));
        addr
    }

    async fn create_client(&self, id: &str, meta: &str) {
        ops::clients::create(&*self.gateway.store, id, changes(meta), Timestamp::now()).await.unwrap();
    }

    async fn issue(&self, client: &str, meta: &str) -> String {
        let issued = ops::issue(&*self.gateway.store, "kg_", client, changes(meta), Timestamp::now()).await;
        issued.unwrap().key.expose().to_owned()
    }
}

fn changes(meta: &str) -> MetaChanges {
    MetaChanges::from_query(meta, Timestamp::now()).unwrap()
}

async fn get(addr: SocketAddr, path: &str, key: Option<&str>) -> Answer {
    let mut request = Request::get(format!("http://{addr}{path}"));
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    send(&http1_client(), request.body(Full::<Bytes>::default()).unwrap()).await
}

fn config(upstream: &Upstream, store: &str) -> String {
    format!(
        r#"{store}
[upstream.api]
targets = ["{}"]

[[route]]
path = "/cert"
upstream = "api"
auth = ["cert"]

[[route]]
path = "/both"
upstream = "api"
auth = ["key", "cert"]

[[route]]
path = "/key"
upstream = "api"

[[route]]
path = "/orders"
upstream = "api"
auth = ["cert"]
scopes = ["orders:write"]
"#,
        upstream.url()
    )
}

// === Mapping a certificate to a client ID ===

#[test]
fn each_id_from_reads_its_part_of_a_real_certificate() {
    let ca = Ca::new();
    let cert = ca.client(
        Some("acme"),
        vec![
            dns("acme-dns.clients.example.com"),
            uri("spiffe://example.com/clients/acme-uri"),
            email("acme-mail@clients.example.com"),
        ],
    );
    let id = |from| client_cert::client_id(&cert, from);
    assert_eq!(id(IdFrom::Cn).as_deref(), Ok("acme"));
    assert_eq!(id(IdFrom::SanDns).as_deref(), Ok("acme-dns"));
    assert_eq!(id(IdFrom::SanUri).as_deref(), Ok("acme-uri"));
    assert_eq!(id(IdFrom::SanEmail).as_deref(), Ok("acme-mail"));
}

#[test]
fn the_first_valid_san_of_the_chosen_kind_wins_and_a_certificate_naming_none_is_an_error() {
    let ca = Ca::new();
    let several =
        ca.client(None, vec![dns("*.wild.example.com"), dns("beta.example.com"), dns("gamma.example.com")]);
    assert_eq!(
        client_cert::client_id(&several, IdFrom::SanDns).as_deref(),
        Ok("beta"),
        "`*` is no client ID"
    );

    let no_cn = ca.client(None, vec![dns("acme.example.com")]);
    assert_eq!(client_cert::client_id(&no_cn, IdFrom::Cn), Err(CertIdentityError::Absent(IdFrom::Cn)));
    assert_eq!(
        client_cert::client_id(&no_cn, IdFrom::SanUri),
        Err(CertIdentityError::Absent(IdFrom::SanUri))
    );

    let bad_cn = ca.cn("Acme Corp, Inc.");
    assert_eq!(client_cert::client_id(&bad_cn, IdFrom::Cn), Err(CertIdentityError::Invalid(IdFrom::Cn)));
    let error = CertIdentityError::Invalid(IdFrom::Cn).to_string();
    assert!(!error.contains("Acme"), "errors carry nothing read from the certificate: {error}");
}

// === Through the gateway ===

#[tokio::test]
async fn a_valid_certificate_reaches_the_upstream_as_its_client_with_nothing_from_the_certificate() {
    let upstream = Upstream::mirror().await;
    let mut gateway = CertGateway::start(&config(&upstream, "")).await;
    gateway.create_client("acme", "scope=read").await;
    let ca = Ca::new();
    let acme = gateway.listener(Some(ca.cn("acme"))).await;

    let answer = get(acme, "/cert/x", None).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let seen = &answer.json()["headers"];
    assert_eq!(seen["x-keygate-client"], "acme");
    assert_eq!(seen["x-keygate-scopes"], "read");
    assert!(seen.get("x-keygate-key-id").is_none(), "a certificate is no key: {seen}");
    // A client cannot pose as another one upstream, certificate or not.
    let request = Request::get(format!("http://{acme}/cert/x"))
        .header("x-keygate-client", "admin")
        .header("x-keygate-key-id", "admin.k1")
        .body(Full::<Bytes>::default())
        .unwrap();
    let seen = send(&http1_client(), request).await.json()["headers"].clone();
    assert_eq!(seen["x-keygate-client"], "acme");
    assert!(seen.get("x-keygate-key-id").is_none(), "{seen}");
}

#[tokio::test]
async fn unknown_and_unnamed_clients_get_the_unknown_key_answer_and_no_certificate_gets_401() {
    let upstream = Upstream::mirror().await;
    let mut gateway = CertGateway::start(&config(&upstream, "")).await;
    let ca = Ca::new();
    let unknown = gateway.listener(Some(ca.cn("nobody"))).await;
    let unnamed = gateway.listener(Some(ca.cn("not a client id"))).await;
    let plain = gateway.listener(None).await;
    let key = gateway.issue("acme", "scope=read").await;

    let reference = get(plain, "/key/x", Some("kg_acme_unknownunknownunknown")).await;
    assert_eq!(reference.status, 401);
    for addr in [unknown, unnamed] {
        let answer = get(addr, "/cert/x", None).await;
        assert_eq!(answer.status, 401);
        // The same answer, but for the request's own ID.
        let without_id = |answer: &Answer| {
            let mut body = answer.json();
            body.as_object_mut().unwrap().remove("request_id").expect("a request_id");
            body
        };
        assert_eq!(without_id(&answer), without_id(&reference), "one answer for every refused credential");
        assert!(answer.headers.contains_key("www-authenticate"));
    }
    assert_eq!(upstream.connections.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing forwarded");

    // A certificate-only route without a certificate; a key does not help there.
    for key in [None, Some(key.as_str())] {
        let answer = get(plain, "/cert/x", key).await;
        assert_eq!(answer.status, 401);
        assert_eq!(answer.json()["error"], "missing_certificate");
        assert!(answer.json()["message"].as_str().unwrap().contains("certificate"));
    }
}

#[tokio::test]
async fn a_revoked_client_is_refused_and_a_revocation_while_cached_holds_for_the_next_request() {
    let upstream = Upstream::mirror().await;
    let mut gateway = CertGateway::start(&config(&upstream, "")).await;
    gateway.create_client("acme", "scope=read").await;
    gateway.create_client("gone", "scope=read").await;
    ops::clients::revoke(&*gateway.gateway.store, "gone", Timestamp::now()).await.unwrap();
    let ca = Ca::new();
    let acme = gateway.listener(Some(ca.cn("acme"))).await;
    let gone = gateway.listener(Some(ca.cn("gone"))).await;

    assert_eq!(get(gone, "/cert/x", None).await.status, 401, "revoked: as a revoked key (DESIGN)");
    for _ in 0..3 {
        assert_eq!(get(acme, "/cert/x", None).await.status, 200, "cached after the first");
    }
    // Revoked by another writer of the same folder, as `keygate clients revoke` is.
    let other_writer = keygate::store::file::FileStore::open(gateway.dir.path().join("keys")).await.unwrap();
    ops::clients::revoke(&other_writer, "acme", Timestamp::now()).await.unwrap();
    let answer = get(acme, "/cert/x", None).await;
    assert_eq!(answer.status, 401, "the very next request");
    assert_eq!(answer.json()["error"], "invalid_key");
}

#[tokio::test]
async fn on_redis_a_client_revoked_by_another_process_is_refused_once_its_invalidation_arrives() {
    let redis = RedisServer::start();
    let upstream = Upstream::mirror().await;
    let store = format!("[store]\nkind = \"redis\"\nurl = \"{}\"\n", redis.url());
    let mut gateway = CertGateway::start(&config(&upstream, &store)).await;
    let ca = Ca::new();
    let acme = gateway.listener(Some(ca.cn("acme"))).await;
    let cli = keygate::store::redis::RedisStore::connect(&redis.url(), "kg:").await.unwrap();

    // Unknown, then created elsewhere: the "no record" answer is dropped too.
    assert_eq!(get(acme, "/cert/x", None).await.status, 401);
    ops::clients::create(&cli, "acme", changes("scope=read"), Timestamp::now()).await.unwrap();
    let deadline = std::time::Duration::from_secs(5);
    eventually(deadline, "the new client reaches the gateway", || async {
        get(acme, "/cert/x", None).await.status == 200
    })
    .await;
    assert_eq!(get(acme, "/cert/x", None).await.status, 200, "cached now");

    ops::clients::revoke(&cli, "acme", Timestamp::now()).await.unwrap();
    eventually(deadline, "the revocation reaches the gateway", || async {
        get(acme, "/cert/x", None).await.status == 401
    })
    .await;
    assert_eq!(get(acme, "/cert/x", None).await.status, 401, "and stays refused");
}

#[tokio::test]
async fn a_certificate_the_gateway_cannot_vouch_for_while_redis_is_down_gets_503() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::mirror().await;
    let store = format!("[store]\nkind = \"redis\"\nurl = \"{}\"\n", redis.url());
    // Created before the gateway starts: the creation's invalidation, had it
    // arrived during the first lookup below, would (rightly) keep that
    // answer out of the cache, and the outage would then find nothing cached.
    let cli = keygate::store::redis::RedisStore::connect(&redis.url(), "kg:").await.unwrap();
    ops::clients::create(&cli, "acme", changes("scope=read"), Timestamp::now()).await.unwrap();
    let mut gateway = CertGateway::start(&config(&upstream, &store)).await;
    let ca = Ca::new();
    let acme = gateway.listener(Some(ca.cn("acme"))).await;
    let beta = gateway.listener(Some(ca.cn("beta"))).await;
    assert_eq!(get(acme, "/cert/x", None).await.status, 200);

    redis.stop();
    assert_eq!(get(acme, "/cert/x", None).await.status, 200, "cached: no store round trip");
    let answer = get(beta, "/cert/x", None).await;
    assert_eq!(answer.status, 503, "never a silent allow, never a 401 for an outage");
    assert_eq!(answer.json()["error"], "store_unavailable");
}

#[tokio::test]
async fn on_a_key_and_cert_route_a_presented_key_wins_and_a_key_route_ignores_certificates() {
    let upstream = Upstream::mirror().await;
    let mut gateway = CertGateway::start(&config(&upstream, "")).await;
    gateway.create_client("acme", "scope=read").await;
    let key = gateway.issue("beta", "scope=read").await;
    let ca = Ca::new();
    let acme = gateway.listener(Some(ca.cn("acme"))).await;

    let by_cert = get(acme, "/both/x", None).await;
    assert_eq!(by_cert.status, 200);
    assert_eq!(by_cert.json()["headers"]["x-keygate-client"], "acme");
    let by_key = get(acme, "/both/x", Some(&key)).await;
    assert_eq!(by_key.status, 200);
    assert_eq!(by_key.json()["headers"]["x-keygate-client"], "beta", "the key wins over the certificate");
    let bad_key = get(acme, "/both/x", Some("kg_acme_forgedforgedforged")).await;
    assert_eq!(bad_key.status, 401, "a presented key is verified, never skipped for the certificate");

    // A certificate-only route does not look at keys, and never forwards one.
    let cert_route = get(acme, "/cert/x", Some(&key)).await;
    assert_eq!(cert_route.status, 200);
    let seen = &cert_route.json()["headers"];
    assert_eq!(seen["x-keygate-client"], "acme");
    assert!(seen.get("x-api-key").is_none(), "the key is stripped: {seen}");

    let key_route = get(acme, "/key/x", None).await;
    assert_eq!(key_route.status, 401, "`auth` defaults to keys only");
    assert_eq!(key_route.json()["error"], "missing_key");
}

#[tokio::test]
async fn a_certificate_caller_has_its_client_record_scopes_and_none_by_default() {
    let upstream = Upstream::mirror().await;
    let mut gateway = CertGateway::start(&config(&upstream, "")).await;
    gateway.create_client("acme", "scope=read").await;
    gateway.create_client("bare", "").await;
    gateway.create_client("shop", "scope=read,orders:write").await;
    let ca = Ca::new();
    let (acme, bare, shop) = (
        gateway.listener(Some(ca.cn("acme"))).await,
        gateway.listener(Some(ca.cn("bare"))).await,
        gateway.listener(Some(ca.cn("shop"))).await,
    );

    let refused = get(acme, "/orders/1", None).await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.json()["error"], "insufficient_scope");
    assert_eq!(get(shop, "/orders/1", None).await.status, 200);
    assert_eq!(get(bare, "/cert/x", None).await.status, 403, "a client without scopes opens nothing");

    // Granting scopes later (an update) takes effect at once.
    let store = &*gateway.gateway.store;
    ops::clients::update(store, "bare", changes("scope=read"), Timestamp::now()).await.unwrap();
    assert_eq!(get(bare, "/cert/x", None).await.status, 200);
}

#[tokio::test]
async fn the_clients_rate_limit_applies_to_its_certificate_and_its_keys_together() {
    let upstream = Upstream::mirror().await;
    let mut gateway = CertGateway::start(&config(&upstream, "")).await;
    // Per minute: no refill to speak of while the test runs.
    gateway.create_client("acme", "scope=read&rate=3/m").await;
    let key = gateway.issue("acme", "scope=read").await;
    let ca = Ca::new();
    let acme = gateway.listener(Some(ca.cn("acme"))).await;

    assert_eq!(get(acme, "/cert/x", None).await.status, 200);
    assert_eq!(get(acme, "/cert/x", None).await.status, 200);
    assert_eq!(get(acme, "/key/x", Some(&key)).await.status, 200, "one budget for the whole client");
    let limited = get(acme, "/cert/x", None).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.json()["error"], "rate_limited");
    assert!(limited.headers.contains_key("retry-after"));
}

#[tokio::test]
async fn usage_of_certificate_callers_is_counted_for_their_client_without_a_key() {
    let redis = RedisServer::start();
    let upstream = Upstream::mirror().await;
    let store = format!("[store]\nkind = \"redis\"\nurl = \"{}\"\n", redis.url());
    let mut gateway = CertGateway::start(&config(&upstream, &store)).await;
    gateway.create_client("acme", "scope=read").await;
    let ca = Ca::new();
    let acme = gateway.listener(Some(ca.cn("acme"))).await;

    for _ in 0..5 {
        assert_eq!(get(acme, "/cert/x", None).await.status, 200);
    }
    assert_eq!(get(acme, "/orders/1", None).await.status, 403);
    let flusher = gateway.gateway.usage_flusher().expect("usage on Redis");
    // Usage is recorded when each response body ends; every body was read.
    flusher.flush_now().await.unwrap();

    let report = redis.usage_report("acme").await;
    assert_eq!(report.totals.requests, 6, "{report:?}");
    let json = serde_json::to_value(&report).unwrap().to_string();
    assert!(json.contains("/cert") && json.contains("/orders"), "per route: {json}");
}
