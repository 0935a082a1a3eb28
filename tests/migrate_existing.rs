//! `tollgate migrate` on a database made by the schema before keys had rotation, permissions and
//! metadata (migrations up to 0008), with keys and usage in it: every key, limit and counter is
//! still there afterwards, and the keys work with the new features. Likewise from 0009 (before
//! identities) and from 0010 (a request log without identities).

use std::borrow::Cow;
use std::path::Path;

use chrono::{Datelike, Utc};
use harness::db::{Db, TestDb};
use harness::every_database;
use sqlx::migrate::Migrator;

/// The last migration of the schema before this one.
const BEFORE: i64 = 8;

/// Applies `migrations/<dialect>` up to [`BEFORE`] to `db`.
async fn old_schema(db: &TestDb, dialect: &str) {
    schema_up_to(db, dialect, BEFORE).await
}

/// Applies `migrations/<dialect>` up to `before` to `db`.
async fn schema_up_to(db: &TestDb, dialect: &str, before: i64) {
    let mut migrator = Migrator::new(Path::new(&format!("migrations/{dialect}")))
        .await
        .unwrap();
    let old: Vec<_> = migrator
        .migrations
        .iter()
        .filter(|m| m.version <= before)
        .cloned()
        .collect();
    assert!(old.len() >= 7, "{old:?}");
    migrator.migrations = Cow::Owned(old);
    match dialect {
        "postgres" => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            migrator.run(&pool).await.unwrap();
            pool.close().await;
        }
        _ => {
            let opts: sqlx::sqlite::SqliteConnectOptions = db.url.parse().unwrap();
            let pool = sqlx::SqlitePool::connect_with(opts.create_if_missing(true))
                .await
                .unwrap();
            migrator.run(&pool).await.unwrap();
            pool.close().await;
        }
    }
}

async fn migrate_keeps_every_key_limit_and_counter(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let test_db = TestDb::create(db).await;
    let (dialect, now_sql) = match db {
        Db::Postgres => ("postgres", "now()"),
        Db::Sqlite => ("sqlite", "'2026-01-01T00:00:00.000Z'"),
    };
    old_schema(&test_db, dialect).await;
    let today = Utc::now().date_naive();
    let (day, month) = match db {
        Db::Postgres => (
            format!("DATE '{today}'"),
            format!("DATE '{}'", today.with_day(1).unwrap()),
        ),
        Db::Sqlite => (
            format!("'{today}'"),
            format!("'{}'", &today.to_string()[..7]),
        ),
    };
    // Two keys as the old schema held them: limits, one revoked, counters spent today.
    let a = tollgate::keys::generate();
    let b = tollgate::keys::generate();
    for (key, name, status, limits) in [
        (&a, "old-a", "active", "60, 100, 1000"),
        (&b, "old-b", "revoked", "NULL, 5, NULL"),
    ] {
        test_db
            .execute(&format!(
                "INSERT INTO api_keys (name, prefix, key_hash, status, per_minute, daily_limit, \
                   monthly_limit, created_at, updated_at, refund_5xx) \
                 VALUES ('{name}', '{}', '{}', '{status}', {limits}, {now_sql}, {now_sql}, true)",
                key.prefix,
                tollgate::keys::hash_hex(&key.hash),
            ))
            .await;
    }
    test_db
        .execute(&format!(
            "UPDATE api_usage SET day = {day}, month = {month}, daily_requests = 3, \
               monthly_requests = 7, total_requests = 42"
        ))
        .await;

    let out = harness::cli::tollgate_command(dir.path())
        .arg("migrate")
        .env("TOLLGATE_DATABASE_URL", &test_db.url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let keys = |args: &[&str]| {
        let out = harness::cli::tollgate_command(dir.path())
            .arg("keys")
            .args(args)
            .env("TOLLGATE_DATABASE_URL", &test_db.url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let list = keys(&["list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let id_a = list[0]["id"].as_i64().unwrap().to_string();
    let shown = keys(&["show", &id_a, "--json"]);
    assert_eq!(shown["name"], "old-a");
    assert_eq!(shown["prefix"], a.prefix);
    assert_eq!(
        (&shown["per_minute"], &shown["daily"], &shown["monthly"]),
        (&60.into(), &100.into(), &1000.into())
    );
    assert_eq!(shown["refund_5xx"], true);
    assert_eq!(
        shown["usage"],
        serde_json::json!({"daily": 3, "monthly": 7, "total": 42})
    );
    // The new columns start as "every route, no metadata, never rotated".
    assert_eq!(shown["permissions"], serde_json::json!([]));
    assert_eq!(shown["metadata"], serde_json::json!({}));
    assert_eq!(shown["old_key_expires_at"], serde_json::Value::Null);
    let id_b = list[1]["id"].as_i64().unwrap().to_string();
    let shown = keys(&["show", &id_b, "--json"]);
    assert_eq!(
        (&shown["status"], &shown["daily"]),
        (&"revoked".into(), &5.into())
    );
    // The old key's secret still finds it; rotated, the secret it had still does (grace).
    let stores = test_db.open_stores().await;
    let found = stores.keys.find_by_hash(&a.hash).await.unwrap().unwrap();
    assert_eq!(found.id.to_string(), id_a);
    let rotated = keys(&["rotate", &id_a, "--json"]);
    let via_old = stores.keys.find_by_hash(&a.hash).await.unwrap().unwrap();
    assert!(via_old.by_old_secret && via_old.secret_works(Utc::now()));
    let new = tollgate::keys::hash(rotated["key"].as_str().unwrap());
    let via_new = stores.keys.find_by_hash(&new).await.unwrap().unwrap();
    assert_eq!(via_new.limits, found.limits);
    assert_eq!(
        stores
            .quotas
            .usage(found.id, Utc::now())
            .await
            .unwrap()
            .total,
        42
    );
    stores.close().await;
}

/// `tollgate migrate` from the schema before identities (0009) to 0010: every key, limit and
/// counter is still there, the keys belong to no identity, and identities work on it.
async fn migrating_to_identities_keeps_every_key_and_counter(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let test_db = TestDb::create(db).await;
    let (dialect, now_sql) = match db {
        Db::Postgres => ("postgres", "now()"),
        Db::Sqlite => ("sqlite", "'2026-01-01T00:00:00.000Z'"),
    };
    schema_up_to(&test_db, dialect, 9).await;
    let a = tollgate::keys::generate();
    test_db
        .execute(&format!(
            "INSERT INTO api_keys (name, prefix, key_hash, status, per_minute, daily_limit, \
               monthly_limit, created_at, updated_at, refund_5xx, permissions, metadata) \
             VALUES ('old', '{}', '{}', 'active', 60, 100, 1000, {now_sql}, {now_sql}, true, \
               '[\"reports.read\"]', '{{\"plan\":\"gold\"}}')",
            a.prefix,
            tollgate::keys::hash_hex(&a.hash),
        ))
        .await;
    test_db
        .execute(
            "UPDATE api_usage SET daily_requests = 3, monthly_requests = 7, total_requests = 42",
        )
        .await;
    let run = |args: &[&str]| {
        let out = harness::cli::tollgate_command(dir.path())
            .args(args)
            .env("TOLLGATE_DATABASE_URL", &test_db.url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        out.stdout
    };
    run(&["migrate"]);
    let list: serde_json::Value =
        serde_json::from_slice(&run(&["keys", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let key = &list[0];
    assert_eq!(
        (
            &key["name"],
            &key["per_minute"],
            &key["daily"],
            &key["monthly"]
        ),
        (&"old".into(), &60.into(), &100.into(), &1000.into())
    );
    assert_eq!(key["permissions"], serde_json::json!(["reports.read"]));
    assert_eq!(key["metadata"], serde_json::json!({"plan": "gold"}));
    assert_eq!(key["identity_id"], serde_json::Value::Null);
    let total = test_db.scalar("SELECT total_requests FROM api_usage").await;
    assert_eq!(total, 42);
    // Identities work on the migrated database.
    let identity: serde_json::Value = serde_json::from_slice(&run(&[
        "identities",
        "create",
        "--name",
        "acme",
        "--daily",
        "5",
        "--json",
    ]))
    .unwrap();
    let id = identity["id"].as_i64().unwrap();
    let created: serde_json::Value = serde_json::from_slice(&run(&[
        "keys",
        "create",
        "--name",
        "new",
        "--identity",
        &id.to_string(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(created["identity_id"], id);
    assert_eq!(
        test_db
            .scalar(&format!(
                "SELECT count(*) FROM identity_usage WHERE identity_id = {id}"
            ))
            .await,
        1
    );
}

/// `tollgate migrate` from the schema of 0010 (identities, a log without them) to 0011: every
/// log row, in a monthly partition and out of one, is still there with `identity_id` NULL (the
/// log never knew it), `tollgate usage` still counts them, and new rows record the identity.
async fn migrating_the_log_to_identities_keeps_every_row(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let test_db = TestDb::create(db).await;
    let (dialect, now_sql) = match db {
        Db::Postgres => ("postgres", "now()"),
        Db::Sqlite => ("sqlite", "'2026-01-01T00:00:00.000Z'"),
    };
    // A time as each dialect stores it (SQLite: RFC 3339 text with milliseconds).
    let ts = |t: &str| match db {
        Db::Postgres => format!("'{t}'::timestamptz"),
        Db::Sqlite => format!("'{}'", t.replace('Z', ".000Z")),
    };
    schema_up_to(&test_db, dialect, 10).await;
    if db == Db::Postgres {
        // A month with its own partition, as tollgate makes them; February stays in the default.
        test_db
            .execute(
                "CREATE TABLE api_requests_log_2026_03 PARTITION OF api_requests_log \
                 FOR VALUES FROM ('2026-03-01 00:00:00+00') TO ('2026-04-01 00:00:00+00')",
            )
            .await;
    }
    test_db
        .execute(&format!(
            "INSERT INTO identities (name, created_at, updated_at) \
             VALUES ('acme', {now_sql}, {now_sql})"
        ))
        .await;
    let identity = test_db.scalar("SELECT max(id) FROM identities").await;
    let a = tollgate::keys::generate();
    test_db
        .execute(&format!(
            "INSERT INTO api_keys (name, prefix, key_hash, status, created_at, updated_at, \
               identity_id) \
             VALUES ('member', '{}', '{}', 'active', {now_sql}, {now_sql}, {identity})",
            a.prefix,
            tollgate::keys::hash_hex(&a.hash),
        ))
        .await;
    let key = test_db.scalar("SELECT max(id) FROM api_keys").await;
    for (t, request_id, key_id, decision, status, cost) in [
        ("2026-02-20T10:00:00Z", "r-feb", "{key}", "allow", 200, 1),
        ("2026-03-10T12:00:00Z", "r-mar-1", "{key}", "allow", 200, 1),
        ("2026-03-10T12:00:01Z", "r-mar-2", "NULL", "deny", 401, 0),
    ] {
        let key_id = key_id.replace("{key}", &key.to_string());
        test_db
            .execute(&format!(
                "INSERT INTO api_requests_log (ts, request_id, decision_id, api_key_id, decision, \
                   reason, status, api, cost, key_prefix) \
                 VALUES ({}, '{request_id}', 'd-{request_id}', {key_id}, '{decision}', 'ok', \
                   {status}, 'authz', {cost}, '{}')",
                ts(t),
                a.prefix,
            ))
            .await;
    }
    let run = |args: &[&str]| {
        let out = harness::cli::tollgate_command(dir.path())
            .args(args)
            .env("TOLLGATE_DATABASE_URL", &test_db.url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        out.stdout
    };
    run(&["migrate"]);
    assert_eq!(
        test_db
            .scalar("SELECT count(*) FROM api_requests_log WHERE identity_id IS NULL")
            .await,
        3
    );
    assert_eq!(
        test_db
            .scalar(&format!(
                "SELECT count(*) FROM api_requests_log WHERE request_id = 'r-mar-1' \
                 AND decision_id = 'd-r-mar-1' AND api_key_id = {key} AND decision = 'allow' \
                 AND status = 200 AND cost = 1 AND key_prefix = '{}'",
                a.prefix
            ))
            .await,
        1
    );
    let usage = |extra: &[&str]| {
        let mut args = vec![
            "usage",
            "--since",
            "2026-02-01",
            "--until",
            "2026-03-31",
            "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_slice::<serde_json::Value>(&run(&args)).unwrap()
    };
    assert_eq!(
        usage(&[])["days"],
        serde_json::json!([
            {"day": "2026-02-20", "allowed": 1, "denied": 0},
            {"day": "2026-03-10", "allowed": 1, "denied": 1},
        ])
    );
    let identity_arg = identity.to_string();
    let v = usage(&["--identity", &identity_arg]);
    assert_eq!(
        v["days"],
        serde_json::json!([]),
        "rows before 0011 name no identity"
    );
    assert_eq!(v["identity_name"], "acme");
    if db == Db::Postgres {
        // The partial index reaches every partition, an existing one included.
        assert_eq!(
            test_db
                .scalar(
                    "SELECT count(*) FROM pg_indexes WHERE tablename = 'api_requests_log_2026_03' \
                     AND indexdef LIKE '%(identity_id, ts) WHERE (identity_id IS NOT NULL)'"
                )
                .await,
            1
        );
    }
    // A new row records its identity, in the month's partition.
    let stores = test_db.open_stores().await;
    stores
        .log
        .write_batch(&[tollgate::store::LogRow {
            ts: "2026-03-11T09:00:00Z".parse().unwrap(),
            api: tollgate::store::LogApi::Authz,
            request_id: Some("r-new".into()),
            decision_id: None,
            key_id: Some(key),
            method: None,
            path: None,
            host: None,
            client_addr: None,
            allowed: true,
            reason: "ok",
            status: 200,
            cost: 1,
            key_prefix: None,
            identity_id: Some(identity),
        }])
        .await
        .unwrap();
    stores.close().await;
    let table = match db {
        Db::Postgres => "api_requests_log_2026_03",
        Db::Sqlite => "api_requests_log",
    };
    assert_eq!(
        test_db
            .scalar(&format!(
                "SELECT count(*) FROM {table} WHERE request_id = 'r-new' \
                 AND identity_id = {identity}"
            ))
            .await,
        1
    );
    assert_eq!(
        usage(&["--identity", &identity_arg])["days"],
        serde_json::json!([{"day": "2026-03-11", "allowed": 1, "denied": 0}])
    );
}

every_database!(
    migrate_keeps_every_key_limit_and_counter,
    migrating_to_identities_keeps_every_key_and_counter,
    migrating_the_log_to_identities_keeps_every_row,
);
