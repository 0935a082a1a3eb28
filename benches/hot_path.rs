//! Criterion benchmarks of the pure code every check runs: key hashing and shape
//! checks, the key cache's hit path, descriptor matching, header and problem-body formatting, and
//! the window arithmetic. `cargo bench`; `cargo bench -- rules` runs one group.
//!
//! These time single calls on one core; `scripts/bench` measures the whole service.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::config::{CacheConfig, DatabaseConfig, Dur, SecretUrl};
use tollgate::decision::{Denial, DenyReason, LimitKind, LimitState, rate_limit_headers};
use tollgate::keys::{self, Limits, cache::KeyCache};
use tollgate::limiter::memory::MemoryLimiter;
use tollgate::limiter::{
    Algorithm, Bucket, Fixed, Rate, Sliding, WindowLimiter, bucket_hit, fixed_hit, sliding_hit,
    window_start_ms,
};
use tollgate::ratelimit::rules::Rules;

/// 2026-03-10 12:00:20 UTC in ms.
const NOW_MS: i64 = 1_773_144_020_000;

fn keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("keys");
    let key = keys::generate().plaintext;
    let hash = keys::hash(&key);
    g.bench_function("hash", |b| b.iter(|| keys::hash(black_box(&key))));
    g.bench_function("is_well_formed/good", |b| {
        b.iter(|| keys::is_well_formed(black_box(&key)))
    });
    let garbage = "x".repeat(512);
    g.bench_function("is_well_formed/512 bytes of garbage", |b| {
        b.iter(|| keys::is_well_formed(black_box(&garbage)))
    });
    g.bench_function("hash_hex", |b| b.iter(|| keys::hash_hex(black_box(&hash))));
    g.finish();
}

/// The cache's hit path with 1,000 keys cached, on a SQLite store in a temporary directory.
fn key_cache(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = DatabaseConfig {
        url: SecretUrl(format!(
            "sqlite://{}",
            dir.path().join("bench.db").display()
        )),
        ..Default::default()
    };
    let (cache, hashes) = rt.block_on(async {
        let stores = tollgate::store::open(&config, true).await.expect("sqlite");
        let cache = KeyCache::new(
            stores.keys.clone(),
            &CacheConfig {
                key_ttl: Dur(Duration::from_secs(3600)),
                negative_ttl: Dur(Duration::from_secs(3600)),
                ..Default::default()
            },
        );
        let now = chrono::Utc::now();
        let mut hashes = Vec::new();
        for i in 0..1000 {
            let key = keys::generate();
            stores
                .keys
                .create(&tollgate::store::KeyRecord {
                    key: &key,
                    name: &format!("k{i}"),
                    limits: Limits::default(),
                    expires_at: None,
                    created_at: now,
                    permissions: &[],
                    metadata: &Default::default(),
                    identity_id: None,
                })
                .await
                .expect("create");
            cache.lookup(&key.hash).await.expect("lookup");
            hashes.push(key.hash);
        }
        (Arc::new(cache), hashes)
    });
    let mut g = c.benchmark_group("key_cache");
    g.bench_function("lookup hit (1,000 cached)", |b| {
        let mut i = 0;
        b.to_async(&rt).iter(|| {
            i = (i + 1) % hashes.len();
            let (cache, hash) = (cache.clone(), hashes[i]);
            async move { cache.lookup(&hash).await.expect("lookup") }
        })
    });
    g.bench_function("lookup_id hit", |b| {
        let cache = &cache;
        b.to_async(&rt)
            .iter(|| async move { cache.lookup_id(black_box(1)).await.expect("lookup_id") })
    });
    g.finish();
}

/// A rules set shaped like a real one: several domains, nested descriptors, wildcards, a
/// per-value rule among many bare-key ones.
const RULES: &str = r#"
domain: api
descriptors:
  - key: path
    value: /v1/search*
    rate_limit: { unit: minute, requests_per_unit: 2 }
  - key: path
    value: /v1/admin/*
    rate_limit: { unit: minute, requests_per_unit: 10 }
  - key: path
    rate_limit: { unit: minute, requests_per_unit: 1000 }
  - key: remote_address
    rate_limit: { unit: second, requests_per_unit: 50, algorithm: token_bucket }
  - key: tenant
    value: acme
    descriptors:
      - key: plan
        value: gold
        rate_limit: { unit: second, requests_per_unit: 500 }
      - key: plan
        rate_limit: { unit: second, requests_per_unit: 50 }
  - key: tenant
    descriptors:
      - key: plan
        value: free
        rate_limit: { unit: hour, requests_per_unit: 100 }
      - key: plan
        rate_limit: { unit: minute, requests_per_unit: 100 }
  - key: generic_key
    value: unlimited
    rate_limit: { unlimited: true }
"#;

fn rules(c: &mut Criterion) {
    // Nine more domains, so the domain lookup is not trivially a one-entry map.
    let mut texts = vec![("api.yaml".to_string(), RULES.to_string())];
    for i in 0..9 {
        texts.push((
            format!("other{i}.yaml"),
            RULES.replace("domain: api", &format!("domain: other{i}")),
        ));
    }
    let rules = Rules::from_texts(
        texts
            .iter()
            .map(|(p, t)| (Path::new(p.as_str()), t.as_str())),
        false,
    )
    .expect("rules");
    let mut g = c.benchmark_group("rules");
    let cases: [(&str, &[(&str, &str)]); 5] = [
        ("bare key", &[("path", "/v1/orders/42")]),
        ("wildcard value", &[("path", "/v1/search/books")]),
        ("nested exact", &[("tenant", "acme"), ("plan", "gold")]),
        ("nested fallback", &[("tenant", "globex"), ("plan", "pro")]),
        ("no match", &[("user_agent", "curl/8")]),
    ];
    for (name, entries) in cases {
        g.bench_function(format!("find/{name}"), |b| {
            b.iter(|| rules.find(black_box("api"), black_box(entries)))
        });
    }
    g.finish();
}

fn decision(c: &mut Criterion) {
    let mut g = c.benchmark_group("decision");
    let states = [
        LimitState {
            kind: LimitKind::PerMinute,
            limit: 100,
            remaining: 42,
            reset_after: 18,
            window_secs: 60,
            scope: Default::default(),
        },
        LimitState {
            kind: LimitKind::Daily,
            limit: 10_000,
            remaining: 9_000,
            reset_after: 40_000,
            window_secs: 86_400,
            scope: Default::default(),
        },
        LimitState {
            kind: LimitKind::Monthly,
            limit: 100_000,
            remaining: 80_000,
            reset_after: 1_000_000,
            window_secs: 2_678_400,
            scope: Default::default(),
        },
    ];
    g.bench_function("rate_limit_headers/3 limits", |b| {
        b.iter(|| rate_limit_headers(black_box(&states)))
    });
    let limited = Denial {
        reason: DenyReason::RateLimited,
        retry_after: Some(18),
        limit: Some(LimitState {
            remaining: 0,
            ..states[0]
        }),
        key_id: Some(7),
        permission: None,
    };
    g.bench_function("Denial::body/rate_limited", |b| {
        b.iter(|| black_box(&limited).body())
    });
    g.bench_function("Denial::headers/rate_limited", |b| {
        b.iter(|| black_box(&limited).headers())
    });
    let missing = Denial::new(DenyReason::MissingKey);
    g.bench_function("Denial::body/missing_key", |b| {
        b.iter(|| black_box(&missing).body())
    });
    g.finish();
}

fn windows(c: &mut Criterion) {
    let mut g = c.benchmark_group("windows");
    let fixed = Rate::new(100, 60, Algorithm::FixedWindow);
    let sliding = Rate::new(100, 60, Algorithm::SlidingWindow);
    let bucket = Rate::new(100, 60, Algorithm::TokenBucket);
    g.bench_function("window_start_ms", |b| {
        b.iter(|| window_start_ms(black_box(NOW_MS), black_box(60)))
    });
    let f = Fixed {
        start_ms: window_start_ms(NOW_MS, 60),
        count: 40,
    };
    g.bench_function("fixed_hit", |b| {
        b.iter(|| fixed_hit(black_box(f), fixed, 1, black_box(NOW_MS)))
    });
    let s = Sliding {
        start_ms: window_start_ms(NOW_MS, 60),
        prev: 60,
        cur: 20,
    };
    g.bench_function("sliding_hit", |b| {
        b.iter(|| sliding_hit(black_box(s), sliding, 1, black_box(NOW_MS)))
    });
    let t = Bucket {
        base_ms: NOW_MS - 1_000,
        debt: 30 * 60_000,
    };
    g.bench_function("bucket_hit", |b| {
        b.iter(|| bucket_hit(black_box(t), bucket, 1, black_box(NOW_MS)))
    });

    // The in-process limiter around them: a shard lock, a map lookup, the arithmetic.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let limiter = MemoryLimiter::new();
    let now = chrono::DateTime::from_timestamp_millis(NOW_MS).expect("time");
    let big = Rate::new(u64::MAX / 2, 60, Algorithm::FixedWindow);
    let limiter = &limiter;
    g.bench_function("MemoryLimiter::hit/hot key", |b| {
        b.to_async(&rt)
            .iter(|| async move { limiter.hit(black_box("key:1"), big, 1, now).await })
    });
    let spread: Vec<String> = (0..10_000).map(|i| format!("key:{i}")).collect();
    g.bench_function("MemoryLimiter::hit/10,000 keys", |b| {
        let mut i = 0;
        b.to_async(&rt).iter(|| {
            i = (i + 1) % spread.len();
            let key = spread[i].as_str();
            async move { limiter.hit(key, big, 1, now).await }
        })
    });
    g.finish();
}

criterion_group!(benches, keys, key_cache, rules, decision, windows);
criterion_main!(benches);
