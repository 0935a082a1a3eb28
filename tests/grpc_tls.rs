//! TLS and mTLS on the gRPC port (`grpc_tls.*`): who gets an answer (only a client whose
//! certificate chains to the client CA and carries an allowed SAN; no plaintext client, no client
//! without a certificate or from another CA or with another name), on every service of the port;
//! the HTTP port staying plain; renewed certificates reaching new connections while open ones
//! keep working, and a broken renewal changing nothing; a bad pair stopping the start.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use harness::check::{allowed, key_header};
use harness::cli::tollgate_command;
use harness::net::{http_client, http_text, metrics_text};
use harness::replica::Replica;
use harness::server::Tollgate;
use harness::tls::{ENVOY_SPIFFE_ID, Pair, TestCa, serial_of, served_certificate, tls_channel};
use tollgate::config::GrpcTlsConfig;
use tollgate::keys::Limits;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A CA, tollgate's pair (serial 1) and client CA files in `dir`; the settings naming them.
fn mtls_files(dir: &Path, ca: &TestCa, sans: &[&str]) -> GrpcTlsConfig {
    let (cert, key) = ca.server(1).write(dir, "tls");
    GrpcTlsConfig {
        cert_file: Some(cert),
        key_file: Some(key),
        client_ca_file: Some(ca.write(dir, "ca.crt")),
        allowed_client_sans: sans.iter().map(|s| s.to_string()).collect(),
    }
}

/// Calls every service of the gRPC port once on `channel` (health, Check, ShouldRateLimit and the
/// access log); the first that gets no answer is the error.
async fn every_service(channel: Channel, key: &str) -> Result<(), String> {
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|e| format!("health: {e}"))?;
    assert_eq!(health.into_inner().status, ServingStatus::Serving as i32);
    let check = AuthorizationClient::new(channel.clone())
        .check(key_header(key))
        .await
        .map_err(|e| format!("check: {e}"))?;
    assert!(allowed(&check.into_inner()));
    RateLimitServiceClient::new(channel.clone())
        .should_rate_limit(RateLimitRequest {
            domain: "d".into(),
            descriptors: vec![RateLimitDescriptor::default()],
            hits_addend: 0,
        })
        .await
        .map_err(|e| format!("ratelimit: {e}"))?;
    AccessLogServiceClient::new(channel)
        .stream_access_logs(futures_util::stream::iter(vec![
            StreamAccessLogsMessage::default(),
        ]))
        .await
        .map_err(|e| format!("access log: {e}"))?;
    Ok(())
}

/// Whether a client over `channel` (or one that could not even connect) gets no answer from any
/// service.
async fn refused(channel: Result<Channel, tonic::transport::Error>, key: &str, who: &str) {
    let Ok(channel) = channel else { return };
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await;
    assert!(health.is_err(), "{who}: health answered {health:?}");
    let check = AuthorizationClient::new(channel.clone())
        .check(key_header(key))
        .await;
    assert!(check.is_err(), "{who}: check answered {check:?}");
    assert!(
        every_service(channel, key).await.is_err(),
        "{who}: answered"
    );
}

/// A plaintext gRPC channel (as a client without TLS would open).
async fn plaintext(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect()
        .await
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_client_from_the_ca_with_an_allowed_san_gets_an_answer() {
    only_allowed_clients_are_answered(Some(0)).await;
}

/// The same on two serving threads, where each connection is handshaken on its own thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_serving_threads_only_a_client_from_the_ca_with_an_allowed_san_gets_an_answer() {
    only_allowed_clients_are_answered(Some(2)).await;
}

async fn only_allowed_clients_are_answered(serving_threads: Option<usize>) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("tollgate test CA");
    let tls = mtls_files(dir.path(), &ca, &[ENVOY_SPIFFE_ID]);
    let tg = Tollgate::start_with(|c| {
        c.grpc_tls = tls;
        c.grpc.serving_threads = serving_threads;
    })
    .await;
    let (key, _) = tg.create_key("k", Limits::default()).await;
    let envoy = ca.client("envoy", &[ENVOY_SPIFFE_ID]);

    // The allowed client: every service answers.
    let channel = tls_channel(tg.grpc, &ca.pem, Some(&envoy)).await.unwrap();
    every_service(channel, &key).await.unwrap();
    let decided = tg.metrics.decisions("ok");
    assert_eq!(decided, 1);

    // Everyone else: no answer from anything.
    refused(plaintext(tg.grpc).await, &key, "plaintext").await;
    refused(
        tls_channel(tg.grpc, &ca.pem, None).await,
        &key,
        "no certificate",
    )
    .await;
    let other_ca = TestCa::new("another CA");
    let stranger = other_ca.client("envoy", &[ENVOY_SPIFFE_ID]);
    refused(
        tls_channel(tg.grpc, &ca.pem, Some(&stranger)).await,
        &key,
        "another CA",
    )
    .await;
    let other_name = ca.client("envoy", &["spiffe://cluster.local/ns/other/sa/envoy"]);
    refused(
        tls_channel(tg.grpc, &ca.pem, Some(&other_name)).await,
        &key,
        "SAN not listed",
    )
    .await;
    // The bare handshake says the same, for each of them.
    for (who, id) in [
        ("no certificate", None),
        ("another CA", Some(&stranger)),
        ("SAN not listed", Some(&other_name)),
    ] {
        let r = served_certificate(tg.grpc, &ca.pem, id).await;
        assert!(r.is_err(), "{who}: handshake succeeded");
    }
    assert_eq!(
        serial_of(
            &served_certificate(tg.grpc, &ca.pem, Some(&envoy))
                .await
                .unwrap()
        ),
        "01"
    );
    assert_eq!(
        tg.metrics.decisions("ok"),
        decided,
        "a refused client was answered"
    );

    // The HTTP port stays plain, and says which certificate is served.
    let metrics = tg.metrics_text().await;
    assert!(
        metric(&metrics, "tollgate_grpc_tls_handshake_failures_total") >= 6,
        "{metrics}"
    );
    let ready = http_client()
        .get(format!("http://{}/readyz", tg.http))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let body = ready.text().await.unwrap();
    assert!(
        body.contains("grpc tls: serving certificate serial 01, subject CN=tollgate, expires 2040-01-01T00:00:00Z\n"),
        "{body}"
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_a_client_ca_answers_any_tls_client_and_no_plaintext_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("tollgate test CA");
    let tls = GrpcTlsConfig {
        client_ca_file: None,
        ..mtls_files(dir.path(), &ca, &[])
    };
    let tg = Tollgate::start_with(|c| c.grpc_tls = tls).await;
    let (key, _) = tg.create_key("k", Limits::default()).await;
    let channel = tls_channel(tg.grpc, &ca.pem, None).await.unwrap();
    every_service(channel, &key).await.unwrap();
    refused(plaintext(tg.grpc).await, &key, "plaintext").await;
    // A client that does not trust tollgate's CA does not talk to it either.
    let other = TestCa::new("another CA");
    assert!(tls_channel(tg.grpc, &other.pem, None).await.is_err());
    assert_eq!(tg.metrics.decisions("ok"), 1);
    tg.stop().await;
}

/// `tollgate serve` with mTLS from files in `dir`, for the Envoy client SAN.
async fn serve_mtls(dir: &Path, tls: &GrpcTlsConfig) -> Replica {
    let db = format!("sqlite://{}", dir.join("t.db").display());
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().unwrap().display().to_string();
    Replica::spawn(
        dir,
        &[
            ("TOLLGATE_DATABASE_URL", db.as_str()),
            ("TOLLGATE_GRPC_TLS_CERT_FILE", &path(&tls.cert_file)),
            ("TOLLGATE_GRPC_TLS_KEY_FILE", &path(&tls.key_file)),
            (
                "TOLLGATE_GRPC_TLS_CLIENT_CA_FILE",
                &path(&tls.client_ca_file),
            ),
            (
                "TOLLGATE_GRPC_TLS_ALLOWED_CLIENT_SANS",
                &format!("spiffe://cluster.local/ns/other/sa/x, {ENVOY_SPIFFE_ID}"),
            ),
        ],
    )
    .await
}

fn grpc_addr(replica: &Replica) -> SocketAddr {
    replica.grpc.trim_start_matches("http://").parse().unwrap()
}

/// Waits up to `limit` for a new connection, trusting `ca`, to be served the certificate with
/// `serial`; returns how long it took.
async fn wait_for_serial(
    addr: SocketAddr,
    ca: &str,
    client: &Pair,
    serial: &str,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let served = served_certificate(addr, ca, Some(client)).await;
        if served.as_deref().map(serial_of).as_deref() == Ok(serial) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "serial {serial} not served within {limit:?}: {:?}",
            served.map(|c| serial_of(&c))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn readyz(replica: &Replica) -> String {
    http_text(&replica.http, "/readyz").await
}

/// Waits (at most 10 s) until `/metrics` counts `n` failed renewals.
async fn wait_for_failed_renewals(replica: &Replica, n: u64) {
    let started = Instant::now();
    loop {
        let text = replica.metrics_text().await;
        if metric(&text, "tollgate_grpc_tls_reloads_total{result=\"error\"}") == n {
            assert_eq!(metric(&text, "tollgate_grpc_tls_last_reload_failed"), 1);
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_renamed_into_place_reaches_new_connections_and_a_broken_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("tollgate test CA");
    let tls = mtls_files(dir.path(), &ca, &[]);
    let serve = serve_mtls(dir.path(), &tls).await;
    let addr = grpc_addr(&serve);
    let envoy = ca.client("envoy", &[ENVOY_SPIFFE_ID]);
    let (key, _) = harness::cli::cli_create_key(
        dir.path(),
        &format!("sqlite://{}", dir.path().join("t.db").display()),
        &["--name", "k"],
    );
    let open = tls_channel(addr, &ca.pem, Some(&envoy)).await.unwrap();
    every_service(open.clone(), &key).await.unwrap();

    // Renewed, by a CA the open connection's client does not trust: if it had to reconnect,
    // it could not.
    let renewing_ca = TestCa::new("renewing CA");
    let renewed = renewing_ca.server(2);
    renewed.write(dir.path(), "tls");
    let took = wait_for_serial(
        addr,
        &renewing_ca.pem,
        &envoy,
        "02",
        Duration::from_secs(10),
    )
    .await;
    assert!(took < Duration::from_secs(10), "{took:?}");
    every_service(open.clone(), &key).await.unwrap();
    // A client trusting only the old CA cannot open a new connection any more.
    assert!(
        served_certificate(addr, &ca.pem, Some(&envoy))
            .await
            .is_err()
    );
    assert!(
        readyz(&serve)
            .await
            .contains("serving certificate serial 02")
    );

    // A broken renewal: a half-written certificate, then a certificate with a key of another.
    tollgate_files_write(dir.path(), "tls.crt", &renewed.cert_pem[..200]);
    wait_for_failed_renewals(&serve, 1).await;
    let other = renewing_ca.server(3);
    tollgate_files_write(dir.path(), "tls.crt", &other.cert_pem);
    wait_for_failed_renewals(&serve, 2).await;
    // Still the renewed pair, to new and open connections alike.
    wait_for_serial(addr, &renewing_ca.pem, &envoy, "02", Duration::from_secs(1)).await;
    every_service(open, &key).await.unwrap();
    let body = readyz(&serve).await;
    assert!(
        body.contains("serving certificate serial 02")
            && body.contains("do not load")
            && body.contains("grpc_tls.key_file"),
        "{body}"
    );
    // Each broken renewal is said once, however long it stays.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = serve.metrics_text().await;
    assert_eq!(
        metric(&text, "tollgate_grpc_tls_reloads_total{result=\"error\"}"),
        2
    );
    let log = std::fs::read_to_string(&serve.log).unwrap();
    assert_eq!(log.matches("renewed files do not load").count(), 2, "{log}");
    assert!(!log.contains("PRIVATE KEY"), "{log}");

    // Mended: the next good pair is served.
    let mended = renewing_ca.server(4);
    mended.write(dir.path(), "tls");
    wait_for_serial(
        addr,
        &renewing_ca.pem,
        &envoy,
        "04",
        Duration::from_secs(10),
    )
    .await;
    let text = serve.metrics_text().await;
    assert_eq!(metric(&text, "tollgate_grpc_tls_last_reload_failed"), 0);
    assert_eq!(
        metric(&text, "tollgate_grpc_tls_reloads_total{result=\"ok\"}"),
        2
    );
}

/// Replaces `dir/name` by a rename, as a renewal does.
fn tollgate_files_write(dir: &Path, name: &str, contents: &str) {
    harness::tls::write(dir, name, contents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_secret_volume_swap_reaches_new_connections() {
    // A secret volume: tls.crt → ..data/tls.crt, ..data → ..<timestamp>/; a renewal writes a new
    // timestamped directory and swaps the ..data symlink by a rename.
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("secret");
    std::fs::create_dir(&volume).unwrap();
    let ca = TestCa::new("tollgate test CA");
    let generation = |n: u64| {
        let g = volume.join(format!("..2026_03_10_{n}"));
        std::fs::create_dir(&g).unwrap();
        ca.server(n).write(&g, "tls");
        ca.write(&g, "ca.crt");
        let link = volume.join("..data_tmp");
        std::os::unix::fs::symlink(g.file_name().unwrap(), &link).unwrap();
        std::fs::rename(&link, volume.join("..data")).unwrap();
    };
    generation(1);
    for name in ["tls.crt", "tls.key", "ca.crt"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), volume.join(name)).unwrap();
    }
    let tls = GrpcTlsConfig {
        cert_file: Some(volume.join("tls.crt")),
        key_file: Some(volume.join("tls.key")),
        client_ca_file: Some(volume.join("ca.crt")),
        allowed_client_sans: Vec::new(),
    };
    let serve = serve_mtls(dir.path(), &tls).await;
    let addr = grpc_addr(&serve);
    let envoy = ca.client("envoy", &[ENVOY_SPIFFE_ID]);
    wait_for_serial(addr, &ca.pem, &envoy, "01", Duration::from_secs(1)).await;
    generation(7);
    wait_for_serial(addr, &ca.pem, &envoy, "07", Duration::from_secs(10)).await;
    let metrics = metrics_text(&serve.http).await;
    assert_eq!(
        metric(&metrics, "tollgate_grpc_tls_reloads_total{result=\"ok\"}"),
        1
    );
}

/// `tollgate ARGS` with these settings; its exit code and standard error.
fn run(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> (Option<i32>, String) {
    let mut cmd = tollgate_command(dir);
    cmd.args(args)
        .env("TOLLGATE_GRPC_ADDR", "127.0.0.1:0")
        .env("TOLLGATE_HTTP_ADDR", "127.0.0.1:0")
        .env(
            "TOLLGATE_DATABASE_URL",
            format!("sqlite://{}", dir.join("t.db").display()),
        );
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_unreadable_or_mismatched_pair_stops_the_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = TestCa::new("tollgate test CA");
    let (cert, key) = ca.server(1).write(d, "a");
    let (_, other_key) = ca.server(2).write(d, "b");
    let ca_file = ca.write(d, "ca.crt");
    let missing = d.join("missing.pem");
    let not_pem = harness::tls::write(d, "junk.pem", "not a certificate\n");
    // (settings, the setting named, what is said of it)
    type Case<'a> = (Vec<(&'a str, &'a Path)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![
                ("TOLLGATE_GRPC_TLS_CERT_FILE", &missing),
                ("TOLLGATE_GRPC_TLS_KEY_FILE", &key),
            ],
            "grpc_tls.cert_file",
            "cannot read",
        ),
        (
            vec![
                ("TOLLGATE_GRPC_TLS_CERT_FILE", &cert),
                ("TOLLGATE_GRPC_TLS_KEY_FILE", &other_key),
            ],
            "grpc_tls.key_file",
            "does not match",
        ),
        (
            vec![
                ("TOLLGATE_GRPC_TLS_CERT_FILE", &cert),
                ("TOLLGATE_GRPC_TLS_KEY_FILE", &not_pem),
            ],
            "grpc_tls.key_file",
            "no PEM private key",
        ),
        (
            vec![
                ("TOLLGATE_GRPC_TLS_CERT_FILE", &cert),
                ("TOLLGATE_GRPC_TLS_KEY_FILE", &key),
                ("TOLLGATE_GRPC_TLS_CLIENT_CA_FILE", &not_pem),
            ],
            "grpc_tls.client_ca_file",
            "no PEM certificate",
        ),
        (
            vec![("TOLLGATE_GRPC_TLS_CERT_FILE", &cert)],
            "grpc_tls.key_file",
            "must be set with grpc_tls.cert_file",
        ),
    ];
    for (env, field, why) in &cases {
        for command in [&["serve"][..], &["check-config"]] {
            let (code, stderr) = run(d, command, env);
            assert_eq!(code, Some(64), "{command:?} {env:?}: {stderr}");
            assert!(
                stderr.contains(&format!("{field}: ")) && stderr.contains(why),
                "{command:?} {env:?}: {stderr}"
            );
            assert!(!stderr.contains("PRIVATE KEY"), "{stderr}");
        }
    }
    // And a good pair is named by check-config.
    let out = tollgate_command(d)
        .arg("check-config")
        .env("TOLLGATE_GRPC_TLS_CERT_FILE", &cert)
        .env("TOLLGATE_GRPC_TLS_KEY_FILE", &key)
        .env("TOLLGATE_GRPC_TLS_CLIENT_CA_FILE", &ca_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("gRPC TLS certificate is valid: serial 01, subject CN=tollgate"),
        "{stdout}"
    );
}
