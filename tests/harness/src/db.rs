//! Databases of a test's own: [`TestDb`] on SQLite or PostgreSQL (dropped with the test, also
//! when it fails), statements and [`scalar`] reads on it, tollgate's stores opened on it, a lock
//! that holds quota writes, and [`every_database!`](crate::every_database), which runs one test
//! body on each database. PostgreSQL that does not answer fails the test, naming it.

use sqlx::Connection;
use tollgate::config::{DatabaseConfig, SecretUrl};
use tollgate::store::{self, Stores};

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server tests create their databases on: `TEST_POSTGRES_URL`, else the
/// machine's local server.
fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of the test's own, removed when dropped (also when the test fails).
pub struct TestDb {
    pub url: String,
    kind: Db,
    pg: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn create(kind: Db) -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        match kind {
            Db::Sqlite => TestDb {
                url: format!("sqlite://{}", dir.path().join("tollgate.db").display()),
                kind,
                pg: None,
                _dir: dir,
            },
            Db::Postgres => {
                let admin = postgres_admin_url();
                let name = format!("tollgate_test_{}", rand_suffix());
                let mut conn = connect_pg(&admin).await;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                let base = admin.rsplit_once('/').unwrap().0;
                TestDb {
                    url: format!("{base}/{name}"),
                    kind,
                    pg: Some((admin, name)),
                    _dir: dir,
                }
            }
        }
    }

    /// Runs one statement on this database.
    pub async fn execute(&self, sql: &str) {
        match self.kind {
            Db::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.url).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                    .execute(&mut c)
                    .await
                    .unwrap();
                c.close().await.unwrap();
            }
            Db::Postgres => {
                let mut c = connect_pg(&self.url).await;
                sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                    .execute(&mut c)
                    .await
                    .unwrap();
                c.close().await.unwrap();
            }
        }
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        scalar(&self.url, sql).await
    }

    /// Opens tollgate's stores on this database, as a replica does at start (migrating it).
    pub async fn open_stores(&self) -> Stores {
        store::open(
            &DatabaseConfig {
                url: SecretUrl(self.url.clone()),
                ..Default::default()
            },
            true,
        )
        .await
        .unwrap()
    }

    /// Takes a lock that makes every quota write wait until [`QuotaLock::release`].
    pub async fn lock_quota_writes(&self) -> QuotaLock {
        match self.kind {
            Db::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.url).await.unwrap();
                sqlx::query("BEGIN IMMEDIATE")
                    .execute(&mut c)
                    .await
                    .unwrap();
                QuotaLock::Sqlite(c)
            }
            Db::Postgres => {
                let mut c = connect_pg(&self.url).await;
                sqlx::query("BEGIN").execute(&mut c).await.unwrap();
                sqlx::query("LOCK TABLE api_usage IN EXCLUSIVE MODE")
                    .execute(&mut c)
                    .await
                    .unwrap();
                QuotaLock::Postgres(c)
            }
        }
    }
}

/// See [`TestDb::lock_quota_writes`].
pub enum QuotaLock {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl QuotaLock {
    pub async fn release(self) {
        match self {
            QuotaLock::Sqlite(mut c) => {
                sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
                c.close().await.unwrap();
            }
            QuotaLock::Postgres(mut c) => {
                sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
                c.close().await.unwrap();
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.pg.take() else {
            return;
        };
        // Drop is not async: drop the database from a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut conn = connect_pg(&admin).await;
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await;
            })
        })
        .join();
    }
}

/// A connection to the PostgreSQL database at `url`; panics, naming it, when it does not answer.
async fn connect_pg(url: &str) -> sqlx::PgConnection {
    sqlx::PgConnection::connect(url).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is not reachable at {url}: {e}. Run scripts/test, which starts it, \
             or set TEST_POSTGRES_URL."
        )
    })
}

/// Twelve lowercase letters and digits, for names no other test picks.
fn rand_suffix() -> String {
    use rand::RngExt;
    rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(12)
        .map(|c| char::from(c).to_ascii_lowercase())
        .collect()
}

/// The one `i64` that `sql` selects from the database at `db_url` (SQLite or PostgreSQL).
pub async fn scalar(db_url: &str, sql: &str) -> i64 {
    if db_url.starts_with("postgres") {
        let mut c = connect_pg(db_url).await;
        let v: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&mut c)
            .await
            .unwrap();
        return v;
    }
    let pool = sqlx::SqlitePool::connect(db_url).await.unwrap();
    let v: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    v
}

/// Runs each named `async fn NAME(db: Db)` once on SQLite and once on PostgreSQL, as the tests
/// `sqlite::NAME` and `postgres::NAME`.
#[macro_export]
macro_rules! every_database {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::db::Db::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::db::Db::Postgres).await
                }
            )*
        }
    };
}
