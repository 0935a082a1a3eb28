//! `tollgate migrate` on a database made by the schema before keys had rotation, permissions and
//! metadata (migrations up to 0008), with keys and usage in it: every key, limit and counter is
//! still there afterwards, and the keys work with the new features.

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

every_database!(
    migrate_keeps_every_key_limit_and_counter,
    migrating_to_identities_keeps_every_key_and_counter,
);
