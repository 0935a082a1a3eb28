//! [`KeyAdmin`]: the one code path of every key operation, whether `tollgate keys …` or the admin
//! API asks: what is valid (names, limits, pages), the store call that does it in one statement,
//! and errors that say which field was wrong. Neither caller validates anything itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Days, NaiveDate, Utc};

use crate::keys::{self, ApiKey, KeyStatus, Limits};
use crate::store::{
    DayUsage, Identity, IdentityLimitsPatch, IdentityStore, KeyQuery, KeyRecord, KeyStore,
    KeyUpdate, QuotaStore, RequestLogStore, Rotation, StatusFilter, StoreError, Stores, Usage,
    UsageQuery,
};

/// The longest key name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Keys per page when the caller names no page size, and the most it may name.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Days of the request log a usage report covers unless told otherwise, and the most.
pub const DEFAULT_USAGE_DAYS: u32 = 30;
pub const MAX_USAGE_DAYS: u32 = 366;
/// How long a rotated key's old secret keeps working unless told otherwise, and the longest.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
pub const MAX_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most permissions one key has; a permission name's most characters.
pub const MAX_PERMISSIONS: usize = 32;
pub const MAX_PERMISSION_CHARS: usize = 64;
/// Most metadata fields one key carries, a field name's most characters, a value's most bytes,
/// and the most bytes of all of it as JSON.
pub const MAX_METADATA_FIELDS: usize = 16;
pub const MAX_METADATA_NAME_CHARS: usize = 32;
pub const MAX_METADATA_VALUE_BYTES: usize = 256;
pub const MAX_METADATA_BYTES: usize = 2048;
/// Dynamic metadata fields tollgate sets itself: no key's metadata may use these names.
pub const RESERVED_METADATA: [&str; 4] = ["key_id", "key_name", "decision_id", "identity_id"];

/// What went wrong with a key operation.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no API key with id {0}")]
    NotFound(i64),
    #[error("no identity with id {0}")]
    IdentityNotFound(i64),
    /// A value the caller sent (`field` in the API's snake_case names) is not acceptable.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AdminError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        AdminError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Whether retrying later may succeed (the database is away).
    pub fn is_transient(&self) -> bool {
        matches!(self, AdminError::Store(e) if e.is_transient())
    }
}

/// A key to create.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewKeySpec {
    pub name: String,
    pub limits: Limits,
    pub expires_at: Option<DateTime<Utc>>,
    /// Empty: every route.
    pub permissions: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    /// The identity whose limits the key shares (`None`: none).
    pub identity_id: Option<i64>,
}

/// A page of identities, and the cursor of the next one (`None` on the last page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPage {
    pub identities: Vec<Identity>,
    pub next_after_id: Option<i64>,
}

/// A key just rotated, with its new secret (shown this once) and when the old one stops.
pub struct RotatedKey {
    pub key: ApiKey,
    pub secret: String,
    pub old_key_expires_at: DateTime<Utc>,
}

impl std::fmt::Debug for RotatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotatedKey")
            .field("key", &self.key)
            .field("old_key_expires_at", &self.old_key_expires_at)
            .finish_non_exhaustive()
    }
}

/// A key just created, with its secret: the only time the secret exists outside the caller.
pub struct CreatedKey {
    pub key: ApiKey,
    pub secret: String,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Which keys to list: a page of them after a cursor, maybe of one status or name prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyListing {
    /// 0: [`DEFAULT_PAGE_SIZE`].
    pub page_size: u32,
    /// The last id of the previous page (0: from the start).
    pub after_id: i64,
    pub status: Option<StatusFilter>,
    pub name_prefix: Option<String>,
    /// Only keys of this identity.
    pub identity_id: Option<i64>,
}

/// One page of keys, and the cursor of the next one (`None` on the last page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage {
    pub keys: Vec<ApiKey>,
    pub next_after_id: Option<i64>,
}

/// A key's (or an identity's) usage: its counters now, and its requests per UTC day from the
/// request log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReport {
    pub counters: Usage,
    pub days: Vec<DayUsage>,
}

/// A key's status as a client sees it at `now`: revoked, else expired, else active.
pub fn status_at(key: &ApiKey, now: DateTime<Utc>) -> StatusFilter {
    match key.status {
        KeyStatus::Revoked => StatusFilter::Revoked,
        KeyStatus::Active if key.is_expired(now) => StatusFilter::Expired,
        KeyStatus::Active => StatusFilter::Active,
    }
}

/// The key operations, on one database.
#[derive(Clone)]
pub struct KeyAdmin {
    keys: Arc<dyn KeyStore>,
    identities: Arc<dyn IdentityStore>,
    quotas: Arc<dyn QuotaStore>,
    log: Arc<dyn RequestLogStore>,
    default_per_minute: Option<u64>,
}

impl std::fmt::Debug for KeyAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAdmin").finish_non_exhaustive()
    }
}

impl KeyAdmin {
    /// `default_per_minute` is `limits.default_per_minute`: what a key without a per-minute limit
    /// of its own gets.
    pub fn new(stores: &Stores, default_per_minute: Option<u64>) -> Self {
        KeyAdmin {
            keys: stores.keys.clone(),
            identities: stores.identities.clone(),
            quotas: stores.quotas.clone(),
            log: stores.log.clone(),
            default_per_minute,
        }
    }

    /// The per-minute limit in force for `key` (`None`: unlimited).
    pub fn effective_per_minute(&self, key: &ApiKey) -> Option<u64> {
        key.limits().per_minute.or(self.default_per_minute)
    }

    pub fn default_per_minute(&self) -> Option<u64> {
        self.default_per_minute
    }

    /// Creates a key with a new secret.
    pub async fn create(
        &self,
        spec: NewKeySpec,
        now: DateTime<Utc>,
    ) -> Result<CreatedKey, AdminError> {
        let name = valid_name(&spec.name)?;
        valid_limits(&spec.limits)?;
        let permissions = valid_permissions(&spec.permissions)?;
        valid_metadata(&spec.metadata)?;
        if let Some(id) = spec.identity_id {
            self.existing_identity(id).await?;
        }
        let new = keys::generate();
        let key = self
            .keys
            .create(&KeyRecord {
                key: &new,
                name: &name,
                limits: spec.limits,
                expires_at: spec.expires_at,
                created_at: now,
                permissions: &permissions,
                metadata: &spec.metadata,
                identity_id: spec.identity_id,
            })
            .await
            .map_err(|e| identity_gone(e, spec.identity_id))?;
        Ok(CreatedKey {
            key,
            secret: new.plaintext,
        })
    }

    /// Creates an identity whose keys share `limits`.
    pub async fn create_identity(
        &self,
        name: &str,
        limits: IdentityLimitsPatch,
        now: DateTime<Utc>,
    ) -> Result<Identity, AdminError> {
        let name = valid_name(name)?;
        valid_identity_limits(&limits)?;
        Ok(self.identities.create_identity(&name, limits, now).await?)
    }

    pub async fn get_identity(&self, id: i64) -> Result<Identity, AdminError> {
        self.identities
            .get_identity(id)
            .await?
            .ok_or(AdminError::IdentityNotFound(id))
    }

    /// A page of identities, oldest first (`page_size` 0: [`DEFAULT_PAGE_SIZE`]).
    pub async fn list_identities(
        &self,
        page_size: u32,
        after_id: i64,
    ) -> Result<IdentityPage, AdminError> {
        let page_size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(AdminError::invalid(
                    "page_size",
                    format!("{n} is more than {MAX_PAGE_SIZE}"),
                ));
            }
            n => n,
        };
        let mut identities = self
            .identities
            .list_identities(after_id.max(0), page_size + 1)
            .await?;
        let next_after_id = if identities.len() > page_size as usize {
            identities.truncate(page_size as usize);
            identities.last().map(|i| i.id)
        } else {
            None
        };
        Ok(IdentityPage {
            identities,
            next_after_id,
        })
    }

    /// Changes the limits `patch` names; every replica sees them within a second.
    pub async fn set_identity_limits(
        &self,
        id: i64,
        patch: IdentityLimitsPatch,
        now: DateTime<Utc>,
    ) -> Result<Identity, AdminError> {
        if patch.is_empty() {
            return Err(AdminError::invalid("limits", "nothing to change"));
        }
        valid_identity_limits(&patch)?;
        self.identities
            .set_identity_limits(id, patch, now)
            .await?
            .ok_or(AdminError::IdentityNotFound(id))
    }

    /// Deletes an identity; its keys stay, with their own limits only.
    pub async fn delete_identity(&self, id: i64, now: DateTime<Utc>) -> Result<(), AdminError> {
        if self.identities.delete_identity(id, now).await? {
            Ok(())
        } else {
            Err(AdminError::IdentityNotFound(id))
        }
    }

    /// An identity's shared counters now.
    pub async fn identity_usage(&self, id: i64, now: DateTime<Utc>) -> Result<Usage, AdminError> {
        Ok(self.quotas.identity_usage(id, now).await?)
    }

    pub async fn get(&self, id: i64) -> Result<ApiKey, AdminError> {
        self.keys.get(id).await?.ok_or(AdminError::NotFound(id))
    }

    /// A page of keys, oldest first.
    pub async fn list(
        &self,
        listing: &KeyListing,
        now: DateTime<Utc>,
    ) -> Result<KeyPage, AdminError> {
        let page_size = match listing.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(AdminError::invalid(
                    "page_size",
                    format!("{n} is more than {MAX_PAGE_SIZE}"),
                ));
            }
            n => n,
        };
        if let Some(prefix) = &listing.name_prefix {
            if prefix.chars().count() > MAX_NAME_CHARS {
                return Err(AdminError::invalid(
                    "name_prefix",
                    format!("longer than {MAX_NAME_CHARS} characters"),
                ));
            }
            // No name holds one, and PostgreSQL refuses NUL in text.
            if prefix.chars().any(char::is_control) {
                return Err(AdminError::invalid(
                    "name_prefix",
                    "must not hold control characters",
                ));
            }
        }
        // One more than the page, to know whether another page follows.
        let mut keys = self
            .keys
            .list(&KeyQuery {
                after_id: listing.after_id.max(0),
                limit: page_size + 1,
                status: listing.status,
                name_prefix: listing.name_prefix.clone(),
                identity_id: listing.identity_id,
                now,
            })
            .await?;
        let next_after_id = if keys.len() > page_size as usize {
            keys.truncate(page_size as usize);
            keys.last().map(|k| k.id)
        } else {
            None
        };
        Ok(KeyPage {
            keys,
            next_after_id,
        })
    }

    /// Changes what `update` names, all of it or nothing.
    pub async fn update(
        &self,
        id: i64,
        mut update: KeyUpdate,
        now: DateTime<Utc>,
    ) -> Result<ApiKey, AdminError> {
        if update.is_empty() {
            return Err(AdminError::invalid(
                "update_mask",
                "nothing to change: name a new name, limits, expiry, permissions, metadata or identity",
            ));
        }
        if let Some(name) = &update.name {
            update.name = Some(valid_name(name)?);
        }
        let l = update.limits;
        for (field, v) in [
            ("limits.per_minute", l.per_minute),
            ("limits.daily", l.daily),
            ("limits.monthly", l.monthly),
        ] {
            valid_limit(field, v.flatten())?;
        }
        if let Some(p) = &update.permissions {
            update.permissions = Some(valid_permissions(p)?);
        }
        if let Some(m) = &update.metadata {
            valid_metadata(m)?;
        }
        let identity_id = update.identity_id.flatten();
        if let Some(identity) = identity_id {
            self.existing_identity(identity).await?;
        }
        self.keys
            .update(id, &update, now)
            .await
            .map_err(|e| identity_gone(e, identity_id))?
            .ok_or(AdminError::NotFound(id))
    }

    /// Refuses an identity id that names none, as the caller's mistake.
    async fn existing_identity(&self, id: i64) -> Result<(), AdminError> {
        match self.identities.get_identity(id).await? {
            Some(_) => Ok(()),
            None => Err(AdminError::invalid(
                "identity_id",
                format!("no identity with id {id}"),
            )),
        }
    }

    /// Gives a key a new secret; the one it had keeps working for `grace` (zero: it stops at
    /// once), and a secret retired by an earlier rotation stops at once. Limits, counters and
    /// everything else stay. A revoked key is not rotated.
    pub async fn rotate(
        &self,
        id: i64,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Result<RotatedKey, AdminError> {
        if grace > MAX_GRACE {
            return Err(AdminError::invalid(
                "grace",
                format!("longer than {} days", MAX_GRACE.as_secs() / 86_400),
            ));
        }
        if self.get(id).await?.status == KeyStatus::Revoked {
            return Err(AdminError::invalid(
                "id",
                format!("API key {id} is revoked: create a new key instead"),
            ));
        }
        // In whole seconds, as it is shown: the old secret stops at the second it is said to.
        let until =
            now + chrono::Duration::from_std(grace).expect("a grace of at most 30 days fits");
        let old_key_expires_at = DateTime::from_timestamp(until.timestamp(), 0).unwrap_or(until);
        let new = keys::generate();
        let key = self
            .keys
            .rotate(
                id,
                &Rotation {
                    key: &new,
                    old_expires_at: old_key_expires_at,
                    now,
                },
            )
            .await?
            .ok_or(AdminError::NotFound(id))?;
        Ok(RotatedKey {
            key,
            secret: new.plaintext,
            old_key_expires_at,
        })
    }

    /// Revokes a key (a revoked key stays revoked); returns it as it is now.
    pub async fn revoke(&self, id: i64, now: DateTime<Utc>) -> Result<ApiKey, AdminError> {
        if !self.keys.revoke(id, now).await? {
            return Err(AdminError::NotFound(id));
        }
        self.get(id).await
    }

    /// A key's counters at `now`, and its requests of the last `days` UTC days (today
    /// included; 0: [`DEFAULT_USAGE_DAYS`]) from the request log.
    pub async fn usage(
        &self,
        id: i64,
        days: u32,
        now: DateTime<Utc>,
    ) -> Result<UsageReport, AdminError> {
        let (from, to) = usage_period(days, now)?;
        // Known key first: an unknown id is NOT_FOUND, not an empty report.
        self.get(id).await?;
        let counters = self.quotas.usage(id, now).await?;
        self.report(counters, from, to, Some(id), None).await
    }

    /// An identity's shared counters at `now`, and the requests of its keys (as the log
    /// records the identity of each) of the last `days` UTC days (as [`KeyAdmin::usage`]).
    pub async fn identity_usage_report(
        &self,
        id: i64,
        days: u32,
        now: DateTime<Utc>,
    ) -> Result<UsageReport, AdminError> {
        let (from, to) = usage_period(days, now)?;
        // Known identity first: an unknown (or deleted) one is NOT_FOUND, not an empty report.
        self.get_identity(id).await?;
        let counters = self.quotas.identity_usage(id, now).await?;
        self.report(counters, from, to, None, Some(id)).await
    }

    /// `counters`, with the requests per UTC day in `[from, to)` the log has for that key or
    /// identity.
    async fn report(
        &self,
        counters: Usage,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        key_id: Option<i64>,
        identity_id: Option<i64>,
    ) -> Result<UsageReport, AdminError> {
        let summary = self
            .log
            .summarize(&UsageQuery {
                from,
                to,
                key_id,
                identity_id,
                top: 0,
            })
            .await?;
        Ok(UsageReport {
            counters,
            days: summary.days,
        })
    }
}

/// The last `days` UTC days up to `now`'s, today included (0: [`DEFAULT_USAGE_DAYS`]), as a
/// time range `[from, to)`.
fn usage_period(
    days: u32,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), AdminError> {
    let days = match days {
        0 => DEFAULT_USAGE_DAYS,
        n if n > MAX_USAGE_DAYS => {
            return Err(AdminError::invalid(
                "days",
                format!("{n} is more than {MAX_USAGE_DAYS}"),
            ));
        }
        n => n,
    };
    let today = now.date_naive();
    let midnight = |d: NaiveDate| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    let first = today
        .checked_sub_days(Days::new(u64::from(days) - 1))
        .unwrap_or(NaiveDate::MIN);
    let end = today.checked_add_days(Days::new(1)).unwrap_or(today);
    Ok((midnight(first), midnight(end)))
}

/// A name as stored: trimmed, 1 to [`MAX_NAME_CHARS`] characters, no control characters.
fn valid_name(name: &str) -> Result<String, AdminError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(AdminError::invalid("name", "must not be empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(AdminError::invalid(
            "name",
            format!("longer than {MAX_NAME_CHARS} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(AdminError::invalid(
            "name",
            "must not hold control characters (line breaks, tabs, …)",
        ));
    }
    Ok(name.to_string())
}

/// A key's write refused because the identity it names was deleted after it was looked up: the
/// caller's mistake, said as if the lookup had not found it.
fn identity_gone(e: StoreError, identity_id: Option<i64>) -> AdminError {
    match (&e, identity_id) {
        (StoreError::Query(q), Some(id))
            if q.as_database_error()
                .is_some_and(|d| d.is_foreign_key_violation()) =>
        {
            AdminError::invalid("identity_id", format!("no identity with id {id}"))
        }
        _ => e.into(),
    }
}

/// A permission name: 1 to [`MAX_PERMISSION_CHARS`] of `a-z 0-9 . _ : -`, starting with a
/// letter or digit (what a route's `context_extensions` names).
pub fn is_permission_name(p: &str) -> bool {
    p.len() <= MAX_PERMISSION_CHARS
        && p.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && p.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b':' | b'-')
        })
}

/// Permissions as stored: each a valid name, at most [`MAX_PERMISSIONS`], sorted, no repeats.
pub fn valid_permissions(permissions: &[String]) -> Result<Vec<String>, AdminError> {
    if permissions.len() > MAX_PERMISSIONS {
        return Err(AdminError::invalid(
            "permissions",
            format!("more than {MAX_PERMISSIONS} permissions"),
        ));
    }
    let mut out = Vec::with_capacity(permissions.len());
    for p in permissions {
        let p = p.trim();
        if !is_permission_name(p) {
            let shown: String = p.chars().take(MAX_PERMISSION_CHARS).collect();
            return Err(AdminError::invalid(
                "permissions",
                format!(
                    "{shown:?} is not a permission name: 1 to {MAX_PERMISSION_CHARS} of a-z, 0-9, \
                     '.', '_', ':', '-', starting with a letter or digit"
                ),
            ));
        }
        out.push(p.to_string());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// A metadata field name: 1 to [`MAX_METADATA_NAME_CHARS`] of `a-z 0-9 _ -`, starting with a
/// letter (it may become an `x-tollgate-<name>` header), and not one tollgate sets itself.
pub fn is_metadata_name(name: &str) -> bool {
    name.len() <= MAX_METADATA_NAME_CHARS
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
        && !RESERVED_METADATA.contains(&name)
}

/// Metadata a key may carry: at most [`MAX_METADATA_FIELDS`] fields with valid names, each value
/// at most [`MAX_METADATA_VALUE_BYTES`] of printable text (it may become a header value), at most
/// [`MAX_METADATA_BYTES`] as JSON.
pub fn valid_metadata(metadata: &BTreeMap<String, String>) -> Result<(), AdminError> {
    if metadata.len() > MAX_METADATA_FIELDS {
        return Err(AdminError::invalid(
            "metadata",
            format!("more than {MAX_METADATA_FIELDS} fields"),
        ));
    }
    for (name, value) in metadata {
        if !is_metadata_name(name) {
            let shown: String = name.chars().take(MAX_METADATA_NAME_CHARS).collect();
            return Err(AdminError::invalid(
                "metadata",
                format!(
                    "{shown:?} is not a field name: 1 to {MAX_METADATA_NAME_CHARS} of a-z, 0-9, \
                     '_', '-', starting with a letter, and none of {}",
                    RESERVED_METADATA.join(", ")
                ),
            ));
        }
        if value.len() > MAX_METADATA_VALUE_BYTES {
            return Err(AdminError::invalid(
                "metadata",
                format!("{name}: longer than {MAX_METADATA_VALUE_BYTES} bytes"),
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(AdminError::invalid(
                "metadata",
                format!("{name}: must not hold control characters"),
            ));
        }
    }
    let size = crate::store::keys::metadata_text(metadata).map_or(0, |t| t.len());
    if size > MAX_METADATA_BYTES {
        return Err(AdminError::invalid(
            "metadata",
            format!("{size} bytes as JSON, more than {MAX_METADATA_BYTES}"),
        ));
    }
    Ok(())
}

fn valid_identity_limits(limits: &IdentityLimitsPatch) -> Result<(), AdminError> {
    valid_limit("limits.per_minute", limits.per_minute.flatten())?;
    valid_limit("limits.daily", limits.daily.flatten())?;
    valid_limit("limits.monthly", limits.monthly.flatten())
}

fn valid_limits(limits: &Limits) -> Result<(), AdminError> {
    valid_limit("limits.per_minute", limits.per_minute)?;
    valid_limit("limits.daily", limits.daily)?;
    valid_limit("limits.monthly", limits.monthly)
}

/// A limit is a count of at least 1 that the databases can hold (as `tollgate keys` parses
/// them); unlimited is `None`.
fn valid_limit(field: &str, v: Option<u64>) -> Result<(), AdminError> {
    match v {
        Some(0) => Err(AdminError::invalid(
            field,
            "0 is not a limit: use a count of at least 1, or none for unlimited (to block a \
             key, revoke it)",
        )),
        Some(n) if n > i64::MAX as u64 => Err(AdminError::invalid(
            field,
            format!("{n} is too large (at most {})", i64::MAX),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_bounded_and_printable() {
        assert_eq!(valid_name("  portal ").unwrap(), "portal");
        for bad in [
            "",
            "   ",
            "a\nb",
            "tab\there",
            &"x".repeat(MAX_NAME_CHARS + 1),
        ] {
            let e = valid_name(bad).unwrap_err();
            assert!(
                matches!(&e, AdminError::Invalid { field, .. } if field == "name"),
                "{e}"
            );
        }
        assert!(valid_name(&"é".repeat(MAX_NAME_CHARS)).is_ok());
    }

    #[test]
    fn limits_are_counts_the_database_holds() {
        assert!(valid_limit("limits.daily", None).is_ok());
        assert!(valid_limit("limits.daily", Some(1)).is_ok());
        assert!(valid_limit("limits.daily", Some(i64::MAX as u64)).is_ok());
        let e = valid_limit("limits.daily", Some(0)).unwrap_err();
        assert!(
            e.to_string().starts_with("limits.daily: 0 is not a limit"),
            "{e}"
        );
        assert!(valid_limit("limits.daily", Some(i64::MAX as u64 + 1)).is_err());
    }

    #[test]
    fn permissions_and_metadata_are_bounded_names_and_text() {
        let p =
            |v: &[&str]| valid_permissions(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            p(&["reports.read", " billing:write ", "reports.read"]).unwrap(),
            vec!["billing:write", "reports.read"]
        );
        for bad in ["", "Reports", ".x", "a b", "a,b", &"x".repeat(65), "é"] {
            assert!(p(&[bad]).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..=MAX_PERMISSIONS).map(|i| format!("p{i}")).collect();
        assert!(valid_permissions(&many).is_err());
        let m = |pairs: &[(&str, &str)]| {
            valid_metadata(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        assert!(m(&[("plan", "gold"), ("tenant-id", "acme")]).is_ok());
        for bad in [
            ("Plan", "x"),
            ("key_id", "7"),
            ("identity_id", "7"),
            ("1plan", "x"),
            ("plan", "a\r\nx-evil: 1"),
            ("plan", &"v".repeat(MAX_METADATA_VALUE_BYTES + 1)),
        ] {
            assert!(m(&[bad]).is_err(), "{bad:?}");
        }
        let fields: Vec<(String, String)> = (0..MAX_METADATA_FIELDS)
            .map(|i| (format!("f{i}"), "v".repeat(200)))
            .collect();
        let e = valid_metadata(&fields.into_iter().collect()).unwrap_err();
        assert!(e.to_string().contains("bytes as JSON"), "{e}");
    }

    #[tokio::test]
    async fn one_path_for_every_operation() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::DatabaseConfig {
            url: crate::config::SecretUrl(format!("sqlite://{}/a.db", dir.path().display())),
            ..Default::default()
        };
        let stores = crate::store::open(&config, true).await.unwrap();
        let admin = KeyAdmin::new(&stores, Some(60));
        let now: DateTime<Utc> = "2026-03-10T12:00:00Z".parse().unwrap();
        let mut ids = Vec::new();
        for name in ["alpha-1", "alpha-2", "beta"] {
            let created = admin
                .create(
                    NewKeySpec {
                        name: name.into(),
                        ..Default::default()
                    },
                    now,
                )
                .await
                .unwrap();
            assert!(keys::is_well_formed(&created.secret));
            assert!(!format!("{created:?}").contains(&created.secret));
            ids.push(created.key.id);
        }
        let page = admin
            .list(
                &KeyListing {
                    page_size: 1,
                    name_prefix: Some("alpha".into()),
                    ..Default::default()
                },
                now,
            )
            .await
            .unwrap();
        assert_eq!(page.keys[0].id, ids[0]);
        assert_eq!(page.next_after_id, Some(ids[0]));
        let page = admin
            .list(
                &KeyListing {
                    page_size: 1,
                    after_id: ids[0],
                    name_prefix: Some("alpha".into()),
                    ..Default::default()
                },
                now,
            )
            .await
            .unwrap();
        assert_eq!((page.keys[0].id, page.next_after_id), (ids[1], None));
        // A failed update changes nothing.
        let before = admin.get(ids[2]).await.unwrap();
        let bad = KeyUpdate {
            name: Some("renamed".into()),
            limits: crate::store::LimitsPatch {
                daily: Some(Some(0)),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(admin.update(ids[2], bad, now).await.is_err());
        assert_eq!(admin.get(ids[2]).await.unwrap(), before);
        assert!(matches!(
            admin.update(999, KeyUpdate::default(), now).await,
            Err(AdminError::Invalid { .. })
        ));
        let revoked = admin.revoke(ids[2], now).await.unwrap();
        assert_eq!(status_at(&revoked, now), StatusFilter::Revoked);
        assert!(matches!(
            admin.revoke(999, now).await,
            Err(AdminError::NotFound(999))
        ));
        assert!(matches!(
            admin.usage(999, 0, now).await,
            Err(AdminError::NotFound(999))
        ));
        assert!(matches!(
            admin.identity_usage_report(999, 0, now).await,
            Err(AdminError::IdentityNotFound(999))
        ));
        assert!(matches!(
            admin
                .identity_usage_report(999, MAX_USAGE_DAYS + 1, now)
                .await,
            Err(AdminError::Invalid { .. })
        ));
        stores.close().await;
    }
}
