//! Time as tollgate sees it.
//!
//! Every decision that depends on time (window boundaries, day and month rollover, key expiry)
//! reads it from a [`Clock`], so tests can set the time instead of waiting for it.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that stands still until told to move; for tests.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<DateTime<Utc>>>);

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        Self(Arc::new(Mutex::new(start)))
    }

    pub fn set(&self, to: DateTime<Utc>) {
        *self.0.lock().expect("clock lock") = to;
    }

    pub fn advance(&self, by: Duration) {
        *self.0.lock().expect("clock lock") += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().expect("clock lock")
    }
}

/// The UTC day `now` belongs to, as stored in the usage table (`YYYY-MM-DD`).
pub fn day_label(now: DateTime<Utc>) -> String {
    // Not `format("%Y-%m-%d")`: that parses the pattern on every call, and this runs per request.
    format!("{:04}-{:02}-{:02}", now.year(), now.month(), now.day())
}

/// The UTC month `now` belongs to, as stored in the usage table (`YYYY-MM`).
pub fn month_label(now: DateTime<Utc>) -> String {
    format!("{:04}-{:02}", now.year(), now.month())
}

/// Whole seconds from `now` until the next UTC midnight, at least 1.
pub fn secs_until_next_day(now: DateTime<Utc>) -> u64 {
    let next = (now.date_naive() + Duration::days(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists");
    ceil_secs(Utc.from_utc_datetime(&next) - now)
}

/// Whole seconds from `now` until 00:00 UTC on the first of next month, at least 1.
pub fn secs_until_next_month(now: DateTime<Utc>) -> u64 {
    ceil_secs(next_month_start(now) - now)
}

/// Length in seconds of the UTC month `now` is in.
pub fn month_length_secs(now: DateTime<Utc>) -> u64 {
    let start = NaiveDate::from_ymd_opt(now.year(), now.month(), 1).expect("first of month");
    (next_month_start(now) - Utc.from_utc_datetime(&start.and_hms_opt(0, 0, 0).expect("midnight")))
        .num_seconds() as u64
}

fn next_month_start(now: DateTime<Utc>) -> DateTime<Utc> {
    let (y, m) = if now.month() == 12 {
        (now.year() + 1, 1)
    } else {
        (now.year(), now.month() + 1)
    };
    let first = NaiveDate::from_ymd_opt(y, m, 1).expect("first of month");
    Utc.from_utc_datetime(&first.and_hms_opt(0, 0, 0).expect("midnight"))
}

/// Rounds a positive duration up to whole seconds; never less than 1.
pub fn ceil_secs(d: Duration) -> u64 {
    let ms = d.num_milliseconds().max(1) as u64;
    ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn day_rollover_seconds() {
        assert_eq!(secs_until_next_day(at("2026-03-01T23:59:59Z")), 1);
        assert_eq!(secs_until_next_day(at("2026-03-01T23:59:59.500Z")), 1);
        assert_eq!(secs_until_next_day(at("2026-03-01T00:00:00Z")), 86_400);
        assert_eq!(secs_until_next_day(at("2026-03-01T12:00:00Z")), 43_200);
    }

    #[test]
    fn month_rollover_seconds() {
        assert_eq!(secs_until_next_month(at("2026-02-28T23:59:00Z")), 60);
        assert_eq!(secs_until_next_month(at("2026-12-31T23:00:00Z")), 3_600);
        assert_eq!(
            secs_until_next_month(at("2028-02-28T00:00:00Z")),
            2 * 86_400
        );
        assert_eq!(month_length_secs(at("2026-02-10T05:00:00Z")), 28 * 86_400);
        assert_eq!(month_length_secs(at("2026-12-31T05:00:00Z")), 31 * 86_400);
    }

    #[test]
    fn labels_are_utc() {
        let t: DateTime<Utc> = "2026-01-31T23:30:00-02:00".parse().unwrap();
        assert_eq!(day_label(t), "2026-02-01");
        assert_eq!(month_label(t), "2026-02");
        // Zero-padded, as the usage table and the SQL that reads it expect.
        assert_eq!(day_label(at("2026-03-04T00:00:00Z")), "2026-03-04");
        assert_eq!(month_label(at("2026-03-04T00:00:00Z")), "2026-03");
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(at("2026-01-01T00:00:00Z"));
        assert_eq!(c.now(), at("2026-01-01T00:00:00Z"));
        c.advance(Duration::seconds(90));
        assert_eq!(c.now(), at("2026-01-01T00:01:30Z"));
    }
}
