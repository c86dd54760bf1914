//! Refresh tokens end to end (issue 20): the real gateway's token endpoint
//! hands out a refresh token with every `client_credentials` grant, and
//! `grant_type=refresh_token` trades it for a new pair, retiring it.
//! Rotation, reuse detection revoking the family, concurrent double use,
//! the key's revocation (by the real `keygate` CLI) and rotation ending
//! refresh, scope narrowing, and the browser cookie through a real cookie
//! jar (reqwest's) that an upstream never sees. Each store rule is run on
//! the file store and on a real `redis-server` from `tests/common`.
//!
//! Access tokens expire by the gateway's token clock (JWT times are Unix
//! seconds). The round trip runs twice: on the file store with tokio's
//! clock, paused and advanced past the default 15 minute `access_ttl` and
//! its leeway (`keygate::clock::Clock::Tokio`); and on each store with the
//! system clock, a 1 s `access_ttl`, no leeway, polling with a deadline
//! until the token is refused.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use common::gateway::{Answer, TestGateway, http1_client, send, with_bearer};
use common::redis::RedisServer;
use common::upstream::Upstream;
use common::wait::poll_until;
use http::{Request, StatusCode, header};
use http_body_util::Full;
use jiff::Timestamp;
use keygate::key::KeyId;
use keygate::meta::MetaChanges;
use keygate::ops;
use keygate::store::SharedStore;
use reqwest::cookie::{CookieStore as _, Jar};

const PREFIX: &str = "kg_";

/// Where the gateway keeps its keys (and so its refresh tokens).
enum Store {
    File,
    Redis(RedisServer),
}

impl Store {
    fn redis() -> Self {
        Self::Redis(RedisServer::start())
    }

    fn section(&self) -> String {
        match self {
            Self::File => "[store]\nkind = \"file\"\ndir = \"keys\"\n".to_owned(),
            Self::Redis(redis) => format!("[store]\nkind = \"redis\"\nurl = \"{}\"\n", redis.url()),
        }
    }
}

/// `/` takes keys and tokens and echoes; `/api` forwards to `upstream`.
fn config(store: &Store, extra: &str, tokens_extra: &str, upstream: Option<&str>) -> String {
    let upstream = upstream.map_or(String::new(), |url| {
        format!(
            "[[route]]\npath = \"/api\"\nupstream = \"api\"\nauth = [\"key\", \"jwt\"]\n\n\
             [upstream.api]\ntargets = [\"{url}\"]\n"
        )
    });
    format!(
        r#"{store}
{extra}
[tokens]
enabled = true
{tokens_extra}

{upstream}
[[route]]
path = "/"
upstream = "builtin:echo"
auth = ["key", "jwt"]
"#,
        store = store.section(),
    )
}

/// A gateway on `toml`, with the config also written to `gateway.toml` in
/// its folder for the CLI.
async fn start(toml: &str) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("gateway.toml"), toml).unwrap();
    TestGateway::start_in(toml, dir).await
}

async fn issue(store: &SharedStore, client: &str, scopes: &[&str]) -> (String, KeyId) {
    let changes = MetaChanges {
        scopes: Some(scopes.iter().map(|s| s.to_string()).collect()),
        ..MetaChanges::default()
    };
    let issued = ops::issue(&**store, PREFIX, client, changes, Timestamp::now()).await.expect("issue");
    (issued.key.expose().to_owned(), issued.record.id)
}

/// `POST /oauth/token` with `form`, and the key as HTTP Basic if given.
async fn token_request(gw: &TestGateway, basic: Option<(&str, &str)>, form: &str) -> Answer {
    let mut request = Request::post(gw.url("/oauth/token"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some((client, key)) = basic {
        request = request
            .header(header::AUTHORIZATION, format!("Basic {}", STANDARD.encode(format!("{client}:{key}"))));
    }
    send(&http1_client(), request.body(Full::new(Bytes::from(form.to_owned()))).unwrap()).await
}

/// An access token and a refresh token.
#[derive(Debug, Clone)]
struct Pair {
    access: String,
    refresh: String,
}

fn pair(answer: &Answer) -> Pair {
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.headers[header::CACHE_CONTROL], "no-store");
    let body = answer.json();
    assert_eq!(body["token_type"], "Bearer");
    Pair {
        access: body["access_token"].as_str().expect("access_token").to_owned(),
        refresh: body["refresh_token"].as_str().expect("refresh_token").to_owned(),
    }
}

async fn grant(gw: &TestGateway, client: &str, key: &str) -> Pair {
    pair(&token_request(gw, Some((client, key)), "grant_type=client_credentials").await)
}

async fn refresh(gw: &TestGateway, token: &str) -> Answer {
    token_request(gw, None, &format!("grant_type=refresh_token&refresh_token={token}")).await
}

fn assert_invalid_grant(answer: &Answer, why: &str) {
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{why}: {}", answer.text());
    assert_eq!(answer.json()["error"], "invalid_grant", "{why}");
}

/// Runs `keygate ARGS -c <gateway's config>` to its end, which must be a success.
async fn keygate(gw: &TestGateway, args: &[&str]) {
    let run = common::binary::run_cli_with_config(&gw.dir.path().join("gateway.toml"), args).await;
    assert_eq!(run.code, 0, "keygate {args:?}: {}", run.stderr);
}

// === The round trip ===

#[tokio::test]
async fn key_to_access_token_to_expiry_to_refresh_file_store() {
    key_to_access_token_to_expiry_to_refresh_and_no_refresh_token_in_any_log(Store::File).await;
}

#[tokio::test]
async fn key_to_access_token_to_expiry_to_refresh_redis_store() {
    key_to_access_token_to_expiry_to_refresh_and_no_refresh_token_in_any_log(Store::redis()).await;
}

/// An access token's payload, decoded (not verified).
fn claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url");
    serde_json::from_slice(&json).expect("JSON claims")
}

/// The default lifetimes, on tokio's paused clock: a token good one second
/// before `exp + leeway` is refused at it, and the refresh token still
/// gets a new pair then.
#[tokio::test]
async fn an_access_token_expires_at_exp_plus_leeway_on_a_paused_clock_and_refresh_renews_it() {
    let toml = config(&Store::File, "", "key_refresh = \"1h\"\n", None);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    let config = keygate::config::Config::from_toml(&toml, dir.path()).expect("config");
    let (access_ttl, leeway) = (config.tokens.access_ttl, config.tokens.leeway);
    assert_eq!((access_ttl, leeway), (Duration::from_secs(15 * 60), Duration::from_secs(30)), "the defaults");
    let store = keygate::store::open(&config.store, None).await.expect("store");
    let gw = TestGateway::start_with_clock(config, store, dir, keygate::clock::Clock::tokio()).await;
    let (key, id) = issue(&gw.gateway.store, "acme", &["read"]).await;

    tokio::time::pause();
    let first = grant(&gw, "acme", &key).await;
    let issued = claims(&first.access);
    let lifetime = issued["exp"].as_u64().unwrap() - issued["iat"].as_u64().unwrap();
    assert_eq!(lifetime, access_ttl.as_secs());
    assert_eq!(with_bearer(&gw, http::Method::GET, "/x", &first.access).await.status, StatusCode::OK);

    // One second short of `exp + leeway`: still good (from the cache).
    tokio::time::advance(access_ttl + leeway - Duration::from_secs(1)).await;
    let answer = with_bearer(&gw, http::Method::GET, "/x", &first.access).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    tokio::time::advance(Duration::from_secs(1)).await;
    let expired = with_bearer(&gw, http::Method::GET, "/x", &first.access).await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED, "{}", expired.text());
    assert_eq!(expired.json()["error"], "invalid_token");

    let second = pair(&refresh(&gw, &first.refresh).await);
    let renewed = claims(&second.access);
    assert!(renewed["iat"].as_u64() > issued["exp"].as_u64(), "issued on the advanced clock: {renewed}");
    let answer = with_bearer(&gw, http::Method::GET, "/x", &second.access).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["headers"]["x-keygate-key-id"], id.as_str(), "in the same key's name");
}

async fn key_to_access_token_to_expiry_to_refresh_and_no_refresh_token_in_any_log(store: Store) {
    let logs = common::logs::capture();
    let gw = start(&config(&store, "", "access_ttl = \"1s\"\nleeway = \"0s\"\n", None)).await;
    let (key, id) = issue(&gw.gateway.store, "acme", &["read"]).await;

    let first = grant(&gw, "acme", &key).await;
    assert!(first.refresh.starts_with("kgr_acme."), "{}", first.refresh);
    let answer = with_bearer(&gw, http::Method::GET, "/x", &first.access).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["headers"]["x-keygate-key-id"], id.as_str());

    poll_until(Duration::from_secs(5), "the access token expires", || async {
        with_bearer(&gw, http::Method::GET, "/x", &first.access).await.status == StatusCode::UNAUTHORIZED
    })
    .await;
    let expired = with_bearer(&gw, http::Method::GET, "/x", &first.access).await;
    assert_eq!(expired.json()["error"], "invalid_token");

    let answer = refresh(&gw, &first.refresh).await;
    let second = pair(&answer);
    assert_eq!(answer.json()["scope"], "read");
    assert_ne!(second.refresh, first.refresh, "a new refresh token each time");
    let answer = with_bearer(&gw, http::Method::GET, "/x", &second.access).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["headers"]["x-keygate-key-id"], id.as_str(), "in the same key's name");

    // Refusals (a replay revokes the family) do not echo the token either.
    let replay = refresh(&gw, &first.refresh).await;
    assert_invalid_grant(&replay, "the first token was used");
    let after = refresh(&gw, &second.refresh).await;
    assert_invalid_grant(&after, "its family is revoked");
    for token in [&first.refresh, &second.refresh] {
        for body in [&replay.text(), &after.text(), &expired.text()] {
            assert!(!body.contains(token.as_str()), "a refusal body carries a refresh token: {body}");
        }
        let secret = token.split_once('.').unwrap().1;
        assert!(!logs.text().contains(secret), "a refresh token is in the logs:\n{}", logs.text());
    }
    assert!(!logs.lines_with("its family is revoked").is_empty(), "the replay is logged:\n{}", logs.text());
    // What is stored is a hash: the store holds no clear token.
    let secret = first.refresh.split_once('.').unwrap().1;
    let stored = match &store {
        Store::File => std::fs::read_to_string(gw.dir.path().join("keys/.refresh/acme.toml")).unwrap(),
        Store::Redis(redis) => {
            let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
            let names: Vec<String> = redis::cmd("KEYS").arg("kg:{acme}:refresh:*").query(&mut conn).unwrap();
            assert_eq!(names.len(), 2, "{names:?}");
            let mut all = String::new();
            for name in names {
                let values: Vec<String> = redis::cmd("HVALS").arg(&name).query(&mut conn).unwrap();
                all.push_str(&values.join(" "));
            }
            all
        }
    };
    assert!(stored.contains("acme."), "the records are there: {stored}");
    assert!(!stored.contains(secret), "{stored}");
}

// === Rotation and reuse ===

async fn a_replayed_refresh_token_revokes_its_family_and_only_its_family(store: Store) {
    let gw = start(&config(&store, "", "", None)).await;
    let (key, _) = issue(&gw.gateway.store, "acme", &["read"]).await;
    let first = grant(&gw, "acme", &key).await;
    let other_family = grant(&gw, "acme", &key).await;

    let second = pair(&refresh(&gw, &first.refresh).await);
    let third = pair(&refresh(&gw, &second.refresh).await);
    assert_invalid_grant(&refresh(&gw, &second.refresh).await, "a used token is refused");
    // The replay revoked every descendant, the newest too.
    assert_invalid_grant(&refresh(&gw, &third.refresh).await, "the newest of the family");
    assert_invalid_grant(&refresh(&gw, &first.refresh).await, "the oldest of the family");
    // The access tokens are the key's, not the family's: they stand.
    assert_eq!(with_bearer(&gw, http::Method::GET, "/x", &third.access).await.status, StatusCode::OK);
    // Another grant of the same key is another family.
    let answer = refresh(&gw, &other_family.refresh).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
}

#[tokio::test]
async fn a_replayed_refresh_token_revokes_its_family_file_store() {
    a_replayed_refresh_token_revokes_its_family_and_only_its_family(Store::File).await;
}

#[tokio::test]
async fn a_replayed_refresh_token_revokes_its_family_redis_store() {
    a_replayed_refresh_token_revokes_its_family_and_only_its_family(Store::redis()).await;
}

async fn concurrent_uses_of_one_refresh_token_yield_exactly_one_success(store: Store) {
    let gw = Arc::new(start(&config(&store, "", "", None)).await);
    let (key, _) = issue(&gw.gateway.store, "acme", &["read"]).await;
    for round in 0..3 {
        let token = grant(&gw, "acme", &key).await.refresh;
        let uses = (0..8).map(|_| {
            let (gw, token) = (Arc::clone(&gw), token.clone());
            tokio::spawn(async move { refresh(&gw, &token).await })
        });
        let answers: Vec<Answer> =
            futures_util::future::join_all(uses).await.into_iter().map(Result::unwrap).collect();
        let won: Vec<&Answer> = answers.iter().filter(|a| a.status == StatusCode::OK).collect();
        assert_eq!(won.len(), 1, "round {round}: {:?}", answers.iter().map(Answer::text).collect::<Vec<_>>());
        for lost in answers.iter().filter(|a| a.status != StatusCode::OK) {
            assert_invalid_grant(lost, "the other uses");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uses_yield_exactly_one_success_file_store() {
    concurrent_uses_of_one_refresh_token_yield_exactly_one_success(Store::File).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uses_yield_exactly_one_success_redis_store() {
    concurrent_uses_of_one_refresh_token_yield_exactly_one_success(Store::redis()).await;
}

/// Two gateways sharing one store (one folder, one Redis), each asked to
/// use the same refresh token at the same moment: one pair in all.
async fn two_gateways_racing_on_one_refresh_token_yield_one_pair(store: Store) {
    let a = Arc::new(start(&config(&store, "", "", None)).await);
    let text = config(&store, "", "", None);
    // B on A's folder: its `keys` resolves against A's directory.
    let b_dir = tempfile::tempdir().unwrap();
    let text = match &store {
        Store::File => {
            text.replace("dir = \"keys\"", &format!("dir = \"{}\"", a.dir.path().join("keys").display()))
        }
        Store::Redis(_) => text,
    };
    let b = Arc::new(TestGateway::start_in(&text, b_dir).await);
    let (key, _) = issue(&a.gateway.store, "acme", &["read"]).await;
    let granted_at_a = grant(&a, "acme", &key).await.refresh;
    let answer = refresh(&b, &granted_at_a).await;
    assert_eq!(answer.status, StatusCode::OK, "B sees A's tokens: {}", answer.text());
    for round in 0..5 {
        let token = grant(&a, "acme", &key).await.refresh;
        let uses = [&a, &b, &a, &b].map(|gw| {
            let (gw, token) = (Arc::clone(gw), token.clone());
            tokio::spawn(async move { refresh(&gw, &token).await.status })
        });
        let statuses: Vec<StatusCode> =
            futures_util::future::join_all(uses).await.into_iter().map(Result::unwrap).collect();
        let won = statuses.iter().filter(|s| **s == StatusCode::OK).count();
        assert_eq!(won, 1, "round {round}: {statuses:?}");
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK || *s == StatusCode::BAD_REQUEST),
            "{statuses:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_racing_yield_one_pair_file_store() {
    two_gateways_racing_on_one_refresh_token_yield_one_pair(Store::File).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_racing_yield_one_pair_redis_store() {
    two_gateways_racing_on_one_refresh_token_yield_one_pair(Store::redis()).await;
}

// === The key behind the tokens ===

async fn revoking_the_key_with_the_cli_ends_its_refresh_tokens(store: Store) {
    let gw = start(&config(&store, "", "", None)).await;
    let (key, id) = issue(&gw.gateway.store, "acme", &["read"]).await;
    let (other_key, other_id) = issue(&gw.gateway.store, "acme", &["read"]).await;
    let doomed = grant(&gw, "acme", &key).await;
    let used_once = pair(&refresh(&gw, &doomed.refresh).await);
    let kept = grant(&gw, "acme", &other_key).await;

    keygate(&gw, &["keys", "revoke", id.as_str()]).await;
    // No wait: the refresh reads the key from the store.
    assert_invalid_grant(&refresh(&gw, &used_once.refresh).await, "the key is revoked");
    let answer = refresh(&gw, &kept.refresh).await;
    assert_eq!(answer.status, StatusCode::OK, "{other_id}'s tokens stand: {}", answer.text());

    // The family is gone for good, not only while the key is revoked.
    let record = gw.gateway.store.get(&id).await.unwrap().unwrap();
    assert_eq!(record.meta.status, keygate::meta::KeyStatus::Revoked);
    assert_invalid_grant(&refresh(&gw, &used_once.refresh).await, "still");
}

#[tokio::test]
async fn a_cli_revocation_ends_refresh_file_store() {
    revoking_the_key_with_the_cli_ends_its_refresh_tokens(Store::File).await;
}

#[tokio::test]
async fn a_cli_revocation_ends_refresh_redis_store() {
    revoking_the_key_with_the_cli_ends_its_refresh_tokens(Store::redis()).await;
}

async fn rotating_the_key_ends_its_refresh_tokens(store: Store) {
    let gw = start(&config(&store, "", "", None)).await;
    let (key, id) = issue(&gw.gateway.store, "acme", &["read"]).await;
    let before = grant(&gw, "acme", &key).await;

    let rotated =
        ops::rotate(&*gw.gateway.store, &id, Duration::from_secs(3600), None, PREFIX, Timestamp::now())
            .await
            .expect("rotate");
    assert_invalid_grant(&refresh(&gw, &before.refresh).await, "the key was rotated");
    // The old key itself keeps its grace period; its tokens from before
    // the rotation are refused at refresh only.
    let answer = token_request(&gw, Some(("acme", &key)), "grant_type=client_credentials").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    // The new key starts families of its own.
    let fresh = grant(&gw, "acme", rotated.key.expose()).await;
    assert_eq!(refresh(&gw, &fresh.refresh).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_key_rotation_ends_refresh_file_store() {
    rotating_the_key_ends_its_refresh_tokens(Store::File).await;
}

#[tokio::test]
async fn a_key_rotation_ends_refresh_redis_store() {
    rotating_the_key_ends_its_refresh_tokens(Store::redis()).await;
}

// === Scope ===

#[tokio::test]
async fn scope_narrows_on_refresh_and_never_widens_and_a_refused_widening_loses_nothing() {
    let redis = Store::redis();
    let gw = start(&config(&redis, "", "", None)).await;
    let (key, _) = issue(&gw.gateway.store, "acme", &["read", "write"]).await;
    let both = grant(&gw, "acme", &key).await;

    let answer = token_request(
        &gw,
        None,
        &format!("grant_type=refresh_token&refresh_token={}&scope=read", both.refresh),
    )
    .await;
    let read_only = pair(&answer);
    assert_eq!(answer.json()["scope"], "read");
    assert_eq!(with_bearer(&gw, http::Method::GET, "/x", &read_only.access).await.status, StatusCode::OK);
    let answer = with_bearer(&gw, http::Method::POST, "/x", &read_only.access).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "narrowed away: {}", answer.text());

    // Asking the narrowed family for `write` again is refused...
    let widen = format!("grant_type=refresh_token&refresh_token={}&scope=write", read_only.refresh);
    let answer = token_request(&gw, None, &widen).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text());
    assert_eq!(answer.json()["error"], "invalid_scope");
    // ...and the token is still good (the refusal changed nothing), with
    // the narrowed scope when none is asked for.
    let answer = refresh(&gw, &read_only.refresh).await;
    pair(&answer);
    assert_eq!(answer.json()["scope"], "read");
}

// === Client authentication and refusals ===

#[tokio::test]
async fn a_refresh_with_another_clients_credentials_is_invalid_client() {
    let gw = start(&config(&Store::File, "", "", None)).await;
    let (key, _) = issue(&gw.gateway.store, "acme", &["read"]).await;
    let (other, _) = issue(&gw.gateway.store, "globex", &["read"]).await;
    let tokens = grant(&gw, "acme", &key).await;

    let form = format!("grant_type=refresh_token&refresh_token={}", tokens.refresh);
    let answer = token_request(&gw, Some(("globex", &other)), &form).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.text());
    assert_eq!(answer.json()["error"], "invalid_client");
    let answer = token_request(&gw, Some(("acme", "kg_acme_not-a-key")), &form).await;
    assert_eq!(answer.json()["error"], "invalid_client", "bad credentials are not ignored");
    // Refused before the token was looked at: it still works, with its
    // own client's credentials too.
    let answer = token_request(&gw, Some(("acme", &key)), &form).await;
    pair(&answer);
}

#[tokio::test]
async fn an_expired_refresh_token_is_invalid_grant() {
    let gw = start(&config(&Store::File, "", "refresh_ttl = \"1s\"\n", None)).await;
    let (key, _) = issue(&gw.gateway.store, "acme", &["read"]).await;
    let expiring = grant(&gw, "acme", &key).await;
    // The gateway stamped `expires_at` at most this second plus 1 s.
    let granted_by = Timestamp::now().as_second();
    poll_until(Duration::from_secs(5), "the wall clock passes the expiry", || async {
        Timestamp::now().as_second() > granted_by + 1
    })
    .await;
    assert_invalid_grant(&refresh(&gw, &expiring.refresh).await, "expired");
}

#[tokio::test]
async fn malformed_and_unknown_refresh_tokens_are_refused_and_spend_the_failure_budget() {
    let extra = "[keys]\nauth_failures_per_ip = \"1/h\"\nauth_failures_burst = 3\n";
    let gw = start(&config(&Store::File, extra, "", None)).await;
    let (key, _) = issue(&gw.gateway.store, "acme", &["read"]).await;
    let good = grant(&gw, "acme", &key).await;

    // Bad requests are not failed authentications.
    let answer = token_request(&gw, None, "grant_type=refresh_token").await;
    assert_eq!(answer.json()["error"], "invalid_request", "no token at all: {}", answer.text());
    let form = format!("grant_type=refresh_token&refresh_token={}&refresh_token=x", good.refresh);
    assert_eq!(token_request(&gw, None, &form).await.json()["error"], "invalid_request", "repeated");

    let unknown = format!("kgr_acme.{}", "A".repeat(43));
    let mut statuses = Vec::new();
    for token in ["garbage", &unknown, "kgr_acme.short", &unknown, &unknown, &unknown, &unknown] {
        let answer = refresh(&gw, token).await;
        if answer.status == StatusCode::BAD_REQUEST {
            assert_invalid_grant(&answer, token);
        }
        statuses.push(answer.status);
    }
    let refused = statuses.iter().filter(|s| **s == StatusCode::BAD_REQUEST).count();
    assert!((3..=4).contains(&refused), "{statuses:?}");
    assert!(statuses[refused..].iter().all(|s| *s == StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    let answer = refresh(&gw, &good.refresh).await;
    assert_eq!(answer.json()["error"], "too_many_auth_failures", "the budget is the address's");
}

// === The browser cookie ===

/// A browser-like client: a real cookie jar (reqwest's), shared so the
/// test can look into it.
fn browser() -> (reqwest::Client, Arc<Jar>) {
    let jar = Arc::new(Jar::default());
    let client = reqwest::Client::builder().cookie_provider(Arc::clone(&jar)).build().unwrap();
    (client, jar)
}

async fn post_form(client: &reqwest::Client, url: &str, form: &'static str) -> reqwest::Response {
    client
        .post(url)
        .header(header::CONTENT_TYPE.as_str(), "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap()
}

async fn json(answer: reqwest::Response) -> serde_json::Value {
    serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap()
}

fn jar_cookie(jar: &Jar, url: &str, name: &str) -> Option<String> {
    let cookies = jar.cookies(&url.parse().unwrap())?;
    cookies
        .to_str()
        .unwrap()
        .split("; ")
        .find_map(|pair| pair.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')).map(str::to_owned))
}

#[tokio::test]
async fn the_refresh_cookie_rides_a_real_cookie_jar_and_never_reaches_an_upstream() {
    let upstream = Upstream::mirror().await;
    let tokens = "refresh_cookie = true\nrefresh_cookie_path = \"/\"\n";
    let gw = start(&config(&Store::File, "", tokens, Some(&upstream.url()))).await;
    let (key, _) = issue(&gw.gateway.store, "acme", &["read"]).await;
    let (browser, jar) = browser();
    let endpoint = gw.url("/oauth/token");

    let answer = browser
        .post(&endpoint)
        .basic_auth("acme", Some(&key))
        .header(header::CONTENT_TYPE.as_str(), "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let set_cookie = answer.headers()[header::SET_COOKIE.as_str()].to_str().unwrap().to_owned();
    let body: serde_json::Value = json(answer).await;
    assert!(body.get("refresh_token").is_none(), "scripts never see it: {body}");
    let first = jar_cookie(&jar, &endpoint, "__Host-keygate-refresh").expect("the jar took the cookie");
    assert!(first.starts_with("kgr_acme."), "{first}");
    for attribute in ["Path=/;", "Secure", "HttpOnly", "SameSite=Strict", "Max-Age=2592000"] {
        assert!(set_cookie.contains(attribute), "{attribute} missing: {set_cookie}");
    }
    assert!(!set_cookie.contains("Domain"), "__Host- cookies have no Domain: {set_cookie}");

    // Sent along to an API route, with the page's own cookie: the
    // upstream gets that one and the identity, never the refresh token.
    let api = gw.url("/api/orders");
    jar.add_cookie_str("theme=dark", &api.parse().unwrap());
    let access = body["access_token"].as_str().unwrap();
    let answer = browser.get(&api).bearer_auth(access).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let seen: serde_json::Value = json(answer).await;
    assert_eq!(seen["headers"]["x-keygate-client"], "acme");
    assert_eq!(seen["headers"]["cookie"], "theme=dark", "{seen}");
    assert!(!seen.to_string().contains(&first), "the upstream saw the refresh token: {seen}");

    // Refresh from the cookie alone (no form field, no credentials).
    let answer = post_form(&browser, &endpoint, "grant_type=refresh_token").await;
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = json(answer).await;
    assert!(body.get("refresh_token").is_none(), "{body}");
    let second = jar_cookie(&jar, &endpoint, "__Host-keygate-refresh").unwrap();
    assert_ne!(second, first, "the jar holds the successor");
    let answer = browser.get(&api).bearer_auth(body["access_token"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let answer = post_form(&browser, &endpoint, "grant_type=refresh_token").await;
    assert_eq!(answer.status(), 200, "and again with the successor");

    // The first cookie, replayed by whoever copied it, ends the family,
    // the browser's current cookie with it.
    let answer = refresh(&gw, &first).await;
    assert_invalid_grant(&answer, "a replayed cookie");
    assert!(answer.headers.get(header::SET_COOKIE).is_none(), "a token from a form sets no cookie");
    let answer = post_form(&browser, &endpoint, "grant_type=refresh_token").await;
    assert_eq!(answer.status(), 400);
    let cleared = answer.headers()[header::SET_COOKIE.as_str()].to_str().unwrap().to_owned();
    let body: serde_json::Value = json(answer).await;
    assert_eq!(body["error"], "invalid_grant");
    // The refused cookie is deleted, so the browser stops sending it.
    assert!(cleared.starts_with("__Host-keygate-refresh=;") && cleared.contains("Max-Age=0"), "{cleared}");
    assert!(cleared.contains("Path=/;"), "the same path, or the browser keeps it: {cleared}");
    assert_eq!(jar_cookie(&jar, &endpoint, "__Host-keygate-refresh"), None, "the jar dropped it");
    let answer = post_form(&browser, &endpoint, "grant_type=refresh_token").await;
    assert_eq!(answer.status(), 400);
    assert_eq!(json(answer).await["error"], "invalid_request", "no token left to present");
}

#[tokio::test]
async fn on_the_token_path_the_cookie_is_secure_prefixed_and_stays_off_other_paths() {
    let upstream = Upstream::mirror().await;
    let redis = Store::redis();
    let gw = start(&config(&redis, "", "refresh_cookie = true\n", Some(&upstream.url()))).await;
    let (key, _) = issue(&gw.gateway.store, "acme", &["read"]).await;
    let (browser, jar) = browser();
    let endpoint = gw.url("/oauth/token");

    let answer = browser
        .post(&endpoint)
        .bearer_auth(&key)
        .header(header::CONTENT_TYPE.as_str(), "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let set_cookie = answer.headers()[header::SET_COOKIE.as_str()].to_str().unwrap().to_owned();
    assert!(set_cookie.starts_with("__Secure-keygate-refresh=kgr_acme."), "{set_cookie}");
    assert!(set_cookie.contains("Path=/oauth/token;"), "{set_cookie}");
    let token = jar_cookie(&jar, &endpoint, "__Secure-keygate-refresh").expect("in the jar");
    assert_eq!(jar_cookie(&jar, &gw.url("/api/orders"), "__Secure-keygate-refresh"), None, "path-bound");

    // Even sent by hand to a route, it goes no further.
    let access = json(answer).await["access_token"].as_str().unwrap().to_owned();
    let answer = reqwest::Client::new()
        .get(gw.url("/api/orders"))
        .bearer_auth(&access)
        .header(header::COOKIE.as_str(), format!("a=1; __Secure-keygate-refresh={token}"))
        .send()
        .await
        .unwrap();
    let seen: serde_json::Value = json(answer).await;
    assert_eq!(seen["headers"]["cookie"], "a=1", "{seen}");

    let answer = post_form(&browser, &endpoint, "grant_type=refresh_token").await;
    assert_eq!(answer.status(), 200);
    assert_ne!(jar_cookie(&jar, &endpoint, "__Secure-keygate-refresh").unwrap(), token);
}
