//! The admin API over gRPC, through a real tollgate on SQLite and on PostgreSQL: every operation
//! and every error code, and the credentials both transports demand (missing, wrong, rotated).

use std::time::{Duration, Instant};

use harness::admin::{Rest, TOKEN, authed, grpc, with_admin};
use harness::check::key_header;
use harness::db::Db;
use harness::every_database;
use harness::server::Tollgate;
use prost_types::{FieldMask, Timestamp};
use tollgate::admin::pb::{
    self, CreateIdentityRequest, CreateKeyRequest, GetIdentityUsageRequest, GetKeyRequest,
    GetKeyUsageRequest, IdentityLimits, KeyStatus, Limits, ListKeysRequest, RevokeKeyRequest,
    UpdateKeyRequest,
};
use tonic::Code;

async fn start(db: Db) -> Tollgate {
    Tollgate::on_with(db, |c| with_admin(c, &[TOKEN])).await
}

fn t() -> Option<&'static str> {
    Some(TOKEN)
}

async fn check_becomes(tg: &Tollgate, key: &str, want: i32) {
    let started = Instant::now();
    let mut c = tg.client().await;
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
            "Check answers {got}, not {want}, after 1s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn grpc_every_operation(db: Db) {
    let tg = start(db).await;
    let mut c = grpc(tg.admin.unwrap()).await;
    let created = c
        .create_key(authed(
            CreateKeyRequest {
                name: "grpc portal".into(),
                limits: Some(Limits {
                    daily: Some(2),
                    ..Default::default()
                }),
                expires_at: Some(Timestamp {
                    seconds: 1_900_000_000,
                    nanos: 0,
                }),
                ..Default::default()
            },
            t(),
        ))
        .await
        .unwrap()
        .into_inner();
    let key = created.key.unwrap();
    assert!(tollgate::keys::is_well_formed(&created.secret));
    assert_eq!(key.status, KeyStatus::Active as i32);
    assert_eq!(key.limits.unwrap().daily, Some(2));
    assert_eq!(key.expires_at.unwrap().seconds, 1_900_000_000);
    let id = key.id;
    check_becomes(&tg, &created.secret, 0).await;

    let got = c
        .get_key(authed(GetKeyRequest { id }, t()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.name, "grpc portal");
    let listed = c
        .list_keys(authed(
            ListKeysRequest {
                status: KeyStatus::Active as i32,
                name_prefix: "grpc".into(),
                ..Default::default()
            },
            t(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.keys, vec![got.clone()]);
    assert_eq!(listed.next_page_token, "");

    let updated = c
        .update_key(authed(
            UpdateKeyRequest {
                id,
                limits: Some(Limits::default()),
                update_mask: Some(FieldMask {
                    paths: vec!["limits.daily".into(), "expires_at".into()],
                }),
                ..Default::default()
            },
            t(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.limits.unwrap().daily, None);
    assert_eq!(updated.expires_at, None);

    for _ in 0..3 {
        check_becomes(&tg, &created.secret, 0).await;
    }
    // A key without quotas spends in blocks reserved ahead (quota.flush_interval gives the
    // rest back), so the counters show the 4 requests within a second.
    let started = Instant::now();
    loop {
        let usage = c
            .get_key_usage(authed(GetKeyUsageRequest { id, days: 7 }, t()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(usage.key_id, id);
        if usage.total == 4 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(2), "{usage:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let revoked = c
        .revoke_key(authed(RevokeKeyRequest { id }, t()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.status, KeyStatus::Revoked as i32);
    check_becomes(&tg, &created.secret, 7).await;
    let metrics = tg.metrics_text().await;
    for rpc in [
        "CreateKey",
        "GetKey",
        "ListKeys",
        "UpdateKey",
        "GetKeyUsage",
        "RevokeKey",
    ] {
        let series = format!(
            r#"tollgate_admin_requests_total{{method="{rpc}",transport="grpc",code="ok"}} "#
        );
        assert!(metrics.contains(&series), "{series}\n{metrics}");
    }
    tg.stop().await;
}

async fn grpc_errors_have_their_codes(db: Db) {
    let tg = start(db).await;
    let mut c = grpc(tg.admin.unwrap()).await;
    let missing = 424_242;
    let code = |r: Result<tonic::Response<pb::Key>, tonic::Status>| r.unwrap_err();
    let s = code(c.get_key(authed(GetKeyRequest { id: missing }, t())).await);
    assert_eq!(s.code(), Code::NotFound);
    assert!(s.message().contains("424242"), "{}", s.message());
    let s = code(
        c.revoke_key(authed(RevokeKeyRequest { id: missing }, t()))
            .await,
    );
    assert_eq!(s.code(), Code::NotFound);
    let s = code(
        c.update_key(authed(
            UpdateKeyRequest {
                id: missing,
                name: Some("x".into()),
                ..Default::default()
            },
            t(),
        ))
        .await,
    );
    assert_eq!(s.code(), Code::NotFound);
    let s = c
        .get_key_usage(authed(
            GetKeyUsageRequest {
                id: missing,
                days: 0,
            },
            t(),
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);

    for (request, says) in [
        (
            CreateKeyRequest {
                name: " ".into(),
                ..Default::default()
            },
            "name: must not be empty",
        ),
        (
            CreateKeyRequest {
                name: "x".into(),
                limits: Some(Limits {
                    monthly: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "limits.monthly: 0 is not a limit",
        ),
        (
            CreateKeyRequest {
                name: "x".into(),
                limits: Some(Limits {
                    per_minute: Some(-1),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "limits.per_minute",
        ),
        (
            CreateKeyRequest {
                name: "x".into(),
                expires_at: Some(Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..Default::default()
            },
            "expires_at",
        ),
    ] {
        let s = c.create_key(authed(request, t())).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{says}: {s:?}");
        assert!(s.message().contains(says), "{says}: {}", s.message());
    }
    for request in [
        ListKeysRequest {
            page_size: 5000,
            ..Default::default()
        },
        ListKeysRequest {
            page_size: -3,
            ..Default::default()
        },
        ListKeysRequest {
            page_token: "not a token".into(),
            ..Default::default()
        },
        ListKeysRequest {
            status: 99,
            ..Default::default()
        },
    ] {
        let s = c.list_keys(authed(request, t())).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    }
    // A message over the size limit is refused before it is decoded.
    let s = c
        .create_key(authed(
            CreateKeyRequest {
                name: "x".repeat(100 * 1024),
                ..Default::default()
            },
            t(),
        ))
        .await
        .unwrap_err();
    assert_ne!(s.code(), Code::Ok);
    assert_eq!(tg.scalar("SELECT count(*) FROM api_keys").await, 0);
    tg.stop().await;
}

/// Without valid credentials a caller gets 401 / UNAUTHENTICATED, the same for a key that
/// exists and one that does not, and nothing is done.
async fn credentials_are_required_and_tell_nothing(db: Db) {
    let tg = start(db).await;
    let addr = tg.admin.unwrap();
    let good = Rest::new(addr, Some(TOKEN));
    let created = good
        .call(
            "POST",
            "/v1/keys",
            Some(serde_json::json!({"name": "exists"})),
        )
        .await;
    let id = created.body["key"]["id"].as_str().unwrap().to_string();
    let wrong_token = format!("{TOKEN}x");
    for token in [None, Some("wrong"), Some(wrong_token.as_str()), Some("")] {
        let rest = Rest::new(addr, token);
        let mut bodies = Vec::new();
        for (method, path) in [
            ("GET", format!("/v1/keys/{id}")),
            ("GET", "/v1/keys/987654".to_string()),
            ("POST", format!("/v1/keys/{id}:revoke")),
            ("GET", "/v1/keys".into()),
            ("GET", "/v1/nothing".into()),
            ("DELETE", "/v1/keys".into()),
            ("GET", "/v1/openapi.json".into()),
        ] {
            let a = rest.call(method, &path, None).await;
            assert_eq!(a.status, 401, "{token:?} {method} {path}: {}", a.text);
            assert_eq!(a.content_type, "application/problem+json");
            assert_eq!(a.headers["www-authenticate"], "Bearer");
            bodies.push(a.text);
        }
        bodies.dedup();
        assert_eq!(bodies.len(), 1, "401s differ: {bodies:?}");
        let body: serde_json::Value = serde_json::from_str(&bodies[0]).unwrap();
        assert_eq!(
            body["detail"],
            "Admin credentials required: send Authorization: Bearer <token>."
        );
        let mut c = grpc(addr).await;
        for id in [id.parse().unwrap(), 987_654] {
            let s = c
                .get_key(authed(GetKeyRequest { id }, token))
                .await
                .unwrap_err();
            assert_eq!(s.code(), Code::Unauthenticated);
            assert_eq!(s.message(), "admin credentials required");
        }
        let s = c
            .revoke_key(authed(
                RevokeKeyRequest {
                    id: id.parse().unwrap(),
                },
                token,
            ))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated);
    }
    // Nothing was revoked, and the refusals were counted.
    let a = good.call("GET", &format!("/v1/keys/{id}"), None).await;
    assert_eq!(a.body["status"], "KEY_STATUS_ACTIVE");
    let metrics = tg.metrics_text().await;
    assert!(
        metrics.contains(
            r#"tollgate_admin_requests_total{method="unknown",transport="rest",code="unauthenticated"} 28"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"tollgate_admin_requests_total{method="GetKey",transport="grpc",code="unauthenticated"} 8"#
        ),
        "{metrics}"
    );
    assert!(!metrics.contains(TOKEN));
    tg.stop().await;
}

/// GetIdentityUsage: the identity's shared counters and its keys' requests by day from the log;
/// NOT_FOUND for an unknown identity, INVALID_ARGUMENT for a bad `days`, and the admin
/// credentials required like every other call, over gRPC and REST.
async fn grpc_identity_usage(db: Db) {
    let tg = start(db).await;
    let mut c = grpc(tg.admin.unwrap()).await;
    let identity = c
        .create_identity(authed(
            CreateIdentityRequest {
                name: "acme".into(),
                limits: Some(IdentityLimits {
                    daily: Some(100),
                    ..Default::default()
                }),
            },
            t(),
        ))
        .await
        .unwrap()
        .into_inner();
    let key = |name: &str, identity_id| CreateKeyRequest {
        name: name.into(),
        identity_id,
        ..Default::default()
    };
    let member = c
        .create_key(authed(key("member", Some(identity.id)), t()))
        .await
        .unwrap()
        .into_inner();
    let loose = c
        .create_key(authed(key("loose", None), t()))
        .await
        .unwrap()
        .into_inner();
    for secret in [&member.secret, &member.secret, &loose.secret] {
        check_becomes(&tg, secret, 0).await;
    }
    tg.wait_for_count("SELECT count(*) FROM api_requests_log", 3)
        .await;
    let usage = c
        .get_identity_usage(authed(
            GetIdentityUsageRequest {
                id: identity.id,
                days: 0,
            },
            t(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        usage,
        pb::IdentityUsage {
            identity_id: identity.id,
            today: 2,
            this_month: 2,
            total: 2,
            days: vec![pb::DayUsage {
                day: harness::server::t0().format("%Y-%m-%d").to_string(),
                allowed: 2,
                denied: 0,
            }],
        }
    );
    for (id, days, want) in [
        (424_242, 0, Code::NotFound),
        (identity.id, -1, Code::InvalidArgument),
        (identity.id, 367, Code::InvalidArgument),
    ] {
        let s = c
            .get_identity_usage(authed(GetIdentityUsageRequest { id, days }, t()))
            .await
            .unwrap_err();
        assert_eq!(s.code(), want, "{id} {days}: {s:?}");
    }
    for token in [None, Some("wrong")] {
        let s = c
            .get_identity_usage(authed(
                GetIdentityUsageRequest {
                    id: identity.id,
                    days: 0,
                },
                token,
            ))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated);
        let a = Rest::new(tg.admin.unwrap(), token)
            .call(
                "GET",
                &format!("/v1/identities/{}/usage", identity.id),
                None,
            )
            .await;
        assert_eq!(a.status, 401, "{}", a.text);
    }
    let metrics = tg.metrics_text().await;
    for code in ["ok", "not_found", "invalid_argument", "unauthenticated"] {
        let series = format!(
            r#"tollgate_admin_requests_total{{method="GetIdentityUsage",transport="grpc",code="{code}"}} "#
        );
        assert!(metrics.contains(&series), "{series}\n{metrics}");
    }
    tg.stop().await;
}

every_database!(
    grpc_every_operation,
    grpc_errors_have_their_codes,
    credentials_are_required_and_tell_nothing,
    grpc_identity_usage,
);

/// Two tokens configured: both work; once the old one is taken out, only the new one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_rotated_by_listing_both_then_only_the_new_one() {
    let (old, new) = ("old-admin-token-1", "new-admin-token-2");
    let both = Tollgate::start_with(|c| with_admin(c, &[old, new])).await;
    let addr = both.admin.unwrap();
    let mut fingerprints = Vec::new();
    for token in [old, new] {
        let a = Rest::new(addr, Some(token))
            .call("GET", "/v1/keys", None)
            .await;
        assert_eq!(a.status, 200, "{token}");
        let s = grpc(addr)
            .await
            .list_keys(authed(ListKeysRequest::default(), Some(token)))
            .await;
        assert!(s.is_ok(), "{token}: {s:?}");
        fingerprints.push(harness::admin::sha256_hex(token)[..12].to_string());
    }
    both.stop().await;
    let rotated = Tollgate::start_with(|c| with_admin(c, &[new])).await;
    let addr = rotated.admin.unwrap();
    let a = Rest::new(addr, Some(old))
        .call("GET", "/v1/keys", None)
        .await;
    assert_eq!(a.status, 401);
    let s = grpc(addr)
        .await
        .list_keys(authed(ListKeysRequest::default(), Some(old)))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let a = Rest::new(addr, Some(new))
        .call("GET", "/v1/keys", None)
        .await;
    assert_eq!(a.status, 200);
    assert_ne!(fingerprints[0], fingerprints[1]);
    rotated.stop().await;
}

/// On loopback with no token configured, the admin API is open (the embedded one-command
/// start); with a token, even loopback needs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_without_tokens_is_open() {
    let tg = Tollgate::start_with(|c| with_admin(c, &[])).await;
    let a = Rest::new(tg.admin.unwrap(), None)
        .call(
            "POST",
            "/v1/keys",
            Some(serde_json::json!({"name": "local"})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    tg.stop().await;
}

/// Without admin_addr there is no admin port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_admin_addr_no_admin_port() {
    let tg = Tollgate::start().await;
    assert_eq!(tg.admin, None);
    tg.stop().await;
}
