//! The embedded default: keys, quotas and the request log in one SQLite file.
//!
//! SQLite allows one writer at a time, so writes go through a pool of exactly one connection
//! (they queue in-process instead of failing with `SQLITE_BUSY`), and reads through a separate
//! pool that WAL mode lets run beside the writer. Other processes (`tollgate keys …` while
//! `serve` runs) wait on the busy timeout. Times are stored as RFC 3339 UTC text ([`ts_text`]),
//! days and months as `YYYY-MM-DD` and `YYYY-MM`.
//!
//! - `keys.rs`: lookups, admin operations, and the `change_seq` poll that reports changes;
//! - `quota.rs`: the quota writer, which runs every request waiting at once in one transaction;
//! - `log.rs`: the request log and its retention.

mod identities;
mod keys;
mod log;
pub(crate) mod quota;

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::mpsc;

use super::consume::{GiveBacks, PendingConsume};
use super::{Database, StoreError};

#[derive(Debug, Clone)]
pub struct SqliteStore {
    read: SqlitePool,
    write: SqlitePool,
    consumes: mpsc::Sender<PendingConsume>,
    /// Gives back what the writer spent for checks that were not answered.
    give_backs: GiveBacks,
    /// `database.timeout`.
    timeout: Duration,
}

impl SqliteStore {
    /// Opens (creating when missing) the database file named by a `sqlite://PATH` URL. A
    /// statement waits at most `timeout` for a connection, and as long again for a lock another
    /// process holds.
    pub async fn open(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL: a commit survives a process crash; only an OS crash can lose the
            // last transactions. The quota counters are not worth an fsync per request here.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(timeout)
            .foreign_keys(true);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(timeout)
            // No ping before each use: a file is not a server that goes away, and the ping is a
            // round trip to sqlx's SQLite thread, as slow as a quota statement.
            .test_before_acquire(false)
            // A quota batch answers with a row per request.
            .connect_with(options.clone().row_buffer_size(quota::ROW_BUFFER))
            .await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(timeout)
            .test_before_acquire(false)
            // 1 MiB of page cache each, not SQLite's 2 MB: the readers look up keys the key
            // cache missed, spread over the whole table, so a bigger cache hardly hits more,
            // and the operating system caches the file anyway. Four full default caches were
            // 8 MB of the process with 100,000 keys in use.
            .connect_with(options.read_only(false).pragma("cache_size", "-1024"))
            .await?;
        let (consumes, give_backs) = quota::start_writer(write.clone());
        Ok(Self {
            read,
            write,
            consumes,
            give_backs,
            timeout,
        })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.write)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Database for SqliteStore {
    async fn close(&self) {
        // Statements in flight end (each within `database.timeout`), and what they and earlier
        // ones spent for checks nobody was answering goes back, before the pools close.
        self.give_backs.drain(2 * self.timeout).await;
        self.read.close().await;
        self.write.close().await;
    }
}

/// RFC 3339 UTC with milliseconds: the text form of times in SQLite (it sorts as time does).
pub(crate) fn ts_text(t: DateTime<Utc>) -> String {
    with_ts_text(t, str::to_owned)
}

/// `f` of [`ts_text`]'s text, written on the stack when it can be (so a caller that keeps it in
/// another form copies it once).
pub(crate) fn with_ts_text<R>(t: DateTime<Utc>, f: impl FnOnce(&str) -> R) -> R {
    let mut buf = [0; TS_TEXT_LEN];
    match write_ts_text(t, &mut buf) {
        Some(text) => f(text),
        None => f(&t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    }
}

/// Length of [`ts_text`]'s text for years 0 to 9999: `2026-03-10T12:00:20.123Z`.
const TS_TEXT_LEN: usize = 24;

/// [`ts_text`] written by hand into `buf`, for years 0 to 9999 outside a leap second (`None`
/// otherwise: chrono writes those). It runs for every request-log row and quota statement, and
/// chrono's formatter costs several times as much.
fn write_ts_text(t: DateTime<Utc>, buf: &mut [u8; TS_TEXT_LEN]) -> Option<&str> {
    use chrono::{Datelike, Timelike};
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    // chrono's Millis truncates; a leap second's nanoseconds run past 1,000,000,000.
    let ms = t.nanosecond() / 1_000_000;
    if ms >= 1000 {
        return None;
    }
    *buf = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, digits: usize, mut n: u32| {
        for i in (at..at + digits).rev() {
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    put(20, 3, ms);
    std::str::from_utf8(buf).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn ts_text_is_what_chrono_writes() {
        let chrono_text = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut times: Vec<DateTime<Utc>> = (0..20_000)
            .map(|_| {
                // xorshift: seconds across years 0 to 9999, any nanosecond.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let secs = (state % 315_537_897_600) as i64 - 62_167_219_200;
                DateTime::from_timestamp(secs, (state >> 34) as u32 % 1_000_000_000).unwrap()
            })
            .collect();
        times.extend([
            DateTime::from_timestamp(0, 0).unwrap(),
            DateTime::from_timestamp(1_773_144_020, 999_999_999).unwrap(),
            DateTime::from_timestamp(-62_167_219_200, 0).unwrap(),
            DateTime::from_timestamp(253_402_300_799, 999_000_000).unwrap(),
            // Outside what the hand-written form covers: chrono writes them.
            DateTime::from_timestamp(253_402_300_800, 0).unwrap(),
            DateTime::from_timestamp(-62_167_219_201, 0).unwrap(),
            DateTime::from_timestamp(1_483_228_799, 1_500_000_000).unwrap(),
        ]);
        for t in times {
            assert_eq!(ts_text(t), chrono_text(t), "{t:?}");
        }
    }

    /// `.cargo/config.toml` builds SQLite without its memory statistics (a global mutex around
    /// every allocation): the SQLite this build runs says so itself.
    #[tokio::test]
    async fn sqlite_is_built_without_memory_statistics() {
        let (_dir, store) = migrated_store().await;
        let options: Vec<String> =
            sqlx::query_scalar("SELECT compile_options FROM pragma_compile_options")
                .fetch_all(&store.read)
                .await
                .unwrap();
        assert!(
            options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
            "{options:?}"
        );
    }

    /// A migrated store in a temporary directory (kept while the directory lives).
    pub(crate) async fn migrated_store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(
            &format!("sqlite://{}/t.db", dir.path().display()),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        store.migrate().await.unwrap();
        (dir, store)
    }
}
