//! The `keygate` binary itself: config checking, serving the shipped config,
//! and exiting cleanly on SIGTERM.

mod common;

use std::path::Path;
use std::process::Command;

use common::binary::Served;
use keygate::config::Config;

/// The binary, with no `KEYGATE_CONFIG` from the environment running the tests.
fn keygate() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keygate"));
    command.env_remove("KEYGATE_CONFIG");
    command
}

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn shipped_gateway_toml_is_valid() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml");
    let config = Config::load(&shipped).unwrap_or_else(|e| panic!("shipped gateway.toml: {e}"));
    assert!(config.routes.iter().any(|r| r.target == keygate::config::RouteTarget::Echo));
    let out = keygate().args(["check", "-c"]).arg(&shipped).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The config the Debian package installs as /etc/keygate/gateway.toml
/// passes `check`, and its file store is inside the one folder the unit
/// lets the service write (`ReadWritePaths=` under `ProtectSystem=strict`).
#[test]
fn packaged_gateway_toml_is_valid_and_its_store_is_writable_under_the_unit() {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist");
    let config =
        Config::load(&dist.join("gateway.toml")).unwrap_or_else(|e| panic!("dist/gateway.toml: {e}"));
    assert!(config.routes.iter().any(|r| r.target == keygate::config::RouteTarget::Echo));
    let keygate::config::StoreConfig::File { dir } = &config.store else { panic!("not the file store") };
    let unit = std::fs::read_to_string(dist.join("keygate.service")).unwrap();
    let setting = |name: &str| -> Vec<&str> {
        unit.lines().filter_map(|line| line.strip_prefix(name)?.strip_prefix('=')).collect()
    };
    let writable = setting("ReadWritePaths");
    assert!(writable.iter().any(|w| dir.starts_with(w)), "{} not under {writable:?}", dir.display());
    assert_eq!(setting("Environment"), ["KEYGATE_CONFIG=/etc/keygate/gateway.toml"]);
    assert_eq!(setting("Type"), ["notify"]);
    let out = keygate().args(["check", "-c"]).arg(dist.join("gateway.toml")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn check_names_the_field_and_line_of_an_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[route]]\npath = \"/api\"\nupstream = \"missing\"\n",
    );
    let out = keygate().args(["check", "-c"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 6"), "{stderr}");
    assert!(stderr.contains("route[0].upstream"), "{stderr}");
    assert!(stderr.contains("no [upstream.missing]"), "{stderr}");
}

#[test]
fn check_reports_syntax_errors_and_unknown_fields_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "[server]\nlisten = \"127.0.0.1:0\"\ncolour = \"blue\"\n");
    let out = keygate().args(["check", "-c"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("colour") && stderr.contains("line 3"), "{stderr}");
}

#[test]
fn serve_refuses_an_invalid_config_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    // A port we hold: if serve tried to bind before validating, the error would differ.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let text = format!("[server]\nlisten = \"{}\"\ndrain_timeout = \"never\"\n", held.local_addr().unwrap());
    let path = write_config(dir.path(), &text);
    let out = keygate().args(["serve", "-c"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.drain_timeout"), "{stderr}");
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let out = keygate().args(["check", "-c", "/nonexistent/gateway.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/gateway.toml"));
}

#[test]
fn keygate_config_names_the_config_when_no_flag_does_and_the_flag_wins() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let good = write_config(
        dir.path(),
        "[store]\nkind = \"file\"\ndir = \"keys\"\n\n[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n",
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\ncolour = \"blue\"\n").unwrap();

    let out = keygate().arg("check").env("KEYGATE_CONFIG", &good).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.starts_with(&format!("{}: OK", good.display())), "{stderr}");
    let out = keygate().arg("check").env("KEYGATE_CONFIG", &bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "the variable's file is the one checked");
    let out = keygate().args(["check", "-c"]).arg(&good).env("KEYGATE_CONFIG", &bad).output().unwrap();
    assert!(out.status.success(), "-c wins: {}", String::from_utf8_lossy(&out.stderr));

    // A store command writes to the store of the variable's config (the
    // test's cwd has a gateway.toml of its own, with another keys/).
    let out = keygate()
        .args(["keys", "issue", "--client", "env-demo"])
        .env("KEYGATE_CONFIG", &good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written: Vec<_> = std::fs::read_dir(&keys)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("env-demo."))
        .collect();
    assert_eq!(written.len(), 1, "the key landed in the variable's keys/: {written:?}");
    let out = keygate().args(["keys", "list", "--json"]).env("KEYGATE_CONFIG", &good).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("env-demo"));
    let out = keygate().args(["usage"]).env("KEYGATE_CONFIG", &bad).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("colour"), "usage read the variable's (bad) file: {stderr}");
}

#[test]
fn version_prints_the_version_and_the_commit_built_from() {
    let out = keygate().arg("--version").output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    // What build.rs had: the override, else git's HEAD, else `unknown`.
    let commit = match option_env!("KEYGATE_BUILD_COMMIT") {
        Some(given) if !given.trim().is_empty() => given.trim().to_owned(),
        _ => Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map_or_else(
                || "unknown".to_owned(),
                |out| String::from_utf8(out.stdout).unwrap().trim().to_owned(),
            ),
    };
    assert_eq!(stdout, format!("keygate {} (commit {commit})\n", env!("CARGO_PKG_VERSION")));
}

#[tokio::test]
async fn serve_answers_with_the_shipped_config_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml")).unwrap();
    let shipped = shipped
        .replace("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:0\"")
        .replace("access = \"stdout\"", "access = \"access.log\"");
    let path = write_config(dir.path(), &shipped);
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    let mut served = Served::start(&path, &[]);
    let addr = served.gateway_address();

    let answer = common::gateway::get(&format!("http://{addr}/health")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["path"], "/health");

    served.signal("TERM");
    let (status, log) = tokio::task::spawn_blocking(move || served.wait_exit()).await.unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(!log.contains("status=200"), "the access log is not the diagnostic log: {log}");
    // Written by the time the process has exited (flushed after the drain).
    let access = std::fs::read_to_string(dir.path().join("access.log")).unwrap();
    assert!(access.contains("status=200"), "access log line: {access}");
    assert!(access.contains("upstream=\"builtin:echo\""), "access log line: {access}");
}

/// Regression (issue 16, defect 11): the access log's `client=` held the key
/// ID; the client and the key are now two fields.
#[tokio::test]
async fn the_access_log_names_the_client_and_the_key_apart() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[log]\naccess = \"access.log\"\n\n\
         [[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n",
    );
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    let issued = keygate()
        .args(["keys", "issue", "-c"])
        .arg(&path)
        .args(["--client", "acme", "--scopes", "read", "--json"])
        .output()
        .unwrap();
    assert!(issued.status.success(), "{}", String::from_utf8_lossy(&issued.stderr));
    let record: serde_json::Value = serde_json::from_slice(&issued.stdout).unwrap();
    let (key, id) = (record["key"].as_str().unwrap().to_owned(), record["id"].as_str().unwrap().to_owned());
    let mut served = Served::start(&path, &[]);
    let addr = served.gateway_address();
    let request = http::Request::get(format!("http://{addr}/x"))
        .header("x-api-key", &key)
        .body(http_body_util::Full::<bytes::Bytes>::default())
        .unwrap();
    let answer = common::gateway::send(&common::gateway::http1_client(), request).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let log = common::access::AccessLog::at(dir.path().join("access.log"));
    let line = log.wait_for_text("path=\"/x\"").await;
    assert!(line.contains("client=\"acme\""), "{line}");
    assert!(line.contains(&format!("key_id=\"{id}\"")), "{line}");
    assert!(!line.contains(&key), "no key in the log: {line}");
}

/// Regression (issue 16, defect 9): a second `serve` on the same address
/// started silently and took a share of the traffic (`SO_REUSEPORT`).
#[tokio::test]
async fn a_second_serve_on_the_same_address_fails_unless_sharing_is_asked_for() {
    let route = "[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\npublic = true\n";
    let first_dir = tempfile::tempdir().unwrap();
    let first_path =
        write_config(first_dir.path(), &format!("[server]\nlisten = \"127.0.0.1:0\"\n\n{route}"));
    std::fs::create_dir(first_dir.path().join("keys")).unwrap();
    let mut first = Served::start(&first_path, &[]);
    let addr = first.gateway_address();

    let second_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(second_dir.path().join("keys")).unwrap();
    let second_path = write_config(second_dir.path(), &format!("[server]\nlisten = \"{addr}\"\n\n{route}"));
    let second = Served::start(&second_path, &[]);
    let (status, log) = tokio::task::spawn_blocking(move || second.wait_exit()).await.unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("in use"), "{log}");
    assert!(log.contains("reuse_port"), "says how to opt in: {log}");

    // Both opted in: the handover case.
    first.signal("TERM");
    let _ = tokio::task::spawn_blocking(move || first.wait_exit()).await.unwrap();
    let sharing = format!("[server]\nlisten = \"{addr}\"\nreuse_port = true\n\n{route}");
    let a_path = write_config(first_dir.path(), &sharing);
    let b_path = write_config(second_dir.path(), &sharing);
    let mut a = Served::start(&a_path, &[]);
    a.gateway_address();
    let mut b = Served::start(&b_path, &[]);
    b.gateway_address();
    for served in [a, b] {
        served.signal("TERM");
        let (status, _) = tokio::task::spawn_blocking(move || served.wait_exit()).await.unwrap();
        assert_eq!(status.code(), Some(0));
    }
}
