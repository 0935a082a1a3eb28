//! The key seam: lookups for the request path, the admin operations behind `tollgate keys`, and
//! the feed of key changes that keeps every replica's cache true.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::StoreError;
use std::collections::BTreeMap;

use crate::keys::{ApiKey, IdentityLimits, KeyHash, KeyStatus, Limits, NewKey, OldSecret};

/// What [`KeyStore::watch_changes`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyChange {
    /// These keys changed.
    Keys(Vec<KeyHash>),
    /// Anything may have changed.
    All,
}

/// A change to some of a key's limits. `Some(None)` makes that limit unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsPatch {
    pub per_minute: Option<Option<u64>>,
    pub daily: Option<Option<u64>>,
    pub monthly: Option<Option<u64>>,
    pub refund_5xx: Option<bool>,
}

impl LimitsPatch {
    pub fn apply(&self, limits: Limits) -> Limits {
        Limits {
            per_minute: self.per_minute.unwrap_or(limits.per_minute),
            daily: self.daily.unwrap_or(limits.daily),
            monthly: self.monthly.unwrap_or(limits.monthly),
            refund_5xx: self.refund_5xx.unwrap_or(limits.refund_5xx),
        }
    }
}

/// A change to a key, applied in one statement: each `Some` replaced, everything else kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUpdate {
    pub name: Option<String>,
    pub limits: LimitsPatch,
    /// `Some(None)`: the key never expires.
    pub expires_at: Option<Option<DateTime<Utc>>>,
    /// The new permissions (empty: every route).
    pub permissions: Option<Vec<String>>,
    /// The new metadata (empty: none).
    pub metadata: Option<BTreeMap<String, String>>,
    /// The identity the key joins; `Some(None)`: it leaves its identity. Its counters stay with
    /// the key; what it spent before counts in the identity it spent it in.
    pub identity_id: Option<Option<i64>>,
}

impl KeyUpdate {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        let l = &self.limits;
        self.name.is_none()
            && self.expires_at.is_none()
            && l.per_minute.is_none()
            && l.daily.is_none()
            && l.monthly.is_none()
            && l.refund_5xx.is_none()
            && self.permissions.is_none()
            && self.metadata.is_none()
            && self.identity_id.is_none()
    }
}

/// Which keys have a status, as a client sees it at a moment: revoked, else expired (past
/// `expires_at`), else active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Active,
    Revoked,
    Expired,
}

impl StatusFilter {
    /// The text both dialects' list statements compare with.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StatusFilter::Active => "active",
            StatusFilter::Revoked => "revoked",
            StatusFilter::Expired => "expired",
        }
    }
}

/// One page of [`KeyStore::list`]: keys with an id above `after_id`, oldest first, at most
/// `limit` of them, of a status at `now` and/or whose name starts with `name_prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyQuery {
    pub after_id: i64,
    pub limit: u32,
    pub status: Option<StatusFilter>,
    pub name_prefix: Option<String>,
    /// Only keys of this identity.
    pub identity_id: Option<i64>,
    pub now: DateTime<Utc>,
}

/// A key to store: the hash and visible prefix of its secret, and what it is created with.
#[derive(Debug, Clone, Copy)]
pub struct KeyRecord<'a> {
    pub key: &'a NewKey,
    pub name: &'a str,
    pub limits: Limits,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// Empty: every route.
    pub permissions: &'a [String],
    pub metadata: &'a BTreeMap<String, String>,
    /// The identity the key belongs to, if any.
    pub identity_id: Option<i64>,
}

/// A rotation: the key's new secret, and until when the one it replaces keeps working.
#[derive(Debug, Clone, Copy)]
pub struct Rotation<'a> {
    pub key: &'a NewKey,
    pub old_expires_at: DateTime<Utc>,
    pub now: DateTime<Utc>,
}

/// Keys: lookups for the request path, and the admin operations behind `tollgate keys`.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// The key with this hash, whatever its status, or `None` if there is none.
    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<ApiKey>, StoreError>;

    /// Reports changed keys (created, revoked, limits set) to `on_change` until `stop` is
    /// cancelled, each within `interval` of its commit. Reports [`KeyChange::All`] first, and
    /// whenever changes may have been missed (the database was unreachable), so a cache built
    /// before then is dropped. Errors are logged and retried, never returned.
    async fn watch_changes(
        &self,
        interval: Duration,
        on_change: &(dyn Fn(KeyChange) + Send + Sync),
        stop: CancellationToken,
    );

    /// Stores a new key (the database gives it its usage row).
    async fn create(&self, record: &KeyRecord<'_>) -> Result<ApiKey, StoreError>;

    async fn get(&self, id: i64) -> Result<Option<ApiKey>, StoreError>;

    /// The page of keys `query` names, oldest (lowest id) first.
    async fn list(&self, query: &KeyQuery) -> Result<Vec<ApiKey>, StoreError>;

    /// Marks a key revoked. `false` if there is no such key.
    async fn revoke(&self, id: i64, now: DateTime<Utc>) -> Result<bool, StoreError>;

    /// Changes what `update` names, in one statement (all of it or nothing, and concurrent
    /// updates of other fields are kept); returns the updated key, or `None` if there is no
    /// such key.
    async fn update(
        &self,
        id: i64,
        update: &KeyUpdate,
        now: DateTime<Utc>,
    ) -> Result<Option<ApiKey>, StoreError>;

    /// Gives the key a new secret in one statement; its current secret becomes its old one,
    /// working until `rotation.old_expires_at` (an earlier old secret stops working at once).
    /// Everything else (limits, counters) stays. `None` if there is no such key.
    async fn rotate(&self, id: i64, rotation: &Rotation<'_>) -> Result<Option<ApiKey>, StoreError>;

    /// A cheap round trip, for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// The columns of `api_keys` that make an [`ApiKey`], in the order of [`KeyRow`]; both dialects
/// select them by this list.
macro_rules! key_columns {
    () => {
        "id, name, prefix, status, expires_at, per_minute, daily_limit, monthly_limit, refund_5xx, \
         old_prefix, old_key_expires_at, permissions, metadata, identity_id, \
         (SELECT i.per_minute FROM identities i WHERE i.id = api_keys.identity_id) AS identity_per_minute, \
         (SELECT i.daily_limit FROM identities i WHERE i.id = api_keys.identity_id) AS identity_daily, \
         (SELECT i.monthly_limit FROM identities i WHERE i.id = api_keys.identity_id) AS identity_monthly"
    };
}
pub(crate) use key_columns;

/// An `api_keys` row as both dialects return it (SQLite's RFC 3339 text and 0/1 decode to the
/// same types).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct KeyRow {
    id: i64,
    name: String,
    prefix: String,
    status: String,
    expires_at: Option<DateTime<Utc>>,
    per_minute: Option<i64>,
    daily_limit: Option<i64>,
    monthly_limit: Option<i64>,
    refund_5xx: bool,
    old_prefix: Option<String>,
    old_key_expires_at: Option<DateTime<Utc>>,
    permissions: Option<String>,
    metadata: Option<String>,
    identity_id: Option<i64>,
    identity_per_minute: Option<i64>,
    identity_daily: Option<i64>,
    identity_monthly: Option<i64>,
    /// Only lookups by hash select it: whether the hash was the old secret's.
    #[sqlx(default)]
    by_old: bool,
}

impl TryFrom<KeyRow> for ApiKey {
    type Error = StoreError;

    fn try_from(row: KeyRow) -> Result<Self, StoreError> {
        let limit = |v: Option<i64>| v.map(|v| v.max(0) as u64);
        let corrupt = |what: &str, e: serde_json::Error| StoreError::Corrupt {
            table: "api_keys",
            detail: format!("{what} of key {}: {e}", row.id),
        };
        let permissions: Vec<String> = match &row.permissions {
            Some(text) => serde_json::from_str(text).map_err(|e| corrupt("permissions", e))?,
            None => Vec::new(),
        };
        let metadata: BTreeMap<String, String> = match &row.metadata {
            Some(text) => serde_json::from_str(text).map_err(|e| corrupt("metadata", e))?,
            None => BTreeMap::new(),
        };
        let old_secret = match (row.old_prefix, row.old_key_expires_at) {
            (Some(prefix), Some(expires_at)) => Some(Box::new(OldSecret { prefix, expires_at })),
            _ => None,
        };
        Ok(ApiKey {
            status: KeyStatus::parse(&row.status).ok_or_else(|| StoreError::Corrupt {
                table: "api_keys",
                detail: format!("status {:?}", row.status),
            })?,
            id: row.id,
            name: row.name.into(),
            prefix: row.prefix.into(),
            expires_at: row.expires_at,
            limits: Limits {
                per_minute: limit(row.per_minute),
                daily: limit(row.daily_limit),
                monthly: limit(row.monthly_limit),
                refund_5xx: row.refund_5xx,
            }
            .into(),
            old_secret,
            by_old_secret: row.by_old,
            permissions: permissions.into(),
            metadata,
            identity: row.identity_id.map(|id| {
                Box::new(IdentityLimits {
                    id,
                    per_minute: limit(row.identity_per_minute),
                    daily: limit(row.identity_daily),
                    monthly: limit(row.identity_monthly),
                })
            }),
        })
    }
}

/// A key read by one of the `key_columns!` queries, if there was one.
pub(crate) fn key_of(row: Option<KeyRow>) -> Result<Option<ApiKey>, StoreError> {
    row.map(ApiKey::try_from).transpose()
}

/// Permissions as both dialects store them: a JSON array, or NULL for every route.
pub(crate) fn permissions_text(permissions: &[String]) -> Option<String> {
    (!permissions.is_empty()).then(|| serde_json::Value::from(permissions.to_vec()).to_string())
}

/// Metadata as both dialects store it: a JSON object, or NULL for none.
pub(crate) fn metadata_text(metadata: &BTreeMap<String, String>) -> Option<String> {
    (!metadata.is_empty()).then(|| serde_json::to_string(metadata).expect("strings serialize"))
}

/// A limit as the databases store it: unlimited is NULL, and a count past `i64::MAX` is capped.
pub(crate) fn opt_i64(v: Option<u64>) -> Option<i64> {
    v.map(|v| v.min(i64::MAX as u64) as i64)
}
