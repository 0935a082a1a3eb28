//! One behaviour suite for every window store: in-process, Redis single node, Redis Cluster.
//! Each case runs against each backend (the `every_backend!` macro at the end), with a driven
//! clock. The Redis backends need the real servers that scripts/test starts; without them the
//! tests fail, naming the missing service.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use harness::redis::{
    delete_redis_keys, keys_on, node_connections, redis_cluster_url, redis_keys, redis_url,
    unique_prefix,
};
use tollgate::limiter::memory::MemoryLimiter;
use tollgate::limiter::redis::RedisLimiter;
use tollgate::limiter::{
    Algorithm, Bucket, Fixed, Rate, Sliding, WindowLimiter, WindowState, bucket_hit, bucket_refund,
    fixed_hit, fixed_refund, sliding_hit, sliding_refund,
};

use Algorithm::{FixedWindow, SlidingWindow, TokenBucket};

/// A backend under test, with a key space of its own.
struct Backend {
    limiter: Arc<dyn WindowLimiter>,
    /// Redis URL and key prefix, to check and delete the keys afterwards.
    redis: Option<(String, String)>,
}

impl Backend {
    async fn memory() -> Backend {
        Backend {
            limiter: Arc::new(MemoryLimiter::new()),
            redis: None,
        }
    }

    async fn redis_node() -> Backend {
        Self::redis(redis_url().await).await
    }

    async fn redis_cluster() -> Backend {
        Self::redis(redis_cluster_url().await).await
    }

    async fn redis(url: String) -> Backend {
        let prefix = unique_prefix("limiter");
        // Generous: these tests assert behaviour, not latency, on a 2-core machine.
        let limiter = RedisLimiter::new(&url, &prefix, Duration::from_secs(5)).unwrap();
        Backend {
            limiter: Arc::new(limiter),
            redis: Some((url, prefix)),
        }
    }

    async fn hit(&self, key: &str, rate: Rate, cost: u64, now: DateTime<Utc>) -> WindowState {
        self.limiter.hit(key, rate, cost, now).await.unwrap()
    }

    async fn refund(&self, key: &str, rate: Rate, cost: u64, now: DateTime<Utc>) {
        self.limiter.refund(key, rate, cost, now).await.unwrap()
    }

    async fn cleanup(self) {
        if let Some((url, prefix)) = &self.redis {
            delete_redis_keys(url, prefix).await;
        }
    }
}

/// 2026-03-10 12:00:00 UTC plus `ms`.
fn at(ms: i64) -> DateTime<Utc> {
    "2026-03-10T12:00:00Z".parse::<DateTime<Utc>>().unwrap() + chrono::Duration::milliseconds(ms)
}

fn per_minute(limit: u64, alg: Algorithm) -> Rate {
    Rate::new(limit, 60, alg)
}

/// (allowed, remaining, reset_after)
fn arr(s: WindowState) -> (bool, u64, u64) {
    (s.allowed, s.remaining, s.reset_after)
}

// --- every algorithm ---------------------------------------------------------------------------

async fn admits_exactly_the_limit(b: &Backend) {
    for alg in [FixedWindow, SlidingWindow, TokenBucket] {
        let r = per_minute(5, alg);
        for left in (0..5).rev() {
            let s = b.hit("key:1", r, 1, at(20_000)).await;
            assert_eq!(
                (s.allowed, s.remaining, s.limit),
                (true, left, 5),
                "{alg:?}"
            );
        }
        let s = b.hit("key:1", r, 1, at(20_000)).await;
        assert_eq!((s.allowed, s.remaining), (false, 0), "{alg:?}");
        // Another counter is not affected.
        assert!(b.hit("key:2", r, 1, at(20_000)).await.allowed, "{alg:?}");
    }
}

async fn a_cost_that_does_not_fit_counts_nothing(b: &Backend) {
    for alg in [FixedWindow, SlidingWindow, TokenBucket] {
        let r = per_minute(5, alg);
        assert!(b.hit("key:1", r, 4, at(20_000)).await.allowed, "{alg:?}");
        for _ in 0..3 {
            assert!(!b.hit("key:1", r, 2, at(20_000)).await.allowed, "{alg:?}");
        }
        let s = b.hit("key:1", r, 1, at(20_000)).await;
        assert_eq!((s.allowed, s.remaining), (true, 0), "{alg:?}");
        assert!(!b.hit("key:1", r, 1, at(20_000)).await.allowed, "{alg:?}");
        assert!(!b.hit("key:1", r, 6, at(20_000)).await.allowed, "{alg:?}");
    }
}

async fn a_refund_gives_the_hit_back(b: &Backend) {
    for alg in [FixedWindow, SlidingWindow, TokenBucket] {
        let r = per_minute(2, alg);
        assert!(b.hit("key:1", r, 2, at(20_000)).await.allowed, "{alg:?}");
        assert!(!b.hit("key:1", r, 1, at(20_000)).await.allowed, "{alg:?}");
        b.refund("key:1", r, 1, at(20_000)).await;
        assert!(b.hit("key:1", r, 1, at(20_000)).await.allowed, "{alg:?}");
        assert!(!b.hit("key:1", r, 1, at(20_000)).await.allowed, "{alg:?}");
        // Refunding more than was counted gives no credit beyond the limit.
        b.refund("key:2", r, 5, at(20_000)).await;
        b.hit("key:2", r, 1, at(20_000)).await;
        b.refund("key:2", r, 5, at(20_000)).await;
        assert!(b.hit("key:2", r, 2, at(20_000)).await.allowed, "{alg:?}");
        assert!(!b.hit("key:2", r, 1, at(20_000)).await.allowed, "{alg:?}");
    }
}

async fn hundreds_of_concurrent_hits_admit_exactly_the_limit(b: &Backend) {
    for alg in [FixedWindow, SlidingWindow, TokenBucket] {
        let r = per_minute(100, alg);
        let tasks: Vec<_> = (0..300)
            .map(|_| {
                let l = b.limiter.clone();
                tokio::spawn(async move { l.hit("key:hot", r, 1, at(20_000)).await.unwrap() })
            })
            .collect();
        let mut allowed = 0;
        for t in tasks {
            allowed += t.await.unwrap().allowed as u32;
        }
        assert_eq!(allowed, 100, "{alg:?}");
    }
}

/// Two counters hit both or neither (a key's own window and its identity's): a pair refused by
/// either counts nothing in either, and under concurrency the shared counter admits exactly its
/// limit across pairs of different first counters.
async fn a_pair_is_hit_both_or_neither(b: &Backend) {
    for alg in [FixedWindow, SlidingWindow, TokenBucket] {
        let (own, shared) = (per_minute(2, alg), per_minute(5, alg));
        let pair = |k: &'static str| {
            let l = b.limiter.clone();
            async move {
                l.hit_both((k, own), ("identity:1", shared), 1, at(20_000))
                    .await
                    .unwrap()
            }
        };
        for left in [1, 0] {
            let (a, s) = pair("key:1").await;
            assert!(a.allowed && s.unwrap().allowed, "{alg:?}");
            assert_eq!(a.remaining, left, "{alg:?}");
        }
        // key:1's own window is full: nothing counted in the shared one.
        let (a, s) = pair("key:1").await;
        assert!(!a.allowed && s.is_none(), "{alg:?}");
        assert_eq!(
            b.hit("identity:1", shared, 0, at(20_000)).await.remaining,
            3,
            "{alg:?}"
        );
        // The shared window has 3 left: of 20 concurrent pairs over 10 keys, exactly 3 pass,
        // and the refused ones leave their own windows as they were.
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let l = b.limiter.clone();
                let k = format!("key:x{}", i % 10);
                tokio::spawn(async move {
                    let (a, s) = l
                        .hit_both((&k, own), ("identity:1", shared), 1, at(20_000))
                        .await
                        .unwrap();
                    a.allowed && s.is_some_and(|s| s.allowed)
                })
            })
            .collect();
        let mut allowed = 0;
        for t in tasks {
            allowed += t.await.unwrap() as u32;
        }
        assert_eq!(allowed, 3, "{alg:?}");
        let mut own_hits = 0;
        for i in 0..10 {
            own_hits += 2 - b
                .hit(&format!("key:x{i}"), own, 0, at(20_000))
                .await
                .remaining;
        }
        assert_eq!(
            own_hits, 3,
            "{alg:?}: only admitted pairs count in their own windows"
        );
        if let Some((url, prefix)) = &b.redis {
            delete_redis_keys(url, prefix).await;
        }
    }
}

/// A long pseudo-random run of hits and refunds, with costs and clock steps, gives exactly the
/// answers of the pure functions in `tollgate::limiter`, which are what the unit tests check.
async fn agrees_with_the_model_step_by_step(b: &Backend) {
    for alg in [FixedWindow, SlidingWindow, TokenBucket] {
        let r = Rate::new(7, 10, alg);
        let (mut fixed, mut sliding, mut bucket) =
            (Fixed::default(), Sliding::default(), Bucket::default());
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        let mut now = 0i64;
        for step in 0..300 {
            now += next(4) as i64 * next(1_500) as i64;
            let cost = 1 + next(3);
            let t = at(now);
            let t_ms = t.timestamp_millis();
            if next(8) == 0 {
                b.refund("key:m", r, cost, t).await;
                match alg {
                    FixedWindow => fixed = fixed_refund(fixed, r, cost, t_ms),
                    SlidingWindow => sliding = sliding_refund(sliding, r, cost, t_ms),
                    TokenBucket => bucket = bucket_refund(bucket, r, cost, t_ms),
                }
                continue;
            }
            let got = b.hit("key:m", r, cost, t).await;
            let want = match alg {
                FixedWindow => {
                    let (s, w) = fixed_hit(fixed, r, cost, t_ms);
                    fixed = s;
                    w
                }
                SlidingWindow => {
                    let (s, w) = sliding_hit(sliding, r, cost, t_ms);
                    sliding = s;
                    w
                }
                TokenBucket => {
                    let (s, w) = bucket_hit(bucket, r, cost, t_ms);
                    bucket = s;
                    w
                }
            };
            assert_eq!(got, want, "{alg:?} step {step} at +{now} ms, cost {cost}");
        }
    }
}

// --- fixed window ------------------------------------------------------------------------------

async fn fixed_window_resets_when_the_minute_turns(b: &Backend) {
    let r = per_minute(3, FixedWindow);
    for left in [2, 1, 0] {
        assert_eq!(
            arr(b.hit("key:1", r, 1, at(20_000)).await),
            (true, left, 40)
        );
    }
    assert_eq!(arr(b.hit("key:1", r, 1, at(20_500)).await), (false, 0, 40));
    assert_eq!(arr(b.hit("key:1", r, 1, at(58_100)).await), (false, 0, 2));
    // The next minute starts from zero (fixed windows allow this burst across the edge).
    assert_eq!(arr(b.hit("key:1", r, 1, at(60_000)).await), (true, 2, 60));
    // A refund takes off this minute's count, never below zero.
    b.refund("key:1", r, 3, at(60_000)).await;
    for left in [2, 1, 0] {
        assert_eq!(
            arr(b.hit("key:1", r, 1, at(61_000)).await),
            (true, left, 59)
        );
    }
    assert!(!b.hit("key:1", r, 1, at(61_000)).await.allowed);
}

// --- sliding window ----------------------------------------------------------------------------

async fn sliding_window_allows_no_double_burst_across_the_edge(b: &Backend) {
    let r = per_minute(10, SlidingWindow);
    for left in (0..10).rev() {
        assert_eq!(arr(b.hit("key:1", r, 1, at(59_000)).await), (true, left, 1));
    }
    assert!(!b.hit("key:1", r, 1, at(59_000)).await.allowed);
    // Right after the edge the full previous minute still weighs 59/60: refused, and told to
    // come back when a tenth of the window has passed (12:01:06).
    assert_eq!(arr(b.hit("key:1", r, 1, at(61_000)).await), (false, 0, 5));
    assert_eq!(arr(b.hit("key:1", r, 1, at(65_999)).await), (false, 0, 1));
    assert_eq!(arr(b.hit("key:1", r, 1, at(66_000)).await), (true, 0, 54));
    // Half way: the previous minute weighs 5, this one has 1: room for 4.
    assert_eq!(arr(b.hit("key:1", r, 1, at(90_000)).await), (true, 3, 30));
    // Two minutes on, nothing weighs.
    assert_eq!(arr(b.hit("key:1", r, 1, at(180_000)).await), (true, 9, 60));
}

async fn sliding_window_full_minute_waits_into_the_next(b: &Backend) {
    let r = per_minute(4, SlidingWindow);
    assert!(b.hit("key:1", r, 4, at(45_000)).await.allowed);
    // 4 counted: room again only when 4 × (60 − e)/60 + 1 ≤ 4 in the next minute, e ≥ 15 s.
    assert_eq!(arr(b.hit("key:1", r, 1, at(45_000)).await), (false, 0, 30));
    assert!(!b.hit("key:1", r, 1, at(74_999)).await.allowed);
    assert!(b.hit("key:1", r, 1, at(75_000)).await.allowed);
}

// --- token bucket ------------------------------------------------------------------------------

async fn token_bucket_bursts_then_refills_one_per_interval(b: &Backend) {
    // 3 per minute: one token every 20 s.
    let r = per_minute(3, TokenBucket);
    for (left, reset) in [(2, 20), (1, 40), (0, 60)] {
        assert_eq!(
            arr(b.hit("key:1", r, 1, at(20_000)).await),
            (true, left, reset)
        );
    }
    assert_eq!(arr(b.hit("key:1", r, 1, at(20_500)).await), (false, 0, 20));
    assert_eq!(arr(b.hit("key:1", r, 1, at(39_999)).await), (false, 0, 1));
    assert_eq!(arr(b.hit("key:1", r, 1, at(40_000)).await), (true, 0, 60));
    // Cost 2 fits 40 s later; after a full minute idle the bucket is full again.
    assert_eq!(arr(b.hit("key:1", r, 2, at(40_000)).await), (false, 0, 40));
    assert_eq!(arr(b.hit("key:1", r, 1, at(100_000)).await), (true, 2, 20));
}

async fn token_bucket_refund_never_goes_before_now(b: &Backend) {
    let r = per_minute(2, TokenBucket);
    assert!(b.hit("key:1", r, 2, at(0)).await.allowed);
    // 30 s later one token is back; refunding 5 only fills the bucket.
    b.refund("key:1", r, 5, at(30_000)).await;
    assert_eq!(arr(b.hit("key:1", r, 2, at(30_000)).await), (true, 0, 60));
    assert!(!b.hit("key:1", r, 1, at(30_000)).await.allowed);
}

// --- Redis specifics ---------------------------------------------------------------------------

/// Keys carry the prefix and the counter key as a hash tag, and expire.
async fn redis_keys_are_tagged_and_expire(b: &Backend) {
    let Some((url, prefix)) = &b.redis else {
        return;
    };
    for alg in [FixedWindow, SlidingWindow, TokenBucket] {
        b.hit("key:42", per_minute(5, alg), 1, at(20_000)).await;
    }
    let mut keys = redis_keys(url, prefix).await;
    keys.sort();
    let start = at(0).timestamp_millis();
    assert_eq!(
        keys,
        vec![
            format!("{prefix}{{key:42}}:fw:60:{start}"),
            format!("{prefix}{{key:42}}:sw:60"),
            format!("{prefix}{{key:42}}:tb:60"),
        ]
    );
    // All on one node (one cluster slot, by the hash tag), each with a time to live.
    let mut nodes_holding = 0;
    for mut c in node_connections(url).await {
        let here = keys_on(&mut c, prefix).await;
        if here.is_empty() {
            continue;
        }
        nodes_holding += 1;
        assert_eq!(here.len(), 3, "{here:?}");
        for key in &here {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(key)
                .query_async(&mut c)
                .await
                .unwrap();
            assert!(0 < ttl && ttl <= 125_000, "{key}: {ttl}");
        }
    }
    assert_eq!(nodes_holding, 1);
}

macro_rules! behaviour_suite {
    ($backend:ident: $($case:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let b = super::Backend::$backend().await;
                    super::$case(&b).await;
                    b.cleanup().await;
                }
            )*
        }
    };
}

macro_rules! every_backend {
    ($($case:ident),* $(,)?) => {
        behaviour_suite!(memory: $($case),*);
        behaviour_suite!(redis_node: $($case),*);
        behaviour_suite!(redis_cluster: $($case),*);
    };
}

every_backend!(
    admits_exactly_the_limit,
    a_cost_that_does_not_fit_counts_nothing,
    a_refund_gives_the_hit_back,
    hundreds_of_concurrent_hits_admit_exactly_the_limit,
    a_pair_is_hit_both_or_neither,
    agrees_with_the_model_step_by_step,
    fixed_window_resets_when_the_minute_turns,
    sliding_window_allows_no_double_burst_across_the_edge,
    sliding_window_full_minute_waits_into_the_next,
    token_bucket_bursts_then_refills_one_per_interval,
    token_bucket_refund_never_goes_before_now,
    redis_keys_are_tagged_and_expire,
);
