//! Several tollgate processes sharing one PostgreSQL: no answer may depend on which replica was
//! asked.

use std::time::{Duration, Instant};

use harness::check::{burst, denied, key_header, one_round_each};
use harness::cli::{cli_create_key, tollgate_command};
use harness::db::{Db, TestDb};
use harness::redis::{delete_redis_keys, redis_cluster_url, unique_prefix};
use harness::replica::Replica;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_admit_exactly_the_daily_limit_and_the_log_agrees() {
    let db = TestDb::create(Db::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let (key, id) = cli_create_key(dir.path(), &db.url, &["--name", "hot", "--daily", "300"]);
    let env = [
        ("TOLLGATE_DATABASE_URL", db.url.as_str()),
        ("TOLLGATE_DATABASE_TIMEOUT", "20s"),
    ];
    let replicas = [
        Replica::spawn(dir.path(), &env).await,
        Replica::spawn(dir.path(), &env).await,
    ];
    let clients = [replicas[0].client().await, replicas[1].client().await];
    let first = one_round_each(&clients, &key).await;
    let mut allowed = [first[0], first[1]];
    let mut refused = 0;
    for (r, resp) in burst(&clients, &key, 996).await {
        match resp.status.unwrap().code {
            0 => allowed[r] += 1,
            8 => refused += 1,
            other => panic!("unexpected answer {other}"),
        }
    }
    assert_eq!(allowed[0] + allowed[1], 300, "{allowed:?}");
    assert_eq!(refused, 700);
    assert!(
        allowed[0] > 0 && allowed[1] > 0,
        "both replicas admitted some: {allowed:?}"
    );
    let usage = format!("SELECT daily_requests FROM api_usage WHERE api_key_id = {id}");
    assert_eq!(db.scalar(&usage).await, 300);
    // Both stop gracefully; their logs together hold exactly the admitted requests.
    for r in replicas {
        assert_eq!(r.stop_with("-TERM").await.code(), Some(0));
    }
    let logged = format!(
        "SELECT count(*) FROM api_requests_log WHERE api_key_id = {id} AND decision = 'allow'"
    );
    assert_eq!(db.scalar(&logged).await, 300);
    assert_eq!(
        db.scalar("SELECT count(*) FROM api_requests_log").await,
        1000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_reaches_every_replica_within_a_second() {
    let db = TestDb::create(Db::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let (key, id) = cli_create_key(dir.path(), &db.url, &["--name", "shared"]);
    let env = [("TOLLGATE_DATABASE_URL", db.url.as_str())];
    let replicas = [
        Replica::spawn(dir.path(), &env).await,
        Replica::spawn(dir.path(), &env).await,
    ];
    let mut clients = [replicas[0].client().await, replicas[1].client().await];
    // Both have the key cached.
    for c in clients.iter_mut() {
        let code = c
            .check(key_header(&key))
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
            .code;
        assert_eq!(code, 0);
    }
    let out = tollgate_command(dir.path())
        .args(["keys", "revoke", &id.to_string()])
        .env("TOLLGATE_DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let revoked = Instant::now();
    for c in clients.iter_mut() {
        loop {
            let resp = c.check(key_header(&key)).await.unwrap().into_inner();
            if resp.status.as_ref().unwrap().code != 0 {
                assert_eq!(denied(&resp).body["error"], "key_revoked");
                break;
            }
            assert!(
                revoked.elapsed() < Duration::from_secs(1),
                "revoke took over 1s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until the wall clock is at least 5 s away from the next minute boundary, so a burst
/// of fixed-window checks falls into one window.
async fn away_from_a_minute_edge() {
    use chrono::Timelike;
    let s = chrono::Utc::now().second();
    if s >= 55 {
        tokio::time::sleep(Duration::from_secs(u64::from(61 - s))).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_and_redis_cluster_admit_exactly_the_per_minute_limit() {
    let db = TestDb::create(Db::Postgres).await;
    let redis = redis_cluster_url().await;
    let prefix = unique_prefix("replicas");
    let dir = tempfile::tempdir().unwrap();
    let (key, id) = cli_create_key(
        dir.path(),
        &db.url,
        &["--name", "burst", "--per-minute", "100"],
    );
    let env = [
        ("TOLLGATE_DATABASE_URL", db.url.as_str()),
        ("TOLLGATE_DATABASE_TIMEOUT", "20s"),
        ("TOLLGATE_REDIS_URL", redis.as_str()),
        ("TOLLGATE_REDIS_KEY_PREFIX", prefix.as_str()),
        ("TOLLGATE_REDIS_TIMEOUT", "5s"),
        ("TOLLGATE_REDIS_FAILURE_MODE", "closed"),
    ];
    let replicas = [
        Replica::spawn(dir.path(), &env).await,
        Replica::spawn(dir.path(), &env).await,
    ];
    let clients = [replicas[0].client().await, replicas[1].client().await];
    away_from_a_minute_edge().await;
    let first = one_round_each(&clients, &key).await;
    let mut allowed = [first[0], first[1]];
    for (r, resp) in burst(&clients, &key, 996).await {
        match resp.status.as_ref().unwrap().code {
            0 => allowed[r] += 1,
            _ => assert_eq!(denied(&resp).body["error"], "rate_limited"),
        }
    }
    assert_eq!(allowed[0] + allowed[1], 100, "{allowed:?}");
    assert!(
        allowed[0] > 0 && allowed[1] > 0,
        "both replicas admitted some: {allowed:?}"
    );
    for r in replicas {
        assert_eq!(r.stop_with("-TERM").await.code(), Some(0));
    }
    // Refused requests spent no quota: usage counts exactly the admitted ones. (This key has
    // no quotas, so its usage is counted in blocks: exact once the replicas have given back what
    // they held, which a graceful stop does.)
    let usage = format!("SELECT daily_requests FROM api_usage WHERE api_key_id = {id}");
    assert_eq!(db.scalar(&usage).await, 100);
    let logged = format!(
        "SELECT count(*) FROM api_requests_log WHERE api_key_id = {id} AND decision = 'allow'"
    );
    assert_eq!(db.scalar(&logged).await, 100);
    delete_redis_keys(&redis, &prefix).await;
}

/// Two keys of one identity with a daily limit of 50, 200 concurrent Checks spread over both
/// keys and two replicas: exactly 50 pass (the identity's row is locked before each key's, in
/// one statement per request, so the replicas never deadlock), and the identity's counter, the
/// keys' counters and the log agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_admit_exactly_an_identitys_daily_limit_over_two_keys() {
    let db = TestDb::create(Db::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let out = tollgate_command(dir.path())
        .args([
            "identities",
            "create",
            "--json",
            "--name",
            "acme",
            "--daily",
            "50",
        ])
        .env("TOLLGATE_DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let identity: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let identity_id = identity["id"].as_i64().unwrap();
    let id_arg = identity_id.to_string();
    let (a, a_id) = cli_create_key(dir.path(), &db.url, &["--name", "a", "--identity", &id_arg]);
    let (b, b_id) = cli_create_key(
        dir.path(),
        &db.url,
        &["--name", "b", "--identity", &id_arg, "--daily", "40"],
    );
    let env = [
        ("TOLLGATE_DATABASE_URL", db.url.as_str()),
        ("TOLLGATE_DATABASE_TIMEOUT", "20s"),
    ];
    let replicas = [
        Replica::spawn(dir.path(), &env).await,
        Replica::spawn(dir.path(), &env).await,
    ];
    let clients = [replicas[0].client().await, replicas[1].client().await];
    let keys = [a, b];
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (r, k) = (i % 2, (i / 2) % 2);
            let mut c = clients[r].clone();
            let key = keys[k].clone();
            tokio::spawn(async move {
                let resp = c.check(key_header(&key)).await.unwrap().into_inner();
                (r, resp)
            })
        })
        .collect();
    let mut allowed = [0; 2];
    let mut refused = 0;
    for t in tasks {
        let (r, resp) = t.await.unwrap();
        match resp.status.as_ref().unwrap().code {
            0 => allowed[r] += 1,
            8 => {
                refused += 1;
                let d = denied(&resp);
                assert_eq!(d.body["error"], "daily_quota_exceeded", "{:?}", d.body);
            }
            other => panic!("unexpected answer {other}: {resp:?}"),
        }
    }
    assert_eq!(allowed[0] + allowed[1], 50, "{allowed:?}");
    assert_eq!(refused, 150);
    let shared =
        format!("SELECT daily_requests FROM identity_usage WHERE identity_id = {identity_id}");
    assert_eq!(db.scalar(&shared).await, 50);
    let keys_sum = format!(
        "SELECT SUM(daily_requests)::bigint FROM api_usage WHERE api_key_id IN ({a_id}, {b_id})"
    );
    assert_eq!(db.scalar(&keys_sum).await, 50);
    for r in replicas {
        assert_eq!(r.stop_with("-TERM").await.code(), Some(0));
    }
    let logged = format!(
        "SELECT count(*) FROM api_requests_log WHERE api_key_id IN ({a_id}, {b_id}) \
         AND decision = 'allow'"
    );
    assert_eq!(db.scalar(&logged).await, 50);
    assert_eq!(
        db.scalar("SELECT count(*) FROM api_requests_log").await,
        200
    );
}
