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
pub mod identities;
pub mod keys;
pub mod log;
pub(crate) mod postgres;
pub mod quota;
pub(crate) mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

pub use identities::{Identity, IdentityLimitsPatch, IdentityStore};
pub use keys::{
    KeyChange, KeyQuery, KeyRecord, KeyStore, KeyUpdate, LimitsPatch, Rotation, StatusFilter,
};
pub use log::{
    DayUsage, KeyUsage, LogApi, LogRow, Maintenance, Outcome, RequestLogStore, UsageQuery,
    UsageSummary,
};
pub use postgres::LISTEN_PING_SQL;
pub use quota::{Quota, QuotaOutcome, QuotaStore, SharedOutcome, Spend, Usage};

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
    /// A check's wait for the database outlasted `database.timeout`, counted from its arrival.
    #[error("database did not answer within database.timeout")]
    TimedOut,
    /// The TLS handshake with the database failed over its certificate: what that means for
    /// the URL's `sslmode` and `sslrootcert`.
    #[error("{hint}: {source}")]
    Certificate {
        hint: &'static str,
        #[source]
        source: Arc<sqlx::Error>,
    },
}

impl StoreError {
    /// Whether retrying later may succeed (the server is away or busy), as opposed to a bug, a
    /// bad schema or data the database refuses, which retrying cannot fix.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::TimedOut)
    }

    /// What went wrong, in words that quote no value the statement carried (a database's own
    /// message may quote them): the error's kind, with the database's error code and the
    /// constraint it names, if any. For logs about rows that may hold secrets.
    pub fn kind(&self) -> String {
        match self {
            StoreError::Unavailable(e) => format!("unavailable: {}", sqlx_kind(e)),
            StoreError::Query(e) => sqlx_kind(e),
            StoreError::Migrate(_) => "migration failed".into(),
            StoreError::UnsupportedUrl(_) => "unsupported database URL".into(),
            StoreError::Corrupt { table, .. } => format!("corrupt row in {table}"),
            StoreError::TimedOut => "timed out".into(),
            StoreError::Certificate { hint, .. } => (*hint).into(),
        }
    }

    /// The error of a store that is closed (its pool or its writer is gone).
    pub(crate) fn closed() -> Self {
        StoreError::Unavailable(Arc::new(sqlx::Error::PoolClosed))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let transient = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => {
                db.message().contains("database is locked")
                    || db
                        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                        .is_some_and(|pg| postgres_server_trouble(pg.code()))
            }
            _ => false,
        };
        if transient {
            StoreError::Unavailable(Arc::new(e))
        } else {
            StoreError::Query(Arc::new(e))
        }
    }
}

/// What a certificate problem in a TLS handshake with the database means, in the terms of the
/// URL's parameters; `None` if `e` is not one.
fn certificate_problem(e: &sqlx::Error) -> Option<&'static str> {
    use rustls::CertificateError as C;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        // An I/O error's source is its inner error's source: look at the inner one itself.
        let inner = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        let rustls = [Some(c), inner]
            .into_iter()
            .flatten()
            .find_map(|c| c.downcast_ref::<rustls::Error>());
        if let Some(rustls::Error::InvalidCertificate(problem)) = rustls {
            return Some(match problem {
                C::UnknownIssuer => {
                    "the database server's certificate is not signed by a CA in sslrootcert \
                     (without sslrootcert: by none of the system's roots)"
                }
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    "the database server's certificate is not for the host in the URL \
                     (sslmode=verify-full checks it; verify-ca does not)"
                }
                C::Expired | C::ExpiredContext { .. } => {
                    "the database server's certificate has expired"
                }
                C::NotValidYet | C::NotValidYetContext { .. } => {
                    "the database server's certificate is not valid yet"
                }
                C::Revoked => "the database server's certificate is revoked",
                _ => "the database server's certificate does not verify",
            });
        }
        cause = c.source();
    }
    None
}

/// The kind of a sqlx error, quoting nothing of what the statement carried.
fn sqlx_kind(e: &sqlx::Error) -> String {
    let kind = match e {
        sqlx::Error::Database(db) => {
            let mut kind = format!("database error {}", db.code().unwrap_or_default());
            if let Some(constraint) = db.constraint() {
                kind.push_str(&format!(" (constraint {constraint})"));
            }
            return kind;
        }
        sqlx::Error::Io(_) => "connection error",
        sqlx::Error::PoolTimedOut => "pool timed out",
        sqlx::Error::PoolClosed => "pool closed",
        sqlx::Error::WorkerCrashed => "worker crashed",
        sqlx::Error::Protocol(_) => "protocol error",
        sqlx::Error::Encode(_) => "a value could not be encoded",
        _ => "query error",
    };
    kind.to_string()
}

/// Whether a PostgreSQL error (by its SQLSTATE) is about the server rather than the statement or
/// its data, so the same statement may succeed later: connection trouble (class 08), a rolled back
/// transaction (40: serialization failure, deadlock), no resources (53: disk full, out of memory,
/// too many connections), an operator or timeout intervening (57: shutdown, restart, statement
/// timeout), a system error (58), a server that is read-only for now (25006: a standby, as during
/// a failover), a lock not available in time (55P03). Everything else, data and schema errors
/// above all (22, 23, 42), retrying cannot fix.
fn postgres_server_trouble(sqlstate: &str) -> bool {
    matches!(sqlstate.get(..2), Some("08" | "40" | "53" | "57" | "58"))
        || matches!(sqlstate, "25006" | "55P03")
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migrate(Arc::new(e))
    }
}

/// One database: all three seams, and its pools to close.
#[async_trait]
pub(crate) trait Database: KeyStore + IdentityStore + QuotaStore + RequestLogStore {
    /// Closes the connection pools; in-flight statements finish first.
    async fn close(&self);
}

/// The three stores of one database, shared by the whole process.
#[derive(Clone)]
pub struct Stores {
    pub keys: Arc<dyn KeyStore>,
    pub identities: Arc<dyn IdentityStore>,
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
            identities: db.clone(),
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
        let db = sqlite::SqliteStore::open(url, config.timeout.0).await?;
        if migrate {
            db.migrate().await?;
        }
        Arc::new(db)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let settings = postgres::PgSettings {
            max_connections: config.max_connections,
            timeout: config.timeout.0,
        };
        let db = postgres::PgStore::open(url, settings)
            .await
            .map_err(|e| match &e {
                StoreError::Unavailable(cause) | StoreError::Query(cause) => {
                    match certificate_problem(cause) {
                        Some(hint) => StoreError::Certificate {
                            hint,
                            source: cause.clone(),
                        },
                        None => e,
                    }
                }
                _ => e,
            })?;
        if migrate {
            db.migrate().await?;
        }
        Arc::new(db)
    } else {
        return Err(StoreError::UnsupportedUrl(crate::config::redact_url(url)));
    };
    Ok(Stores::new(db))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_errors_about_the_server_are_transient_and_about_the_data_are_not() {
        for code in [
            "08006", "40001", "40P01", "53100", "53300", "57014", "57P01", "57P03", "58030",
            "25006", "55P03",
        ] {
            assert!(postgres_server_trouble(code), "{code}");
        }
        // A NUL or bad encoding, a check or not-null violation, an undefined column, a
        // value too long, a bug.
        for code in [
            "22021", "22P02", "23514", "23502", "42703", "22001", "XX000", "",
        ] {
            assert!(!postgres_server_trouble(code), "{code}");
        }
    }

    #[test]
    fn a_closed_pool_is_transient_and_a_protocol_error_is_not() {
        assert!(StoreError::from(sqlx::Error::PoolTimedOut).is_transient());
        assert!(!StoreError::from(sqlx::Error::Protocol("bad reply".into())).is_transient());
    }
}
