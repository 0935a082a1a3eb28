//! Quotas on SQLite: a writer task takes every quota request waiting at one moment (up to 64) and
//! runs them in one transaction, in one trip to sqlx's SQLite thread. Each request is its own
//! [`CONSUME_SQL`] followed by [`ANSWER_SQL`], which reads what the update did and the counters
//! (the ones that tell a daily from a monthly refusal when it admitted nothing); a lone request
//! is a batch of one.
//!
//! sqlx binds numbered parameters (`?8`) wrongly when a query holds several statements, so both
//! statements take positional `?` parameters, a value bound once for each place it is used.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::AssertSqlSafe;
use sqlx::sqlite::{SqliteConnection, SqlitePool};
use tokio::sync::mpsc;

use super::{SqliteStore, ts_text};
use crate::clock::{day_label, month_label};
use crate::store::consume::{
    BatchRow, GiveBacks, PendingConsume, SharedRow, answer_batch, answer_shared, fail_batch,
};
use crate::store::keys::opt_i64;
use crate::store::quota::{count_i64, daily_now, monthly_now};
use crate::store::{Quota, QuotaOutcome, QuotaStore, SharedOutcome, Spend, StoreError, Usage};

/// Quota requests run together, in one transaction, per trip to the writer. Batches are padded
/// up to a power of two, so the writer caches 7 statements, not 64.
const MAX_CONSUME_BATCH: usize = 64;

/// Rows a batch may answer with: one per request (room to spare).
pub(super) const ROW_BUFFER: usize = 4 * MAX_CONSUME_BATCH;

/// How long the quota writer keeps the write connection while requests keep coming, and how
/// long it waits for the next request before giving the connection back.
const WRITER_HOLD: Duration = Duration::from_millis(10);
const WRITER_LINGER: Duration = Duration::from_millis(1);

/// The statement that checks and spends quota: a plain `UPDATE` of the key's row, so SQLite runs
/// it in one pass over one row. (A `WITH … UPDATE … FROM … RETURNING` form binds each value once,
/// but SQLite materialises the CTE, the `FROM` and the `RETURNING` rows into three temporary
/// tables per statement: most of a quota request's CPU.) Positional parameters, in order (see
/// [`CONSUME_PARAMS`]): day, cost, month, cost, cost, day, month, now, key id, daily limit, day,
/// cost, daily limit, monthly limit, month, cost, monthly limit (a NULL limit is unlimited). A
/// counter from an earlier day or month counts as 0 (DESIGN rule 2). Public so the benchmark can
/// time it alone.
pub const CONSUME_SQL: &str = concat!(
    "UPDATE api_usage SET daily_requests = ",
    daily_now!("api_usage", "?"),
    " + ?, monthly_requests = ",
    monthly_now!("api_usage", "?"),
    " + ?, total_requests = total_requests + ?, \
       day = max(day, ?), month = max(month, ?), updated_at = ? \
     WHERE api_key_id = ? \
       AND (? IS NULL OR ",
    daily_now!("api_usage", "?"),
    " + ? <= ?) \
       AND (? IS NULL OR ",
    monthly_now!("api_usage", "?"),
    " + ? <= ?)"
);

/// One value of a quota request, as [`CONSUME_SQL`] and [`ANSWER_SQL`] take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumeParam {
    Index,
    KeyId,
    Day,
    Month,
    Cost,
    DailyLimit,
    MonthlyLimit,
    Now,
}

/// What each `?` of [`CONSUME_SQL`] stands for, in order.
pub const CONSUME_PARAMS: [ConsumeParam; 17] = {
    use ConsumeParam::*;
    [
        Day,
        Cost,
        Month,
        Cost,
        Cost,
        Day,
        Month,
        Now,
        KeyId,
        DailyLimit,
        Day,
        Cost,
        DailyLimit,
        MonthlyLimit,
        Month,
        Cost,
        MonthlyLimit,
    ]
};

/// Run right after [`CONSUME_SQL`] in the same transaction: the request's answer. `changes()` is
/// what the update changed: 1, admitted, with the counters as the update left them; 0, refused,
/// with the counters as they count now, which tell a daily from a monthly refusal. No row: the
/// key has no usage row. Parameters: [`ANSWER_PARAMS`].
const ANSWER_SQL: &str = concat!(
    "SELECT ? AS i, changes() > 0 AS admitted, \
       CASE WHEN changes() > 0 THEN daily_requests ELSE ",
    daily_now!("u", "?"),
    " END AS daily, \
       CASE WHEN changes() > 0 THEN monthly_requests ELSE ",
    monthly_now!("u", "?"),
    " END AS monthly FROM api_usage u WHERE u.api_key_id = ?"
);

/// What each `?` of [`ANSWER_SQL`] stands for, in order.
const ANSWER_PARAMS: [ConsumeParam; 4] = [
    ConsumeParam::Index,
    ConsumeParam::Day,
    ConsumeParam::Month,
    ConsumeParam::KeyId,
];

/// Gives units back to the day and month they were spent in. Parameters: key id, day, month,
/// units.
pub(super) const GIVE_BACK_SQL: &str = "UPDATE api_usage SET \
       daily_requests = CASE WHEN day = ?2 THEN max(daily_requests - ?4, 0) \
         ELSE daily_requests END, \
       monthly_requests = CASE WHEN month = ?3 THEN max(monthly_requests - ?4, 0) \
         ELSE monthly_requests END, \
       total_requests = max(total_requests - ?4, 0) \
     WHERE api_key_id = ?1";

/// [`GIVE_BACK_SQL`] for an identity's counters. Parameters: identity id, day, month, units.
const GIVE_BACK_IDENTITY_SQL: &str = "UPDATE identity_usage SET \
       daily_requests = CASE WHEN day = ?2 THEN max(daily_requests - ?4, 0) \
         ELSE daily_requests END, \
       monthly_requests = CASE WHEN month = ?3 THEN max(monthly_requests - ?4, 0) \
         ELSE monthly_requests END, \
       total_requests = max(total_requests - ?4, 0) \
     WHERE identity_id = ?1";

/// [`GIVE_BACK_IDENTITY_SQL`] for the identity of key `?1`, if it has one (a refund).
pub(super) const GIVE_BACK_KEYS_IDENTITY_SQL: &str = "UPDATE identity_usage SET \
       daily_requests = CASE WHEN day = ?2 THEN max(daily_requests - ?4, 0) \
         ELSE daily_requests END, \
       monthly_requests = CASE WHEN month = ?3 THEN max(monthly_requests - ?4, 0) \
         ELSE monthly_requests END, \
       total_requests = max(total_requests - ?4, 0) \
     WHERE identity_id = (SELECT identity_id FROM api_keys WHERE id = ?1)";

/// Starts the quota writer on the write pool; returns its queue, and where it gives back what it
/// spent for requests nobody waits for any more. The writer ends when every sender is gone.
pub(super) fn start_writer(write: SqlitePool) -> (mpsc::Sender<PendingConsume>, GiveBacks) {
    let (consumes, queue) = mpsc::channel(16 * MAX_CONSUME_BATCH);
    let give_backs = {
        let write = write.clone();
        GiveBacks::start(move |spent| {
            let write = write.clone();
            async move { give_back(&write, spent).await }
        })
    };
    tokio::spawn(writer(write, queue, give_backs.clone()));
    (consumes, give_backs)
}

/// Runs queued quota requests until every [`SqliteStore`] handle is gone.
///
/// The writer keeps the write connection while requests keep coming, up to [`WRITER_HOLD`], so
/// the request log and key changes still get it often. sqlx pings a connection on every return to
/// its pool, a round trip to the SQLite thread as slow as the batch itself; holding it across
/// batches pays that once per hold instead of once per batch.
async fn writer(
    write: SqlitePool,
    mut queue: mpsc::Receiver<PendingConsume>,
    give_backs: GiveBacks,
) {
    let mut batch = Vec::with_capacity(MAX_CONSUME_BATCH);
    while queue.recv_many(&mut batch, MAX_CONSUME_BATCH).await > 0 {
        // Requests whose checks gave up waiting (a deadline, a cancel) are not run at all.
        batch.retain(|p| !p.is_abandoned());
        if batch.is_empty() {
            continue;
        }
        let mut conn = match write.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                fail_batch(std::mem::take(&mut batch), &e.into());
                continue;
            }
        };
        let held = tokio::time::Instant::now();
        loop {
            batch.retain(|p| !p.is_abandoned());
            let busy = give_backs.in_flight();
            let kept = consume_batch(&mut conn, std::mem::take(&mut batch), &give_backs).await;
            drop(busy);
            if !kept {
                // sqlx 0.9 leaves a cached multi-statement query that failed part-way in a
                // state whose next use panics its worker thread: this connection goes.
                conn.close_on_drop();
                break;
            }
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

/// `BEGIN IMMEDIATE`, then for each request [`CONSUME_SQL`] and [`ANSWER_SQL`], then `COMMIT`.
fn batch_sql(size: usize) -> String {
    let mut sql = String::from("BEGIN IMMEDIATE;\n");
    for _ in 0..size {
        sql.push_str(CONSUME_SQL);
        sql.push_str(";\n");
        sql.push_str(ANSWER_SQL);
        sql.push_str(";\n");
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

/// Runs `batch` as one transaction, the statement padded to a power of two (the padding has no
/// parameters bound, so its key id is NULL and it matches no row), and answers every request.
/// `persistent`: whether sqlx keeps the statement prepared.
async fn run(
    conn: &mut SqliteConnection,
    batch: &[PendingConsume],
    persistent: bool,
) -> Result<Vec<BatchRow>, sqlx::Error> {
    let mut query =
        sqlx::query_as(AssertSqlSafe(batch_sql_for(batch.len()))).persistent(persistent);
    for (i, p) in batch.iter().enumerate() {
        let (day, month, now) = (day_label(p.now), month_label(p.now), ts_text(p.now));
        for param in CONSUME_PARAMS.iter().chain(&ANSWER_PARAMS) {
            query = match param {
                ConsumeParam::Index => query.bind(i as i64),
                ConsumeParam::KeyId => query.bind(p.key_id),
                ConsumeParam::Day => query.bind(day.clone()),
                ConsumeParam::Month => query.bind(month.clone()),
                ConsumeParam::Cost => query.bind(p.cost),
                ConsumeParam::DailyLimit => query.bind(opt_i64(p.quota.daily)),
                ConsumeParam::MonthlyLimit => query.bind(opt_i64(p.quota.monthly)),
                ConsumeParam::Now => query.bind(now.clone()),
            };
        }
    }
    query.fetch_all(&mut *conn).await
}

/// Answers every request of `batch`; `false` when the batch failed, and the connection must not
/// run it again. Nothing of a failed batch was committed: each request then runs alone (not
/// prepared), so one that fails says why and the others are not refused with it.
async fn consume_batch(
    conn: &mut SqliteConnection,
    batch: Vec<PendingConsume>,
    give_backs: &GiveBacks,
) -> bool {
    // Requests of identities run after the others, each in a transaction of its own.
    let (shared, batch): (Vec<_>, Vec<_>) = batch.into_iter().partition(|p| p.identity.is_some());
    let mut ok = consume_keys(conn, batch, give_backs).await;
    let mut detached = Vec::new();
    for mut p in shared {
        if p.is_abandoned() {
            continue;
        }
        match spend_shared(conn, &p).await {
            // No identity row: the identity was deleted after the key was cached (deleting it
            // detached its keys). The key alone, as it now is.
            Ok(None) => {
                p.identity = None;
                detached.push(p);
            }
            Ok(row) => answer_shared(p, row, give_backs),
            Err(e) => {
                sqlx::query("ROLLBACK").execute(&mut *conn).await.ok();
                fail_batch(vec![p], &e.into());
                ok = false;
            }
        }
    }
    if !detached.is_empty() {
        let done = consume_keys(conn, detached, give_backs).await;
        ok &= done;
    }
    ok
}

/// The counters of a key and of its identity as they count on a day and month. Parameters:
/// key id, day, month, identity id.
const SHARED_READ_SQL: &str = concat!(
    "SELECT ",
    daily_now!("u", "?2"),
    " AS daily, ",
    monthly_now!("u", "?3"),
    " AS monthly, ",
    daily_now!("i", "?2"),
    " AS identity_daily, ",
    monthly_now!("i", "?3"),
    " AS identity_monthly FROM api_usage u, identity_usage i \
     WHERE u.api_key_id = ?1 AND i.identity_id = ?4"
);

/// Spends on one of a key's or identity's usage rows: the counters read, plus the cost.
/// Parameters: id, daily, monthly, cost, day, month, now.
const SHARED_SPEND_KEY_SQL: &str = "UPDATE api_usage SET daily_requests = ?2 + ?4, \
       monthly_requests = ?3 + ?4, total_requests = total_requests + ?4, \
       day = max(day, ?5), month = max(month, ?6), updated_at = ?7 WHERE api_key_id = ?1";
const SHARED_SPEND_IDENTITY_SQL: &str = "UPDATE identity_usage SET daily_requests = ?2 + ?4, \
       monthly_requests = ?3 + ?4, total_requests = total_requests + ?4, \
       day = max(day, ?5), month = max(month, ?6), updated_at = ?7 WHERE identity_id = ?1";

/// A request of a key that belongs to an identity: one `BEGIN IMMEDIATE` transaction (SQLite's
/// one writer holds the database's write lock from its start) reads both rows' counters,
/// decides, and spends on both or neither.
async fn spend_shared(
    conn: &mut SqliteConnection,
    p: &PendingConsume,
) -> Result<Option<SharedRow>, sqlx::Error> {
    let (day, month, now) = (day_label(p.now), month_label(p.now), ts_text(p.now));
    let (identity_id, identity) = p.identity.unwrap_or_default();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    let counts: Option<(i64, i64, i64, i64)> = sqlx::query_as(SHARED_READ_SQL)
        .bind(p.key_id)
        .bind(&day)
        .bind(&month)
        .bind(identity_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some((daily, monthly, identity_daily, identity_monthly)) = counts else {
        sqlx::query("ROLLBACK").execute(&mut *conn).await?;
        return Ok(None);
    };
    let cost = p.cost.max(0);
    let fits = |used: i64, limit: Option<u64>| {
        limit.is_none_or(|l| used.saturating_add(cost) <= opt_i64(Some(l)).unwrap_or(i64::MAX))
    };
    let admitted = fits(daily, p.quota.daily)
        && fits(monthly, p.quota.monthly)
        && fits(identity_daily, identity.daily)
        && fits(identity_monthly, identity.monthly);
    if admitted {
        for (sql, id, d, m) in [
            (
                SHARED_SPEND_IDENTITY_SQL,
                identity_id,
                identity_daily,
                identity_monthly,
            ),
            (SHARED_SPEND_KEY_SQL, p.key_id, daily, monthly),
        ] {
            sqlx::query(sql)
                .bind(id)
                .bind(d)
                .bind(m)
                .bind(cost)
                .bind(&day)
                .bind(&month)
                .bind(&now)
                .execute(&mut *conn)
                .await?;
        }
    }
    sqlx::query("COMMIT").execute(&mut *conn).await?;
    let after = |v: i64| if admitted { v + cost } else { v };
    Ok(Some(SharedRow {
        admitted,
        daily: after(daily),
        monthly: after(monthly),
        identity_daily: after(identity_daily),
        identity_monthly: after(identity_monthly),
    }))
}

/// Requests of keys without an identity, as one transaction (see [`consume_batch`]).
async fn consume_keys(
    conn: &mut SqliteConnection,
    batch: Vec<PendingConsume>,
    give_backs: &GiveBacks,
) -> bool {
    if batch.is_empty() {
        return true;
    }
    match run(conn, &batch, true).await {
        Ok(rows) => {
            answer_batch(batch, &rows, give_backs);
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, size = batch.len(), "quota batch failed; one at a time");
            sqlx::query("ROLLBACK").execute(&mut *conn).await.ok();
            for p in batch {
                if p.is_abandoned() {
                    continue;
                }
                let one = vec![p];
                match run(conn, &one, false).await {
                    Ok(rows) => answer_batch(one, &rows, give_backs),
                    Err(e) => {
                        sqlx::query("ROLLBACK").execute(&mut *conn).await.ok();
                        fail_batch(one, &e.into());
                    }
                }
            }
            false
        }
    }
}

/// Takes `spent` back off its key's counters (see [`QuotaStore::give_back`]).
async fn give_back(write: &SqlitePool, spent: Spend) -> Result<(), StoreError> {
    let mut tx = write.begin().await?;
    if let Some(identity_id) = spent.identity_id {
        sqlx::query(GIVE_BACK_IDENTITY_SQL)
            .bind(identity_id)
            .bind(day_label(spent.at))
            .bind(month_label(spent.at))
            .bind(count_i64(spent.units))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(GIVE_BACK_SQL)
        .bind(spent.key_id)
        .bind(day_label(spent.at))
        .bind(month_label(spent.at))
        .bind(count_i64(spent.units))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// SQL: the counters of the usage row `?1` in `$table` (keyed by `$column`) as they count on
/// day `?2` and month `?3`.
macro_rules! usage_sql {
    ($table:literal, $column:literal) => {
        concat!(
            "SELECT ",
            daily_now!("u", "?2"),
            ", ",
            monthly_now!("u", "?3"),
            ", u.total_requests FROM ",
            $table,
            " u WHERE u.",
            $column,
            " = ?1"
        )
    };
}

/// Runs a [`usage_sql!`] statement for row `id` as of `now` (zero for a row that is missing).
async fn counters(
    read: &SqlitePool,
    sql: &'static str,
    id: i64,
    now: DateTime<Utc>,
) -> Result<Usage, StoreError> {
    let row: Option<(i64, i64, i64)> = sqlx::query_as(sql)
        .bind(id)
        .bind(day_label(now))
        .bind(month_label(now))
        .fetch_optional(read)
        .await?;
    Ok(row.map(Usage::from_counts).unwrap_or_default())
}

#[async_trait]
impl QuotaStore for SqliteStore {
    /// Queues the request for the writer task, which runs every request waiting at the time in
    /// one transaction.
    async fn consume(&self, spend: Spend, quota: Quota) -> Result<QuotaOutcome, StoreError> {
        PendingConsume::queue(&self.consumes, spend, quota).await
    }

    async fn give_back(&self, spent: Spend) -> Result<(), StoreError> {
        give_back(&self.write, spent).await
    }

    async fn usage(&self, key_id: i64, now: DateTime<Utc>) -> Result<Usage, StoreError> {
        counters(
            &self.read,
            usage_sql!("api_usage", "api_key_id"),
            key_id,
            now,
        )
        .await
    }

    async fn consume_shared(
        &self,
        spend: Spend,
        quota: Quota,
        identity: Quota,
    ) -> Result<SharedOutcome, StoreError> {
        PendingConsume::queue_shared(&self.consumes, spend, quota, identity).await
    }

    async fn identity_usage(
        &self,
        identity_id: i64,
        now: DateTime<Utc>,
    ) -> Result<Usage, StoreError> {
        counters(
            &self.read,
            usage_sql!("identity_usage", "identity_id"),
            identity_id,
            now,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::tests::migrated_store;
    use crate::store::{KeyRecord, KeyStore};

    /// Requests in one batch are answered from the batch's own rows, and as if each ran alone in
    /// turn.
    #[tokio::test]
    async fn a_batch_answers_every_request_as_if_each_ran_alone() {
        let (_dir, store) = migrated_store().await;
        let now = Utc::now();
        let mut ids = Vec::new();
        for name in ["a", "b"] {
            let secret = crate::keys::generate();
            let record = KeyRecord {
                key: &secret,
                name,
                limits: Default::default(),
                expires_at: None,
                created_at: now,
                permissions: &[],
                metadata: &Default::default(),
                identity_id: None,
            };
            ids.push(store.create(&record).await.unwrap().id);
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
            let (pending, answer) = PendingConsume::new(Spend::new(key_id, cost, now), quota);
            batch.push(pending);
            answers.push(answer);
        }
        let mut conn = store.write.acquire().await.unwrap();
        assert!(consume_batch(&mut conn, batch, &store.give_backs).await);
        let mut outcomes = Vec::new();
        for answer in answers {
            outcomes.push(answer.await.unwrap().unwrap().outcome);
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
}
