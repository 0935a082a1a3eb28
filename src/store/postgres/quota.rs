//! Quotas on PostgreSQL: one statement, [`CONSUME_SQL`], checks and spends the quota of every
//! request waiting at one moment (each for a different key). A lone request first tries
//! [`SPEND_ONE_SQL`], the plain conditional `UPDATE` (a quarter cheaper for PostgreSQL than a batch
//! of one, measured with pgbench), and goes through [`CONSUME_SQL`] only when that admitted
//! nothing, to learn which limit refused it.
//!
//! The usage rows are locked in key order first, so two statements (of this replica or another)
//! that share keys wait for each other instead of deadlocking. A locking read returns the row as
//! the last committed transaction left it, and the row stays locked until this one commits, so the
//! room-left test, the new counters and the counters a refusal reports are all computed from the
//! same, latest, version of the row.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use tokio::sync::{Semaphore, mpsc};

use super::{PgStore, day_and_month};
use crate::store::consume::{
    BatchRow, GiveBacks, PendingConsume, SharedRow, answer_batch, answer_shared, fail_batch,
};
use crate::store::keys::opt_i64;
use crate::store::quota::{count_i64, daily_now, monthly_now};
use crate::store::{Quota, QuotaOutcome, QuotaStore, SharedOutcome, Spend, StoreError, Usage};

/// Most quota requests, for different keys, in one statement.
const MAX_CONSUME_BATCH: usize = 64;

/// The statement that checks and spends quota. Its parameters are arrays, one element per
/// request: index, key id, day, month, cost, daily limit, monthly limit (NULL = unlimited). A
/// counter from an earlier day or month counts as 0 (DESIGN rule 2). Each request's row comes
/// back with its index: admitted with the counters after it, or refused with the counters as
/// they count now. Public so the benchmark can time it alone.
pub const CONSUME_SQL: &str = concat!(
    "WITH r AS ( \
       SELECT * FROM unnest($1::int[], $2::bigint[], $3::date[], $4::date[], $5::bigint[], \
         $6::bigint[], $7::bigint[]) AS r (i, key_id, day, month, cost, daily_limit, monthly_limit) \
     ), cur AS MATERIALIZED ( \
       SELECT r.i, u.api_key_id, ",
    daily_now!("u", "r.day"),
    " AS daily, ",
    monthly_now!("u", "r.month"),
    " AS monthly \
       FROM api_usage u JOIN r ON u.api_key_id = r.key_id \
       ORDER BY u.api_key_id FOR UPDATE OF u \
     ), spent AS ( \
       UPDATE api_usage u SET daily_requests = c.daily + r.cost, \
         monthly_requests = c.monthly + r.cost, total_requests = u.total_requests + r.cost, \
         day = greatest(u.day, r.day), month = greatest(u.month, r.month), updated_at = now() \
       FROM r JOIN cur c ON c.i = r.i \
       WHERE u.api_key_id = c.api_key_id \
         AND (r.daily_limit IS NULL OR c.daily + r.cost <= r.daily_limit) \
         AND (r.monthly_limit IS NULL OR c.monthly + r.cost <= r.monthly_limit) \
       RETURNING r.i, u.daily_requests, u.monthly_requests \
     ) \
     SELECT i::bigint AS i, true AS admitted, daily_requests AS daily, monthly_requests AS monthly \
       FROM spent \
     UNION ALL \
     SELECT c.i::bigint, false, c.daily, c.monthly FROM cur c \
       WHERE c.i NOT IN (SELECT i FROM spent)"
);

/// A lone request's first try: the conditional `UPDATE` of [`CONSUME_SQL`] for one key, with
/// the same room-left test. Parameters: key id, day, month, cost, daily limit, monthly limit.
/// It answers only an admission; when it updates nothing, [`CONSUME_SQL`] decides (it admits
/// what found room meanwhile, and reports the counters of a refusal as it locked them).
pub const SPEND_ONE_SQL: &str = concat!(
    "UPDATE api_usage u SET daily_requests = ",
    daily_now!("u", "$2"),
    " + $4, monthly_requests = ",
    monthly_now!("u", "$3"),
    " + $4, total_requests = u.total_requests + $4, day = greatest(u.day, $2), \
       month = greatest(u.month, $3), updated_at = now() \
     WHERE u.api_key_id = $1 \
       AND ($5::bigint IS NULL OR ",
    daily_now!("u", "$2"),
    " + $4 <= $5) \
       AND ($6::bigint IS NULL OR ",
    monthly_now!("u", "$3"),
    " + $4 <= $6) \
     RETURNING 0::bigint AS i, true AS admitted, u.daily_requests AS daily, \
       u.monthly_requests AS monthly"
);

/// The statement that checks and spends the quota of a key that belongs to an identity: both
/// usage rows, both or neither, in one statement. Parameters: key id, day, month, cost, the
/// key's daily and monthly limits, identity id, the identity's daily and monthly limits (NULL =
/// unlimited).
///
/// Lock order: the identity's row first (`iu`), then the key's (`ku`, whose locking join needs
/// `iu` evaluated before it emits, and so locks, the key's row). Every statement that locks
/// both rows takes them in this order (the give-back too), and a statement for a key alone
/// takes only the key's, so replicas never deadlock. Requests of an identity are never batched
/// with others: each is one statement, waiting for the identity's row lock in turn.
pub const SHARED_SQL: &str = concat!(
    "WITH iu AS MATERIALIZED ( \
       SELECT i.identity_id, ",
    daily_now!("i", "$2"),
    " AS daily, ",
    monthly_now!("i", "$3"),
    " AS monthly FROM identity_usage i WHERE i.identity_id = $7 FOR UPDATE \
     ), ku AS MATERIALIZED ( \
       SELECT u.api_key_id, ",
    daily_now!("u", "$2"),
    " AS daily, ",
    monthly_now!("u", "$3"),
    " AS monthly, iu.daily AS identity_daily, iu.monthly AS identity_monthly \
       FROM api_usage u CROSS JOIN iu WHERE u.api_key_id = $1 FOR UPDATE OF u \
     ), ok AS MATERIALIZED ( \
       SELECT ku.*, \
         ($5::bigint IS NULL OR ku.daily + $4 <= $5) \
         AND ($6::bigint IS NULL OR ku.monthly + $4 <= $6) \
         AND ($8::bigint IS NULL OR ku.identity_daily + $4 <= $8) \
         AND ($9::bigint IS NULL OR ku.identity_monthly + $4 <= $9) AS fits \
       FROM ku \
     ), si AS ( \
       UPDATE identity_usage i SET daily_requests = ok.identity_daily + $4, \
         monthly_requests = ok.identity_monthly + $4, total_requests = i.total_requests + $4, \
         day = greatest(i.day, $2), month = greatest(i.month, $3), updated_at = now() \
       FROM ok WHERE i.identity_id = $7 AND ok.fits RETURNING i.identity_id \
     ), sk AS ( \
       UPDATE api_usage u SET daily_requests = ok.daily + $4, \
         monthly_requests = ok.monthly + $4, total_requests = u.total_requests + $4, \
         day = greatest(u.day, $2), month = greatest(u.month, $3), updated_at = now() \
       FROM ok WHERE u.api_key_id = $1 AND ok.fits RETURNING u.api_key_id \
     ) \
     SELECT ok.fits AND (SELECT count(*) FROM si) = 1 AND (SELECT count(*) FROM sk) = 1 \
         AS admitted, \
       CASE WHEN ok.fits THEN ok.daily + $4 ELSE ok.daily END AS daily, \
       CASE WHEN ok.fits THEN ok.monthly + $4 ELSE ok.monthly END AS monthly, \
       CASE WHEN ok.fits THEN ok.identity_daily + $4 ELSE ok.identity_daily END \
         AS identity_daily, \
       CASE WHEN ok.fits THEN ok.identity_monthly + $4 ELSE ok.identity_monthly END \
         AS identity_monthly \
     FROM ok"
);

/// Starts the writer that takes queued quota requests and runs them, up to `in_flight`
/// statements at a time; returns its queue, and where it gives back what it spent for requests
/// nobody waits for any more. The writer ends when every sender is gone.
pub(super) fn start_writer(
    pool: PgPool,
    in_flight: usize,
) -> (mpsc::Sender<PendingConsume>, GiveBacks) {
    let (consumes, queue) = mpsc::channel(16 * MAX_CONSUME_BATCH);
    let give_backs = {
        let pool = pool.clone();
        GiveBacks::start(move |spent| {
            let pool = pool.clone();
            async move { give_back(&pool, spent).await }
        })
    };
    tokio::spawn(dispatch(pool, queue, in_flight, give_backs.clone()));
    (consumes, give_backs)
}

/// Each statement holds requests for different keys (a key's second request waits for the next
/// one); while every permit is taken, requests gather into bigger statements.
async fn dispatch(
    pool: PgPool,
    mut queue: mpsc::Receiver<PendingConsume>,
    in_flight: usize,
    give_backs: GiveBacks,
) {
    let permits = Arc::new(Semaphore::new(in_flight));
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
        let mut keys = HashSet::new();
        let mut rest = Vec::new();
        // A request of an identity runs alone, as its own statement (SHARED_SQL).
        let mut shared = false;
        for p in pending.drain(..) {
            if p.is_abandoned() {
                // Its check gave up waiting (a deadline, a cancel): it is not run at all.
                continue;
            }
            if p.identity.is_some() {
                if batch.is_empty() {
                    shared = true;
                    batch.push(p);
                } else {
                    rest.push(p);
                }
            } else if !shared && batch.len() < MAX_CONSUME_BATCH && keys.insert(p.key_id) {
                batch.push(p);
            } else {
                rest.push(p);
            }
        }
        pending = rest;
        if batch.is_empty() {
            continue;
        }
        let pool = pool.clone();
        let give_backs = give_backs.clone();
        let busy = give_backs.in_flight();
        tokio::spawn(async move {
            consume_batch(&pool, batch, &give_backs).await;
            drop(busy);
            drop(permit);
        });
    }
}

/// Runs [`CONSUME_SQL`] for `batch` (each request for a different key) and answers every
/// request. When the server refused the statement, nothing was changed: each request then runs
/// alone, so one that fails says why and the others are not refused with it. Returns how many
/// ran alone.
async fn consume_batch(
    pool: &PgPool,
    mut batch: Vec<PendingConsume>,
    give_backs: &GiveBacks,
) -> usize {
    if let [one] = batch.as_slice()
        && one.identity.is_some()
    {
        let mut p = batch.pop().expect("one request");
        match spend_shared(pool, &p).await {
            // No identity row: the identity was deleted after the key was cached (deleting it
            // detached its keys). The key alone, as it now is, below.
            Ok(None) => {
                p.identity = None;
                batch.push(p);
            }
            Ok(row) => {
                answer_shared(p, row, give_backs);
                return 0;
            }
            Err(e) => {
                fail_batch(vec![p], &e.into());
                return 0;
            }
        }
    }
    if let [one] = batch.as_slice() {
        match spend_one(pool, one).await {
            Ok(Some(row)) => {
                answer_batch(batch, &[row], give_backs);
                return 0;
            }
            Ok(None) => {}
            Err(e) => {
                fail_batch(batch, &e.into());
                return 0;
            }
        }
    }
    match run(pool, &batch).await {
        Ok(rows) => {
            answer_batch(batch, &rows, give_backs);
            0
        }
        Err(sqlx::Error::Database(e)) if batch.len() > 1 => {
            tracing::debug!(error = %e, size = batch.len(), "quota batch failed; one at a time");
            let alone = batch.len();
            for p in batch {
                if p.is_abandoned() {
                    continue;
                }
                let one = vec![p];
                match run(pool, &one).await {
                    Ok(rows) => answer_batch(one, &rows, give_backs),
                    Err(e) => fail_batch(one, &e.into()),
                }
            }
            alone
        }
        Err(e) => {
            // The statement may or may not have been committed (the connection broke, say):
            // running it again could count twice, so every request gets the error.
            fail_batch(batch, &e.into());
            0
        }
    }
}

/// [`SHARED_SQL`] for one request of an identity.
async fn spend_shared(pool: &PgPool, p: &PendingConsume) -> Result<Option<SharedRow>, sqlx::Error> {
    let (day, month) = day_and_month(p.now);
    let (identity_id, identity) = p.identity.unwrap_or_default();
    sqlx::query_as(SHARED_SQL)
        .bind(p.key_id)
        .bind(day)
        .bind(month)
        .bind(p.cost)
        .bind(opt_i64(p.quota.daily))
        .bind(opt_i64(p.quota.monthly))
        .bind(identity_id)
        .bind(opt_i64(identity.daily))
        .bind(opt_i64(identity.monthly))
        .fetch_optional(pool)
        .await
}

/// [`SPEND_ONE_SQL`] for one request: its admission, if it was admitted.
async fn spend_one(pool: &PgPool, p: &PendingConsume) -> Result<Option<BatchRow>, sqlx::Error> {
    let (day, month) = day_and_month(p.now);
    sqlx::query_as(SPEND_ONE_SQL)
        .bind(p.key_id)
        .bind(day)
        .bind(month)
        .bind(p.cost)
        .bind(opt_i64(p.quota.daily))
        .bind(opt_i64(p.quota.monthly))
        .fetch_optional(pool)
        .await
}

async fn run(pool: &PgPool, batch: &[PendingConsume]) -> Result<Vec<BatchRow>, sqlx::Error> {
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
    sqlx::query_as(CONSUME_SQL)
        .bind(idx)
        .bind(keys)
        .bind(days)
        .bind(months)
        .bind(costs)
        .bind(daily)
        .bind(monthly)
        .fetch_all(pool)
        .await
}

/// Takes `spent` back off its key's counters (see [`QuotaStore::give_back`]).
async fn give_back(pool: &PgPool, spent: Spend) -> Result<(), StoreError> {
    let (day, month) = day_and_month(spent.at);
    let Some(identity_id) = spent.identity_id else {
        give_back_key(pool, spent, day, month).await?;
        return Ok(());
    };
    // The identity's row first, then the key's (the lock order of SHARED_SQL).
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE identity_usage SET \
           daily_requests = CASE WHEN day = $2 THEN greatest(daily_requests - $4, 0) \
             ELSE daily_requests END, \
           monthly_requests = CASE WHEN month = $3 THEN greatest(monthly_requests - $4, 0) \
             ELSE monthly_requests END, \
           total_requests = greatest(total_requests - $4, 0), updated_at = now() \
         WHERE identity_id = $1",
    )
    .bind(identity_id)
    .bind(day)
    .bind(month)
    .bind(count_i64(spent.units))
    .execute(&mut *tx)
    .await?;
    give_back_key(&mut *tx, spent, day, month).await?;
    tx.commit().await?;
    Ok(())
}

async fn give_back_key<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    spent: Spend,
    day: chrono::NaiveDate,
    month: chrono::NaiveDate,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE api_usage SET \
           daily_requests = CASE WHEN day = $2 THEN greatest(daily_requests - $4, 0) \
             ELSE daily_requests END, \
           monthly_requests = CASE WHEN month = $3 THEN greatest(monthly_requests - $4, 0) \
             ELSE monthly_requests END, \
           total_requests = greatest(total_requests - $4, 0), updated_at = now() \
         WHERE api_key_id = $1",
    )
    .bind(spent.key_id)
    .bind(day)
    .bind(month)
    .bind(count_i64(spent.units))
    .execute(executor)
    .await?;
    Ok(())
}

/// SQL: the counters of the usage row `$1` in `$table` (keyed by `$column`) as they count on
/// day `$2` and month `$3`.
macro_rules! usage_sql {
    ($table:literal, $column:literal) => {
        concat!(
            "SELECT ",
            daily_now!("u", "$2"),
            ", ",
            monthly_now!("u", "$3"),
            ", u.total_requests FROM ",
            $table,
            " u WHERE u.",
            $column,
            " = $1"
        )
    };
}

/// Runs a [`usage_sql!`] statement for row `id` as of `now` (zero for a row that is missing).
async fn counters(
    pool: &PgPool,
    sql: &'static str,
    id: i64,
    now: DateTime<Utc>,
) -> Result<Usage, StoreError> {
    let (day, month) = day_and_month(now);
    let row: Option<(i64, i64, i64)> = sqlx::query_as(sql)
        .bind(id)
        .bind(day)
        .bind(month)
        .fetch_optional(pool)
        .await?;
    Ok(row.map(Usage::from_counts).unwrap_or_default())
}

#[async_trait]
impl QuotaStore for PgStore {
    /// Queues the request for the writer, which runs the requests waiting at one moment for
    /// different keys as one statement.
    async fn consume(&self, spend: Spend, quota: Quota) -> Result<QuotaOutcome, StoreError> {
        PendingConsume::queue(&self.consumes, spend, quota).await
    }

    async fn give_back(&self, spent: Spend) -> Result<(), StoreError> {
        give_back(&self.pool, spent).await
    }

    async fn usage(&self, key_id: i64, now: DateTime<Utc>) -> Result<Usage, StoreError> {
        counters(
            &self.pool,
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
            &self.pool,
            usage_sql!("identity_usage", "identity_id"),
            identity_id,
            now,
        )
        .await
    }
}
