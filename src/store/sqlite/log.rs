//! The request log on SQLite: rows written 500 per INSERT in one transaction per batch,
//! completed one outcome at a time in one transaction, and deleted in batches past the retention.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;

use super::quota::{GIVE_BACK_KEYS_IDENTITY_SQL, GIVE_BACK_SQL};
use super::{SqliteStore, ts_text};
use crate::store::log::retention_cutoff;
use crate::store::quota::count_i64;
use crate::store::{
    LogRow, Maintenance, Outcome, RequestLogStore, StoreError, UsageQuery, UsageSummary,
};

/// Rows per INSERT statement of the request log (15 parameters each; SQLite allows 32,766).
const LOG_ROWS_PER_STATEMENT: usize = 500;

/// Deletes up to 5,000 log rows older than `?1`, through the index on `ts` (migration 0006), so
/// an hourly run reads only the rows it deletes.
const PRUNE_LOG_SQL: &str = "DELETE FROM api_requests_log WHERE id IN \
     (SELECT id FROM api_requests_log WHERE ts < ?1 LIMIT 5000)";

#[async_trait]
impl RequestLogStore for SqliteStore {
    async fn maintain(
        &self,
        now: DateTime<Utc>,
        retention: Option<Duration>,
    ) -> Result<Maintenance, StoreError> {
        let mut report = Maintenance::default();
        let Some(cutoff) = retention_cutoff(now, retention) else {
            return Ok(report);
        };
        let cutoff = ts_text(cutoff);
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
                 WHERE decision_id = ?1 AND api = 'authz' AND response_status IS NULL \
                 RETURNING api_key_id, ts, cost, refunded",
            )
            .bind(&o.decision_id)
            .bind(i64::from(o.status))
            .bind(o.duration_ms.map(count_i64))
            .bind(count_i64(o.bytes_received))
            .bind(count_i64(o.bytes_sent))
            .fetch_all(&mut *tx)
            .await?;
            found.push(!rows.is_empty());
            for row in rows {
                if row.try_get::<i64, _>("refunded")? == 0 {
                    continue;
                }
                // Give the cost back to the counters of the day and month it was spent in (the
                // first ten characters of the time are its day, the first seven its month).
                let ts: String = row.try_get("ts")?;
                for sql in [GIVE_BACK_SQL, GIVE_BACK_KEYS_IDENTITY_SQL] {
                    sqlx::query(sql)
                        .bind(row.try_get::<Option<i64>, _>("api_key_id")?)
                        .bind(ts.get(..10))
                        .bind(ts.get(..7))
                        .bind(row.try_get::<i64, _>("cost")?)
                        .execute(&mut *tx)
                        .await?;
                }
                refunded += 1;
            }
        }
        tx.commit().await?;
        Ok((found, refunded))
    }

    async fn summarize(&self, query: &UsageQuery) -> Result<UsageSummary, StoreError> {
        // Times are RFC 3339 text in UTC, so a text range is a time range and the first ten
        // characters are the day.
        let days: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT substr(ts, 1, 10) AS day, \
                    SUM(decision = 'allow') AS allowed, SUM(decision = 'deny') AS denied \
             FROM api_requests_log \
             WHERE api = 'authz' AND ts >= ?1 AND ts < ?2 AND (?3 IS NULL OR api_key_id = ?3) \
               AND (?4 IS NULL OR identity_id = ?4) \
             GROUP BY day ORDER BY day",
        )
        .bind(ts_text(query.from))
        .bind(ts_text(query.to))
        .bind(query.key_id)
        .bind(query.identity_id)
        .fetch_all(&self.read)
        .await?;
        let keys: Vec<(i64, Option<String>, i64, i64)> = sqlx::query_as(
            "SELECT l.api_key_id AS id, k.name AS name, \
                    SUM(l.decision = 'allow') AS allowed, SUM(l.decision = 'deny') AS denied \
             FROM api_requests_log l LEFT JOIN api_keys k ON k.id = l.api_key_id \
             WHERE l.api = 'authz' AND l.ts >= ?1 AND l.ts < ?2 AND l.api_key_id IS NOT NULL \
               AND (?3 IS NULL OR l.api_key_id = ?3) AND (?5 IS NULL OR l.identity_id = ?5) \
             GROUP BY l.api_key_id, k.name ORDER BY COUNT(*) DESC, l.api_key_id LIMIT ?4",
        )
        .bind(ts_text(query.from))
        .bind(ts_text(query.to))
        .bind(query.key_id)
        .bind(i64::from(query.top))
        .bind(query.identity_id)
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
                   client_addr, decision, reason, status, api, cost, decision_id, key_prefix, \
                   identity_id) ",
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
                    .push_bind(count_i64(row.cost))
                    .push_bind(row.decision_id.clone())
                    .push_bind(row.key_prefix.clone())
                    .push_bind(row.identity_id);
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
    use crate::store::sqlite::tests::migrated_store;

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
}
