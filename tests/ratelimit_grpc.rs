//! ShouldRateLimit over gRPC against a real tollgate: rules in envoyproxy/ratelimit's format,
//! per-key descriptors, hits_addend, shadow mode, replaces, overrides, and reloads.

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor,
    rate_limit_descriptor::{Entry, RateLimitOverride},
};
use envoy_types::pb::envoy::service::ratelimit::v3::{
    RateLimitRequest, RateLimitResponse, rate_limit_response::Code,
    rate_limit_service_client::RateLimitServiceClient,
};
use harness::redis::{delete_redis_keys, redis_cluster_url, redis_keys, redis_url, unique_prefix};
use harness::replica::Replica;
use harness::server::Tollgate;
use tollgate::keys::Limits;
use tonic::transport::Channel;

const RULES: &str = "domain: api
descriptors:
  - key: path
    value: /v1/search
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: path
    rate_limit: {unit: minute, requests_per_unit: 100}
  - key: remote_address
    value: 10.0.0.66
    rate_limit: {unit: second, requests_per_unit: 0}
  - key: internal
    rate_limit: {unlimited: true}
  - key: soft
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: plan
    value: basic
    descriptors:
      - key: user
        rate_limit: {name: basic_user, unit: hour, requests_per_unit: 2}
  - key: promo
    value: spring
    descriptors:
      - key: user
        rate_limit: {replaces: [{name: basic_user}], unit: hour, requests_per_unit: 5}
";

async fn start(rules: &str) -> (Tollgate, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap().keep();
    let path = dir.join("rules.yaml");
    std::fs::write(&path, rules).unwrap();
    let p = path.clone();
    let tg = Tollgate::start_with(move |c| {
        c.ratelimit.rules = Some(p);
        c.ratelimit.watch_interval = tollgate::config::Dur(Duration::from_millis(100));
    })
    .await;
    (tg, path)
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        ..Default::default()
    }
}

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: 0,
    }
}

async fn ask(c: &mut RateLimitServiceClient<Channel>, r: RateLimitRequest) -> RateLimitResponse {
    c.should_rate_limit(r).await.unwrap().into_inner()
}

fn over(r: &RateLimitResponse) -> bool {
    r.overall_code == Code::OverLimit as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_rule_limits_and_reports_each_descriptor() {
    let (tg, _) = start(RULES).await;
    let mut c = tg.ratelimit_client().await;
    let search = || request("api", vec![descriptor(&[("path", "/v1/search")])]);
    for left in [2, 1, 0] {
        let r = ask(&mut c, search()).await;
        assert!(!over(&r));
        let s = &r.statuses[0];
        assert_eq!(s.code, Code::Ok as i32);
        assert_eq!(s.limit_remaining, left);
        let limit = s.current_limit.as_ref().unwrap();
        assert_eq!((limit.requests_per_unit, limit.unit), (3, 2));
        assert_eq!(s.duration_until_reset.as_ref().unwrap().seconds, 40);
    }
    let r = ask(&mut c, search()).await;
    assert!(over(&r));
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
    let retry: Vec<_> = r
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(retry, [("retry-after", "40")]);
    // The bare key has its own counter per value.
    let r = ask(
        &mut c,
        request("api", vec![descriptor(&[("path", "/v1/other")])]),
    )
    .await;
    assert_eq!(r.statuses[0].limit_remaining, 99);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_descriptors_are_all_counted_and_a_refusal_gives_the_others_back() {
    let (tg, _) = start(RULES).await;
    let mut c = tg.ratelimit_client().await;
    let r = ask(
        &mut c,
        request(
            "api",
            vec![
                descriptor(&[("path", "/v1/things")]),
                descriptor(&[("remote_address", "10.0.0.66")]),
                descriptor(&[("internal", "yes")]),
                descriptor(&[("nothing", "matches")]),
            ],
        ),
    )
    .await;
    assert!(over(&r));
    let codes: Vec<_> = r.statuses.iter().map(|s| s.code).collect();
    assert_eq!(codes, [1, 2, 1, 1]);
    assert_eq!(r.statuses[2].limit_remaining, u32::MAX, "unlimited");
    assert!(r.statuses[2].current_limit.is_none());
    assert!(r.statuses[3].current_limit.is_none(), "no rule, no limit");
    // The request was refused, so /v1/things got its hit back: still 99 left after one more.
    let r = ask(
        &mut c,
        request("api", vec![descriptor(&[("path", "/v1/things")])]),
    )
    .await;
    assert_eq!(r.statuses[0].limit_remaining, 99);
    // An unknown domain limits nothing.
    let r = ask(
        &mut c,
        request("elsewhere", vec![descriptor(&[("path", "/x")])]),
    )
    .await;
    assert!(!over(&r));
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_addend_counts_at_request_and_descriptor_level() {
    let (tg, _) = start(RULES).await;
    let mut c = tg.ratelimit_client().await;
    let mut r = request("api", vec![descriptor(&[("path", "/v1/search")])]);
    r.hits_addend = 2;
    assert_eq!(ask(&mut c, r.clone()).await.statuses[0].limit_remaining, 1);
    // Two more do not fit in the 1 left, and count nothing.
    assert!(over(&ask(&mut c, r).await));
    // Descriptor hits_addend 0 checks without counting.
    let mut d = descriptor(&[("path", "/v1/search")]);
    d.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 0 });
    let resp = ask(&mut c, request("api", vec![d])).await;
    assert!(!over(&resp));
    assert_eq!(resp.statuses[0].limit_remaining, 1);
    let mut d = descriptor(&[("path", "/v1/search")]);
    d.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 1 });
    assert_eq!(
        ask(&mut c, request("api", vec![d])).await.statuses[0].limit_remaining,
        0
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_counts_but_allows() {
    let (tg, _) = start(RULES).await;
    let mut c = tg.ratelimit_client().await;
    for _ in 0..3 {
        let r = ask(&mut c, request("api", vec![descriptor(&[("soft", "x")])])).await;
        assert!(!over(&r));
    }
    let text = tg.metrics_text().await;
    assert!(
        text.contains("tollgate_ratelimit_descriptors_total{outcome=\"shadow\"} 2\n"),
        "{text}"
    );
    tg.stop().await;

    // The global switch: everything is counted, nothing refused.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(&path, RULES).unwrap();
    let tg = Tollgate::start_with(|c| {
        c.ratelimit.rules = Some(path.clone());
        c.ratelimit.shadow_mode = true;
    })
    .await;
    let mut c = tg.ratelimit_client().await;
    let r = ask(
        &mut c,
        request("api", vec![descriptor(&[("remote_address", "10.0.0.66")])]),
    )
    .await;
    assert!(!over(&r));
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaces_drops_the_replaced_rule_for_that_request() {
    let (tg, _) = start(RULES).await;
    let mut c = tg.ratelimit_client().await;
    let both = || {
        request(
            "api",
            vec![
                descriptor(&[("plan", "basic"), ("user", "ann")]),
                descriptor(&[("promo", "spring"), ("user", "ann")]),
            ],
        )
    };
    // With the promo, the basic_user limit (2/hour) does not apply: 5 pass.
    for _ in 0..5 {
        assert!(!over(&ask(&mut c, both()).await));
    }
    let r = ask(&mut c, both()).await;
    assert!(over(&r));
    assert!(r.statuses[0].current_limit.is_none(), "replaced");
    // ...and the basic limit itself was never touched.
    let basic = request(
        "api",
        vec![descriptor(&[("plan", "basic"), ("user", "ann")])],
    );
    assert_eq!(ask(&mut c, basic).await.statuses[0].limit_remaining, 1);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_limit_override_wins() {
    let (tg, _) = start(RULES).await;
    let mut c = tg.ratelimit_client().await;
    let mut d = descriptor(&[("path", "/v1/search")]);
    d.limit = Some(RateLimitOverride {
        requests_per_unit: 1,
        unit: 3, // hour
    });
    let r = ask(&mut c, request("api", vec![d.clone()])).await;
    let limit = r.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!((limit.requests_per_unit, limit.unit), (1, 3));
    assert!(over(&ask(&mut c, request("api", vec![d])).await));
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_descriptor_gets_that_keys_per_minute_limit() {
    let (tg, _) = start(RULES).await;
    let (_, id) = tg
        .create_key(
            "k",
            Limits {
                per_minute: Some(2),
                ..Default::default()
            },
        )
        .await;
    let (_, unlimited) = tg.create_key("free", Limits::default()).await;
    let mut c = tg.ratelimit_client().await;
    let id_text = id.to_string();
    let key = || request("api", vec![descriptor(&[("api_key_id", &id_text)])]);
    let r = ask(&mut c, key()).await;
    let limit = r.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.requests_per_unit, limit.unit, limit.name.as_str()),
        (2, 2, "per_minute")
    );
    assert_eq!(r.statuses[0].limit_remaining, 1);
    assert!(!over(&ask(&mut c, key()).await));
    assert!(over(&ask(&mut c, key()).await));
    let free = unlimited.to_string();
    let r = ask(
        &mut c,
        request("api", vec![descriptor(&[("api_key_id", &free)])]),
    )
    .await;
    assert!(!over(&r) && r.statuses[0].current_limit.is_none());
    let r = ask(
        &mut c,
        request("api", vec![descriptor(&[("api_key_id", "999999")])]),
    )
    .await;
    assert!(
        !over(&r),
        "an unknown key is ext_authz's business, not a rate limit"
    );
    // Each call naming a key is in the request log, marked as the rate limit API's.
    let db = tg.stop().await;
    let rows = |decision: &str| {
        format!(
            "SELECT count(*) FROM api_requests_log WHERE api = 'ratelimit' AND api_key_id = {id} \
             AND decision = '{decision}'"
        )
    };
    assert_eq!(db.scalar(&rows("allow")).await, 2);
    assert_eq!(db.scalar(&rows("deny")).await, 1);
    let limited = format!(
        "SELECT count(*) FROM api_requests_log WHERE api_key_id = {id} AND status = 429 \
         AND reason = 'rate_limited'"
    );
    assert_eq!(db.scalar(&limited).await, 1);
    assert_eq!(
        db.scalar("SELECT count(*) FROM api_requests_log WHERE api = 'authz'")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_reload_on_change_and_a_bad_file_keeps_the_old_rules() {
    let (tg, path) = start(RULES).await;
    let mut c = tg.ratelimit_client().await;
    let probe = || request("api", vec![descriptor(&[("path", "/v1/search")])]);
    assert_eq!(ask(&mut c, probe()).await.statuses[0].limit_remaining, 2);
    std::fs::write(
        &path,
        RULES.replace("requests_per_unit: 3}", "requests_per_unit: 50}"),
    )
    .unwrap();
    let started = Instant::now();
    loop {
        let r = ask(&mut c, probe()).await;
        if r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit
            == 50
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "rules not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(
        &path,
        "domain: api\ndescriptors:\n  - key: path\n    rate_limit: {unit: fortnight}\n",
    )
    .unwrap();
    let started = Instant::now();
    loop {
        let text = tg.metrics_text().await;
        if text.contains("\ntollgate_rules_last_reload_failed 1\n") {
            assert!(
                text.contains("tollgate_rules_reloads_total{result=\"error\"} 1"),
                "{text}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "bad rules not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = ask(&mut c, probe()).await;
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        50
    );
    tg.stop().await;
}

/// With `ratelimit.merge_domains`, a reload merges the files again: a change to one file, or a new
/// file for the domain, is in force with the others' descriptors still there; a change that
/// defines a descriptor twice is refused and the merged rules stay as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_domains_reload_and_a_duplicate_keeps_the_old_rules() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let part = |value: &str, per_minute: u32| {
        format!(
            "domain: api\ndescriptors:\n  - key: path\n    value: {value}\n    rate_limit: {{unit: minute, requests_per_unit: {per_minute}}}\n"
        )
    };
    std::fs::write(rules.join("a.yaml"), part("/v1/search", 3)).unwrap();
    std::fs::write(rules.join("b.yaml"), part("/v1/orders", 5)).unwrap();
    let path = rules.clone();
    let tg = Tollgate::start_with(move |c| {
        c.ratelimit.rules = Some(path);
        c.ratelimit.merge_domains = true;
        c.ratelimit.watch_interval = tollgate::config::Dur(Duration::from_millis(100));
    })
    .await;
    let mut c = tg.ratelimit_client().await;
    let mut limit_of = async |entries: &[(&str, &str)]| {
        ask(&mut c, request("api", vec![descriptor(entries)]))
            .await
            .statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.requests_per_unit)
    };
    assert_eq!(limit_of(&[("path", "/v1/search")]).await, Some(3));
    assert_eq!(limit_of(&[("path", "/v1/orders")]).await, Some(5));

    // One file changes, another appears.
    std::fs::write(rules.join("b.yaml"), part("/v1/orders", 7)).unwrap();
    std::fs::write(
        rules.join("c.yaml"),
        "domain: api\ndescriptors:\n  - key: user\n    rate_limit: {unit: minute, requests_per_unit: 2}\n",
    )
    .unwrap();
    let started = Instant::now();
    while limit_of(&[("user", "ann")]).await != Some(2)
        || limit_of(&[("path", "/v1/orders")]).await != Some(7)
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "merged rules not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(limit_of(&[("path", "/v1/search")]).await, Some(3));

    // b.yaml now defines a.yaml's descriptor too: refused, the merged rules stay.
    std::fs::write(rules.join("b.yaml"), part("/v1/search", 9)).unwrap();
    let started = Instant::now();
    while !tg
        .metrics_text()
        .await
        .contains("\ntollgate_rules_last_reload_failed 1\n")
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the duplicate was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(limit_of(&[("path", "/v1/search")]).await, Some(3));
    assert_eq!(limit_of(&[("path", "/v1/orders")]).await, Some(7));
    assert_eq!(limit_of(&[("user", "ann")]).await, Some(2));
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_at_once_and_no_request_is_dropped_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, RULES).unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let rules_env = rules.to_str().unwrap().to_string();
    let replica = Replica::spawn(
        dir.path(),
        &[
            ("TOLLGATE_DATABASE_URL", db.as_str()),
            ("TOLLGATE_RATELIMIT_RULES", rules_env.as_str()),
            // Only the signal can trigger the reload within this test.
            ("TOLLGATE_RATELIMIT_WATCH_INTERVAL", "1h"),
        ],
    )
    .await;
    let mut c = replica.ratelimit_client().await;
    let probe = || request("api", vec![descriptor(&[("path", "/v1/other")])]);
    let limit_of = |r: &RateLimitResponse| {
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit
    };
    assert_eq!(limit_of(&ask(&mut c, probe()).await), 100);

    // Keep asking while the rules are swapped: every call must be answered.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let background = {
        let (mut c, stop) = (c.clone(), stop.clone());
        tokio::spawn(async move {
            let mut answered = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.should_rate_limit(request("api", vec![descriptor(&[("internal", "x")])]))
                    .await
                    .expect("answered during the reload");
                answered += 1;
            }
            answered
        })
    };
    std::fs::write(
        &rules,
        RULES.replace("requests_per_unit: 100}", "requests_per_unit: 7}"),
    )
    .unwrap();
    replica.signal("-HUP");
    let started = Instant::now();
    while limit_of(&ask(&mut c, probe()).await) != 7 {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "SIGHUP did not reload the rules"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(background.await.unwrap() > 0);
    assert_eq!(replica.stop_with("-TERM").await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_redis_share_rule_counters() {
    let url = redis_url().await;
    let prefix = unique_prefix("rls");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(&path, RULES).unwrap();
    let configure = |c: &mut tollgate::config::Config| {
        c.ratelimit.rules = Some(path.clone());
        c.redis.url = Some(tollgate::config::SecretUrl(url.clone()));
        c.redis.key_prefix = prefix.clone();
    };
    let a = Tollgate::start_with(configure).await;
    let b = Tollgate::start_with(configure).await;
    let (mut ca, mut cb) = (a.ratelimit_client().await, b.ratelimit_client().await);
    let search = || request("api", vec![descriptor(&[("path", "/v1/search")])]);
    assert!(!over(&ask(&mut ca, search()).await));
    assert!(!over(&ask(&mut cb, search()).await));
    assert!(!over(&ask(&mut ca, search()).await));
    assert!(over(&ask(&mut cb, search()).await));
    assert!(!redis_keys(&url, &prefix).await.is_empty());
    a.stop().await;
    b.stop().await;
    delete_redis_keys(&url, &prefix).await;
}

/// A long descriptor value reaches Redis only as a digest, on one node and on the cluster: no
/// key name holds it, a 60 KiB value makes a key as long as a 65-byte one does, each key is one
/// hash tag around its counter, and the counter still counts exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_values_reach_redis_only_as_digests() {
    for url in [redis_url().await, redis_cluster_url().await] {
        let prefix = unique_prefix("rls-long");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.yaml");
        std::fs::write(&path, RULES).unwrap();
        let tg = Tollgate::start_with(|c| {
            c.ratelimit.rules = Some(path.clone());
            c.redis.url = Some(tollgate::config::SecretUrl(url.clone()));
            c.redis.key_prefix = prefix.clone();
        })
        .await;
        let mut c = tg.ratelimit_client().await;
        let huge = format!("/{}", "h".repeat(60 * 1024));
        let long = format!("/{}", "l".repeat(64));
        let path_of = |v: &str| request("api", vec![descriptor(&[("path", v)])]);

        // The bare path rule: 100 a minute, for this value as for any.
        let mut all = path_of(&huge);
        all.hits_addend = 100;
        let r = ask(&mut c, all).await;
        assert!(!over(&r));
        assert_eq!(r.statuses[0].limit_remaining, 0);
        assert!(over(&ask(&mut c, path_of(&huge)).await));
        // One byte more is another value, another counter.
        assert!(!over(&ask(&mut c, path_of(&format!("{huge}x"))).await));
        assert!(!over(&ask(&mut c, path_of(&long)).await));
        // Envoy's override is counted per descriptor, under a digest too.
        let mut d = descriptor(&[("token", &huge)]);
        d.limit = Some(RateLimitOverride {
            requests_per_unit: 1,
            unit: 3, // hour
        });
        assert!(!over(&ask(&mut c, request("api", vec![d.clone()])).await));
        assert!(over(&ask(&mut c, request("api", vec![d])).await));

        let keys = redis_keys(&url, &prefix).await;
        assert_eq!(keys.len(), 4, "{url}: {keys:?}");
        for k in &keys {
            assert!(!k.contains("hhhhhhhh") && !k.contains("llllllll"), "{k}");
            assert!(k.len() < prefix.len() + 120, "{k}");
            let tagged = k.strip_prefix(&prefix).unwrap();
            assert!(
                tagged.starts_with('{')
                    && tagged.matches('{').count() == 1
                    && tagged.matches('}').count() == 1,
                "{k}"
            );
        }
        let mut path_key_lengths: Vec<usize> = keys
            .iter()
            .filter(|k| k.contains("4:path"))
            .map(String::len)
            .collect();
        path_key_lengths.dedup();
        assert_eq!(path_key_lengths.len(), 1, "{keys:?}");
        tg.stop().await;
        delete_redis_keys(&url, &prefix).await;
    }
}

/// Descriptor values may be credentials: no log line holds one, even at trace level, and the
/// line logged for a shadow-mode refusal names the rule instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_descriptor_value_appears_in_any_log_line_even_at_trace_level() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, RULES).unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let replica = Replica::spawn(
        dir.path(),
        &[
            ("TOLLGATE_DATABASE_URL", db.as_str()),
            ("TOLLGATE_RATELIMIT_RULES", rules.to_str().unwrap()),
            ("TOLLGATE_LOG_LEVEL", "trace"),
        ],
    )
    .await;
    let mut c = replica.ratelimit_client().await;
    let short = "s3cr3t-Value-0123456789";
    let long = format!("Bearer {}", "L0ngS3cr3t".repeat(20));
    for _ in 0..2 {
        // The shadow rule allows one a minute: the second is over, allowed, and logged.
        let r = ask(&mut c, request("api", vec![descriptor(&[("soft", short)])])).await;
        assert!(!over(&r));
        ask(&mut c, request("api", vec![descriptor(&[("soft", &long)])])).await;
        ask(&mut c, request("api", vec![descriptor(&[("path", &long)])])).await;
    }
    let log_path = replica.log.clone();
    assert_eq!(replica.stop_with("-TERM").await.code(), Some(0));
    let log = std::fs::read_to_string(log_path).unwrap();
    assert!(
        log.contains("over limit in shadow mode") && log.contains("api.soft"),
        "{log}"
    );
    for secret in [short, &long[7..47]] {
        assert!(
            !log.contains(secret),
            "a descriptor value appears in the log"
        );
    }
}

/// An `identity_id` descriptor works as `api_key_id` does: it is counted against the
/// identity's per-minute limit, in the window Check hits for the identity's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_descriptor_shares_the_identitys_per_minute_window_with_check() {
    let (tg, _) = start(RULES).await;
    let identity = tg
        .stores
        .identities
        .create_identity(
            "acme",
            tollgate::store::IdentityLimitsPatch {
                per_minute: Some(Some(3)),
                ..Default::default()
            },
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    let out = tg.cli(&[
        "keys",
        "create",
        "--json",
        "--name",
        "k",
        "--identity",
        &identity.id.to_string(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["identity_id"], identity.id);
    let secret = v["key"].as_str().unwrap().to_string();
    let mut check = tg.client().await;
    let resp = check
        .check(harness::check::key_header(&secret))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.status.unwrap().code, 0);
    let mut c = tg.ratelimit_client().await;
    let id_text = identity.id.to_string();
    let ident = || request("api", vec![descriptor(&[("identity_id", &id_text)])]);
    let r = ask(&mut c, ident()).await;
    let limit = r.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.requests_per_unit, limit.unit, limit.name.as_str()),
        (3, 2, "identity_per_minute")
    );
    assert_eq!(r.statuses[0].limit_remaining, 1, "Check's hit counts too");
    assert!(!over(&ask(&mut c, ident()).await));
    assert!(over(&ask(&mut c, ident()).await));
    // And Check sees the descriptor's hits: the identity's window is full.
    let d = harness::check::denied(
        &check
            .check(harness::check::key_header(&secret))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(d.body["error"], "rate_limited");
    assert_eq!(d.body["limit_scope"], "identity");
    let r = ask(
        &mut c,
        request("api", vec![descriptor(&[("identity_id", "999999")])]),
    )
    .await;
    assert!(!over(&r) && r.statuses[0].current_limit.is_none());
    tg.stop().await;
}
