//! PostgreSQL-specific guarantees: the indexes tollgate's lookups use, concurrent migration, and
//! what happens when the server goes away and comes back (on a private server the test owns).

use std::path::Path;
use std::time::{Duration, Instant};

use harness::check::key_header;
use harness::db::{Db, TestDb, scalar};
use harness::pg::{Frozen, PrivatePostgres};
use harness::server::{Tollgate, t0};
use tollgate::config::{FailureMode, SecretUrl};
use tollgate::keys::Limits;

/// The plan PostgreSQL picks for `sql`, as text.
async fn explain(db: &TestDb, sql: &str) -> String {
    use sqlx::{Connection, Row};
    let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
        .fetch_all(&mut c)
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.get::<String, _>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_lookup_tollgate_makes_uses_an_index() {
    let db = TestDb::create(Db::Postgres).await;
    db.open_stores().await.close().await;
    // Enough rows that a sequential scan would be the planner's choice without an index.
    db.execute(
        "INSERT INTO api_keys (name, prefix, key_hash) \
         SELECT 'k' || g, 'tg_' || g, md5(g::text) || md5((g + 1)::text) \
         FROM generate_series(1, 20000) g",
    )
    .await;
    db.execute(
        "INSERT INTO api_usage (api_key_id, day, month) SELECT id, current_date, current_date FROM api_keys \
         ON CONFLICT DO NOTHING",
    )
    .await;
    db.execute(
        "INSERT INTO api_requests_log (ts, api_key_id, decision, reason, status, identity_id) \
         SELECT now(), 1 + g % 20000, 'allow', 'ok', 200, \
           CASE WHEN g % 10 = 0 THEN g % 100 END FROM generate_series(1, 50000) g",
    )
    .await;
    db.execute("ANALYZE").await;

    let lookup = explain(&db, "SELECT id FROM api_keys WHERE key_hash = 'abc'").await;
    assert!(
        lookup.contains("Index Scan using api_keys_key_hash"),
        "{lookup}"
    );
    let consume = explain(
        &db,
        &tollgate::bench_hooks::POSTGRES_CONSUME_SQL
            .replace("$1", "42")
            .replace("$2", "current_date")
            .replace("$3", "current_date")
            .replace("$4", "1")
            .replace("$5", "100")
            .replace("$6", "1000"),
    )
    .await;
    assert!(
        consume.contains("Index Scan using api_usage_pkey"),
        "{consume}"
    );
    let consume = explain(
        &db,
        &tollgate::bench_hooks::POSTGRES_BATCH_SQL
            .replace("$1::int[]", "ARRAY[0]")
            .replace("$2::bigint[]", "ARRAY[42]::bigint[]")
            .replace("$3::date[]", "ARRAY[current_date]")
            .replace("$4::date[]", "ARRAY[current_date]")
            .replace("$5::bigint[]", "ARRAY[1]::bigint[]")
            .replace("$6::bigint[]", "ARRAY[100]::bigint[]")
            .replace("$7::bigint[]", "ARRAY[1000]::bigint[]"),
    )
    .await;
    assert!(
        consume.contains("Index Scan using api_usage_pkey"),
        "{consume}"
    );
    let history = explain(
        &db,
        "SELECT count(*) FROM api_requests_log WHERE api_key_id = 7 AND ts >= now() - interval '1 day'",
    )
    .await;
    // The log is partitioned by month: each partition has its copy of the (api_key_id, ts)
    // index.
    assert!(
        history.contains("Index") && history.contains("api_key_id_ts"),
        "{history}"
    );
    // An identity's history (GetIdentityUsage, `tollgate usage --identity`) as the summary
    // query has it once its parameters are bound: through the partial (identity_id, ts) index.
    let identity = explain(
        &db,
        "SELECT count(*) FROM api_requests_log WHERE api = 'authz' \
         AND ts >= now() - interval '1 day' AND ts < now() + interval '1 day' \
         AND (NULL::bigint IS NULL OR api_key_id = NULL) \
         AND (7::bigint IS NULL OR identity_id = 7)",
    )
    .await;
    assert!(
        identity.contains("Index") && identity.contains("identity_id_ts"),
        "{identity}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_once() {
    let db = TestDb::create(Db::Postgres).await;
    let config = tollgate::config::DatabaseConfig {
        url: SecretUrl(db.url.clone()),
        ..Default::default()
    };
    let opens: Vec<_> = (0..6)
        .map(|_| {
            let config = config.clone();
            tokio::spawn(async move { tollgate::store::open(&config, true).await })
        })
        .collect();
    for o in opens {
        o.await
            .unwrap()
            .expect("every replica starts")
            .close()
            .await;
    }
    // Each migration applied exactly once.
    let files = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres"))
        .unwrap()
        .count() as i64;
    assert!(files >= 3);
    assert_eq!(
        db.scalar("SELECT count(*) FROM _sqlx_migrations").await,
        files
    );
    assert_eq!(
        db.scalar("SELECT count(DISTINCT version) FROM _sqlx_migrations WHERE success")
            .await,
        files
    );
}

/// The outage tests count their checks in one counter: they take turns.
static OUTAGE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Checks made by the outage tests, to compare with the rows the log ends up with.
static CHECKS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

async fn check_code(tg: &Tollgate, key: &str) -> (i32, Duration) {
    CHECKS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut c = tg.client().await;
    let started = Instant::now();
    let resp = c.check(key_header(key)).await.unwrap().into_inner();
    (resp.status.unwrap().code, started.elapsed())
}

async fn outage(mode: FailureMode) {
    let _one_at_a_time = OUTAGE.lock().await;
    CHECKS.store(0, std::sync::atomic::Ordering::SeqCst);
    let pg = PrivatePostgres::start();
    let tg = Tollgate::on_with(Db::Sqlite, |c| {
        c.database.url = SecretUrl(pg.url());
        c.database.failure_mode = mode;
        c.database.timeout = tollgate::config::Dur(Duration::from_millis(500));
    })
    .await;
    let (known, id) = tg
        .create_key(
            "known",
            Limits {
                daily: Some(1000),
                ..Default::default()
            },
        )
        .await;
    let (unverified, _) = tg.create_key("unverified", Limits::default()).await;
    // Verified, and in the cache for sure (its creation reaches the cache asynchronously).
    let made = tg.check_until_cached(&known).await;
    CHECKS.fetch_add(i64::from(made), std::sync::atomic::Ordering::SeqCst);
    let before_outage = u64::from(made);

    pg.down();
    // The verified key is served from the cache; its quota follows the failure mode. The key
    // never verified cannot be let in. Neither waits long.
    let (code, took) = check_code(&tg, &known).await;
    assert_eq!(code, if mode == FailureMode::Open { 0 } else { 14 });
    assert!(
        took < Duration::from_secs(3),
        "check waited {took:?} on a dead database"
    );
    let (code, took) = check_code(&tg, &unverified).await;
    assert_eq!(code, 14);
    assert!(
        took < Duration::from_secs(3),
        "check waited {took:?} on a dead database"
    );
    // Not ready only when the failure mode is closed: with open, tollgate still answers.
    let ready = reqwest::get(format!("http://{}/readyz", tg.http))
        .await
        .unwrap();
    let want = if mode == FailureMode::Open { 200 } else { 503 };
    assert_eq!(ready.status(), want);
    assert!(ready.text().await.unwrap().contains("database: "));

    pg.up();
    // Back without a restart: counting resumes and the other key is verified.
    let started = Instant::now();
    loop {
        if check_code(&tg, &unverified).await.0 == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no recovery within 10s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(check_code(&tg, &known).await.0, 0);
    let usage = tg.stores.quotas.usage(id, t0()).await.unwrap();
    assert_eq!(
        usage.daily,
        before_outage + 1,
        "the request admitted during the outage was not counted"
    );
    // The change listener is back too: a revoke reaches the cache within a second.
    tg.stores.keys.revoke(id, t0()).await.unwrap();
    let started = Instant::now();
    while check_code(&tg, &known).await.0 == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "revoke not seen after recovery"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tg.stop().await;
    // Rows of checks made while the database was down waited in the queue: none is lost.
    let logged = scalar(&pg.url(), "SELECT count(*) FROM api_requests_log").await;
    assert_eq!(logged, CHECKS.load(std::sync::atomic::Ordering::SeqCst));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_fail_closed_then_recovery() {
    outage(FailureMode::Closed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_fail_open_then_recovery() {
    outage(FailureMode::Open).await;
}

/// Key lookups that hang (here: a lock on `api_keys`, held while unknown keys flood in) take
/// only their share of the pool: the quota statements of a cached key still get connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_keys_does_not_starve_quota_statements() {
    use sqlx::Connection;
    let tg = Tollgate::on_with(Db::Postgres, |c| {
        c.database.max_connections = 4;
        c.database.timeout = tollgate::config::Dur(Duration::from_millis(500));
        c.request_log.enabled = false;
    })
    .await;
    let (known, id) = tg
        .create_key(
            "known",
            Limits {
                daily: Some(1_000_000),
                ..Default::default()
            },
        )
        .await;
    let mut client = tg.client().await;
    let code =
        |resp: envoy_types::pb::envoy::service::auth::v3::CheckResponse| resp.status.unwrap().code;
    // Cached before the lock.
    tg.check_until_cached(&known).await;
    let warm = tg.stores.quotas.usage(id, t0()).await.unwrap().daily;

    // Every lookup of a key now waits for the lock, until the statement timeout.
    let mut lock = sqlx::PgConnection::connect(&tg.db_url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut lock).await.unwrap();
    sqlx::query("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
        .execute(&mut lock)
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut flood = Vec::new();
    for _ in 0..32 {
        let (mut client, stop) = (tg.client().await, stop.clone());
        flood.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let unknown = tollgate::keys::generate().plaintext;
                let _ = client.check(key_header(&unknown)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    for i in 0..20 {
        let started = Instant::now();
        let resp = client.check(key_header(&known)).await.unwrap().into_inner();
        let took = started.elapsed();
        assert_eq!(code(resp), 0, "check {i} of the known key, after {took:?}");
        assert!(took < Duration::from_millis(400), "check {i} took {took:?}");
    }
    stop.cancel();
    for f in flood {
        f.await.unwrap();
    }
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    assert_eq!(
        tg.stores.quotas.usage(id, t0()).await.unwrap().daily,
        warm + 20
    );
    tg.stop().await;
}

/// 64 concurrent checks of a cached key while the database is frozen, with `failure_mode:
/// open` and `database.timeout: 500ms`: each is answered 500 ms after it arrived, not after
/// waiting its turn behind the others' timeouts. Once the server goes on, nothing they queued
/// is counted: usage is what the log's allowed rows spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_on_a_frozen_database_each_end_at_their_own_deadline() {
    let _one_at_a_time = OUTAGE.lock().await;
    let pg = PrivatePostgres::start();
    let tg = Tollgate::on_with(Db::Sqlite, |c| {
        c.database.url = SecretUrl(pg.url());
        c.database.failure_mode = FailureMode::Open;
        c.database.timeout = tollgate::config::Dur(Duration::from_millis(500));
    })
    .await;
    let (key, id) = tg
        .create_key(
            "frozen",
            Limits {
                daily: Some(1000),
                ..Default::default()
            },
        )
        .await;
    let c = tg.client().await;
    tg.check_until_cached(&key).await;
    let warm = tg.stores.quotas.usage(id, t0()).await.unwrap().total as i64;

    let frozen = pg.freeze();
    let started = Instant::now();
    let checks: Vec<_> = (0..64)
        .map(|_| {
            let (mut c, key) = (c.clone(), key.clone());
            tokio::spawn(async move { c.check(key_header(&key)).await })
        })
        .collect();
    for t in checks {
        let answer = t.await.unwrap().expect("answered").into_inner();
        assert_eq!(
            answer.status.unwrap().code,
            0,
            "failure_mode open lets it in"
        );
    }
    let took = started.elapsed();
    eprintln!("64 checks on a frozen database answered in {took:?}");
    assert!(
        took < Duration::from_millis(1500),
        "64 checks took {took:?}; each should end 500 ms after it arrived"
    );
    assert!(tg.metrics.fail_open_database.get() >= 64);
    drop(frozen);

    let url = pg.url();
    tg.stop().await;
    let allowed = scalar(
        &url,
        &format!(
            "SELECT CAST(COALESCE(SUM(cost), 0) AS BIGINT) FROM api_requests_log \
             WHERE api_key_id = {id} AND decision = 'allow'"
        ),
    )
    .await;
    let usage = scalar(
        &url,
        &format!("SELECT total_requests FROM api_usage WHERE api_key_id = {id}"),
    )
    .await;
    assert_eq!(
        allowed, warm,
        "only the checks before the freeze were counted"
    );
    assert_eq!(usage, allowed);
}

/// The key change listener's server stops answering (its backend frozen: the connection stays
/// open, notifications stop): the listener notices within seconds, connects again and drops
/// what it cached, so a key revoked meanwhile is refused long before `cache.key_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_whose_server_stops_answering_is_replaced_within_seconds() {
    let _one_at_a_time = OUTAGE.lock().await;
    let pg = PrivatePostgres::start();
    let tg = Tollgate::on_with(Db::Sqlite, |c| {
        c.database.url = SecretUrl(pg.url());
        c.cache.key_ttl = tollgate::config::Dur(Duration::from_secs(120));
    })
    .await;
    let (key, id) = tg.create_key("listened", Limits::default()).await;
    assert_eq!(check_code(&tg, &key).await.0, 0);
    let listener = format!(
        "SELECT CAST(COALESCE(max(pid), 0) AS BIGINT) FROM pg_stat_activity \
         WHERE application_name = 'tollgate' AND (query LIKE 'LISTEN%' OR query = '{}')",
        tollgate::store::LISTEN_PING_SQL.replace('\'', "''")
    );
    let asked = Instant::now();
    let pid = loop {
        match scalar(&pg.url(), &listener).await {
            0 if asked.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            0 => panic!("no listener connection in pg_stat_activity"),
            pid => break pid,
        }
    };
    let frozen = Frozen::pids(vec![pid.to_string()]);
    assert!(tg.stores.keys.revoke(id, chrono::Utc::now()).await.unwrap());
    let revoked = Instant::now();
    loop {
        let (code, _) = check_code(&tg, &key).await;
        if code != 0 {
            assert_eq!(code, 7, "refused as revoked");
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(10),
            "a revoked key still let in after 10 s (cache.key_ttl is 120 s)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(frozen);
    tg.stop().await;
}
