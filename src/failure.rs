//! What a request does when a backend fails, decided and recorded in one place (DESIGN rule 7).
//!
//! Each backend (the database, the window limiter) has one [`FailurePolicy`], shared by Check
//! and ShouldRateLimit. On every failure it counts the error (`tollgate_backend_errors_total`)
//! and, when its `failure_mode` is `open`, the request let through (`tollgate_fail_open_total`);
//! it logs at most one line per [`LogEvery::INTERVAL`] for its backend, however many requests
//! fail, saying how many failures the line stands for and whether retrying can help; and it
//! answers a [`Verdict`]. What a verdict means for the request (allowed uncounted, no limit,
//! a 503, gRPC `UNAVAILABLE`) is the caller's to say.

use std::fmt::Display;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::limiter::LimiterError;
use crate::setting::FailureMode;
use crate::store::StoreError;
use crate::telemetry::{Counter, Metrics};

/// A backend requests depend on; its name is the `backend` label of its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Keys and quotas (`database.failure_mode`).
    Database,
    /// Rate-limit windows (`redis.failure_mode`).
    Limiter,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Database => "database",
            Backend::Limiter => "limiter",
        }
    }
}

/// A backend's error, as the policy needs to see it.
pub trait BackendError: Display {
    /// Whether asking again later may succeed (the backend is away or busy), as opposed to a
    /// bug or a misconfiguration that retrying cannot fix.
    fn is_transient(&self) -> bool;
}

impl BackendError for LimiterError {
    fn is_transient(&self) -> bool {
        LimiterError::is_transient(self)
    }
}

impl BackendError for StoreError {
    fn is_transient(&self) -> bool {
        StoreError::is_transient(self)
    }
}

/// What to do with a request whose backend could not answer for it.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go on without the backend (`failure_mode: open`).
    Open,
    /// Refuse the request (`failure_mode: closed`, or a step no mode lets a request skip).
    Closed,
}

/// One backend's failure mode, the counters its failures bump, and its log line's pace.
#[derive(Debug)]
pub struct FailurePolicy {
    backend: Backend,
    mode: FailureMode,
    metrics: Arc<Metrics>,
    log: LogEvery,
}

impl FailurePolicy {
    pub fn new(backend: Backend, mode: FailureMode, metrics: Arc<Metrics>) -> Self {
        Self {
            backend,
            mode,
            metrics,
            log: LogEvery::default(),
        }
    }

    /// `step` (what the request asked the backend: `"quota update"`, …) failed with `error`:
    /// counts it, logs when a line is due, and says what the failure mode makes of the request.
    pub fn on_error(&self, step: &'static str, error: &dyn BackendError) -> Verdict {
        let verdict = match self.mode {
            FailureMode::Open => Verdict::Open,
            FailureMode::Closed => Verdict::Closed,
        };
        self.record(step, error, verdict, Instant::now());
        verdict
    }

    /// A step no failure mode lets a request skip failed (a key that could not be looked up
    /// is not known to be valid): counted and logged like any failure; the request is refused.
    pub fn on_error_closed(&self, step: &'static str, error: &dyn BackendError) {
        self.record(step, error, Verdict::Closed, Instant::now());
    }

    /// Counts the failure and logs it if a line is due at `now`; returns whether it logged.
    fn record(
        &self,
        step: &'static str,
        error: &dyn BackendError,
        verdict: Verdict,
        now: Instant,
    ) -> bool {
        let (errors, fail_open) = self.counters();
        errors.inc();
        if verdict == Verdict::Open {
            fail_open.inc();
        }
        let Some(suppressed) = self.log.due_at(now) else {
            return false;
        };
        let backend = self.backend.as_str();
        let transient = error.is_transient();
        let failure_mode = self.mode;
        let outcome = match verdict {
            Verdict::Open => "requests go on without it (failure_mode open)",
            Verdict::Closed => "requests are refused",
        };
        if transient {
            tracing::warn!(backend, step, %error, transient, ?failure_mode, suppressed,
                "backend unavailable; {outcome}");
        } else {
            tracing::error!(backend, step, %error, transient, ?failure_mode, suppressed,
                "backend failed in a way retrying will not fix; {outcome}");
        }
        true
    }

    /// This backend's `tollgate_backend_errors_total` and `tollgate_fail_open_total`.
    fn counters(&self) -> (&Counter, &Counter) {
        let m = &self.metrics;
        match self.backend {
            Backend::Database => (&m.backend_errors_database, &m.fail_open_database),
            Backend::Limiter => (&m.backend_errors_limiter, &m.fail_open_limiter),
        }
    }
}

/// The policy of each backend, built once and handed to both services.
#[derive(Debug, Clone)]
pub struct FailurePolicies {
    pub database: Arc<FailurePolicy>,
    pub limiter: Arc<FailurePolicy>,
}

impl FailurePolicies {
    pub fn new(database: FailureMode, limiter: FailureMode, metrics: Arc<Metrics>) -> Self {
        Self {
            database: Arc::new(FailurePolicy::new(
                Backend::Database,
                database,
                metrics.clone(),
            )),
            limiter: Arc::new(FailurePolicy::new(Backend::Limiter, limiter, metrics)),
        }
    }
}

/// Lets a log line through at most once per interval, so an outage (or a shadow-mode limit a
/// client keeps going over) logs a line every few seconds, not one per request. Lock-free: an
/// atomic load per call, and a compare-exchange when a line is due.
#[derive(Debug)]
pub struct LogEvery {
    interval_ms: u64,
    origin: Instant,
    /// Milliseconds after `origin` from which the next line may go out.
    next_ms: AtomicU64,
    /// Lines held back since the last one went out.
    held: AtomicU64,
}

impl LogEvery {
    pub const INTERVAL: Duration = Duration::from_secs(10);

    pub fn new(interval: Duration) -> Self {
        Self {
            interval_ms: millis(interval),
            origin: Instant::now(),
            next_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// Whether a line may go out now: `Some(held)`, with the number of lines held back since the
    /// last one, or `None` (and this one is held back).
    pub fn due(&self) -> Option<u64> {
        self.due_at(Instant::now())
    }

    /// [`LogEvery::due`] at `now`.
    pub fn due_at(&self, now: Instant) -> Option<u64> {
        let now_ms = millis(now.saturating_duration_since(self.origin));
        let next = self.next_ms.load(Relaxed);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms.saturating_add(self.interval_ms),
                    Relaxed,
                    Relaxed,
                )
                .is_ok()
        {
            return Some(self.held.swap(0, Relaxed));
        }
        self.held.fetch_add(1, Relaxed);
        None
    }
}

impl Default for LogEvery {
    fn default() -> Self {
        Self::new(Self::INTERVAL)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(backend: Backend, mode: FailureMode) -> (FailurePolicy, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        (FailurePolicy::new(backend, mode, metrics.clone()), metrics)
    }

    fn down() -> LimiterError {
        LimiterError::Unavailable("no answer from Redis within 100ms".into())
    }

    #[test]
    fn verdict_follows_the_failure_mode() {
        let (open, _) = policy(Backend::Limiter, FailureMode::Open);
        assert_eq!(open.on_error("per-minute window", &down()), Verdict::Open);
        let (closed, _) = policy(Backend::Limiter, FailureMode::Closed);
        assert_eq!(
            closed.on_error("per-minute window", &down()),
            Verdict::Closed
        );
    }

    #[test]
    fn counts_errors_and_requests_let_through_on_its_backend_only() {
        let (open, m) = policy(Backend::Limiter, FailureMode::Open);
        for _ in 0..3 {
            let _ = open.on_error("per-minute window", &down());
        }
        assert_eq!(m.backend_errors_limiter.get(), 3);
        assert_eq!(m.fail_open_limiter.get(), 3);
        assert_eq!(m.backend_errors_database.get(), 0);
        assert_eq!(m.fail_open_database.get(), 0);

        let (closed, m) = policy(Backend::Database, FailureMode::Closed);
        let e = StoreError::from(sqlx::Error::PoolTimedOut);
        let _ = closed.on_error("quota update", &e);
        let _ = closed.on_error("quota update", &e);
        assert_eq!(m.backend_errors_database.get(), 2);
        assert_eq!(m.fail_open_database.get(), 0);
        assert_eq!(m.backend_errors_limiter.get(), 0);
    }

    #[test]
    fn a_step_no_mode_can_skip_is_counted_but_never_let_through() {
        let (open, m) = policy(Backend::Database, FailureMode::Open);
        open.on_error_closed("key lookup", &StoreError::from(sqlx::Error::PoolTimedOut));
        assert_eq!(m.backend_errors_database.get(), 1);
        assert_eq!(m.fail_open_database.get(), 0);
    }

    #[test]
    fn logs_at_most_once_per_interval() {
        let (p, m) = policy(Backend::Limiter, FailureMode::Open);
        let t0 = Instant::now() + Duration::from_secs(1);
        let logged: Vec<bool> = [0, 1, 5_000, 9_999, 10_000, 10_001, 19_999, 25_000]
            .into_iter()
            .map(|ms| p.record("w", &down(), Verdict::Open, t0 + Duration::from_millis(ms)))
            .collect();
        assert_eq!(
            logged,
            [true, false, false, false, true, false, false, true]
        );
        // Every failure is counted, logged or not.
        assert_eq!(m.backend_errors_limiter.get(), 8);
    }

    #[test]
    fn log_every_says_how_many_lines_it_held_back() {
        let every = LogEvery::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |ms| every.due_at(t0 + Duration::from_millis(ms));
        assert_eq!(at(0), Some(0));
        assert_eq!(at(10), None);
        assert_eq!(at(9_000), None);
        assert_eq!(at(10_000), Some(2));
        assert_eq!(at(10_001), None);
        assert_eq!(at(30_000), Some(1));
        assert_eq!(LogEvery::default().due(), Some(0));
    }

    #[test]
    fn backend_errors_say_whether_they_are_transient() {
        let transient = |e: &dyn BackendError| e.is_transient();
        assert!(transient(&down()));
        assert!(!transient(&LimiterError::Backend(
            "ERR Error running script".into()
        )));
        assert!(!transient(&LimiterError::Config("bad URL".into())));
        assert!(transient(&StoreError::from(sqlx::Error::PoolTimedOut)));
        assert!(!transient(&StoreError::from(sqlx::Error::RowNotFound)));
    }
}
