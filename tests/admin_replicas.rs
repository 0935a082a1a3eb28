//! The admin API of a `tollgate serve` process, as deployed: a key created or changed through
//! one replica's admin port reaches another replica's Checks within a second, every call is in
//! the log without a secret, and a configuration that would expose it is refused at start.

use std::time::{Duration, Instant};

use harness::admin::{Rest, TOKEN, sha256_hex};
use harness::check::key_header;
use harness::cli::tollgate_command;
use harness::db::{Db, TestDb};
use harness::every_database;
use harness::net::free_port;
use harness::replica::Replica;
use serde_json::json;

/// Waits up to a second for `replica`'s Check of `key` to answer `want`.
async fn check_becomes(replica: &Replica, key: &str, want: i32) {
    let mut c = replica.client().await;
    let started = Instant::now();
    loop {
        let got = c
            .check(key_header(key))
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
            .code;
        if got == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "replica answers {got}, not {want}, a second after the change"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn api_changes_reach_every_replica_within_a_second(db: Db) {
    let db = TestDb::create(db).await;
    let dir = tempfile::tempdir().unwrap();
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let hash = sha256_hex(TOKEN);
    let with_admin = [
        ("TOLLGATE_DATABASE_URL", db.url.as_str()),
        ("TOLLGATE_ADMIN_ADDR", admin_addr.as_str()),
        ("TOLLGATE_ADMIN_TOKEN_SHA256", hash.as_str()),
    ];
    let a = Replica::spawn(dir.path(), &with_admin).await;
    let b = Replica::spawn(dir.path(), &[("TOLLGATE_DATABASE_URL", db.url.as_str())]).await;
    let rest = Rest::new(admin_addr.parse().unwrap(), Some(TOKEN));
    let created = rest
        .call("POST", "/v1/keys", Some(json!({"name": "replicated"})))
        .await;
    assert_eq!(created.status, 200, "{}", created.text);
    let secret = created.body["secret"].as_str().unwrap().to_string();
    let id = created.body["key"]["id"].as_str().unwrap().to_string();
    let path = format!("/v1/keys/{id}");
    // Created on A, usable on B (which caches it now).
    check_becomes(&b, &secret, 0).await;
    // Changed on A: B stops, then starts again, then the revoke.
    let past = rest
        .call(
            "PATCH",
            &path,
            Some(json!({"expiresAt": "2020-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(past.status, 200, "{}", past.text);
    check_becomes(&b, &secret, 7).await;
    let cleared = rest
        .call("PATCH", &path, Some(json!({"updateMask": "expiresAt"})))
        .await;
    assert_eq!(cleared.status, 200, "{}", cleared.text);
    check_becomes(&b, &secret, 0).await;
    let revoked = rest
        .call("POST", &format!("/v1/keys/{id}:revoke"), None)
        .await;
    assert_eq!(revoked.status, 200, "{}", revoked.text);
    check_becomes(&b, &secret, 7).await;
    check_becomes(&a, &secret, 7).await;
    // A refused call is logged too.
    let wrong = Rest::new(admin_addr.parse().unwrap(), Some("not-the-token"));
    assert_eq!(wrong.call("GET", &path, None).await.status, 401);

    assert_eq!(a.stop_with("-TERM").await.code(), Some(0));
    assert_eq!(b.stop_with("-TERM").await.code(), Some(0));
    let log = std::fs::read_to_string(
        dir.path().join(
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .find(|p| std::fs::read_to_string(p).unwrap().contains("admin call"))
                .expect("a replica logged admin calls"),
        ),
    )
    .unwrap();
    let fingerprint = format!("caller=token:{}", &hash[..12]);
    for (method, key_id) in [
        ("CreateKey", Some(&id)),
        ("UpdateKey", Some(&id)),
        ("RevokeKey", Some(&id)),
    ] {
        assert!(
            log.lines().any(|l| l.contains("admin call")
                && l.contains(&fingerprint)
                && l.contains(&format!("method=\"{method}\""))
                && key_id.is_none_or(|id| l.contains(&format!("key_id={id}")))),
            "no {method} line in\n{log}"
        );
    }
    assert!(log.contains("admin call unauthenticated"), "{log}");
    assert!(!log.contains(TOKEN), "the admin token is in the log");
    assert!(!log.contains(&secret), "the key's secret is in the log");
    assert!(
        !log.contains("not-the-token"),
        "a presented token is in the log"
    );
}

every_database!(api_changes_reach_every_replica_within_a_second);

/// An admin port off loopback with no credentials is refused at start, naming the setting.
#[test]
fn an_open_admin_port_off_loopback_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    for (addr, tokens) in [("0.0.0.0:0", ""), ("[::]:0", "")] {
        let out = tollgate_command(dir.path())
            .args(["serve"])
            .env("TOLLGATE_ADMIN_ADDR", addr)
            .env("TOLLGATE_ADMIN_TOKEN_SHA256", tokens)
            .env("TOLLGATE_DATABASE_URL", "sqlite://never.db")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{addr}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("admin.token_sha256"), "{err}");
        assert!(!dir.path().join("never.db").exists(), "nothing was opened");
    }
    let out = tollgate_command(dir.path())
        .args(["check-config"])
        .env("TOLLGATE_ADMIN_ADDR", "0.0.0.0:0")
        .env("TOLLGATE_ADMIN_TOKEN_SHA256", "not-a-hash")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin.token_sha256[0]"), "{err}");
    assert!(!err.contains("not-a-hash"), "{err}");
}
