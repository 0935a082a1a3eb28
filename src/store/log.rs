//! The request log seam: one row per decision, written in batches (see `reqlog`), completed
//! with what Envoy's access log says became of the request, summarised for `tollgate usage`, and
//! kept in shape (partitions, retention).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::StoreError;

/// One row of the request log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRow {
    pub ts: DateTime<Utc>,
    /// Which API decided.
    pub api: LogApi,
    /// The client's `x-request-id` (or Envoy's), for correlation only: a client chooses it.
    pub request_id: Option<String>,
    /// The id tollgate minted for this decision (Check rows); the access log completes the row
    /// by it alone.
    pub decision_id: Option<String>,
    pub key_id: Option<i64>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub client_addr: Option<String>,
    pub allowed: bool,
    pub reason: &'static str,
    pub status: u16,
    /// What an allowed request spent (0 when denied).
    pub cost: u64,
    /// The visible prefix of the secret a known key came with (old or new, during a rotation's
    /// grace).
    pub key_prefix: Option<String>,
    /// The identity the key belonged to when the Check saw it (`None`: none, no known key, or
    /// a ShouldRateLimit row, which looks no key up).
    pub identity_id: Option<i64>,
}

/// The API a request-log row comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogApi {
    Authz,
    RateLimit,
}

impl LogApi {
    pub fn as_str(self) -> &'static str {
        match self {
            LogApi::Authz => "authz",
            LogApi::RateLimit => "ratelimit",
        }
    }
}

/// What became of a request after tollgate's decision, from Envoy's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The id tollgate minted for the Check, as Envoy's access log carried it back.
    pub decision_id: String,
    /// The status the client got.
    pub status: u16,
    /// From the first byte received to the last byte sent, as Envoy measured it.
    pub duration_ms: Option<u64>,
    /// Request headers and body.
    pub bytes_received: u64,
    /// Response headers and body.
    pub bytes_sent: u64,
}

/// Requests of one UTC day in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayUsage {
    /// `YYYY-MM-DD`.
    pub day: String,
    pub allowed: u64,
    pub denied: u64,
}

/// One key's requests over a period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    pub key_id: i64,
    /// `None` when the key no longer exists.
    pub name: Option<String>,
    pub allowed: u64,
    pub denied: u64,
}

/// What [`RequestLogStore::maintain`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maintenance {
    pub partitions_created: Vec<String>,
    pub partitions_dropped: Vec<String>,
    pub rows_deleted: u64,
}

/// Which Check requests [`RequestLogStore::summarize`] counts: those in `[from, to)`, of one key
/// or of all, of one identity's keys or of all (both filters apply when both are given), with
/// the `top` keys by requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageQuery {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub key_id: Option<i64>,
    /// The identity the rows record (the key's identity at the time of each Check), so a key
    /// moved between identities counts where it was.
    pub identity_id: Option<i64>,
    pub top: u32,
}

/// What the log says about a period: Check requests (`api = 'authz'`) from `from` up to `to`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsageSummary {
    pub days: Vec<DayUsage>,
    /// Keys with the most requests, most first.
    pub top_keys: Vec<KeyUsage>,
}

impl UsageSummary {
    /// From the rows every backend's two summary queries return: (day, allowed, denied) and
    /// (key id, name, allowed, denied).
    pub(crate) fn from_rows(
        days: Vec<(String, i64, i64)>,
        keys: Vec<(i64, Option<String>, i64, i64)>,
    ) -> Self {
        let count = |n: i64| n.max(0) as u64;
        UsageSummary {
            days: days
                .into_iter()
                .map(|(day, allowed, denied)| DayUsage {
                    day,
                    allowed: count(allowed),
                    denied: count(denied),
                })
                .collect(),
            top_keys: keys
                .into_iter()
                .map(|(key_id, name, allowed, denied)| KeyUsage {
                    key_id,
                    name,
                    allowed: count(allowed),
                    denied: count(denied),
                })
                .collect(),
        }
    }
}

/// The request log in the database: where the writer's batches go, what Envoy's access log
/// completes, what `tollgate usage` reads, and the retention that keeps it in shape.
#[async_trait]
pub trait RequestLogStore: Send + Sync + 'static {
    /// Writes all rows, or none (one transaction / one statement per batch).
    async fn write_batch(&self, rows: &[LogRow]) -> Result<(), StoreError>;

    /// Fills in the outcome of the Check row with each outcome's decision id; a row already
    /// completed is left alone, so each row is completed, and refunded, at most once. An allowed
    /// row of a key with `refund_5xx` whose answer was a 5xx gets its cost given back to the
    /// counters of the day and month it was counted in, and is marked `refunded`, in the same
    /// transaction. Returns, per outcome, whether it completed a row (of several outcomes with
    /// one id, only the first can), and how many rows were refunded.
    async fn complete(&self, outcomes: &[Outcome]) -> Result<(Vec<bool>, u64), StoreError>;

    /// Keeps the log in shape: (PostgreSQL) creates the monthly partitions from `now`'s month
    /// on and, with a `retention`, drops months that ended more than `retention` before `now`;
    /// (SQLite) deletes rows older than `retention`. Safe to run from several replicas at once.
    async fn maintain(
        &self,
        now: DateTime<Utc>,
        retention: Option<Duration>,
    ) -> Result<Maintenance, StoreError>;

    /// The Check requests `query` names, by UTC day, and its top keys by requests.
    async fn summarize(&self, query: &UsageQuery) -> Result<UsageSummary, StoreError>;
}

/// The time before which rows are past `retention` at `now`; `None` when nothing is (no
/// retention, or one reaching back before the calendar starts).
pub(crate) fn retention_cutoff(
    now: DateTime<Utc>,
    retention: Option<Duration>,
) -> Option<DateTime<Utc>> {
    let retention = chrono::Duration::from_std(retention?).ok()?;
    now.checked_sub_signed(retention)
}
