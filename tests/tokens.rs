//! Access tokens end to end (issue 20): a key traded at the real token
//! endpoint for a JWT, which the real gateway then accepts on
//! `auth = ["key", "jwt"]` routes in the key's name; refusals in RFC 6749
//! §5.2 and RFC 6750 §3 form; and a key revoked on one gateway ending its
//! tokens on another through the store's pub/sub (a real `redis-server`).

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use common::gateway::{Answer, TestGateway, get, http1_client, send, with_bearer};
use common::redis::RedisServer;
use common::wait::eventually;
use http::{Request, StatusCode, header};
use http_body_util::Full;
use jiff::Timestamp;
use keygate::key::KeyId;
use keygate::meta::MetaChanges;
use keygate::ops::{self, RevokeTarget};
use keygate::store::SharedStore;

const PREFIX: &str = "kg_";

/// How soon a revocation must reach another gateway instance (as for keys).
const INVALIDATION_DEADLINE: Duration = Duration::from_millis(500);

/// `/` takes keys and tokens; `/keys-only` keys alone; both echo.
fn config(store: &str, tokens_extra: &str) -> String {
    format!(
        r#"{store}
[tokens]
enabled = true
{tokens_extra}

[[route]]
path = "/keys-only"
upstream = "builtin:echo"

[[route]]
path = "/"
upstream = "builtin:echo"
auth = ["key", "jwt"]
"#
    )
}

async fn issue(store: &SharedStore, client: &str, scopes: &[&str]) -> (String, KeyId) {
    let changes = MetaChanges {
        scopes: Some(scopes.iter().map(|s| s.to_string()).collect()),
        ..MetaChanges::default()
    };
    let issued = ops::issue(&**store, PREFIX, client, changes, Timestamp::now()).await.expect("issue");
    (issued.key.expose().to_owned(), issued.record.id)
}

/// `POST /oauth/token` with the key as HTTP Basic `client:key`.
async fn token_request(gw: &TestGateway, client: &str, key: &str, form: &str) -> Answer {
    let basic = STANDARD.encode(format!("{client}:{key}"));
    let request = Request::post(gw.url("/oauth/token"))
        .header(header::AUTHORIZATION, format!("Basic {basic}"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(form.to_owned())))
        .unwrap();
    send(&http1_client(), request).await
}

async fn access_token(gw: &TestGateway, client: &str, key: &str, form: &str) -> String {
    let answer = token_request(gw, client, key, form).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    answer.json()["access_token"].as_str().expect("access_token").to_owned()
}

#[tokio::test]
async fn a_key_trades_for_a_token_that_opens_jwt_routes_in_the_keys_name() {
    let log = common::access::AccessLog::new();
    let gw = TestGateway::start(&format!("{}{}", log.toml("text"), config("", ""))).await;
    let (key, id) = issue(&gw.gateway.store, "acme", &["read"]).await;

    let answer = token_request(&gw, "acme", &key, "grant_type=client_credentials").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.headers[header::CACHE_CONTROL], "no-store");
    let body = answer.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    assert_eq!(body["scope"], "read");
    let token = body["access_token"].as_str().expect("access_token");

    let answer = with_bearer(&gw, http::Method::GET, "/orders", token).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let seen = &answer.json()["headers"];
    assert_eq!(seen["x-keygate-client"], "acme");
    assert_eq!(seen["x-keygate-key-id"], id.as_str());
    assert!(seen.get("authorization").is_none(), "the token is not forwarded: {seen}");
    let line = log.wait_for_text("path=\"/orders\"").await;
    assert!(line.contains("credential=\"jwt\""), "the access log names the token: {line}");
    assert!(!log.text().contains(token), "no token in the access log");

    // The JWKS publishes the key the token is signed with.
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
    let jwks = get(&gw.url("/.well-known/jwks.json")).await;
    assert_eq!(jwks.status, StatusCode::OK);
    assert_eq!(jwks.json()["keys"][0]["kid"], header["kid"]);
    assert_eq!(header["alg"], "EdDSA");

    // The key as bearer works at the endpoint too.
    let request = Request::post(gw.url("/oauth/token"))
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .body(Full::new(Bytes::from_static(b"grant_type=client_credentials")))
        .unwrap();
    assert_eq!(send(&http1_client(), request).await.status, StatusCode::OK);
}

#[tokio::test]
async fn scope_narrows_and_never_widens() {
    let gw = TestGateway::start(&config("", "")).await;
    let (key, _) = issue(&gw.gateway.store, "acme", &["read", "write"]).await;

    let read_only = access_token(&gw, "acme", &key, "grant_type=client_credentials&scope=read").await;
    assert_eq!(with_bearer(&gw, http::Method::GET, "/x", &read_only).await.status, StatusCode::OK);
    let answer = with_bearer(&gw, http::Method::POST, "/x", &read_only).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "narrowed away: {}", answer.text());
    assert_eq!(answer.json()["error"], "insufficient_scope");

    // The key itself still writes.
    let both = access_token(&gw, "acme", &key, "grant_type=client_credentials").await;
    assert_eq!(with_bearer(&gw, http::Method::POST, "/x", &both).await.status, StatusCode::OK);

    let answer = token_request(&gw, "acme", &key, "grant_type=client_credentials&scope=read+admin").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.json()["error"], "invalid_scope");
}

#[tokio::test]
async fn refusals_take_the_rfc_shapes() {
    let gw = TestGateway::start(&config("", "")).await;
    let (key, _) = issue(&gw.gateway.store, "acme", &["read"]).await;

    // RFC 6749 §5.2.
    let answer = token_request(&gw, "acme", "kg_acme.nope.nope", "grant_type=client_credentials").await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.text());
    assert_eq!(answer.json()["error"], "invalid_client");
    assert!(answer.headers[header::WWW_AUTHENTICATE].to_str().unwrap().starts_with("Basic"));
    let answer = token_request(&gw, "acme", &key, "grant_type=password").await;
    assert_eq!(
        (answer.status, answer.json()["error"].clone()),
        (StatusCode::BAD_REQUEST, "unsupported_grant_type".into())
    );
    let answer = token_request(&gw, "acme", &key, "scope=read").await;
    assert_eq!(
        (answer.status, answer.json()["error"].clone()),
        (StatusCode::BAD_REQUEST, "invalid_request".into())
    );

    // RFC 6750 §3: a tampered token (scope widened) is refused.
    let token = access_token(&gw, "acme", &key, "grant_type=client_credentials").await;
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
    claims["scope"] = "read write".into();
    parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let answer = with_bearer(&gw, http::Method::POST, "/x", &parts.join(".")).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.text());
    assert_eq!(answer.json()["error"], "invalid_token");
    assert_eq!(answer.headers[header::WWW_AUTHENTICATE], "Bearer realm=\"keygate\", error=\"invalid_token\"");

    // A route that takes keys only does not take tokens.
    let answer = with_bearer(&gw, http::Method::GET, "/keys-only", &token).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.json()["error"], "invalid_key");
}

/// The same signing key on two gateways, as a deployment has it.
fn signing_key_pem() -> String {
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", STANDARD.encode(pkcs8.as_ref()))
}

#[tokio::test]
async fn revoking_the_key_ends_its_tokens_on_another_gateway() {
    let redis = RedisServer::start();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let pem = signing_key_pem();
    for dir in &dirs {
        std::fs::write(dir.path().join("signing.pem"), &pem).unwrap();
    }
    let text = config(
        &format!("[store]\nkind = \"redis\"\nurl = \"{}\"\n", redis.url()),
        "signing_key = \"signing.pem\"\n",
    );
    let [dir_a, dir_b] = dirs;
    let a = TestGateway::start_in(&text, dir_a).await;
    let b = TestGateway::start_in(&text, dir_b).await;
    let (key, id) = issue(&a.gateway.store, "acme", &["read"]).await;

    let token = access_token(&a, "acme", &key, "grant_type=client_credentials").await;
    let answer = with_bearer(&b, http::Method::GET, "/x", &token).await;
    assert_eq!(answer.status, StatusCode::OK, "B verifies A's token: {}", answer.text());

    ops::revoke(&*a.gateway.store, &RevokeTarget::Id(id), PREFIX).await.expect("revoke");
    eventually(INVALIDATION_DEADLINE, "B refuses the revoked key's token", || async {
        with_bearer(&b, http::Method::GET, "/x", &token).await.status == StatusCode::UNAUTHORIZED
    })
    .await;
    let answer = with_bearer(&b, http::Method::GET, "/x", &token).await;
    assert_eq!(answer.json()["error"], "invalid_token");
}

#[tokio::test]
async fn forged_tokens_spend_the_addresses_failure_budget_but_not_a_verified_tokens() {
    let text = config("[keys]\nauth_failures_per_ip = \"1/h\"\nauth_failures_burst = 3\n", "");
    let gw = TestGateway::start(&text).await;
    let (key, _) = issue(&gw.gateway.store, "acme", &["read"]).await;
    let token = access_token(&gw, "acme", &key, "grant_type=client_credentials").await;
    assert_eq!(with_bearer(&gw, http::Method::GET, "/x", &token).await.status, StatusCode::OK);

    // Well-formed tokens under a kid this gateway never had.
    let other = TestGateway::start(&config("", "")).await;
    let (other_key, _) = issue(&other.gateway.store, "acme", &["read"]).await;
    let forged = access_token(&other, "acme", &other_key, "grant_type=client_credentials").await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(with_bearer(&gw, http::Method::GET, "/x", &forged).await.status);
    }
    // The burst (plus the one failure that spends it) is verified and
    // refused; every token after it is refused unverified.
    let verified = statuses.iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count();
    assert!((3..=4).contains(&verified), "{statuses:?}");
    assert!(statuses[verified..].iter().all(|s| *s == StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    let answer = with_bearer(&gw, http::Method::GET, "/x", &forged).await;
    assert_eq!(answer.json()["error"], "too_many_auth_failures");
    // The token verified before still works from the same address.
    assert_eq!(with_bearer(&gw, http::Method::GET, "/x", &token).await.status, StatusCode::OK);
}
