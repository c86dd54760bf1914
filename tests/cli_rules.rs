//! The rules every `keygate` command follows, through the built binary:
//! the exit code table (issue 16, defect 5), which commands read the admin
//! token's variable (defect 7), one store rule for every command with
//! `KEYGATE_REDIS_URL` (defect 8), and the audit trail's table, details and
//! actor (defect 12).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::binary::Served;
use common::redis::RedisServer;
use jiff::Timestamp;
use keygate::meta::MetaChanges;
use keygate::store::redis::RedisStore;

const ECHO_ROUTE: &str = "[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n";

/// A folder with `gateway.toml` (the given text) and an empty `keys/`.
fn folder(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn file_config() -> (tempfile::TempDir, PathBuf) {
    folder(&format!("[server]\nlisten = \"127.0.0.1:0\"\n\n{ECHO_ROUTE}"))
}

fn redis_config(redis: &RedisServer, extra: &str) -> (tempfile::TempDir, PathBuf) {
    folder(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nkind = \"redis\"\nurl = \"{}\"\n\n{extra}{ECHO_ROUTE}",
        redis.url()
    ))
}

/// What one run of the binary gave.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `keygate ARGS` with no store or admin variables from the test's
/// environment, plus `env`; `remove` drops more variables.
fn keygate(args: &[&str], env: &[(&str, &str)], remove: &[&str]) -> Ran {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keygate"));
    command.args(args).env_remove("KEYGATE_REDIS_URL").env_remove("KG_TEST_ADMIN_TOKEN");
    for name in remove {
        command.env_remove(name);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    let out = command.output().unwrap();
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn with_config<'a>(args: &[&'a str], config: &'a Path) -> Vec<&'a str> {
    let mut all = args.to_vec();
    all.extend(["-c", config.to_str().unwrap()]);
    all
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn every_command_follows_the_exit_code_table() {
    let (_dir, config) = file_config();
    let issued = keygate(&with_config(&["keys", "issue", "--client", "acme", "--json"], &config), &[], &[]);
    assert_eq!(issued.code, Some(0), "{}", issued.stderr);
    let record: serde_json::Value = serde_json::from_str(&issued.stdout).unwrap();
    let id = record["id"].as_str().unwrap().to_owned();
    let unreachable = format!("redis://127.0.0.1:{}", closed_port());

    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["keys", "list"], 0, ""),
        (vec!["keys", "show", &id], 0, ""),
        // 2: usage or config errors, before anything changed.
        (vec!["keys", "update", &id], 2, "nothing to change"),
        (vec!["keys", "issue", "--client", "acme", "--expires", "2020-01-01T00:00:00Z"], 2, "expires"),
        (vec!["keys", "audit"], 2, "kept in Redis"),
        (vec!["usage"], 2, "kept in Redis"),
        (vec!["keys", "--redis", "not a url", "list"], 2, "--redis"),
        (vec!["keys", "--redis", "redis://127.0.0.1:notaport", "list"], 2, "--redis"),
        (vec!["usage", "--redis", "http://127.0.0.1:6380"], 2, "--redis"),
        (vec!["keys", "issue", "--client", "acme", "--rate", "fast"], 2, "--rate"),
        // 3: not found.
        (vec!["keys", "show", "acme.missing1"], 3, "no key with id"),
        (vec!["keys", "update", "acme.missing1", "--label", "x"], 3, "no key with id"),
        (vec!["keys", "revoke", "acme.missing1"], 3, "no key with id"),
        (vec!["keys", "rotate", "acme.missing1"], 3, "no key with id"),
        // 1: failures while running.
        (vec!["keys", "--redis", &unreachable, "list"], 1, ""),
        (vec!["usage", "--redis", &unreachable], 1, ""),
    ];
    for (args, code, says) in cases {
        let ran = keygate(&with_config(&args, &config), &[], &[]);
        assert_eq!(ran.code, Some(code), "keygate {args:?}: {}", ran.stderr);
        assert!(ran.stderr.contains(says), "keygate {args:?} should say {says:?}: {}", ran.stderr);
    }

    // A key whose state forbids the operation: 1, and a second revoke is fine.
    assert_eq!(keygate(&with_config(&["keys", "revoke", &id], &config), &[], &[]).code, Some(0));
    let rotated = keygate(&with_config(&["keys", "rotate", &id], &config), &[], &[]);
    assert_eq!(rotated.code, Some(1), "{}", rotated.stderr);
    assert_eq!(keygate(&with_config(&["keys", "revoke", &id], &config), &[], &[]).code, Some(0));
    // A bad config file: 2 for every command that reads it.
    let (_bad_dir, bad) = folder("[server]\nlisten = \"nowhere\"\n");
    for args in [&["check"][..], &["keys", "list"], &["usage"], &["serve"]] {
        let ran = keygate(&with_config(args, &bad), &[], &[]);
        assert_eq!(ran.code, Some(2), "keygate {args:?}: {}", ran.stderr);
    }
}

/// Regression (defect 7): with `[admin] token_env`, `check`, `keys -c` and
/// `usage -c` failed unless the token's variable was set.
#[test]
fn only_serve_and_check_env_need_the_admin_token_variable() {
    let redis = RedisServer::start();
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"KG_TEST_ADMIN_TOKEN\"\n\n";
    let (_dir, config) = redis_config(&redis, admin);

    for args in [&["check"][..], &["keys", "list"], &["usage"]] {
        let ran = keygate(&with_config(args, &config), &[], &[]);
        assert_eq!(ran.code, Some(0), "keygate {args:?} without the token variable: {}", ran.stderr);
    }
    let issued = keygate(&with_config(&["keys", "issue", "--client", "acme"], &config), &[], &[]);
    assert_eq!(issued.code, Some(0), "{}", issued.stderr);

    let checked = keygate(&with_config(&["check", "--env"], &config), &[], &[]);
    assert_eq!(checked.code, Some(2), "{}", checked.stderr);
    assert!(checked.stderr.contains("admin.token_env") && checked.stderr.contains("KG_TEST_ADMIN_TOKEN"));
    let token = [("KG_TEST_ADMIN_TOKEN", "0123456789abcdef0123")];
    assert_eq!(keygate(&with_config(&["check", "--env"], &config), &token, &[]).code, Some(0));
    // serve reads it too: refused before binding anything.
    let served = keygate(&with_config(&["serve"], &config), &[], &[]);
    assert_eq!(served.code, Some(2), "{}", served.stderr);
    assert!(served.stderr.contains("admin.token_env"), "{}", served.stderr);
}

/// Regression (defect 8): `serve` ignored `KEYGATE_REDIS_URL` while the
/// other commands honoured it. The config here names the file store; the
/// key exists only in Redis, so a 200 proves the variable was used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_takes_the_store_from_keygate_redis_url_and_says_so() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), "kg:").await.unwrap();
    let changes = MetaChanges::from_query("scope=read", Timestamp::now()).unwrap();
    let key = keygate::ops::issue(&store, "kg_", "acme", changes, Timestamp::now()).await.unwrap().key;
    let (_dir, config) = file_config();

    let mut served = Served::start(&config, &[("KEYGATE_REDIS_URL", &redis.url())]);
    let start = served.wait_for_line("keygate starting");
    assert!(start.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))), "{start}");
    assert!(start.contains(&format!("config={}", config.display())), "{start}");
    assert!(start.contains(&format!("store=\"redis {} prefix kg:\"", redis.url())), "{start}");
    assert!(start.contains("store_from=\"KEYGATE_REDIS_URL\""), "{start}");
    let addr = served.gateway_address();
    let request = http::Request::get(format!("http://{addr}/x"))
        .header("x-api-key", key.expose())
        .body(http_body_util::Full::<bytes::Bytes>::default())
        .unwrap();
    let answer = common::gateway::send(&common::gateway::http1_client(), request).await;
    assert_eq!(answer.status, 200, "the key is in Redis only: {}", answer.text());

    // The same rule for the CLI: the variable over the file's store.
    let listed = keygate(
        &with_config(&["keys", "list", "--json"], &config),
        &[("KEYGATE_REDIS_URL", &redis.url())],
        &[],
    );
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&listed.stdout).unwrap().as_array().unwrap().len(),
        1
    );
}

#[test]
fn the_start_up_line_never_shows_a_redis_password() {
    let (_dir, config) = file_config();
    // Nothing listens there: serve starts anyway (Redis is waited for).
    let url = format!("redis://:s3cretpass@127.0.0.1:{}/0", closed_port());
    let mut served = Served::start(&config, &[("KEYGATE_REDIS_URL", &url)]);
    let start = served.wait_for_line("keygate starting");
    served.gateway_address();
    assert!(start.contains("redis://***@127.0.0.1:"), "{start}");
    served.signal("TERM");
    let (_, log) = served.wait_exit();
    assert!(!log.contains("s3cretpass"), "no password anywhere in the log: {log}");
}

/// Regression (defect 12): the audit table had no header and unaligned
/// columns, an `update` entry left out a changed label, and the actor was
/// `cli:unknown` without `$USER`.
#[test]
fn the_audit_trail_is_a_table_with_every_change_and_a_real_actor() {
    let redis = RedisServer::start();
    let (_dir, config) = redis_config(&redis, "");
    let no_user = ["USER", "LOGNAME"];
    let issued = keygate(
        &with_config(&["keys", "issue", "--client", "acme", "--label", "first one", "--json"], &config),
        &[],
        &no_user,
    );
    assert_eq!(issued.code, Some(0), "{}", issued.stderr);
    let id =
        serde_json::from_str::<serde_json::Value>(&issued.stdout).unwrap()["id"].as_str().unwrap().to_owned();
    let updated = keygate(
        &with_config(&["keys", "update", &id, "--label", "second", "--rate", "5/s"], &config),
        &[("USER", "alice-in-ops")],
        &[],
    );
    assert_eq!(updated.code, Some(0), "{}", updated.stderr);
    let cleared = keygate(&with_config(&["keys", "update", &id, "--label", ""], &config), &[], &no_user);
    assert_eq!(cleared.code, Some(0), "{}", cleared.stderr);

    let audit = keygate(&with_config(&["keys", "audit"], &config), &[], &[]);
    assert_eq!(audit.code, Some(0), "{}", audit.stderr);
    let lines: Vec<&str> = audit.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "a header and three entries: {}", audit.stdout);
    assert!(lines[0].starts_with("AT") && lines[0].ends_with("DETAIL"), "{}", audit.stdout);
    // Aligned: every column starts where its header does.
    for header in ["ACTOR", "ACTION", "SUBJECT", "DETAIL"] {
        let at = lines[0].find(header).unwrap();
        for line in &lines[1..] {
            let before = line.as_bytes()[at - 1];
            assert!(
                before == b' ' && line.as_bytes()[at] != b' ',
                "{header} column in {line:?}:\n{}",
                audit.stdout
            );
        }
    }
    let os_user = nix::unistd::User::from_uid(nix::unistd::getuid()).unwrap().map(|u| u.name);
    let actor = format!("cli:{}", os_user.unwrap_or_else(|| format!("uid:{}", nix::unistd::getuid())));
    assert!(lines[1].contains(&actor) && lines[1].contains("label=\"first one\""), "{}", audit.stdout);
    assert!(!audit.stdout.contains("cli:unknown"), "{}", audit.stdout);
    assert!(lines[2].contains("cli:alice-in-ops") && lines[2].contains("update"), "{}", audit.stdout);
    assert!(lines[2].contains("rate=5/s") && lines[2].contains("label=\"second\""), "{}", audit.stdout);
    assert!(lines[3].contains("label=none"), "a removed label is named: {}", audit.stdout);
}
