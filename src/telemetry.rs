//! Logs and metrics.
//!
//! Metrics are plain atomic counters rendered in the Prometheus text format on `/metrics`. Their
//! labels come from fixed sets (decision reasons, cache outcomes): never a key, a path or a host.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::config::{LogConfig, LogFormat};
use crate::decision::{Decision, DenyReason};
use crate::keys::cache::{CacheOutcome, CacheStats};

/// Sets up `tracing` to standard error, as text or JSON.
pub fn init_logging(config: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Text => builder.fmt_fields(one_line_fields()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// How the text format writes an event's fields: as the default format does (`message`, then
/// `name=value` pairs), with line breaks and other control characters in values escaped, so
/// every event is one line and no value (an error from a server, a client's header) can forge
/// a log line of its own. The JSON format escapes them already.
fn one_line_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        if field.name() != "message" {
            write!(w, "{field}=")?;
        }
        write!(OneLine(w), "{value:?}")
    })
    .delimited(" ")
}

/// Writes through to `W`, escaping control characters (`\n` for a newline, `\u{1b}` for ESC).
struct OneLine<'a, W>(&'a mut W);

impl<W: std::fmt::Write> std::fmt::Write for OneLine<'_, W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(|c: char| c.is_control()) {
            self.0.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().expect("a control character");
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "{}", c.escape_unicode())?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn sub(&self, n: u64) {
        self.0.fetch_sub(n, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Upper bounds (seconds) of the latency histograms' buckets: 50 µs to 2.5 s.
const BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    2.5,
];

/// A latency histogram with fixed buckets: a few atomic adds per observation, no lock.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last slot is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Every metric tollgate exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Index 0: allowed; 1..: [`DenyReason::ALL`] in order.
    decisions: [Counter; 1 + DenyReason::ALL.len()],
    cache: [Counter; 4],
    pub backend_errors_database: Counter,
    pub backend_errors_limiter: Counter,
    /// Requests allowed because a backend was down and its failure mode is `open`.
    pub fail_open_database: Counter,
    pub fail_open_limiter: Counter,
    /// ShouldRateLimit descriptors by outcome.
    pub rls_ok: Counter,
    pub rls_over_limit: Counter,
    pub rls_shadow: Counter,
    /// ShouldRateLimit calls by answer.
    pub rls_requests_ok: Counter,
    pub rls_requests_over_limit: Counter,
    pub rls_requests_unavailable: Counter,
    /// How long tollgate took to answer, per API.
    pub check_duration: Histogram,
    pub rls_duration: Histogram,
    /// How long backend calls took: the quota statement, and a window step.
    pub database_duration: Histogram,
    pub limiter_duration: Histogram,
    /// In-process window counters held, and those dropped to stay under `limits.max_counters`
    /// while they still mattered.
    pub limiter_counters: Gauge,
    pub limiter_counters_evicted: Counter,
    /// Rules reloads by result, and whether the last one failed (the old rules stay in force).
    pub rules_reloads_ok: Counter,
    pub rules_reloads_failed: Counter,
    pub rules_last_reload_failed: std::sync::atomic::AtomicBool,
    /// Envoy access log entries: rows completed, entries whose row never appeared, dropped.
    pub access_log_completed: Counter,
    pub access_log_unmatched: Counter,
    pub access_log_dropped: Counter,
    /// Requests whose quota was given back because the upstream answered 5xx.
    pub quota_refunds: Counter,
    /// gRPC TLS: handshakes refused or not finished in time, certificate renewals by result,
    /// whether the last one failed (the pair before it still served), and the served
    /// certificate's notAfter (Unix seconds; 0 without TLS).
    pub grpc_tls_handshake_failures: Counter,
    pub grpc_tls_reloads_ok: Counter,
    pub grpc_tls_reloads_failed: Counter,
    pub grpc_tls_last_reload_failed: std::sync::atomic::AtomicBool,
    pub grpc_tls_not_after: std::sync::atomic::AtomicI64,
    /// Admin port TLS (the gRPC port's certificate): handshakes refused or not finished in time.
    pub admin_tls_handshake_failures: Counter,
    pub reqlog_written: Counter,
    pub reqlog_dropped: Counter,
    pub reqlog_failed: Counter,
    pub reqlog_write_errors: Counter,
    /// Request log rows dropped because the database rejected them.
    pub reqlog_rejected: Counter,
    /// Checks whose caller stopped waiting (Envoy's timeout, a disconnect) before the answer:
    /// not charged, logged as `cancelled`.
    pub checks_cancelled: Counter,
    /// Admin API calls by operation, transport and answer.
    pub admin: AdminCalls,
    /// gRPC connections open on each serving thread (`grpc::serving`), set when they start.
    pub grpc_connections: std::sync::OnceLock<Vec<std::sync::Arc<std::sync::atomic::AtomicUsize>>>,
}

/// Admin API calls counted by (operation, transport, code). Every label comes from a fixed set
/// (the proto's RPC names or `unknown`, `grpc`/`rest`, gRPC code names), so the series are
/// bounded; the admin API is not a hot path, so one lock is enough.
#[derive(Debug, Default)]
pub struct AdminCalls(std::sync::Mutex<std::collections::BTreeMap<AdminCallLabels, u64>>);

/// (operation, transport, code).
pub type AdminCallLabels = (&'static str, &'static str, &'static str);

impl AdminCalls {
    pub fn inc(&self, labels: AdminCallLabels) {
        let mut calls = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *calls.entry(labels).or_default() += 1;
    }

    /// Calls counted with these labels.
    pub fn get(&self, labels: AdminCallLabels) -> u64 {
        let calls = self.0.lock().unwrap_or_else(|e| e.into_inner());
        calls.get(&labels).copied().unwrap_or_default()
    }

    fn render(&self, out: &mut String) {
        out.push_str("# HELP tollgate_admin_requests_total Admin API calls by operation, transport and answer.\n");
        out.push_str("# TYPE tollgate_admin_requests_total counter\n");
        let calls = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for ((method, transport, code), n) in calls.iter() {
            let _ = writeln!(
                out,
                "tollgate_admin_requests_total{{method=\"{method}\",transport=\"{transport}\",code=\"{code}\"}} {n}"
            );
        }
    }
}

impl Metrics {
    pub fn record_decision(&self, d: &Decision) {
        let i = match d {
            Decision::Allow(_) => 0,
            Decision::Deny(d) => {
                1 + DenyReason::ALL
                    .iter()
                    .position(|r| *r == d.reason)
                    .unwrap_or(0)
            }
        };
        self.decisions[i].inc();
    }

    pub fn record_cache(&self, outcome: CacheOutcome) {
        self.cache[outcome as usize].inc();
    }

    /// Decisions so far with this reason code (`ok` for allowed).
    pub fn decisions(&self, code: &str) -> u64 {
        if code == "ok" {
            return self.decisions[0].get();
        }
        DenyReason::ALL
            .iter()
            .position(|r| r.code() == code)
            .map(|i| self.decisions[1 + i].get())
            .unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn render(&self, reqlog_depth: usize, cache: CacheStats) -> String {
        let mut out = String::with_capacity(2048);
        out.push_str("# HELP tollgate_decisions_total Check decisions by outcome and reason.\n");
        out.push_str("# TYPE tollgate_decisions_total counter\n");
        let _ = writeln!(
            out,
            "tollgate_decisions_total{{api=\"authz\",outcome=\"allow\",reason=\"ok\"}} {}",
            self.decisions[0].get()
        );
        for (i, r) in DenyReason::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "tollgate_decisions_total{{api=\"authz\",outcome=\"deny\",reason=\"{}\"}} {}",
                r.code(),
                self.decisions[1 + i].get()
            );
        }
        for (outcome, reason, c) in [
            ("allow", "ok", &self.rls_requests_ok),
            ("deny", "rate_limited", &self.rls_requests_over_limit),
            (
                "error",
                "backend_unavailable",
                &self.rls_requests_unavailable,
            ),
        ] {
            let _ = writeln!(
                out,
                "tollgate_decisions_total{{api=\"ratelimit\",outcome=\"{outcome}\",reason=\"{reason}\"}} {}",
                c.get()
            );
        }
        out.push_str(
            "# HELP tollgate_request_duration_seconds Time from request to answer, by API.\n",
        );
        out.push_str("# TYPE tollgate_request_duration_seconds histogram\n");
        self.check_duration.render(
            &mut out,
            "tollgate_request_duration_seconds",
            "api=\"authz\"",
        );
        self.rls_duration.render(
            &mut out,
            "tollgate_request_duration_seconds",
            "api=\"ratelimit\"",
        );
        out.push_str("# HELP tollgate_backend_duration_seconds Time of one backend call (quota statement, window step).\n");
        out.push_str("# TYPE tollgate_backend_duration_seconds histogram\n");
        self.database_duration.render(
            &mut out,
            "tollgate_backend_duration_seconds",
            "backend=\"database\"",
        );
        self.limiter_duration.render(
            &mut out,
            "tollgate_backend_duration_seconds",
            "backend=\"limiter\"",
        );
        out.push_str(
            "# HELP tollgate_ratelimit_descriptors_total ShouldRateLimit descriptors by outcome.\n",
        );
        out.push_str("# TYPE tollgate_ratelimit_descriptors_total counter\n");
        for (outcome, c) in [
            ("ok", &self.rls_ok),
            ("over_limit", &self.rls_over_limit),
            ("shadow", &self.rls_shadow),
        ] {
            let _ = writeln!(
                out,
                "tollgate_ratelimit_descriptors_total{{outcome=\"{outcome}\"}} {}",
                c.get()
            );
        }
        out.push_str("# HELP tollgate_access_log_entries_total Envoy access log entries by what became of them.\n");
        out.push_str("# TYPE tollgate_access_log_entries_total counter\n");
        for (result, c) in [
            ("completed", &self.access_log_completed),
            ("unmatched", &self.access_log_unmatched),
            ("dropped", &self.access_log_dropped),
        ] {
            let _ = writeln!(
                out,
                "tollgate_access_log_entries_total{{result=\"{result}\"}} {}",
                c.get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_quota_refunds_total Requests whose quota was given back (upstream 5xx, key with refund_5xx).\n\
             # TYPE tollgate_quota_refunds_total counter\ntollgate_quota_refunds_total {}",
            self.quota_refunds.get()
        );
        out.push_str("# HELP tollgate_rules_reloads_total Rate limit rules reloads by result.\n");
        out.push_str("# TYPE tollgate_rules_reloads_total counter\n");
        let _ = writeln!(
            out,
            "tollgate_rules_reloads_total{{result=\"ok\"}} {}\ntollgate_rules_reloads_total{{result=\"error\"}} {}",
            self.rules_reloads_ok.get(),
            self.rules_reloads_failed.get()
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_rules_last_reload_failed Whether the last reload failed, leaving older rules in force.\n\
             # TYPE tollgate_rules_last_reload_failed gauge\ntollgate_rules_last_reload_failed {}",
            u8::from(self.rules_last_reload_failed.load(Relaxed))
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_grpc_tls_handshake_failures_total TLS handshakes on the gRPC port refused or not finished in time.\n\
             # TYPE tollgate_grpc_tls_handshake_failures_total counter\ntollgate_grpc_tls_handshake_failures_total {}",
            self.grpc_tls_handshake_failures.get()
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_admin_tls_handshake_failures_total TLS handshakes on the admin port refused or not finished in time.\n\
             # TYPE tollgate_admin_tls_handshake_failures_total counter\ntollgate_admin_tls_handshake_failures_total {}",
            self.admin_tls_handshake_failures.get()
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_grpc_tls_reloads_total Renewed gRPC TLS certificates by result.\n\
             # TYPE tollgate_grpc_tls_reloads_total counter\n\
             tollgate_grpc_tls_reloads_total{{result=\"ok\"}} {}\ntollgate_grpc_tls_reloads_total{{result=\"error\"}} {}",
            self.grpc_tls_reloads_ok.get(),
            self.grpc_tls_reloads_failed.get()
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_grpc_tls_last_reload_failed Whether the last renewal did not load, leaving the certificate before it served.\n\
             # TYPE tollgate_grpc_tls_last_reload_failed gauge\ntollgate_grpc_tls_last_reload_failed {}",
            u8::from(self.grpc_tls_last_reload_failed.load(Relaxed))
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_grpc_tls_certificate_not_after_seconds When the served gRPC certificate expires (Unix time; 0 without TLS).\n\
             # TYPE tollgate_grpc_tls_certificate_not_after_seconds gauge\ntollgate_grpc_tls_certificate_not_after_seconds {}",
            self.grpc_tls_not_after.load(Relaxed)
        );
        out.push_str("# HELP tollgate_key_cache_lookups_total Key lookups by cache outcome.\n");
        out.push_str("# TYPE tollgate_key_cache_lookups_total counter\n");
        for (i, name) in ["hit", "miss", "stale", "shared"].iter().enumerate() {
            let _ = writeln!(
                out,
                "tollgate_key_cache_lookups_total{{outcome=\"{name}\"}} {}",
                self.cache[i].get()
            );
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_key_cache_entries Keys cached in memory."
        );
        let _ = writeln!(out, "# TYPE tollgate_key_cache_entries gauge");
        let _ = writeln!(out, "tollgate_key_cache_entries {}", cache.entries);
        let _ = writeln!(
            out,
            "# HELP tollgate_key_cache_evictions_total Cached keys dropped to make room for others.\n\
             # TYPE tollgate_key_cache_evictions_total counter\ntollgate_key_cache_evictions_total {}",
            cache.evictions
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_limiter_counters Rate-limit window counters held in this process (0 with Redis).\n\
             # TYPE tollgate_limiter_counters gauge\ntollgate_limiter_counters {}",
            self.limiter_counters.get()
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_limiter_counters_evicted_total In-process window counters dropped while still in use, to stay within limits.max_counters.\n\
             # TYPE tollgate_limiter_counters_evicted_total counter\ntollgate_limiter_counters_evicted_total {}",
            self.limiter_counters_evicted.get()
        );
        out.push_str(
            "# HELP tollgate_grpc_connections gRPC connections open, per serving thread \
             (grpc.serving_threads; one \"0\" when that is 0).\n\
             # TYPE tollgate_grpc_connections gauge\n",
        );
        for (thread, open) in self
            .grpc_connections
            .get()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let _ = writeln!(
                out,
                "tollgate_grpc_connections{{thread=\"{thread}\"}} {}",
                open.load(Relaxed)
            );
        }
        out.push_str("# HELP tollgate_backend_errors_total Failed calls to a backend.\n");
        out.push_str("# TYPE tollgate_backend_errors_total counter\n");
        let _ = writeln!(
            out,
            "tollgate_backend_errors_total{{backend=\"database\"}} {}",
            self.backend_errors_database.get()
        );
        let _ = writeln!(
            out,
            "tollgate_backend_errors_total{{backend=\"limiter\"}} {}",
            self.backend_errors_limiter.get()
        );
        out.push_str("# HELP tollgate_fail_open_total Requests allowed unchecked because a backend was down (failure_mode: open).\n");
        out.push_str("# TYPE tollgate_fail_open_total counter\n");
        let _ = writeln!(
            out,
            "tollgate_fail_open_total{{backend=\"database\"}} {}",
            self.fail_open_database.get()
        );
        let _ = writeln!(
            out,
            "tollgate_fail_open_total{{backend=\"limiter\"}} {}",
            self.fail_open_limiter.get()
        );
        for (name, help, value) in [
            (
                "tollgate_request_log_written_total",
                "Request log rows written.",
                self.reqlog_written.get(),
            ),
            (
                "tollgate_request_log_dropped_total",
                "Request log rows dropped because the queue was full.",
                self.reqlog_dropped.get(),
            ),
            (
                "tollgate_request_log_failed_total",
                "Request log rows that could not be written at shutdown.",
                self.reqlog_failed.get(),
            ),
            (
                "tollgate_request_log_write_errors_total",
                "Failed request log batch writes (each retried).",
                self.reqlog_write_errors.get(),
            ),
            (
                "tollgate_request_log_rejected_total",
                "Request log rows dropped because the database rejected them.",
                self.reqlog_rejected.get(),
            ),
            (
                "tollgate_checks_cancelled_total",
                "Checks whose caller stopped waiting before the answer (not charged).",
                self.checks_cancelled.get(),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        self.admin.render(&mut out);
        let _ = writeln!(
            out,
            "# HELP tollgate_request_log_queue_depth Rows waiting to be written.\n\
             # TYPE tollgate_request_log_queue_depth gauge\ntollgate_request_log_queue_depth {reqlog_depth}"
        );
        out
    }
}

#[cfg(test)]
mod tests {

    /// A value with line breaks, in an error or in the message, stays on its event's line.
    #[test]
    fn text_log_lines_are_one_per_event() {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .fmt_fields(one_line_fields())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let error = "server said:\nERROR forged line";
            tracing::warn!(error = %error, path = "/a\r\nb", "failed\nagain\u{1b}[31m");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.matches('\n').count(), 1, "{out}");
        assert!(out.contains("failed\\nagain\\u{1b}[31m"), "{out}");
        assert!(
            out.contains("error=server said:\\nERROR forged line"),
            "{out}"
        );
        assert!(out.contains(r#"path="/a\r\nb""#), "{out}");
    }
    use super::*;
    use crate::decision::Denial;

    #[test]
    fn renders_decisions_by_reason() {
        let m = Metrics::default();
        m.record_decision(&Decision::Deny(Denial::new(DenyReason::DailyQuotaExceeded)));
        m.record_decision(&Decision::Deny(Denial::new(DenyReason::DailyQuotaExceeded)));
        m.record_cache(CacheOutcome::Miss);
        m.record_cache(CacheOutcome::Shared);
        let text = m.render(
            3,
            CacheStats {
                entries: 5,
                evictions: 7,
            },
        );
        assert!(text.contains(
            "tollgate_decisions_total{api=\"authz\",outcome=\"deny\",reason=\"daily_quota_exceeded\"} 2\n"
        ), "{text}");
        assert!(text.contains("tollgate_key_cache_lookups_total{outcome=\"miss\"} 1\n"));
        assert!(text.contains("tollgate_request_log_queue_depth 3\n"));
        assert!(text.contains("tollgate_key_cache_lookups_total{outcome=\"shared\"} 1\n"));
        assert!(text.contains("tollgate_key_cache_entries 5\n"));
        assert!(text.contains("tollgate_key_cache_evictions_total 7\n"));
        m.limiter_counters.add(3);
        m.limiter_counters.sub(1);
        m.limiter_counters_evicted.inc();
        let text = m.render(0, CacheStats::default());
        assert!(text.contains("\ntollgate_limiter_counters 2\n"), "{text}");
        assert!(
            text.contains("\ntollgate_limiter_counters_evicted_total 1\n"),
            "{text}"
        );
        assert_eq!(m.decisions("daily_quota_exceeded"), 2);
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let m = Metrics::default();
        m.check_duration
            .observe(std::time::Duration::from_micros(40));
        m.check_duration
            .observe(std::time::Duration::from_micros(300));
        m.check_duration.observe(std::time::Duration::from_secs(5));
        let text = m.render(0, CacheStats::default());
        let line = |l: &str| assert!(text.contains(l), "missing {l:?} in\n{text}");
        line("tollgate_request_duration_seconds_bucket{api=\"authz\",le=\"0.00005\"} 1\n");
        line("tollgate_request_duration_seconds_bucket{api=\"authz\",le=\"0.00025\"} 1\n");
        line("tollgate_request_duration_seconds_bucket{api=\"authz\",le=\"0.0005\"} 2\n");
        line("tollgate_request_duration_seconds_bucket{api=\"authz\",le=\"2.5\"} 2\n");
        line("tollgate_request_duration_seconds_bucket{api=\"authz\",le=\"+Inf\"} 3\n");
        line("tollgate_request_duration_seconds_count{api=\"authz\"} 3\n");
        line("tollgate_request_duration_seconds_sum{api=\"authz\"} 5.00034\n");
        line("tollgate_request_duration_seconds_count{api=\"ratelimit\"} 0\n");
    }
}
