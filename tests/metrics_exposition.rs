//! `/metrics` as scrapers read it (issue 19): OpenMetrics unless the
//! scraper prefers the Prometheus text format 0.0.4, every family with HELP
//! and TYPE in both, the process metrics, and the operational families
//! (reloads and their result, the invalidation subscription) moving with
//! what the gateway does. With `promtool` on PATH (Debian's `prometheus`)
//! its `check metrics` must pass on the 0.0.4 page too.

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;

use bytes::Bytes;
use common::admin::{TestAdmin, admin_section};
use common::gateway::{Answer, http1_client, send};
use common::redis::RedisServer;
use http::{Method, Request, header};
use http_body_util::Full;

const ROUTES: &str = "[[route]]\npath = \"/\"\nupstream = \"builtin:echo\"\npublic = true\n";

/// What Prometheus 2.x sends.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                                 version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
/// What a scraper that only speaks the old text format sends.
const TEXT_ACCEPT: &str = "text/plain;version=0.0.4;q=1,*/*;q=0.1";

async fn scrape(admin: &TestAdmin, accept: Option<&str>) -> Answer {
    let mut request = Request::get(admin.url("/metrics"));
    if let Some(accept) = accept {
        request = request.header(header::ACCEPT, accept);
    }
    send(&http1_client(), request.body(Full::new(Bytes::new())).unwrap()).await
}

/// The value of the sample line starting with `series ` (exact series).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// What a Prometheus 0.0.4 linter checks: every sample belongs to a family
/// with HELP and TYPE written before it, counters end in `_total`, and no
/// family is described twice.
fn lint_text_004(text: &str) -> Result<(), String> {
    let (mut helped, mut typed) = (BTreeSet::new(), std::collections::BTreeMap::new());
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            if !helped.insert(name.to_owned()) {
                return Err(format!("{name}: HELP twice"));
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or(format!("bad TYPE line: {line}"))?;
            if kind == "counter" && !name.ends_with("_total") {
                return Err(format!("counter {name} lacks _total"));
            }
            typed.insert(name.to_owned(), kind.to_owned());
        } else if line.starts_with('#') {
            return Err(format!("a line 0.0.4 does not have: {line}"));
        } else if !line.is_empty() {
            let sample = line.split(['{', ' ']).next().unwrap_or("");
            let family = typed
                .keys()
                .find(|name| {
                    sample == name.as_str()
                        || ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| sample.strip_prefix(name.as_str()) == Some(*s))
                })
                .ok_or(format!("sample {sample} has no TYPE before it"))?;
            if !helped.contains(family) {
                return Err(format!("{family} has no HELP"));
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn metrics_speak_openmetrics_unless_the_scraper_prefers_the_0_0_4_text_format() {
    let (_gateway, admin) = common::admin::start(&format!("{ROUTES}{}", admin_section())).await;

    for accept in [None, Some(PROMETHEUS_ACCEPT), Some("*/*")] {
        let page = scrape(&admin, accept).await;
        assert_eq!(page.status, 200);
        let content_type = page.headers[header::CONTENT_TYPE].to_str().unwrap();
        assert!(
            content_type.starts_with("application/openmetrics-text; version=1.0.0"),
            "{accept:?}: {content_type}"
        );
        assert!(page.text().ends_with("# EOF\n"), "{accept:?}");
        assert!(page.text().contains("# TYPE keygate_key_cache_hits counter"), "{accept:?}");
        assert_eq!(page.headers[header::VARY], "accept");
    }

    let page = scrape(&admin, Some(TEXT_ACCEPT)).await;
    assert_eq!(page.headers[header::CONTENT_TYPE], "text/plain; version=0.0.4; charset=utf-8");
    let text = page.text();
    assert!(text.contains("# TYPE keygate_key_cache_hits_total counter"), "{text}");
    assert!(!text.contains("# EOF"), "{text}");
    lint_text_004(&text).unwrap_or_else(|why| panic!("{why}\n{text}"));

    // Both formats carry the process families.
    for text in [scrape(&admin, None).await.text(), text.clone()] {
        let rss = value(&text, "process_resident_memory_bytes").expect("RSS");
        assert!(rss > 1_000_000.0, "{rss}");
        assert!(value(&text, "process_open_fds").expect("fds") >= 3.0);
        assert!(value(&text, "process_cpu_seconds_total").is_some());
        assert!(value(&text, "process_start_time_seconds").is_some());
    }

    if let Ok(promtool) = which("promtool") {
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let said =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics:\n{said}");
    }
}

fn which(tool: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
        .ok_or(())
}

#[tokio::test]
async fn reloads_count_by_result_and_the_subscription_shows_while_it_is_up() {
    let redis = RedisServer::start();
    let store = format!("[store]\nkind = \"redis\"\nurl = \"{}\"\n", redis.url());
    let config = format!("{store}{ROUTES}{}", admin_section());
    let (_gateway, admin) = common::admin::start(&config).await;
    let count = |text: &str, result: &str| {
        value(text, &format!("keygate_config_reloads_total{{result=\"{result}\"}}"))
    };
    let before = scrape(&admin, None).await.text();
    let (ok_before, refused_before) =
        (count(&before, "ok").unwrap_or(0.0), count(&before, "refused").unwrap_or(0.0));

    assert_eq!(admin.call(Method::POST, "/admin/reload", None).await.status, 200);
    admin.write_config("[[route]]\npath = 7\n");
    assert_eq!(admin.call(Method::POST, "/admin/reload", None).await.status, 400);
    let after = scrape(&admin, None).await.text();
    // Other tests in this process may reload too: at least ours are there.
    assert!(count(&after, "ok").unwrap_or(0.0) >= ok_before + 1.0, "{after}");
    assert!(count(&after, "refused").unwrap_or(0.0) >= refused_before + 1.0, "{after}");
    assert_eq!(value(&after, "keygate_store_pubsub_subscribed"), Some(1.0), "subscribed to Redis: {after}");
    assert!(value(&after, "keygate_usage_flush_failures_total").is_some(), "{after}");
}

#[tokio::test]
async fn a_request_is_in_flight_from_its_arrival_until_its_answer_ends() {
    let (upstream, arrived, release) = common::upstream::Upstream::gated().await;
    let toml = format!(
        "[upstream.slow]\ntargets = [\"{}\"]\n\n[[route]]\npath = \"/slow\"\nupstream = \"slow\"\npublic = true\n{}",
        upstream.url(),
        admin_section()
    );
    let (gateway, admin) = common::admin::start(&toml).await;
    let in_flight = |text: &str| value(text, "keygate_requests_in_flight");
    let idle = in_flight(&scrape(&admin, None).await.text()).expect("the gauge is there");

    let url = gateway.url("/slow");
    let held = tokio::spawn(async move {
        send(&http1_client(), Request::get(url).body(Full::new(Bytes::new())).unwrap()).await
    });
    arrived.notified().await;
    let during = in_flight(&scrape(&admin, None).await.text()).expect("gauge");
    assert_eq!(during, idle + 1.0, "the held request is in flight");
    release.add_permits(1);
    let answer = held.await.unwrap();
    assert_eq!(answer.text(), "finished");
    // The body ended with the answer read: the meter is dropped right after.
    common::wait::poll_until(std::time::Duration::from_secs(5), "the request leaves the gauge", || async {
        in_flight(&scrape(&admin, None).await.text()) == Some(idle)
    })
    .await;
}
