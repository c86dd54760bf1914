//! The usage dashboard (`/dashboard` on the admin listener) in a real
//! browser: headless Chromium driven through chromedriver (started here on a
//! free port, killed at the end), against the real gateway on a real Redis
//! with a real upstream. The charts' numbers are read from the DOM (each bar
//! and dot carries `data-value`) and compared with the usage the test made.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them);
//! without them the browser tests fail, saying so.
//!
//! `KEYGATE_SCREENSHOT=docs/dashboard.png cargo test --test dashboard_browser`
//! also writes the README's screenshot.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::admin::{self, TOKEN, TestAdmin, admin_section};
use common::gateway::{Answer, TestGateway, http1_client, send};
use common::redis::RedisServer;
use common::upstream::{Upstream, full};
use common::wait::poll_until;
use fantoccini::{Client, ClientBuilder, Locator};
use http::{Method, Request, Response};
use http_body_util::Full;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The dashboard's sessionStorage entry for the token.
const TOKEN_KEY: &str = "keygate.admin-token";
/// Ports tried if the chosen one is taken before chromedriver binds it.
const START_ATTEMPTS: usize = 5;
/// How long the page may take to show what a step waits for.
const PAGE_DEADLINE: Duration = Duration::from_secs(30);

// The usage this test makes.
const ALPHA_OK: u64 = 12;
/// beta's key allows 1 request an hour: the first passes, the rest are 429.
const BETA_CALLS: u64 = 4;
const BAD_KEY_CALLS: u64 = 5;
const UPSTREAM_BODY: &str = "hello from the upstream";
/// Clients with one request each, beside alpha, beta and the bad key's.
const CROWD: u64 = 6;
/// Keys of a client without usage: more than one page (100) of the keys list.
const GAMMA_KEYS: usize = 130;

// === chromedriver and the browser ===

/// A chromedriver child on a free loopback port; killed when dropped.
struct Chromedriver {
    child: Child,
    url: String,
    /// Chromium's `--user-data-dir` and chromedriver's log.
    dir: tempfile::TempDir,
}

impl Chromedriver {
    /// Starts chromedriver and waits until it says it is ready. Fails the
    /// test, naming the package, if chromium or chromedriver is missing.
    async fn start() -> Chromedriver {
        for (binary, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(binary).exists(),
                "{binary} is missing: the dashboard's browser test needs Debian's `{package}` \
                 (`apt-get install chromium chromium-driver`; .ci/run installs both)"
            );
        }
        for _ in 0..START_ATTEMPTS {
            if let Some(driver) = Self::start_on_a_free_port().await {
                return driver;
            }
        }
        panic!("chromedriver could not bind a free port in {START_ATTEMPTS} attempts");
    }

    /// `None` if chromedriver exited before it was ready (the port was taken
    /// between our probe and its bind): the caller tries another port.
    async fn start_on_a_free_port() -> Option<Chromedriver> {
        let dir = tempfile::Builder::new().prefix("keygate-chromium-").tempdir().unwrap();
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let log = std::fs::File::create(dir.path().join("chromedriver.log")).unwrap();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", dir.path().join("chromedriver-verbose.log").display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        let mut driver = Chromedriver { child, url: format!("http://127.0.0.1:{port}"), dir };
        let status = format!("{}/status", driver.url);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let request = Request::get(&status).body(Full::default()).unwrap();
            let answer = tokio::time::timeout(Duration::from_secs(2), http1_client().request(request)).await;
            if matches!(answer, Ok(Ok(ref response)) if response.status() == 200) {
                return Some(driver);
            }
            if driver.child.try_wait().unwrap().is_some() {
                return None;
            }
            assert!(Instant::now() < deadline, "chromedriver not ready within 20 s:\n{}", driver.log());
            tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, bounded by the deadline
        }
    }

    /// A new headless Chromium session with a profile of its own.
    async fn browser(&self) -> Client {
        let profile = tempfile::Builder::new().prefix("profile-").tempdir_in(self.dir.path()).unwrap();
        let profile = profile.keep();
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--no-first-run",
                    "--hide-scrollbars",
                    "--window-size=1280,1900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let Value::Object(capabilities) = capabilities else { unreachable!() };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("no browser session from chromedriver: {e}\n{}", self.log()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default()
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `expression` in the page and returns its value.
async fn js(browser: &Client, expression: &str) -> Value {
    browser.execute(&format!("return ({expression});"), vec![]).await.unwrap()
}

/// Waits until `expression` is true in the page.
async fn wait_until(browser: &Client, what: &str, expression: &str) {
    poll_until(PAGE_DEADLINE, what, || async { js(browser, expression).await == Value::Bool(true) }).await;
}

/// Waits until the view has finished drawing `view` for `range`.
async fn wait_ready(browser: &Client, view: &str, range: &str) {
    let selector = format!("main[data-status=ready][data-view={view}][data-range={range}]");
    wait_until(
        browser,
        &format!("the {view} view for {range}"),
        &format!("!!document.querySelector({selector:?})"),
    )
    .await;
}

/// The sum of the `data-value`s of `chart`'s bars or dots of `series`.
async fn chart_sum(browser: &Client, chart: &str, series: &str) -> u64 {
    let expression = format!(
        "[...document.querySelectorAll('{chart} [data-series=\"{series}\"]')]\
         .reduce((sum, e) => sum + Number(e.dataset.value), 0)"
    );
    js(browser, &expression).await.as_u64().unwrap_or_else(|| panic!("{chart} {series}: not a count"))
}

/// A tile's raw value (`data-value`).
async fn tile(browser: &Client, metric: &str) -> u64 {
    let expression = format!("Number(document.querySelector('.tile[data-metric={metric}]').dataset.value)");
    js(browser, &expression).await.as_u64().unwrap_or_else(|| panic!("tile {metric}: not a count"))
}

/// Types `token` in the login form and submits it.
async fn log_in(browser: &Client, token: &str) {
    wait_until(browser, "the login form", "!document.querySelector('#login').hidden").await;
    let input = browser.find(Locator::Css("#token")).await.unwrap();
    input.clear().await.unwrap();
    input.send_keys(token).await.unwrap();
    browser.find(Locator::Css("#login-button")).await.unwrap().click().await.unwrap();
}

async fn click(browser: &Client, selector: &str) {
    browser.find(Locator::Css(selector)).await.unwrap().click().await.unwrap();
}

async fn login_error(browser: &Client) -> String {
    browser.find(Locator::Css("#login-error")).await.unwrap().text().await.unwrap()
}

/// The page URL never holds the token, nor does the page, nor persistent storage.
async fn assert_token_only_in_session_storage(browser: &Client) {
    let url = browser.current_url().await.unwrap();
    assert!(!url.as_str().contains(TOKEN), "the token is in the URL: {url}");
    let page = js(browser, "document.documentElement.outerHTML").await;
    assert!(!page.as_str().unwrap().contains(TOKEN), "the token is in the page");
    assert_eq!(js(browser, &format!("sessionStorage.getItem('{TOKEN_KEY}')")).await, TOKEN);
    assert_eq!(js(browser, "window.localStorage.length").await, 0, "nothing in localStorage");
}

/// Saves a screenshot in `dir` (and where `KEYGATE_SCREENSHOT` says) and
/// checks it is a real picture: a PNG of the window's size, not one colour.
async fn screenshot(browser: &Client, dir: &Path) -> PathBuf {
    let png = browser.screenshot().await.unwrap();
    let path = dir.join("dashboard.png");
    std::fs::write(&path, &png).unwrap();
    if let Some(target) = std::env::var_os("KEYGATE_SCREENSHOT") {
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join(target);
        std::fs::write(&target, &png).unwrap();
    }
    let decoder = png::Decoder::new(std::io::Cursor::new(&png));
    let mut reader = decoder.read_info().expect("the screenshot is a PNG");
    let mut pixels = vec![0; reader.output_buffer_size().expect("a PNG of a sane size")];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert!(frame.width >= 800 && frame.height >= 600, "{}x{}", frame.width, frame.height);
    let samples = frame.color_type.samples();
    let pixels = &pixels[..frame.buffer_size()];
    let first = &pixels[..samples];
    let distinct = pixels.chunks_exact(samples).filter(|p| *p != first).count();
    assert!(distinct > pixels.len() / samples / 20, "the screenshot is (nearly) blank: {}", path.display());
    path
}

// === The gateway and the usage ===

fn config(store: &str, upstream: &Upstream) -> String {
    format!(
        "{store}\n[[route]]\npath = \"/api\"\nupstream = \"app\"\n\n[upstream.app]\ntargets = [\"{}\"]\n{}",
        upstream.url(),
        admin_section()
    )
}

async fn issue(admin: &TestAdmin, body: &str) -> (String, String) {
    let answer = admin.call(Method::POST, "/admin/keys", Some(body)).await;
    assert_eq!(answer.status, 201, "{}", answer.text());
    let json = answer.json();
    (json["id"].as_str().unwrap().to_owned(), json["key"].as_str().unwrap().to_owned())
}

async fn calls(gateway: &TestGateway, key: &str, n: u64) -> Vec<u16> {
    let client = http1_client();
    let mut statuses = Vec::new();
    for _ in 0..n {
        let request = Request::get(gateway.url("/api/orders")).header("x-api-key", key).body(Full::default());
        let Answer { status, .. } = send(&client, request.unwrap()).await;
        statuses.push(status.as_u16());
    }
    statuses
}

async fn upstream() -> Upstream {
    Upstream::start(|_request| async { Response::builder().body(full(UPSTREAM_BODY)).unwrap() }).await
}

// === Tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_charts_the_usage_the_gateway_counted() {
    let driver = Chromedriver::start().await;
    let redis = RedisServer::start();
    let upstream = upstream().await;
    let store = format!("[store]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"kgdash:\"\n", redis.url());
    let (gateway, admin) = admin::start(&config(&store, &upstream)).await;
    let created =
        admin.call(Method::POST, "/admin/clients", Some(r#"{"id":"alpha","quota":"1000/day"}"#)).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let (alpha_id, alpha) =
        issue(&admin, r#"{"client":"alpha","scopes":["read"],"label":"alpha web"}"#).await;
    let (_, beta) = issue(&admin, r#"{"client":"beta","scopes":["read"],"rate":"1/h","burst":1}"#).await;
    let (credited_id, _) = issue(&admin, r#"{"client":"alpha","scopes":["read"],"uses":100}"#).await;
    // More keys than one page of `GET /admin/keys` holds: the page follows the cursor.
    let created = admin.call(Method::POST, "/admin/clients", Some(r#"{"id":"gamma"}"#)).await;
    assert_eq!(created.status, 201, "{}", created.text());
    for _ in 0..GAMMA_KEYS {
        issue(&admin, r#"{"client":"gamma","scopes":["read"]}"#).await;
    }

    assert!(calls(&gateway, &alpha, ALPHA_OK).await.iter().all(|s| *s == 200));
    let beta_statuses = calls(&gateway, &beta, BETA_CALLS).await;
    assert_eq!(beta_statuses[0], 200);
    assert!(beta_statuses[1..].iter().all(|s| *s == 429), "{beta_statuses:?}");
    // alpha's key with its last character changed: a checksum that fails.
    let (head, last) = alpha.split_at(alpha.len() - 1);
    let bad = format!("{head}{}", if last == "x" { "y" } else { "x" });
    assert!(calls(&gateway, &bad, BAD_KEY_CALLS).await.iter().all(|s| *s == 401));
    // One request each from more clients than the charts draw as their own series.
    for n in 1..=CROWD {
        let (_, key) = issue(&admin, &format!(r#"{{"client":"crowd-{n}","scopes":["read"]}}"#)).await;
        assert_eq!(calls(&gateway, &key, 1).await, [200]);
    }

    // Wait until the flush has written every request, as the page will read it.
    let all = ALPHA_OK + BETA_CALLS + BAD_KEY_CALLS + CROWD;
    let flusher = gateway.gateway.usage_flusher().expect("a Redis store flushes usage");
    poll_until(Duration::from_secs(20), "the usage API shows every request", || async {
        flusher.flush_now().await.unwrap();
        let usage = admin.call(Method::GET, "/admin/usage?since=60m&by=minute", None).await;
        usage.json()["totals"]["requests"] == all
    })
    .await;
    let report = admin.call(Method::GET, "/admin/usage?since=60m&by=minute", None).await.json();

    let browser = driver.browser().await;
    browser.goto(&admin.url("/dashboard")).await.unwrap();

    // A wrong token: the login form says so, and nothing is kept.
    log_in(&browser, "not-the-admin-token").await;
    wait_until(&browser, "the login error", "document.querySelector('#login-error').textContent.length > 0")
        .await;
    assert!(login_error(&browser).await.contains("refused this token"), "{}", login_error(&browser).await);
    assert_eq!(js(&browser, &format!("sessionStorage.getItem('{TOKEN_KEY}')")).await, Value::Null);

    // The right token: the last hour, by minute.
    log_in(&browser, TOKEN).await;
    wait_ready(&browser, "overview", "hour").await;
    assert_eq!(js(&browser, "document.querySelector('main').dataset.usage").await, "redis");
    assert_token_only_in_session_storage(&browser).await;
    assert_eq!(tile(&browser, "requests").await, all);
    assert_eq!(chart_sum(&browser, "#chart-requests", "alpha").await, ALPHA_OK);
    assert_eq!(chart_sum(&browser, "#chart-requests", "beta").await, BETA_CALLS);
    assert_eq!(chart_sum(&browser, "#chart-requests", "_anonymous").await, BAD_KEY_CALLS);
    assert_eq!(chart_sum(&browser, "#chart-status", "2xx").await, ALPHA_OK + 1 + CROWD);
    assert_eq!(chart_sum(&browser, "#chart-status", "4xx").await, BETA_CALLS - 1 + BAD_KEY_CALLS);
    assert_eq!(chart_sum(&browser, "#chart-refusals", "401").await, BAD_KEY_CALLS);
    assert_eq!(chart_sum(&browser, "#chart-refusals", "429_rate").await, BETA_CALLS - 1);
    assert_eq!(chart_sum(&browser, "#chart-refusals", "403").await, 0);
    assert_eq!(chart_sum(&browser, "#chart-routes", "/api").await, all, "every request matched /api");
    let bytes_out = report["totals"]["bytes_out"].as_u64().unwrap();
    assert!(bytes_out >= (ALPHA_OK + 1 + CROWD) * UPSTREAM_BODY.len() as u64, "{bytes_out}");
    assert_eq!(chart_sum(&browser, "#chart-bytes", "bytes_out").await, bytes_out);
    assert_eq!(tile(&browser, "bytes_out").await, bytes_out);
    assert_eq!(js(&browser, "document.querySelector('#chart-requests').dataset.buckets").await, "61");
    // Five clients are series of their own (the busiest), the other four one "other".
    assert_eq!(chart_sum(&browser, "#chart-requests", "crowd-1").await, 1);
    assert_eq!(chart_sum(&browser, "#chart-requests", "crowd-3").await, 0);
    assert_eq!(chart_sum(&browser, "#chart-requests", "other").await, CROWD - 2);
    let top = js(
        &browser,
        "[...document.querySelectorAll('#chart-top .row')].slice(0, 4).map(r => r.dataset.name + '=' + r.dataset.value)",
    );
    assert_eq!(
        top.await,
        json!([
            format!("alpha={ALPHA_OK}"),
            format!("_anonymous={BAD_KEY_CALLS}"),
            format!("beta={BETA_CALLS}"),
            "crowd-1=1",
        ])
    );
    // A point a minute with upstream requests (one, or two if the calls straddled a minute).
    let minutes: BTreeSet<&str> = report["clients"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["buckets"].as_array().unwrap())
        .filter(|b| b["upstream_requests"].as_u64().unwrap() > 0)
        .map(|b| b["start"].as_str().unwrap())
        .collect();
    let latency =
        js(&browser, "document.querySelectorAll('#chart-latency [data-series=latency_ms]').length").await;
    assert_eq!(latency, minutes.len(), "one latency point per minute with upstream requests");

    // The time range switch: the same requests, in hour and day buckets.
    for (range, by, buckets) in [("day", "hour", "25"), ("month", "day", "31")] {
        click(&browser, &format!("#ranges button[data-range={range}]")).await;
        wait_ready(&browser, "overview", range).await;
        assert_eq!(js(&browser, "document.querySelector('main').dataset.by").await, by);
        assert_eq!(js(&browser, "document.querySelector('#chart-requests').dataset.buckets").await, buckets);
        assert_eq!(tile(&browser, "requests").await, all, "{range}");
        assert_eq!(chart_sum(&browser, "#chart-requests", "alpha").await, ALPHA_OK, "{range}");
        assert_eq!(chart_sum(&browser, "#chart-refusals", "401").await, BAD_KEY_CALLS, "{range}");
    }

    // A client: its chart and its keys, with state.
    click(&browser, "#ranges button[data-range=hour]").await;
    wait_ready(&browser, "overview", "hour").await;
    let shot = screenshot(&browser, driver.dir.path()).await;
    click(&browser, "#clients-table button[data-client=alpha]").await;
    wait_ready(&browser, "client", "hour").await;
    assert_eq!(js(&browser, "document.querySelector('main').dataset.client").await, "alpha");
    assert_eq!(chart_sum(&browser, "#chart-requests", "alpha").await, ALPHA_OK);
    assert_eq!(chart_sum(&browser, "#chart-requests", "beta").await, 0, "only alpha's usage");
    let row = format!("#keys-table tr[data-key='{alpha_id}']");
    let state = js(&browser, &format!("document.querySelector(\"{row}\").dataset.state")).await;
    assert_eq!(state, "active");
    let requests = js(&browser, &format!("document.querySelector(\"{row} td.num\").textContent")).await;
    assert_eq!(requests, ALPHA_OK.to_string());
    let last_used =
        js(&browser, &format!("document.querySelector(\"{row} td[data-last-used]\").dataset.lastUsed")).await;
    let last_used: jiff::Timestamp =
        last_used.as_str().unwrap().parse().expect("the key's last_used is shown");
    assert!(
        last_used <= jiff::Timestamp::now()
            && last_used > jiff::Timestamp::now() - jiff::SignedDuration::from_mins(5)
    );
    let credits = format!(
        "document.querySelector(\"#keys-table tr[data-key='{credited_id}'] td:nth-child(6)\").textContent"
    );
    assert_eq!(
        js(&browser, &credits).await,
        "100 granted, 100 left",
        "credits left, read from the key's record"
    );
    let record = browser.find(Locator::Css("#client-record")).await.unwrap().text().await.unwrap();
    assert!(record.contains("1000/day"), "the client's quota: {record}");
    assert_token_only_in_session_storage(&browser).await;
    click(&browser, "#back").await;
    wait_ready(&browser, "overview", "hour").await;
    click(&browser, "#clients-table button[data-client=gamma]").await;
    wait_until(&browser, "gamma's keys", "document.querySelector('main').dataset.client === 'gamma'").await;
    wait_ready(&browser, "client", "hour").await;
    let keys = js(&browser, "document.querySelectorAll('#keys-table tr[data-key]').length").await;
    assert_eq!(keys, GAMMA_KEYS, "every page of gamma's keys");
    click(&browser, "#back").await;
    wait_ready(&browser, "overview", "hour").await;

    // A token the API stops accepting returns to the login form.
    js(&browser, &format!("sessionStorage.setItem('{TOKEN_KEY}', 'a-stale-token') || true")).await;
    click(&browser, "#refresh").await;
    wait_until(&browser, "the login form again", "!document.querySelector('#login').hidden").await;
    assert!(login_error(&browser).await.contains("Log in again"), "{}", login_error(&browser).await);

    browser.close().await.unwrap();
    assert!(shot.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_file_store_the_dashboard_says_there_is_no_usage() {
    let driver = Chromedriver::start().await;
    let upstream = upstream().await;
    let (_gateway, admin) = admin::start(&config("", &upstream)).await;
    let (key_id, _) = issue(&admin, r#"{"client":"alpha","scopes":["read"]}"#).await;

    let browser = driver.browser().await;
    browser.goto(&admin.url("/dashboard")).await.unwrap();
    log_in(&browser, TOKEN).await;
    wait_ready(&browser, "overview", "hour").await;
    assert_eq!(js(&browser, "document.querySelector('main').dataset.usage").await, "none");
    let notice = browser.find(Locator::Css("#notice")).await.unwrap().text().await.unwrap();
    assert!(notice.contains("file store"), "{notice}");
    let charts = browser.find(Locator::Css("#usage")).await.unwrap();
    assert!(!charts.is_displayed().await.unwrap(), "no empty charts");
    click(&browser, "#clients-table button[data-client=alpha]").await;
    wait_ready(&browser, "client", "hour").await;
    let row = format!("#keys-table tr[data-key='{key_id}']");
    assert_eq!(js(&browser, &format!("document.querySelector(\"{row}\").dataset.state")).await, "active");
    browser.close().await.unwrap();
}

#[tokio::test]
async fn the_page_is_served_without_the_token_under_a_strict_policy() {
    let upstream = upstream().await;
    let (_gateway, admin) = admin::start(&config("", &upstream)).await;
    for (path, content_type) in [
        ("/dashboard", "text/html; charset=utf-8"),
        ("/dashboard/app.js", "text/javascript; charset=utf-8"),
        ("/dashboard/app.css", "text/css; charset=utf-8"),
    ] {
        let answer = admin.call_as(None, Method::GET, path, None).await;
        assert_eq!(answer.status, 200, "{path}");
        let header = |name: &str| answer.headers.get(name).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(header("content-type").as_deref(), Some(content_type), "{path}");
        let csp = header("content-security-policy").unwrap();
        assert!(csp.starts_with("default-src 'self';"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'") && csp.contains("form-action 'none'"), "{csp}");
        assert_eq!(header("x-content-type-options").as_deref(), Some("nosniff"));
        assert_eq!(header("cache-control").as_deref(), Some("no-store"));
        assert_eq!(header("referrer-policy").as_deref(), Some("no-referrer"));
        assert_eq!(header("x-frame-options").as_deref(), Some("DENY"));
    }
    // Only the page is open: its data still needs the token.
    assert_eq!(admin.call_as(None, Method::GET, "/admin/usage", None).await.status, 401);
    assert_eq!(admin.call_as(None, Method::GET, "/dashboard/other.js", None).await.status, 401);
    assert_eq!(admin.call_as(None, Method::POST, "/dashboard", None).await.status, 401);
}
