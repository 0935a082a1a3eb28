//! Keys on SQLite. Every write bumps the row's `change_seq`; running servers poll it to hear of
//! changes. A trigger gives every new key its usage row (migration 0007).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::{SqliteStore, ts_text};
use crate::keys::{self, ApiKey, KeyHash};
use crate::store::keys::{
    KeyRecord, KeyRow, Rotation, key_columns, key_of, metadata_text, opt_i64, permissions_text,
};
use crate::store::{KeyChange, KeyQuery, KeyStore, KeyUpdate, StoreError};

/// The next `change_seq`: one past every change so far. SQLite has one writer at a time, so
/// `change_seq` grows in commit order and a cursor over it misses nothing.
macro_rules! next_change_seq {
    () => {
        "(SELECT COALESCE(MAX(change_seq), 0) + 1 FROM api_keys)"
    };
}

impl SqliteStore {
    async fn changes_since(&self, cursor: i64) -> Result<(Vec<KeyHash>, i64), StoreError> {
        // Every hash a changed row has had a say in: its secret, the old one a rotation left
        // working, and the one a second rotation retired.
        let rows: Vec<(String, Option<String>, Option<String>, i64)> = sqlx::query_as(
            "SELECT key_hash, old_key_hash, retired_key_hash, change_seq FROM api_keys \
             WHERE change_seq > ?1 ORDER BY change_seq",
        )
        .bind(cursor)
        .fetch_all(&self.read)
        .await?;
        let mut next = cursor;
        let mut hashes = Vec::with_capacity(rows.len());
        for (hex, old, retired, seq) in rows {
            next = next.max(seq);
            for hex in std::iter::once(hex).chain(old).chain(retired) {
                hashes.push(
                    keys::parse_hash_hex(&hex).ok_or_else(|| StoreError::Corrupt {
                        table: "api_keys",
                        detail: format!("key_hash {hex:?}"),
                    })?,
                );
            }
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
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<ApiKey>, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as(concat!(
            "SELECT ",
            key_columns!(),
            ", key_hash <> ?1 AS by_old FROM api_keys \
               WHERE key_hash = ?1 OR old_key_hash = ?1"
        ))
        .bind(keys::hash_hex(hash))
        .fetch_optional(&self.read)
        .await?;
        key_of(row)
    }

    async fn watch_changes(
        &self,
        interval: Duration,
        on_change: &(dyn Fn(KeyChange) + Send + Sync),
        stop: CancellationToken,
    ) {
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

    async fn create(&self, record: &KeyRecord<'_>) -> Result<ApiKey, StoreError> {
        let (key, limits) = (record.key, record.limits);
        let row: KeyRow = sqlx::query_as(concat!(
            "INSERT INTO api_keys (name, prefix, key_hash, status, expires_at, per_minute, \
               daily_limit, monthly_limit, created_at, updated_at, change_seq, refund_5xx, \
               permissions, metadata, identity_id) \
             VALUES (?1, ?2, ?3, 'active', ?4, ?5, ?6, ?7, ?8, ?8, ",
            next_change_seq!(),
            ", ?9, ?10, ?11, ?12) RETURNING ",
            key_columns!()
        ))
        .bind(record.name)
        .bind(&key.prefix)
        .bind(keys::hash_hex(&key.hash))
        .bind(record.expires_at.map(ts_text))
        .bind(opt_i64(limits.per_minute))
        .bind(opt_i64(limits.daily))
        .bind(opt_i64(limits.monthly))
        .bind(ts_text(record.created_at))
        .bind(limits.refund_5xx)
        .bind(permissions_text(record.permissions))
        .bind(metadata_text(record.metadata))
        .bind(record.identity_id)
        .fetch_one(&self.write)
        .await?;
        row.try_into()
    }

    async fn get(&self, id: i64) -> Result<Option<ApiKey>, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&self.read)
        .await?;
        key_of(row)
    }

    async fn list(&self, query: &KeyQuery) -> Result<Vec<ApiKey>, StoreError> {
        // Times are RFC 3339 UTC text with milliseconds, so text order is time order; a name
        // prefix is compared by characters, so no character in it is a pattern.
        let rows: Vec<KeyRow> = sqlx::query_as(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE id > ?1 \
               AND (?2 IS NULL OR substr(name, 1, length(?2)) = ?2) \
               AND (?3 IS NULL \
                 OR (?3 = 'revoked' AND status = 'revoked') \
                 OR (?3 = 'active' AND status = 'active' \
                     AND (expires_at IS NULL OR expires_at > ?4)) \
                 OR (?3 = 'expired' AND status = 'active' AND expires_at <= ?4)) \
               AND (?6 IS NULL OR identity_id = ?6) \
             ORDER BY id LIMIT ?5"
        ))
        .bind(query.after_id)
        .bind(query.name_prefix.as_deref())
        .bind(query.status.map(|s| s.as_str()))
        .bind(ts_text(query.now))
        .bind(i64::from(query.limit))
        .bind(query.identity_id)
        .fetch_all(&self.read)
        .await?;
        rows.into_iter().map(ApiKey::try_from).collect()
    }

    async fn revoke(&self, id: i64, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let done = sqlx::query(concat!(
            "UPDATE api_keys SET status = 'revoked', updated_at = ?2, change_seq = ",
            next_change_seq!(),
            " WHERE id = ?1"
        ))
        .bind(id)
        .bind(ts_text(now))
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn update(
        &self,
        id: i64,
        update: &KeyUpdate,
        now: DateTime<Utc>,
    ) -> Result<Option<ApiKey>, StoreError> {
        // Each field is either replaced (flag true) or kept, in one statement on the single
        // writer, so two concurrent updates never undo each other's other fields.
        let patch = update.limits;
        let row: Option<KeyRow> = sqlx::query_as(concat!(
            "UPDATE api_keys SET \
               per_minute = CASE WHEN ?2 THEN ?3 ELSE per_minute END, \
               daily_limit = CASE WHEN ?4 THEN ?5 ELSE daily_limit END, \
               monthly_limit = CASE WHEN ?6 THEN ?7 ELSE monthly_limit END, \
               refund_5xx = COALESCE(?9, refund_5xx), \
               name = COALESCE(?10, name), \
               expires_at = CASE WHEN ?11 THEN ?12 ELSE expires_at END, \
               permissions = CASE WHEN ?13 THEN ?14 ELSE permissions END, \
               metadata = CASE WHEN ?15 THEN ?16 ELSE metadata END, \
               identity_id = CASE WHEN ?17 THEN ?18 ELSE identity_id END, \
               updated_at = ?8, change_seq = ",
            next_change_seq!(),
            " WHERE id = ?1 RETURNING ",
            key_columns!()
        ))
        .bind(id)
        .bind(patch.per_minute.is_some())
        .bind(opt_i64(patch.per_minute.flatten()))
        .bind(patch.daily.is_some())
        .bind(opt_i64(patch.daily.flatten()))
        .bind(patch.monthly.is_some())
        .bind(opt_i64(patch.monthly.flatten()))
        .bind(ts_text(now))
        .bind(patch.refund_5xx)
        .bind(update.name.as_deref())
        .bind(update.expires_at.is_some())
        .bind(update.expires_at.flatten().map(ts_text))
        .bind(update.permissions.is_some())
        .bind(update.permissions.as_deref().and_then(permissions_text))
        .bind(update.metadata.is_some())
        .bind(update.metadata.as_ref().and_then(metadata_text))
        .bind(update.identity_id.is_some())
        .bind(update.identity_id.flatten())
        .fetch_optional(&self.write)
        .await?;
        key_of(row)
    }

    async fn rotate(&self, id: i64, rotation: &Rotation<'_>) -> Result<Option<ApiKey>, StoreError> {
        // The right-hand sides read the row as it was: the current secret becomes the old one,
        // and an earlier old one is kept as retired, so the change poll reports it too.
        let row: Option<KeyRow> = sqlx::query_as(concat!(
            "UPDATE api_keys SET retired_key_hash = old_key_hash, old_key_hash = key_hash, \
               old_prefix = prefix, old_key_expires_at = ?4, key_hash = ?2, prefix = ?3, \
               updated_at = ?5, change_seq = ",
            next_change_seq!(),
            " WHERE id = ?1 RETURNING ",
            key_columns!()
        ))
        .bind(id)
        .bind(keys::hash_hex(&rotation.key.hash))
        .bind(&rotation.key.prefix)
        .bind(ts_text(rotation.old_expires_at))
        .bind(ts_text(rotation.now))
        .fetch_optional(&self.write)
        .await?;
        key_of(row)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }
}
