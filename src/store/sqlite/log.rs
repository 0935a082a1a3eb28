//! The request log on SQLite: rows written up to 500 per INSERT in one transaction per batch,
//! completed one outcome at a time in one transaction, and deleted in batches past the retention.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Row};

use super::quota::{GIVE_BACK_KEYS_IDENTITY_SQL, GIVE_BACK_SQL};
use super::{SqliteStore, ts_text, with_ts_text};
use crate::store::log::retention_cutoff;
use crate::store::quota::count_i64;
use crate::store::{
    LogRow, Maintenance, Outcome, RequestLogStore, StoreError, UsageQuery, UsageSummary,
};

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
        // single writer connection is held meanwhile (quota statements wait for it). Each size
        // in LOG_STATEMENT_SIZES is one prepared statement, kept: preparing a statement of a
        // new size for every batch cost more than inserting its rows.
        let mut text = TextValues::default();
        let mut tx = self.write.begin().await?;
        let mut rest = rows;
        while !rest.is_empty() {
            let (i, size) = LOG_STATEMENT_SIZES
                .iter()
                .copied()
                .enumerate()
                .find(|&(_, size)| size <= rest.len())
                .expect("the last size is 1");
            let (chunk, after) = rest.split_at(size);
            rest = after;
            let mut insert = sqlx::query(AssertSqlSafe(log_insert_sql()[i].clone()));
            for row in chunk {
                // Each value is bound as an `Arc<str>` (sqlx copies `&str` and `String` into one).
                insert = insert
                    .bind(ts_value(row.ts))
                    .bind(row.request_id.as_deref().map(Arc::<str>::from))
                    .bind(row.key_id)
                    .bind(row.method.as_deref().map(Arc::<str>::from))
                    .bind(row.path.as_deref().map(Arc::<str>::from))
                    .bind(row.host.as_deref().map(Arc::<str>::from))
                    .bind(row.client_addr.as_deref().map(Arc::<str>::from))
                    .bind(text.fixed(if row.allowed { "allow" } else { "deny" }))
                    .bind(text.fixed(row.reason))
                    .bind(row.status as i64)
                    .bind(text.fixed(row.api.as_str()))
                    .bind(count_i64(row.cost))
                    .bind(row.decision_id.as_deref().map(Arc::<str>::from))
                    .bind(row.key_prefix.as_deref().map(Arc::<str>::from))
                    .bind(row.identity_id);
            }
            insert.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// The sizes of the request log's INSERT statements, largest first: a batch is written as
/// statements of 500 rows (15 parameters each; SQLite allows 32,766), then what is left as a
/// sum of powers of two, so at most nine more statements, and ten statements in the connection's
/// cache (of 100) beside the quota statements.
const LOG_STATEMENT_SIZES: [usize; 10] = [500, 256, 128, 64, 32, 16, 8, 4, 2, 1];

/// The INSERT for each of [`LOG_STATEMENT_SIZES`], written once.
fn log_insert_sql() -> &'static [Arc<str>; LOG_STATEMENT_SIZES.len()] {
    static SQL: OnceLock<[Arc<str>; LOG_STATEMENT_SIZES.len()]> = OnceLock::new();
    SQL.get_or_init(|| {
        LOG_STATEMENT_SIZES.map(|rows| {
            let mut sql = String::from(
                "INSERT INTO api_requests_log (ts, request_id, api_key_id, method, path, host, \
                   client_addr, decision, reason, status, api, cost, decision_id, key_prefix, \
                   identity_id) VALUES ",
            );
            let values = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
            sql.reserve(rows * (values.len() + 2));
            for i in 0..rows {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(values);
            }
            sql.into()
        })
    })
}

/// A row's time as sqlx binds it without copying it again.
fn ts_value(t: DateTime<Utc>) -> Arc<str> {
    with_ts_text(t, |text| Arc::from(text))
}

/// The fixed strings of one batch's rows (decision, reason, API) as sqlx binds them without
/// copying (`Arc<str>`), each made once per batch.
#[derive(Default)]
struct TextValues {
    fixed: Vec<(&'static str, Arc<str>)>,
}

impl TextValues {
    fn fixed(&mut self, s: &'static str) -> Arc<str> {
        if let Some((_, text)) = self.fixed.iter().find(|(k, _)| *k == s) {
            return text.clone();
        }
        let text: Arc<str> = s.into();
        self.fixed.push((s, text.clone()));
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LogApi;
    use crate::store::sqlite::tests::migrated_store;

    /// A batch of 1,523 rows (three statements of 500, then 16, 4, 2 and 1) is written whole,
    /// in order, every value where it belongs.
    #[tokio::test]
    async fn a_batch_is_written_whole_whatever_its_size() {
        let (_dir, store) = migrated_store().await;
        let t0 = DateTime::from_timestamp(1_773_144_020, 123_456_789).unwrap();
        let rows: Vec<LogRow> = (0..1523)
            .map(|i| LogRow {
                ts: t0 + chrono::Duration::milliseconds(i),
                api: if i % 3 == 0 {
                    LogApi::RateLimit
                } else {
                    LogApi::Authz
                },
                request_id: Some(format!("rid-{i}")),
                decision_id: (i % 2 == 0).then(|| format!("{i:032x}")),
                key_id: Some(i),
                method: Some("GET".into()),
                path: Some(format!("/p/{i}")),
                host: (i % 5 != 0).then(|| "h.example".into()),
                client_addr: Some("10.0.0.1".into()),
                allowed: i % 4 != 0,
                reason: if i % 4 != 0 { "ok" } else { "rate_limited" },
                status: if i % 4 != 0 { 200 } else { 429 },
                cost: i as u64,
                key_prefix: Some("tg_abcdefgh".into()),
                identity_id: (i % 7 == 0).then_some(i * 10),
            })
            .collect();
        store.write_batch(&rows).await.unwrap();
        type Stored = (
            String,
            String,
            Option<String>,
            i64,
            Option<String>,
            String,
            String,
            i64,
            i64,
            Option<String>,
            Option<i64>,
        );
        let stored: Vec<Stored> = sqlx::query_as(
            "SELECT ts, request_id, decision_id, api_key_id, host, decision, reason, status, \
                    cost, api, identity_id FROM api_requests_log ORDER BY id",
        )
        .fetch_all(&store.read)
        .await
        .unwrap();
        assert_eq!(stored.len(), rows.len());
        for (row, got) in rows.iter().zip(&stored) {
            let want: Stored = (
                ts_text(row.ts),
                row.request_id.clone().unwrap(),
                row.decision_id.clone(),
                row.key_id.unwrap(),
                row.host.clone(),
                (if row.allowed { "allow" } else { "deny" }).into(),
                row.reason.into(),
                row.status.into(),
                row.cost as i64,
                Some(row.api.as_str().into()),
                row.identity_id,
            );
            assert_eq!(got, &want);
        }
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
}
