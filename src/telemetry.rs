//! Logs and metrics.
//!
//! Metrics are plain atomic counters rendered in the Prometheus text format on `/metrics`. Their
//! labels come from fixed sets (decision reasons, cache outcomes): never a key, a path or a host.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::config::{LogConfig, LogFormat};
use crate::decision::{Decision, DenyReason};
use crate::keys::cache::CacheOutcome;

/// Sets up `tracing` to standard error, as text or JSON.
pub fn init_logging(config: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
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

/// Every metric tollgate exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Index 0: allowed; 1..: [`DenyReason::ALL`] in order.
    decisions: [Counter; 1 + DenyReason::ALL.len()],
    cache: [Counter; 3],
    pub backend_errors_database: Counter,
    pub backend_errors_limiter: Counter,
    /// Requests allowed because a backend was down and its failure mode is `open`.
    pub fail_open_database: Counter,
    pub fail_open_limiter: Counter,
    /// ShouldRateLimit descriptors by outcome.
    pub rls_ok: Counter,
    pub rls_over_limit: Counter,
    pub rls_shadow: Counter,
    /// Rules reloads by result, and whether the last one failed (the old rules stay in force).
    pub rules_reloads_ok: Counter,
    pub rules_reloads_failed: Counter,
    pub rules_last_reload_failed: std::sync::atomic::AtomicBool,
    pub reqlog_written: Counter,
    pub reqlog_dropped: Counter,
    pub reqlog_failed: Counter,
    pub reqlog_write_errors: Counter,
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
    pub fn render(&self, reqlog_depth: usize, cached_keys: usize) -> String {
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
        out.push_str("# HELP tollgate_key_cache_lookups_total Key lookups by cache outcome.\n");
        out.push_str("# TYPE tollgate_key_cache_lookups_total counter\n");
        for (i, name) in ["hit", "miss", "stale"].iter().enumerate() {
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
        let _ = writeln!(out, "tollgate_key_cache_entries {cached_keys}");
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
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
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
    use super::*;
    use crate::decision::Denial;

    #[test]
    fn renders_decisions_by_reason() {
        let m = Metrics::default();
        m.record_decision(&Decision::Deny(Denial::new(DenyReason::DailyQuotaExceeded)));
        m.record_decision(&Decision::Deny(Denial::new(DenyReason::DailyQuotaExceeded)));
        m.record_cache(CacheOutcome::Miss);
        let text = m.render(3, 5);
        assert!(text.contains(
            "tollgate_decisions_total{api=\"authz\",outcome=\"deny\",reason=\"daily_quota_exceeded\"} 2\n"
        ), "{text}");
        assert!(text.contains("tollgate_key_cache_lookups_total{outcome=\"miss\"} 1\n"));
        assert!(text.contains("tollgate_request_log_queue_depth 3\n"));
        assert!(text.contains("tollgate_key_cache_entries 5\n"));
        assert_eq!(m.decisions("daily_quota_exceeded"), 2);
    }
}
