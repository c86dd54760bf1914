//! TLS listeners end to end: a real rustls client against the real gateway
//! on `127.0.0.1:0`, certificates made per test by a throwaway CA (rcgen).
//! HTTPS over HTTP/1.1 and HTTP/2 (ALPN), SNI, refusals (plain HTTP, TLS
//! 1.1, silence), `tls_only` routes, certificate reloads with connections
//! open, mTLS at the listener, config errors, `keygate check` and curl.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::binary::Served;
use common::gateway::{TestGateway, get};
use common::pki::{Issued, TestCa};
use common::tls::{TlsHttp, alpn, client_config, connect, der_of, names_of, presented};
use common::wait::within;
use http::StatusCode;
use keygate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TLS listener with `tls` (the inline table or dotted keys after
/// `listen`), extra listener lines, and public echo routes.
fn tls_config(tls: &str, extra_routes: &str) -> String {
    format!(
        "[[server.listener]]\nlisten = \"127.0.0.1:0\"\n{tls}\n\n\
         [[server.listener]]\nlisten = \"127.0.0.1:0\"\n\n\
         [[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\npublic = true\n\n{extra_routes}"
    )
}

fn one_cert(issued: &Issued) -> String {
    format!("tls = {{ cert = {:?}, key = {:?} }}", issued.cert, issued.key)
}

/// Reads until the peer closes (10 s at most) and returns what came.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    within(10, "the gateway to close the connection", stream.read_to_end(&mut seen)).await.ok();
    seen
}

/// The value of the first `/metrics` sample starting with `prefix`.
fn metric(prefix: &str) -> Option<f64> {
    keygate::metrics::render()
        .lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test]
async fn https_serves_http1_and_http2_as_alpn_chose_and_tells_the_upstream_https() {
    let ca = TestCa::new("alpn");
    let server = ca.issue_server("api", &["api.test"]);
    let gateway = TestGateway::start_listeners(&tls_config(&one_cert(&server), "")).await;
    let tls_addr = gateway.listeners[0];

    let http1 = client_config(&ca.ca_pem(), &[b"http/1.1"], None);
    let stream = connect(tls_addr, "api.test", &http1).await.expect("TLS handshake");
    assert_eq!(alpn(&stream).as_deref(), Some(&b"http/1.1"[..]));
    let mut client = TlsHttp::over(stream, false).await;
    let answer = client.get("api.test", "/one").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["headers"]["x-forwarded-proto"], "https");
    // Keep-alive on the same TLS connection.
    assert_eq!(client.get("api.test", "/two").await.json()["path"], "/two");

    let both = client_config(&ca.ca_pem(), &[b"h2", b"http/1.1"], None);
    let stream = connect(tls_addr, "api.test", &both).await.expect("TLS handshake");
    assert_eq!(alpn(&stream).as_deref(), Some(&b"h2"[..]), "h2 is preferred when offered");
    let mut client = TlsHttp::over(stream, true).await;
    let answer = client.get("api.test", "/h2").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["headers"]["x-forwarded-proto"], "https");

    // The plain listener beside it still says http.
    let plain = get(&format!("http://{}/plain", gateway.listeners[1])).await;
    assert_eq!(plain.json()["headers"]["x-forwarded-proto"], "http");
}

#[tokio::test]
async fn sni_picks_the_certificate_naming_the_host_exact_or_wildcard_and_the_first_otherwise() {
    let ca = TestCa::new("sni");
    let first = ca.issue_server("first", &["first.test"]);
    let second = ca.issue_server("second", &["second.test"]);
    let wildcard = ca.issue_server("wild", &["*.wild.test"]);
    let tls = format!(
        "[[server.listener.tls.certs]]\ncert = {:?}\nkey = {:?}\n\
         [[server.listener.tls.certs]]\ncert = {:?}\nkey = {:?}\n\
         [[server.listener.tls.certs]]\ncert = {:?}\nkey = {:?}\n",
        first.cert, first.key, second.cert, second.key, wildcard.cert, wildcard.key
    );
    let gateway = TestGateway::start_listeners(&tls_config(&tls, "")).await;
    let addr = gateway.listeners[0];
    let config = client_config(&ca.ca_pem(), &[b"http/1.1"], None);

    let stream = connect(addr, "second.test", &config).await.expect("handshake for second.test");
    assert_eq!(names_of(&presented(&stream)), ["second.test"]);
    let stream = connect(addr, "first.test", &config).await.expect("handshake for first.test");
    assert_eq!(names_of(&presented(&stream)), ["first.test"]);
    let stream = connect(addr, "a.wild.test", &config).await.expect("handshake for a.wild.test");
    assert_eq!(names_of(&presented(&stream)), ["*.wild.test"]);

    // A name nobody covers, a wildcard one label too deep, and no SNI at
    // all (an IP address as the name sends none) get the first certificate,
    // which the client then rightly refuses.
    for name in ["other.test", "a.b.wild.test", "127.0.0.1"] {
        let error = connect(addr, name, &config).await.expect_err("the default cert does not cover it");
        assert!(error.to_string().contains("certificate"), "{name}: {error}");
    }
    let trusting_any_name = Arc::new(insecure_names(&ca));
    for name in ["other.test", "a.b.wild.test", "127.0.0.1"] {
        let stream = connect(addr, name, &trusting_any_name).await.expect("handshake");
        assert_eq!(names_of(&presented(&stream)), ["first.test"], "{name} gets the default");
    }
}

/// A client that checks the chain but not the name: to see which
/// certificate a name the server has none for gets.
fn insecure_names(ca: &TestCa) -> rustls::ClientConfig {
    #[derive(Debug)]
    struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);
    impl rustls::client::danger::ServerCertVerifier for AnyName {
        fn verify_server_cert(
            &self,
            end_entity: &rustls::pki_types::CertificateDer<'_>,
            intermediates: &[rustls::pki_types::CertificateDer<'_>],
            _name: &rustls::pki_types::ServerName<'_>,
            ocsp: &[u8],
            now: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            let name = rustls::pki_types::ServerName::try_from("first.test").unwrap();
            self.0.verify_server_cert(end_entity, intermediates, &name, ocsp, now)
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_file(ca.ca_pem()).unwrap()).unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots)).build().unwrap();
    rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyName(verifier)))
        .with_no_client_auth()
}

#[tokio::test]
async fn plain_http_on_a_tls_port_is_refused_closed_and_counted() {
    let ca = TestCa::new("plain");
    let server = ca.issue_server("api", &["api.test"]);
    let gateway = TestGateway::start_listeners(&tls_config(&one_cert(&server), "")).await;
    let before = metric("keygate_tls_handshake_failures_total{reason=\"not_tls\"}").unwrap_or(0.0);

    let mut stream = TcpStream::connect(gateway.listeners[0]).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n").await.unwrap();
    let answer = read_to_close(&mut stream).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "no HTTP answer on a TLS port: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // At most a TLS alert record.
    assert!(answer.is_empty() || answer[0] == 0x15, "{answer:?}");
    let after = metric("keygate_tls_handshake_failures_total{reason=\"not_tls\"}").unwrap_or(0.0);
    assert!(after >= before + 1.0, "not_tls counted: {before} -> {after}");

    // The listener still serves TLS after it.
    let config = client_config(&ca.ca_pem(), &[b"http/1.1"], None);
    assert!(connect(gateway.listeners[0], "api.test", &config).await.is_ok());
}

/// A TLS 1.1 ClientHello, written by hand (no rustls client speaks 1.1):
/// record version 3.1, client_version 3.2, no supported_versions; suites
/// and signature schemes the server has, so only the version is wrong.
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]); // ECDHE AES-128-GCM suites
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    // Extensions: signature_algorithms = ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256.
    body.extend_from_slice(&[0x00, 0x0a, 0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x08, 0x04]);
    let mut handshake = vec![0x01, 0x00, 0x00, body.len() as u8];
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, handshake.len() as u8];
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn a_tls_1_1_client_gets_a_protocol_version_alert_and_the_close() {
    let ca = TestCa::new("tls11");
    let server = ca.issue_server("api", &["api.test"]);
    let gateway = TestGateway::start_listeners(&tls_config(&one_cert(&server), "")).await;

    let mut stream = TcpStream::connect(gateway.listeners[0]).await.unwrap();
    stream.write_all(&tls11_client_hello()).await.unwrap();
    let answer = read_to_close(&mut stream).await;
    // An alert record: type 21, level fatal (2), protocol_version (70).
    assert_eq!(answer.first(), Some(&0x15), "an alert record: {answer:?}");
    assert_eq!(&answer[answer.len() - 2..], &[2, 70], "fatal protocol_version: {answer:?}");
}

#[tokio::test]
async fn a_client_silent_after_connecting_is_closed_at_the_handshake_timeout() {
    let ca = TestCa::new("silent");
    let server = ca.issue_server("api", &["api.test"]);
    let tls = format!("{}\nhandshake_timeout = \"300ms\"", one_cert(&server));
    let gateway = TestGateway::start_listeners(&tls_config(&tls, "")).await;
    let before = metric("keygate_tls_handshake_failures_total{reason=\"timeout\"}").unwrap_or(0.0);

    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect(gateway.listeners[0]).await.unwrap();
    let answer = read_to_close(&mut stream).await;
    assert!(answer.is_empty(), "nothing sent to a client that sent nothing: {answer:?}");
    // Closed by the 300 ms handshake timeout, well before the 10 s header one.
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());
    let after = metric("keygate_tls_handshake_failures_total{reason=\"timeout\"}").unwrap_or(0.0);
    assert!(after >= before + 1.0, "timeout counted: {before} -> {after}");
}

#[tokio::test]
async fn tls_only_routes_redirect_or_refuse_cleartext_and_serve_tls() {
    let ca = TestCa::new("tls-only");
    let server = ca.issue_server("api", &["api.test"]);
    let routes = "[[route]]\npath = \"/secure\"\nupstream = \"builtin:echo\"\npublic = true\ntls_only = true\n\n\
                  [[route]]\npath = \"/moved\"\nupstream = \"builtin:echo\"\npublic = true\ntls_only = true\ntls_redirect = true\n";
    let gateway = TestGateway::start_listeners(&tls_config(&one_cert(&server), routes)).await;
    let (tls_addr, plain_addr) = (gateway.listeners[0], gateway.listeners[1]);
    let client = common::gateway::http1_client();
    let plain_get = |path: &'static str| {
        let client = client.clone();
        async move {
            let request = http::Request::get(format!("http://{plain_addr}{path}"))
                .header("host", "api.test:8080")
                .body(http_body_util::Full::default())
                .unwrap();
            common::gateway::send(&client, request).await
        }
    };

    let refused = plain_get("/secure/x").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.json()["error"], "tls_required");
    let moved = plain_get("/moved/x?q=1").await;
    assert_eq!(moved.status, StatusCode::PERMANENT_REDIRECT, "{}", moved.text());
    assert_eq!(moved.headers["location"], format!("https://api.test:{}/moved/x?q=1", tls_addr.port()));
    assert_eq!(moved.json()["error"], "tls_required");
    // Other routes are served over cleartext as before.
    assert_eq!(plain_get("/open").await.status, StatusCode::OK);

    let config = client_config(&ca.ca_pem(), &[b"http/1.1"], None);
    let mut https = TlsHttp::over(connect(tls_addr, "api.test", &config).await.unwrap(), false).await;
    for path in ["/secure/x", "/moved/x"] {
        let answer = https.get("api.test", path).await;
        assert_eq!(answer.status, StatusCode::OK, "{path} over TLS: {}", answer.text());
    }
}

/// Polls new handshakes (100 at most, 50 ms apart) until the server presents
/// `wanted`; true if it did.
async fn presents_eventually(
    addr: std::net::SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    wanted: &[u8],
) -> bool {
    for _ in 0..100 {
        if let Ok(stream) = connect(addr, "api.test", config).await
            && presented(&stream).as_ref() == wanted
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_certificate_renewed_on_disk_reaches_new_handshakes_while_open_connections_keep_working() {
    let ca = TestCa::new("renew");
    let old = ca.issue_server("api", &["api.test"]);
    let old_der = der_of(&old.cert);
    let gateway = TestGateway::start_listeners(&tls_config(&one_cert(&old), "")).await;
    let config_path = gateway.dir.path().join("gateway.toml");
    std::fs::write(&config_path, tls_config(&one_cert(&old), "")).unwrap();
    let reloader = keygate::reload::Reloader::new(config_path, Arc::clone(&gateway.gateway));
    let _watch = keygate::reload::watch_certificates(&reloader).expect("the certificate folder is watched");
    let addr = gateway.listeners[0];
    let config = client_config(&ca.ca_pem(), &[b"http/1.1"], None);

    let open = connect(addr, "api.test", &config).await.unwrap();
    assert_eq!(presented(&open).as_ref(), old_der.as_ref());
    let mut open = TlsHttp::over(open, false).await;
    assert_eq!(open.get("api.test", "/before").await.status, StatusCode::OK);

    // Renewed in place: a new key and certificate under the same file names.
    let renewed = ca.issue_server("api", &["api.test"]);
    let new_der = der_of(&renewed.cert);
    assert_ne!(old_der.as_ref(), new_der.as_ref());
    assert!(
        presents_eventually(addr, &config, new_der.as_ref()).await,
        "new handshakes get the renewed cert"
    );
    // The connection made before the renewal was never dropped.
    assert_eq!(open.get("api.test", "/after").await.json()["path"], "/after");
}

#[tokio::test]
async fn returning_clients_resume_their_session_and_the_expiry_gauge_counts_down_to_the_certificate() {
    let ca = TestCa::new("resume");
    let server = ca.issue_server("api", &["api.test"]);
    let gateway = TestGateway::start_listeners(&tls_config(&one_cert(&server), "")).await;
    let config = client_config(&ca.ca_pem(), &[b"http/1.1"], None);

    let mut first =
        TlsHttp::over(connect(gateway.listeners[0], "api.test", &config).await.unwrap(), false).await;
    // TLS 1.3 tickets arrive after the handshake: one exchange takes them in.
    assert_eq!(first.get("api.test", "/").await.status, StatusCode::OK);
    let again = connect(gateway.listeners[0], "api.test", &config).await.unwrap();
    assert_eq!(again.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed));

    // rcgen's certificates run to 4096: thousands of years of seconds left.
    let prefix = format!(
        "keygate_tls_certificate_expiry_seconds{{listener=\"127.0.0.1:0\",cert=\"{}\"}}",
        server.cert.display()
    );
    let left = metric(&prefix).unwrap_or_else(|| panic!("no {prefix} in\n{}", keygate::metrics::render()));
    let years = left / (365.25 * 86_400.0);
    assert!((2000.0..2100.0).contains(&years), "{years} years left");
}

#[tokio::test]
async fn a_broken_new_certificate_keeps_the_running_one_and_the_reload_says_why() {
    let ca = TestCa::new("broken");
    let good = ca.issue_server("api", &["api.test"]);
    let good_der = der_of(&good.cert);
    let text = tls_config(&one_cert(&good), "") + &common::admin::admin_section();
    let gateway = TestGateway::start_listeners(&text).await;
    let config_path = gateway.dir.path().join("gateway.toml");
    std::fs::write(&config_path, &text).unwrap();
    let admin = common::admin::TestAdmin::start(&gateway, config_path.clone()).await;
    let reloader = keygate::reload::Reloader::new(config_path, Arc::clone(&gateway.gateway));
    let config = client_config(&ca.ca_pem(), &[b"http/1.1"], None);
    let addr = gateway.listeners[0];

    // The key file now holds another certificate's key.
    let other = ca.issue_server("other", &["api.test"]);
    std::fs::copy(&other.key, &good.key).unwrap();
    let error = reloader.reload_certificates().expect_err("a key that is not the certificate's");
    assert_eq!(error.field, "server.listener[0].tls.key");
    assert!(error.message.contains(&good.key.display().to_string()), "{error}");
    let refused = admin.call(http::Method::POST, "/admin/reload", None).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.text());
    let problems = refused.json()["problems"].to_string();
    assert!(
        problems.contains("server.listener[0].tls.key") && problems.contains("is not the key"),
        "{problems}"
    );
    let stream = connect(addr, "api.test", &config).await.expect("the old cert still serves");
    assert_eq!(presented(&stream).as_ref(), good_der.as_ref());

    // Repaired (renewed): the admin reload installs it for new handshakes.
    let renewed = ca.issue_server("api", &["api.test"]);
    let answer = admin.call(http::Method::POST, "/admin/reload", None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["certificates"], 1);
    let stream = connect(addr, "api.test", &config).await.unwrap();
    assert_eq!(presented(&stream).as_ref(), der_of(&renewed.cert).as_ref());
}

/// A TLS listener requiring (or accepting) client certificates from `clients`.
fn mtls_config(server: &Issued, clients: &TestCa, mode: &str) -> String {
    let tls = format!("{}\nclient_ca = {:?}\nclient_auth = \"{mode}\"", one_cert(server), clients.ca_pem());
    tls_config(&tls, "")
}

/// Whether an HTTP/1.1 GET over a new connection with `config` gets a 200.
async fn served(addr: std::net::SocketAddr, config: &Arc<rustls::ClientConfig>) -> bool {
    // TLS 1.3 reports a refused client certificate after the client's
    // handshake is done: the first request is where it shows.
    let Ok(stream) = connect(addr, "api.test", config).await else { return false };
    let io = hyper_util::rt::TokioIo::new(stream);
    let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(io).await else { return false };
    tokio::spawn(conn);
    let request = http::Request::get("/")
        .header("host", "api.test")
        .body(http_body_util::Full::<bytes::Bytes>::default());
    matches!(send.send_request(request.unwrap()).await, Ok(response) if response.status() == StatusCode::OK)
}

#[tokio::test]
async fn required_client_certificates_refuse_none_and_foreign_ones_and_accept_valid_ones() {
    let ca = TestCa::new("mtls-server");
    let clients = TestCa::new("mtls-clients");
    let strangers = TestCa::new("mtls-strangers");
    let server = ca.issue_server("api", &["api.test"]);
    let gateway = TestGateway::start_listeners(&mtls_config(&server, &clients, "required")).await;
    let addr = gateway.listeners[0];

    let valid = clients.issue_client("alice");
    let foreign = strangers.issue_client("mallory");
    assert!(served(addr, &client_config(&ca.ca_pem(), &[b"http/1.1"], Some(&valid))).await);
    assert!(!served(addr, &client_config(&ca.ca_pem(), &[b"http/1.1"], None)).await, "no certificate");
    assert!(!served(addr, &client_config(&ca.ca_pem(), &[b"http/1.1"], Some(&foreign))).await, "another CA");
}

#[tokio::test]
async fn optional_client_certificates_accept_both_and_the_peer_carries_the_verified_chain() {
    let ca = TestCa::new("opt-server");
    let clients = TestCa::new("opt-clients");
    let server = ca.issue_server("api", &["api.test"]);
    let gateway = TestGateway::start_listeners(&mtls_config(&server, &clients, "optional")).await;
    let addr = gateway.listeners[0];
    let valid = clients.issue_client("alice");
    assert!(served(addr, &client_config(&ca.ca_pem(), &[b"http/1.1"], Some(&valid))).await);
    assert!(served(addr, &client_config(&ca.ca_pem(), &[b"http/1.1"], None)).await);

    // The handshake step the listener runs, driven directly, shows what
    // each request's Peer carries.
    let tls = Arc::clone(&gateway.gateway.tls.get().unwrap().listeners[0]);
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = socket.local_addr().unwrap();
    for (identity, expected) in [(Some(&valid), Some(der_of(&valid.cert))), (None, None)] {
        let config = client_config(&ca.ca_pem(), &[b"h2"], identity);
        let client = tokio::spawn(async move { connect(at, "api.test", &config).await.map(|_| ()) });
        let (stream, from) = socket.accept().await.unwrap();
        let done = keygate::server::transport::handshake(&tls, stream, from, Duration::from_secs(5))
            .await
            .unwrap_or_else(|failure| panic!("handshake failed: {failure:?}"));
        client.await.unwrap().unwrap();
        assert!(done.peer.tls);
        assert_eq!(done.protocol, keygate::server::detect::Protocol::Http2);
        let carried = done.peer.client_certs.as_ref().map(|chain| chain[0].clone());
        assert_eq!(carried, expected);
    }
}

fn problems(text: &str, base: &Path) -> String {
    match Config::from_toml(text, base) {
        Ok(_) => panic!("config accepted:\n{text}"),
        Err(keygate::config::TextError::Invalid(problems)) => {
            problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
        }
        Err(keygate::config::TextError::Syntax(message)) => message,
    }
}

#[test]
fn config_errors_name_the_field_and_the_file() {
    let ca = TestCa::new("config");
    let server = ca.issue_server("api", &["api.test"]);
    let other = ca.issue_server("other", &["other.test"]);
    let base = ca.dir();
    let route = "[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\n";
    let listener = |tls: &str| format!("[[server.listener]]\nlisten = \"127.0.0.1:8443\"\n{tls}\n{route}");

    let missing = problems(&listener("tls = { cert = \"nope.pem\", key = \"api-key.pem\" }"), base);
    assert!(missing.contains("`server.listener[0].tls.cert`") && missing.contains("nope.pem"), "{missing}");
    let mismatch =
        problems(&listener(&format!("tls = {{ cert = {:?}, key = {:?} }}", server.cert, other.key)), base);
    assert!(
        mismatch.contains("`server.listener[0].tls.key`") && mismatch.contains("is not the key"),
        "{mismatch}"
    );
    let unreadable =
        problems(&listener(&format!("tls = {{ cert = {:?}, key = {:?} }}", server.cert, server.cert)), base);
    assert!(
        unreadable.contains("`server.listener[0].tls.key`") && unreadable.contains("private key"),
        "{unreadable}"
    );
    let listed = problems(
        &listener(&format!(
            "[[server.listener.tls.certs]]\ncert = {:?}\nkey = {:?}\n[[server.listener.tls.certs]]\ncert = {:?}\nkey = \"gone.pem\"\n",
            server.cert, server.key, other.cert
        )),
        base,
    );
    assert!(
        listed.contains("`server.listener[0].tls.certs[1].key`") && listed.contains("gone.pem"),
        "{listed}"
    );
    // Relative paths resolve against the config's folder.
    let relative = "tls = { cert = \"api.pem\", key = \"api-key.pem\" }";
    assert!(Config::from_toml(&listener(relative), base).is_ok());

    let both = problems(&format!("[server]\nlisten = \"127.0.0.1:8080\"\n{}", listener("")), base);
    assert!(both.contains("`server.listen`") && both.contains("not both"), "{both}");
    let twice = problems(
        &format!(
            "[[server.listener]]\nlisten = \"127.0.0.1:9000\"\n{}",
            listener("").replace("8443", "9000")
        ),
        base,
    );
    assert!(twice.contains("`server.listener[1].listen`") && twice.contains("already listens"), "{twice}");
    let stray = problems(&listener("client_auth = \"required\""), base);
    assert!(stray.contains("`server.listener[0].client_auth`"), "{stray}");
    let no_ca = problems(&listener(&format!("{}\nclient_ca = \"none.pem\"", one_cert(&server))), base);
    assert!(no_ca.contains("`server.listener[0].client_ca`") && no_ca.contains("none.pem"), "{no_ca}");
    let tls_only = problems(&format!("{route}tls_only = true\n"), base);
    assert!(tls_only.contains("`route[0].tls_only`"), "{tls_only}");

    // Route hosts the certificates do not cover: refused, naming both.
    let hosted = |host: &str| {
        format!(
            "[[server.listener]]\nlisten = \"127.0.0.1:8443\"\n{}\n[[route]]\npath = \"/\"\nhost = \"{host}\"\nupstream = \"builtin:echo\"\n",
            one_cert(&server)
        )
    };
    let uncovered = problems(&hosted("shop.example"), base);
    assert!(
        uncovered.contains("`server.listener[0].tls`")
            && uncovered.contains("api.test")
            && uncovered.contains("shop.example"),
        "{uncovered}"
    );
    assert!(Config::from_toml(&hosted("api.test"), base).is_ok(), "an exact name covers its host");
    let wildcard = ca.issue_server("wild", &["*.shop.example"]);
    let wild = hosted("eu.shop.example").replace(&one_cert(&server), &one_cert(&wildcard));
    assert!(Config::from_toml(&wild, base).is_ok(), "a wildcard covers a host one label down");
    let too_deep = hosted("a.eu.shop.example").replace(&one_cert(&server), &one_cert(&wildcard));
    assert!(problems(&too_deep, base).contains("`server.listener[0].tls`"), "but not two labels down");
}

#[test]
fn check_lists_each_certificates_names_and_expiry() {
    let ca = TestCa::new("check");
    let server = ca.issue_server("api", &["api.test", "*.api.test"]);
    let path = ca.dir().join("gateway.toml");
    std::fs::write(&path, tls_config(&one_cert(&server), "")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("certificate") && l.contains("api.pem"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("names api.test, *.api.test"), "{line}");
    // rcgen's default validity runs to 4096; the year is enough here.
    assert!(line.contains("expires 4096-01-01"), "{line}");
    assert!(text.contains("listener 127.0.0.1:0: TLS") && text.contains("plain HTTP"), "{text}");
}

#[test]
fn curl_fetches_over_https_from_the_binary_trusting_the_test_ca() {
    if std::process::Command::new("curl").arg("--version").output().is_err() {
        eprintln!("skipped: curl is not on PATH");
        return;
    }
    let ca = TestCa::new("curl");
    let server = ca.issue_server("api", &["localhost"]);
    let path = ca.dir().join("gateway.toml");
    let config = format!(
        "[server]\nworkers = 1\n\n[[server.listener]]\nlisten = \"127.0.0.1:0\"\n{}\n\n\
         [[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\npublic = true\n",
        one_cert(&server)
    );
    std::fs::write(&path, config).unwrap();
    let mut served = Served::start(&path, &[]);
    let address = served.gateway_address();
    let port = address.rsplit(':').next().unwrap().to_owned();
    let out = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
        .arg(ca.ca_pem())
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .arg(format!("https://localhost:{port}/via-curl"))
        .output()
        .unwrap();
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let echoed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(echoed["path"], "/via-curl");
    assert_eq!(echoed["headers"]["x-forwarded-proto"], "https");
}

/// The whole mTLS path: the listener verifies the client certificate, the
/// route takes it as the credential, and the client it names (its CN here)
/// must have an active record whose scopes cover the route.
#[tokio::test]
async fn a_verified_client_certificate_is_the_credential_of_cert_routes() {
    use keygate::meta::MetaChanges;
    let ca = TestCa::new("cred-server");
    let clients = TestCa::new("cred-clients");
    let server = ca.issue_server("api", &["api.test"]);
    let tls =
        format!("{}\nclient_ca = {:?}\nclient_auth = \"optional\"", one_cert(&server), clients.ca_pem());
    let routes = "[[route]]\npath = \"/cert\"\nupstream = \"builtin:echo\"\nauth = [\"cert\"]\nscopes = [\"read\"]\n\n\
                  [[route]]\npath = \"/both\"\nupstream = \"builtin:echo\"\nauth = [\"key\", \"cert\"]\nscopes = [\"read\"]\n";
    let gateway = TestGateway::start_listeners(&tls_config(&tls, routes)).await;
    let addr = gateway.listeners[0];
    let now = jiff::Timestamp::now();
    let store = &*gateway.gateway.store;
    let scopes = MetaChanges::from_query("scope=read", now).unwrap();
    keygate::ops::clients::create(store, "alice", scopes, now).await.unwrap();
    keygate::ops::clients::create(
        store,
        "bob",
        MetaChanges::from_query("label=no-scopes", now).unwrap(),
        now,
    )
    .await
    .unwrap();

    let over = |identity: Option<&Issued>, http2: bool| {
        let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
        let config = client_config(&ca.ca_pem(), alpn, identity);
        async move { TlsHttp::over(connect(addr, "api.test", &config).await.expect("handshake"), http2).await }
    };

    let alice = clients.issue_client("alice");
    for http2 in [false, true] {
        let mut client = over(Some(&alice), http2).await;
        let answer = client.get("api.test", "/cert/orders").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(answer.json()["headers"]["x-keygate-client"], "alice");
        assert!(answer.json()["headers"].get("x-keygate-key-id").is_none(), "a certificate has no key ID");
        assert_eq!(client.get("api.test", "/both/orders").await.status, StatusCode::OK);
    }

    // No certificate on an optional listener: a cert-only route says so.
    let answer = over(None, false).await.get("api.test", "/cert/orders").await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.json()["error"], "missing_certificate", "{}", answer.text());

    // A client without the route's scope, and one the store does not know.
    let answer = over(Some(&clients.issue_client("bob")), false).await.get("api.test", "/cert/x").await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.text());
    let answer = over(Some(&clients.issue_client("carol")), false).await.get("api.test", "/cert/x").await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.text());

    // Revoking the client ends its certificate's access on the next request,
    // even on a connection that is already open and verified.
    let mut open = over(Some(&alice), false).await;
    assert_eq!(open.get("api.test", "/cert/before").await.status, StatusCode::OK);
    keygate::ops::clients::revoke(store, "alice", jiff::Timestamp::now()).await.unwrap();
    assert_eq!(open.get("api.test", "/cert/after").await.status, StatusCode::UNAUTHORIZED);
}

/// The client CA is a certificate file like the others: replaced on disk,
/// it changes who may connect for new handshakes, with no restart. A
/// session verified under the old CA does not resume past the change (the
/// `alice` config below holds one from its first connection).
#[tokio::test]
async fn a_client_ca_replaced_on_disk_changes_which_client_certificates_are_accepted() {
    let ca = TestCa::new("ca-swap-server");
    let first = TestCa::new("ca-swap-first");
    let second = TestCa::new("ca-swap-second");
    let server = ca.issue_server("api", &["api.test"]);
    let dir = tempfile::tempdir().unwrap();
    let client_ca = dir.path().join("clients-ca.pem");
    std::fs::copy(first.ca_pem(), &client_ca).unwrap();
    let text = tls_config(
        &format!("{}\nclient_ca = {:?}\nclient_auth = \"required\"", one_cert(&server), client_ca),
        "",
    );
    let gateway = TestGateway::start_listeners(&text).await;
    let config_path = gateway.dir.path().join("gateway.toml");
    std::fs::write(&config_path, &text).unwrap();
    let reloader = keygate::reload::Reloader::new(config_path, Arc::clone(&gateway.gateway));
    let _watch = keygate::reload::watch_certificates(&reloader).expect("the CA's folder is watched");
    let addr = gateway.listeners[0];
    let alice = client_config(&ca.ca_pem(), &[b"http/1.1"], Some(&first.issue_client("alice")));
    let bob = client_config(&ca.ca_pem(), &[b"http/1.1"], Some(&second.issue_client("bob")));
    assert!(served(addr, &alice).await && !served(addr, &bob).await);

    std::fs::copy(second.ca_pem(), &client_ca).unwrap();
    let mut swapped = false;
    for _ in 0..100 {
        if served(addr, &bob).await {
            swapped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(swapped, "the new client CA reaches new handshakes");
    assert!(!served(addr, &alice).await, "and the old one no longer admits anyone");
}
