//! Request-log retention: monthly partitions in PostgreSQL (created ahead, dropped whole when
//! older than the retention), row deletes in SQLite; and a running tollgate doing it.

use std::time::Duration;

use chrono::{DateTime, Datelike, Duration as Span, Utc};
use harness::db::{Db, TestDb};
use harness::server::{Tollgate, t0};
use tollgate::config::SecretUrl;
use tollgate::store::{LogApi, LogRow};

const RETENTION: Duration = Duration::from_secs(90 * 86_400);

fn row(ts: DateTime<Utc>, id: &str) -> LogRow {
    LogRow {
        ts,
        api: LogApi::Authz,
        request_id: Some(id.into()),
        decision_id: None,
        key_id: Some(1),
        method: Some("GET".into()),
        path: Some("/".into()),
        host: None,
        client_addr: None,
        allowed: true,
        reason: "ok",
        status: 200,
        cost: 1,
        key_prefix: None,
        identity_id: None,
    }
}

fn partition(t: DateTime<Utc>) -> String {
    format!("api_requests_log_{:04}_{:02}", t.year(), t.month())
}

async fn exists(db: &TestDb, table: &str) -> bool {
    db.scalar(&format!(
        "SELECT (to_regclass('{table}') IS NOT NULL)::int::bigint"
    ))
    .await
        == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_keeps_months_ahead_and_drops_whole_months_past_the_retention() {
    let db = TestDb::create(Db::Postgres).await;
    let stores = db.open_stores().await;
    let now: DateTime<Utc> = "2026-03-10T12:00:00Z".parse().unwrap();
    let rows = [
        row(now - Span::days(150), "old"),
        row(now - Span::days(60), "recent"),
        row(now, "now"),
        row(now + Span::days(40), "next-month"),
    ];
    stores.log.write_batch(&rows).await.unwrap();
    // Before any maintenance everything sits in the default partition.
    assert_eq!(
        db.scalar("SELECT count(*) FROM api_requests_log_default")
            .await,
        4
    );

    let done = stores.log.maintain(now, Some(RETENTION)).await.unwrap();
    assert_eq!(
        done.partitions_created,
        ["2026_03", "2026_04", "2026_05"].map(|m| format!("api_requests_log_{m}"))
    );
    assert!(done.partitions_dropped.is_empty());
    assert_eq!(done.rows_deleted, 1, "the row older than 90 days");
    // This month's and next month's rows moved into their partitions; nothing was lost.
    assert_eq!(db.scalar("SELECT count(*) FROM api_requests_log").await, 3);
    assert_eq!(
        db.scalar("SELECT count(*) FROM api_requests_log_2026_03")
            .await,
        1
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM api_requests_log_2026_04")
            .await,
        1
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM api_requests_log_default")
            .await,
        1
    );
    // New rows go straight to their month.
    stores.log.write_batch(&[row(now, "later")]).await.unwrap();
    assert_eq!(
        db.scalar("SELECT count(*) FROM api_requests_log_2026_03")
            .await,
        2
    );
    // Running again changes nothing.
    let again = stores.log.maintain(now, Some(RETENTION)).await.unwrap();
    assert_eq!(again, Default::default());

    // 200 days on: March, April and May are wholly older than 90 days and are dropped.
    let later = now + Span::days(200);
    let done = stores.log.maintain(later, Some(RETENTION)).await.unwrap();
    let mut dropped = done.partitions_dropped.clone();
    dropped.sort();
    assert_eq!(
        dropped,
        ["2026_03", "2026_04", "2026_05"].map(|m| format!("api_requests_log_{m}"))
    );
    assert!(exists(&db, &partition(later)).await);
    assert!(!exists(&db, "api_requests_log_2026_03").await);
    assert_eq!(db.scalar("SELECT count(*) FROM api_requests_log").await, 0);
    stores.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_maintaining_at_once_agree() {
    let db = TestDb::create(Db::Postgres).await;
    let now: DateTime<Utc> = "2026-03-10T12:00:00Z".parse().unwrap();
    let mut replicas = Vec::new();
    for _ in 0..4 {
        replicas.push(db.open_stores().await);
    }
    let runs: Vec<_> = replicas
        .iter()
        .map(|s| {
            let log = s.log.clone();
            tokio::spawn(async move { log.maintain(now, Some(RETENTION)).await })
        })
        .collect();
    let mut created = 0;
    for r in runs {
        created += r
            .await
            .unwrap()
            .expect("maintenance never fails")
            .partitions_created
            .len();
    }
    // Whoever ran, the three months exist once (the others skipped, or found them made).
    assert!(created <= 3);
    for m in ["2026_03", "2026_04", "2026_05"] {
        assert!(exists(&db, &format!("api_requests_log_{m}")).await, "{m}");
    }
    for s in replicas {
        s.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_deletes_rows_past_the_retention() {
    let db = TestDb::create(Db::Sqlite).await;
    let stores = db.open_stores().await;
    let now: DateTime<Utc> = "2026-03-10T12:00:00Z".parse().unwrap();
    let rows: Vec<LogRow> = (0..12_000)
        .map(|i| row(now - Span::days(if i % 2 == 0 { 100 } else { 10 }), "r"))
        .collect();
    stores.log.write_batch(&rows).await.unwrap();
    let done = stores.log.maintain(now, Some(RETENTION)).await.unwrap();
    assert_eq!(done.rows_deleted, 6_000);
    assert_eq!(
        db.scalar("SELECT count(*) FROM api_requests_log").await,
        6_000
    );
    assert_eq!(
        stores.log.maintain(now, None).await.unwrap().rows_deleted,
        0
    );
    stores.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_tollgate_maintains_the_log_at_start() {
    let db = TestDb::create(Db::Postgres).await;
    let stores = db.open_stores().await;
    // t0 is 2026-03-10: a row from last year is past any 90-day retention.
    stores
        .log
        .write_batch(&[row(t0() - Span::days(365), "ancient"), row(t0(), "fresh")])
        .await
        .unwrap();
    stores.close().await;
    let url = db.url.clone();
    let tg = Tollgate::on_with(Db::Sqlite, |c| c.database.url = SecretUrl(url)).await;
    let started = std::time::Instant::now();
    while !(exists(&db, "api_requests_log_2026_03").await
        && db.scalar("SELECT count(*) FROM api_requests_log").await == 1)
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no maintenance at start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_row_is_lost_while_a_month_is_carved_out_of_the_default_partition() {
    let db = TestDb::create(Db::Postgres).await;
    let writer = db.open_stores().await;
    let maintainer = db.open_stores().await;
    let start: DateTime<Utc> = "2026-01-15T00:00:00Z".parse().unwrap();
    // Rows keep arriving for the months that maintenance is about to create.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let inserts = {
        let (log, stop) = (writer.log.clone(), stop.clone());
        tokio::spawn(async move {
            let mut written = 0i64;
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<LogRow> = (0..20)
                    .map(|i| row(start + Span::days(((n + i) % 200) + 60), "race"))
                    .collect();
                log.write_batch(&batch).await.unwrap();
                written += batch.len() as i64;
                n += 20;
            }
            written
        })
    };
    for month in 0..8 {
        let now = start + Span::days(31 * month);
        maintainer.log.maintain(now, None).await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = inserts.await.unwrap();
    assert!(written > 0);
    assert_eq!(
        db.scalar("SELECT count(*) FROM api_requests_log").await,
        written
    );
    writer.close().await;
    maintainer.close().await;
}
