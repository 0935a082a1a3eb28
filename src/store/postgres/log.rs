//! The request log on PostgreSQL: partitioned by UTC month, so retention drops whole months;
//! rows are written as arrays (one `INSERT … SELECT FROM UNNEST` per batch) and completed, with
//! any refund, in one statement per batch of outcomes.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, NaiveDate, Utc};

use super::PgStore;
use crate::store::log::retention_cutoff;
use crate::store::quota::count_i64;
use crate::store::{
    LogRow, Maintenance, Outcome, RequestLogStore, StoreError, UsageQuery, UsageSummary,
};

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
        let Some(cutoff) = retention_cutoff(now, retention) else {
            return Ok(report);
        };
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

/// A row `complete` finished: decision id, whether it was refunded, and for a refunded row of a
/// key of an identity, the identity; its time and cost.
type CompletedRow = (String, bool, Option<i64>, DateTime<Utc>, i64);

#[async_trait]
impl RequestLogStore for PgStore {
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
        let ids: Vec<&str> = outcomes.iter().map(|o| o.decision_id.as_str()).collect();
        let status: Vec<i16> = outcomes
            .iter()
            .map(|o| o.status.min(i16::MAX as u16) as i16)
            .collect();
        let ms: Vec<Option<i64>> = outcomes
            .iter()
            .map(|o| o.duration_ms.map(count_i64))
            .collect();
        let rx: Vec<i64> = outcomes
            .iter()
            .map(|o| count_i64(o.bytes_received))
            .collect();
        let tx: Vec<i64> = outcomes.iter().map(|o| count_i64(o.bytes_sent)).collect();
        // One statement per batch: complete the rows, then give the cost of refunded ones back
        // to the counters of the day and month it was spent in. RETURNING says which decision
        // ids found their row, and whether it was refunded. A row joined to several outcomes
        // is still updated once.
        let done: Vec<CompletedRow> = sqlx::query_as(
            "WITH done AS ( \
               UPDATE api_requests_log l SET response_status = o.status, duration_ms = o.ms, \
                 bytes_received = o.rx, bytes_sent = o.tx, \
                 refunded = (o.status >= 500 AND l.decision = 'allow' AND l.cost > 0 AND \
                   COALESCE((SELECT k.refund_5xx FROM api_keys k WHERE k.id = l.api_key_id), false)) \
               FROM UNNEST($1::text[], $2::smallint[], $3::bigint[], $4::bigint[], $5::bigint[]) \
                 AS o(decision_id, status, ms, rx, tx) \
               WHERE l.decision_id = o.decision_id AND l.api = 'authz' \
                 AND l.response_status IS NULL \
               RETURNING l.decision_id, l.api_key_id, l.ts, l.cost, l.refunded \
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
             SELECT d.decision_id, d.refunded, \
               CASE WHEN d.refunded THEN (SELECT k.identity_id FROM api_keys k \
                 WHERE k.id = d.api_key_id) END AS identity_id, d.ts, d.cost FROM done d",
        )
        .bind(ids)
        .bind(status)
        .bind(ms)
        .bind(rx)
        .bind(tx)
        .fetch_all(&self.pool)
        .await?;
        let refunded = done.iter().filter(|d| d.1).count() as u64;
        // A refunded request of a key of an identity goes back to the identity's counters too:
        // a statement of its own, after the keys' (each locks one table's rows, so neither
        // waits for the other in a circle with a Check's shared statement).
        for (_, _, identity_id, ts, cost) in &done {
            if let Some(identity_id) = identity_id {
                let (day, month) = super::day_and_month(*ts);
                sqlx::query(
                    "UPDATE identity_usage SET \
                       daily_requests = CASE WHEN day = $2 THEN greatest(daily_requests - $4, 0) \
                         ELSE daily_requests END, \
                       monthly_requests = CASE WHEN month = $3 \
                         THEN greatest(monthly_requests - $4, 0) ELSE monthly_requests END, \
                       total_requests = greatest(total_requests - $4, 0), updated_at = now() \
                     WHERE identity_id = $1",
                )
                .bind(identity_id)
                .bind(day)
                .bind(month)
                .bind(cost)
                .execute(&self.pool)
                .await?;
            }
        }
        let mut found: std::collections::HashSet<String> = done.into_iter().map(|d| d.0).collect();
        // `remove`: of several outcomes with one id, only the first completed the row.
        Ok((
            outcomes
                .iter()
                .map(|o| found.remove(&o.decision_id))
                .collect(),
            refunded,
        ))
    }

    async fn summarize(&self, query: &UsageQuery) -> Result<UsageSummary, StoreError> {
        let days: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, \
                    count(*) FILTER (WHERE decision = 'allow') AS allowed, \
                    count(*) FILTER (WHERE decision = 'deny') AS denied \
             FROM api_requests_log \
             WHERE api = 'authz' AND ts >= $1 AND ts < $2 \
               AND ($3::bigint IS NULL OR api_key_id = $3) \
               AND ($4::bigint IS NULL OR identity_id = $4) \
             GROUP BY 1 ORDER BY 1",
        )
        .bind(query.from)
        .bind(query.to)
        .bind(query.key_id)
        .bind(query.identity_id)
        .fetch_all(&self.pool)
        .await?;
        let keys: Vec<(i64, Option<String>, i64, i64)> = sqlx::query_as(
            "SELECT l.api_key_id AS id, k.name AS name, \
                    count(*) FILTER (WHERE l.decision = 'allow') AS allowed, \
                    count(*) FILTER (WHERE l.decision = 'deny') AS denied \
             FROM api_requests_log l LEFT JOIN api_keys k ON k.id = l.api_key_id \
             WHERE l.api = 'authz' AND l.ts >= $1 AND l.ts < $2 AND l.api_key_id IS NOT NULL \
               AND ($3::bigint IS NULL OR l.api_key_id = $3) \
               AND ($5::bigint IS NULL OR l.identity_id = $5) \
             GROUP BY l.api_key_id, k.name ORDER BY count(*) DESC, l.api_key_id LIMIT $4",
        )
        .bind(query.from)
        .bind(query.to)
        .bind(query.key_id)
        .bind(i64::from(query.top))
        .bind(query.identity_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(UsageSummary::from_rows(days, keys))
    }
    async fn write_batch(&self, rows: &[LogRow]) -> Result<(), StoreError> {
        // One statement per batch: the rows travel as arrays and UNNEST turns them back into rows.
        let mut ts = Vec::with_capacity(rows.len());
        let mut request_id = Vec::with_capacity(rows.len());
        let mut decision_id = Vec::with_capacity(rows.len());
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
        let mut key_prefix = Vec::with_capacity(rows.len());
        let mut identity_id = Vec::with_capacity(rows.len());
        for r in rows {
            ts.push(r.ts);
            request_id.push(r.request_id.clone());
            decision_id.push(r.decision_id.clone());
            key_id.push(r.key_id);
            method.push(r.method.clone());
            path.push(r.path.clone());
            host.push(r.host.clone());
            client.push(r.client_addr.clone());
            decision.push(if r.allowed { "allow" } else { "deny" });
            reason.push(r.reason);
            status.push(r.status as i16);
            api.push(r.api.as_str());
            cost.push(count_i64(r.cost));
            key_prefix.push(r.key_prefix.clone());
            identity_id.push(r.identity_id);
        }
        sqlx::query(
            "INSERT INTO api_requests_log (ts, request_id, api_key_id, method, path, host, \
               client_addr, decision, reason, status, api, cost, decision_id, key_prefix, \
               identity_id) \
             SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::bigint[], $4::text[], \
               $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::smallint[], \
               $11::text[], $12::bigint[], $13::text[], $14::text[], $15::bigint[])",
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
        .bind(decision_id)
        .bind(key_prefix)
        .bind(identity_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
