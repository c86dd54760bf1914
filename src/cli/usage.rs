//! `keygate usage`: usage read from Redis, as a table (stdout) or `--json`
//! (the [`UsageReport`] the admin API also serves).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Args;
use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::StoreArgs;
use super::exit::Exit;
use super::table::Align;
use crate::config::Config;
use crate::usage::query::{Since, client_flag, since_flag};
use crate::usage::{self, Counts, Granularity, UsageQuery, UsageReport};

#[derive(Debug, Args)]
pub struct UsageArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Only this client (`_anonymous`: requests without a valid key).
    #[arg(long, value_parser = client_flag)]
    pub client: Option<String>,
    /// Start of the range: a duration back from now (1h, 7d) or a UTC date
    /// or time (2026-11-01, 2026-11-01T12:00:00Z).
    #[arg(long, default_value = "24h", value_name = "1h|DATE", value_parser = since_flag)]
    pub since: Since,
    /// Bucket size of the rows.
    #[arg(long, default_value = "hour", value_name = "minute|hour|day")]
    pub by: Granularity,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `keygate usage`: reads the report from the store's Redis and prints it.
pub async fn run(args: UsageArgs, config: &Config) -> ExitCode {
    // The same usage error (exit 2) as `keys audit` on the file store.
    let Some(target) = super::redis_target(config) else {
        eprintln!("error: {}", super::keys::CliError::NeedsRedis("usage"));
        return Exit::Usage.into();
    };
    let now = Timestamp::now();
    let since = match args.since.resolve(now) {
        Ok(since) => since,
        Err(why) => {
            eprintln!("error: --since: {why}");
            return Exit::Usage.into();
        }
    };
    let query = UsageQuery { client: args.client, since, until: now, by: args.by };
    let report = match usage::connect_endpoint(&target.endpoint, &target.tls) {
        Ok(mut conn) => usage::query(&mut conn, &target.prefix, &query).await,
        Err(error) => Err(error),
    };
    let report = match report {
        Ok(report) => report,
        Err(usage::UsageError::Invalid(why)) => {
            eprintln!("error: {why}");
            return Exit::Usage.into();
        }
        Err(error) => {
            eprintln!("error: cannot read usage: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = io::stdout().lock();
    let printed = if args.json { print_json(&report, &mut out) } else { print_table(&report, &mut out) };
    match printed {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: cannot write output: {error}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(report: &UsageReport, out: &mut impl Write) -> io::Result<()> {
    serde_json::to_writer(&mut *out, report).map_err(io::Error::other)?;
    writeln!(out)
}

const HEADER: [&str; 14] = [
    "BUCKET",
    "CLIENT",
    "REQUESTS",
    "2XX",
    "3XX",
    "4XX",
    "5XX",
    "401",
    "403",
    "429",
    "CREDITS",
    "BYTES_IN",
    "BYTES_OUT",
    "AVG_UPSTREAM",
];

/// One row per client and bucket, then a `TOTAL` row (client `*`).
pub fn print_table(report: &UsageReport, out: &mut impl Write) -> io::Result<()> {
    let mut rows: Vec<Vec<String>> = Vec::new();
    for client in &report.clients {
        for bucket in &client.buckets {
            rows.push(row(bucket_label(report.by, bucket.start), &client.client, &bucket.counts).into());
        }
    }
    rows.push(row("TOTAL".to_owned(), "*", &report.totals).into());
    // Text left, numbers right.
    let mut align = [Align::Right; HEADER.len()];
    align[..2].fill(Align::Left);
    super::table::write(out, &HEADER, &rows, &align)
}

fn row(bucket: String, client: &str, c: &Counts) -> [String; 14] {
    let latency =
        c.mean_latency_us().map_or_else(|| "-".to_owned(), |us| format!("{:.1}ms", us as f64 / 1000.0));
    [
        bucket,
        client.to_owned(),
        c.requests.to_string(),
        c.status_2xx.to_string(),
        c.status_3xx.to_string(),
        c.status_4xx.to_string(),
        c.status_5xx.to_string(),
        c.refused_401.to_string(),
        c.refused_403.to_string(),
        (c.refused_429_rate + c.refused_429_quota + c.refused_429_credits).to_string(),
        c.credits.to_string(),
        c.bytes_in.to_string(),
        c.bytes_out.to_string(),
        latency,
    ]
}

fn bucket_label(by: Granularity, start: Timestamp) -> String {
    let format = match by {
        Granularity::Minute | Granularity::Hour => "%Y-%m-%d %H:%M",
        Granularity::Day => "%Y-%m-%d",
    };
    start.to_zoned(TimeZone::UTC).strftime(format).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_bucket_and_a_total() {
        let start: Timestamp = "2026-11-24T12:00:00Z".parse().unwrap();
        let counts = Counts {
            requests: 7,
            status_2xx: 7,
            upstream_requests: 2,
            upstream_latency_us: 3000,
            ..Counts::default()
        };
        let report = UsageReport {
            since: start,
            until: start,
            by: Granularity::Hour,
            totals: counts,
            clients: vec![usage::query::ClientUsage {
                client: "acme".into(),
                totals: counts,
                keys: Default::default(),
                routes: Default::default(),
                buckets: vec![usage::query::BucketUsage {
                    start,
                    counts,
                    route_requests: Default::default(),
                }],
            }],
        };
        let mut out = Vec::new();
        print_table(&report, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("BUCKET") && lines[0].ends_with("AVG_UPSTREAM"), "{text}");
        assert!(lines[1].starts_with("2026-11-24 12:00  acme") && lines[1].ends_with("1.5ms"), "{text}");
        assert!(lines[2].starts_with("TOTAL"), "{text}");
    }
}
