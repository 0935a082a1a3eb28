//! Durable state: keys, usage quotas and the request log, one trait per seam.
//!
//! - [`keys`]: [`KeyStore`], the keys and their changes.
//! - [`quota`]: [`QuotaStore`], the daily and monthly counters.
//! - [`log`]: [`RequestLogStore`], the request log: written in batches, completed from Envoy's
//!   access log, summarised and kept in shape.
//! - [`batched`]: quota counted in blocks reserved from the database (`quota.mode: batched`, and
//!   keys without quotas), behind the same [`QuotaStore`].
//! - `postgres/` and `sqlite/`: the two backends, one file per seam each. SQLite is the embedded
//!   default.
//!
//! The backend is chosen once, from `database.url`, by [`open`]; nothing on the request path knows
//! which one it has.

pub mod batched;
pub(crate) mod consume;
pub mod keys;
pub mod log;
pub(crate) mod postgres;
pub mod quota;
pub(crate) mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

pub use keys::{KeyChange, KeyRecord, KeyStore, LimitsPatch};
pub use log::{
    DayUsage, KeyUsage, LogApi, LogRow, Maintenance, Outcome, RequestLogStore, UsageQuery,
    UsageSummary,
};
pub use quota::{Quota, QuotaOutcome, QuotaStore, Spend, Usage};

use crate::config::DatabaseConfig;

/// What went wrong talking to the database. Cheap to clone, so one failure can answer every
/// request that waited on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(#[source] Arc<sqlx::Error>),
    #[error("database error: {0}")]
    Query(#[source] Arc<sqlx::Error>),
    #[error("migration failed: {0}")]
    Migrate(#[source] Arc<sqlx::migrate::MigrateError>),
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
    #[error("corrupt row in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
}

impl StoreError {
    /// Whether retrying later may succeed (the server is away or busy), as opposed to a bug or a
    /// bad schema that retrying cannot fix.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// The error of a store that is closed (its pool or its writer is gone).
    pub(crate) fn closed() -> Self {
        StoreError::Unavailable(Arc::new(sqlx::Error::PoolClosed))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(Arc::new(e)),
            sqlx::Error::Database(db) if db.message().contains("database is locked") => {
                StoreError::Unavailable(Arc::new(e))
            }
            _ => StoreError::Query(Arc::new(e)),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migrate(Arc::new(e))
    }
}

/// One database: all three seams, and its pools to close.
#[async_trait]
pub(crate) trait Database: KeyStore + QuotaStore + RequestLogStore {
    /// Closes the connection pools; in-flight statements finish first.
    async fn close(&self);
}

/// The three stores of one database, shared by the whole process.
#[derive(Clone)]
pub struct Stores {
    pub keys: Arc<dyn KeyStore>,
    pub quotas: Arc<dyn QuotaStore>,
    pub log: Arc<dyn RequestLogStore>,
    db: Arc<dyn Database>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

impl Stores {
    fn new(db: Arc<dyn Database>) -> Self {
        Stores {
            keys: db.clone(),
            quotas: db.clone(),
            log: db.clone(),
            db,
        }
    }

    /// Closes the connection pools; in-flight statements finish first.
    pub async fn close(&self) {
        self.db.close().await
    }
}

/// Opens the database `config.url` names, applying migrations first when `migrate` is set.
pub async fn open(config: &DatabaseConfig, migrate: bool) -> Result<Stores, StoreError> {
    let url = config.url.expose();
    let db: Arc<dyn Database> = if url.starts_with("sqlite:") {
        let db = sqlite::SqliteStore::open(url).await?;
        if migrate {
            db.migrate().await?;
        }
        Arc::new(db)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let settings = postgres::PgSettings {
            max_connections: config.max_connections,
            timeout: config.timeout.0,
        };
        let db = postgres::PgStore::open(url, settings).await?;
        if migrate {
            db.migrate().await?;
        }
        Arc::new(db)
    } else {
        return Err(StoreError::UnsupportedUrl(crate::config::redact_url(url)));
    };
    Ok(Stores::new(db))
}
