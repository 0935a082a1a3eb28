//! Check over gRPC, as Envoy calls it, against a real tollgate on the embedded default.

use std::time::{Duration, Instant};

use chrono::Duration as Span;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse,
    attribute_context::{HttpRequest, Request as AttrRequest},
};
use envoy_types::pb::google::protobuf::value::Kind;
use harness::check::{check_request, denied, headers_of, key_header, ok};
use harness::cli::{cli_create_key, tollgate_command};
use harness::db::Db;
use harness::every_database;
use harness::server::{Tollgate, limits, t0};
use tollgate::keys::Limits;

async fn missing_key_is_401_with_www_authenticate_and_problem_body(db: Db) {
    let tg = Tollgate::on(db).await;
    let mut c = tg.client().await;
    let d = denied(&c.check(check_request(&[])).await.unwrap().into_inner());
    assert_eq!(d.status, 401);
    assert_eq!(d.grpc_code, 16);
    assert_eq!(d.headers["www-authenticate"], r#"Bearer realm="tollgate""#);
    assert_eq!(d.headers["content-type"], "application/problem+json");
    assert_eq!(d.body["error"], "missing_key");
    assert_eq!(d.body["status"], 401);
    assert_eq!(d.body["title"], "Unauthorized");
    assert!(d.body["detail"].as_str().unwrap().contains("x-api-key"));
    // A Basic credential is not a key either.
    let d = denied(
        &c.check(check_request(&[("authorization", "Basic dXNlcjpwdw==")]))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(d.body["error"], "missing_key");
    tg.stop().await;
}

async fn unknown_and_malformed_keys_are_401_invalid_key(db: Db) {
    let tg = Tollgate::on(db).await;
    let mut c = tg.client().await;
    let unknown = tollgate::keys::generate().plaintext;
    for key in [unknown.as_str(), "not-a-key", "tg_short"] {
        let d = denied(&c.check(key_header(key)).await.unwrap().into_inner());
        assert_eq!(
            (d.status, d.body["error"].as_str()),
            (401, Some("invalid_key")),
            "{key}"
        );
        assert!(d.headers["www-authenticate"].contains(r#"error="invalid_token""#));
    }
    tg.stop().await;
}

async fn allowed_request_carries_key_id_headers_and_metadata(db: Db) {
    let tg = Tollgate::on(db).await;
    let (key, id) = tg
        .create_key("billing", limits(Some(10), Some(100), Some(1000)))
        .await;
    let mut c = tg.client().await;
    let resp = c.check(key_header(&key)).await.unwrap().into_inner();
    let ok = ok(&resp);
    let upstream = headers_of(&ok.headers);
    assert_eq!(upstream["x-tollgate-key-id"], id.to_string());
    assert!(
        ok.headers_to_remove.is_empty(),
        "hide_credentials is off by default"
    );
    let client = headers_of(&ok.response_headers_to_add);
    // The per-minute window (9 left of 10) is closest to exhaustion.
    assert_eq!(client["x-ratelimit-limit"], "10");
    assert_eq!(client["x-ratelimit-remaining"], "9");
    assert_eq!(client["x-ratelimit-reset"], "40");
    assert_eq!(client["ratelimit"], r#""per_minute";r=9;t=40"#);
    assert_eq!(
        client["ratelimit-policy"],
        r#""per_minute";q=10;w=60, "daily";q=100;w=86400, "monthly";q=1000;w=2678400"#
    );
    let meta = resp.dynamic_metadata.expect("dynamic metadata");
    let field = |k: &str| match &meta.fields[k].kind {
        Some(Kind::StringValue(s)) => s.clone(),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(field("key_id"), id.to_string());
    assert_eq!(field("key_name"), "billing");
    tg.stop().await;
}

async fn bearer_token_works_and_hide_credentials_removes_the_header_used(db: Db) {
    let tg = Tollgate::on_with(db, |c| c.authz.hide_credentials = true).await;
    let (key, _) = tg.create_key("b", Limits::default()).await;
    let mut c = tg.client().await;
    let bearer = format!("Bearer  {key} ");
    let resp = c
        .check(check_request(&[("authorization", &bearer)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok(&resp).headers_to_remove, vec!["authorization"]);
    let lower = format!("bearer {key}");
    let resp = c
        .check(check_request(&[("authorization", &lower)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok(&resp).headers_to_remove, vec!["authorization"]);
    let resp = c.check(key_header(&key)).await.unwrap().into_inner();
    assert_eq!(ok(&resp).headers_to_remove, vec!["x-api-key"]);
    // A key without limits gets no rate-limit headers: there is nothing to report.
    assert!(ok(&resp).response_headers_to_add.is_empty());
    tg.stop().await;
}

async fn configured_key_headers_are_used_in_order(db: Db) {
    let tg = Tollgate::on_with(db, |c| {
        c.authz.key_headers = vec!["x-key".into(), "x-api-key".into()];
        c.authz.bearer = false;
    })
    .await;
    let (key, _) = tg.create_key("h", Limits::default()).await;
    let mut c = tg.client().await;
    let resp = c
        .check(check_request(&[("x-api-key", "junk"), ("x-key", &key)]))
        .await
        .unwrap()
        .into_inner();
    ok(&resp);
    let bearer = format!("Bearer {key}");
    let d = denied(
        &c.check(check_request(&[("authorization", &bearer)]))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(d.body["error"], "missing_key", "bearer is switched off");
    tg.stop().await;
}

async fn revoked_key_is_403_on_the_running_server_within_a_second(db: Db) {
    let tg = Tollgate::on(db).await;
    let (key, id) = tg.create_key("r", Limits::default()).await;
    let mut c = tg.client().await;
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    let out = tg.cli(&["keys", "revoke", &id.to_string()]);
    assert!(out.status.success(), "{out:?}");
    let revoked_at = Instant::now();
    loop {
        let resp = c.check(key_header(&key)).await.unwrap().into_inner();
        if resp.status.as_ref().unwrap().code != 0 {
            let d = denied(&resp);
            assert_eq!(
                (d.status, d.body["error"].as_str()),
                (403, Some("key_revoked"))
            );
            assert_eq!(d.grpc_code, 7);
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "revoke not applied within 1s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tg.stop().await;
}

async fn key_created_by_the_cli_works_on_the_running_server_within_a_second(db: Db) {
    let tg = Tollgate::on(db).await;
    let mut c = tg.client().await;
    let (key, _) = cli_create_key(
        tg.dir.path(),
        &tg.db_url,
        &["--name", "late", "--daily", "5"],
    );
    let started = Instant::now();
    // Asked once before it existed, so the unknown answer is cached: the change poll must
    // still let it in within a second.
    loop {
        let resp = c.check(key_header(&key)).await.unwrap().into_inner();
        if resp.status.as_ref().unwrap().code == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "new key not usable within 1s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tg.stop().await;
}

async fn expired_key_is_403(db: Db) {
    let tg = Tollgate::on(db).await;
    let (key, _) = tg
        .create_key_expiring("e", Limits::default(), Some(t0() + Span::seconds(30)))
        .await;
    let mut c = tg.client().await;
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    tg.clock.advance(Span::seconds(30));
    let d = denied(&c.check(key_header(&key)).await.unwrap().into_inner());
    assert_eq!(
        (d.status, d.body["error"].as_str()),
        (403, Some("key_expired"))
    );
    tg.stop().await;
}

async fn per_minute_limit_is_429_with_retry_after_until_the_window_turns(db: Db) {
    let tg = Tollgate::on(db).await;
    let (key, id) = tg.create_key("pm", limits(Some(3), Some(100), None)).await;
    let mut c = tg.client().await;
    for left in [2, 1, 0] {
        let resp = c.check(key_header(&key)).await.unwrap().into_inner();
        let h = headers_of(&ok(&resp).response_headers_to_add);
        assert_eq!(h["x-ratelimit-remaining"], left.to_string());
    }
    tg.clock.advance(Span::milliseconds(500)); // 12:00:20.5: 39.5 s left → 40
    let d = denied(&c.check(key_header(&key)).await.unwrap().into_inner());
    assert_eq!(d.status, 429);
    assert_eq!(d.grpc_code, 8);
    assert_eq!(d.headers["retry-after"], "40");
    assert_eq!(d.headers["x-ratelimit-remaining"], "0");
    assert_eq!(d.body["error"], "rate_limited");
    assert_eq!(d.body["retry_after"], 40);
    assert_eq!(d.body["limit"]["name"], "per_minute");
    assert_eq!(d.body["limit"]["limit"], 3);
    // Refused requests spent no quota. (The CLI reads the wall clock, not the test's, so
    // compare the all-time total.)
    let out = tg.cli(&["keys", "show", &id.to_string(), "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["usage"]["total"], 3, "{shown}");
    // The next minute starts from zero.
    tg.clock.set("2026-03-10T12:01:00Z".parse().unwrap());
    let resp = c.check(key_header(&key)).await.unwrap().into_inner();
    let h = headers_of(&ok(&resp).response_headers_to_add);
    assert_eq!(h["x-ratelimit-remaining"], "2");
    assert_eq!(h["x-ratelimit-reset"], "60");
    tg.stop().await;
}

async fn default_per_minute_applies_to_keys_without_their_own(db: Db) {
    let tg = Tollgate::on_with(db, |c| c.limits.default_per_minute = Some(1)).await;
    let (key, _) = tg.create_key("d", Limits::default()).await;
    let (own, _) = tg.create_key("o", limits(Some(5), None, None)).await;
    let mut c = tg.client().await;
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    let d = denied(&c.check(key_header(&key)).await.unwrap().into_inner());
    assert_eq!(d.body["error"], "rate_limited");
    ok(&c.check(key_header(&own)).await.unwrap().into_inner());
    ok(&c.check(key_header(&own)).await.unwrap().into_inner());
    tg.stop().await;
}

async fn daily_quota_is_429_until_utc_midnight_and_the_next_day_starts_from_zero(db: Db) {
    let tg = Tollgate::on(db).await;
    let (key, id) = tg.create_key("d", limits(None, Some(2), Some(100))).await;
    let mut c = tg.client().await;
    tg.clock.set("2026-03-10T23:59:30Z".parse().unwrap());
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    let resp = c.check(key_header(&key)).await.unwrap().into_inner();
    let h = headers_of(&ok(&resp).response_headers_to_add);
    assert_eq!(h["x-ratelimit-remaining"], "0");
    assert_eq!(h["ratelimit"], r#""daily";r=0;t=30"#);
    let d = denied(&c.check(key_header(&key)).await.unwrap().into_inner());
    assert_eq!(d.status, 429);
    assert_eq!(d.body["error"], "daily_quota_exceeded");
    assert_eq!(d.headers["retry-after"], "30");
    assert_eq!(d.body["retry_after"], 30);
    assert_eq!(d.body["limit"]["name"], "daily");
    assert_eq!(d.body["limit"]["limit"], 2);
    // A key at yesterday's limit is allowed today, counting from zero.
    tg.clock.set("2026-03-11T00:00:01Z".parse().unwrap());
    let resp = c.check(key_header(&key)).await.unwrap().into_inner();
    let h = headers_of(&ok(&resp).response_headers_to_add);
    assert_eq!(h["ratelimit"], r#""daily";r=1;t=86399"#);
    let usage = tg
        .stores
        .quotas
        .usage(id, "2026-03-11T00:00:02Z".parse().unwrap())
        .await
        .unwrap();
    assert_eq!((usage.daily, usage.monthly, usage.total), (1, 3, 3));
    tg.stop().await;
}

async fn monthly_quota_is_429_until_the_first_and_the_new_month_starts_from_zero(db: Db) {
    let tg = Tollgate::on(db).await;
    let (key, _) = tg.create_key("m", limits(None, Some(10), Some(2))).await;
    let mut c = tg.client().await;
    tg.clock.set("2026-03-31T23:00:00Z".parse().unwrap());
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    tg.clock.set("2026-03-31T23:30:00Z".parse().unwrap());
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    let d = denied(&c.check(key_header(&key)).await.unwrap().into_inner());
    assert_eq!(d.body["error"], "monthly_quota_exceeded");
    assert_eq!(d.headers["retry-after"], "1800");
    assert_eq!(d.body["limit"]["name"], "monthly");
    tg.clock.set("2026-04-01T00:00:00Z".parse().unwrap());
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    tg.stop().await;
}

async fn monthly_is_reported_when_both_quotas_are_spent(db: Db) {
    let tg = Tollgate::on(db).await;
    let (key, _) = tg.create_key("both", limits(None, Some(1), Some(1))).await;
    let mut c = tg.client().await;
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    let d = denied(&c.check(key_header(&key)).await.unwrap().into_inner());
    // Waiting for midnight would not help: the month is the binding limit.
    assert_eq!(d.body["error"], "monthly_quota_exceeded");
    tg.stop().await;
}

async fn limit_changes_reach_the_running_server(db: Db) {
    let tg = Tollgate::on(db).await;
    let (key, id) = tg.create_key("c", limits(None, Some(1), None)).await;
    let mut c = tg.client().await;
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    denied(&c.check(key_header(&key)).await.unwrap().into_inner());
    let out = tg.cli(&[
        "keys",
        "set-limits",
        &id.to_string(),
        "--daily",
        "unlimited",
    ]);
    assert!(out.status.success(), "{out:?}");
    let started = Instant::now();
    while c
        .check(key_header(&key))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .code
        != 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "limit change not applied within 1s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tg.stop().await;
}

async fn two_hundred_concurrent_checks_on_a_daily_limit_of_50_admit_exactly_50(db: Db) {
    let tg = Tollgate::on(db).await;
    let (key, id) = tg.create_key("hot", limits(None, Some(50), None)).await;
    let c = tg.client().await;
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let mut c = c.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let resp = c.check(key_header(&key)).await.unwrap().into_inner();
                resp.status.unwrap().code == 0
            })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.unwrap() as u32;
    }
    assert_eq!(allowed, 50);
    let stopped = tg.stop().await;
    let usage = format!("SELECT daily_requests FROM api_usage WHERE api_key_id = {id}");
    assert_eq!(stopped.scalar(&usage).await, 50);
}

async fn hostile_requests_get_well_formed_answers(db: Db) {
    let tg = Tollgate::on(db).await;
    let (key, _) = tg.create_key("k", Limits::default()).await;
    let mut c = tg.client().await;
    // No attributes at all; attributes without an HTTP part.
    for req in [
        CheckRequest::default(),
        CheckRequest {
            attributes: Some(AttributeContext::default()),
        },
    ] {
        let d = denied(&c.check(req).await.unwrap().into_inner());
        assert_eq!(d.body["error"], "missing_key");
    }
    // A 1 MiB key header, control characters, and non-ASCII.
    let huge = "a".repeat(1 << 20);
    for value in [
        huge.as_str(),
        "tg_\u{0}\u{1}\r\n",
        "tg_ключключключключключключключ",
    ] {
        let d = denied(&c.check(key_header(value)).await.unwrap().into_inner());
        assert_eq!(d.body["error"], "invalid_key");
    }
    // Raw headers (encode_raw_headers): valid key found; invalid UTF-8 reads as absent.
    let raw = |value: Vec<u8>| CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    header_map: Some(HeaderMap {
                        headers: vec![HeaderValue {
                            key: "x-api-key".into(),
                            value: String::new(),
                            raw_value: value,
                        }],
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    ok(&c
        .check(raw(key.clone().into_bytes()))
        .await
        .unwrap()
        .into_inner());
    let d = denied(
        &c.check(raw(vec![0xff, 0xfe, b't', b'g']))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(d.body["error"], "missing_key");
    // The server is still fine.
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    tg.stop().await;
}

async fn every_check_is_logged_and_allowed_rows_match_usage_after_shutdown(db: Db) {
    let tg = Tollgate::on(db).await;
    let (key, id) = tg.create_key("log", limits(Some(5), None, None)).await;
    let c = tg.client().await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let mut c = c.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let req = if i % 4 == 0 {
                    check_request(&[])
                } else {
                    key_header(&key)
                };
                c.check(req)
                    .await
                    .unwrap()
                    .into_inner()
                    .status
                    .unwrap()
                    .code
                    == 0
            })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.unwrap() as i64;
    }
    assert_eq!(allowed, 5);
    // A graceful stop flushes the queue.
    let db = tg.stop().await;
    assert_eq!(db.scalar("SELECT COUNT(*) FROM api_requests_log").await, 20);
    let allowed_rows = format!(
        "SELECT COUNT(*) FROM api_requests_log WHERE decision = 'allow' AND api_key_id = {id}"
    );
    assert_eq!(db.scalar(&allowed_rows).await, allowed);
    let usage = format!("SELECT total_requests FROM api_usage WHERE api_key_id = {id}");
    assert_eq!(db.scalar(&usage).await, allowed);
    let limited = format!(
        "SELECT COUNT(*) FROM api_requests_log WHERE reason = 'rate_limited' AND status = 429 \
         AND api_key_id = {id}"
    );
    assert_eq!(db.scalar(&limited).await, 10);
    let missing = "SELECT COUNT(*) FROM api_requests_log WHERE reason = 'missing_key' \
         AND status = 401 AND path = '/v1/things' AND method = 'GET' AND request_id = 'req-1'";
    assert_eq!(db.scalar(missing).await, 5);
}

async fn shutdown_finishes_in_flight_checks_and_logs_them(db: Db) {
    let tg = Tollgate::on(db).await;
    let (key, id) = tg.create_key("slow", limits(None, Some(100), None)).await;
    // Another connection takes a lock that makes every quota UPDATE wait.
    let blocker = tg.db.lock_quota_writes().await;
    let c = tg.client().await;
    let in_flight: Vec<_> = (0..10)
        .map(|_| {
            let mut c = c.clone();
            let key = key.clone();
            tokio::spawn(async move { c.check(key_header(&key)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        in_flight.iter().all(|t| !t.is_finished()),
        "checks should be waiting"
    );
    // Shut down while they wait; let the database go a moment later.
    let stopping = tokio::spawn(tg.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocker.release().await;
    for t in in_flight {
        let resp = t
            .await
            .unwrap()
            .expect("in-flight check answered")
            .into_inner();
        assert_eq!(resp.status.unwrap().code, 0);
    }
    let db = stopping.await.unwrap();
    let usage = format!("SELECT daily_requests FROM api_usage WHERE api_key_id = {id}");
    assert_eq!(db.scalar(&usage).await, 10);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM api_requests_log").await, 10);
}

/// Breaks quota writes (the usage table disappears) while the key stays cached.
async fn break_quota_table(tg: &Tollgate) {
    tg.db.execute("DROP TABLE api_usage").await;
}

async fn database_failure_closed_refuses_with_503(db: Db) {
    let tg = Tollgate::on(db).await;
    let (key, _) = tg.create_key("f", limits(None, Some(10), None)).await;
    let mut c = tg.client().await;
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    break_quota_table(&tg).await;
    let d = denied(&c.check(key_header(&key)).await.unwrap().into_inner());
    assert_eq!((d.status, d.grpc_code), (503, 14));
    assert_eq!(d.body["error"], "backend_unavailable");
    assert_eq!(d.headers["retry-after"], "1");
    tg.stop().await;
}

async fn database_failure_open_allows_uncounted_and_says_so_in_metrics(db: Db) {
    let tg = Tollgate::on_with(db, |c| {
        c.database.failure_mode = tollgate::config::FailureMode::Open;
    })
    .await;
    let (key, _) = tg.create_key("f", limits(None, Some(10), None)).await;
    let mut c = tg.client().await;
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    break_quota_table(&tg).await;
    for _ in 0..3 {
        ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    }
    // An unknown key is never let in, whatever the failure mode.
    let stranger = tollgate::keys::generate().plaintext;
    denied(&c.check(key_header(&stranger)).await.unwrap().into_inner());
    let metrics = tg.metrics_text().await;
    assert!(
        metrics.contains("tollgate_fail_open_total{backend=\"database\"} 3\n"),
        "{metrics}"
    );
    tg.stop().await;
}

async fn route_cost_is_spent_whole_or_not_at_all(db: Db) {
    let tg = Tollgate::on(db).await;
    let (key, id) = tg.create_key("c", limits(Some(100), Some(12), None)).await;
    let mut c = tg.client().await;
    let costing = |cost: &str| {
        let mut r = key_header(&key);
        r.attributes
            .as_mut()
            .unwrap()
            .context_extensions
            .insert("cost".into(), cost.into());
        r
    };
    let remaining = |resp: &envoy_types::pb::envoy::service::auth::v3::CheckResponse| {
        headers_of(&ok(resp).response_headers_to_add)["x-ratelimit-remaining"].clone()
    };
    let r = c.check(costing("5")).await.unwrap().into_inner();
    assert_eq!(remaining(&r), "7");
    let r = c.check(costing(" 5 ")).await.unwrap().into_inner();
    assert_eq!(remaining(&r), "2");
    // 5 does not fit in the 2 left: nothing is spent, the per-minute hits are given back.
    let d = denied(&c.check(costing("5")).await.unwrap().into_inner());
    assert_eq!(d.body["error"], "daily_quota_exceeded");
    // Cost 0 checks without spending.
    let r = c.check(costing("0")).await.unwrap().into_inner();
    assert_eq!(remaining(&r), "2");
    let h = headers_of(&ok(&r).response_headers_to_add);
    assert!(h["ratelimit-policy"].contains("\"per_minute\";q=100"));
    let r = c.check(costing("2")).await.unwrap().into_inner();
    assert_eq!(remaining(&r), "0");
    let usage = format!("SELECT daily_requests FROM api_usage WHERE api_key_id = {id}");
    assert_eq!(tg.scalar(&usage).await, 12);
    // The per-minute window holds 5 + 5 + 0 + 2: the refused 5 were given back.
    tg.stores
        .keys
        .update(
            id,
            &tollgate::store::KeyUpdate {
                limits: tollgate::store::LimitsPatch {
                    daily: Some(None),
                    ..Default::default()
                },
                ..Default::default()
            },
            t0(),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let h = loop {
        let r = c.check(costing("0")).await.unwrap().into_inner();
        let h = headers_of(&ok(&r).response_headers_to_add);
        if !h["ratelimit-policy"].contains("daily") {
            break h;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "limit change not applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(h["ratelimit"], r#""per_minute";r=88;t=40"#);
    // A route configured with nonsense gets a clear 500, never a guess.
    for bad in ["abc", "-1", "1.5", "2000000"] {
        let d = denied(&c.check(costing(bad)).await.unwrap().into_inner());
        assert_eq!((d.status, d.grpc_code), (500, 13), "{bad}");
        assert_eq!(d.body["error"], "invalid_cost");
    }
    tg.stop().await;
}

async fn usage_command_reports_days_and_top_keys_from_the_log(db: Db) {
    let tg = Tollgate::on(db).await;
    let (busy, busy_id) = tg.create_key("busy", limits(None, Some(3), None)).await;
    let (quiet, quiet_id) = tg.create_key("quiet", Limits::default()).await;
    let mut c = tg.client().await;
    // 2026-03-10: busy 3 allowed + 1 over its quota, quiet 1, one request without a key.
    for _ in 0..4 {
        c.check(key_header(&busy)).await.unwrap();
    }
    c.check(key_header(&quiet)).await.unwrap();
    c.check(check_request(&[])).await.unwrap();
    // 2026-03-11: busy 2 more.
    tg.clock.set("2026-03-11T08:00:00Z".parse().unwrap());
    for _ in 0..2 {
        c.check(key_header(&busy)).await.unwrap();
    }
    let url = tg.db_url.clone();
    let dir = tempfile::tempdir().unwrap();
    let db = tg.stop().await;
    let usage = |args: &[&str]| {
        let out = tollgate_command(dir.path())
            .arg("usage")
            .args(args)
            .env("TOLLGATE_DATABASE_URL", &url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let v: serde_json::Value = serde_json::from_str(&usage(&[
        "--since",
        "2026-03-10",
        "--until",
        "2026-03-11",
        "--json",
    ]))
    .unwrap();
    assert_eq!(
        v["days"],
        serde_json::json!([
            {"day": "2026-03-10", "allowed": 4, "denied": 2},
            {"day": "2026-03-11", "allowed": 2, "denied": 0},
        ])
    );
    assert_eq!(
        v["top_keys"],
        serde_json::json!([
            {"id": busy_id, "name": "busy", "allowed": 5, "denied": 1},
            {"id": quiet_id, "name": "quiet", "allowed": 1, "denied": 0},
        ])
    );
    // One key, one day; and the text form.
    let v: serde_json::Value = serde_json::from_str(&usage(&[
        "--since",
        "2026-03-11",
        "--until",
        "2026-03-11",
        "--key",
        &quiet_id.to_string(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["days"], serde_json::json!([]));
    let text = usage(&[
        "--since",
        "2026-03-10",
        "--until",
        "2026-03-11",
        "--top",
        "1",
    ]);
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert!(lines.contains(&"2026-03-10 4 2 6".to_string()), "{text}");
    assert!(lines.contains(&"total 6 2 8".to_string()), "{text}");
    assert!(
        text.contains("Top keys:") && text.contains("busy") && !text.contains("quiet"),
        "{text}"
    );
    drop(db);
}

async fn a_5xx_answer_gives_the_quota_back_for_keys_that_ask(db: Db) {
    use tollgate::store::{LogApi, LogRow, Outcome, Quota, QuotaOutcome, Spend};
    let tg = Tollgate::on(db).await;
    let refunding = Limits {
        daily: Some(5),
        monthly: Some(50),
        refund_5xx: true,
        ..Limits::default()
    };
    let (_, id) = tg.create_key("refunds", refunding).await;
    let (_, plain) = tg.create_key("plain", limits(None, Some(5), None)).await;
    let now = t0();
    let quota = Quota {
        daily: Some(5),
        monthly: Some(50),
    };
    let mut rows = Vec::new();
    for (key, rid, cost) in [(id, "a", 2), (id, "b", 1), (id, "c", 1), (plain, "d", 1)] {
        let spent = tg
            .stores
            .quotas
            .consume(Spend::new(key, cost, now), quota)
            .await
            .unwrap();
        assert!(matches!(spent, QuotaOutcome::Admitted { .. }));
        rows.push(LogRow {
            ts: now,
            api: LogApi::Authz,
            request_id: Some(rid.into()),
            decision_id: Some(rid.into()),
            key_id: Some(key),
            method: None,
            path: None,
            host: None,
            client_addr: None,
            allowed: true,
            reason: "ok",
            status: 200,
            cost,
            key_prefix: None,
            identity_id: None,
        });
    }
    tg.stores.log.write_batch(&rows).await.unwrap();
    let outcome = |rid: &str, status: u16| Outcome {
        decision_id: rid.into(),
        status,
        duration_ms: Some(3),
        bytes_received: 10,
        bytes_sent: 20,
    };
    let (found, refunded) = tg
        .stores
        .log
        .complete(&[
            outcome("a", 503),
            outcome("b", 200),
            outcome("c", 502),
            outcome("d", 500),
            outcome("nope", 500),
        ])
        .await
        .unwrap();
    assert_eq!(found, [true, true, true, true, false]);
    assert_eq!(refunded, 2, "a and c; d's key does not ask for refunds");
    let usage = tg.stores.quotas.usage(id, now).await.unwrap();
    assert_eq!((usage.daily, usage.monthly, usage.total), (1, 1, 1));
    assert_eq!(tg.stores.quotas.usage(plain, now).await.unwrap().daily, 1);
    // The log says which rows were given back: allowed - refunded = usage.
    let given_back = format!(
        "SELECT CAST(COALESCE(SUM(cost), 0) AS BIGINT) FROM api_requests_log \
         WHERE api_key_id = {id} AND refunded"
    );
    assert_eq!(tg.scalar(&given_back).await, 3);
    // A row is completed once: the same outcome again refunds nothing.
    let (_, again) = tg.stores.log.complete(&[outcome("a", 503)]).await.unwrap();
    assert_eq!(again, 0);
    tg.stop().await;
}

/// The decision id tollgate put in a Check answer's dynamic metadata.
fn decision_id_of(resp: &CheckResponse) -> String {
    let meta = resp.dynamic_metadata.as_ref().expect("dynamic metadata");
    match meta.fields.get("decision_id").and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(s)) => s.clone(),
        other => panic!("decision_id: {other:?}"),
    }
}

/// An access log entry as Envoy's gRPC access logger sends it: the client's request id, the
/// status, and, when given, a decision id in the ext_authz filter's dynamic metadata.
fn access_log_entry(
    request_id: &str,
    decision_id: Option<&str>,
    status: u32,
) -> HttpAccessLogEntry {
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::envoy::data::accesslog::v3::{
        AccessLogCommon, HttpRequestProperties, HttpResponseProperties,
    };
    use envoy_types::pb::google::protobuf::{Struct, UInt32Value, Value};
    let metadata = decision_id.map(|id| Metadata {
        filter_metadata: [(
            "envoy.filters.http.ext_authz".to_string(),
            Struct {
                fields: [(
                    "decision_id".to_string(),
                    Value {
                        kind: Some(Kind::StringValue(id.into())),
                    },
                )]
                .into(),
            },
        )]
        .into(),
        ..Default::default()
    });
    HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            metadata,
            ..Default::default()
        }),
        request: Some(HttpRequestProperties {
            request_id: request_id.into(),
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: status }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Streams `entries` to tollgate's access log service in one message.
async fn send_access_log(tg: &Tollgate, entries: Vec<HttpAccessLogEntry>) {
    use envoy_types::pb::envoy::service::accesslog::v3::{
        StreamAccessLogsMessage,
        access_log_service_client::AccessLogServiceClient,
        stream_access_logs_message::{HttpAccessLogEntries, LogEntries},
    };
    let message = StreamAccessLogsMessage {
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: entries,
        })),
        ..Default::default()
    };
    let mut c = AccessLogServiceClient::connect(format!("http://{}", tg.grpc))
        .await
        .expect("connects");
    c.stream_access_logs(futures_util::stream::iter([message]))
        .await
        .unwrap();
}

/// A client with `refund_5xx` sends ten allowed requests under one `x-request-id`, then access
/// log entries saying that request id failed, as a forger reaching the access log port would:
/// no row is completed and nothing is refunded. Neither is a made-up decision id.
async fn access_log_entries_with_a_clients_request_id_refund_nothing(db: Db) {
    let tg = Tollgate::on(db).await;
    let refunding = Limits {
        daily: Some(100),
        refund_5xx: true,
        ..Limits::default()
    };
    let (key, id) = tg.create_key("forger", refunding).await;
    let mut c = tg.client().await;
    for _ in 0..10 {
        let request = check_request(&[("x-api-key", &key), ("x-request-id", "forged")]);
        ok(&c.check(request).await.unwrap().into_inner());
    }
    tg.wait_for_count(
        "SELECT count(*) FROM api_requests_log WHERE request_id = 'forged'",
        10,
    )
    .await;
    // One fast 500 first, then the ten slow 200s.
    let mut forged = vec![access_log_entry("forged", None, 500)];
    forged.extend((0..10).map(|_| access_log_entry("forged", None, 200)));
    // The request id in the metadata field, and a well-formed id tollgate never minted.
    forged.push(access_log_entry("forged", Some("forged"), 500));
    forged.push(access_log_entry(
        "forged",
        Some("0000000000010123456789abcdef0123"),
        500,
    ));
    send_access_log(&tg, forged).await;
    let metrics = tg.metrics.clone();
    let started = Instant::now();
    while metrics.access_log_unmatched.get() + metrics.access_log_completed.get() < 13 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "entries not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metrics.access_log_completed.get(), 0);
    assert_eq!(metrics.quota_refunds.get(), 0);
    assert_eq!(tg.stores.quotas.usage(id, t0()).await.unwrap().daily, 10);
    assert_eq!(
        tg.scalar(
            "SELECT count(*) FROM api_requests_log WHERE response_status IS NOT NULL OR refunded"
        )
        .await,
        0
    );
    tg.stop().await;
    assert_eq!(metrics.access_log_unmatched.get(), 13);
}

/// The real flow: each Check answer carries its own minted id; an access log entry with that
/// id completes that one row, and a 5xx refunds it, once: the same entry again does nothing.
async fn the_minted_decision_id_completes_and_refunds_its_row_once(db: Db) {
    let tg = Tollgate::on(db).await;
    let refunding = Limits {
        daily: Some(100),
        refund_5xx: true,
        ..Limits::default()
    };
    let (key, id) = tg.create_key("refunds", refunding).await;
    let mut c = tg.client().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let request = check_request(&[("x-api-key", &key), ("x-request-id", "shared")]);
        let resp = c.check(request).await.unwrap().into_inner();
        ok(&resp);
        ids.push(decision_id_of(&resp));
    }
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
        "{ids:?}"
    );
    // A denied answer carries one too, so its row can be completed.
    let denied_id = decision_id_of(&c.check(check_request(&[])).await.unwrap().into_inner());
    assert!(!ids.contains(&denied_id));
    tg.wait_for_count("SELECT count(*) FROM api_requests_log", 4)
        .await;
    send_access_log(&tg, vec![access_log_entry("shared", Some(&ids[1]), 503)]).await;
    tg.wait_for_count("SELECT count(*) FROM api_requests_log WHERE refunded", 1)
        .await;
    let refunded_id = format!(
        "SELECT count(*) FROM api_requests_log WHERE refunded AND response_status = 503 \
         AND decision_id = '{}'",
        ids[1]
    );
    assert_eq!(tg.scalar(&refunded_id).await, 1);
    assert_eq!(tg.stores.quotas.usage(id, t0()).await.unwrap().daily, 2);
    // Again: the row is completed already, so nothing more comes back.
    send_access_log(&tg, vec![access_log_entry("shared", Some(&ids[1]), 503)]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(tg.stores.quotas.usage(id, t0()).await.unwrap().daily, 2);
    assert_eq!(
        tg.scalar("SELECT count(*) FROM api_requests_log WHERE response_status IS NOT NULL")
            .await,
        1
    );
    let metrics = tg.metrics.clone();
    tg.stop().await;
    assert_eq!(metrics.quota_refunds.get(), 1);
    assert_eq!(metrics.access_log_completed.get(), 1);
    assert_eq!(metrics.access_log_unmatched.get(), 1);
}

/// Quota requests for several keys at once, as many tasks: the store may run them together (the
/// SQLite writer batches them), and each must still be answered as if it ran alone.
async fn concurrent_quota_requests_on_many_keys_are_each_answered_exactly(db: Db) {
    use std::collections::HashMap;
    use tollgate::store::{Quota, QuotaOutcome, Spend};
    let tg = Tollgate::on(db).await;
    let (_, daily) = tg
        .create_key("daily", limits(None, Some(30), Some(1000)))
        .await;
    let (_, monthly) = tg
        .create_key("monthly", limits(None, Some(1000), Some(20)))
        .await;
    let (_, costly) = tg.create_key("costly", limits(None, Some(10), None)).await;
    // A key inserted by hand, in SQL: the database gives it its usage row too.
    tg.db
        .execute(
            "INSERT INTO api_keys (name, prefix, key_hash, status, created_at, updated_at) \
             VALUES ('by_hand', 'tg_byhand1', 'by-hand', 'active', '2026-03-10T00:00:00Z', \
               '2026-03-10T00:00:00Z')",
        )
        .await;
    let by_hand = tg
        .scalar("SELECT id FROM api_keys WHERE key_hash = 'by-hand'")
        .await;
    let requests = [
        (daily, Some(30), Some(1000), 1),
        (monthly, Some(1000), Some(20), 1),
        (costly, Some(10), None, 3),
        (by_hand, Some(5), None, 1),
    ];
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let (key, d, m, cost) = requests[i % requests.len()];
            let quotas = tg.stores.quotas.clone();
            tokio::spawn(async move {
                let quota = Quota {
                    daily: d,
                    monthly: m,
                };
                (
                    key,
                    quotas
                        .consume(Spend::new(key, cost, t0()), quota)
                        .await
                        .unwrap(),
                )
            })
        })
        .collect();
    let mut admitted: HashMap<i64, u64> = HashMap::new();
    for t in tasks {
        let (key, outcome) = t.await.unwrap();
        match (key, outcome) {
            (_, QuotaOutcome::Admitted { .. }) => *admitted.entry(key).or_default() += 1,
            (k, QuotaOutcome::DailyExceeded { used }) if k == daily => assert_eq!(used, 30),
            (k, QuotaOutcome::MonthlyExceeded { used }) if k == monthly => assert_eq!(used, 20),
            (k, QuotaOutcome::DailyExceeded { used }) if k == costly => assert_eq!(used, 9),
            (k, QuotaOutcome::DailyExceeded { used }) if k == by_hand => assert_eq!(used, 5),
            (k, other) => panic!("key {k}: unexpected {other:?}"),
        }
    }
    assert_eq!(admitted[&daily], 30);
    assert_eq!(admitted[&monthly], 20);
    assert_eq!(admitted[&costly], 3, "3 requests of cost 3 fit in 10");
    assert_eq!(admitted[&by_hand], 5);
    for (key, spent) in [(daily, 30), (monthly, 20), (costly, 9), (by_hand, 5)] {
        let usage = tg.stores.quotas.usage(key, t0()).await.unwrap();
        assert_eq!((usage.daily, usage.total), (spent, spent), "key {key}");
    }
    tg.stop().await;
}

/// The value of one sample line (`name{labels}`) in a `/metrics` text.
fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

/// Past `cache.max_unknown` unknown keys, the oldest are forgotten and the newest still
/// remembered: a repeated unknown key costs one lookup, however many came before it.
async fn past_the_cache_capacity_a_repeated_unknown_key_costs_one_lookup(db: Db) {
    let tg = Tollgate::on_with(db, |c| c.cache.max_unknown = 100).await;
    let (key, _) = tg.create_key("k", limits(None, None, None)).await;
    let mut c = tg.client().await;
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    for _ in 0..120 {
        let stranger = tollgate::keys::generate().plaintext;
        let d = denied(&c.check(key_header(&stranger)).await.unwrap().into_inner());
        assert_eq!(d.body["error"], "invalid_key");
    }
    let miss = "tollgate_key_cache_lookups_total{outcome=\"miss\"}";
    let before = sample(&tg.metrics_text().await, miss);
    let one_more = tollgate::keys::generate().plaintext;
    for _ in 0..200 {
        let d = denied(&c.check(key_header(&one_more)).await.unwrap().into_inner());
        assert_eq!(d.body["error"], "invalid_key");
    }
    let metrics = tg.metrics_text().await;
    assert_eq!(sample(&metrics, miss) - before, 1, "{metrics}");
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    let metrics = tg.metrics_text().await;
    assert_eq!(sample(&metrics, "tollgate_key_cache_entries"), 101);
    assert!(sample(&metrics, "tollgate_key_cache_evictions_total") >= 21);
    tg.stop().await;
}

/// Envoy gives up on a Check at its timeout (the `grpc-timeout` it sends) and when its client
/// goes away (it resets the stream); either way tollgate drops the check. With the usage row
/// locked for 1.5 s, 20 checks given up at 50 ms (10 each way), then 5 that wait: only what was
/// answered is charged, whichever way quota is counted (`limits`: a daily quota is spent
/// exactly, a key without quotas in blocks), and usage matches the allowed rows.
async fn checks_given_up_on_are_not_charged(db: Db, limits: Limits) {
    let tg = Tollgate::on_with(db, |c| {
        c.database.timeout = tollgate::config::Dur(Duration::from_secs(5));
    })
    .await;
    let (key, id) = tg.create_key("impatient", limits).await;
    let c = tg.client().await;
    let lock = tg.db.lock_quota_writes().await;
    let locked = Instant::now();
    // Long enough for the key's first lookup (a new database connection) on a busy machine, so
    // the checks know their key when they are given up on; far shorter than the lock.
    const GIVE_UP: Duration = Duration::from_millis(300);
    let mut given_up = Vec::new();
    for i in 0..20 {
        let (mut c, key) = (c.clone(), key.clone());
        given_up.push(tokio::spawn(async move {
            let mut req = tonic::Request::new(key_header(&key));
            if i % 2 == 0 {
                // Envoy's timeout, as the header tells the server.
                req.set_timeout(GIVE_UP);
                c.check(req).await.map(|_| ())
            } else {
                // A caller that goes away: the stream is reset.
                match tokio::time::timeout(GIVE_UP, c.check(req)).await {
                    Ok(answer) => answer.map(|_| ()),
                    Err(_) => Err(tonic::Status::cancelled("gave up")),
                }
            }
        }));
    }
    for t in given_up {
        assert!(
            t.await.unwrap().is_err(),
            "a check answered while the row was locked"
        );
    }
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(locked.elapsed())).await;
    lock.release().await;
    for _ in 0..5 {
        ok(&c
            .clone()
            .check(key_header(&key))
            .await
            .unwrap()
            .into_inner());
    }
    let metrics = tg.metrics.clone();
    let db = tg.stop().await;
    let allowed = db
        .scalar(&format!(
            "SELECT CAST(COALESCE(SUM(cost), 0) AS BIGINT) FROM api_requests_log \
             WHERE api_key_id = {id} AND decision = 'allow'"
        ))
        .await;
    let usage = db
        .scalar(&format!(
            "SELECT total_requests FROM api_usage WHERE api_key_id = {id}"
        ))
        .await;
    assert_eq!(allowed, 5, "the checks that waited");
    assert_eq!(usage, allowed, "usage counts only the checks answered");
    let daily = db
        .scalar(&format!(
            "SELECT daily_requests FROM api_usage WHERE api_key_id = {id}"
        ))
        .await;
    assert_eq!(daily, 5);
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM api_requests_log WHERE api_key_id = {id} \
             AND reason = 'cancelled' AND decision = 'deny' AND status = 499"
        ))
        .await,
        20,
        "each check given up on has its row"
    );
    assert_eq!(metrics.checks_cancelled.get(), 20);
}

async fn checks_given_up_on_spend_no_exact_quota(db: Db) {
    checks_given_up_on_are_not_charged(db, limits(None, Some(1000), None)).await;
}

async fn checks_given_up_on_leak_no_reserved_block(db: Db) {
    // No quota: counted in blocks reserved from the database.
    checks_given_up_on_are_not_charged(db, Limits::default()).await;
}

/// A per-minute hit counted for a check that is then given up on is given back too.
async fn a_check_given_up_on_gives_its_per_minute_hit_back(db: Db) {
    let tg = Tollgate::on_with(db, |c| {
        c.database.timeout = tollgate::config::Dur(Duration::from_secs(5));
    })
    .await;
    let (key, _) = tg
        .create_key("minute", limits(Some(3), Some(1000), None))
        .await;
    let c = tg.client().await;
    let lock = tg.db.lock_quota_writes().await;
    for _ in 0..3 {
        let mut req = tonic::Request::new(key_header(&key));
        req.set_timeout(Duration::from_millis(50));
        assert!(c.clone().check(req).await.is_err());
    }
    lock.release().await;
    // The three hits went back: the minute still has room for three.
    for _ in 0..3 {
        ok(&c
            .clone()
            .check(key_header(&key))
            .await
            .unwrap()
            .into_inner());
    }
    let d = denied(
        &c.clone()
            .check(key_header(&key))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(d.body["error"], "rate_limited");
    tg.stop().await;
}

every_database!(
    checks_given_up_on_spend_no_exact_quota,
    checks_given_up_on_leak_no_reserved_block,
    a_check_given_up_on_gives_its_per_minute_hit_back,
    access_log_entries_with_a_clients_request_id_refund_nothing,
    the_minted_decision_id_completes_and_refunds_its_row_once,
    past_the_cache_capacity_a_repeated_unknown_key_costs_one_lookup,
    concurrent_quota_requests_on_many_keys_are_each_answered_exactly,
    a_5xx_answer_gives_the_quota_back_for_keys_that_ask,
    usage_command_reports_days_and_top_keys_from_the_log,
    route_cost_is_spent_whole_or_not_at_all,
    missing_key_is_401_with_www_authenticate_and_problem_body,
    unknown_and_malformed_keys_are_401_invalid_key,
    allowed_request_carries_key_id_headers_and_metadata,
    bearer_token_works_and_hide_credentials_removes_the_header_used,
    configured_key_headers_are_used_in_order,
    revoked_key_is_403_on_the_running_server_within_a_second,
    key_created_by_the_cli_works_on_the_running_server_within_a_second,
    expired_key_is_403,
    per_minute_limit_is_429_with_retry_after_until_the_window_turns,
    default_per_minute_applies_to_keys_without_their_own,
    daily_quota_is_429_until_utc_midnight_and_the_next_day_starts_from_zero,
    monthly_quota_is_429_until_the_first_and_the_new_month_starts_from_zero,
    monthly_is_reported_when_both_quotas_are_spent,
    limit_changes_reach_the_running_server,
    two_hundred_concurrent_checks_on_a_daily_limit_of_50_admit_exactly_50,
    two_keys_of_one_identity_share_its_daily_limit_exactly,
    a_refusal_names_the_key_or_the_identity_and_headers_show_the_closest,
    an_identitys_per_minute_limit_is_shared_and_hit_with_the_keys_own,
    a_5xx_refund_gives_back_to_the_identity_too,
    hostile_requests_get_well_formed_answers,
    every_check_is_logged_and_allowed_rows_match_usage_after_shutdown,
    shutdown_finishes_in_flight_checks_and_logs_them,
    database_failure_closed_refuses_with_503,
    database_failure_open_allows_uncounted_and_says_so_in_metrics,
);

/// A full log queue drops rows but counts every one: written + dropped = checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_queue_counts_what_it_drops() {
    let tg = Tollgate::start_with(|c| {
        c.request_log.queue_capacity = 2;
        c.request_log.batch_size = 1;
    })
    .await;
    // Hold SQLite's write lock: the log writer waits, the queue fills. Checks without a key
    // need no write, so they are still answered.
    let blocker = tg.db.lock_quota_writes().await;
    let mut c = tg.client().await;
    for _ in 0..20 {
        let d = denied(&c.check(check_request(&[])).await.unwrap().into_inner());
        assert_eq!(d.body["error"], "missing_key");
    }
    let metrics = tg.metrics.clone();
    assert!(
        metrics.reqlog_dropped.get() >= 16,
        "dropped {}",
        metrics.reqlog_dropped.get()
    );
    blocker.release().await;
    let db = tg.stop().await;
    let written = db.scalar("SELECT count(*) FROM api_requests_log").await;
    assert_eq!(written + metrics.reqlog_dropped.get() as i64, 20);
    assert_eq!(metrics.reqlog_written.get() as i64, written);
}

/// `tollgate identities create --json` on the instance's database; returns the identity's id.
fn cli_create_identity(tg: &Tollgate, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["identities", "create", "--json"];
    all.extend_from_slice(args);
    let out = tg.cli(&all);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Two keys of one identity with a daily limit of 50, 200 concurrent Checks spread over both:
/// exactly 50 pass, the identity's counter, the keys' counters and the log agree, and a refusal
/// names the identity's limit.
async fn two_keys_of_one_identity_share_its_daily_limit_exactly(db: Db) {
    let tg = Tollgate::on(db).await;
    let identity = cli_create_identity(&tg, &["--name", "acme", "--daily", "50"]);
    assert_eq!(identity["name"], "acme");
    assert_eq!(identity["daily"], 50);
    assert!(identity["per_minute"].is_null() && identity["monthly"].is_null());
    let identity_id = identity["id"].as_i64().unwrap();
    let id_arg = identity_id.to_string();
    let (a, a_id) = cli_create_key(
        tg.dir.path(),
        &tg.db_url,
        &["--name", "a", "--identity", &id_arg, "--daily", "1000"],
    );
    let (b, b_id) = cli_create_key(
        tg.dir.path(),
        &tg.db_url,
        &["--name", "b", "--identity", &id_arg],
    );
    let c = tg.client().await;
    let keys = [a.clone(), b.clone()];
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let mut c = c.clone();
            let key = keys[i % 2].clone();
            tokio::spawn(async move { c.check(key_header(&key)).await.unwrap().into_inner() })
        })
        .collect();
    let mut allowed = 0;
    let mut refusal = None;
    for t in tasks {
        let resp = t.await.unwrap();
        if resp.status.as_ref().unwrap().code == 0 {
            allowed += 1;
            let meta = resp.dynamic_metadata.expect("dynamic metadata");
            match &meta.fields["identity_id"].kind {
                Some(Kind::StringValue(s)) => assert_eq!(s, &id_arg),
                other => panic!("identity_id: {other:?}"),
            }
        } else {
            refusal = Some(denied(&resp));
        }
    }
    assert_eq!(allowed, 50);
    let d = refusal.expect("refused some");
    assert_eq!(d.status, 429);
    assert_eq!(d.body["error"], "daily_quota_exceeded");
    assert_eq!(d.body["limit_scope"], "identity");
    assert_eq!(d.body["limit"]["limit"], 50);
    assert!(d.headers["retry-after"].parse::<u64>().unwrap() > 0);
    let stopped = tg.stop().await;
    let shared =
        format!("SELECT daily_requests FROM identity_usage WHERE identity_id = {identity_id}");
    assert_eq!(stopped.scalar(&shared).await, 50);
    let keys_sum = format!(
        "SELECT CAST(SUM(daily_requests) AS BIGINT) FROM api_usage WHERE api_key_id IN ({a_id}, {b_id})"
    );
    assert_eq!(stopped.scalar(&keys_sum).await, 50);
    let logged = format!(
        "SELECT count(*) FROM api_requests_log WHERE api_key_id IN ({a_id}, {b_id}) \
         AND decision = 'allow'"
    );
    assert_eq!(stopped.scalar(&logged).await, 50);
}

/// A key's own limit and its identity's: the refusal names whichever had no room, and the
/// rate-limit headers describe the limit closest to exhaustion of all of them.
async fn a_refusal_names_the_key_or_the_identity_and_headers_show_the_closest(db: Db) {
    let tg = Tollgate::on(db).await;
    let identity = cli_create_identity(&tg, &["--name", "acme", "--daily", "5"]);
    let id_arg = identity["id"].as_i64().unwrap().to_string();
    let (a, _) = cli_create_key(
        tg.dir.path(),
        &tg.db_url,
        &["--name", "a", "--identity", &id_arg, "--daily", "2"],
    );
    let (b, _) = cli_create_key(
        tg.dir.path(),
        &tg.db_url,
        &["--name", "b", "--identity", &id_arg, "--daily", "100"],
    );
    let mut c = tg.client().await;
    // a: its own 2 run out first (key 1 left of 2, identity 4 left of 5: the key is closer).
    let resp = c.check(key_header(&a)).await.unwrap().into_inner();
    let h = headers_of(&ok(&resp).response_headers_to_add);
    assert_eq!(h["x-ratelimit-limit"], "2", "{h:?}");
    assert_eq!(h["x-ratelimit-remaining"], "1");
    assert!(
        h["ratelimit-policy"].contains("\"identity_daily\";q=5"),
        "{h:?}"
    );
    assert_eq!(
        c.check(key_header(&a))
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
            .code,
        0
    );
    let d = denied(&c.check(key_header(&a)).await.unwrap().into_inner());
    assert_eq!(d.body["error"], "daily_quota_exceeded");
    assert_eq!(d.body["limit_scope"], "key");
    assert_eq!(d.body["limit"]["limit"], 2);
    // b: the identity has 3 left; its headers describe the identity's limit (closest).
    let resp = c.check(key_header(&b)).await.unwrap().into_inner();
    let h = headers_of(&ok(&resp).response_headers_to_add);
    assert_eq!(h["x-ratelimit-limit"], "5", "{h:?}");
    assert_eq!(h["x-ratelimit-remaining"], "2");
    assert!(
        h["ratelimit"].starts_with("\"identity_daily\";r=2"),
        "{h:?}"
    );
    for _ in 0..2 {
        assert_eq!(
            c.check(key_header(&b))
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap()
                .code,
            0
        );
    }
    let d = denied(&c.check(key_header(&b)).await.unwrap().into_inner());
    assert_eq!(d.body["error"], "daily_quota_exceeded");
    assert_eq!(d.body["limit_scope"], "identity");
    assert_eq!(d.body["limit"]["limit"], 5);
    assert!(d.headers.contains_key("retry-after"));
    // Raising the identity's limit reaches the running server within a second.
    let out = tg.cli(&["identities", "set-limits", &id_arg, "--daily", "6"]);
    assert!(out.status.success(), "{out:?}");
    let started = Instant::now();
    while c
        .check(key_header(&b))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .code
        != 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "identity limit change not applied within 1s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tg.stop().await;
}

/// An identity's per-minute limit is shared by its keys, and a key's own per-minute window and
/// its identity's are hit both or neither: a request the key's own window refuses leaves the
/// identity's room untouched.
async fn an_identitys_per_minute_limit_is_shared_and_hit_with_the_keys_own(db: Db) {
    let tg = Tollgate::on(db).await;
    let identity = cli_create_identity(&tg, &["--name", "acme", "--per-minute", "5"]);
    assert_eq!(identity["per_minute"], 5);
    let id_arg = identity["id"].as_i64().unwrap().to_string();
    let (a, _) = cli_create_key(
        tg.dir.path(),
        &tg.db_url,
        &["--name", "a", "--identity", &id_arg, "--per-minute", "2"],
    );
    let (b, _) = cli_create_key(
        tg.dir.path(),
        &tg.db_url,
        &["--name", "b", "--identity", &id_arg, "--per-minute", "100"],
    );
    let mut c = tg.client().await;
    for _ in 0..2 {
        assert_eq!(
            c.check(key_header(&a))
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap()
                .code,
            0
        );
    }
    // a's own window is full: refused by the key's limit, and the identity's window not hit.
    let d = denied(&c.check(key_header(&a)).await.unwrap().into_inner());
    assert_eq!(d.body["error"], "rate_limited");
    assert_eq!(d.body["limit_scope"], "key");
    assert_eq!(d.body["limit"]["limit"], 2);
    // b has the identity's 3 left, concurrently: exactly 3 pass, the rest name the identity.
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let mut c = c.clone();
            let key = b.clone();
            tokio::spawn(async move { c.check(key_header(&key)).await.unwrap().into_inner() })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        let resp = t.await.unwrap();
        if resp.status.as_ref().unwrap().code == 0 {
            allowed += 1;
        } else {
            let d = denied(&resp);
            assert_eq!(d.body["error"], "rate_limited");
            assert_eq!(d.body["limit_scope"], "identity");
            assert_eq!(d.body["limit"]["limit"], 5);
            assert!(d.headers.contains_key("retry-after"));
        }
    }
    assert_eq!(allowed, 3);
    tg.stop().await;
}

/// A 5xx refund of a key of an identity goes back to the identity's counters too, so they and
/// the keys' counters keep agreeing with the log.
async fn a_5xx_refund_gives_back_to_the_identity_too(db: Db) {
    use tollgate::store::{IdentityLimitsPatch, LogApi, LogRow, Outcome, Quota, Spend};
    let tg = Tollgate::on(db).await;
    let identity = tg
        .stores
        .identities
        .create_identity(
            "acme",
            IdentityLimitsPatch {
                daily: Some(Some(10)),
                ..Default::default()
            },
            t0(),
        )
        .await
        .unwrap();
    let out = tg.cli(&[
        "keys",
        "create",
        "--json",
        "--name",
        "r",
        "--refund-5xx",
        "true",
        "--identity",
        &identity.id.to_string(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let key_id = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"]
        .as_i64()
        .unwrap();
    let now = t0();
    let shared = Quota {
        daily: Some(10),
        monthly: None,
    };
    let spent = tg
        .stores
        .quotas
        .consume_shared(
            Spend::new(key_id, 3, now).with_identity(identity.id),
            Quota::default(),
            shared,
        )
        .await
        .unwrap();
    assert!(spent.admitted(), "{spent:?}");
    tg.stores
        .log
        .write_batch(&[LogRow {
            ts: now,
            api: LogApi::Authz,
            request_id: None,
            decision_id: Some("x".into()),
            key_id: Some(key_id),
            method: None,
            path: None,
            host: None,
            client_addr: None,
            allowed: true,
            reason: "ok",
            status: 200,
            cost: 3,
            key_prefix: None,
            identity_id: None,
        }])
        .await
        .unwrap();
    let (_, refunded) = tg
        .stores
        .log
        .complete(&[Outcome {
            decision_id: "x".into(),
            status: 503,
            duration_ms: None,
            bytes_received: 0,
            bytes_sent: 0,
        }])
        .await
        .unwrap();
    assert_eq!(refunded, 1);
    let usage = tg.stores.quotas.usage(key_id, now).await.unwrap();
    let shared_usage = tg
        .stores
        .quotas
        .identity_usage(identity.id, now)
        .await
        .unwrap();
    assert_eq!((usage.daily, usage.total), (0, 0));
    assert_eq!((shared_usage.daily, shared_usage.total), (0, 0));
    tg.stop().await;
}
