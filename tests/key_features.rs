//! Keys as API products use them, through a running tollgate and the `tollgate keys` CLI: rotation
//! with a grace period, permissions per route, and metadata passed on to Envoy and the upstream.
//! What is asserted is what a client (or Envoy, or the upstream) sees.

use std::time::{Duration, Instant};

use chrono::Utc;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use envoy_types::pb::google::protobuf::value::Kind;
use harness::check::{check_request, denied, headers_of, key_header, ok};
use harness::cli::cli_create_key;
use harness::db::Db;
use harness::every_database;
use harness::server::Tollgate;

/// Runs `tollgate ARGS` on the instance's database; returns stdout, failing on a failure.
fn cli_ok(tg: &Tollgate, args: &[&str]) -> String {
    let out = tg.cli(args);
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `tollgate ARGS`, which must fail; returns stderr.
fn cli_fails(tg: &Tollgate, args: &[&str]) -> String {
    let out = tg.cli(args);
    assert!(!out.status.success(), "{args:?} succeeded: {out:?}");
    String::from_utf8(out.stderr).unwrap()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

/// A Check of `key` on a route whose ext_authz context_extensions say `permission`.
fn on_route(key: &str, permission: &str) -> CheckRequest {
    let mut r = key_header(key);
    r.attributes
        .as_mut()
        .unwrap()
        .context_extensions
        .insert("permission".into(), permission.into());
    r
}

fn is_allowed(resp: &CheckResponse) -> bool {
    resp.status.as_ref().is_some_and(|s| s.code == 0)
}

/// Checks until `done` holds for the answer, for at most a second.
async fn within_a_second(
    c: &mut envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient<
        tonic::transport::Channel,
    >,
    request: impl Fn() -> CheckRequest,
    done: impl Fn(&CheckResponse) -> bool,
    what: &str,
) -> CheckResponse {
    let started = Instant::now();
    loop {
        let resp = c.check(request()).await.unwrap().into_inner();
        if done(&resp) {
            return resp;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{what}: not within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_rotated_key_keeps_id_limits_and_usage_and_its_old_secret_works_until_the_grace_ends(
    db: Db,
) {
    let tg = Tollgate::on(db).await;
    // The CLI computes the grace from the wall clock; the server must agree with it.
    tg.clock.set(Utc::now());
    let (old, id) = cli_create_key(
        tg.dir.path(),
        &tg.db_url,
        &["--name", "rotating", "--daily", "10"],
    );
    let mut c = tg.client().await;
    for _ in 0..3 {
        ok(&c.check(key_header(&old)).await.unwrap().into_inner());
    }
    let id_arg = id.to_string();
    let rotated = json(&cli_ok(
        &tg,
        &["keys", "rotate", &id_arg, "--grace", "1h", "--json"],
    ));
    assert_eq!(rotated["id"], id);
    let new = rotated["key"].as_str().unwrap().to_string();
    assert!(new.starts_with("tg_") && new != old, "{rotated}");
    let expires: chrono::DateTime<Utc> = rotated["old_key_expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let grace = expires - Utc::now();
    assert!(
        grace > chrono::Duration::minutes(59) && grace <= chrono::Duration::hours(1),
        "{rotated}"
    );
    // The new secret works at once (within a second on a running server), and both spend the
    // same key's quota: 3 before, then 4 with the new secret and 3 with the old one.
    within_a_second(&mut c, || key_header(&new), is_allowed, "new secret").await;
    for _ in 0..3 {
        ok(&c.check(key_header(&new)).await.unwrap().into_inner());
    }
    for _ in 0..3 {
        let resp = c.check(key_header(&old)).await.unwrap().into_inner();
        assert_eq!(headers_of(&ok(&resp).headers)["x-tollgate-key-id"], id_arg);
    }
    let d = denied(&c.check(key_header(&new)).await.unwrap().into_inner());
    assert_eq!(
        (d.status, d.body["error"].as_str()),
        (429, Some("daily_quota_exceeded")),
        "the limit and the counters are the key's, whichever secret"
    );
    let shown = json(&cli_ok(&tg, &["keys", "show", &id_arg, "--json"]));
    assert_eq!(shown["usage"]["daily"], 10);
    assert_eq!(shown["daily"], 10);
    assert_eq!(shown["prefix"], &new[..11]);
    assert_eq!(shown["old_prefix"], &old[..11]);
    // The request log tells which secret each request came with, by prefix only.
    let count = |prefix: &str| {
        format!(
            "SELECT count(*) FROM api_requests_log WHERE api_key_id = {id} AND decision = 'allow' \
             AND key_prefix = '{prefix}'"
        )
    };
    tg.wait_for_count(&count(&old[..11]), 6).await;
    tg.wait_for_count(&count(&new[..11]), 4).await;
    assert_eq!(
        tg.scalar(&format!(
            "SELECT count(*) FROM api_requests_log WHERE key_prefix LIKE '%{}%' \
               OR key_prefix LIKE '%{}%'",
            &old[11..],
            &new[11..]
        ))
        .await,
        0,
        "no secret in the log"
    );
    // Past the grace, the old secret is refused like any unknown key; the new one is not.
    tg.clock.set(expires);
    // (A replica hears of the rotation within a second; until then it may still take the old
    // secret for the current one.)
    let resp = within_a_second(
        &mut c,
        || key_header(&old),
        |r| !is_allowed(r) && denied(r).body["error"] == "invalid_key",
        "grace over",
    )
    .await;
    assert_eq!(denied(&resp).status, 401);
    assert_eq!(
        denied(&c.check(key_header(&new)).await.unwrap().into_inner()).body["error"],
        "daily_quota_exceeded"
    );
    // A rotation with 0s ends the current secret at once, on the running server too.
    tg.clock.set(Utc::now());
    let again = json(&cli_ok(
        &tg,
        &["keys", "rotate", &id_arg, "--grace", "0s", "--json"],
    ));
    let newest = again["key"].as_str().unwrap().to_string();
    // tollgate's clock is the test's: let it catch up with the wall clock the CLI used.
    tg.clock.set(Utc::now());
    let resp = within_a_second(
        &mut c,
        || key_header(&new),
        |r| !is_allowed(r) && denied(r).body["error"] == "invalid_key",
        "0s grace",
    )
    .await;
    assert_eq!(denied(&resp).status, 401);
    assert_eq!(
        denied(&c.check(key_header(&old)).await.unwrap().into_inner()).body["error"],
        "invalid_key"
    );
    within_a_second(
        &mut c,
        || key_header(&newest),
        |r| !is_allowed(r) && denied(r).body["error"] == "daily_quota_exceeded",
        "newest secret",
    )
    .await;
    // Not a key, too long a grace, a revoked key: refused with a reason.
    assert!(cli_fails(&tg, &["keys", "rotate", "999999"]).contains("999999"));
    assert!(cli_fails(&tg, &["keys", "rotate", &id_arg, "--grace", "31d"]).contains("grace"));
    assert!(cli_fails(&tg, &["keys", "rotate", &id_arg, "--grace", "soon"]).contains("soon"));
    cli_ok(&tg, &["keys", "revoke", &id_arg]);
    assert!(cli_fails(&tg, &["keys", "rotate", &id_arg]).contains("revoked"));
    tg.stop().await;
}

async fn a_route_needing_a_permission_refuses_keys_without_it_and_spends_nothing(db: Db) {
    let tg = Tollgate::on(db).await;
    // `keys show` reads the counters of the wall clock's day.
    tg.clock.set(Utc::now());
    let (limited, id) = cli_create_key(
        tg.dir.path(),
        &tg.db_url,
        &[
            "--name",
            "reader",
            "--daily",
            "5",
            "--permissions",
            "reports.read,billing:write",
        ],
    );
    let (everything, _) = cli_create_key(tg.dir.path(), &tg.db_url, &["--name", "all"]);
    let mut c = tg.client().await;
    for _ in 0..3 {
        let d = denied(
            &c.check(on_route(&limited, "admin.write"))
                .await
                .unwrap()
                .into_inner(),
        );
        assert_eq!((d.status, d.grpc_code), (403, 7));
        assert_eq!(d.body["error"], "permission_denied");
        assert_eq!(d.body["permission"], "admin.write");
        assert!(
            d.body["detail"].as_str().unwrap().contains("admin.write"),
            "{}",
            d.body
        );
        assert!(!d.headers.contains_key("retry-after"));
    }
    // It has the one the route needs; and a route needing none is open to it.
    let resp = c
        .check(on_route(&limited, "reports.read"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        headers_of(&ok(&resp).response_headers_to_add)["x-ratelimit-remaining"],
        "4"
    );
    ok(&c.check(key_header(&limited)).await.unwrap().into_inner());
    // A key without permissions may call every route.
    ok(&c
        .check(on_route(&everything, "admin.write"))
        .await
        .unwrap()
        .into_inner());
    // The refusals spent nothing: 2 of 5 used.
    let id_arg = id.to_string();
    let shown = json(&cli_ok(&tg, &["keys", "show", &id_arg, "--json"]));
    assert_eq!(shown["usage"]["daily"], 2);
    assert_eq!(
        shown["permissions"],
        serde_json::json!(["billing:write", "reports.read"])
    );
    tg.wait_for_count(
        &format!(
            "SELECT count(*) FROM api_requests_log WHERE api_key_id = {id} \
             AND reason = 'permission_denied' AND status = 403"
        ),
        3,
    )
    .await;
    // Granted, it reaches the running server within a second; "" lets it call everything.
    cli_ok(
        &tg,
        &[
            "keys",
            "set-permissions",
            &id_arg,
            "reports.read,admin.write",
        ],
    );
    within_a_second(
        &mut c,
        || on_route(&limited, "admin.write"),
        is_allowed,
        "granted permission",
    )
    .await;
    let d = denied(
        &c.check(on_route(&limited, "billing:write"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(d.body["permission"], "billing:write");
    cli_ok(&tg, &["keys", "set-permissions", &id_arg, ""]);
    within_a_second(
        &mut c,
        || on_route(&limited, "billing:write"),
        is_allowed,
        "every route",
    )
    .await;
    // Names that are not permission names are refused, saying which.
    let e = cli_fails(
        &tg,
        &[
            "keys",
            "create",
            "--name",
            "x",
            "--permissions",
            "Reports Read",
        ],
    );
    assert!(e.contains("Reports Read"), "{e}");
    let many: Vec<String> = (0..33).map(|i| format!("p{i}")).collect();
    let e = cli_fails(&tg, &["keys", "set-permissions", &id_arg, &many.join(",")]);
    assert!(e.contains("more than 32"), "{e}");
    tg.stop().await;
}

async fn metadata_reaches_dynamic_metadata_and_configured_upstream_headers(db: Db) {
    let tg = Tollgate::on_with(db, |c| {
        c.authz.metadata_headers = vec!["plan".into(), "region".into()];
    })
    .await;
    let (key, id) = cli_create_key(
        tg.dir.path(),
        &tg.db_url,
        &[
            "--name",
            "acme",
            "--metadata",
            r#"{"plan":"gold","tenant":"acme"}"#,
        ],
    );
    let mut c = tg.client().await;
    // The client tries to choose its own plan and region.
    let resp = c
        .check(check_request(&[
            ("x-api-key", &key),
            ("x-tollgate-plan", "platinum"),
            ("x-tollgate-region", "eu"),
            ("x-tollgate-tenant", "other"),
        ]))
        .await
        .unwrap()
        .into_inner();
    let allowed = ok(&resp);
    let upstream = headers_of(&allowed.headers);
    assert_eq!(upstream["x-tollgate-plan"], "gold");
    // Replaced, not appended.
    let plan = allowed
        .headers
        .iter()
        .find(|h| h.header.as_ref().unwrap().key == "x-tollgate-plan")
        .unwrap();
    assert_eq!(plan.append_action, 2, "OVERWRITE_IF_EXISTS_OR_ADD");
    // The key has no region: the client's is removed. tenant is not a configured header.
    assert!(
        allowed
            .headers_to_remove
            .contains(&"x-tollgate-region".to_string())
    );
    assert!(!upstream.contains_key("x-tollgate-tenant"));
    assert!(!upstream.contains_key("x-tollgate-region"));
    let meta = resp.dynamic_metadata.expect("dynamic metadata");
    let field = |k: &str| match &meta.fields.get(k).and_then(|v| v.kind.clone()) {
        Some(Kind::StringValue(s)) => s.clone(),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(field("plan"), "gold");
    assert_eq!(field("tenant"), "acme");
    assert_eq!(field("key_id"), id.to_string());
    // keys show has it; set-metadata replaces it, on the running server within a second.
    let id_arg = id.to_string();
    let shown = json(&cli_ok(&tg, &["keys", "show", &id_arg, "--json"]));
    assert_eq!(
        shown["metadata"],
        serde_json::json!({"plan": "gold", "tenant": "acme"})
    );
    let text = cli_ok(&tg, &["keys", "show", &id_arg]);
    assert!(
        text.contains(r#"{"plan":"gold","tenant":"acme"}"#),
        "{text}"
    );
    cli_ok(
        &tg,
        &[
            "keys",
            "set-metadata",
            &id_arg,
            r#"{"plan":"silver","region":"us"}"#,
        ],
    );
    let resp = within_a_second(
        &mut c,
        || key_header(&key),
        |r| {
            headers_of(&ok(r).headers)
                .get("x-tollgate-plan")
                .map(String::as_str)
                == Some("silver")
        },
        "new metadata",
    )
    .await;
    assert_eq!(headers_of(&ok(&resp).headers)["x-tollgate-region"], "us");
    assert!(!resp.dynamic_metadata.unwrap().fields.contains_key("tenant"));
    // Bounded and checked: not strings, reserved or bad names, header-breaking or huge values.
    for (bad, says) in [
        (r#"{"plan":1}"#, "string"),
        (r#"["gold"]"#, "JSON object"),
        (r#"{"key_id":"7"}"#, "key_id"),
        (r#"{"Plan":"gold"}"#, "Plan"),
        (r#"{"plan":"a\r\nx-evil: 1"}"#, "control characters"),
    ] {
        let e = cli_fails(&tg, &["keys", "set-metadata", &id_arg, bad]);
        assert!(e.contains(says), "{bad}: {e}");
    }
    let huge = serde_json::json!({"plan": "x".repeat(300)}).to_string();
    assert!(cli_fails(&tg, &["keys", "set-metadata", &id_arg, &huge]).contains("256 bytes"));
    tg.stop().await;
}

/// A key moved between identities with `keys set-identity`: running servers spend the new
/// identity's limits within a second; what it spent stays where it was spent; `keys list
/// --identity` and `keys show` say which identity a key is in.
async fn a_key_moves_between_identities_and_spends_the_new_ones_limits(db: Db) {
    let tg = Tollgate::on(db).await;
    let identity = |name: &str, daily: &str| -> i64 {
        let out = cli_ok(
            &tg,
            &[
                "identities",
                "create",
                "--name",
                name,
                "--daily",
                daily,
                "--json",
            ],
        );
        json(&out)["id"].as_i64().unwrap()
    };
    let (a, b) = (identity("acme", "1"), identity("bigco", "1000"));
    let (a_arg, b_arg) = (a.to_string(), b.to_string());
    let (key, id) = cli_create_key(
        tg.dir.path(),
        &tg.db_url,
        &["--name", "mover", "--identity", &a_arg],
    );
    let (_, other) = cli_create_key(
        tg.dir.path(),
        &tg.db_url,
        &["--name", "stayer", "--identity", &b_arg],
    );
    let id_arg = id.to_string();
    let mut c = tg.client().await;
    let check = || key_header(&key);
    assert!(is_allowed(&c.check(check()).await.unwrap().into_inner()));
    let refused = c.check(check()).await.unwrap().into_inner();
    assert_eq!(denied(&refused).body["limit_scope"], "identity");

    // Into bigco: its limit, not acme's spent one, within a second.
    let out = cli_ok(&tg, &["keys", "set-identity", &id_arg, &b_arg]);
    assert!(out.contains(&format!("Identity: {b}.")), "{out}");
    within_a_second(&mut c, check, is_allowed, "moved into bigco").await;
    let shown = json(&cli_ok(&tg, &["keys", "show", &id_arg, "--json"]));
    assert_eq!(shown["identity_id"], b);
    let text = cli_ok(&tg, &["keys", "show", &id_arg]);
    assert!(text.contains(&format!("identity:    {b}\n")), "{text}");
    // acme's counter keeps the one request spent in it.
    let acme = json(&cli_ok(&tg, &["identities", "show", &a_arg, "--json"]));
    assert_eq!(acme["usage"]["total"], 1, "{acme}");

    // The listing by identity.
    let listed = |identity: &str| -> Vec<i64> {
        let out = cli_ok(&tg, &["keys", "list", "--identity", identity, "--json"]);
        json(&out)
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["id"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(listed(&b_arg), vec![id, other]);
    assert!(listed(&a_arg).is_empty());
    let text = cli_ok(&tg, &["keys", "list", "--identity", &a_arg]);
    assert_eq!(text, format!("Identity {a} has no keys.\n"));
    let text = cli_ok(&tg, &["keys", "list"]);
    let row = text.lines().find(|l| l.contains("mover")).unwrap();
    assert!(text.lines().next().unwrap().contains("IDENTITY"), "{text}");
    assert!(row.split_whitespace().any(|w| w == b_arg), "{text}");
    assert!(cli_fails(&tg, &["keys", "list", "--identity", "999999"]).contains("999999"));

    // Back into acme, whose day is spent: refused again, naming the identity's limit.
    cli_ok(&tg, &["keys", "set-identity", &id_arg, &a_arg]);
    within_a_second(&mut c, check, |r| !is_allowed(r), "moved back into acme").await;
    // Out of every identity: only its own limits (none) apply.
    let out = cli_ok(&tg, &["keys", "set-identity", &id_arg, "none"]);
    assert!(out.contains("Identity: none."), "{out}");
    within_a_second(&mut c, check, is_allowed, "out of acme").await;
    let shown = json(&cli_ok(&tg, &["keys", "show", &id_arg, "--json"]));
    assert!(shown["identity_id"].is_null(), "{shown}");
    let text = cli_ok(&tg, &["keys", "list"]);
    let row = text.lines().find(|l| l.contains("mover")).unwrap();
    assert!(row.split_whitespace().any(|w| w == "none"), "{text}");

    // An identity that does not exist: refused, naming it, and the key is unchanged.
    let e = cli_fails(&tg, &["keys", "set-identity", &id_arg, "999999"]);
    assert!(e.contains("no identity with id 999999"), "{e}");
    assert!(cli_fails(&tg, &["keys", "set-identity", "999999", &a_arg]).contains("999999"));
    let shown = json(&cli_ok(&tg, &["keys", "show", &id_arg, "--json"]));
    assert!(shown["identity_id"].is_null(), "{shown}");
    tg.stop().await;
}

every_database!(
    a_key_moves_between_identities_and_spends_the_new_ones_limits,
    a_rotated_key_keeps_id_limits_and_usage_and_its_old_secret_works_until_the_grace_ends,
    a_route_needing_a_permission_refuses_keys_without_it_and_spends_nothing,
    metadata_reaches_dynamic_metadata_and_configured_upstream_headers,
);
