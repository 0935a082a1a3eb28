//! A Redis Cluster node that lost tollgate's scripts (restarted, failed over) gets them again:
//! scripts run by EVALSHA, and a NOSCRIPT answer loads the script and retries.
//!
//! A file of its own, so no other test runs while this one flushes the test cluster's scripts
//! (test binaries run one after another). The shared single node is never flushed; its restart
//! case is in authz_redis.rs, with a private server.

use std::time::Duration;

use chrono::{DateTime, Utc};
use harness::redis::{delete_redis_keys, node_connections, redis_cluster_url, unique_prefix};
use tollgate::limiter::redis::RedisLimiter;
use tollgate::limiter::{Algorithm, Rate, WindowLimiter};

async fn flush_scripts(url: &str) {
    for mut c in node_connections(url).await {
        let _: String = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut c)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_nodes_that_lost_the_scripts_get_them_again() {
    let url = redis_cluster_url().await;
    let prefix = unique_prefix("scripts");
    let l = RedisLimiter::new(&url, &prefix, Duration::from_secs(5)).unwrap();
    let now: DateTime<Utc> = "2026-03-10T12:00:20Z".parse().unwrap();
    for alg in [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
        Algorithm::TokenBucket,
    ] {
        let r = Rate::new(2, 60, alg);
        // Twelve counters spread over the three nodes, so every node needs every script.
        for i in 0..12 {
            let key = format!("key:{i}");
            flush_scripts(&url).await;
            assert!(l.hit(&key, r, 1, now).await.unwrap().allowed, "{alg:?}");
            flush_scripts(&url).await;
            l.refund(&key, r, 1, now).await.unwrap();
            flush_scripts(&url).await;
            let s = l.hit(&key, r, 2, now).await.unwrap();
            assert_eq!((s.allowed, s.remaining), (true, 0), "{alg:?}");
        }
    }
    delete_redis_keys(&url, &prefix).await;
}
