//! Compatibility with envoyproxy/ratelimit: the examples of that service's README, written out as
//! fixtures (tests/fixtures/ratelimit-compat/*.yaml) with the decisions its README says they
//! produce, run against tollgate's ShouldRateLimit over gRPC.
//!
//! A fixture holds `rules` (a rules file, verbatim) and `steps`: each step sends `descriptors`
//! (a list of descriptors, each a list of [key, value]) `repeat` times (default 1) and expects the
//! overall code (`OK` / `OVER_LIMIT`), optionally each descriptor's code (`statuses`), the first
//! descriptor's `limit` ([requests_per_unit, unit] or `none`) and its `remaining`.

use std::path::Path;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor::Entry,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, rate_limit_response::Code};
use harness::server::Tollgate;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    rules: String,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    descriptors: Vec<Vec<(String, String)>>,
    #[serde(default = "one")]
    repeat: usize,
    expect: String,
    #[serde(default)]
    statuses: Option<Vec<String>>,
    #[serde(default)]
    limit: Option<serde_yaml::Value>,
    #[serde(default)]
    remaining: Option<u32>,
}

fn one() -> usize {
    1
}

fn code(name: &str) -> i32 {
    match name {
        "OK" => Code::Ok as i32,
        "OVER_LIMIT" => Code::OverLimit as i32,
        other => panic!("unknown code {other}"),
    }
}

fn unit(name: &str) -> i32 {
    [
        "unknown", "second", "minute", "hour", "day", "month", "year", "week",
    ]
    .iter()
    .position(|u| *u == name)
    .unwrap_or_else(|| panic!("unknown unit {name}")) as i32
}

async fn run_fixture(path: &Path) {
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let fixture: Fixture = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let domain = fixture
        .rules
        .lines()
        .find_map(|l| l.strip_prefix("domain: "))
        .unwrap()
        .trim()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, &fixture.rules).unwrap();
    let tg = Tollgate::start_with(|c| c.ratelimit.rules = Some(rules.clone())).await;
    let mut c = tg.ratelimit_client().await;
    for (i, step) in fixture.steps.iter().enumerate() {
        let request = RateLimitRequest {
            domain: domain.clone(),
            descriptors: step
                .descriptors
                .iter()
                .map(|d| RateLimitDescriptor {
                    entries: d
                        .iter()
                        .map(|(k, v)| Entry {
                            key: k.clone(),
                            value: v.clone(),
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            hits_addend: 0,
        };
        for n in 0..step.repeat {
            let r = c
                .should_rate_limit(request.clone())
                .await
                .unwrap()
                .into_inner();
            let at = format!("{name} step {i} request {n}");
            assert_eq!(r.overall_code, code(&step.expect), "{at}: {r:?}");
            if let Some(statuses) = &step.statuses {
                let got: Vec<i32> = r.statuses.iter().map(|s| s.code).collect();
                let want: Vec<i32> = statuses.iter().map(|s| code(s)).collect();
                assert_eq!(got, want, "{at}");
            }
            let first = &r.statuses[0];
            match &step.limit {
                None => {}
                Some(serde_yaml::Value::String(s)) if s == "none" => {
                    assert!(first.current_limit.is_none(), "{at}: {first:?}")
                }
                Some(v) => {
                    let (rpu, u): (u32, String) = serde_yaml::from_value(v.clone()).unwrap();
                    let limit = first
                        .current_limit
                        .as_ref()
                        .unwrap_or_else(|| panic!("{at}"));
                    assert_eq!(
                        (limit.requests_per_unit, limit.unit),
                        (rpu, unit(&u)),
                        "{at}"
                    );
                }
            }
            if let Some(remaining) = step.remaining {
                assert_eq!(first.limit_remaining, remaining, "{at}");
            }
        }
    }
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoyproxy_ratelimit_readme_examples_decide_the_same() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ratelimit-compat");
    let mut fixtures: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    fixtures.sort();
    assert!(fixtures.len() >= 10, "fixtures missing: {fixtures:?}");
    for f in fixtures {
        run_fixture(&f).await;
    }
}
