//! Keys on PostgreSQL. A trigger on `api_keys` gives every new key its usage row and NOTIFYs
//! every change, so the replicas' caches hear of it (migrations 0001 and 0007).

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::PgStore;
use crate::keys::{self, ApiKey, KeyHash};
use crate::store::keys::{
    KeyRecord, KeyRow, Rotation, key_columns, key_of, metadata_text, opt_i64, permissions_text,
};
use crate::store::{KeyChange, KeyQuery, KeyStore, KeyUpdate, StoreError};

/// The channel the `api_keys` trigger notifies.
const KEY_CHANNEL: &str = "tollgate_key_changes";

/// After this long without a notification the listener asks its server a question, and a
/// server that does not answer within [`LISTEN_PING_TIMEOUT`] counts as lost: a peer that died
/// without closing the connection (a frozen server, a dropped route) is noticed within a few
/// seconds, not at `cache.key_ttl`.
const LISTEN_PING_AFTER: Duration = Duration::from_secs(2);
const LISTEN_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The listener's question: it names itself, so `pg_stat_activity` tells an operator which
/// backend is tollgate's listener.
pub const LISTEN_PING_SQL: &str = "SELECT 'tollgate key change listener' AS ping";

impl PgStore {
    /// Runs a key lookup within the lookups' share of the pool, in a task of its own. The wait
    /// for a turn and for a connection together last at most `database.timeout`. A caller that
    /// stops waiting (its check's deadline passed) leaves the task to finish its statement
    /// (bounded by `statement_timeout`), so a turn is held exactly as long as its connection is
    /// busy: lookups given up on cannot free their turns early and take more than their share.
    async fn lookup<F, Fut>(&self, query: F) -> Result<Option<ApiKey>, StoreError>
    where
        F: FnOnce(PoolConnection<Postgres>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<KeyRow>, sqlx::Error>> + Send,
    {
        let (lookups, pool, timeout) = (self.lookups.clone(), self.pool.clone(), self.timeout);
        let task = tokio::spawn(async move {
            let wait = async {
                let turn = lookups
                    .acquire_owned()
                    .await
                    .map_err(|_| StoreError::closed())?;
                Ok::<_, StoreError>((turn, pool.acquire().await?))
            };
            let (_turn, conn) = tokio::time::timeout(timeout, wait)
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Unavailable(std::sync::Arc::new(
                        sqlx::Error::PoolTimedOut,
                    )))
                })?;
            Ok::<_, StoreError>(query(conn).await?)
        });
        let row = task.await.map_err(|_| StoreError::closed())??;
        key_of(row)
    }

    /// Listens for key changes until the connection drops, its server stops answering, or
    /// `stop` is cancelled. Returns `Ok(())` when stopped, `Err` when the connection was lost.
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
            // `try_recv` loses nothing when the ping's branch wins: a notification that arrives
            // during the ping is buffered and returned by the next `try_recv`.
            let next = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                n = listener.try_recv() => n?,
                _ = tokio::time::sleep(LISTEN_PING_AFTER) => {
                    let ping = sqlx::query(LISTEN_PING_SQL).execute(&mut listener);
                    match tokio::time::timeout(LISTEN_PING_TIMEOUT, ping).await {
                        Ok(Ok(_)) => continue,
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => {
                            return Err(StoreError::Unavailable(std::sync::Arc::new(
                                sqlx::Error::Protocol(
                                    "key change listener's server stopped answering".into(),
                                ),
                            )));
                        }
                    }
                }
            };
            match next {
                Some(n) => match keys::parse_hash_hex(n.payload()) {
                    Some(hash) => on_change(KeyChange::Keys(vec![hash])),
                    None => on_change(KeyChange::All),
                },
                None => {
                    return Err(StoreError::Unavailable(std::sync::Arc::new(
                        sqlx::Error::Protocol("key change listener lost its connection".into()),
                    )));
                }
            }
        }
    }
}

#[async_trait]
impl KeyStore for PgStore {
    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<ApiKey>, StoreError> {
        let hash = keys::hash_hex(hash);
        self.lookup(move |mut conn| async move {
            sqlx::query_as(concat!(
                "SELECT ",
                key_columns!(),
                ", key_hash <> $1 AS by_old FROM api_keys \
                   WHERE key_hash = $1 OR old_key_hash = $1"
            ))
            .bind(hash)
            .fetch_optional(&mut *conn)
            .await
        })
        .await
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

    async fn create(&self, record: &KeyRecord<'_>) -> Result<ApiKey, StoreError> {
        let (key, limits) = (record.key, record.limits);
        let row: KeyRow = sqlx::query_as(concat!(
            "INSERT INTO api_keys (name, prefix, key_hash, expires_at, per_minute, daily_limit, \
               monthly_limit, created_at, updated_at, refund_5xx, permissions, metadata, \
               identity_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, $11, $12) RETURNING ",
            key_columns!()
        ))
        .bind(record.name)
        .bind(&key.prefix)
        .bind(keys::hash_hex(&key.hash))
        .bind(record.expires_at)
        .bind(opt_i64(limits.per_minute))
        .bind(opt_i64(limits.daily))
        .bind(opt_i64(limits.monthly))
        .bind(record.created_at)
        .bind(limits.refund_5xx)
        .bind(permissions_text(record.permissions))
        .bind(metadata_text(record.metadata))
        .bind(record.identity_id)
        .fetch_one(&self.pool)
        .await?;
        row.try_into()
    }

    async fn get(&self, id: i64) -> Result<Option<ApiKey>, StoreError> {
        self.lookup(move |mut conn| async move {
            sqlx::query_as(concat!(
                "SELECT ",
                key_columns!(),
                " FROM api_keys WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
        })
        .await
    }

    async fn list(&self, query: &KeyQuery) -> Result<Vec<ApiKey>, StoreError> {
        // `starts_with` compares characters, so no character of the prefix is a pattern.
        let rows: Vec<KeyRow> = sqlx::query_as(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE id > $1 \
               AND ($2::text IS NULL OR starts_with(name, $2::text)) \
               AND ($3::text IS NULL \
                 OR ($3::text = 'revoked' AND status = 'revoked') \
                 OR ($3::text = 'active' AND status = 'active' \
                     AND (expires_at IS NULL OR expires_at > $4)) \
                 OR ($3::text = 'expired' AND status = 'active' AND expires_at <= $4)) \
               AND ($6::bigint IS NULL OR identity_id = $6) \
             ORDER BY id LIMIT $5"
        ))
        .bind(query.after_id)
        .bind(query.name_prefix.as_deref())
        .bind(query.status.map(|s| s.as_str()))
        .bind(query.now)
        .bind(i64::from(query.limit))
        .bind(query.identity_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(ApiKey::try_from).collect()
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

    async fn update(
        &self,
        id: i64,
        update: &KeyUpdate,
        now: DateTime<Utc>,
    ) -> Result<Option<ApiKey>, StoreError> {
        // Each field is either replaced ($n given, flag true) or kept, in one statement, so
        // two concurrent updates never undo each other's other fields.
        let patch = update.limits;
        let row: Option<KeyRow> = sqlx::query_as(concat!(
            "UPDATE api_keys SET \
               per_minute = CASE WHEN $2 THEN $3 ELSE per_minute END, \
               daily_limit = CASE WHEN $4 THEN $5 ELSE daily_limit END, \
               monthly_limit = CASE WHEN $6 THEN $7 ELSE monthly_limit END, \
               refund_5xx = COALESCE($9, refund_5xx), \
               name = COALESCE($10, name), \
               expires_at = CASE WHEN $11 THEN $12 ELSE expires_at END, \
               permissions = CASE WHEN $13 THEN $14 ELSE permissions END, \
               metadata = CASE WHEN $15 THEN $16 ELSE metadata END, \
               identity_id = CASE WHEN $17 THEN $18 ELSE identity_id END, \
               updated_at = $8 \
             WHERE id = $1 RETURNING ",
            key_columns!()
        ))
        .bind(id)
        .bind(patch.per_minute.is_some())
        .bind(opt_i64(patch.per_minute.flatten()))
        .bind(patch.daily.is_some())
        .bind(opt_i64(patch.daily.flatten()))
        .bind(patch.monthly.is_some())
        .bind(opt_i64(patch.monthly.flatten()))
        .bind(now)
        .bind(patch.refund_5xx)
        .bind(update.name.as_deref())
        .bind(update.expires_at.is_some())
        .bind(update.expires_at.flatten())
        .bind(update.permissions.is_some())
        .bind(update.permissions.as_deref().and_then(permissions_text))
        .bind(update.metadata.is_some())
        .bind(update.metadata.as_ref().and_then(metadata_text))
        .bind(update.identity_id.is_some())
        .bind(update.identity_id.flatten())
        .fetch_optional(&self.pool)
        .await?;
        key_of(row)
    }

    async fn rotate(&self, id: i64, rotation: &Rotation<'_>) -> Result<Option<ApiKey>, StoreError> {
        // The right-hand sides read the row as it was: the current secret becomes the old one.
        let row: Option<KeyRow> = sqlx::query_as(concat!(
            "UPDATE api_keys SET old_key_hash = key_hash, old_prefix = prefix, \
               old_key_expires_at = $4, key_hash = $2, prefix = $3, updated_at = $5 \
             WHERE id = $1 RETURNING ",
            key_columns!()
        ))
        .bind(id)
        .bind(keys::hash_hex(&rotation.key.hash))
        .bind(&rotation.key.prefix)
        .bind(rotation.old_expires_at)
        .bind(rotation.now)
        .fetch_optional(&self.pool)
        .await?;
        key_of(row)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
