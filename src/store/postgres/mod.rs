//! PostgreSQL: keys, quotas and the request log shared by every replica.
//!
//! - `keys.rs`: lookups and admin operations; changes reach replicas through `LISTEN`/`NOTIFY`,
//!   sent by a trigger on `api_keys` (so a change made by hand in SQL is seen too).
//! - `quota.rs`: the conditional `UPDATE … RETURNING` on the key's `api_usage` row, for the
//!   requests waiting at one moment in one statement.
//! - `log.rs`: the request log, partitioned by UTC month.

mod keys;
pub use keys::LISTEN_PING_SQL;
mod identities;
mod log;
pub(crate) mod quota;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio::sync::{Semaphore, mpsc};

use super::consume::{GiveBacks, PendingConsume};
use super::{Database, StoreError};

/// Settings of the connection pool.
#[derive(Debug, Clone, Copy)]
pub struct PgSettings {
    pub max_connections: u32,
    /// Longest wait for a connection, and the server-side statement timeout.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    consumes: mpsc::Sender<PendingConsume>,
    /// Gives back what the writer spent for checks that were not answered.
    give_backs: GiveBacks,
    /// Connections key lookups may hold at once (see [`PgStore::open`]).
    lookups: Arc<Semaphore>,
    /// `database.timeout`: the longest a lookup waits for its turn and its connection.
    timeout: Duration,
}

impl PgStore {
    /// Connects to the database named by a `postgres://` URL.
    /// libpq's TLS parameters work as libpq has them: `sslmode` (`disable`, `prefer`,
    /// `require`, `verify-ca`, `verify-full`), `sslrootcert`, `sslcert` and `sslkey`. Without
    /// `sslrootcert`, verify-ca and verify-full trust the system's roots.
    pub async fn open(url: &str, settings: PgSettings) -> Result<Self, StoreError> {
        let statement_timeout = format!("{}", settings.timeout.as_millis().max(1));
        let options = PgConnectOptions::from_str(&known_parameters_only(url))?
            .application_name("tollgate")
            .options([("statement_timeout", statement_timeout.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .min_connections(1)
            .acquire_timeout(settings.timeout)
            .connect_with(options)
            .await?;
        // The pool is shared. Half of it at most for quota statements, and a quarter at most for
        // key lookups: those are cache misses, which a flood of unknown keys turns into as many
        // lookups as it has keys, and without a bound they would hold every connection while
        // quota statements time out waiting for one. The rest is for the change listener, the
        // request log and its maintenance.
        let in_flight = (settings.max_connections as usize / 2).max(1);
        let (consumes, give_backs) = quota::start_writer(pool.clone(), in_flight);
        let lookups = Arc::new(Semaphore::new(
            (settings.max_connections as usize / 4).max(1),
        ));
        Ok(Self {
            pool,
            consumes,
            give_backs,
            lookups,
            timeout: settings.timeout,
        })
    }

    /// Applies migrations; several replicas may do so at once (sqlx holds an advisory lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Database for PgStore {
    async fn close(&self) {
        // Statements in flight end (each within `database.timeout`), and what they and earlier
        // ones spent for checks nobody was answering goes back, before the pool closes.
        self.give_backs.drain(2 * self.timeout).await;
        self.pool.close().await;
    }
}

/// The parameters of a URL's query that sqlx reads (it reads the same names as libpq).
const KNOWN_PARAMETERS: [&str; 18] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// `url` without the query parameters sqlx would not read: sqlx logs each of those with its
/// value, and a libpq URL may well carry `sslpassword=…`. They are named (only named) in a
/// warning here instead.
fn known_parameters_only(url: &str) -> std::borrow::Cow<'_, str> {
    let Some((base, query)) = url.split_once('?') else {
        return url.into();
    };
    let (known, ignored): (Vec<&str>, Vec<&str>) = query
        .split('&')
        .filter(|p| !p.is_empty())
        .partition(|p| KNOWN_PARAMETERS.contains(&p.split('=').next().unwrap_or_default()));
    if ignored.is_empty() {
        return url.into();
    }
    let names: Vec<&str> = ignored
        .iter()
        .map(|p| p.split('=').next().unwrap_or_default())
        .collect();
    tracing::warn!(
        parameters = %names.join(", "),
        "database.url: ignoring connection parameters tollgate does not use"
    );
    if known.is_empty() {
        base.to_string().into()
    } else {
        format!("{base}?{}", known.join("&")).into()
    }
}

/// The UTC day and the first day of the UTC month `now` falls in: how `api_usage` names them.
fn day_and_month(now: DateTime<Utc>) -> (NaiveDate, NaiveDate) {
    let day = now.date_naive();
    (day, day.with_day(1).expect("first of month"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_sqlx_would_log_are_left_out() {
        assert_eq!(
            known_parameters_only(
                "postgres://u@h/db?sslmode=verify-full&sslpassword=s3cret&sslrootcert=/ca.crt&connect_timeout=3"
            ),
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.crt"
        );
        assert_eq!(
            known_parameters_only("postgres://u@h/db?sslpassword=x"),
            "postgres://u@h/db"
        );
        assert_eq!(
            known_parameters_only("postgres://u@h/db?sslmode=require"),
            "postgres://u@h/db?sslmode=require"
        );
        assert_eq!(
            known_parameters_only("postgres://u@h/db"),
            "postgres://u@h/db"
        );
    }
}
