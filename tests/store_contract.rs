//! The store contract: what every backend's `KeyStore`, `QuotaStore` and `RequestLogStore`
//! promise, checked through the traits alone, once on SQLite and once on PostgreSQL. Two
//! `store::open`s of one database stand for two replicas.

use chrono::{DateTime, Duration as Span, Utc};
use harness::db::{Db, TestDb};
use harness::every_database;
use harness::server::t0;
use tollgate::keys::{self, Limits};
use tollgate::store::{
    IdentityLimitsPatch, KeyRecord, LogApi, LogRow, Outcome, Quota, QuotaOutcome, Spend, Stores,
    Usage, UsageQuery,
};

async fn new_key(stores: &Stores, name: &str, limits: Limits) -> i64 {
    stores
        .keys
        .create(&KeyRecord {
            key: &keys::generate(),
            name,
            limits,
            expires_at: None,
            created_at: t0(),
            permissions: &[],
            metadata: &Default::default(),
            identity_id: None,
        })
        .await
        .unwrap()
        .id
}

fn quota(daily: Option<u64>, monthly: Option<u64>) -> Quota {
    Quota { daily, monthly }
}

fn usage(daily: u64, monthly: u64, total: u64) -> Usage {
    Usage {
        daily,
        monthly,
        total,
    }
}

/// 200 requests at once from two replicas against a daily limit of 50: exactly 50 are admitted,
/// every other one is refused for the day with the count at the limit, and the counters say 50.
async fn consume_admits_exactly_the_limit_across_replicas(db: Db) {
    let db = TestDb::create(db).await;
    let replicas = [db.open_stores().await, db.open_stores().await];
    let key = new_key(&replicas[0], "hot", Limits::default()).await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let quotas = replicas[i % 2].quotas.clone();
            tokio::spawn(async move {
                quotas
                    .consume(Spend::new(key, 1, t0()), quota(Some(50), Some(1000)))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        match t.await.unwrap() {
            QuotaOutcome::Admitted { .. } => admitted += 1,
            QuotaOutcome::DailyExceeded { used } => assert_eq!(used, 50),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(admitted, 50);
    assert_eq!(
        replicas[1].quotas.usage(key, t0()).await.unwrap(),
        usage(50, 50, 50)
    );
    for r in replicas {
        r.close().await;
    }
}

/// A cost that does not fit whole spends nothing; one that fits exactly is admitted.
async fn consume_is_all_or_nothing_for_a_cost(db: Db) {
    let db = TestDb::create(db).await;
    let stores = db.open_stores().await;
    let key = new_key(&stores, "costly", Limits::default()).await;
    let q = quota(Some(10), Some(12));
    let outcome = |daily, monthly| QuotaOutcome::Admitted { daily, monthly };
    assert_eq!(
        stores
            .quotas
            .consume(Spend::new(key, 7, t0()), q)
            .await
            .unwrap(),
        outcome(7, 7)
    );
    assert_eq!(
        stores
            .quotas
            .consume(Spend::new(key, 4, t0()), q)
            .await
            .unwrap(),
        QuotaOutcome::DailyExceeded { used: 7 }
    );
    assert_eq!(
        stores
            .quotas
            .consume(Spend::new(key, 3, t0()), q)
            .await
            .unwrap(),
        outcome(10, 10)
    );
    // The month has 2 left, the next day 10: the month refuses.
    let tomorrow = t0() + Span::days(1);
    assert_eq!(
        stores
            .quotas
            .consume(Spend::new(key, 3, tomorrow), q)
            .await
            .unwrap(),
        QuotaOutcome::MonthlyExceeded { used: 10 }
    );
    assert_eq!(
        stores.quotas.usage(key, tomorrow).await.unwrap(),
        usage(0, 10, 10)
    );
    stores.close().await;
}

/// A key spent to its daily limit is admitted again the next day, counting from zero; its month
/// goes on counting until the month turns (DESIGN rule 2).
async fn a_new_day_and_a_new_month_count_from_zero(db: Db) {
    let db = TestDb::create(db).await;
    let stores = db.open_stores().await;
    let key = new_key(&stores, "daily", Limits::default()).await;
    let q = quota(Some(2), Some(5));
    for _ in 0..2 {
        assert!(matches!(
            stores
                .quotas
                .consume(Spend::new(key, 1, t0()), q)
                .await
                .unwrap(),
            QuotaOutcome::Admitted { .. }
        ));
    }
    assert_eq!(
        stores
            .quotas
            .consume(Spend::new(key, 1, t0()), q)
            .await
            .unwrap(),
        QuotaOutcome::DailyExceeded { used: 2 }
    );
    let tomorrow = t0() + Span::days(1);
    assert_eq!(
        stores
            .quotas
            .consume(Spend::new(key, 1, tomorrow), q)
            .await
            .unwrap(),
        QuotaOutcome::Admitted {
            daily: 1,
            monthly: 3
        }
    );
    let next_month: DateTime<Utc> = "2026-04-01T00:00:00Z".parse().unwrap();
    assert_eq!(
        stores.quotas.usage(key, next_month).await.unwrap(),
        usage(0, 0, 3)
    );
    assert_eq!(
        stores
            .quotas
            .consume(Spend::new(key, 2, next_month), q)
            .await
            .unwrap(),
        QuotaOutcome::Admitted {
            daily: 2,
            monthly: 2
        }
    );
    stores.close().await;
}

/// Units given back leave the day and month they were spent in, and only while the counters
/// still belong to them; the total always; never below zero.
async fn give_back_returns_units_to_the_period_they_were_spent_in(db: Db) {
    let db = TestDb::create(db).await;
    let stores = db.open_stores().await;
    let key = new_key(&stores, "refunded", Limits::default()).await;
    let q = quota(None, Some(1000));
    stores
        .quotas
        .consume(Spend::new(key, 5, t0()), q)
        .await
        .unwrap();
    stores
        .quotas
        .give_back(Spend::new(key, 2, t0()))
        .await
        .unwrap();
    assert_eq!(
        stores.quotas.usage(key, t0()).await.unwrap(),
        usage(3, 3, 3)
    );
    // The next day: giving back yesterday's units leaves today's counter alone.
    let tomorrow = t0() + Span::days(1);
    stores
        .quotas
        .consume(Spend::new(key, 4, tomorrow), q)
        .await
        .unwrap();
    stores
        .quotas
        .give_back(Spend::new(key, 1, t0()))
        .await
        .unwrap();
    assert_eq!(
        stores.quotas.usage(key, tomorrow).await.unwrap(),
        usage(4, 6, 6)
    );
    stores
        .quotas
        .give_back(Spend::new(key, 100, tomorrow))
        .await
        .unwrap();
    assert_eq!(
        stores.quotas.usage(key, tomorrow).await.unwrap(),
        usage(0, 0, 0)
    );
    stores.close().await;
}

/// Two replicas spending on the same eight keys, one in key order and one in reverse, many times
/// at once: the rows are locked in one order, so no statement fails with a deadlock, and every
/// unit is counted once.
async fn replicas_sharing_keys_in_opposite_orders_never_deadlock(db: Db) {
    let db = TestDb::create(db).await;
    let replicas = [db.open_stores().await, db.open_stores().await];
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(new_key(&replicas[0], &format!("k{i}"), Limits::default()).await);
    }
    let spend = |stores: &Stores, ids: Vec<i64>| {
        let quotas = stores.quotas.clone();
        async move {
            let all = ids.iter().map(|&id| {
                let quotas = quotas.clone();
                async move {
                    quotas
                        .consume(Spend::new(id, 1, t0()), quota(None, Some(1 << 40)))
                        .await
                }
            });
            futures_util::future::join_all(all).await
        }
    };
    let backward: Vec<i64> = ids.iter().rev().copied().collect();
    for _ in 0..100 {
        let (a, b) = tokio::join!(
            spend(&replicas[0], ids.clone()),
            spend(&replicas[1], backward.clone())
        );
        for outcome in a.into_iter().chain(b) {
            assert!(
                matches!(outcome, Ok(QuotaOutcome::Admitted { .. })),
                "{outcome:?}"
            );
        }
    }
    let mut total = 0;
    for id in ids {
        total += replicas[0].quotas.usage(id, t0()).await.unwrap().total;
    }
    assert_eq!(total, 1600);
    for r in replicas {
        r.close().await;
    }
}

/// A key gets its usage row with the key, also when it is inserted by hand in SQL, so the first
/// request of a key is counted like every other.
async fn every_key_has_its_counters_from_the_start(db: Db) {
    let db = TestDb::create(db).await;
    let stores = db.open_stores().await;
    db.execute(
        "INSERT INTO api_keys (name, prefix, key_hash, status, created_at, updated_at) \
         VALUES ('by hand', 'tg_byhand1', 'by-hand', 'active', '2026-03-10T00:00:00Z', \
           '2026-03-10T00:00:00Z')",
    )
    .await;
    let id = db
        .scalar("SELECT id FROM api_keys WHERE key_hash = 'by-hand'")
        .await;
    assert_eq!(stores.quotas.usage(id, t0()).await.unwrap(), usage(0, 0, 0));
    assert_eq!(
        stores
            .quotas
            .consume(Spend::new(id, 1, t0()), quota(Some(1), None))
            .await
            .unwrap(),
        QuotaOutcome::Admitted {
            daily: 1,
            monthly: 1
        }
    );
    stores.close().await;
}

fn log_row(ts: DateTime<Utc>, key_id: i64, request_id: &str, cost: u64) -> LogRow {
    LogRow {
        ts,
        api: LogApi::Authz,
        request_id: Some(request_id.into()),
        // The same text as the request id, so each outcome below names one row.
        decision_id: Some(request_id.into()),
        key_id: Some(key_id),
        method: Some("GET".into()),
        path: Some("/v1/things".into()),
        host: None,
        client_addr: None,
        allowed: true,
        reason: "ok",
        status: 200,
        cost,
        key_prefix: None,
        identity_id: None,
    }
}

fn outcome(decision_id: &str, status: u16) -> Outcome {
    Outcome {
        decision_id: decision_id.into(),
        status,
        duration_ms: Some(3),
        bytes_received: 10,
        bytes_sent: 20,
    }
}

/// Completing rows: each outcome finds its row once; a 5xx of a key with `refund_5xx` gives its
/// cost back to the day it was spent in, once; other keys and other statuses keep theirs.
async fn complete_fills_in_outcomes_and_refunds_once(db: Db) {
    let db = TestDb::create(db).await;
    let stores = db.open_stores().await;
    let refund = Limits {
        refund_5xx: true,
        ..Limits::default()
    };
    let a = new_key(&stores, "refund", refund).await;
    let b = new_key(&stores, "keep", Limits::default()).await;
    stores
        .quotas
        .consume(Spend::new(a, 5, t0()), quota(None, None))
        .await
        .unwrap();
    stores
        .quotas
        .consume(Spend::new(b, 2, t0()), quota(None, None))
        .await
        .unwrap();
    stores
        .log
        .write_batch(&[
            log_row(t0(), a, "a-500", 3),
            log_row(t0(), a, "a-200", 2),
            log_row(t0(), b, "b-503", 2),
        ])
        .await
        .unwrap();
    let (found, refunded) = stores
        .log
        .complete(&[
            outcome("a-500", 500),
            outcome("a-200", 200),
            outcome("b-503", 503),
            outcome("nobody", 500),
        ])
        .await
        .unwrap();
    assert_eq!(found, [true, true, true, false]);
    assert_eq!(refunded, 1);
    assert_eq!(stores.quotas.usage(a, t0()).await.unwrap(), usage(2, 2, 2));
    assert_eq!(stores.quotas.usage(b, t0()).await.unwrap(), usage(2, 2, 2));
    // Completed rows are not completed, nor refunded, again.
    let (found, refunded) = stores.log.complete(&[outcome("a-500", 500)]).await.unwrap();
    assert_eq!((found, refunded), (vec![false], 0));
    assert_eq!(stores.quotas.usage(a, t0()).await.unwrap(), usage(2, 2, 2));
    // Rows sharing a client's request id are completed by their own decision ids, one each;
    // the same outcome twice in one batch completes and refunds its row once.
    let shared = |decision: &str| LogRow {
        request_id: Some("same".into()),
        decision_id: Some(decision.into()),
        ..log_row(t0(), a, "", 1)
    };
    stores
        .log
        .write_batch(&[shared("s-1"), shared("s-2"), shared("s-3")])
        .await
        .unwrap();
    let (found, refunded) = stores
        .log
        .complete(&[
            outcome("s-2", 500),
            outcome("s-2", 500),
            outcome("same", 500),
        ])
        .await
        .unwrap();
    assert_eq!((found, refunded), (vec![true, false, false], 1));
    assert_eq!(stores.quotas.usage(a, t0()).await.unwrap(), usage(1, 1, 1));
    let completed = "SELECT count(*) FROM api_requests_log \
         WHERE request_id = 'same' AND response_status IS NOT NULL";
    assert_eq!(db.scalar(completed).await, 1);
    stores.close().await;
}

/// Retention removes what is older than it and keeps what is not, and the summary counts what
/// is left.
async fn maintenance_keeps_what_retention_keeps(db: Db) {
    let db = TestDb::create(db).await;
    let stores = db.open_stores().await;
    let key = new_key(&stores, "logged", Limits::default()).await;
    let now: DateTime<Utc> = "2026-09-15T12:00:00Z".parse().unwrap();
    let old = now - Span::days(200);
    stores
        .log
        .write_batch(&[log_row(old, key, "old", 1), log_row(now, key, "new", 1)])
        .await
        .unwrap();
    // A retention longer than the calendar removes nothing, and does not fail.
    let forever = stores
        .log
        .maintain(now, Some(std::time::Duration::from_secs(u64::MAX)))
        .await
        .unwrap();
    assert_eq!(forever.rows_deleted, 0);
    stores
        .log
        .maintain(now, Some(std::time::Duration::from_secs(90 * 86_400)))
        .await
        .unwrap();
    let all = stores
        .log
        .summarize(&UsageQuery {
            from: old - Span::days(1),
            to: now + Span::days(1),
            key_id: None,
            identity_id: None,
            top: 10,
        })
        .await
        .unwrap();
    let allowed: u64 = all.days.iter().map(|d| d.allowed).sum();
    assert_eq!(allowed, 1, "{all:?}");
    assert_eq!(all.days[0].day, "2026-09-15");
    assert_eq!(all.top_keys[0].key_id, key);
    stores.close().await;
}

/// Near midnight, a replica whose clock lags a second behind still counts in the new day: its
/// request is added to the day the counters already belong to, and never moves them back to
/// the day before (which would zero the new day's count for every other replica).
async fn a_lagging_clock_never_moves_the_counters_back_a_day(db: Db) {
    let db = TestDb::create(db).await;
    let replicas = [db.open_stores().await, db.open_stores().await];
    let key = new_key(&replicas[0], "midnight", Limits::default()).await;
    let q = quota(Some(100), Some(1000));
    let just_after: DateTime<Utc> = "2026-04-01T00:00:00.400Z".parse().unwrap();
    let just_before: DateTime<Utc> = "2026-03-31T23:59:59.600Z".parse().unwrap();
    let spend = |at| Spend::new(key, 1, at);
    replicas[0]
        .quotas
        .consume(spend(just_after), q)
        .await
        .unwrap();
    // The lagging replica, still in March.
    replicas[1]
        .quotas
        .consume(spend(just_before), q)
        .await
        .unwrap();
    replicas[0]
        .quotas
        .consume(spend(just_after), q)
        .await
        .unwrap();
    assert_eq!(
        replicas[0].quotas.usage(key, just_after).await.unwrap(),
        usage(3, 3, 3)
    );
    for r in replicas {
        r.close().await;
    }
}

/// A spend for a key's identity that was deleted since the key was read (a replica's cache is
/// up to a second behind) counts on the key alone, as the deletion left the key, instead of
/// failing the request.
async fn a_spend_for_an_identity_deleted_since_counts_on_the_key_alone(db: Db) {
    let db = TestDb::create(db).await;
    let stores = db.open_stores().await;
    let identity = stores
        .identities
        .create_identity(
            "gone",
            IdentityLimitsPatch {
                daily: Some(Some(1)),
                ..Default::default()
            },
            t0(),
        )
        .await
        .unwrap();
    let key = stores
        .keys
        .create(&KeyRecord {
            key: &keys::generate(),
            name: "member",
            limits: Limits::default(),
            expires_at: None,
            created_at: t0(),
            permissions: &[],
            metadata: &Default::default(),
            identity_id: Some(identity.id),
        })
        .await
        .unwrap()
        .id;
    let spend = Spend::new(key, 1, t0()).with_identity(identity.id);
    let (mine, shared) = (quota(Some(3), None), quota(Some(1), None));
    let first = stores
        .quotas
        .consume_shared(spend, mine, shared)
        .await
        .unwrap();
    assert!(first.admitted());
    assert!(
        stores
            .identities
            .delete_identity(identity.id, t0())
            .await
            .unwrap()
    );
    // The identity's limit of 1 no longer applies; the key's own 3 do.
    for _ in 0..2 {
        let out = stores
            .quotas
            .consume_shared(spend, mine, shared)
            .await
            .unwrap();
        assert!(out.admitted(), "{out:?}");
    }
    let refused = stores
        .quotas
        .consume_shared(spend, mine, shared)
        .await
        .unwrap();
    assert!(!refused.admitted());
    assert_eq!(
        stores.quotas.usage(key, t0()).await.unwrap(),
        usage(3, 3, 3)
    );
    stores.close().await;
}

every_database!(
    a_spend_for_an_identity_deleted_since_counts_on_the_key_alone,
    a_lagging_clock_never_moves_the_counters_back_a_day,
    consume_admits_exactly_the_limit_across_replicas,
    consume_is_all_or_nothing_for_a_cost,
    a_new_day_and_a_new_month_count_from_zero,
    give_back_returns_units_to_the_period_they_were_spent_in,
    replicas_sharing_keys_in_opposite_orders_never_deadlock,
    every_key_has_its_counters_from_the_start,
    complete_fills_in_outcomes_and_refunds_once,
    maintenance_keeps_what_retention_keeps,
);
