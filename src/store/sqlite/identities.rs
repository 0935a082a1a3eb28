//! Identities on SQLite. A change to an identity bumps its keys' `change_seq` in the same
//! transaction, so running servers drop them from their caches.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{SqliteStore, ts_text};
use crate::store::StoreError;
use crate::store::identities::{
    Identity, IdentityLimitsPatch, IdentityRow, IdentityStore, identity_columns,
};
use crate::store::keys::opt_i64;

#[async_trait]
impl IdentityStore for SqliteStore {
    async fn create_identity(
        &self,
        name: &str,
        limits: IdentityLimitsPatch,
        now: DateTime<Utc>,
    ) -> Result<Identity, StoreError> {
        let row: IdentityRow = sqlx::query_as(concat!(
            "INSERT INTO identities (name, per_minute, daily_limit, monthly_limit, created_at, \
               updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5) RETURNING ",
            identity_columns!()
        ))
        .bind(name)
        .bind(opt_i64(limits.per_minute.flatten()))
        .bind(opt_i64(limits.daily.flatten()))
        .bind(opt_i64(limits.monthly.flatten()))
        .bind(ts_text(now))
        .fetch_one(&self.write)
        .await?;
        Ok(row.into())
    }

    async fn get_identity(&self, id: i64) -> Result<Option<Identity>, StoreError> {
        let row: Option<IdentityRow> = sqlx::query_as(concat!(
            "SELECT ",
            identity_columns!(),
            " FROM identities WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&self.read)
        .await?;
        Ok(row.map(Identity::from))
    }

    async fn list_identities(
        &self,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<Identity>, StoreError> {
        let rows: Vec<IdentityRow> = sqlx::query_as(concat!(
            "SELECT ",
            identity_columns!(),
            " FROM identities WHERE id > ?1 ORDER BY id LIMIT ?2"
        ))
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        Ok(rows.into_iter().map(Identity::from).collect())
    }

    async fn set_identity_limits(
        &self,
        id: i64,
        patch: IdentityLimitsPatch,
        now: DateTime<Utc>,
    ) -> Result<Option<Identity>, StoreError> {
        let mut tx = self.write.begin().await?;
        let row: Option<IdentityRow> = sqlx::query_as(concat!(
            "UPDATE identities SET \
               per_minute = CASE WHEN ?2 THEN ?3 ELSE per_minute END, \
               daily_limit = CASE WHEN ?4 THEN ?5 ELSE daily_limit END, \
               monthly_limit = CASE WHEN ?6 THEN ?7 ELSE monthly_limit END, \
               updated_at = ?8 WHERE id = ?1 RETURNING ",
            identity_columns!()
        ))
        .bind(id)
        .bind(patch.per_minute.is_some())
        .bind(opt_i64(patch.per_minute.flatten()))
        .bind(patch.daily.is_some())
        .bind(opt_i64(patch.daily.flatten()))
        .bind(patch.monthly.is_some())
        .bind(opt_i64(patch.monthly.flatten()))
        .bind(ts_text(now))
        .fetch_optional(&mut *tx)
        .await?;
        if row.is_some() {
            sqlx::query(
                "UPDATE api_keys SET updated_at = ?2, \
                   change_seq = (SELECT COALESCE(MAX(change_seq), 0) + 1 FROM api_keys) \
                 WHERE identity_id = ?1",
            )
            .bind(id)
            .bind(ts_text(now))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(row.map(Identity::from))
    }

    async fn delete_identity(&self, id: i64, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let mut tx = self.write.begin().await?;
        sqlx::query(
            "UPDATE api_keys SET identity_id = NULL, updated_at = ?2, \
               change_seq = (SELECT COALESCE(MAX(change_seq), 0) + 1 FROM api_keys) \
             WHERE identity_id = ?1",
        )
        .bind(id)
        .bind(ts_text(now))
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query("DELETE FROM identities WHERE id = ?1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }
}
