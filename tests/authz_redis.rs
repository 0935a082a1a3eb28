//! Check with its per-minute windows in Redis: shared by replicas, and what happens when Redis
//! goes away and comes back. Outages use a private `redis-server` that the test starts and
//! kills, never the shared one.

use std::time::{Duration, Instant};

use chrono::Duration as Span;
use harness::check::{denied, headers_of, key_header, ok};
use harness::redis::{
    PrivateRedis, delete_redis_keys, redis_cluster_url, redis_keys, redis_url, unique_prefix,
};
use harness::server::Tollgate;
use tollgate::config::{Dur, FailureMode, SecretUrl};
use tollgate::keys::Limits;
use tollgate::limiter::Algorithm;

fn per_minute(n: u64) -> Limits {
    Limits {
        per_minute: Some(n),
        ..Limits::default()
    }
}

/// Allowed (true) or denied (false), and how long the check took.
async fn timed_check(
    tg: &Tollgate,
    key: &str,
) -> (
    tonic::Response<envoy_types::pb::envoy::service::auth::v3::CheckResponse>,
    Duration,
) {
    let mut c = tg.client().await;
    let started = Instant::now();
    let resp = c.check(key_header(key)).await.unwrap();
    (resp, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_per_minute_limit_in_redis() {
    for (algorithm, url) in [
        (Algorithm::FixedWindow, redis_url().await),
        (Algorithm::SlidingWindow, redis_cluster_url().await),
        (Algorithm::TokenBucket, redis_url().await),
    ] {
        let prefix = unique_prefix("authz");
        let configure = |c: &mut tollgate::config::Config| {
            c.redis.url = Some(SecretUrl(url.clone()));
            c.redis.key_prefix = prefix.clone();
            c.redis.failure_mode = FailureMode::Closed;
            c.redis.timeout = Dur(Duration::from_secs(2));
            c.limits.algorithm = algorithm;
        };
        let a = Tollgate::start_with(configure).await;
        let (key, _) = a.create_key("shared", per_minute(4)).await;
        // The second replica reads the first one's database.
        let db = a.db_url.clone();
        let b = Tollgate::start_with(|c| {
            configure(c);
            c.database.url = SecretUrl(db.clone());
        })
        .await;
        let (mut ca, mut cb) = (a.client().await, b.client().await);
        for (i, left) in [3, 2, 1, 0].into_iter().enumerate() {
            let c = if i % 2 == 0 { &mut ca } else { &mut cb };
            let resp = c.check(key_header(&key)).await.unwrap().into_inner();
            let h = headers_of(&ok(&resp).response_headers_to_add);
            assert_eq!(
                h["x-ratelimit-remaining"],
                left.to_string(),
                "{algorithm:?}"
            );
        }
        for c in [&mut ca, &mut cb] {
            let d = denied(&c.check(key_header(&key)).await.unwrap().into_inner());
            assert_eq!(
                (d.status, d.body["error"].as_str()),
                (429, Some("rate_limited"))
            );
            // 12:00:20: fixed window turns in 40 s; sliding needs a quarter of the next
            // minute on top; the bucket gives a token back every 15 s.
            let retry = match algorithm {
                Algorithm::FixedWindow => "40",
                Algorithm::SlidingWindow => "55",
                Algorithm::TokenBucket => "15",
            };
            assert_eq!(d.headers["retry-after"], retry, "{algorithm:?}");
        }
        assert!(!redis_keys(&url, &prefix).await.is_empty());
        a.stop().await;
        b.stop().await;
        delete_redis_keys(&url, &prefix).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fail_open_allows_counts_and_recovers_when_it_returns() {
    let mut redis = PrivateRedis::start().await;
    let url = redis.url();
    let tg = Tollgate::start_with(|c| {
        c.redis.url = Some(SecretUrl(url.clone()));
        c.redis.failure_mode = FailureMode::Open;
    })
    .await;
    let (key, _) = tg.create_key("o", per_minute(2)).await;
    let mut c = tg.client().await;
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    denied(&c.check(key_header(&key)).await.unwrap().into_inner());

    redis.stop();
    for _ in 0..5 {
        let (resp, took) = timed_check(&tg, &key).await;
        let resp = resp.into_inner();
        // Allowed, without per-minute headers: nothing could count it.
        assert!(ok(&resp).response_headers_to_add.is_empty(), "{resp:?}");
        assert!(took < Duration::from_secs(1), "check took {took:?}");
    }
    let m = tg.metrics_text().await;
    assert!(
        m.contains("tollgate_fail_open_total{backend=\"limiter\"} 5\n"),
        "{m}"
    );
    assert!(
        m.contains("tollgate_backend_errors_total{backend=\"limiter\"} 5\n"),
        "{m}"
    );

    // Back, empty (no counters, no scripts): the same tollgate enforces again.
    redis.restart().await;
    tg.clock.advance(Span::seconds(60));
    let started = Instant::now();
    loop {
        let resp = c.check(key_header(&key)).await.unwrap().into_inner();
        if !ok(&resp).response_headers_to_add.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "tollgate did not reconnect to Redis within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ok(&c.check(key_header(&key)).await.unwrap().into_inner());
    let d = denied(&c.check(key_header(&key)).await.unwrap().into_inner());
    assert_eq!(d.body["error"], "rate_limited");
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fail_closed_answers_503() {
    let mut redis = PrivateRedis::start().await;
    let url = redis.url();
    let tg = Tollgate::start_with(|c| {
        c.redis.url = Some(SecretUrl(url.clone()));
        c.redis.failure_mode = FailureMode::Closed;
    })
    .await;
    let (key, _) = tg.create_key("c", per_minute(5)).await;
    ok(&tg
        .client()
        .await
        .check(key_header(&key))
        .await
        .unwrap()
        .into_inner());
    redis.stop();
    for _ in 0..3 {
        let (resp, took) = timed_check(&tg, &key).await;
        let d = denied(&resp.into_inner());
        assert_eq!((d.status, d.grpc_code), (503, 14));
        assert_eq!(d.body["error"], "backend_unavailable");
        assert_eq!(d.headers["retry-after"], "1");
        assert!(took < Duration::from_secs(1), "check took {took:?}");
    }
    let m = tg.metrics_text().await;
    assert!(
        m.contains("tollgate_fail_open_total{backend=\"limiter\"} 0\n"),
        "{m}"
    );
    tg.stop().await;
}

/// A Redis that accepts connections and never answers (hung, or a black-holed network): every
/// check still returns within the timeout, and tollgate started although Redis never answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_redis_costs_a_check_at_most_the_timeout() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = silent.accept().await {
            held.push(sock);
        }
    });
    let tg = Tollgate::start_with(|c| {
        c.redis.url = Some(SecretUrl(format!("redis://{addr}")));
        c.redis.timeout = Dur(Duration::from_millis(100));
    })
    .await;
    let (key, _) = tg.create_key("s", per_minute(5)).await;
    for _ in 0..5 {
        let (resp, took) = timed_check(&tg, &key).await;
        ok(&resp.into_inner());
        assert!(took < Duration::from_secs(1), "check took {took:?}");
    }
    let m = tg.metrics_text().await;
    assert!(
        m.contains("tollgate_fail_open_total{backend=\"limiter\"} 5\n"),
        "{m}"
    );
    tg.stop().await;
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tollgate_starts_while_redis_is_down_and_counts_in_it_once_up() {
    let mut redis = PrivateRedis::start().await;
    redis.stop();
    let url = redis.url();
    let tg = Tollgate::start_with(|c| {
        c.redis.url = Some(SecretUrl(url.clone()));
        c.redis.failure_mode = FailureMode::Closed;
    })
    .await;
    let (key, _) = tg.create_key("late", per_minute(1)).await;
    let mut c = tg.client().await;
    let d = denied(&c.check(key_header(&key)).await.unwrap().into_inner());
    assert_eq!(d.status, 503);
    redis.restart().await;
    let started = Instant::now();
    loop {
        let resp = c.check(key_header(&key)).await.unwrap().into_inner();
        if resp.status.as_ref().unwrap().code == 0 {
            break;
        }
        assert_eq!(denied(&resp).status, 503);
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "tollgate did not connect to Redis within 15 s of it starting"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = denied(&c.check(key_header(&key)).await.unwrap().into_inner());
    assert_eq!(d.body["error"], "rate_limited");
    tg.stop().await;
}

/// /readyz fails for a backend that is down only when its failure mode is `closed`: with `open`,
/// tollgate still answers, and taking a sidecar out of service would defeat the mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_redis_and_fails_only_when_its_failure_mode_is_closed() {
    for (mode, status_when_down) in [(FailureMode::Open, 200), (FailureMode::Closed, 503)] {
        let mut redis = PrivateRedis::start().await;
        let url = redis.url();
        let tg = Tollgate::start_with(|c| {
            c.redis.url = Some(SecretUrl(url.clone()));
            c.redis.failure_mode = mode;
        })
        .await;
        let readyz = || async {
            let r = reqwest::get(format!("http://{}/readyz", tg.http))
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        };
        let (status, body) = readyz().await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("database: ok") && body.contains("rate limiter: ok"),
            "{body}"
        );
        redis.stop();
        let (status, body) = readyz().await;
        assert_eq!(status, status_when_down, "{mode:?}: {body}");
        assert!(body.contains("rate limiter: "), "{body}");
        assert!(!body.contains("rate limiter: ok"), "{body}");
        redis.restart().await;
        let started = std::time::Instant::now();
        while readyz().await.0 != 200 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "not ready after Redis returned"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tg.stop().await;
    }
}

/// Two replicas, per-minute windows in Redis: two keys of one identity with a per-minute limit
/// of 6 admit exactly 6 of 40 concurrent Checks between them (a single node: one script per
/// pair; a cluster: hit, hit, take back), each refusal naming the identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_an_identitys_per_minute_limit_in_redis() {
    for url in [redis_url().await, redis_cluster_url().await] {
        let prefix = unique_prefix("ident");
        let configure = |c: &mut tollgate::config::Config| {
            c.redis.url = Some(SecretUrl(url.clone()));
            c.redis.key_prefix = prefix.clone();
            c.redis.failure_mode = FailureMode::Closed;
            c.redis.timeout = Dur(Duration::from_secs(2));
        };
        let a = Tollgate::start_with(configure).await;
        let identity = a
            .stores
            .identities
            .create_identity(
                "acme",
                tollgate::store::IdentityLimitsPatch {
                    per_minute: Some(Some(6)),
                    ..Default::default()
                },
                chrono::Utc::now(),
            )
            .await
            .unwrap();
        let mut keys = Vec::new();
        for name in ["k1", "k2"] {
            let out = a.cli(&[
                "keys",
                "create",
                "--json",
                "--name",
                name,
                "--per-minute",
                "100",
                "--identity",
                &identity.id.to_string(),
            ]);
            assert!(out.status.success(), "{out:?}");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            keys.push(v["key"].as_str().unwrap().to_string());
        }
        let db = a.db_url.clone();
        let b = Tollgate::start_with(|c| {
            configure(c);
            c.database.url = SecretUrl(db.clone());
        })
        .await;
        let clients = [a.client().await, b.client().await];
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let mut c = clients[i % 2].clone();
                let key = keys[(i / 2) % 2].clone();
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
                assert_eq!(d.body["error"], "rate_limited", "{url}");
                assert_eq!(d.body["limit_scope"], "identity", "{url}");
            }
        }
        assert_eq!(allowed, 6, "{url}");
        a.stop().await;
        b.stop().await;
        delete_redis_keys(&url, &prefix).await;
    }
}

/// Each gRPC serving thread counts in Redis on a connection of its own, and the rest of
/// tollgate (`/readyz`) on one more; all of them count in the same windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_serving_thread_has_its_own_redis_connection_and_all_count_in_one_window() {
    let redis = PrivateRedis::start().await;
    let url = redis.url();
    let tg = Tollgate::start_with(|c| {
        c.redis.url = Some(SecretUrl(url.clone()));
        c.grpc.serving_threads = Some(3);
    })
    .await;
    let (key, _) = tg.create_key("lanes", per_minute(6)).await;
    // One gRPC connection per serving thread (each goes to the one with the fewest open).
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(tg.client().await);
    }
    let mut allowed = 0;
    for _ in 0..3 {
        for c in &mut clients {
            let answer = c.check(key_header(&key)).await.unwrap().into_inner();
            allowed += (answer.status.unwrap().code == 0) as u32;
        }
    }
    assert_eq!(allowed, 6, "nine checks against one limit of six a minute");
    let ready = reqwest::get(format!("http://{}/readyz", tg.http))
        .await
        .unwrap();
    assert!(ready.status().is_success());
    let mut admin = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut admin)
        .await
        .unwrap();
    // Every client but this one is tollgate's.
    assert_eq!(list.lines().count() - 1, 4, "{list}");
    drop(clients);
    tg.stop().await;
}
