//! The identity seam: customers whose keys share limits (issue 15). A key that belongs to an
//! identity must fit its own limits and the identity's; see `QuotaStore::consume_shared`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::StoreError;

/// An identity and the limits its keys share (`None` = unlimited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: i64,
    pub name: String,
    pub per_minute: Option<u64>,
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
    pub created_at: DateTime<Utc>,
}

/// A change to some of an identity's limits. `Some(None)` makes that limit unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdentityLimitsPatch {
    pub per_minute: Option<Option<u64>>,
    pub daily: Option<Option<u64>>,
    pub monthly: Option<Option<u64>>,
}

impl IdentityLimitsPatch {
    pub fn is_empty(&self) -> bool {
        self.per_minute.is_none() && self.daily.is_none() && self.monthly.is_none()
    }
}

/// Identities: the admin operations behind `tollgate identities`.
#[async_trait]
pub trait IdentityStore: Send + Sync + 'static {
    /// Stores a new identity (the database gives it its usage row).
    async fn create_identity(
        &self,
        name: &str,
        limits: IdentityLimitsPatch,
        now: DateTime<Utc>,
    ) -> Result<Identity, StoreError>;

    async fn get_identity(&self, id: i64) -> Result<Option<Identity>, StoreError>;

    /// Identities with an id above `after_id`, oldest first, at most `limit`.
    async fn list_identities(&self, after_id: i64, limit: u32)
    -> Result<Vec<Identity>, StoreError>;

    /// Changes the limits the patch names, and tells every replica's key cache that the
    /// identity's keys changed (in the same transaction). `None` if there is no such identity.
    async fn set_identity_limits(
        &self,
        id: i64,
        patch: IdentityLimitsPatch,
        now: DateTime<Utc>,
    ) -> Result<Option<Identity>, StoreError>;

    /// Deletes the identity; its keys are detached (they keep their own limits) in the same
    /// transaction, and caches told. `false` if there is no such identity.
    async fn delete_identity(&self, id: i64, now: DateTime<Utc>) -> Result<bool, StoreError>;
}

/// The columns of `identities` that make an [`Identity`], in the order of [`IdentityRow`].
macro_rules! identity_columns {
    () => {
        "id, name, per_minute, daily_limit, monthly_limit, created_at"
    };
}
pub(crate) use identity_columns;

/// An `identities` row as both dialects return it.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct IdentityRow {
    id: i64,
    name: String,
    per_minute: Option<i64>,
    daily_limit: Option<i64>,
    monthly_limit: Option<i64>,
    created_at: DateTime<Utc>,
}

impl From<IdentityRow> for Identity {
    fn from(row: IdentityRow) -> Self {
        let limit = |v: Option<i64>| v.map(|v| v.max(0) as u64);
        Identity {
            id: row.id,
            name: row.name,
            per_minute: limit(row.per_minute),
            daily: limit(row.daily_limit),
            monthly: limit(row.monthly_limit),
            created_at: row.created_at,
        }
    }
}
