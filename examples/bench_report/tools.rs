//! Readers of what the load tools and tollgate print, each from the text as it was written:
//! h2load's summary and its per-request log, redis-benchmark's CSV, pgbench's summary, the
//! `BENCH` line of `examples/bench/wrk-report.lua`, tollgate's `/metrics`, and a process's
//! `/proc/PID/stat` and `/proc/PID/status`.

/// One h2load process's summary: its `finished in`, `requests:` and `status codes:` lines.
/// Missing lines count as zero, so a run that did nothing shows as one that finished nothing.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct H2loadSummary {
    /// Requests per second over the process's own run.
    pub rps: f64,
    pub started: u64,
    pub done: u64,
    /// Requests failed, errored or timed out, and answers with a 3xx, 4xx or 5xx status.
    pub errors: u64,
}

pub fn h2load_summary(text: &str) -> H2loadSummary {
    let mut summary = H2loadSummary::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // finished in 3.00s, 16356.33 req/s, 1.23MB/s
            summary.rps += rest
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.replace(',', "").parse::<f64>().ok())
                .unwrap_or(0.0);
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout
            for (count, what) in counts(rest) {
                match what {
                    "started" => summary.started += count,
                    "done" => summary.done += count,
                    "failed" | "errored" | "timeout" => summary.errors += count,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            // status codes: 100 2xx, 0 3xx, 0 4xx, 0 5xx
            for (count, what) in counts(rest) {
                if what != "2xx" {
                    summary.errors += count;
                }
            }
        }
    }
    summary
}

/// `12 total, 10 done` → (12, "total"), (10, "done").
fn counts(text: &str) -> Vec<(u64, &str)> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .chunks(2)
        .filter_map(|pair| match pair {
            [count, what] => Some((count.parse().ok()?, what.trim_end_matches(','))),
            _ => None,
        })
        .collect()
}

/// h2load's `--log-file`: one request a line, tab-separated start (µs since the epoch), HTTP
/// status and time to the end of the response (µs).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct H2loadLog {
    /// Requests whose status was not 200.
    pub not_ok: u64,
    /// Each request's time from start to end of response, in µs, in the log's order.
    pub latencies_us: Vec<u64>,
}

pub fn h2load_log(text: &str) -> H2loadLog {
    let mut log = H2loadLog::default();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let mut fields = line.split('\t');
        let status = fields.nth(1);
        if status != Some("200") {
            log.not_ok += 1;
        }
        if let Some(us) = fields.next().and_then(|v| v.trim().parse().ok()) {
            log.latencies_us.push(us);
        }
    }
    log
}

/// The nearest-rank percentile `q` (0.5 for the median) of sorted values.
pub fn nearest_rank(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let rank = ((q * n as f64) + 0.999_999).floor() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

/// redis-benchmark's `--csv` figure: the `rps` column of its last row.
pub fn redis_benchmark_rps(text: &str) -> Option<f64> {
    text.lines()
        .skip(1)
        .filter_map(|row| row.split("\",\"").nth(1)?.trim_matches('"').parse().ok())
        .last()
}

/// pgbench's `tps = …` figure (its last one).
pub fn pgbench_tps(text: &str) -> Option<f64> {
    text.lines().rev().find_map(|l| {
        l.strip_prefix("tps = ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// What `examples/bench/wrk-report.lua` prints when wrk is done.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WrkReport {
    pub requests: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Connect, read, write and timeout errors, and answers that were not 2xx or 3xx.
    pub errors: u64,
}

/// The `BENCH requests rps p50 p99 p99.9 errors` line of wrk's output.
pub fn wrk_report(text: &str) -> Option<WrkReport> {
    let line = text.lines().find_map(|l| l.strip_prefix("BENCH "))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let [requests, rps, p50, p99, p999, errors] = f.as_slice() else {
        return None;
    };
    Some(WrkReport {
        requests: requests.parse().ok()?,
        rps: rps.parse().ok()?,
        p50_ms: p50.parse().ok()?,
        p99_ms: p99.parse().ok()?,
        p999_ms: p999.parse().ok()?,
        errors: errors.parse().ok()?,
    })
}

/// A process's CPU time so far, user and system, in clock ticks (`/proc/PID/stat`).
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name, in parentheses, may hold spaces: count fields after it. utime and
    // stime are fields 14 and 15, the state (field 3) is the first after the name.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Samples of a Prometheus text page, as `name{labels}` and value, comments left out.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Metrics(Vec<(String, f64)>);

impl Metrics {
    pub fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    let name = f.next()?;
                    Some((name.to_string(), f.next()?.parse().ok()?))
                })
                .collect(),
        )
    }

    /// One sample by its full name with labels; 0 when it is absent.
    pub fn value(&self, name: &str) -> f64 {
        self.0
            .iter()
            .rfind(|(n, _)| n == name)
            .map_or(0.0, |(_, v)| *v)
    }

    /// The samples whose name starts with `prefix` (`tollgate_decisions_total{` for every
    /// series of that counter).
    pub fn series<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0
            .iter()
            .filter(move |(n, _)| n.starts_with(prefix))
            .map(|(n, v)| (n.as_str(), *v))
    }

    pub fn sum(&self, prefix: &str) -> f64 {
        self.series(prefix).map(|(_, v)| v).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/bench/samples/");
        std::fs::read_to_string(format!("{path}{name}")).expect("sample file")
    }

    #[test]
    fn h2load_summary_of_a_clean_run() {
        let s = h2load_summary(&sample("h2load.out"));
        assert_eq!(s.rps, 3916.81);
        assert_eq!((s.started, s.done, s.errors), (200, 200, 0));
    }

    #[test]
    fn h2load_summary_of_a_timed_run() {
        // As the bench runs it (-D): requests still in flight at the end were started, not done.
        let s = h2load_summary(&sample("h2load-timed.out"));
        assert_eq!(s.rps, 7117.0);
        assert_eq!((s.started, s.done, s.errors), (21_383, 21_351, 0));
    }

    #[test]
    fn h2load_summary_counts_failures_and_non_2xx() {
        // HTTP/1.1 404s: each counted failed and 4xx.
        let s = h2load_summary(&sample("h2load-404.out"));
        assert_eq!((s.done, s.errors), (200, 400));
        // Connection refused: failed and errored, none started.
        let s = h2load_summary(&sample("h2load-refused.out"));
        assert_eq!((s.rps, s.started, s.done, s.errors), (0.0, 0, 0, 20));
    }

    #[test]
    fn h2load_summary_of_nothing_is_zero() {
        assert_eq!(h2load_summary(""), H2loadSummary::default());
    }

    #[test]
    fn h2load_log_latencies_and_statuses() {
        let log = h2load_log(&sample("h2load.log"));
        assert_eq!(log.not_ok, 0);
        assert_eq!(log.latencies_us.len(), 200);
        assert_eq!(log.latencies_us[0], 5790);
        let log = h2load_log("1\t200\t10\n2\t404\t20\n3\t-1\t30\n");
        assert_eq!(log.not_ok, 2);
        assert_eq!(log.latencies_us, [10, 20, 30]);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(nearest_rank(&v, 0.5), Some(500));
        assert_eq!(nearest_rank(&v, 0.99), Some(990));
        assert_eq!(nearest_rank(&v, 0.999), Some(999));
        assert_eq!(nearest_rank(&[7], 0.999), Some(7));
        assert_eq!(nearest_rank(&[1, 2, 3], 0.5), Some(2));
        assert_eq!(nearest_rank(&[], 0.5), None);
    }

    #[test]
    fn redis_benchmark_csv() {
        assert_eq!(
            redis_benchmark_rps(&sample("redis-benchmark.csv")),
            Some(15_885.62)
        );
        assert_eq!(redis_benchmark_rps("\"test\",\"rps\"\n"), None);
        assert_eq!(redis_benchmark_rps(""), None);
    }

    #[test]
    fn pgbench_summary() {
        assert_eq!(pgbench_tps(&sample("pgbench.out")), Some(421.370_216));
        assert_eq!(pgbench_tps(&sample("pgbench-failed.out")), None);
    }

    #[test]
    fn wrk_report_line() {
        let w = wrk_report(&sample("wrk.out")).expect("a BENCH line");
        assert_eq!(w.requests, 25_906);
        assert_eq!(w.rps, 12_334.334);
        assert_eq!((w.p50_ms, w.p99_ms, w.p999_ms), (0.252, 21.524, 29.664));
        assert_eq!(w.errors, 0);
        assert_eq!(wrk_report("Running 3s test\n"), None);
        assert_eq!(wrk_report("BENCH 1 2 3\n"), None);
    }

    #[test]
    fn proc_stat_and_status() {
        assert_eq!(cpu_ticks(&sample("proc-stat-before")), Some(1));
        assert_eq!(cpu_ticks(&sample("proc-stat-after")), Some(3 + 2));
        // A name with spaces and parentheses.
        let odd = "7 (a (b) c) S 1 7 7 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0";
        assert_eq!(cpu_ticks(odd), Some(11));
        assert_eq!(cpu_ticks("7 (short) S 1"), None);
        let status = sample("proc-status");
        assert_eq!(status_kib(&status, "VmHWM"), Some(15_780));
        assert_eq!(status_kib(&status, "VmRSS"), Some(15_780));
        assert_eq!(status_kib(&status, "VmSwap"), Some(0));
        assert_eq!(status_kib(&status, "Vm"), None);
    }

    #[test]
    fn metrics_values_and_sums() {
        let m = Metrics::parse(&sample("metrics-after.txt"));
        let ok = r#"tollgate_decisions_total{api="authz",outcome="allow",reason="ok"}"#;
        assert_eq!(m.value(ok), 201.0);
        assert_eq!(m.value("tollgate_key_cache_entries"), 1.0);
        assert_eq!(m.value("tollgate_no_such_metric"), 0.0);
        assert_eq!(m.sum("tollgate_decisions_total{"), 201.0);
        assert_eq!(m.sum("tollgate_backend_errors_total{"), 0.0);
        assert_eq!(m.series("tollgate_fail_open_total{").count(), 2);
        // The histogram's samples are there too, by their full names.
        let count = r#"tollgate_request_duration_seconds_count{api="authz"}"#;
        assert_eq!(m.value(count), 201.0);
    }
}
