//! The embedded default: keys, quotas and the request log in one SQLite file.
//!
//! SQLite allows one writer at a time, so writes go through a pool of exactly one connection
//! (they queue in-process instead of failing with `SQLITE_BUSY`), and reads through a separate
//! pool that WAL mode lets run beside the writer. Other processes (`tollgate keys …` while
//! `serve` runs) wait on the busy timeout.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::AssertSqlSafe;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    KeyChange, KeyStore, LimitsPatch, LogRow, Maintenance, Outcome, PendingConsume, Quota,
    QuotaOutcome, QuotaStore, RequestLogSink, StoreError, Usage, UsageSummary, batch_answer,
    opt_i64, refusal, ts_text,
};
use crate::clock::{day_label, month_label};
use crate::keys::{self, ApiKey, KeyHash, KeyStatus, Limits, NewKey};

/// Rows per INSERT statement of the request log (12 parameters each; SQLite allows 32,766).
const LOG_ROWS_PER_STATEMENT: usize = 500;

/// Quota statements run together, in one transaction, per trip to the writer (see [`consume`]).
/// Batches are padded up to a power of two, so the writer caches 7 statements, not 64.
///
/// [`consume`]: QuotaStore::consume
const MAX_CONSUME_BATCH: usize = 64;

/// How long the quota writer keeps the write connection while requests keep coming, and how
/// long it waits for the next request before giving the connection back.
const WRITER_HOLD: Duration = Duration::from_millis(10);
const WRITER_LINGER: Duration = Duration::from_millis(1);

#[derive(Debug, Clone)]
pub struct SqliteStore {
    read: SqlitePool,
    write: SqlitePool,
    consumes: mpsc::Sender<PendingConsume>,
}

impl SqliteStore {
    /// Opens (creating when missing) the database file named by a `sqlite://PATH` URL.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL: a commit survives a process crash; only an OS crash can lose the
            // last transactions. The quota counters are not worth an fsync per request here.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            // No ping before each use: a file is not a server that goes away, and the ping is a
            // round trip to sqlx's SQLite thread, as slow as a quota statement.
            .test_before_acquire(false)
            // A quota batch answers with up to two rows per request.
            .connect_with(options.clone().row_buffer_size(4 * MAX_CONSUME_BATCH))
            .await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
            .connect_with(options.read_only(false))
            .await?;
        let (consumes, queue) = mpsc::channel(16 * MAX_CONSUME_BATCH);
        tokio::spawn(consume_writer(write.clone(), queue));
        Ok(Self {
            read,
            write,
            consumes,
        })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.write)
            .await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }

    async fn changes_since(&self, cursor: i64) -> Result<(Vec<KeyHash>, i64), StoreError> {
        let rows = sqlx::query(
            "SELECT key_hash, change_seq FROM api_keys WHERE change_seq > ?1 ORDER BY change_seq",
        )
        .bind(cursor)
        .fetch_all(&self.read)
        .await?;
        let mut next = cursor;
        let mut hashes = Vec::with_capacity(rows.len());
        for row in rows {
            let hex: String = row.try_get("key_hash")?;
            next = next.max(row.try_get("change_seq")?);
            hashes.push(parse_hash_hex(&hex).ok_or_else(|| StoreError::Corrupt {
                table: "api_keys",
                detail: format!("key_hash {hex:?}"),
            })?);
        }
        Ok((hashes, next))
    }

    async fn change_cursor(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(change_seq), 0) FROM api_keys")
                .fetch_one(&self.read)
                .await?,
        )
    }

    async fn key_by_id(&self, pool: &SqlitePool, id: i64) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, prefix, status, expires_at, per_minute, daily_limit, monthly_limit, refund_5xx \
             FROM api_keys WHERE id = ?1",
        )
        .bind(id)
        .fetch_optional(pool)
        .await?;
        row.map(|r| key_from_row(&r)).transpose()
    }
}

fn key_from_row(row: &SqliteRow) -> Result<ApiKey, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        table: "api_keys",
        detail,
    };
    let status: String = row.try_get("status")?;
    let expires_at: Option<String> = row.try_get("expires_at")?;
    let limit = |col: &str| -> Result<Option<u64>, StoreError> {
        Ok(row.try_get::<Option<i64>, _>(col)?.map(|v| v.max(0) as u64))
    };
    Ok(ApiKey {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        status: KeyStatus::parse(&status).ok_or_else(|| corrupt(format!("status {status:?}")))?,
        expires_at: expires_at
            .map(|s| {
                DateTime::parse_from_rfc3339(&s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| corrupt(format!("expires_at {s:?}: {e}")))
            })
            .transpose()?,
        limits: Limits {
            per_minute: limit("per_minute")?,
            daily: limit("daily_limit")?,
            monthly: limit("monthly_limit")?,
            refund_5xx: row.try_get::<i64, _>("refund_5xx")? != 0,
        },
    })
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, prefix, status, expires_at, per_minute, daily_limit, monthly_limit, refund_5xx \
             FROM api_keys WHERE key_hash = ?1",
        )
        .bind(keys::hash_hex(hash))
        .fetch_optional(&self.read)
        .await?;
        row.map(|r| key_from_row(&r)).transpose()
    }

    async fn watch_changes(
        &self,
        interval: Duration,
        on_change: &(dyn Fn(KeyChange) + Send + Sync),
        stop: CancellationToken,
    ) {
        // SQLite has one writer at a time, so change_seq grows in commit order and a cursor
        // over it misses nothing.
        let mut cursor: Option<i64> = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let polled = match cursor {
                None => self.change_cursor().await.map(|c| (KeyChange::All, c)),
                Some(from) => self
                    .changes_since(from)
                    .await
                    .map(|(hashes, next)| (KeyChange::Keys(hashes), next)),
            };
            match polled {
                Ok((KeyChange::Keys(hashes), _)) if hashes.is_empty() => {}
                Ok((change, next)) => {
                    on_change(change);
                    cursor = Some(next);
                }
                Err(e) => tracing::warn!(error = %e, "key change poll failed"),
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
        let now_text = ts_text(now);
        let mut tx = self.write.begin().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO api_keys (name, prefix, key_hash, status, expires_at, per_minute, \
               daily_limit, monthly_limit, created_at, updated_at, change_seq, refund_5xx) \
             VALUES (?1, ?2, ?3, 'active', ?4, ?5, ?6, ?7, ?8, ?8, \
               (SELECT COALESCE(MAX(change_seq), 0) + 1 FROM api_keys), ?9) \
             RETURNING id",
        )
        .bind(name)
        .bind(&key.prefix)
        .bind(keys::hash_hex(&key.hash))
        .bind(expires_at.map(ts_text))
        .bind(opt_i64(limits.per_minute))
        .bind(opt_i64(limits.daily))
        .bind(opt_i64(limits.monthly))
        .bind(&now_text)
        .bind(limits.refund_5xx as i64)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO api_usage (api_key_id, day, month, updated_at) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(id)
        .bind(day_label(now))
        .bind(month_label(now))
        .bind(&now_text)
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
        self.key_by_id(&self.read, id).await
    }

    async fn list(&self) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, prefix, status, expires_at, per_minute, daily_limit, monthly_limit, refund_5xx \
             FROM api_keys ORDER BY id",
        )
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn revoke(&self, id: i64, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE api_keys SET status = 'revoked', updated_at = ?2, \
               change_seq = (SELECT COALESCE(MAX(change_seq), 0) + 1 FROM api_keys) \
             WHERE id = ?1",
        )
        .bind(id)
        .bind(ts_text(now))
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_limits(
        &self,
        id: i64,
        patch: LimitsPatch,
        now: DateTime<Utc>,
    ) -> Result<Option<ApiKey>, StoreError> {
        // Read and write in one transaction on the single writer connection: no other write
        // can slip between them.
        let mut tx = self.write.begin().await?;
        let Some(row) = sqlx::query(
            "SELECT id, name, prefix, status, expires_at, per_minute, daily_limit, monthly_limit, refund_5xx \
             FROM api_keys WHERE id = ?1",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let mut key = key_from_row(&row)?;
        key.limits = patch.apply(key.limits);
        sqlx::query(
            "UPDATE api_keys SET per_minute = ?2, daily_limit = ?3, monthly_limit = ?4, \
               updated_at = ?5, refund_5xx = ?6, \
               change_seq = (SELECT COALESCE(MAX(change_seq), 0) + 1 FROM api_keys) \
             WHERE id = ?1",
        )
        .bind(id)
        .bind(opt_i64(key.limits.per_minute))
        .bind(opt_i64(key.limits.daily))
        .bind(opt_i64(key.limits.monthly))
        .bind(ts_text(now))
        .bind(key.limits.refund_5xx as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(key))
    }

    async fn usage(&self, id: i64, now: DateTime<Utc>) -> Result<Usage, StoreError> {
        let row: Option<(i64, i64, i64)> = sqlx::query_as(
            "SELECT CASE WHEN day = ?2 THEN daily_requests ELSE 0 END AS daily, \
                    CASE WHEN month = ?3 THEN monthly_requests ELSE 0 END AS monthly, \
                    total_requests AS total \
             FROM api_usage WHERE api_key_id = ?1",
        )
        .bind(id)
        .bind(day_label(now))
        .bind(month_label(now))
        .fetch_optional(&self.read)
        .await?;
        Ok(row.map(Usage::from_counts).unwrap_or_default())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }
}

pub(crate) fn parse_hash_hex(hex: &str) -> Option<KeyHash> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The statement that checks and spends quota. Its parameters, in order: key id, day, month,
/// cost, daily limit, monthly limit, now; positional, in a one-row `VALUES`, so that several
/// copies can run in one query (sqlx binds numbered parameters wrongly across statements).
/// Public so the benchmark can time it alone.
pub const CONSUME_SQL: &str = "WITH r (key_id, day, month, cost, daily_limit, monthly_limit, now) \
       AS (VALUES (?, ?, ?, ?, ?, ?, ?)) \
     UPDATE api_usage SET \
       daily_requests = (CASE WHEN api_usage.day = r.day THEN daily_requests ELSE 0 END) + r.cost, \
       monthly_requests = (CASE WHEN api_usage.month = r.month THEN monthly_requests ELSE 0 END) \
         + r.cost, \
       total_requests = total_requests + r.cost, \
       day = r.day, month = r.month, updated_at = r.now \
     FROM r WHERE api_usage.api_key_id = r.key_id \
       AND (r.daily_limit IS NULL OR (CASE WHEN api_usage.day = r.day \
         THEN daily_requests ELSE 0 END) + r.cost <= r.daily_limit) \
       AND (r.monthly_limit IS NULL OR (CASE WHEN api_usage.month = r.month \
         THEN monthly_requests ELSE 0 END) + r.cost <= r.monthly_limit) \
     RETURNING daily_requests, monthly_requests";

/// A key's daily and monthly counters as they count today (an earlier day or month reads as 0).
/// Parameters, in order: key id, day, month.
const USAGE_NOW_SQL: &str = "WITH r (key_id, day, month) AS (VALUES (?, ?, ?)) \
     SELECT CASE WHEN u.day = r.day THEN u.daily_requests ELSE 0 END, \
       CASE WHEN u.month = r.month THEN u.monthly_requests ELSE 0 END \
     FROM api_usage u JOIN r ON u.api_key_id = r.key_id";

/// One request on its own: [`CONSUME_SQL`], and when it admits nothing, the read that tells why
/// (creating a missing usage row and trying again).
async fn consume_one(
    conn: &mut SqliteConnection,
    key_id: i64,
    quota: Quota,
    cost: i64,
    now: DateTime<Utc>,
) -> Result<QuotaOutcome, StoreError> {
    let (day, month, now_text) = (day_label(now), month_label(now), ts_text(now));
    // Three tries: the usage row may be missing, and a refusal is classified by a second read
    // that another process's rollover could confuse.
    for _ in 0..3 {
        // The one statement that checks and spends quota. Counters from an earlier day or
        // month count as 0 (DESIGN rule 2), both in the room-left test and in the new value.
        let admitted = sqlx::query(CONSUME_SQL)
            .bind(key_id)
            .bind(&day)
            .bind(&month)
            .bind(cost)
            .bind(opt_i64(quota.daily))
            .bind(opt_i64(quota.monthly))
            .bind(&now_text)
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = admitted {
            return Ok(QuotaOutcome::Admitted {
                daily: row.try_get::<i64, _>(0)? as u64,
                monthly: row.try_get::<i64, _>(1)? as u64,
            });
        }
        // No row came back: either there is no usage row, or a limit has no room. Tell
        // which, so "no row" never reads as "limit exceeded".
        let current = sqlx::query(USAGE_NOW_SQL)
            .bind(key_id)
            .bind(&day)
            .bind(&month)
            .fetch_optional(&mut *conn)
            .await?;
        let Some(current) = current else {
            sqlx::query(
                "INSERT INTO api_usage (api_key_id, day, month, updated_at) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (api_key_id) DO NOTHING",
            )
            .bind(key_id)
            .bind(&day)
            .bind(&month)
            .bind(&now_text)
            .execute(&mut *conn)
            .await?;
            continue;
        };
        let daily_used = current.try_get::<i64, _>(0)?.max(0) as u64;
        let monthly_used = current.try_get::<i64, _>(1)?.max(0) as u64;
        if let Some(refused) = refusal(quota, cost as u64, daily_used, monthly_used) {
            return Ok(refused);
        }
    }
    Err(StoreError::Corrupt {
        table: "api_usage",
        detail: format!("quota update for key {key_id} neither admitted nor refused"),
    })
}

/// Runs queued quota requests until every [`SqliteStore`] handle is gone.
///
/// The writer keeps the write connection while requests keep coming, up to [`WRITER_HOLD`], so
/// the request log and key changes still get it often. sqlx pings a connection on every return to
/// its pool, a round trip to the SQLite thread as slow as the batch itself; holding it across
/// batches pays that once per hold instead of once per batch.
async fn consume_writer(write: SqlitePool, mut queue: mpsc::Receiver<PendingConsume>) {
    let mut batch = Vec::with_capacity(MAX_CONSUME_BATCH);
    while queue.recv_many(&mut batch, MAX_CONSUME_BATCH).await > 0 {
        let mut conn = match write.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                let e = StoreError::from(e);
                for p in batch.drain(..) {
                    p.reply.send(Err(e.duplicate())).ok();
                }
                continue;
            }
        };
        let held = tokio::time::Instant::now();
        loop {
            if consume_batch(&mut conn, &mut batch).await.is_none() {
                // sqlx 0.9 leaves a cached multi-statement query that failed part-way in a
                // state whose next use panics its worker thread: this connection goes.
                conn.close_on_drop();
                break;
            }
            batch.clear();
            let linger = WRITER_LINGER.min(WRITER_HOLD.saturating_sub(held.elapsed()));
            if linger.is_zero() {
                break;
            }
            match tokio::time::timeout(linger, queue.recv_many(&mut batch, MAX_CONSUME_BATCH)).await
            {
                Ok(0) => return,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
}

/// One transaction: for request `i`, [`CONSUME_SQL`], and when it updated nothing,
/// [`USAGE_NOW_SQL`], which tells which limit had no room. Rows come back tagged with `i` and
/// whether they are an admission (1) or a read (0).
fn batch_sql(size: usize) -> String {
    let mut sql = String::from("BEGIN IMMEDIATE;\n");
    for i in 0..size {
        let update = CONSUME_SQL.replace(
            "RETURNING daily_requests",
            &format!("RETURNING {i}, 1, daily_requests"),
        );
        let read = USAGE_NOW_SQL.replacen("SELECT ", &format!("SELECT {i}, 0, "), 1);
        sql.push_str(&format!("{update};\n{read} WHERE changes() = 0;\n"));
    }
    sql.push_str("COMMIT;");
    sql
}

fn batch_sql_for(len: usize) -> &'static str {
    static SQL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        (0..=MAX_CONSUME_BATCH.trailing_zeros())
            .map(|p| batch_sql(1 << p))
            .collect()
    });
    &all[len.next_power_of_two().trailing_zeros() as usize]
}

/// Answers every request in `batch`. The padding statements (past `batch.len()`) have no
/// parameters bound, so their key id is NULL and they match no row. Returns how many requests
/// had to be run alone (see below), or `None` when the batch failed: the requests were then
/// answered one by one, and the connection must not run the batch again.
async fn consume_batch(
    conn: &mut SqliteConnection,
    batch: &mut Vec<PendingConsume>,
) -> Option<usize> {
    let mut query = sqlx::query(AssertSqlSafe(batch_sql_for(batch.len())));
    for p in batch.iter() {
        let (day, month) = (day_label(p.now), month_label(p.now));
        query = query
            .bind(p.key_id)
            .bind(day.clone())
            .bind(month.clone())
            .bind(p.cost)
            .bind(opt_i64(p.quota.daily))
            .bind(opt_i64(p.quota.monthly))
            .bind(ts_text(p.now))
            .bind(p.key_id)
            .bind(day)
            .bind(month);
    }
    let rows = match query.fetch_all(&mut *conn).await {
        Ok(rows) => rows,
        Err(e) => {
            // Nothing was committed. Each request on its own, so one that fails says why and
            // the others are not refused with it.
            tracing::debug!(error = %e, size = batch.len(), "quota batch failed; one at a time");
            sqlx::query("ROLLBACK").execute(&mut *conn).await.ok();
            for p in batch.drain(..) {
                let outcome = consume_one(conn, p.key_id, p.quota, p.cost, p.now).await;
                p.reply.send(outcome).ok();
            }
            return None;
        }
    };
    let mut answers: Vec<Option<QuotaOutcome>> = vec![None; batch.len()];
    for row in &rows {
        let (Ok(i), Ok(admitted), Ok(daily), Ok(monthly)) = (
            row.try_get::<i64, _>(0),
            row.try_get::<i64, _>(1),
            row.try_get::<i64, _>(2),
            row.try_get::<i64, _>(3),
        ) else {
            continue;
        };
        if let Some((i, outcome)) = batch_answer(batch, i, admitted == 1, daily, monthly) {
            answers[i] = Some(outcome);
        }
    }
    let mut alone = 0;
    for (p, answer) in batch.drain(..).zip(answers) {
        let outcome = match answer {
            Some(outcome) => Ok(outcome),
            // No usage row (a key created by an older version), or a refusal the read does not
            // explain: the single path creates the row, or asks again.
            None => {
                alone += 1;
                consume_one(conn, p.key_id, p.quota, p.cost, p.now).await
            }
        };
        p.reply.send(outcome).ok();
    }
    Some(alone)
}

#[async_trait]
impl QuotaStore for SqliteStore {
    async fn give_back(
        &self,
        key_id: i64,
        units: u64,
        spent_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE api_usage SET \
               daily_requests = CASE WHEN day = ?2 THEN max(daily_requests - ?4, 0) \
                 ELSE daily_requests END, \
               monthly_requests = CASE WHEN month = ?3 THEN max(monthly_requests - ?4, 0) \
                 ELSE monthly_requests END, \
               total_requests = max(total_requests - ?4, 0) \
             WHERE api_key_id = ?1",
        )
        .bind(key_id)
        .bind(day_label(spent_at))
        .bind(month_label(spent_at))
        .bind(units.min(i64::MAX as u64) as i64)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// Queues the request for the writer task, which runs every request waiting at the time in
    /// one transaction, each as its own [`CONSUME_SQL`] statement, in one trip to SQLite's thread.
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

/// Deletes up to 5,000 log rows older than `?1`, through the index on `ts` (migration 0006), so
/// an hourly run reads only the rows it deletes.
const PRUNE_LOG_SQL: &str = "DELETE FROM api_requests_log WHERE id IN \
     (SELECT id FROM api_requests_log WHERE ts < ?1 LIMIT 5000)";

#[async_trait]
impl RequestLogSink for SqliteStore {
    async fn maintain(
        &self,
        now: DateTime<Utc>,
        retention: Option<Duration>,
    ) -> Result<Maintenance, StoreError> {
        let mut report = Maintenance::default();
        let Some(retention) = retention else {
            return Ok(report);
        };
        let cutoff =
            ts_text(now - chrono::Duration::from_std(retention).unwrap_or(chrono::TimeDelta::MAX));
        // In batches, so the single writer is never held for long.
        loop {
            let done = sqlx::query(PRUNE_LOG_SQL)
                .bind(&cutoff)
                .execute(&self.write)
                .await?;
            report.rows_deleted += done.rows_affected();
            if done.rows_affected() < 5000 {
                return Ok(report);
            }
        }
    }

    async fn complete(&self, outcomes: &[Outcome]) -> Result<(Vec<bool>, u64), StoreError> {
        let mut tx = self.write.begin().await?;
        let mut found = Vec::with_capacity(outcomes.len());
        let mut refunded = 0;
        for o in outcomes {
            let rows = sqlx::query(
                "UPDATE api_requests_log SET response_status = ?2, duration_ms = ?3, \
                   bytes_received = ?4, bytes_sent = ?5, \
                   refunded = (?2 >= 500 AND decision = 'allow' AND cost > 0 AND \
                     COALESCE((SELECT refund_5xx FROM api_keys WHERE id = api_key_id), 0) = 1) \
                 WHERE request_id = ?1 AND api = 'authz' AND response_status IS NULL \
                 RETURNING api_key_id, ts, cost, refunded",
            )
            .bind(&o.request_id)
            .bind(i64::from(o.status))
            .bind(o.duration_ms.map(|d| d.min(i64::MAX as u64) as i64))
            .bind(o.bytes_received.min(i64::MAX as u64) as i64)
            .bind(o.bytes_sent.min(i64::MAX as u64) as i64)
            .fetch_all(&mut *tx)
            .await?;
            found.push(!rows.is_empty());
            for row in rows {
                if row.try_get::<i64, _>("refunded")? == 0 {
                    continue;
                }
                let ts: String = row.try_get("ts")?;
                // Give the cost back to the counters of the day and month it was spent in.
                sqlx::query(
                    "UPDATE api_usage SET \
                       daily_requests = CASE WHEN day = substr(?2, 1, 10) \
                         THEN max(daily_requests - ?3, 0) ELSE daily_requests END, \
                       monthly_requests = CASE WHEN month = substr(?2, 1, 7) \
                         THEN max(monthly_requests - ?3, 0) ELSE monthly_requests END, \
                       total_requests = max(total_requests - ?3, 0) \
                     WHERE api_key_id = ?1",
                )
                .bind(row.try_get::<Option<i64>, _>("api_key_id")?)
                .bind(ts)
                .bind(row.try_get::<i64, _>("cost")?)
                .execute(&mut *tx)
                .await?;
                refunded += 1;
            }
        }
        tx.commit().await?;
        Ok((found, refunded))
    }

    async fn summarize(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        key_id: Option<i64>,
        top: u32,
    ) -> Result<UsageSummary, StoreError> {
        // Times are RFC 3339 text in UTC, so a text range is a time range and the first ten
        // characters are the day.
        let days: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT substr(ts, 1, 10) AS day, \
                    SUM(decision = 'allow') AS allowed, SUM(decision = 'deny') AS denied \
             FROM api_requests_log \
             WHERE api = 'authz' AND ts >= ?1 AND ts < ?2 AND (?3 IS NULL OR api_key_id = ?3) \
             GROUP BY day ORDER BY day",
        )
        .bind(ts_text(from))
        .bind(ts_text(to))
        .bind(key_id)
        .fetch_all(&self.read)
        .await?;
        let keys: Vec<(i64, Option<String>, i64, i64)> = sqlx::query_as(
            "SELECT l.api_key_id AS id, k.name AS name, \
                    SUM(l.decision = 'allow') AS allowed, SUM(l.decision = 'deny') AS denied \
             FROM api_requests_log l LEFT JOIN api_keys k ON k.id = l.api_key_id \
             WHERE l.api = 'authz' AND l.ts >= ?1 AND l.ts < ?2 AND l.api_key_id IS NOT NULL \
               AND (?3 IS NULL OR l.api_key_id = ?3) \
             GROUP BY l.api_key_id, k.name ORDER BY COUNT(*) DESC, l.api_key_id LIMIT ?4",
        )
        .bind(ts_text(from))
        .bind(ts_text(to))
        .bind(key_id)
        .bind(i64::from(top))
        .fetch_all(&self.read)
        .await?;
        Ok(UsageSummary::from_rows(days, keys))
    }
    async fn write_batch(&self, rows: &[LogRow]) -> Result<(), StoreError> {
        // Multi-row INSERTs: every statement is a round trip to sqlx's SQLite thread, and the
        // single writer connection is held meanwhile (quota statements wait for it).
        let mut tx = self.write.begin().await?;
        for chunk in rows.chunks(LOG_ROWS_PER_STATEMENT) {
            let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO api_requests_log (ts, request_id, api_key_id, method, path, host, \
                   client_addr, decision, reason, status, api, cost) ",
            );
            insert.push_values(chunk, |mut b, row| {
                b.push_bind(ts_text(row.ts))
                    .push_bind(row.request_id.clone())
                    .push_bind(row.key_id)
                    .push_bind(row.method.clone())
                    .push_bind(row.path.clone())
                    .push_bind(row.host.clone())
                    .push_bind(row.client_addr.clone())
                    .push_bind(if row.allowed { "allow" } else { "deny" })
                    .push_bind(row.reason)
                    .push_bind(row.status as i64)
                    .push_bind(row.api.as_str())
                    .push_bind(row.cost.min(i64::MAX as u64) as i64);
            });
            // Only the full-size statement is kept prepared: the odd sizes of the last chunk would
            // push the quota statements out of the connection's statement cache.
            insert
                .build()
                .persistent(chunk.len() == LOG_ROWS_PER_STATEMENT)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migrated store in a temporary directory (kept while the directory lives).
    async fn migrated_store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&format!("sqlite://{}/t.db", dir.path().display()))
            .await
            .unwrap();
        store.migrate().await.unwrap();
        (dir, store)
    }

    /// Retention and `tollgate usage` find rows by time through an index, never by reading the
    /// whole log.
    #[tokio::test]
    async fn the_log_is_searched_by_time_through_an_index() {
        let (_dir, store) = migrated_store().await;
        let prune = PRUNE_LOG_SQL.replace("?1", "'2026-01-01T00:00:00.000Z'");
        let plan: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {prune}")))
                .fetch_all(&store.read)
                .await
                .unwrap();
        let steps: Vec<&str> = plan.iter().map(|r| r.3.as_str()).collect();
        assert!(
            steps
                .iter()
                .any(|s| s.contains("USING") && s.contains("api_requests_log_ts")),
            "{steps:?}"
        );
        assert!(
            !steps.iter().any(|s| s.starts_with("SCAN api_requests_log")),
            "{steps:?}"
        );
    }

    /// Requests in one batch are answered from the batch's own rows, not one by one, and as if
    /// each ran alone in turn.
    #[tokio::test]
    async fn a_batch_answers_every_request_from_one_query() {
        let (_dir, store) = migrated_store().await;
        let now = Utc::now();
        let mut ids = Vec::new();
        for name in ["a", "b"] {
            let secret = keys::generate();
            let key = store.create(name, &secret, Limits::default(), None, now);
            ids.push(key.await.unwrap().id);
        }
        let (a, b) = (ids[0], ids[1]);
        let daily_2 = Quota {
            daily: Some(2),
            monthly: None,
        };
        let monthly_9 = Quota {
            daily: None,
            monthly: Some(9),
        };
        let mut batch = Vec::new();
        let mut answers = Vec::new();
        for (key_id, quota, cost) in [
            (a, daily_2, 1),
            (b, monthly_9, 4),
            (a, daily_2, 1),
            (b, monthly_9, 4),
            (a, daily_2, 1),
            (b, monthly_9, 4),
        ] {
            let (pending, answer) = PendingConsume::new(key_id, quota, cost, now);
            batch.push(pending);
            answers.push(answer);
        }
        let mut conn = store.write.acquire().await.unwrap();
        assert_eq!(consume_batch(&mut conn, &mut batch).await, Some(0));
        let mut outcomes = Vec::new();
        for answer in answers {
            outcomes.push(answer.await.unwrap().unwrap());
        }
        use QuotaOutcome::*;
        assert_eq!(
            outcomes,
            [
                Admitted {
                    daily: 1,
                    monthly: 1
                },
                Admitted {
                    daily: 4,
                    monthly: 4
                },
                Admitted {
                    daily: 2,
                    monthly: 2
                },
                Admitted {
                    daily: 8,
                    monthly: 8
                },
                DailyExceeded { used: 2 },
                MonthlyExceeded { used: 8 },
            ]
        );
    }

    #[test]
    fn hash_hex_round_trips() {
        let h = keys::hash("tg_x");
        assert_eq!(parse_hash_hex(&keys::hash_hex(&h)), Some(h));
        assert_eq!(parse_hash_hex("zz"), None);
        assert_eq!(parse_hash_hex(&"g".repeat(64)), None);
    }
}
