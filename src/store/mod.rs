//! Durable state: keys, usage quotas and the request log, behind one trait per seam.
//!
//! The backend is chosen once, from `database.url`, by [`open`]; nothing on the request path knows
//! which one it has. `sqlite.rs` is the embedded default.

pub mod batched;
pub mod postgres;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseConfig;
use crate::keys::{ApiKey, KeyHash, Limits, NewKey};

/// What went wrong talking to the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Query(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
    #[error("corrupt row in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
}

impl StoreError {
    /// Whether retrying later may succeed (the server is away or busy), as opposed to a bug or a
    /// bad schema that retrying cannot fix.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// The same error again, for answering several waiters with it (`sqlx::Error` is not
    /// `Clone`; the copy keeps the kind and the message).
    pub(crate) fn duplicate(&self) -> StoreError {
        let copy = || sqlx::Error::Protocol(self.to_string());
        match self {
            StoreError::Unavailable(_) => StoreError::Unavailable(copy()),
            StoreError::Corrupt { table, detail } => StoreError::Corrupt {
                table,
                detail: detail.clone(),
            },
            _ => StoreError::Query(copy()),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            sqlx::Error::Database(db) if db.message().contains("database is locked") => {
                StoreError::Unavailable(e)
            }
            _ => StoreError::Query(e),
        }
    }
}

/// What [`KeyStore::watch_changes`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyChange {
    /// These keys changed.
    Keys(Vec<KeyHash>),
    /// Anything may have changed.
    All,
}

/// A key's usage counters as of `now` (a counter from an earlier day or month reads as 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub daily: u64,
    pub monthly: u64,
    pub total: u64,
}

impl Usage {
    /// From the (daily, monthly, total) counters a backend read.
    pub(crate) fn from_counts((daily, monthly, total): (i64, i64, i64)) -> Self {
        Usage {
            daily: daily.max(0) as u64,
            monthly: monthly.max(0) as u64,
            total: total.max(0) as u64,
        }
    }
}

/// A change to some of a key's limits. `Some(None)` makes that limit unlimited.
#[derive(Debug, Clone, Copy, Default)]
pub struct LimitsPatch {
    pub per_minute: Option<Option<u64>>,
    pub daily: Option<Option<u64>>,
    pub monthly: Option<Option<u64>>,
    pub refund_5xx: Option<bool>,
}

impl LimitsPatch {
    pub fn apply(&self, limits: Limits) -> Limits {
        Limits {
            per_minute: self.per_minute.unwrap_or(limits.per_minute),
            daily: self.daily.unwrap_or(limits.daily),
            monthly: self.monthly.unwrap_or(limits.monthly),
            refund_5xx: self.refund_5xx.unwrap_or(limits.refund_5xx),
        }
    }
}

/// Keys: lookups for the request path, and the admin operations behind `tollgate keys`.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// The key with this hash, whatever its status, or `None` if there is none.
    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<ApiKey>, StoreError>;

    /// Reports changed keys (created, revoked, limits set) to `on_change` until `stop` is
    /// cancelled, each within `interval` of its commit. Reports [`KeyChange::All`] first, and
    /// whenever changes may have been missed (the database was unreachable), so a cache built
    /// before then is dropped. Errors are logged and retried, never returned.
    async fn watch_changes(
        &self,
        interval: Duration,
        on_change: &(dyn Fn(KeyChange) + Send + Sync),
        stop: CancellationToken,
    );

    /// Stores a new key with its usage row; `now` is its creation time.
    async fn create(
        &self,
        name: &str,
        key: &NewKey,
        limits: Limits,
        expires_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<ApiKey, StoreError>;

    async fn get(&self, id: i64) -> Result<Option<ApiKey>, StoreError>;

    /// All keys, oldest first.
    async fn list(&self) -> Result<Vec<ApiKey>, StoreError>;

    /// Marks a key revoked. `false` if there is no such key.
    async fn revoke(&self, id: i64, now: DateTime<Utc>) -> Result<bool, StoreError>;

    /// Changes some limits; returns the updated key, or `None` if there is no such key.
    async fn set_limits(
        &self,
        id: i64,
        patch: LimitsPatch,
        now: DateTime<Utc>,
    ) -> Result<Option<ApiKey>, StoreError>;

    /// The key's counters as they stand at `now`.
    async fn usage(&self, id: i64, now: DateTime<Utc>) -> Result<Usage, StoreError>;

    /// A cheap round trip, for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// The daily and monthly limits a quota check enforces (`None` = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quota {
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
}

/// The answer of [`QuotaStore::consume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaOutcome {
    /// The cost was added; counters after the increment.
    Admitted { daily: u64, monthly: u64 },
    /// Nothing was added: the month has no room (reported before the day, as it resets later).
    MonthlyExceeded { used: u64 },
    /// Nothing was added: today has no room.
    DailyExceeded { used: u64 },
}

/// A limit as the databases store it: unlimited is NULL, and a count past `i64::MAX` is capped.
pub(crate) fn opt_i64(v: Option<u64>) -> Option<i64> {
    v.map(|v| v.min(i64::MAX as u64) as i64)
}

/// A quota request queued for a store's writer, which may run it together with others.
#[derive(Debug)]
pub(crate) struct PendingConsume {
    pub key_id: i64,
    pub quota: Quota,
    pub cost: i64,
    pub now: DateTime<Utc>,
    pub reply: tokio::sync::oneshot::Sender<Result<QuotaOutcome, StoreError>>,
}

/// Where a [`PendingConsume`]'s answer arrives.
pub(crate) type ConsumeAnswer = tokio::sync::oneshot::Receiver<Result<QuotaOutcome, StoreError>>;

impl PendingConsume {
    /// A request, and where its answer will arrive.
    pub(crate) fn new(
        key_id: i64,
        quota: Quota,
        cost: u64,
        now: DateTime<Utc>,
    ) -> (Self, ConsumeAnswer) {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let pending = PendingConsume {
            key_id,
            quota,
            cost: cost.min(i64::MAX as u64) as i64,
            now,
            reply,
        };
        (pending, answer)
    }

    /// Queues a request on `queue` and waits for the writer's answer. A writer that is gone
    /// (the store is closed) reads as an unavailable database.
    pub(crate) async fn queue(
        queue: &tokio::sync::mpsc::Sender<PendingConsume>,
        key_id: i64,
        quota: Quota,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<QuotaOutcome, StoreError> {
        let closed = || StoreError::Unavailable(sqlx::Error::PoolClosed);
        let (pending, answer) = PendingConsume::new(key_id, quota, cost, now);
        queue.send(pending).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

/// What one row of a batch says about request `i` of `batch`: admitted, with the counters after
/// it, or refused, with the counters that tell which limit had no room. `None` for a row that
/// names no request of the batch, or a refusal the counters do not explain.
pub(crate) fn batch_answer(
    batch: &[PendingConsume],
    i: i64,
    admitted: bool,
    daily: i64,
    monthly: i64,
) -> Option<(usize, QuotaOutcome)> {
    let i = usize::try_from(i).ok()?;
    let p = batch.get(i)?;
    let (daily, monthly) = (daily.max(0) as u64, monthly.max(0) as u64);
    let outcome = if admitted {
        QuotaOutcome::Admitted { daily, monthly }
    } else {
        refusal(p.quota, p.cost.max(0) as u64, daily, monthly)?
    };
    Some((i, outcome))
}

/// Which limit refused a request of `cost`, given the counters as they were; `None` if both had
/// room (the request was not refused for its quota).
pub(crate) fn refusal(
    quota: Quota,
    cost: u64,
    daily_used: u64,
    monthly_used: u64,
) -> Option<QuotaOutcome> {
    if quota
        .monthly
        .is_some_and(|m| monthly_used.saturating_add(cost) > m)
    {
        Some(QuotaOutcome::MonthlyExceeded { used: monthly_used })
    } else if quota
        .daily
        .is_some_and(|d| daily_used.saturating_add(cost) > d)
    {
        Some(QuotaOutcome::DailyExceeded { used: daily_used })
    } else {
        None
    }
}

/// Daily and monthly usage quotas.
#[async_trait]
pub trait QuotaStore: Send + Sync + 'static {
    /// Adds `cost` to the key's daily, monthly and total counters if, and only if, the whole cost
    /// fits in both today's and this month's room; one atomic statement (DESIGN rules 1 and 2).
    /// Days and months are the UTC ones `now` falls in; a counter from an earlier day or month
    /// counts as 0. Errors leave the counters unchanged.
    async fn consume(
        &self,
        key_id: i64,
        quota: Quota,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<QuotaOutcome, StoreError>;

    /// Takes `units` off the counters of a key: the daily one only if it still belongs to the
    /// day of `spent_at`, the monthly one only if it still belongs to that month, and the total.
    /// Never below zero. For quota reserved and not used, or refunded.
    async fn give_back(
        &self,
        key_id: i64,
        units: u64,
        spent_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
}

/// One row of the request log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRow {
    pub ts: DateTime<Utc>,
    /// Which API decided.
    pub api: LogApi,
    pub request_id: Option<String>,
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
    pub request_id: String,
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

/// What [`RequestLogSink::maintain`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maintenance {
    pub partitions_created: Vec<String>,
    pub partitions_dropped: Vec<String>,
    pub rows_deleted: u64,
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

/// Where the request log's batches go, and what reads them back.
#[async_trait]
pub trait RequestLogSink: Send + Sync + 'static {
    /// Writes all rows, or none (one transaction / one statement per batch).
    async fn write_batch(&self, rows: &[LogRow]) -> Result<(), StoreError>;

    /// Fills in the outcome of the Check rows with these request ids (rows already completed
    /// are left alone). An allowed row of a key with `refund_5xx` whose answer was a 5xx gets
    /// its cost given back to the counters of the day and month it was counted in, and is
    /// marked `refunded`, in the same transaction. Returns, per outcome, whether a row was
    /// found, and how many rows were refunded.
    async fn complete(&self, outcomes: &[Outcome]) -> Result<(Vec<bool>, u64), StoreError>;

    /// Keeps the log in shape: (PostgreSQL) creates the monthly partitions from `now`'s month
    /// on and, with a `retention`, drops months that ended more than `retention` before `now`;
    /// (SQLite) deletes rows older than `retention`. Safe to run from several replicas at once.
    async fn maintain(
        &self,
        now: DateTime<Utc>,
        retention: Option<Duration>,
    ) -> Result<Maintenance, StoreError>;

    /// Check requests in `[from, to)` by UTC day and the `top` keys by requests, for one key
    /// or for all.
    async fn summarize(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        key_id: Option<i64>,
        top: u32,
    ) -> Result<UsageSummary, StoreError>;
}

/// The three stores of one database, shared by the whole process.
#[derive(Clone)]
pub struct Stores {
    pub keys: Arc<dyn KeyStore>,
    pub quotas: Arc<dyn QuotaStore>,
    pub log: Arc<dyn RequestLogSink>,
    closer: Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

impl Stores {
    /// Closes the connection pools; in-flight statements finish first.
    pub async fn close(&self) {
        (self.closer)().await
    }
}

/// Opens the database `config.url` names, applying migrations first when `migrate` is set.
pub async fn open(config: &DatabaseConfig, migrate: bool) -> Result<Stores, StoreError> {
    let url = config.url.expose();
    if url.starts_with("sqlite:") {
        let db = Arc::new(sqlite::SqliteStore::open(url).await?);
        if migrate {
            db.migrate().await?;
        }
        let closer = db.clone();
        Ok(Stores::new(db, move || {
            let db = closer.clone();
            Box::pin(async move { db.close().await })
        }))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let settings = postgres::PgSettings {
            max_connections: config.max_connections,
            timeout: config.timeout.0,
        };
        let db = Arc::new(postgres::PgStore::open(url, settings).await?);
        if migrate {
            db.migrate().await?;
        }
        let closer = db.clone();
        Ok(Stores::new(db, move || {
            let db = closer.clone();
            Box::pin(async move { db.close().await })
        }))
    } else {
        Err(StoreError::UnsupportedUrl(crate::config::redact_url(url)))
    }
}

impl Stores {
    fn new<S: KeyStore + QuotaStore + RequestLogSink>(
        db: Arc<S>,
        closer: impl Fn() -> futures_util::future::BoxFuture<'static, ()> + Send + Sync + 'static,
    ) -> Self {
        Stores {
            keys: db.clone(),
            quotas: db.clone(),
            log: db,
            closer: Arc::new(closer),
        }
    }
}

/// RFC 3339 UTC with milliseconds: the text form of times in SQLite.
pub(crate) fn ts_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
