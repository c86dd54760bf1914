//! Redis over TLS (`rediss://`, issue 16 defect 6): the real binary against a
//! real `redis-server` that speaks only TLS (`--port 0 --tls-port P`), with a
//! certificate from a CA made in the test.
//!
//! Regression: `rediss://` used to pass `keygate check` and then fail every
//! command with "TLS feature not enabled". Now keys are issued, verified,
//! revoked (pub/sub) and counted (usage) over TLS; a wrong CA, a plain Redis
//! behind a TLS URL and a missing client certificate are refused with a
//! message naming the cause and never the password; `check` refuses bad TLS
//! settings by field and line.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::binary::Served;
use common::gateway::{Answer, http1_client, send};
use common::pki::TestCa;
use common::redis::RedisServer;
use http::Request;
use http_body_util::Full;

fn keygate() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keygate"));
    for name in ["KEYGATE_REDIS_URL", "KEYGATE_REDIS_CA", "KEYGATE_REDIS_CERT", "KEYGATE_REDIS_KEY"] {
        command.env_remove(name);
    }
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A gateway config in its own folder: `store` is the `[store]` body; the CA
/// the test gives is copied to `certs/redis-ca.pem`, which `tls_ca` names
/// relative to the config file.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(store: &str, ca: Option<&Path>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        if let Some(ca) = ca {
            std::fs::create_dir(dir.path().join("certs")).unwrap();
            std::fs::copy(ca, dir.path().join("certs/redis-ca.pem")).unwrap();
        }
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:0"

[store]
kind = "redis"
{store}

[keys]
# Long: a revoked key that stops working did so through pub/sub, not expiry.
cache_ttl = "1h"

[usage]
flush_interval = "100ms"

[[route]]
path = "/health"
upstream = "builtin:echo"
public = true

[[route]]
path = "/"
upstream = "builtin:echo"
"#
        );
        std::fs::write(dir.path().join("gateway.toml"), config).unwrap();
        Setup { dir }
    }

    /// `url = ...` and `tls_ca = "certs/redis-ca.pem"` for `redis`, trusting `ca`.
    fn trusting(redis: &RedisServer, ca: &TestCa) -> Setup {
        Setup::new(&format!("url = \"{}\"\ntls_ca = \"certs/redis-ca.pem\"", redis.url()), Some(&ca.ca_pem()))
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("gateway.toml")
    }

    /// `keygate ARGS... -c gateway.toml`.
    fn run(&self, args: &[&str]) -> Output {
        keygate().args(args).arg("-c").arg(self.config()).output().unwrap()
    }

    /// `keygate keys issue`: the key, alone on stdout.
    fn issue(&self, client: &str) -> String {
        let out = self.run(&["keys", "issue", "--client", client, "--scopes", "read"]);
        assert!(out.status.success(), "issue failed: {}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    }

    fn serve(&self) -> (Served, String) {
        let mut served = Served::start(&self.config(), &[]);
        let base = format!("http://{}", served.gateway_address());
        (served, base)
    }
}

async fn call(base: &str, key: Option<&str>, path: &str) -> Answer {
    let mut request = Request::get(format!("{base}{path}"));
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    send(&http1_client(), request.body(Full::<Bytes>::default()).unwrap()).await
}

/// Calls until the answer has `status` (15 s at most); returns that answer.
async fn until_status(base: &str, key: &str, status: u16) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = call(base, Some(key), "/orders").await;
        if answer.status == status {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "no {status} within 15 s; last: {} {}",
            answer.status,
            answer.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, bounded by the deadline
    }
}

fn stop(served: Served) -> String {
    served.signal("TERM");
    let (status, log) = served.wait_exit();
    assert_eq!(status.code(), Some(0), "{log}");
    log
}

/// The test Redis really is TLS only: a plain client gets no answer.
fn assert_plain_is_refused(redis: &RedisServer) {
    let plain = redis::Client::open(format!("redis://127.0.0.1:{}/", redis.port())).unwrap();
    let pinged = plain.get_connection_with_timeout(Duration::from_secs(2)).and_then(|mut conn| {
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        redis::cmd("PING").query::<String>(&mut conn)
    });
    assert!(pinged.is_err(), "a plain client was answered: {pinged:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_serve_verifies_a_key_issued_over_tls_through_the_cli_and_usage_reaches_redis() {
    let ca = TestCa::new("redis");
    let redis = RedisServer::start_tls(&ca);
    assert_plain_is_refused(&redis);
    let setup = Setup::trusting(&redis, &ca);

    let key = setup.issue("acme");
    assert!(key.starts_with("kg_acme_"), "{key}");
    let stored: Vec<String> = redis.dump().into_iter().map(|(name, _)| name).collect();
    assert!(stored.contains(&"kg:{acme}:keys".to_owned()), "{stored:?}");

    let (served, base) = setup.serve();
    for _ in 0..7 {
        let answer = call(&base, Some(&key), "/orders").await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert!(answer.text().contains("acme"), "the echo shows the client: {}", answer.text());
    }
    assert_eq!(call(&base, Some("kg_acme_forged"), "/orders").await.status, 401);
    // The final flush on SIGTERM writes every count, over TLS.
    tokio::task::spawn_blocking(move || stop(served)).await.unwrap();

    let out = setup.run(&["usage", "--client", "acme", "--since", "1h", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["totals"]["requests"], 7, "{report}");
    assert_eq!(report["totals"]["status_2xx"], 7, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_a_running_gateway_through_pub_sub_over_tls() {
    let ca = TestCa::new("redis");
    let redis = RedisServer::start_tls(&ca);
    let setup = Setup::trusting(&redis, &ca);
    let key = setup.issue("acme");
    let (served, base) = setup.serve();
    assert_eq!(call(&base, Some(&key), "/orders").await.status, 200);

    let out = keygate().args(["keys", "revoke", "-", "-c"]).arg(setup.config()).stdin_piped_key(&key);
    assert!(out.status.success(), "revoke failed: {}", text(&out.stderr));
    // cache_ttl is an hour: only the invalidation message can do this.
    let refused = until_status(&base, &key, 401).await;
    assert_eq!(refused.json()["error"], "invalid_key");

    // The audit trail was written over TLS too.
    let audit = setup.run(&["keys", "audit", "--client", "acme", "--json"]);
    assert!(audit.status.success(), "{}", text(&audit.stderr));
    let audit = text(&audit.stdout);
    assert!(audit.contains("issue") && audit.contains("revoke"), "{audit}");
    tokio::task::spawn_blocking(move || stop(served)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_with_the_tls_redis_down_and_verifies_keys_once_it_is_up() {
    let ca = TestCa::new("redis");
    let mut redis = RedisServer::start_tls(&ca);
    let setup = Setup::trusting(&redis, &ca);
    let key = setup.issue("acme");
    let _: () = redis.query(&mut redis::cmd("SAVE"));
    redis.stop();

    let (mut served, base) = setup.serve();
    served.wait_for_line("Redis is unreachable at start");
    assert_eq!(call(&base, None, "/health").await.status, 200);
    let refused = call(&base, Some(&key), "/orders").await;
    assert_eq!((refused.status.as_u16(), refused.json()["error"].clone()), (503, "store_unavailable".into()));

    redis.restart();
    until_status(&base, &key, 200).await;
    tokio::task::spawn_blocking(move || stop(served)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_refused_naming_the_cause_and_never_the_password() {
    let ca = TestCa::new("redis");
    let redis = RedisServer::start_tls(&ca);
    let impostor = TestCa::new("someone else");
    let url = format!("rediss://:hunter2@127.0.0.1:{}/", redis.port());
    let setup =
        Setup::new(&format!("url = \"{url}\"\ntls_ca = \"certs/redis-ca.pem\""), Some(&impostor.ca_pem()));

    // The config itself is fine: `check` cannot know which CA the server uses.
    assert!(setup.run(&["check"]).status.success());
    let out = setup.run(&["keys", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("UnknownIssuer") && stderr.contains("store.tls_ca"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    // Without tls_ca the system's roots decide, and they do not know the test CA:
    // verification is never skipped.
    let out = keygate().args(["keys", "list", "--redis", &url]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("not signed by a trusted CA"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    // serve comes up (Redis may be fixed later) and says why it cannot reach it.
    let (mut served, base) = setup.serve();
    let line = served.wait_for_line("Redis is unreachable at start");
    assert!(line.contains("not signed by a trusted CA") && !line.contains("hunter2"), "{line}");
    assert_eq!(call(&base, None, "/health").await.status, 200);
    let log = tokio::task::spawn_blocking(move || stop(served)).await.unwrap();
    assert!(!log.contains("hunter2"), "{log}");
}

#[test]
fn a_plain_redis_behind_a_tls_url_is_named() {
    let redis = RedisServer::start();
    let url = format!("rediss://127.0.0.1:{}/", redis.port());
    let ca = TestCa::new("redis");
    let out =
        keygate().args(["keys", "list", "--redis", &url, "--redis-ca"]).arg(ca.ca_pem()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    // A plain Redis waits for the end of an inline command and never answers the handshake.
    assert!(stderr.contains("plain Redis port never answers a TLS handshake"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_requiring_client_certificates_gets_tls_cert_and_tls_key() {
    let ca = TestCa::new("redis");
    let redis = RedisServer::start_mtls(&ca);
    let client = ca.issue_client("gateway");

    // No client certificate: refused, and the message says what is missing.
    let out = keygate()
        .args(["keys", "list", "--redis", &redis.url(), "--redis-ca"])
        .arg(ca.ca_pem())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("store.tls_cert"), "{stderr}");

    // The variables work like the flags, for every store command.
    let issued = keygate()
        .args(["keys", "issue", "--client", "acme", "--scopes", "read"])
        .env("KEYGATE_REDIS_URL", redis.url())
        .env("KEYGATE_REDIS_CA", ca.ca_pem())
        .env("KEYGATE_REDIS_CERT", &client.cert)
        .env("KEYGATE_REDIS_KEY", &client.key)
        .output()
        .unwrap();
    assert!(issued.status.success(), "{}", text(&issued.stderr));
    let key = text(&issued.stdout).trim().to_owned();

    // serve with the same files from its config.
    let setup = Setup::new(
        &format!(
            "url = \"{}\"\ntls_ca = \"certs/redis-ca.pem\"\ntls_cert = \"{}\"\ntls_key = \"{}\"",
            redis.url(),
            client.cert.display(),
            client.key.display()
        ),
        Some(&ca.ca_pem()),
    );
    let (served, base) = setup.serve();
    let answer = call(&base, Some(&key), "/orders").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    tokio::task::spawn_blocking(move || stop(served)).await.unwrap();
}

#[test]
fn check_refuses_bad_tls_settings_by_field_and_line() {
    let ca = TestCa::new("redis");
    let good =
        Setup::new("url = \"rediss://127.0.0.1:6380\"\ntls_ca = \"certs/redis-ca.pem\"", Some(&ca.ca_pem()));
    let out = good.run(&["check"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let not_pem = ca.dir().join("notes.txt");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let client = ca.issue_client("gateway");
    let cases = [
        ("url = \"rediss://127.0.0.1:6380\"\ntls_ca = \"certs/missing.pem\"", "store.tls_ca", "cannot read"),
        (
            &format!("url = \"rediss://127.0.0.1:6380\"\ntls_ca = \"{}\"", not_pem.display()),
            "store.tls_ca",
            "holds no PEM certificate",
        ),
        (
            &format!("url = \"rediss://127.0.0.1:6380\"\ntls_ca = \"{}\"", client.key.display()),
            "store.tls_ca",
            "holds no PEM certificate",
        ),
        ("url = \"rediss://:hunter2@127.0.0.1:6380/#insecure\"", "store.url", "#insecure"),
        (
            "url = \"redis://127.0.0.1:6379\"\ntls_ca = \"certs/redis-ca.pem\"",
            "store.tls_ca",
            "need a rediss:// URL",
        ),
        (
            &format!("url = \"rediss://127.0.0.1:6380\"\ntls_cert = \"{}\"", client.cert.display()),
            "store.tls_cert",
            "needs store.tls_key",
        ),
        (
            &format!(
                "url = \"rediss://127.0.0.1:6380\"\ntls_cert = \"{}\"\ntls_key = \"{}\"",
                client.cert.display(),
                ca.ca_pem().display()
            ),
            "store.tls_key",
            "no usable PEM private key",
        ),
    ];
    for (store, field, why) in cases {
        let setup = Setup::new(store, Some(&ca.ca_pem()));
        let out = setup.run(&["check"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{store}: {stderr}");
        assert!(stderr.contains(field) && stderr.contains(why), "{store}: {stderr}");
        // [store] starts on line 5 of the file; the field's own line is named.
        assert!(
            ["line 7:", "line 8:", "line 9:"].iter().any(|line| stderr.contains(line)),
            "{store}: {stderr}"
        );
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }

    // The same checks guard the command-line overrides (exit 2, nothing connects).
    let out = good.run(&["keys", "list", "--redis-ca", "/nonexistent/ca.pem"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--redis-ca") && stderr.contains("cannot read /nonexistent/ca.pem"), "{stderr}");
    let out = keygate().args(["usage", "--redis", "rediss://127.0.0.1:6380/#insecure"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("#insecure"), "{}", text(&out.stderr));
}

/// `Command::output` with the key written to stdin (`keys revoke -`), so
/// it never appears in the process's arguments.
trait StdinKey {
    fn stdin_piped_key(&mut self, key: &str) -> Output;
}

impl StdinKey for Command {
    fn stdin_piped_key(&mut self, key: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(format!("{key}\n").as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }
}
