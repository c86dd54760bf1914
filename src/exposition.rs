//! The Prometheus text format 0.0.4, from the OpenMetrics text that
//! `prometheus-client` writes (it writes no other): for scrapers that ask
//! for `text/plain; version=0.0.4` (see `metrics::Exposition::negotiate`).
//!
//! The two differ, for what keygate exports, in four ways: OpenMetrics
//! names a counter family without its `_total` suffix (`# TYPE x counter`,
//! samples `x_total`) where 0.0.4 names it with; it has `# UNIT` lines and a
//! closing `# EOF`, which 0.0.4 has not; `_created` samples (none here); and
//! the `unknown` and `info` types, which 0.0.4 calls `untyped` and has not.
//! Samples, labels and escaping are the same.

/// `openmetrics` (one exposition, as `prometheus-client` encodes it) in
/// the 0.0.4 text format.
pub fn to_text_004(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's HELP comes before its TYPE: held until the type says
    // whether the name takes `_total`.
    let mut help: Option<(&str, &str)> = None;
    let mut counters: Vec<&str> = Vec::new();
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush_help(&mut out, help.take(), None);
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => {
                    counters.push(name);
                    (format!("{name}_total"), "counter")
                }
                "unknown" => (name.to_owned(), "untyped"),
                "info" => (format!("{name}_info"), "gauge"),
                other => (name.to_owned(), other),
            };
            flush_help(&mut out, help.take(), Some(&name));
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        flush_help(&mut out, help.take(), None);
        let sample = line.split(['{', ' ']).next().unwrap_or("");
        if counters.iter().any(|c| sample.strip_prefix(c) == Some("_created")) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    flush_help(&mut out, help, None);
    out
}

/// Writes a held `# HELP`, under `renamed` when its type renamed it.
fn flush_help(out: &mut String, help: Option<(&str, &str)>, renamed: Option<&str>) {
    if let Some((name, text)) = help {
        out.push_str(&format!("# HELP {} {text}\n", renamed.unwrap_or(name)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENMETRICS: &str = "\
# HELP keygate_requests Requests answered.
# TYPE keygate_requests counter
keygate_requests_total{route=\"/api\",status=\"200\"} 3
keygate_requests_created{route=\"/api\",status=\"200\"} 1700000000.0
# HELP keygate_connections_open Open connections.
# TYPE keygate_connections_open gauge
keygate_connections_open 2
# HELP keygate_request_duration_seconds Latency.
# TYPE keygate_request_duration_seconds histogram
# UNIT keygate_request_duration_seconds seconds
keygate_request_duration_seconds_sum{route=\"/api\"} 0.5
keygate_request_duration_seconds_count{route=\"/api\"} 3
keygate_request_duration_seconds_bucket{le=\"+Inf\",route=\"/api\"} 3
# HELP keygate_build Build.
# TYPE keygate_build info
keygate_build_info{version=\"0.1.0\"} 1
# EOF
";

    #[test]
    fn counters_take_their_total_name_and_openmetrics_only_lines_go() {
        let text = to_text_004(OPENMETRICS);
        assert_eq!(
            text,
            "\
# HELP keygate_requests_total Requests answered.
# TYPE keygate_requests_total counter
keygate_requests_total{route=\"/api\",status=\"200\"} 3
# HELP keygate_connections_open Open connections.
# TYPE keygate_connections_open gauge
keygate_connections_open 2
# HELP keygate_request_duration_seconds Latency.
# TYPE keygate_request_duration_seconds histogram
keygate_request_duration_seconds_sum{route=\"/api\"} 0.5
keygate_request_duration_seconds_count{route=\"/api\"} 3
keygate_request_duration_seconds_bucket{le=\"+Inf\",route=\"/api\"} 3
# HELP keygate_build_info Build.
# TYPE keygate_build_info gauge
keygate_build_info{version=\"0.1.0\"} 1
"
        );
    }

    #[test]
    fn the_gateways_own_page_converts_with_every_family_typed_and_described() {
        let text = to_text_004(&crate::metrics::Metrics::new().render());
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).expect("a name");
            assert!(text.contains(&format!("# HELP {name} ")), "{name} has no HELP");
            if line.ends_with(" counter") {
                assert!(name.ends_with("_total"), "{line}");
            }
        }
    }
}
