//! The `process_*` metrics every Prometheus client library exports (CPU
//! seconds, resident and virtual memory, open and maximum file descriptors,
//! start time), read from `/proc/self` when `/metrics` is scraped, so they
//! cost nothing between scrapes. Written as OpenMetrics text (they are not
//! under the `keygate_` prefix of the registry, so that dashboards made for
//! any process work). Off Linux, or if `/proc` cannot be read, a family is
//! left out rather than reported as zero.

use std::fmt::Write as _;

/// `/proc/<pid>/stat` counts CPU time in clock ticks of `USER_HZ`, which
/// the kernel fixes at 100 for user space on every architecture.
const USER_HZ: f64 = 100.0;

/// The process families, OpenMetrics text (no `# EOF`).
pub fn render() -> String {
    let mut out = String::new();
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // Fields after the command (which may hold spaces): state is field 3.
    let fields: Vec<&str> = stat
        .as_deref()
        .and_then(|s| s.rsplit_once(')'))
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15, starttime 22 (1-based; the
    // slice starts at field 3).
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        let seconds = (utime + stime) as f64 / USER_HZ;
        family(
            &mut out,
            "process_cpu_seconds",
            "counter",
            "Total user and system CPU time spent in seconds.",
        );
        let _ = writeln!(out, "process_cpu_seconds_total {seconds}");
    }
    if let Some(start) = field(22).zip(boot_time()).map(|(ticks, boot)| boot + ticks as f64 / USER_HZ) {
        family(
            &mut out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
        );
        let _ = writeln!(out, "process_start_time_seconds {start}");
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    if let Some(rss) = kib("VmRSS:") {
        family(&mut out, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
        let _ = writeln!(out, "process_resident_memory_bytes {}", rss * 1024);
    }
    if let Some(vsize) = kib("VmSize:") {
        family(&mut out, "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.");
        let _ = writeln!(out, "process_virtual_memory_bytes {}", vsize * 1024);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        // The listing's own descriptor is among them; as other libraries, counted.
        family(&mut out, "process_open_fds", "gauge", "Number of open file descriptors.");
        let _ = writeln!(out, "process_open_fds {}", fds.count());
    }
    if let Ok((soft, _hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        family(&mut out, "process_max_fds", "gauge", "Maximum number of open file descriptors.");
        let _ = writeln!(out, "process_max_fds {soft}");
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// When the machine booted (Unix seconds), from `/proc/stat`'s `btime`.
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_families_are_read_on_linux() {
        let text = super::render();
        let value = |name: &str| -> f64 {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name}: {text}"));
            line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
        };
        assert!(value("process_resident_memory_bytes") > 1024.0 * 1024.0, "{text}");
        assert!(value("process_open_fds") >= 3.0, "{text}");
        assert!(value("process_max_fds") >= value("process_open_fds"), "{text}");
        let now = jiff::Timestamp::now().as_second() as f64;
        let started = value("process_start_time_seconds");
        assert!(started <= now + 1.0 && started > now - 86400.0 * 365.0, "{started} vs {now}");
        assert!(value("process_cpu_seconds_total") >= 0.0);
        assert!(
            text.contains("# TYPE process_cpu_seconds counter"),
            "OpenMetrics names the family without _total"
        );
    }
}
