//! `quota.mode: batched`: blocks reserved with the exact-mode statement, spent in memory. Never
//! more than the limit across replicas; counters show real use after each flush.

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::check::{allowed, burst, key_header, ok};
use harness::cli::cli_create_key;
use harness::db::{Db, TestDb};
use harness::every_database;
use harness::replica::Replica;
use harness::server::{Tollgate, t0};
use tollgate::config::QuotaMode;
use tollgate::keys::Limits;
use tollgate::store::batched::BatchedQuota;
use tollgate::store::{Quota, QuotaOutcome, QuotaStore, Spend};

fn daily(n: u64) -> Limits {
    Limits {
        daily: Some(n),
        ..Limits::default()
    }
}

/// Two replicas, each with its own batch, on one database.
async fn replicas_never_admit_more_than_the_limit(db: Db) {
    let tg = Tollgate::on(db).await;
    let (_, id) = tg.create_key("hot", daily(300)).await;
    let replicas: Vec<Arc<BatchedQuota>> = (0..2)
        .map(|_| Arc::new(BatchedQuota::new(tg.stores.quotas.clone(), 64)))
        .collect();
    let quota = Quota {
        daily: Some(300),
        monthly: None,
    };
    let mut total = 0;
    // Rounds of 1,000 concurrent checks; between rounds the replicas give back what they hold,
    // so what one held unused can be taken by the other.
    for _round in 0..6 {
        let tasks: Vec<_> = (0..1000)
            .map(|i| {
                let r = replicas[i % 2].clone();
                tokio::spawn(
                    async move { r.consume(Spend::new(id, 1, t0()), quota).await.unwrap() },
                )
            })
            .collect();
        let mut admitted = 0;
        for t in tasks {
            if let QuotaOutcome::Admitted { .. } = t.await.unwrap() {
                admitted += 1;
            }
        }
        total += admitted;
        assert!(total <= 300, "admitted {total} over a limit of 300");
        for r in &replicas {
            r.flush().await.unwrap();
        }
        // After a flush the counters show exactly what was admitted.
        let usage = tg.stores.quotas.usage(id, t0()).await.unwrap();
        assert_eq!(usage.daily, total);
        if admitted == 0 {
            break;
        }
    }
    assert_eq!(total, 300);
    tg.stop().await;
}

/// A new day starts from zero; units reserved yesterday go back to yesterday only.
async fn a_rollover_starts_from_zero_and_leftovers_go_back_to_their_day(db: Db) {
    let tg = Tollgate::on(db).await;
    let (_, id) = tg.create_key("k", daily(10)).await;
    let b = BatchedQuota::new(tg.stores.quotas.clone(), 8);
    let quota = Quota {
        daily: Some(10),
        monthly: None,
    };
    let late: chrono::DateTime<chrono::Utc> = "2026-03-10T23:59:59Z".parse().unwrap();
    for _ in 0..3 {
        assert!(matches!(
            b.consume(Spend::new(id, 1, late), quota).await.unwrap(),
            QuotaOutcome::Admitted { .. }
        ));
    }
    let next: chrono::DateTime<chrono::Utc> = "2026-03-11T00:00:01Z".parse().unwrap();
    assert!(matches!(
        b.consume(Spend::new(id, 1, next), quota).await.unwrap(),
        QuotaOutcome::Admitted { .. }
    ));
    b.flush().await.unwrap();
    let usage = tg.stores.quotas.usage(id, next).await.unwrap();
    assert_eq!((usage.daily, usage.monthly, usage.total), (1, 4, 4));
    tg.stop().await;
}

every_database!(
    replicas_never_admit_more_than_the_limit,
    a_rollover_starts_from_zero_and_leftovers_go_back_to_their_day,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_tollgate_shows_real_use_within_a_second() {
    let tg = Tollgate::start_with(|c| {
        c.quota.mode = QuotaMode::Batched;
        c.quota.max_block = 50;
    })
    .await;
    let (key, id) = tg.create_key("b", daily(1000)).await;
    let mut c = tg.client().await;
    for _ in 0..3 {
        ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    }
    // A block was reserved; within a second (flush every 500 ms) the unused part is back.
    let started = Instant::now();
    loop {
        let daily = tg.stores.quotas.usage(id, t0()).await.unwrap().daily;
        if daily == 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "usage {daily} after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_batched_replicas_stay_within_the_limit_and_counters_match_the_log() {
    let db = TestDb::create(Db::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let (key, id) = cli_create_key(dir.path(), &db.url, &["--name", "hot", "--daily", "300"]);
    let env = [
        ("TOLLGATE_DATABASE_URL", db.url.as_str()),
        ("TOLLGATE_QUOTA_MODE", "batched"),
        ("TOLLGATE_DATABASE_TIMEOUT", "20s"),
    ];
    let replicas = [
        Replica::spawn(dir.path(), &env).await,
        Replica::spawn(dir.path(), &env).await,
    ];
    let clients = [replicas[0].client().await, replicas[1].client().await];
    let admitted = burst(&clients, &key, 1000)
        .await
        .iter()
        .filter(|(_, resp)| allowed(resp))
        .count() as i64;
    assert!(admitted <= 300, "admitted {admitted}");
    assert!(
        admitted >= 200,
        "admitted only {admitted} of 300 with 1,000 asking"
    );
    for r in replicas {
        assert_eq!(r.stop_with("-TERM").await.code(), Some(0));
    }
    // Shutdown gave back what was reserved and not spent.
    let usage = format!("SELECT daily_requests FROM api_usage WHERE api_key_id = {id}");
    assert_eq!(db.scalar(&usage).await, admitted);
    let logged = format!(
        "SELECT count(*) FROM api_requests_log WHERE api_key_id = {id} AND decision = 'allow'"
    );
    assert_eq!(db.scalar(&logged).await, admitted);
}

/// Keys without quotas are counted in blocks in every mode: the counters still show real use
/// within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_without_quotas_are_counted_within_a_second() {
    let tg = Tollgate::start().await;
    assert_eq!(tg.stores.keys.get(0).await.unwrap(), None);
    let (key, id) = tg.create_key("free", Limits::default()).await;
    let mut c = tg.client().await;
    for _ in 0..7 {
        ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    }
    let started = Instant::now();
    loop {
        let usage = tg.stores.quotas.usage(id, t0()).await.unwrap();
        if (usage.daily, usage.total) == (7, 7) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "usage {usage:?} after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tg.stop().await;
}
