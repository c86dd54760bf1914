//! HTTPS upstreams (issue 15, upstream side): the real gateway in process
//! forwarding to a real tokio-rustls + hyper upstream on `127.0.0.1:0`
//! whose certificate comes from a CA made in the test (rcgen).
//!
//! A certificate the gateway does not trust (an unconfigured CA, another
//! host's name, expired) is a 502 `upstream_tls_failed` and one log line
//! naming the upstream, the target and rustls' reason; mTLS, `server_name`,
//! HTTP/2 over ALPN, pooling and large bodies work over TLS; bad TLS
//! settings are refused at load, naming the field and the file.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::gateway::{Answer, TestGateway, http1_client, send};
use common::pki::{Issued, TestCa};
use common::tls_upstream::{TlsOptions, TlsUpstream};
use http::{Request, Version};
use http_body_util::Full;
use keygate::config::{Config, TextError};

/// A config with one public route to `[upstream.api]`, whose body is `upstream`.
fn config(upstream: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[[route]]
path = "/"
upstream = "api"
public = true
max_body = "unlimited"

[upstream.api]
{upstream}
"#
    )
}

/// `targets = [url]` plus `more` lines.
fn section(url: &str, more: &str) -> String {
    format!("targets = [\"{url}\"]\n{more}")
}

fn ca_line(ca: &TestCa) -> String {
    format!("ca = \"{}\"\n", ca.ca_pem().display())
}

async fn get(gateway: &TestGateway, path: &str) -> Answer {
    send(&http1_client(), Request::get(gateway.url(path)).body(Full::<Bytes>::default()).unwrap()).await
}

/// Asserts the contract's 502 for a TLS failure, with nothing of the cause in the body.
fn assert_tls_refused(answer: &Answer, reason: &str) {
    assert_eq!(answer.status, 502, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["error"], "upstream_tls_failed", "{body}");
    assert!(body["message"].is_string(), "{body}");
    assert!(!answer.text().contains(reason) && !answer.text().contains("127.0.0.1"), "{body}");
}

/// The one log line for a TLS failure: upstream, target and reason in it.
fn assert_one_tls_line(logs: &common::logs::Captured, upstream: &TlsUpstream, reason: &str) {
    let lines = logs.lines_with("TLS failed");
    assert_eq!(lines.len(), 1, "exactly one line per failure: {lines:#?}");
    let line = &lines[0];
    assert!(line.contains("upstream api"), "{line}");
    assert!(line.contains(&upstream.addr.to_string()), "names the target: {line}");
    assert!(line.contains(reason), "names rustls' reason {reason:?}: {line}");
}

fn server_for(ca: &TestCa, names: &[&str]) -> Issued {
    ca.issue_server("upstream", names)
}

#[tokio::test]
async fn a_private_ca_is_trusted_only_when_configured_and_a_reload_brings_it_in() {
    let ca = TestCa::new("upstream");
    let upstream =
        TlsUpstream::start(&server_for(&ca, &["localhost", "127.0.0.1"]), TlsOptions::default()).await;

    // Without `ca`: the system's roots, which never signed this certificate.
    let logs = common::logs::capture();
    let gateway = TestGateway::start(&config(&section(&upstream.url(), ""))).await;
    let answer = get(&gateway, "/hello").await;
    assert_tls_refused(&answer, "UnknownIssuer");
    assert_one_tls_line(&logs, &upstream, "UnknownIssuer");
    assert!(upstream.versions().is_empty(), "nothing reached the upstream");

    // The same upstream with its CA configured, installed by a reload.
    let trusting = config(&section(&upstream.url(), &ca_line(&ca)));
    gateway.gateway.reload(Config::from_toml(&trusting, gateway.dir.path()).unwrap());
    let answer = get(&gateway, "/hello").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["path"], "/hello");
    assert_eq!(answer.json()["host"], upstream.addr.to_string(), "the upstream's own Host");
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_and_server_name_makes_an_ip_target_verify() {
    let ca = TestCa::new("upstream");
    let upstream = TlsUpstream::start(&server_for(&ca, &["api.internal"]), TlsOptions::default()).await;

    let logs = common::logs::capture();
    let by_ip = TestGateway::start(&config(&section(&upstream.url(), &ca_line(&ca)))).await;
    let answer = get(&by_ip, "/").await;
    assert_tls_refused(&answer, "not valid for name");
    assert_one_tls_line(&logs, &upstream, "not valid for name \"127.0.0.1\"");

    let named = format!("{}server_name = \"api.internal\"\n", ca_line(&ca));
    let gateway = TestGateway::start(&config(&section(&upstream.url(), &named))).await;
    let answer = get(&gateway, "/").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let ca = TestCa::new("upstream");
    let expired = ca.issue_expired_server("expired", &["localhost", "127.0.0.1"]);
    let upstream = TlsUpstream::start(&expired, TlsOptions::default()).await;

    let logs = common::logs::capture();
    let gateway = TestGateway::start(&config(&section(&upstream.url(), &ca_line(&ca)))).await;
    let answer = get(&gateway, "/").await;
    assert_tls_refused(&answer, "expired");
    assert_one_tls_line(&logs, &upstream, "expired");
}

#[tokio::test]
async fn an_upstream_requiring_a_client_certificate_gets_ours_and_refuses_us_without() {
    let ca = TestCa::new("upstream");
    let client = ca.issue_client("gateway");
    // TLS 1.3 servers refuse a missing certificate after the handshake, on
    // the first read: over HTTP/1.1 and HTTP/2 alike it is a TLS failure.
    for protocol in ["http1", "auto"] {
        let options = TlsOptions { client_ca: Some(ca.ca_pem()), ..TlsOptions::default() };
        let upstream = TlsUpstream::start(&server_for(&ca, &["127.0.0.1"]), options).await;
        let trusting = format!("{}protocol = \"{protocol}\"\n", ca_line(&ca));

        let logs = common::logs::capture();
        let anonymous = TestGateway::start(&config(&section(&upstream.url(), &trusting))).await;
        let answer = get(&anonymous, "/").await;
        assert_tls_refused(&answer, "CertificateRequired");
        assert_one_tls_line(&logs, &upstream, "CertificateRequired");
        assert!(upstream.versions().is_empty(), "{protocol}: served nothing without a certificate");

        let identity = format!(
            "{trusting}client_cert = \"{}\"\nclient_key = \"{}\"\n",
            client.cert.display(),
            client.key.display()
        );
        let gateway = TestGateway::start(&config(&section(&upstream.url(), &identity))).await;
        let answer = get(&gateway, "/").await;
        assert_eq!(answer.status, 200, "{protocol}: {}", answer.text());
    }
}

#[tokio::test]
async fn auto_speaks_http2_when_the_upstream_picks_it_and_http1_forces_http_1_1() {
    let ca = TestCa::new("upstream");
    let upstream = TlsUpstream::start(&server_for(&ca, &["127.0.0.1"]), TlsOptions::default()).await;

    let auto = TestGateway::start(&config(&section(&upstream.url(), &ca_line(&ca)))).await;
    let answer = get(&auto, "/").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["version"], "HTTP/2.0");
    assert_eq!(upstream.versions(), [Version::HTTP_2]);

    let forced = format!("{}protocol = \"http1\"\n", ca_line(&ca));
    let http1 = TestGateway::start(&config(&section(&upstream.url(), &forced))).await;
    let answer = get(&http1, "/").await;
    assert_eq!(answer.json()["version"], "HTTP/1.1");
    assert_eq!(upstream.versions(), [Version::HTTP_2, Version::HTTP_11]);

    // An upstream that offers only HTTP/1.1 is spoken to in it under auto.
    let http1_only = TlsOptions { alpn: vec![b"http/1.1"], ..TlsOptions::default() };
    let old = TlsUpstream::start(&server_for(&ca, &["127.0.0.1"]), http1_only).await;
    let gateway = TestGateway::start(&config(&section(&old.url(), &ca_line(&ca)))).await;
    assert_eq!(get(&gateway, "/").await.json()["version"], "HTTP/1.1");
}

#[tokio::test]
async fn sequential_requests_reuse_one_tls_connection_over_http1_and_http2() {
    let ca = TestCa::new("upstream");
    for protocol in ["http1", "auto"] {
        let upstream = TlsUpstream::start(&server_for(&ca, &["127.0.0.1"]), TlsOptions::default()).await;
        let more = format!("{}protocol = \"{protocol}\"\n", ca_line(&ca));
        let gateway = TestGateway::start(&config(&section(&upstream.url(), &more))).await;
        for i in 0..5 {
            let answer = get(&gateway, &format!("/n/{i}")).await;
            assert_eq!(answer.status, 200, "{protocol}: {}", answer.text());
        }
        assert_eq!(upstream.versions().len(), 5, "{protocol}");
        assert_eq!(upstream.connections(), 1, "{protocol}: five requests, one TLS connection");
    }
}

#[tokio::test]
async fn a_closed_http2_connection_is_replaced_by_the_next_request() {
    let ca = TestCa::new("upstream");
    let upstream = TlsUpstream::start(&server_for(&ca, &["127.0.0.1"]), TlsOptions::default()).await;
    let gateway = TestGateway::start(&config(&section(&upstream.url(), &ca_line(&ca)))).await;
    assert_eq!(get(&gateway, "/one").await.status, 200);
    upstream.cut_connections();
    // The gateway learns of the close when its connection task reads EOF;
    // either way the next request must not fail: a closed connection takes
    // no request, and one that never took it is sent on a new connection.
    let answer = get(&gateway, "/two").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["version"], "HTTP/2.0");
    assert_eq!(upstream.connections(), 2, "one new connection replaced the cut one");

    // A burst after another cut shares one new connection (the gateway's
    // in-process server is one worker here).
    upstream.cut_connections();
    let paths: Vec<String> = (0..10).map(|i| format!("/burst/{i}")).collect();
    let burst = paths.iter().map(|path| get(&gateway, path));
    for answer in futures_util::future::join_all(burst).await {
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_eq!(upstream.connections(), 3, "ten concurrent requests, one new HTTP/2 connection");
}

#[tokio::test]
async fn http2_on_a_plain_target_is_h2c_with_prior_knowledge() {
    let plain = common::upstream::Upstream::start(|req: Request<hyper::body::Incoming>| async move {
        let version = format!("{:?}", req.version());
        http::Response::new(common::upstream::full(version))
    })
    .await;
    let h2c = TestGateway::start(&config(&section(&plain.url(), "protocol = \"http2\"\n"))).await;
    assert_eq!(get(&h2c, "/").await.text(), "HTTP/2.0");
    let default = TestGateway::start(&config(&section(&plain.url(), ""))).await;
    assert_eq!(get(&default, "/").await.text(), "HTTP/1.1", "plain targets stay HTTP/1.1 under auto");
}

#[tokio::test]
async fn large_bodies_stream_both_ways_over_tls() {
    let ca = TestCa::new("upstream");
    let upstream = TlsUpstream::start(&server_for(&ca, &["127.0.0.1"]), TlsOptions::default()).await;
    // 8 MiB of a pattern that shows any reordering or loss.
    let body: Bytes = (0..8u32 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
    for protocol in ["http1", "auto"] {
        let more = format!("{}protocol = \"{protocol}\"\n", ca_line(&ca));
        let gateway = TestGateway::start(&config(&section(&upstream.url(), &more))).await;
        let request = Request::post(gateway.url("/upload")).body(Full::new(body.clone())).unwrap();
        let answer = send(&http1_client(), request).await;
        assert_eq!(answer.status, 200, "{protocol}");
        assert_eq!(answer.body.len(), body.len(), "{protocol}");
        assert!(answer.body == body, "{protocol}: the body came back intact");
    }
    assert_eq!(upstream.versions(), [Version::HTTP_11, Version::HTTP_2]);
}

/// The problems `text` is refused with, as (field, message).
fn refused(text: &str) -> Vec<(String, String)> {
    match Config::from_toml(text, Path::new("/")) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(TextError::Invalid(problems)) => problems.into_iter().map(|p| (p.field, p.message)).collect(),
        Err(TextError::Syntax(why)) => panic!("syntax: {why}"),
    }
}

/// Asserts `more` on an https upstream is refused at `field` with a message
/// containing every one of `words`.
fn assert_refused(url: &str, more: &str, field: &str, words: &[&str]) {
    let found = refused(&config(&section(url, more)));
    assert!(
        found.iter().any(|(f, m)| f == field && words.iter().all(|w| m.contains(w))),
        "want {field} with {words:?}; got {found:#?}"
    );
}

#[test]
fn bad_tls_settings_are_refused_at_load_naming_the_field_and_the_file() {
    let ca = TestCa::new("upstream");
    let server = server_for(&ca, &["127.0.0.1"]);
    let client = ca.issue_client("gateway");
    let other = ca.issue_client("other");
    let url = "https://127.0.0.1:8443";
    let missing = ca.dir().join("missing.pem");
    let (missing_text, key_text) = (missing.display().to_string(), server.key.display().to_string());
    let cert_text = client.cert.display().to_string();

    assert_refused(
        url,
        &format!("ca = \"{missing_text}\""),
        "upstream.api.ca",
        &[&missing_text, "cannot read"],
    );
    assert_refused(
        url,
        &format!("ca = \"{key_text}\""),
        "upstream.api.ca",
        &[&key_text, "holds no PEM certificate"],
    );
    let both = |cert: &Path, key: &Path| {
        format!("{}client_cert = \"{}\"\nclient_key = \"{}\"", ca_line(&ca), cert.display(), key.display())
    };
    assert_refused(
        url,
        &both(&client.cert, &other.key),
        "upstream.api.client_key",
        &[&cert_text, "not a certificate and its key"],
    );
    assert_refused(
        url,
        &both(&missing, &client.key),
        "upstream.api.client_cert",
        &[&missing_text, "cannot read"],
    );
    assert_refused(
        url,
        &both(&client.cert, &client.cert),
        "upstream.api.client_key",
        &[&cert_text, "no usable PEM private key"],
    );
    let only_cert = format!("client_cert = \"{cert_text}\"");
    assert_refused(url, &only_cert, "upstream.api.client_cert", &["client_key"]);
    let only_key = format!("client_key = \"{}\"", client.key.display());
    assert_refused(url, &only_key, "upstream.api.client_key", &["client_cert"]);
    assert_refused(url, "protocol = \"h3\"", "upstream.api.protocol", &["h3", "http2"]);
    assert_refused(url, "server_name = \"not a name!\"", "upstream.api.server_name", &["not a name!"]);
    // TLS settings on an upstream with no https target would be ignored: refused.
    assert_refused("http://127.0.0.1:9001", &ca_line(&ca), "upstream.api.ca", &["https://"]);

    // Relative paths resolve against the config's folder; a good set loads.
    let good = config(&section(url, &both(&client.cert, &client.key)));
    let loaded = Config::from_toml(&good, Path::new("/")).unwrap();
    assert!(loaded.upstreams["api"].tls.is_some());
    let plain = Config::from_toml(&config(&section("http://127.0.0.1:9001", "")), Path::new("/")).unwrap();
    assert!(plain.upstreams["api"].tls.is_none(), "plain targets build no TLS config");
}

#[test]
fn keygate_check_names_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config(&section("https://127.0.0.1:8443", "ca = \"certs/nope.pem\"\n"))).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["check", "-c"])
        .arg(&path)
        .env_remove("KEYGATE_REDIS_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("upstream.api.ca"), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "names the config file: {stderr}");
    assert!(
        stderr.contains(&dir.path().join("certs/nope.pem").display().to_string()),
        "names the CA file: {stderr}"
    );
}
