//! PostgreSQL: keys, quotas and the request log shared by every replica.
//!
//! The quota check is one conditional `UPDATE … RETURNING` on the key's `api_usage` row; the row
//! lock serialises concurrent checks of one key across all replicas, and PostgreSQL re-evaluates
//! the `WHERE` against the row as the previous transaction left it, so the room-left test is
//! always against the latest count. Key changes reach replicas through `LISTEN`/`NOTIFY`, sent by
//! a trigger on `api_keys` (so a change made by hand in SQL is seen too).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::sqlite::parse_hash_hex;
use super::{
    KeyChange, KeyStore, LimitsPatch, LogRow, Maintenance, Outcome, PendingConsume, Quota,
    QuotaOutcome, QuotaStore, RequestLogSink, StoreError, Usage, UsageSummary, batch_answer,
    opt_i64, refusal,
};
use crate::keys::{self, ApiKey, KeyHash, KeyStatus, Limits, NewKey};

/// The channel the `api_keys` trigger notifies.
const KEY_CHANNEL: &str = "tollgate_key_changes";

/// Settings of the connection pool.
#[derive(Debug, Clone, Copy)]
pub struct PgSettings {
    pub max_connections: u32,
    /// Longest wait for a connection, and the server-side statement timeout.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    consumes: mpsc::Sender<PendingConsume>,
}

/// Most quota requests, for different keys, in one statement (see [`consume_batch`]).
const MAX_CONSUME_BATCH: usize = 64;

impl PgStore {
    /// Connects to the database named by a `postgres://` URL.
    pub async fn open(url: &str, settings: PgSettings) -> Result<Self, StoreError> {
        let statement_timeout = format!("{}", settings.timeout.as_millis().max(1));
        let options = PgConnectOptions::from_str(url)?
            .application_name("tollgate")
            .options([("statement_timeout", statement_timeout.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .min_connections(1)
            .acquire_timeout(settings.timeout)
            .connect_with(options)
            .await?;
        let (consumes, queue) = mpsc::channel(16 * MAX_CONSUME_BATCH);
        // Half the pool at most for quota statements: the request log and key lookups need
        // connections too.
        let in_flight = (settings.max_connections as usize / 2).max(1);
        tokio::spawn(consume_dispatcher(pool.clone(), queue, in_flight));
        Ok(Self { pool, consumes })
    }

    /// Applies migrations; several replicas may do so at once (sqlx holds an advisory lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Listens for key changes until the connection drops or `stop` is cancelled. Returns
    /// `Ok(())` when stopped, `Err` when the connection was lost.
    async fn listen(
        &self,
        on_change: &(dyn Fn(KeyChange) + Send + Sync),
        stop: &CancellationToken,
    ) -> Result<(), StoreError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(KEY_CHANNEL).await?;
        // Anything cached before this moment may have changed unheard.
        on_change(KeyChange::All);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                n = listener.try_recv() => n?,
            };
            match next {
                Some(n) => match parse_hash_hex(n.payload()) {
                    Some(hash) => on_change(KeyChange::Keys(vec![hash])),
                    None => on_change(KeyChange::All),
                },
                None => {
                    return Err(StoreError::Unavailable(sqlx::Error::Protocol(
                        "key change listener lost its connection".into(),
                    )));
                }
            }
        }
    }
}

fn key_from_row(row: &PgRow) -> Result<ApiKey, StoreError> {
    let status: String = row.try_get("status")?;
    let limit = |col: &str| -> Result<Option<u64>, StoreError> {
        Ok(row.try_get::<Option<i64>, _>(col)?.map(|v| v.max(0) as u64))
    };
    Ok(ApiKey {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        status: KeyStatus::parse(&status).ok_or_else(|| StoreError::Corrupt {
            table: "api_keys",
            detail: format!("status {status:?}"),
        })?,
        expires_at: row.try_get("expires_at")?,
        limits: Limits {
            per_minute: limit("per_minute")?,
            daily: limit("daily_limit")?,
            monthly: limit("monthly_limit")?,
            refund_5xx: row.try_get("refund_5xx")?,
        },
    })
}

/// The UTC day and the first day of the UTC month `now` falls in.
fn day_and_month(now: DateTime<Utc>) -> (NaiveDate, NaiveDate) {
    let day = now.date_naive();
    (day, day.with_day(1).expect("first of month"))
}

#[async_trait]
impl KeyStore for PgStore {
    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, prefix, status, expires_at, per_minute, daily_limit, monthly_limit, refund_5xx \
             FROM api_keys WHERE key_hash = $1",
        )
        .bind(keys::hash_hex(hash))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| key_from_row(&r)).transpose()
    }

    async fn watch_changes(
        &self,
        _interval: Duration,
        on_change: &(dyn Fn(KeyChange) + Send + Sync),
        stop: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        while !stop.is_cancelled() {
            match self.listen(on_change, &stop).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "key change listener failed; reconnecting");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn create(
        &self,
        name: &str,
        key: &NewKey,
        limits: Limits,
        expires_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<ApiKey, StoreError> {
        let (day, month) = day_and_month(now);
        let mut tx = self.pool.begin().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO api_keys (name, prefix, key_hash, expires_at, per_minute, daily_limit, \
               monthly_limit, created_at, updated_at, refund_5xx) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9) RETURNING id",
        )
        .bind(name)
        .bind(&key.prefix)
        .bind(keys::hash_hex(&key.hash))
        .bind(expires_at)
        .bind(opt_i64(limits.per_minute))
        .bind(opt_i64(limits.daily))
        .bind(opt_i64(limits.monthly))
        .bind(now)
        .bind(limits.refund_5xx)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO api_usage (api_key_id, day, month, updated_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(day)
        .bind(month)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ApiKey {
            id,
            name: name.to_string(),
            prefix: key.prefix.clone(),
            status: KeyStatus::Active,
            expires_at,
            limits,
        })
    }

    async fn get(&self, id: i64) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, prefix, status, expires_at, per_minute, daily_limit, monthly_limit, refund_5xx \
             FROM api_keys WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| key_from_row(&r)).transpose()
    }

    async fn list(&self) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, prefix, status, expires_at, per_minute, daily_limit, monthly_limit, refund_5xx \
             FROM api_keys ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn revoke(&self, id: i64, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE api_keys SET status = 'revoked', updated_at = $2 WHERE id = $1")
                .bind(id)
                .bind(now)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_limits(
        &self,
        id: i64,
        patch: LimitsPatch,
        now: DateTime<Utc>,
    ) -> Result<Option<ApiKey>, StoreError> {
        // Each limit is either replaced ($n given, flag true) or kept, in one statement, so
        // two concurrent set-limits never undo each other's other fields.
        let row = sqlx::query(
            "UPDATE api_keys SET \
               per_minute = CASE WHEN $2 THEN $3 ELSE per_minute END, \
               daily_limit = CASE WHEN $4 THEN $5 ELSE daily_limit END, \
               monthly_limit = CASE WHEN $6 THEN $7 ELSE monthly_limit END, \
               refund_5xx = COALESCE($9, refund_5xx), \
               updated_at = $8 \
             WHERE id = $1 \
             RETURNING id, name, prefix, status, expires_at, per_minute, daily_limit, monthly_limit, refund_5xx",
        )
        .bind(id)
        .bind(patch.per_minute.is_some())
        .bind(opt_i64(patch.per_minute.flatten()))
        .bind(patch.daily.is_some())
        .bind(opt_i64(patch.daily.flatten()))
        .bind(patch.monthly.is_some())
        .bind(opt_i64(patch.monthly.flatten()))
        .bind(now)
        .bind(patch.refund_5xx)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| key_from_row(&r)).transpose()
    }

    async fn usage(&self, id: i64, now: DateTime<Utc>) -> Result<Usage, StoreError> {
        let (day, month) = day_and_month(now);
        let row: Option<(i64, i64, i64)> = sqlx::query_as(
            "SELECT CASE WHEN day = $2 THEN daily_requests ELSE 0 END AS daily, \
                    CASE WHEN month = $3 THEN monthly_requests ELSE 0 END AS monthly, \
                    total_requests AS total \
             FROM api_usage WHERE api_key_id = $1",
        )
        .bind(id)
        .bind(day)
        .bind(month)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Usage::from_counts).unwrap_or_default())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// The statement that checks and spends quota. A counter from an earlier day or month counts as
/// 0 both in the room-left test and in the new value (DESIGN rule 2).
pub const CONSUME_SQL: &str = "UPDATE api_usage SET \
       daily_requests = (CASE WHEN day = $2 THEN daily_requests ELSE 0 END) + $4, \
       monthly_requests = (CASE WHEN month = $3 THEN monthly_requests ELSE 0 END) + $4, \
       total_requests = total_requests + $4, \
       day = $2, month = $3, updated_at = now() \
     WHERE api_key_id = $1 \
       AND ($5::bigint IS NULL OR (CASE WHEN day = $2 THEN daily_requests ELSE 0 END) + $4 <= $5) \
       AND ($6::bigint IS NULL OR (CASE WHEN month = $3 THEN monthly_requests ELSE 0 END) + $4 <= $6) \
     RETURNING daily_requests, monthly_requests";

/// One request on its own: [`CONSUME_SQL`], and when it admits nothing, the read that tells why
/// (creating a missing usage row and trying again).
async fn consume_one(
    pool: &PgPool,
    key_id: i64,
    quota: Quota,
    cost_i: i64,
    now: DateTime<Utc>,
) -> Result<QuotaOutcome, StoreError> {
    let (day, month) = day_and_month(now);
    let cost = cost_i.max(0) as u64;
    for _ in 0..3 {
        let admitted = sqlx::query(CONSUME_SQL)
            .bind(key_id)
            .bind(day)
            .bind(month)
            .bind(cost_i)
            .bind(opt_i64(quota.daily))
            .bind(opt_i64(quota.monthly))
            .fetch_optional(pool)
            .await?;
        if let Some(row) = admitted {
            return Ok(QuotaOutcome::Admitted {
                daily: row.try_get::<i64, _>(0)? as u64,
                monthly: row.try_get::<i64, _>(1)? as u64,
            });
        }
        // No row: a limit has no room, or the usage row is missing. Tell which, so "no
        // row" never reads as "limit exceeded".
        let current = sqlx::query(
            "SELECT CASE WHEN day = $2 THEN daily_requests ELSE 0 END, \
                        CASE WHEN month = $3 THEN monthly_requests ELSE 0 END \
                 FROM api_usage WHERE api_key_id = $1",
        )
        .bind(key_id)
        .bind(day)
        .bind(month)
        .fetch_optional(pool)
        .await?;
        let Some(current) = current else {
            sqlx::query(
                "INSERT INTO api_usage (api_key_id, day, month) VALUES ($1, $2, $3) \
                     ON CONFLICT (api_key_id) DO NOTHING",
            )
            .bind(key_id)
            .bind(day)
            .bind(month)
            .execute(pool)
            .await?;
            continue;
        };
        let daily_used = current.try_get::<i64, _>(0)?.max(0) as u64;
        let monthly_used = current.try_get::<i64, _>(1)?.max(0) as u64;
        if let Some(refused) = refusal(quota, cost, daily_used, monthly_used) {
            return Ok(refused);
        }
        // Room appeared between the two statements (another request was refunded, or the
        // day turned): try again.
    }
    Err(StoreError::Corrupt {
        table: "api_usage",
        detail: format!("quota update for key {key_id} neither admitted nor refused"),
    })
}

/// Takes queued quota requests and runs them, up to `in_flight` statements at a time. Each
/// statement holds requests for different keys (a key's second request waits for the next one);
/// while every permit is taken, requests gather into bigger statements.
async fn consume_dispatcher(
    pool: PgPool,
    mut queue: mpsc::Receiver<PendingConsume>,
    in_flight: usize,
) {
    let permits = std::sync::Arc::new(Semaphore::new(in_flight));
    let mut pending: Vec<PendingConsume> = Vec::new();
    loop {
        if pending.is_empty() && queue.recv_many(&mut pending, 4 * MAX_CONSUME_BATCH).await == 0 {
            return;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        while pending.len() < 4 * MAX_CONSUME_BATCH {
            match queue.try_recv() {
                Ok(p) => pending.push(p),
                Err(_) => break,
            }
        }
        let mut batch = Vec::with_capacity(pending.len().min(MAX_CONSUME_BATCH));
        let mut keys = std::collections::HashSet::new();
        let mut rest = Vec::new();
        for p in pending.drain(..) {
            if batch.len() < MAX_CONSUME_BATCH && keys.insert(p.key_id) {
                batch.push(p);
            } else {
                rest.push(p);
            }
        }
        pending = rest;
        let pool = pool.clone();
        tokio::spawn(async move {
            consume_batch(&pool, batch).await;
            drop(permit);
        });
    }
}

/// The requests of `batch` (each for a different key) in one statement: for each, the conditional
/// update of [`CONSUME_SQL`], or, where it admitted nothing, the counters that tell which limit had
/// no room. The rows are locked in key order first, so two batches (of this replica or another)
/// that share keys wait for each other instead of deadlocking.
const CONSUME_BATCH_SQL: &str = "WITH r AS ( \
       SELECT * FROM unnest($1::int[], $2::bigint[], $3::date[], $4::date[], $5::bigint[], \
         $6::bigint[], $7::bigint[]) AS r (i, key_id, day, month, cost, daily_limit, monthly_limit) \
     ), locked AS MATERIALIZED ( \
       SELECT u.api_key_id FROM api_usage u WHERE u.api_key_id IN (SELECT key_id FROM r) \
       ORDER BY u.api_key_id FOR UPDATE \
     ), spent AS ( \
       UPDATE api_usage u SET \
         daily_requests = (CASE WHEN u.day = r.day THEN u.daily_requests ELSE 0 END) + r.cost, \
         monthly_requests = (CASE WHEN u.month = r.month THEN u.monthly_requests ELSE 0 END) \
           + r.cost, \
         total_requests = u.total_requests + r.cost, \
         day = r.day, month = r.month, updated_at = now() \
       FROM r \
       WHERE u.api_key_id = r.key_id AND u.api_key_id IN (SELECT api_key_id FROM locked) \
         AND (r.daily_limit IS NULL \
           OR (CASE WHEN u.day = r.day THEN u.daily_requests ELSE 0 END) + r.cost <= r.daily_limit) \
         AND (r.monthly_limit IS NULL \
           OR (CASE WHEN u.month = r.month THEN u.monthly_requests ELSE 0 END) + r.cost \
             <= r.monthly_limit) \
       RETURNING r.i, u.daily_requests, u.monthly_requests \
     ) \
     SELECT i, true, daily_requests, monthly_requests FROM spent \
     UNION ALL \
     SELECT r.i, false, CASE WHEN u.day = r.day THEN u.daily_requests ELSE 0 END, \
       CASE WHEN u.month = r.month THEN u.monthly_requests ELSE 0 END \
     FROM r JOIN api_usage u ON u.api_key_id = r.key_id \
     WHERE r.i NOT IN (SELECT i FROM spent)";

/// Answers every request in `batch`: a lone request by [`CONSUME_SQL`], several by
/// [`CONSUME_BATCH_SQL`]. A request the batch cannot answer (no usage row, or a refusal its read
/// does not explain because another transaction committed meanwhile) and every request of a
/// batch that failed are run on their own. Returns how many were.
async fn consume_batch(pool: &PgPool, batch: Vec<PendingConsume>) -> usize {
    if batch.len() == 1 {
        let p = batch.into_iter().next().expect("one request");
        let outcome = consume_one(pool, p.key_id, p.quota, p.cost, p.now).await;
        p.reply.send(outcome).ok();
        return 1;
    }
    let n = batch.len();
    let (mut idx, mut keys, mut days, mut months) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut costs, mut daily, mut monthly) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (i, p) in batch.iter().enumerate() {
        let (day, month) = day_and_month(p.now);
        idx.push(i as i32);
        keys.push(p.key_id);
        days.push(day);
        months.push(month);
        costs.push(p.cost);
        daily.push(opt_i64(p.quota.daily));
        monthly.push(opt_i64(p.quota.monthly));
    }
    let rows = sqlx::query(CONSUME_BATCH_SQL)
        .bind(idx)
        .bind(keys)
        .bind(days)
        .bind(months)
        .bind(costs)
        .bind(daily)
        .bind(monthly)
        .fetch_all(pool)
        .await;
    let mut answers: Vec<Option<QuotaOutcome>> = vec![None; n];
    match rows {
        Ok(rows) => {
            for row in rows {
                let (Ok(i), Ok(admitted), Ok(daily), Ok(monthly)) = (
                    row.try_get::<i32, _>(0),
                    row.try_get::<bool, _>(1),
                    row.try_get::<i64, _>(2),
                    row.try_get::<i64, _>(3),
                ) else {
                    continue;
                };
                if let Some((i, outcome)) = batch_answer(&batch, i.into(), admitted, daily, monthly)
                {
                    answers[i] = Some(outcome);
                }
            }
        }
        Err(sqlx::Error::Database(e)) => {
            // The server refused the statement, so nothing was changed. Each request on its
            // own, so one that fails says why and the others are not refused with it.
            tracing::debug!(error = %e, size = n, "quota batch failed; one at a time");
        }
        Err(e) => {
            // The statement may or may not have been committed (the connection broke, say):
            // running it again could count twice, so every request gets the error.
            let e = StoreError::from(e);
            for p in batch {
                p.reply.send(Err(e.duplicate())).ok();
            }
            return 0;
        }
    }
    let mut alone = 0;
    for (p, answer) in batch.into_iter().zip(answers) {
        let outcome = match answer {
            Some(outcome) => Ok(outcome),
            None => {
                alone += 1;
                consume_one(pool, p.key_id, p.quota, p.cost, p.now).await
            }
        };
        p.reply.send(outcome).ok();
    }
    alone
}

#[async_trait]
impl QuotaStore for PgStore {
    async fn give_back(
        &self,
        key_id: i64,
        units: u64,
        spent_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let (day, month) = day_and_month(spent_at);
        sqlx::query(
            "UPDATE api_usage SET \
               daily_requests = CASE WHEN day = $2 THEN greatest(daily_requests - $4, 0) \
                 ELSE daily_requests END, \
               monthly_requests = CASE WHEN month = $3 THEN greatest(monthly_requests - $4, 0) \
                 ELSE monthly_requests END, \
               total_requests = greatest(total_requests - $4, 0), updated_at = now() \
             WHERE api_key_id = $1",
        )
        .bind(key_id)
        .bind(day)
        .bind(month)
        .bind(units.min(i64::MAX as u64) as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Queues the request for the dispatcher, which runs the requests waiting at one moment for
    /// different keys as one statement (see [`consume_batch`]).
    async fn consume(
        &self,
        key_id: i64,
        quota: Quota,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<QuotaOutcome, StoreError> {
        PendingConsume::queue(&self.consumes, key_id, quota, cost, now).await
    }
}

/// Advisory lock key for request-log maintenance ("tollgate" in ASCII, more or less).
const MAINTENANCE_LOCK: i64 = 0x746f_6c6c_6761_7465;
/// Months of partitions kept ready, the current one included.
const MONTHS_AHEAD: u32 = 3;

fn month_start(d: NaiveDate) -> DateTime<Utc> {
    d.and_hms_opt(0, 0, 0).expect("midnight").and_utc()
}

fn partition_name(month: NaiveDate) -> String {
    format!("api_requests_log_{:04}_{:02}", month.year(), month.month())
}

fn partition_month(name: &str) -> Option<NaiveDate> {
    let rest = name.strip_prefix("api_requests_log_")?;
    let (y, m) = rest.split_once('_')?;
    NaiveDate::from_ymd_opt(y.parse().ok()?, m.parse().ok()?, 1)
}

impl PgStore {
    /// Creates the partition of `month`, moving into it any rows the default partition holds
    /// for that month; one transaction, so no row is ever outside the table.
    async fn create_partition(
        conn: &mut sqlx::PgConnection,
        month: NaiveDate,
    ) -> Result<Option<String>, StoreError> {
        use sqlx::AssertSqlSafe;
        let name = partition_name(month);
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&name)
            .fetch_one(&mut *conn)
            .await?;
        if exists {
            return Ok(None);
        }
        let next = month
            .checked_add_months(chrono::Months::new(1))
            .expect("next month");
        // Names and bounds are made here from dates, never from input.
        let (from, to) = (
            month_start(month).format("%Y-%m-%d %H:%M:%S+00"),
            month_start(next).format("%Y-%m-%d %H:%M:%S+00"),
        );
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        for sql in [
            // No insert may land in the default partition between the copy and the delete
            // below (it would be deleted uncopied): inserts wait for this transaction, then
            // go to the new partition.
            "LOCK TABLE api_requests_log IN SHARE ROW EXCLUSIVE MODE".to_string(),
            format!(
                "CREATE TABLE {name} (LIKE api_requests_log INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
            ),
            format!(
                "INSERT INTO {name} SELECT * FROM api_requests_log_default \
                 WHERE ts >= '{from}' AND ts < '{to}'"
            ),
            format!("DELETE FROM api_requests_log_default WHERE ts >= '{from}' AND ts < '{to}'"),
            format!(
                "ALTER TABLE api_requests_log ATTACH PARTITION {name} \
                 FOR VALUES FROM ('{from}') TO ('{to}')"
            ),
        ] {
            sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(Some(name))
    }

    async fn maintain_locked(
        conn: &mut sqlx::PgConnection,
        now: DateTime<Utc>,
        retention: Option<Duration>,
    ) -> Result<Maintenance, StoreError> {
        let mut report = Maintenance::default();
        let this_month = now.date_naive().with_day(1).expect("first of month");
        for i in 0..MONTHS_AHEAD {
            let month = this_month
                .checked_add_months(chrono::Months::new(i))
                .expect("month ahead");
            if let Some(name) = Self::create_partition(conn, month).await? {
                report.partitions_created.push(name);
            }
        }
        let Some(retention) = retention else {
            return Ok(report);
        };
        let cutoff = now - chrono::Duration::from_std(retention).unwrap_or(chrono::TimeDelta::MAX);
        let partitions: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'api_requests_log'::regclass",
        )
        .fetch_all(&mut *conn)
        .await?;
        for name in partitions {
            let Some(month) = partition_month(&name) else {
                continue;
            };
            let end = month_start(
                month
                    .checked_add_months(chrono::Months::new(1))
                    .expect("next month"),
            );
            // A whole month older than the retention goes at once.
            if end <= cutoff {
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {name}")))
                    .execute(&mut *conn)
                    .await?;
                report.partitions_dropped.push(name);
            }
        }
        let done = sqlx::query("DELETE FROM api_requests_log_default WHERE ts < $1")
            .bind(cutoff)
            .execute(&mut *conn)
            .await?;
        report.rows_deleted = done.rows_affected();
        Ok(report)
    }
}

#[async_trait]
impl RequestLogSink for PgStore {
    async fn maintain(
        &self,
        now: DateTime<Utc>,
        retention: Option<Duration>,
    ) -> Result<Maintenance, StoreError> {
        let mut conn = self.pool.acquire().await?;
        // One replica at a time; the others skip this round.
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(MAINTENANCE_LOCK)
            .fetch_one(&mut *conn)
            .await?;
        if !locked {
            return Ok(Maintenance::default());
        }
        let report = Self::maintain_locked(&mut conn, now, retention).await;
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MAINTENANCE_LOCK)
            .execute(&mut *conn)
            .await;
        report
    }

    async fn complete(&self, outcomes: &[Outcome]) -> Result<(Vec<bool>, u64), StoreError> {
        let ids: Vec<&str> = outcomes.iter().map(|o| o.request_id.as_str()).collect();
        let status: Vec<i16> = outcomes
            .iter()
            .map(|o| o.status.min(i16::MAX as u16) as i16)
            .collect();
        let ms: Vec<Option<i64>> = outcomes
            .iter()
            .map(|o| o.duration_ms.map(|d| d.min(i64::MAX as u64) as i64))
            .collect();
        let rx: Vec<i64> = outcomes
            .iter()
            .map(|o| o.bytes_received.min(i64::MAX as u64) as i64)
            .collect();
        let tx: Vec<i64> = outcomes
            .iter()
            .map(|o| o.bytes_sent.min(i64::MAX as u64) as i64)
            .collect();
        // One statement per batch: complete the rows, then give the cost of refunded ones back
        // to the counters of the day and month it was spent in. RETURNING says which request
        // ids found their row, and whether it was refunded.
        let done: Vec<(String, bool)> = sqlx::query_as(
            "WITH done AS ( \
               UPDATE api_requests_log l SET response_status = o.status, duration_ms = o.ms, \
                 bytes_received = o.rx, bytes_sent = o.tx, \
                 refunded = (o.status >= 500 AND l.decision = 'allow' AND l.cost > 0 AND \
                   COALESCE((SELECT k.refund_5xx FROM api_keys k WHERE k.id = l.api_key_id), false)) \
               FROM UNNEST($1::text[], $2::smallint[], $3::bigint[], $4::bigint[], $5::bigint[]) \
                 AS o(request_id, status, ms, rx, tx) \
               WHERE l.request_id = o.request_id AND l.api = 'authz' \
                 AND l.response_status IS NULL \
               RETURNING l.request_id, l.api_key_id, l.ts, l.cost, l.refunded \
             ), back AS ( \
               SELECT d.api_key_id, sum(d.cost)::bigint AS total, \
                 COALESCE(sum(d.cost) FILTER \
                   (WHERE (d.ts AT TIME ZONE 'UTC')::date = u.day), 0)::bigint AS today, \
                 COALESCE(sum(d.cost) FILTER \
                   (WHERE date_trunc('month', d.ts AT TIME ZONE 'UTC')::date = u.month), 0)::bigint \
                   AS this_month \
               FROM done d JOIN api_usage u ON u.api_key_id = d.api_key_id \
               WHERE d.refunded GROUP BY d.api_key_id \
             ), refund AS ( \
               UPDATE api_usage u SET \
                 daily_requests = greatest(u.daily_requests - b.today, 0), \
                 monthly_requests = greatest(u.monthly_requests - b.this_month, 0), \
                 total_requests = greatest(u.total_requests - b.total, 0) \
               FROM back b WHERE u.api_key_id = b.api_key_id \
               RETURNING 1 \
             ) \
             SELECT request_id, refunded FROM done",
        )
        .bind(ids)
        .bind(status)
        .bind(ms)
        .bind(rx)
        .bind(tx)
        .fetch_all(&self.pool)
        .await?;
        let refunded = done.iter().filter(|(_, r)| *r).count() as u64;
        let found: std::collections::HashSet<String> = done.into_iter().map(|(id, _)| id).collect();
        Ok((
            outcomes
                .iter()
                .map(|o| found.contains(&o.request_id))
                .collect(),
            refunded,
        ))
    }

    async fn summarize(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        key_id: Option<i64>,
        top: u32,
    ) -> Result<UsageSummary, StoreError> {
        let days: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, \
                    count(*) FILTER (WHERE decision = 'allow') AS allowed, \
                    count(*) FILTER (WHERE decision = 'deny') AS denied \
             FROM api_requests_log \
             WHERE api = 'authz' AND ts >= $1 AND ts < $2 \
               AND ($3::bigint IS NULL OR api_key_id = $3) \
             GROUP BY 1 ORDER BY 1",
        )
        .bind(from)
        .bind(to)
        .bind(key_id)
        .fetch_all(&self.pool)
        .await?;
        let keys: Vec<(i64, Option<String>, i64, i64)> = sqlx::query_as(
            "SELECT l.api_key_id AS id, k.name AS name, \
                    count(*) FILTER (WHERE l.decision = 'allow') AS allowed, \
                    count(*) FILTER (WHERE l.decision = 'deny') AS denied \
             FROM api_requests_log l LEFT JOIN api_keys k ON k.id = l.api_key_id \
             WHERE l.api = 'authz' AND l.ts >= $1 AND l.ts < $2 AND l.api_key_id IS NOT NULL \
               AND ($3::bigint IS NULL OR l.api_key_id = $3) \
             GROUP BY l.api_key_id, k.name ORDER BY count(*) DESC, l.api_key_id LIMIT $4",
        )
        .bind(from)
        .bind(to)
        .bind(key_id)
        .bind(i64::from(top))
        .fetch_all(&self.pool)
        .await?;
        Ok(UsageSummary::from_rows(days, keys))
    }
    async fn write_batch(&self, rows: &[LogRow]) -> Result<(), StoreError> {
        // One statement per batch: the rows travel as arrays and UNNEST turns them back into rows.
        let mut ts = Vec::with_capacity(rows.len());
        let mut request_id = Vec::with_capacity(rows.len());
        let mut key_id = Vec::with_capacity(rows.len());
        let mut method = Vec::with_capacity(rows.len());
        let mut path = Vec::with_capacity(rows.len());
        let mut host = Vec::with_capacity(rows.len());
        let mut client = Vec::with_capacity(rows.len());
        let mut decision = Vec::with_capacity(rows.len());
        let mut reason = Vec::with_capacity(rows.len());
        let mut status = Vec::with_capacity(rows.len());
        let mut api = Vec::with_capacity(rows.len());
        let mut cost = Vec::with_capacity(rows.len());
        for r in rows {
            ts.push(r.ts);
            request_id.push(r.request_id.clone());
            key_id.push(r.key_id);
            method.push(r.method.clone());
            path.push(r.path.clone());
            host.push(r.host.clone());
            client.push(r.client_addr.clone());
            decision.push(if r.allowed { "allow" } else { "deny" });
            reason.push(r.reason);
            status.push(r.status as i16);
            api.push(r.api.as_str());
            cost.push(r.cost.min(i64::MAX as u64) as i64);
        }
        sqlx::query(
            "INSERT INTO api_requests_log (ts, request_id, api_key_id, method, path, host, \
               client_addr, decision, reason, status, api, cost) \
             SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::bigint[], $4::text[], \
               $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::smallint[], \
               $11::text[], $12::bigint[])",
        )
        .bind(ts)
        .bind(request_id)
        .bind(key_id)
        .bind(method)
        .bind(path)
        .bind(host)
        .bind(client)
        .bind(decision)
        .bind(reason)
        .bind(status)
        .bind(api)
        .bind(cost)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::AssertSqlSafe;

    /// Requests for different keys in one batch are answered from the statement's own rows, each
    /// as if it ran alone. Needs the PostgreSQL server of `scripts/test` (TEST_POSTGRES_URL).
    /// A store on a database of its own, with `keys` keys; dropped by [`drop_store`].
    async fn temp_store(keys: usize) -> (PgStore, PgPool, String, Vec<i64>) {
        let admin_url = std::env::var("TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = format!("tollgate_unit_{}", rand::random::<u32>());
        let admin = PgPool::connect(&admin_url).await.unwrap();
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        let url = format!("{}/{name}", admin_url.rsplit_once('/').unwrap().0);
        let settings = PgSettings {
            max_connections: 4,
            timeout: Duration::from_secs(5),
        };
        let store = PgStore::open(&url, settings).await.unwrap();
        store.migrate().await.unwrap();
        let mut ids = Vec::new();
        for i in 0..keys {
            let secret = keys::generate();
            let name = format!("k{i}");
            let key = store.create(&name, &secret, Limits::default(), None, Utc::now());
            ids.push(key.await.unwrap().id);
        }
        (store, admin, name, ids)
    }

    async fn drop_store(store: PgStore, admin: PgPool, name: String) {
        store.close().await;
        sqlx::query(AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
            .execute(&admin)
            .await
            .unwrap();
    }

    /// Two batches sharing keys in opposite orders, many times at once: the rows are locked in
    /// key order, so neither ever fails with a deadlock (which would show as an error here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_sharing_keys_in_opposite_orders_never_deadlock() {
        let (store, admin, name, ids) = temp_store(8).await;
        let run = |ids: Vec<i64>| {
            let pool = store.pool.clone();
            async move {
                let (day, month) = day_and_month(Utc::now());
                let n = ids.len();
                sqlx::query(CONSUME_BATCH_SQL)
                    .bind((0..n as i32).collect::<Vec<_>>())
                    .bind(ids)
                    .bind(vec![day; n])
                    .bind(vec![month; n])
                    .bind(vec![1i64; n])
                    .bind(vec![None::<i64>; n])
                    .bind(vec![None::<i64>; n])
                    .fetch_all(&pool)
                    .await
            }
        };
        let forward = ids.clone();
        let backward: Vec<i64> = ids.iter().rev().copied().collect();
        for _ in 0..100 {
            let (a, b) = tokio::join!(run(forward.clone()), run(backward.clone()));
            assert_eq!(a.expect("forward batch").len(), 8);
            assert_eq!(b.expect("backward batch").len(), 8);
        }
        let total: i64 = sqlx::query_scalar("SELECT sum(total_requests)::bigint FROM api_usage")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(total, 1600);
        drop_store(store, admin, name).await;
    }

    #[tokio::test]
    async fn a_batch_answers_every_request_from_one_statement() {
        let (store, admin, name, ids) = temp_store(4).await;
        let now = Utc::now();
        let quota = |daily, monthly| Quota { daily, monthly };
        let mut batch = Vec::new();
        let mut answers = Vec::new();
        for (key_id, quota, cost) in [
            (ids[0], quota(Some(0), None), 1),
            (ids[1], quota(Some(10), Some(2)), 3),
            (ids[2], quota(Some(5), Some(5)), 5),
            (ids[3], quota(None, None), 7),
        ] {
            let (pending, answer) = PendingConsume::new(key_id, quota, cost, now);
            batch.push(pending);
            answers.push(answer);
        }
        assert_eq!(consume_batch(&store.pool, batch).await, 0);
        let mut outcomes = Vec::new();
        for answer in answers {
            outcomes.push(answer.await.unwrap().unwrap());
        }
        use QuotaOutcome::*;
        assert_eq!(
            outcomes,
            [
                DailyExceeded { used: 0 },
                MonthlyExceeded { used: 0 },
                Admitted {
                    daily: 5,
                    monthly: 5
                },
                Admitted {
                    daily: 7,
                    monthly: 7
                },
            ]
        );
        drop_store(store, admin, name).await;
    }
}
