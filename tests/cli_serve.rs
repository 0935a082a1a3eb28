//! The `tollgate` binary as users and scripts drive it: `serve` with signals, health and metrics;
//! `keys`, `migrate` and `check-config` with their outputs and exit codes.

use std::process::{Command, Output};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use harness::check::{check_request, key_header};
use harness::cli::{cli_create_key, tollgate_command};
use harness::db::scalar;
use harness::net::{free_port, http_client};
use harness::replica::Replica;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

struct Bin {
    dir: tempfile::TempDir,
}

impl Bin {
    fn new() -> Bin {
        Bin {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn db_url(&self) -> String {
        format!("sqlite://{}", self.dir.path().join("t.db").display())
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = tollgate_command(self.dir.path());
        c.args(args).env("TOLLGATE_DATABASE_URL", self.db_url());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn keys_commands_print_what_they_did() {
    let bin = Bin::new();
    let created = bin.run_ok(&[
        "keys",
        "create",
        "--name",
        "mobile app",
        "--per-minute",
        "60",
        "--daily",
        "1000",
        "--expires-at",
        "2030-01-01T00:00:00Z",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&created).unwrap();
    let key = v["key"].as_str().unwrap();
    assert!(key.starts_with("tg_") && key.len() == 43, "{key}");
    assert_eq!(v["id"], 1);
    assert_eq!(v["name"], "mobile app");
    assert_eq!(v["per_minute"], 60);
    assert_eq!(v["daily"], 1000);
    assert_eq!(v["monthly"], serde_json::Value::Null);
    assert_eq!(v["expires_at"], "2030-01-01T00:00:00Z");
    assert_eq!(v["prefix"], &key[..11]);

    let text = bin.run_ok(&["keys", "create", "--name", "other"]);
    assert!(text.contains("Created API key 2"), "{text}");
    assert!(text.contains("only time the key is shown"), "{text}");
    assert!(
        text.contains("per minute unlimited, daily unlimited, monthly unlimited"),
        "{text}"
    );

    // Only the hash is stored: the key appears nowhere in the database file.
    let db = std::fs::read(bin.dir.path().join("t.db")).unwrap();
    let wal = std::fs::read(bin.dir.path().join("t.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "plaintext key stored"
        );
    }

    let list = bin.run_ok(&["keys", "list"]);
    assert!(
        list.contains("mobile app") && list.contains(&v["prefix"].as_str().unwrap().to_string())
    );
    assert!(!list.contains(key), "list never shows a key");
    let list: serde_json::Value =
        serde_json::from_str(&bin.run_ok(&["keys", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["refund_5xx"], false);
    assert!(list[0].get("key").is_none());

    let updated = bin.run_ok(&[
        "keys",
        "set-limits",
        "1",
        "--daily",
        "unlimited",
        "--monthly",
        "5",
    ]);
    assert!(updated.contains("daily unlimited, monthly 5"), "{updated}");
    let shown: serde_json::Value =
        serde_json::from_str(&bin.run_ok(&["keys", "show", "1", "--json"])).unwrap();
    assert_eq!(shown["daily"], serde_json::Value::Null);
    assert_eq!(shown["monthly"], 5);
    assert_eq!(shown["per_minute"], 60);
    assert_eq!(shown["usage"]["total"], 0);
    let shown = bin.run_ok(&["keys", "show", "1"]);
    assert!(shown.contains("monthly:     0 of 5"), "{shown}");

    let refunds: serde_json::Value = serde_json::from_str(&bin.run_ok(&[
        "keys",
        "create",
        "--name",
        "r",
        "--daily",
        "9",
        "--refund-5xx",
        "true",
        "--json",
    ]))
    .unwrap();
    assert_eq!(refunds["refund_5xx"], true);
    let id = refunds["id"].to_string();
    let off = bin.run_ok(&["keys", "set-limits", &id, "--refund-5xx", "false"]);
    assert!(!off.contains("given back"), "{off}");
    let on = bin.run_ok(&["keys", "set-limits", &id, "--refund-5xx", "true"]);
    assert!(on.contains("answered with 5xx is given back"), "{on}");
    assert!(
        bin.run_ok(&["keys", "revoke", "2"])
            .contains("Revoked API key 2")
    );
    let shown: serde_json::Value =
        serde_json::from_str(&bin.run_ok(&["keys", "show", "2", "--json"])).unwrap();
    assert_eq!(shown["status"], "revoked");

    let missing = bin.run(&["keys", "revoke", "77"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("no API key with id 77"));
    let bad = bin.run(&["keys", "create", "--name", "x", "--daily", "0"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("0 is not a limit"));
}

#[test]
fn malformed_config_fails_at_start_naming_the_field() {
    let bin = Bin::new();
    let file = bin.dir.path().join("tollgate.yaml");
    std::fs::write(
        &file,
        "authz:\n  key_headers: [x-api-key]\n  hide_credentails: true\n",
    )
    .unwrap();
    for cmd in [&["check-config"][..], &["serve"], &["keys", "list"]] {
        let mut args = cmd.to_vec();
        args.extend(["--config", file.to_str().unwrap()]);
        let out = bin.run(&args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        let err = stderr(&out);
        assert!(
            err.contains("authz.hide_credentails") && err.contains("tollgate.yaml"),
            "{err}"
        );
    }
    let out = bin
        .command(&["check-config"])
        .env("TOLLGATE_CACHE_KEY_TTL", "forever")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("cache.key_ttl"), "{}", stderr(&out));
    std::fs::write(
        &file,
        "grpc_addr: 127.0.0.1:7777\ndatabase:\n  url: sqlite://x.db\n",
    )
    .unwrap();
    let out = bin
        .command(&["check-config", "--config", file.to_str().unwrap()])
        .env_remove("TOLLGATE_DATABASE_URL")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("127.0.0.1:7777"));
}

#[test]
fn migrate_creates_the_database() {
    let bin = Bin::new();
    let out = bin.run_ok(&["migrate"]);
    assert!(out.contains("Migrations applied"), "{out}");
    assert!(bin.dir.path().join("t.db").exists());
    bin.run_ok(&["migrate"]);
}

async fn serve(bin: &Bin) -> Replica {
    let db = bin.db_url();
    Replica::spawn(
        bin.dir.path(),
        &[
            ("TOLLGATE_DATABASE_URL", db.as_str()),
            ("TOLLGATE_REQUEST_LOG_FLUSH_INTERVAL", "10s"),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_health_and_metrics_then_sigterm_flushes_and_exits_0() {
    let bin = Bin::new();
    let (key, _) = cli_create_key(bin.dir.path(), &bin.db_url(), &["--name", "s"]);
    let s = serve(&bin).await;

    let health = http_client()
        .get(format!("{}/healthz", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let channel = tonic::transport::Endpoint::from_shared(s.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = HealthClient::new(channel);
    for service in [
        "",
        "envoy.service.auth.v3.Authorization",
        "envoy.service.ratelimit.v3.RateLimitService",
    ] {
        let status = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    let mut c = s.client().await;
    for _ in 0..3 {
        let r = c.check(key_header(&key)).await.unwrap().into_inner();
        assert_eq!(r.status.unwrap().code, 0);
    }
    let r = c.check(check_request(&[])).await.unwrap().into_inner();
    assert_eq!(r.status.unwrap().code, 16);

    let metrics = s.metrics_text().await;
    assert!(
        metrics.contains(
            "tollgate_decisions_total{api=\"authz\",outcome=\"allow\",reason=\"ok\"} 3\n"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("reason=\"missing_key\"} 1\n"), "{metrics}");
    assert!(!metrics.contains(&key));
    // Four checks timed; three quota statements timed (the missing key needed none).
    assert!(
        metrics.contains("tollgate_request_duration_seconds_count{api=\"authz\"} 4\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_backend_duration_seconds_count{backend=\"database\"} 3\n"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "tollgate_decisions_total{api=\"ratelimit\",outcome=\"allow\",reason=\"ok\"} 0\n"
    ));

    // The flush interval is 10 s, so the rows are still queued: SIGTERM must write them.
    assert_eq!(s.stop_with("-TERM").await.code(), Some(0));
    let rows = scalar(&bin.db_url(), "SELECT COUNT(*) FROM api_requests_log").await;
    assert_eq!(rows, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_also_stops_cleanly_and_the_port_is_released() {
    let bin = Bin::new();
    let s = serve(&bin).await;
    let grpc = s.grpc.clone();
    assert_eq!(s.stop_with("-INT").await.code(), Some(0));
    assert!(AuthorizationClient::connect(grpc).await.is_err());
}

#[test]
fn serve_refuses_a_port_in_use_with_a_clear_error() {
    let bin = Bin::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = bin
        .command(&["serve"])
        .env(
            "TOLLGATE_GRPC_ADDR",
            taken.local_addr().unwrap().to_string(),
        )
        .env("TOLLGATE_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot listen on grpc_addr"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_api_key_appears_in_any_log_line_even_at_trace_level() {
    let bin = Bin::new();
    let (key, id) = cli_create_key(bin.dir.path(), &bin.db_url(), &["--name", "secret"]);
    let unknown = tollgate::keys::generate().plaintext;
    let db = bin.db_url();
    let s = Replica::spawn(
        bin.dir.path(),
        &[
            ("TOLLGATE_DATABASE_URL", db.as_str()),
            ("TOLLGATE_LOG_LEVEL", "trace"),
            ("TOLLGATE_LOG_FORMAT", "json"),
        ],
    )
    .await;
    let mut c = s.client().await;
    let bearer = format!("Bearer {key}");
    let half = &key[..30];
    for req in [
        key_header(&key),
        check_request(&[("authorization", &bearer)]),
        key_header(&unknown),
        key_header(half),
    ] {
        c.check(req).await.unwrap();
    }
    let log_path = s.log.clone();
    assert_eq!(s.stop_with("-TERM").await.code(), Some(0));
    let log = std::fs::read_to_string(log_path).unwrap();
    assert!(
        log.lines().count() > 20,
        "trace logging produced little:\n{log}"
    );
    for secret in [key.as_str(), unknown.as_str(), half, &key[3..]] {
        assert!(!log.contains(secret), "a key appears in the log");
    }
    // JSON lines, and one "decided" event per check naming the key by id only.
    let decided: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "decided")
        .collect();
    assert_eq!(decided.len(), 4, "{log}");
    assert_eq!(decided[0]["span"]["key_id"], id);
    assert_eq!(decided[0]["span"]["decision"], "allow");
    assert_eq!(decided[2]["span"]["reason"], "invalid_key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delay_keeps_answering_while_health_says_not_serving() {
    let bin = Bin::new();
    let (key, _) = cli_create_key(bin.dir.path(), &bin.db_url(), &["--name", "d"]);
    let db = bin.db_url();
    let s = Replica::spawn(
        bin.dir.path(),
        &[
            ("TOLLGATE_DATABASE_URL", db.as_str()),
            ("TOLLGATE_SHUTDOWN_DELAY", "3s"),
        ],
    )
    .await;
    let channel = tonic::transport::Endpoint::from_shared(s.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let mut c = AuthorizationClient::new(channel);
    s.signal("-TERM");
    let started = std::time::Instant::now();
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == ServingStatus::NotServing as i32 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "still SERVING"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Still answering checks, while /readyz says it is going.
    let r = c.check(key_header(&key)).await.unwrap().into_inner();
    assert_eq!(r.status.unwrap().code, 0);
    let ready = http_client()
        .get(format!("{}/readyz", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(s.stop_with("-0").await.code(), Some(0));
}

/// The Grafana dashboard in examples/ queries only metrics tollgate exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_uses_only_exported_metrics() {
    let bin = Bin::new();
    let db = bin.db_url();
    let s = Replica::spawn(bin.dir.path(), &[("TOLLGATE_DATABASE_URL", db.as_str())]).await;
    let exported = s.metrics_text().await;
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/grafana/tollgate.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 10);
    let mut used = 0;
    for expr in &exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !word.starts_with("tollgate_") {
                continue;
            }
            used += 1;
            // Histograms are exported as NAME_bucket / _sum / _count.
            assert!(
                exported.contains(&format!("\n{word}{{"))
                    || exported.contains(&format!("\n{word} ")),
                "the dashboard uses {word}, which /metrics does not export"
            );
        }
    }
    assert!(used >= exprs.len());
    assert_eq!(s.stop_with("-TERM").await.code(), Some(0));
}
