//! Memory stays bounded whatever values clients send: a `tollgate serve` process with in-process
//! counters is flooded through ShouldRateLimit with 200,000 distinct 250-byte values of a bare
//! key rule, and its resident memory may grow by at most 64 MiB. A hot value asked about
//! between the flood's batches is still limited exactly, and the evictions are counted.

use std::time::Instant;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor::Entry,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{
    RateLimitRequest, RateLimitResponse, rate_limit_response::Code,
    rate_limit_service_client::RateLimitServiceClient,
};
use harness::replica::Replica;
use tonic::transport::Channel;

/// A bare `value` rule counts every value on its own; values starting with `hot` have a limit
/// of their own. Token buckets over a day: nothing refills or expires while the test runs, so
/// the hot value's count is exact and every flood counter is still live when it is evicted.
const RULES: &str = "domain: memory
descriptors:
  - key: value
    value: hot*
    rate_limit: {unit: day, requests_per_unit: 50, algorithm: token_bucket}
  - key: value
    rate_limit: {unit: day, requests_per_unit: 1000, algorithm: token_bucket}
";

const VALUES: usize = 200_000;
const VALUE_LEN: usize = 250;
const PER_REQUEST: usize = 100;
const CLIENTS: usize = 4;
/// A hot request after every this many flood requests of each client.
const HOT_EVERY: usize = 5;
const BUDGET: u64 = 64 << 20;

/// A 250-byte value, distinct for each `i`, that does not start with `hot`.
fn flood_value(i: usize) -> String {
    let mut v = format!("v{i:09}-");
    while v.len() < VALUE_LEN {
        v.push(char::from(b'a' + ((v.len() * 7 + i) % 26) as u8));
    }
    v
}

fn request(values: impl IntoIterator<Item = String>) -> RateLimitRequest {
    RateLimitRequest {
        domain: "memory".into(),
        descriptors: values
            .into_iter()
            .map(|value| RateLimitDescriptor {
                entries: vec![Entry {
                    key: "value".into(),
                    value,
                }],
                ..Default::default()
            })
            .collect(),
        hits_addend: 0,
    }
}

async fn ask(c: &mut RateLimitServiceClient<Channel>, r: RateLimitRequest) -> RateLimitResponse {
    c.should_rate_limit(r).await.unwrap().into_inner()
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/PID/status");
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_values_grows_memory_by_at_most_64_mib() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, RULES).unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let replica = Replica::spawn(
        dir.path(),
        &[
            ("TOLLGATE_DATABASE_URL", db.as_str()),
            ("TOLLGATE_RATELIMIT_RULES", rules.to_str().unwrap()),
        ],
    )
    .await;
    let hot = format!("hot{}", "h".repeat(VALUE_LEN - 3));

    // Warm up each connection (and the allocator) before the baseline.
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let mut client = replica.ratelimit_client().await;
        let warm = (0..PER_REQUEST).map(|i| format!("warm-{c}-{i}"));
        assert_eq!(
            ask(&mut client, request(warm)).await.overall_code,
            Code::Ok as i32
        );
        clients.push(client);
    }
    let before = rss(replica.pid());

    let started = Instant::now();
    let per_client = VALUES / CLIENTS;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, mut client)| {
            let hot = hot.clone();
            tokio::spawn(async move {
                let first = c * per_client;
                let mut hot_allowed = 0;
                let mut hot_asked = 0;
                for (n, start) in (first..first + per_client).step_by(PER_REQUEST).enumerate() {
                    let r = ask(
                        &mut client,
                        request((start..start + PER_REQUEST).map(flood_value)),
                    )
                    .await;
                    assert_eq!(r.overall_code, Code::Ok as i32, "a flood value refused");
                    assert_eq!(r.statuses.len(), PER_REQUEST);
                    if n % HOT_EVERY == 0 {
                        let r = ask(&mut client, request([hot.clone()])).await;
                        hot_asked += 1;
                        hot_allowed += usize::from(r.overall_code == Code::Ok as i32);
                    }
                }
                (hot_asked, hot_allowed)
            })
        })
        .collect();
    let (mut hot_asked, mut hot_allowed) = (0, 0);
    for t in tasks {
        let (asked, allowed) = t.await.unwrap();
        hot_asked += asked;
        hot_allowed += allowed;
    }
    let took = started.elapsed();
    let after = rss(replica.pid());
    let growth = after.saturating_sub(before);
    let metrics = replica.metrics_text().await;
    eprintln!(
        "{VALUES} distinct {VALUE_LEN}-byte values in {took:.1?}: RSS {} MiB -> {} MiB, \
         growth {:.1} MiB; hot value {hot_allowed} of {hot_asked} allowed; counters held {:?}, \
         evicted {:?}",
        before >> 20,
        after >> 20,
        growth as f64 / f64::from(1 << 20),
        metric(&metrics, "tollgate_limiter_counters"),
        metric(&metrics, "tollgate_limiter_counters_evicted_total"),
    );

    assert!(
        hot_asked > 50,
        "the hot value must be asked about more than its limit"
    );
    assert_eq!(hot_allowed, 50, "the hot value is limited exactly");
    assert!(
        growth <= BUDGET,
        "RSS grew by {growth} bytes (more than 64 MiB) for {VALUES} distinct values"
    );
    let evicted = metric(&metrics, "tollgate_limiter_counters_evicted_total")
        .expect("tollgate_limiter_counters_evicted_total in /metrics");
    assert!(evicted > 0, "no eviction counted");
    let held = metric(&metrics, "tollgate_limiter_counters").expect("tollgate_limiter_counters");
    assert!(
        held <= 100_000,
        "{held} counters held, more than the default cap"
    );
    assert_eq!(replica.stop_with("-TERM").await.code(), Some(0));
}
