//! The admin API's REST side, through a real tollgate on SQLite and on PostgreSQL: every
//! operation and every error, as a portal would meet them, and what Check makes of the keys.

use std::time::{Duration, Instant};

use harness::admin::{Rest, TOKEN, with_admin};
use harness::check::key_header;
use harness::db::Db;
use harness::every_database;
use harness::server::{Tollgate, t0};
use serde_json::{Value, json};

async fn start(db: Db) -> (Tollgate, Rest) {
    let tg = Tollgate::on_with(db, |c| with_admin(c, &[TOKEN])).await;
    let rest = Rest::new(tg.admin.expect("admin port"), Some(TOKEN));
    (tg, rest)
}

/// Creates a key; returns (secret, id, the whole answer).
async fn create(rest: &Rest, body: Value) -> (String, String, Value) {
    let a = rest.call("POST", "/v1/keys", Some(body)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.content_type, "application/json");
    let secret = a.body["secret"].as_str().unwrap().to_string();
    let id = a.body["key"]["id"].as_str().unwrap().to_string();
    (secret, id, a.body)
}

/// The Check answer's gRPC code for this key (0 allowed, 7 denied 403, 16 denied 401, …).
async fn check_code(tg: &Tollgate, key: &str) -> i32 {
    let mut c = tg.client().await;
    c.check(key_header(key))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .code
}

/// Waits up to a second for Check's answer for `key` to be `want`.
async fn check_becomes(tg: &Tollgate, key: &str, want: i32) {
    let started = Instant::now();
    loop {
        let got = check_code(tg, key).await;
        if got == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "Check still answers {got}, not {want}, after 1s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_problem(a: &harness::admin::Answer, status: u16, error: &str) {
    assert_eq!(a.status, status, "{}", a.text);
    assert_eq!(a.content_type, "application/problem+json", "{}", a.text);
    assert_eq!(a.body["status"], status, "{}", a.text);
    assert_eq!(a.body["error"], error, "{}", a.text);
    assert_eq!(a.body["type"], format!("urn:tollgate:error:{error}"));
    assert!(a.body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    assert_eq!(a.body["detail"], a.body["message"]);
}

async fn rest_create_get_and_use_a_key(db: Db) {
    let (tg, rest) = start(db).await;
    let (secret, id, created) = create(
        &rest,
        json!({
            "name": "  portal customer 42 ",
            "limits": {"perMinute": "5", "daily": 1000, "refund5xx": true},
        }),
    )
    .await;
    assert!(tollgate::keys::is_well_formed(&secret), "{secret}");
    let key = &created["key"];
    assert_eq!(key["name"], "portal customer 42");
    assert_eq!(key["status"], "KEY_STATUS_ACTIVE");
    assert_eq!(key["prefix"], &secret[..11]);
    // proto3 JSON: 64-bit integers as strings, every limit present or absent (unlimited).
    assert_eq!(
        key["limits"],
        json!({"perMinute": "5", "daily": "1000", "refund5xx": true})
    );
    assert_eq!(key["effectivePerMinute"], "5");
    assert!(key.get("expiresAt").is_none());
    // Only the hash is stored.
    let stored = format!(
        "SELECT count(*) FROM api_keys WHERE key_hash = '{}' AND prefix = '{}'",
        harness::admin::sha256_hex(&secret),
        &secret[..11]
    );
    assert_eq!(tg.scalar(&stored).await, 1);
    // Get: the key, never its secret again.
    let got = rest.call("GET", &format!("/v1/keys/{id}"), None).await;
    assert_eq!(got.status, 200);
    assert_eq!(&got.body, key);
    assert!(!got.text.contains(&secret));
    // The key works through Check at once.
    assert_eq!(check_code(&tg, &secret).await, 0);
    // A key that expires.
    let (_, _, expiring) = create(
        &rest,
        json!({"name": "trial", "expiresAt": "2027-01-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(expiring["key"]["expiresAt"], "2027-01-01T00:00:00Z");
    assert_eq!(expiring["key"]["limits"], json!({"refund5xx": false}));
    assert!(expiring["key"].get("effectivePerMinute").is_none());
    tg.stop().await;
}

async fn rest_list_pages_and_filters(db: Db) {
    let (tg, rest) = start(db).await;
    let mut ids = Vec::new();
    for name in ["acme-1", "acme-2", "acme-3", "beta-1", "acme_4", "ACME-5"] {
        ids.push(create(&rest, json!({"name": name})).await.1);
    }
    let (_, expired, _) = create(
        &rest,
        json!({"name": "acme-old", "expiresAt": "2020-01-01T00:00:00Z"}),
    )
    .await;
    let revoked = &ids[1];
    let r = rest
        .call(
            "POST",
            &format!("/v1/keys/{revoked}:revoke"),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.body["status"], "KEY_STATUS_REVOKED");

    // Pages of two, by name prefix (case-sensitive; `_` is no pattern), tokens to the end.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let a = rest
            .call(
                "GET",
                &format!("/v1/keys?namePrefix=acme-&pageSize=2&pageToken={token}"),
                None,
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text);
        pages += 1;
        let keys = a.body["keys"].as_array().unwrap();
        assert!(keys.len() <= 2);
        seen.extend(keys.iter().map(|k| k["name"].as_str().unwrap().to_string()));
        token = a.body["nextPageToken"].as_str().unwrap().to_string();
        if token.is_empty() {
            break;
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(seen, ["acme-1", "acme-2", "acme-3", "acme-old"]);
    assert_eq!(pages, 2);
    // By status, as Check sees it now.
    let names = |a: &harness::admin::Answer| -> Vec<String> {
        a.body["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["id"].as_str().unwrap().to_string())
            .collect()
    };
    let a = rest
        .call("GET", "/v1/keys?status=KEY_STATUS_REVOKED", None)
        .await;
    assert_eq!(names(&a), vec![revoked.to_string()]);
    let a = rest
        .call("GET", "/v1/keys?status=KEY_STATUS_EXPIRED", None)
        .await;
    assert_eq!(names(&a), vec![expired]);
    let a = rest
        .call(
            "GET",
            "/v1/keys?status=KEY_STATUS_ACTIVE&page_size=100",
            None,
        )
        .await;
    assert_eq!(a.body["keys"].as_array().unwrap().len(), 5);
    assert_eq!(a.body["nextPageToken"], "");
    let a = rest.call("GET", "/v1/keys", None).await;
    assert_eq!(a.body["keys"].as_array().unwrap().len(), 7);

    // Bounded and checked.
    for (query, says) in [
        ("pageSize=1001", "page_size"),
        ("pageSize=-1", "page_size"),
        ("pageSize=lots", "pageSize"),
        ("pageToken=p1.1.0000000000000000", "page_token"),
        ("status=KEY_STATUS_GONE", "status"),
        ("colour=red", "unknown query parameter"),
        ("pageSize=1&pageSize=2", "twice"),
        (&format!("namePrefix={}", "x".repeat(201)), "name_prefix"),
        ("namePrefix=%00", "name_prefix"),
    ] {
        let a = rest.call("GET", &format!("/v1/keys?{query}"), None).await;
        assert_problem(&a, 400, "invalid_argument");
        assert!(
            a.body["detail"].as_str().unwrap().contains(says),
            "{query}: {}",
            a.text
        );
    }
    // A token is only good with the filters it came with.
    let a = rest.call("GET", "/v1/keys?pageSize=1", None).await;
    let token = a.body["nextPageToken"].as_str().unwrap().to_string();
    let a = rest
        .call(
            "GET",
            &format!("/v1/keys?pageSize=1&namePrefix=beta&pageToken={token}"),
            None,
        )
        .await;
    assert_problem(&a, 400, "invalid_argument");
    tg.stop().await;
}

async fn rest_update_is_all_or_nothing_and_reaches_check(db: Db) {
    let (tg, rest) = start(db).await;
    let (secret, id, _) = create(
        &rest,
        json!({"name": "metered", "limits": {"daily": "1", "monthly": "100"}}),
    )
    .await;
    let path = format!("/v1/keys/{id}");
    assert_eq!(check_code(&tg, &secret).await, 0);
    assert_eq!(
        check_code(&tg, &secret).await,
        8,
        "the daily limit of 1 holds"
    );
    // Without a mask: what is present changes.
    let a = rest
        .call("PATCH", &path, Some(json!({"limits": {"daily": "3"}})))
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        a.body["limits"],
        json!({"daily": "3", "monthly": "100", "refund5xx": false})
    );
    check_becomes(&tg, &secret, 0).await;
    // With a mask: a named limit left out becomes unlimited; the name changes too.
    let a = rest
        .call(
            "PATCH",
            &path,
            Some(json!({
                "name": "metered-gold",
                "expiresAt": "2030-01-01T00:00:00Z",
                "updateMask": "name,limits.daily,limits.monthly,expiresAt",
            })),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["name"], "metered-gold");
    assert_eq!(a.body["limits"], json!({"refund5xx": false}));
    assert_eq!(a.body["expiresAt"], "2030-01-01T00:00:00Z");
    // An expiry in the past reaches Check: 403.
    let a = rest
        .call(
            "PATCH",
            &path,
            Some(json!({"expiresAt": "2026-03-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(a.body["status"], "KEY_STATUS_EXPIRED", "{}", a.text);
    check_becomes(&tg, &secret, 7).await;
    let a = rest
        .call("PATCH", &path, Some(json!({"updateMask": "expiresAt"})))
        .await;
    assert!(a.body.get("expiresAt").is_none(), "{}", a.text);
    assert_eq!(a.body["status"], "KEY_STATUS_ACTIVE");
    check_becomes(&tg, &secret, 0).await;

    // A refused update changes nothing.
    let before = rest.call("GET", &path, None).await.body;
    for (body, says) in [
        (
            json!({"name": "renamed", "limits": {"daily": "0"}}),
            "limits.daily: 0 is not a limit",
        ),
        (
            json!({"name": "renamed", "limits": {"monthly": "-5"}}),
            "limits.monthly",
        ),
        (
            json!({"name": "renamed", "limits": {"perMinute": "9223372036854775808"}}),
            "too large",
        ),
        (json!({"name": "  "}), "name: must not be empty"),
        (json!({"name": "a\nb"}), "control characters"),
        (json!({"name": "x".repeat(201)}), "longer than 200"),
        (
            json!({"name": "renamed", "updateMask": "prefix"}),
            "update_mask",
        ),
        (
            json!({"updateMask": "name"}),
            "name: named in update_mask but absent",
        ),
        (json!({}), "nothing to change"),
        (
            json!({"name": "renamed", "colour": "red"}),
            "unrecognized field name 'colour'",
        ),
        (json!({"id": "1", "name": "renamed"}), "comes from the path"),
        (
            json!({"name": "renamed", "expiresAt": "tomorrow"}),
            "rfc3339",
        ),
    ] {
        let a = rest.call("PATCH", &path, Some(body.clone())).await;
        assert_problem(&a, 400, "invalid_argument");
        assert!(
            a.body["detail"].as_str().unwrap().contains(says),
            "{body}: {}",
            a.text
        );
    }
    assert_eq!(rest.call("GET", &path, None).await.body, before);
    tg.stop().await;
}

async fn rest_revoke_reaches_check_within_a_second(db: Db) {
    let (tg, rest) = start(db).await;
    let (secret, id, _) = create(&rest, json!({"name": "to revoke"})).await;
    assert_eq!(check_code(&tg, &secret).await, 0);
    let a = rest
        .call("POST", &format!("/v1/keys/{id}:revoke"), None)
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["status"], "KEY_STATUS_REVOKED");
    assert!(!a.text.contains(&secret));
    check_becomes(&tg, &secret, 7).await;
    // Again: still revoked, still 200.
    let a = rest
        .call("POST", &format!("/v1/keys/{id}:revoke"), Some(json!({})))
        .await;
    assert_eq!(a.body["status"], "KEY_STATUS_REVOKED");
    tg.stop().await;
}

async fn rest_usage_from_counters_and_the_log(db: Db) {
    let (tg, rest) = start(db).await;
    let (secret, id, _) = create(&rest, json!({"name": "busy", "limits": {"daily": "3"}})).await;
    for _ in 0..5 {
        check_code(&tg, &secret).await;
    }
    tg.wait_for_count(
        &format!("SELECT count(*) FROM api_requests_log WHERE api_key_id = {id}"),
        5,
    )
    .await;
    let a = rest
        .call("GET", &format!("/v1/keys/{id}/usage"), None)
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        a.body,
        json!({
            "keyId": id,
            "today": "3",
            "thisMonth": "3",
            "total": "3",
            "days": [{"day": t0().format("%Y-%m-%d").to_string(), "allowed": "3", "denied": "2"}],
        })
    );
    // A new day: today starts from zero, the log keeps yesterday.
    tg.clock.advance(chrono::Duration::days(1));
    let a = rest
        .call("GET", &format!("/v1/keys/{id}/usage?days=2"), None)
        .await;
    assert_eq!(a.body["today"], "0");
    assert_eq!(a.body["thisMonth"], "3");
    assert_eq!(a.body["days"].as_array().unwrap().len(), 1);
    let a = rest
        .call("GET", &format!("/v1/keys/{id}/usage?days=1"), None)
        .await;
    assert_eq!(a.body["days"], json!([]));
    for q in ["days=367", "days=-1", "days=x"] {
        let a = rest
            .call("GET", &format!("/v1/keys/{id}/usage?{q}"), None)
            .await;
        assert_problem(&a, 400, "invalid_argument");
    }
    tg.stop().await;
}

/// An identity's usage: its shared counters, and its keys' requests by day from the log (not
/// those of a key outside it); NOT_FOUND for an unknown identity and one deleted since.
async fn rest_identity_usage_from_counters_and_the_log(db: Db) {
    let (tg, rest) = start(db).await;
    let a = rest
        .call(
            "POST",
            "/v1/identities",
            Some(json!({"name": "acme", "limits": {"daily": "3"}})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let identity_id = a.body["id"].as_str().unwrap().to_string();
    let (one, _, _) = create(&rest, json!({"name": "one", "identityId": identity_id})).await;
    let (two, _, _) = create(&rest, json!({"name": "two", "identityId": identity_id})).await;
    let (loose, _, _) = create(&rest, json!({"name": "loose"})).await;
    // one: 3 allowed (the identity's day is spent); two: 2 refused; loose: 1, not acme's.
    let mut codes = Vec::new();
    for key in [&one, &one, &one, &two, &two, &loose] {
        codes.push(check_code(&tg, key).await);
    }
    assert_eq!(codes, [0, 0, 0, 8, 8, 0]);
    tg.wait_for_count("SELECT count(*) FROM api_requests_log", 6)
        .await;
    let path = format!("/v1/identities/{identity_id}/usage");
    let a = rest.call("GET", &path, None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        a.body,
        json!({
            "identityId": identity_id,
            "today": "3",
            "thisMonth": "3",
            "total": "3",
            "days": [{"day": t0().format("%Y-%m-%d").to_string(), "allowed": "3", "denied": "2"}],
        })
    );
    // A new day: today starts from zero, the log keeps yesterday.
    tg.clock.advance(chrono::Duration::days(1));
    let a = rest.call("GET", &format!("{path}?days=2"), None).await;
    assert_eq!(
        (&a.body["today"], &a.body["thisMonth"]),
        (&json!("0"), &json!("3"))
    );
    assert_eq!(a.body["days"].as_array().unwrap().len(), 1, "{}", a.text);
    let a = rest.call("GET", &format!("{path}?days=1"), None).await;
    assert_eq!(a.body["days"], json!([]));
    for q in ["days=367", "days=-1", "days=x"] {
        let a = rest.call("GET", &format!("{path}?{q}"), None).await;
        assert_problem(&a, 400, "invalid_argument");
    }
    assert_problem(
        &rest.call("GET", "/v1/identities/987654/usage", None).await,
        404,
        "not_found",
    );
    let gone = rest
        .call("DELETE", &format!("/v1/identities/{identity_id}"), None)
        .await;
    assert_eq!(gone.status, 200, "{}", gone.text);
    assert_problem(&rest.call("GET", &path, None).await, 404, "not_found");
    tg.stop().await;
}

async fn rest_errors_are_problems(db: Db) {
    let (tg, rest) = start(db).await;
    let (_, id, _) = create(&rest, json!({"name": "exists"})).await;
    // No such key, whatever the operation.
    for (method, path, body) in [
        ("GET", "/v1/keys/987654".to_string(), None),
        (
            "PATCH",
            "/v1/keys/987654".into(),
            Some(json!({"name": "x"})),
        ),
        ("POST", "/v1/keys/987654:revoke".into(), None),
        ("GET", "/v1/keys/987654/usage".into(), None),
    ] {
        let a = rest.call(method, &path, body).await;
        assert_problem(&a, 404, "not_found");
        assert!(a.text.contains("987654"), "{}", a.text);
    }
    // Not a route, not a method of it, not an id.
    assert_problem(
        &rest.call("GET", "/v1/nothing", None).await,
        404,
        "not_found",
    );
    assert_problem(&rest.call("GET", "/", None).await, 404, "not_found");
    assert_problem(
        &rest.call("DELETE", &format!("/v1/keys/{id}"), None).await,
        405,
        "method_not_allowed",
    );
    assert_problem(
        &rest.call("PUT", "/v1/keys", None).await,
        405,
        "method_not_allowed",
    );
    let a = rest.call("GET", "/v1/keys/abc", None).await;
    assert_problem(&a, 400, "invalid_argument");
    let a = rest
        .call("GET", "/v1/keys/99999999999999999999", None)
        .await;
    assert_problem(&a, 400, "invalid_argument");
    // Bodies: JSON of the request's shape, bounded.
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(70 * 1024));
    let a = rest
        .send(
            "POST",
            "/v1/keys",
            Some("application/json"),
            Some(big.into_bytes()),
        )
        .await;
    assert_problem(&a, 413, "payload_too_large");
    let a = rest
        .send(
            "POST",
            "/v1/keys",
            Some("text/plain"),
            Some(b"name=x".to_vec()),
        )
        .await;
    assert_problem(&a, 415, "unsupported_media_type");
    for (body, says) in [
        (
            "{\"name\": \"x\", \"secret\": \"tg_mine\"}",
            "unrecognized field name 'secret'",
        ),
        ("{\"name\": ", "CreateKeyRequest"),
        ("[1, 2]", "CreateKeyRequest"),
        ("{\"name\": \"x\"} {}", "trailing"),
        ("{\"name\": 5}", "CreateKeyRequest"),
        (
            "{\"name\": \"x\", \"limits\": {\"daily\": 0}}",
            "0 is not a limit",
        ),
        ("{\"name\": \"x\", \"limits\": {\"hourly\": 5}}", "hourly"),
        ("{\"name\": \"\"}", "name: must not be empty"),
        ("{}", "name: must not be empty"),
    ] {
        let a = rest
            .send(
                "POST",
                "/v1/keys",
                Some("application/json"),
                Some(body.into()),
            )
            .await;
        assert_problem(&a, 400, "invalid_argument");
        assert!(
            a.body["detail"].as_str().unwrap().contains(says),
            "{body}: {}",
            a.text
        );
    }
    let a = rest
        .call("POST", "/v1/keys?name=x", Some(json!({"name": "y"})))
        .await;
    assert_problem(&a, 400, "invalid_argument");
    // Nothing was created by any of that.
    assert_eq!(tg.scalar("SELECT count(*) FROM api_keys").await, 1);
    // Every call counted.
    let metrics = tg.metrics_text().await;
    for series in [
        r#"tollgate_admin_requests_total{method="CreateKey",transport="rest",code="ok"} 1"#,
        r#"tollgate_admin_requests_total{method="GetKey",transport="rest",code="not_found"} 1"#,
        r#"tollgate_admin_requests_total{method="unknown",transport="rest",code="method_not_allowed"} 2"#,
    ] {
        assert!(metrics.contains(series), "{series} in\n{metrics}");
    }
    tg.stop().await;
}

async fn rest_serves_its_openapi_document(db: Db) {
    let (tg, rest) = start(db).await;
    let a = rest.call("GET", "/v1/openapi.json", None).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.content_type, "application/json");
    assert_eq!(a.body["openapi"], "3.0.3");
    for (path, method) in [
        ("/v1/keys", "post"),
        ("/v1/keys", "get"),
        ("/v1/keys/{id}", "get"),
        ("/v1/keys/{id}", "patch"),
        ("/v1/keys/{id}:revoke", "post"),
        ("/v1/keys/{id}/usage", "get"),
        ("/v1/keys/{id}:rotate", "post"),
        ("/v1/identities/{id}/usage", "get"),
    ] {
        assert!(a.body["paths"][path][method].is_object(), "{method} {path}");
    }
    let op = &a.body["paths"]["/v1/identities/{id}/usage"]["get"];
    assert_eq!(op["operationId"], "GetIdentityUsage");
    assert_eq!(
        op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/IdentityUsage"
    );
    assert!(
        op["responses"]["default"]["description"]
            .as_str()
            .unwrap()
            .contains("404 no such key or identity"),
        "{op}"
    );
    let usage = &a.body["components"]["schemas"]["IdentityUsage"]["properties"];
    for field in ["identityId", "today", "thisMonth", "total", "days"] {
        assert!(usage.get(field).is_some(), "{field}: {usage}");
    }
    assert_problem(
        &rest.call("POST", "/v1/openapi.json", None).await,
        405,
        "method_not_allowed",
    );
    tg.stop().await;
}

async fn rest_permissions_metadata_and_rotation(db: Db) {
    let (tg, rest) = start(db).await;
    let (old, id, created) = create(
        &rest,
        json!({
            "name": "product",
            "limits": {"daily": 1000},
            "permissions": ["reports.read", "reports.read", "billing:write"],
            "metadata": {"plan": "gold", "tenant": "acme"},
        }),
    )
    .await;
    let key = &created["key"];
    assert_eq!(key["permissions"], json!(["billing:write", "reports.read"]));
    assert_eq!(key["metadata"], json!({"plan": "gold", "tenant": "acme"}));
    assert!(key.get("oldKeyExpiresAt").is_none(), "{key}");
    // Metadata and permissions replaced through the mask; [] lets the key call every route.
    let a = rest
        .call(
            "PATCH",
            &format!("/v1/keys/{id}"),
            Some(json!({
                "metadata": {"plan": "silver"},
                "permissions": [],
                "updateMask": "metadata,permissions",
            })),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["metadata"], json!({"plan": "silver"}));
    assert!(
        a.body.get("permissions").is_none_or(|p| p == &json!([])),
        "{}",
        a.text
    );
    // Refused with the field named: bad metadata, bad permission, a grace past 30 days.
    for (method, path, body, says) in [
        (
            "POST",
            "/v1/keys".to_string(),
            json!({"name": "x", "metadata": {"key_id": "1"}}),
            "metadata",
        ),
        (
            "POST",
            "/v1/keys".to_string(),
            json!({"name": "x", "permissions": ["A B"]}),
            "permissions",
        ),
        (
            "POST",
            format!("/v1/keys/{id}:rotate"),
            json!({"grace": "2678400s"}),
            "grace",
        ),
    ] {
        let a = rest.call(method, &path, Some(body)).await;
        assert_problem(&a, 400, "invalid_argument");
        assert!(
            a.body["detail"].as_str().unwrap().starts_with(says),
            "{}",
            a.text
        );
    }
    assert_problem(
        &rest
            .call("POST", "/v1/keys/999999:rotate", Some(json!({})))
            .await,
        404,
        "not_found",
    );
    // Rotated with a grace of an hour: same id and limits, a new secret; both work.
    let a = rest
        .call(
            "POST",
            &format!("/v1/keys/{id}:rotate"),
            Some(json!({"grace": "3600s"})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let new = a.body["secret"].as_str().unwrap().to_string();
    assert!(tollgate::keys::is_well_formed(&new) && new != old);
    assert_eq!(a.body["key"]["id"], id);
    assert_eq!(a.body["key"]["limits"]["daily"], "1000");
    assert_eq!(a.body["key"]["prefix"], &new[..11]);
    assert_eq!(a.body["key"]["oldPrefix"], &old[..11]);
    let until = (t0() + chrono::Duration::hours(1)).timestamp();
    let said: chrono::DateTime<chrono::Utc> =
        a.body["oldKeyExpiresAt"].as_str().unwrap().parse().unwrap();
    assert_eq!(said.timestamp(), until, "{}", a.text);
    check_becomes(&tg, &new, 0).await;
    check_becomes(&tg, &old, 0).await;
    // Rotated again with no grace: the secret just replaced stops at once, as does the first.
    let a = rest
        .call(
            "POST",
            &format!("/v1/keys/{id}:rotate"),
            Some(json!({"grace": "0s"})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let newest = a.body["secret"].as_str().unwrap().to_string();
    check_becomes(&tg, &new, 16).await;
    check_becomes(&tg, &old, 16).await;
    check_becomes(&tg, &newest, 0).await;
    tg.stop().await;
}

/// A key moved between identities with UpdateKey's `identityId` (and out of them with the mask
/// alone) spends the new identity's limits within a second; ListKeys filters by identity, and a
/// page token belongs to its identity filter.
async fn rest_a_key_moves_between_identities(db: Db) {
    let (tg, rest) = start(db).await;
    let identity = |daily: &'static str| {
        let rest = &rest;
        async move {
            let a = rest
                .call(
                    "POST",
                    "/v1/identities",
                    Some(json!({"name": "i", "limits": {"daily": daily}})),
                )
                .await;
            assert_eq!(a.status, 200, "{}", a.text);
            a.body["id"].as_str().unwrap().to_string()
        }
    };
    let (a, b) = (identity("1").await, identity("1000").await);
    let (secret, key_id, _) = create(&rest, json!({"name": "mover", "identityId": a})).await;
    let (_, stayer, _) = create(&rest, json!({"name": "stayer", "identityId": b})).await;
    assert_eq!(check_code(&tg, &secret).await, 0);
    assert_eq!(check_code(&tg, &secret).await, 8);
    let patch = |body: Value| {
        let rest = &rest;
        let path = format!("/v1/keys/{key_id}");
        async move { rest.call("PATCH", &path, Some(body)).await }
    };
    let moved = patch(json!({"identityId": b})).await;
    assert_eq!(moved.status, 200, "{}", moved.text);
    assert_eq!(moved.body["identityId"], b);
    check_becomes(&tg, &secret, 0).await;
    let ids = |a: &harness::admin::Answer| -> Vec<String> {
        assert_eq!(a.status, 200, "{}", a.text);
        a.body["keys"]
            .as_array()
            .map(|keys| {
                keys.iter()
                    .map(|k| k["id"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let of_b = rest
        .call("GET", &format!("/v1/keys?identityId={b}"), None)
        .await;
    assert_eq!(ids(&of_b), vec![key_id.clone(), stayer.clone()]);
    let of_a = rest
        .call("GET", &format!("/v1/keys?identityId={a}"), None)
        .await;
    assert!(ids(&of_a).is_empty(), "{}", of_a.text);
    // A page of one of b's keys, and a token that belongs to that filter only.
    let first = rest
        .call("GET", &format!("/v1/keys?identityId={b}&pageSize=1"), None)
        .await;
    assert_eq!(ids(&first), vec![key_id.clone()]);
    let token = first.body["nextPageToken"].as_str().unwrap().to_string();
    let next = rest
        .call(
            "GET",
            &format!("/v1/keys?identityId={b}&pageSize=1&pageToken={token}"),
            None,
        )
        .await;
    assert_eq!(ids(&next), vec![stayer.clone()]);
    let mixed = rest
        .call(
            "GET",
            &format!("/v1/keys?pageSize=1&pageToken={token}"),
            None,
        )
        .await;
    assert_problem(&mixed, 400, "invalid_argument");
    // Back into a, whose day is spent; then out of every identity with the mask alone.
    assert_eq!(patch(json!({"identityId": a})).await.status, 200);
    check_becomes(&tg, &secret, 8).await;
    let left = patch(json!({"updateMask": "identityId"})).await;
    assert_eq!(left.status, 200, "{}", left.text);
    assert!(left.body.get("identityId").is_none(), "{}", left.text);
    check_becomes(&tg, &secret, 0).await;
    // An identity that does not exist: refused, and the key is unchanged.
    let bad = patch(json!({"identityId": "999999", "name": "renamed"})).await;
    assert_problem(&bad, 400, "invalid_argument");
    assert!(bad.text.contains("identity_id"), "{}", bad.text);
    let got = rest.call("GET", &format!("/v1/keys/{key_id}"), None).await;
    assert_eq!(got.body["name"], "mover");
    assert!(got.body.get("identityId").is_none(), "{}", got.text);
    // a still counts the one request spent in it.
    let got = rest.call("GET", &format!("/v1/identities/{a}"), None).await;
    assert_eq!(got.body["today"], "1", "{}", got.text);
    tg.stop().await;
}

every_database!(
    rest_a_key_moves_between_identities,
    rest_identities_share_limits_with_their_keys,
    rest_permissions_metadata_and_rotation,
    rest_create_get_and_use_a_key,
    rest_list_pages_and_filters,
    rest_update_is_all_or_nothing_and_reaches_check,
    rest_revoke_reaches_check_within_a_second,
    rest_usage_from_counters_and_the_log,
    rest_identity_usage_from_counters_and_the_log,
    rest_errors_are_problems,
    rest_serves_its_openapi_document,
);

/// Identities over REST: create, get, list, change limits (reaching Check within a second),
/// keys created with `identityId`, delete (detaching its keys).
async fn rest_identities_share_limits_with_their_keys(db: Db) {
    let (tg, rest) = start(db).await;
    let a = rest
        .call(
            "POST",
            "/v1/identities",
            Some(json!({"name": "acme", "limits": {"daily": "2"}})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["name"], "acme");
    assert_eq!(a.body["limits"]["daily"], "2");
    let identity_id = a.body["id"].as_str().unwrap().to_string();
    // A key of an identity that does not exist is refused; of this one, it says so.
    let bad = rest
        .call(
            "POST",
            "/v1/keys",
            Some(json!({"name": "x", "identityId": "999999"})),
        )
        .await;
    assert_problem(&bad, 400, "invalid_argument");
    let (secret, key_id, body) =
        create(&rest, json!({"name": "k", "identityId": identity_id})).await;
    assert_eq!(body["key"]["identityId"], identity_id);
    let got = rest.call("GET", &format!("/v1/keys/{key_id}"), None).await;
    assert_eq!(got.body["identityId"], identity_id);
    for _ in 0..2 {
        assert_eq!(check_code(&tg, &secret).await, 0);
    }
    assert_eq!(check_code(&tg, &secret).await, 8);
    let got = rest
        .call("GET", &format!("/v1/identities/{identity_id}"), None)
        .await;
    assert_eq!(got.status, 200, "{}", got.text);
    assert_eq!(got.body["today"], "2");
    let list = rest.call("GET", "/v1/identities?pageSize=1", None).await;
    assert_eq!(list.status, 200, "{}", list.text);
    assert_eq!(list.body["identities"][0]["id"], identity_id);
    // Raising the shared limit reaches Check within a second.
    let up = rest
        .call(
            "PATCH",
            &format!("/v1/identities/{identity_id}"),
            Some(json!({"limits": {"daily": "3"}})),
        )
        .await;
    assert_eq!(up.status, 200, "{}", up.text);
    assert_eq!(up.body["limits"]["daily"], "3");
    check_becomes(&tg, &secret, 0).await;
    // A mask that names the limit, absent: unlimited.
    let up = rest
        .call(
            "PATCH",
            &format!("/v1/identities/{identity_id}"),
            Some(json!({"updateMask": "limits.daily"})),
        )
        .await;
    assert_eq!(up.status, 200, "{}", up.text);
    assert!(up.body["limits"].get("daily").is_none(), "{}", up.text);
    let gone = rest
        .call("DELETE", &format!("/v1/identities/{identity_id}"), None)
        .await;
    assert_eq!(gone.status, 200, "{}", gone.text);
    let got = rest
        .call("GET", &format!("/v1/identities/{identity_id}"), None)
        .await;
    assert_problem(&got, 404, "not_found");
    let got = rest.call("GET", &format!("/v1/keys/{key_id}"), None).await;
    assert!(got.body.get("identityId").is_none(), "{}", got.text);
    tg.stop().await;
}
