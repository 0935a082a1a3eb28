//! End to end: real Envoy with ext_authz and ratelimit chained (envoy/ratelimit.yaml), both
//! answered by one tollgate with the rules in examples/ratelimit/rules.yaml.

use std::path::Path;

use harness::envoy::Envoy;
use harness::net::http_client;
use harness::server::Tollgate;
use tollgate::keys::Limits;

async fn start() -> (Tollgate, Envoy) {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ratelimit/rules.yaml");
    let tg = Tollgate::start_with(|c| {
        c.ratelimit.rules = Some(rules);
        // Envoy's ratelimit filter enforces keys' per-minute limits; Check must not count
        // the same request again.
        c.authz.rate_limit = false;
    })
    .await;
    let envoy = Envoy::start("ratelimit.yaml", tg.grpc).await;
    (tg, envoy)
}

async fn get(envoy: &Envoy, path: &str, key: &str) -> reqwest::Response {
    http_client()
        .get(envoy.url(path))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_per_minute_limit_is_enforced_once_through_both_filters() {
    let (tg, envoy) = start().await;
    let (key, _) = tg
        .create_key(
            "rl",
            Limits {
                per_minute: Some(3),
                ..Default::default()
            },
        )
        .await;
    for left in ["2", "1", "0"] {
        let r = get(&envoy, "/v1/things", &key).await;
        assert_eq!(r.status(), 200);
        // Envoy's draft-03 headers from tollgate's per-descriptor answers: the closest limit
        // first, then every descriptor's policy (key, path rule, address rule).
        assert_eq!(r.headers()["x-ratelimit-remaining"], left);
        assert_eq!(
            r.headers()["x-ratelimit-limit"].to_str().unwrap(),
            "3, 3;w=60;name=\"per_minute\", 1000;w=60, 50;w=1"
        );
        assert_eq!(r.headers()["x-ratelimit-reset"], "40");
    }
    let r = get(&envoy, "/v1/things", &key).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-envoy-ratelimited"], "true");
    assert_eq!(r.headers()["retry-after"], "40");
    // A key without a per-minute limit is not limited by the key descriptor.
    let (free, _) = tg.create_key("free", Limits::default()).await;
    for _ in 0..5 {
        assert_eq!(get(&envoy, "/v1/things", &free).await.status(), 200);
    }
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_rule_is_shared_by_every_client_and_ext_authz_still_comes_first() {
    let (tg, envoy) = start().await;
    let (a, _) = tg.create_key("a", Limits::default()).await;
    let (b, _) = tg.create_key("b", Limits::default()).await;
    assert_eq!(get(&envoy, "/v1/search?q=1", &a).await.status(), 200);
    assert_eq!(get(&envoy, "/v1/search?q=1", &b).await.status(), 200);
    let r = get(&envoy, "/v1/search?q=1", &a).await;
    assert_eq!(r.status(), 429);
    // Other paths are not affected.
    assert_eq!(get(&envoy, "/v1/other", &b).await.status(), 200);
    // No key: ext_authz answers before any rate limit is counted.
    let r = get(&envoy, "/v1/other", "").await;
    assert_eq!(r.status(), 401);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_string_or_a_longer_path_is_no_way_around_a_path_rule() {
    let (tg, envoy) = start().await;
    let (key, _) = tg.create_key("q", Limits::default()).await;
    // Envoy sends the path without its query, normalised, and the search rule is shared by
    // every path under /v1/search: two a minute, however the client writes them.
    assert_eq!(get(&envoy, "/v1/search?q=1", &key).await.status(), 200);
    assert_eq!(
        get(&envoy, "/v1/search/deeper?q=2", &key).await.status(),
        200
    );
    assert_eq!(get(&envoy, "/v1//search?q=3", &key).await.status(), 429);
    // Another path is one counter, whatever query strings come with it.
    let held = tg.metrics.limiter_counters.get();
    for i in 0..20 {
        let r = get(&envoy, &format!("/v1/other?n={i}"), &key).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(tg.metrics.limiter_counters.get(), held + 1);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_plan_from_its_metadata_picks_a_rate_limit_rule() {
    let (tg, envoy) = start().await;
    let create = |args: &[&str]| harness::cli::cli_create_key(tg.dir.path(), &tg.db_url, args);
    let (free_a, _) = create(&["--name", "free-a", "--metadata", r#"{"plan":"free"}"#]);
    let (free_b, _) = create(&["--name", "free-b", "--metadata", r#"{"plan":"free"}"#]);
    let (gold, _) = create(&["--name", "gold", "--metadata", r#"{"plan":"gold"}"#]);
    // The free plan's 3 per minute are shared by its keys (examples/ratelimit/rules.yaml).
    for key in [&free_a, &free_b, &free_a] {
        assert_eq!(get(&envoy, "/v1/things", key).await.status(), 200);
    }
    for key in [&free_b, &free_a] {
        let r = get(&envoy, "/v1/things", key).await;
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["x-envoy-ratelimited"], "true");
    }
    // Another plan has no such rule.
    for _ in 0..5 {
        assert_eq!(get(&envoy, "/v1/things", &gold).await.status(), 200);
    }
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_one_identity_share_its_per_minute_limit_through_the_identity_descriptor() {
    let (tg, envoy) = start().await;
    let identity = |args: &[&str]| -> String {
        let mut all = vec!["identities", "create", "--json"];
        all.extend_from_slice(args);
        let out = tg.cli(&all);
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["id"].as_i64().unwrap().to_string()
    };
    let acme = identity(&["--name", "acme", "--per-minute", "3"]);
    let other = identity(&["--name", "other", "--per-minute", "3"]);
    let create = |args: &[&str]| harness::cli::cli_create_key(tg.dir.path(), &tg.db_url, args);
    let (a, _) = create(&["--name", "acme-a", "--identity", &acme]);
    let (b, _) = create(&["--name", "acme-b", "--identity", &acme]);
    let (c, _) = create(&["--name", "other-c", "--identity", &other]);
    let (lone, _) = create(&["--name", "lone"]);
    // acme's 3 a minute are shared by its two keys, counted by the identity_id descriptor
    // (Check's own counting is off, so each request counts once).
    for (key, left) in [(&a, "2"), (&b, "1"), (&a, "0")] {
        let r = get(&envoy, "/v1/things", key).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-remaining"], left);
        let limit = r.headers()["x-ratelimit-limit"].to_str().unwrap();
        assert!(
            limit.starts_with("3, ") && limit.contains("3;w=60;name=\"identity_per_minute\""),
            "{limit}"
        );
    }
    for key in [&b, &a] {
        let r = get(&envoy, "/v1/things", key).await;
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["x-envoy-ratelimited"], "true");
        assert!(r.headers().contains_key("retry-after"));
    }
    // Another identity's keys, and keys without one, have their own counters.
    for _ in 0..3 {
        assert_eq!(get(&envoy, "/v1/things", &c).await.status(), 200);
    }
    assert_eq!(get(&envoy, "/v1/things", &c).await.status(), 429);
    for _ in 0..5 {
        assert_eq!(get(&envoy, "/v1/things", &lone).await.status(), 200);
    }
    tg.stop().await;
}
