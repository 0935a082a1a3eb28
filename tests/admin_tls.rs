//! The admin API when `grpc_tls` is set: its port speaks TLS only, with the gRPC port's
//! certificate (renewals included), and a client certificate from `grpc_tls.client_ca_file`
//! whose SAN `admin.client_sans` lists is a credential, over gRPC and REST alike. A certificate
//! from that CA with another name gets exactly what no credentials get; a bearer token still
//! works without a certificate; a certificate from another CA, and plaintext, get no answer at
//! all. The log names a certificate caller by its SAN; the settings that cannot work stop the
//! start.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use harness::admin::{Rest, TOKEN, authed, with_admin};
use harness::cli::tollgate_command;
use harness::net::free_port;
use harness::replica::Replica;
use harness::server::Tollgate;
use harness::tls::{ENVOY_SPIFFE_ID, TestCa, serial_of, served_certificate, tls_channel};
use serde_json::json;
use tollgate::admin::pb::admin_service_client::AdminServiceClient;
use tollgate::admin::pb::{CreateKeyRequest, GetKeyRequest, ListKeysRequest};
use tollgate::config::GrpcTlsConfig;
use tonic::Code;
use tonic::transport::Channel;

/// The SAN of the key portal's client certificate, the one `admin.client_sans` lists.
const PORTAL: &str = "spiffe://cluster.local/ns/portal/sa/key-portal";

/// tollgate's pair (serial 1) and the client CA in `dir`; Envoy's SAN the gRPC port's allow-list.
fn mtls_files(dir: &Path, ca: &TestCa) -> GrpcTlsConfig {
    let (cert, key) = ca.server(1).write(dir, "tls");
    GrpcTlsConfig {
        cert_file: Some(cert),
        key_file: Some(key),
        client_ca_file: Some(ca.write(dir, "ca.crt")),
        allowed_client_sans: vec![ENVOY_SPIFFE_ID.into()],
    }
}

/// A tollgate with TLS on both ports, its admin API taking [`TOKEN`] and the portal's SAN.
async fn start(dir: &Path, ca: &TestCa) -> Tollgate {
    let tls = mtls_files(dir, ca);
    Tollgate::start_with(|c| {
        c.grpc_tls = tls;
        with_admin(c, &[TOKEN]);
        c.admin.client_sans = vec![PORTAL.into()];
    })
    .await
}

async fn admin_client(channel: Channel) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(channel)
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Waits (at most 10 s) until a new admin connection is served the certificate `serial`.
async fn wait_for_serial(addr: SocketAddr, ca: &str, serial: &str) {
    let started = Instant::now();
    loop {
        let served = served_certificate(addr, ca, None).await;
        if served.as_deref().map(serial_of).as_deref() == Ok(serial) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the admin port still serves {:?}, not {serial}",
            served.map(|c| serial_of(&c))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_certificate_or_a_token_calls_over_grpc_and_rest() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("tollgate test CA");
    let tg = start(dir.path(), &ca).await;
    let addr = tg.admin.unwrap();
    let portal = ca.client("key portal", &[PORTAL]);

    // gRPC with the portal's certificate, and no token.
    let mut c = admin_client(tls_channel(addr, &ca.pem, Some(&portal)).await.unwrap()).await;
    let created = c
        .create_key(CreateKeyRequest {
            name: "by certificate".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = created.key.unwrap().id;
    let got = c.get_key(GetKeyRequest { id }).await.unwrap().into_inner();
    assert_eq!(got.name, "by certificate");

    // REST with it.
    let rest = Rest::tls(addr, None, &ca.pem, Some(&portal));
    let a = rest
        .call(
            "POST",
            "/v1/keys",
            Some(json!({"name": "rest by certificate"})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = rest.call("GET", &format!("/v1/keys/{id}"), None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["name"], "by certificate");

    // A token, and no certificate, over TLS: both transports.
    let a = Rest::tls(addr, Some(TOKEN), &ca.pem, None)
        .call("GET", "/v1/keys", None)
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["keys"].as_array().unwrap().len(), 2);
    let mut by_token = admin_client(tls_channel(addr, &ca.pem, None).await.unwrap()).await;
    by_token
        .list_keys(authed(ListKeysRequest::default(), Some(TOKEN)))
        .await
        .unwrap();

    // The admin port follows a renewal of the gRPC port's files.
    wait_for_serial(addr, &ca.pem, "01").await;
    ca.server(2).write(dir.path(), "tls");
    wait_for_serial(addr, &ca.pem, "02").await;
    let a = rest.call("GET", "/v1/keys", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_with_an_unlisted_san_gets_what_no_credentials_get() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("tollgate test CA");
    let tg = start(dir.path(), &ca).await;
    let addr = tg.admin.unwrap();
    let created = Rest::tls(addr, Some(TOKEN), &ca.pem, None)
        .call("POST", "/v1/keys", Some(json!({"name": "exists"})))
        .await;
    let id = created.body["key"]["id"].as_str().unwrap().to_string();
    // Envoy's certificate: from the CA, allowed on the gRPC port, not an administrator.
    let envoy = ca.client("envoy", &[ENVOY_SPIFFE_ID]);
    let near_miss = ca.client("key portal", &[&format!("{PORTAL}-2")]);
    let nobody = Rest::tls(addr, None, &ca.pem, None);
    for (method, path) in [
        ("GET", format!("/v1/keys/{id}")),
        ("GET", "/v1/keys/987654".to_string()),
        ("POST", format!("/v1/keys/{id}:revoke")),
        ("GET", "/v1/nothing".into()),
        ("GET", "/v1/openapi.json".into()),
    ] {
        let want = nobody.call(method, &path, None).await;
        assert_eq!(want.status, 401, "{method} {path}: {}", want.text);
        for cert in [&envoy, &near_miss] {
            let got = Rest::tls(addr, None, &ca.pem, Some(cert))
                .call(method, &path, None)
                .await;
            assert_eq!(
                (got.status, &got.text, &got.content_type),
                (want.status, &want.text, &want.content_type),
                "{method} {path}"
            );
            assert_eq!(got.headers["www-authenticate"], "Bearer");
        }
    }
    let mut none = admin_client(tls_channel(addr, &ca.pem, None).await.unwrap()).await;
    let want = none
        .get_key(GetKeyRequest {
            id: id.parse().unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(want.code(), Code::Unauthenticated);
    for cert in [&envoy, &near_miss] {
        let mut c = admin_client(tls_channel(addr, &ca.pem, Some(cert)).await.unwrap()).await;
        for id in [id.parse().unwrap(), 987_654] {
            let s = c.get_key(GetKeyRequest { id }).await.unwrap_err();
            assert_eq!(
                (s.code(), s.message()),
                (want.code(), want.message()),
                "{id}"
            );
        }
        // With a token too, the token is what counts.
        c.get_key(authed(
            GetKeyRequest {
                id: id.parse().unwrap(),
            },
            Some(TOKEN),
        ))
        .await
        .unwrap();
    }
    // Nothing was revoked.
    let a = Rest::tls(addr, Some(TOKEN), &ca.pem, None)
        .call("GET", &format!("/v1/keys/{id}"), None)
        .await;
    assert_eq!(a.body["status"], "KEY_STATUS_ACTIVE");
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_ca_and_plaintext_get_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("tollgate test CA");
    let tg = start(dir.path(), &ca).await;
    let addr = tg.admin.unwrap();
    // The listed SAN, signed by a CA tollgate does not trust.
    let stranger = TestCa::new("another CA").client("key portal", &[PORTAL]);
    for token in [None, Some(TOKEN)] {
        let refused = Rest::tls(addr, token, &ca.pem, Some(&stranger))
            .try_send("GET", "/v1/keys", None, None)
            .await;
        assert!(refused.is_err(), "{token:?}: answered {refused:?}");
        let plaintext = Rest::new(addr, token)
            .try_send("GET", "/v1/keys", None, None)
            .await;
        assert!(
            plaintext.is_err(),
            "{token:?}: plaintext answered {plaintext:?}"
        );
    }
    if let Ok(channel) = tls_channel(addr, &ca.pem, Some(&stranger)).await {
        let s = admin_client(channel)
            .await
            .list_keys(authed(ListKeysRequest::default(), Some(TOKEN)))
            .await;
        assert!(s.is_err(), "another CA: answered {s:?}");
    }
    if let Ok(channel) = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect()
        .await
    {
        let s = admin_client(channel)
            .await
            .list_keys(authed(ListKeysRequest::default(), Some(TOKEN)))
            .await;
        assert!(s.is_err(), "plaintext gRPC: answered {s:?}");
    }
    let metrics = tg.metrics_text().await;
    assert!(
        metric(&metrics, "tollgate_admin_tls_handshake_failures_total") >= 5,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "tollgate_grpc_tls_handshake_failures_total"),
        0
    );
    assert!(
        !metrics.contains("code=\"ok\""),
        "a call was served: {metrics}"
    );
    tg.stop().await;
}

/// As deployed: off loopback with only a SAN list (no token), the portal's certificate calls,
/// and the log names it by its SAN, and the refusal of an unlisted one by why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_a_san_list_alone_is_enough_and_the_log_names_the_san() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("tollgate test CA");
    let tls = mtls_files(dir.path(), &ca);
    let port = free_port();
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().unwrap().to_str().unwrap().to_string();
    let (cert, key, client_ca) = (
        path(&tls.cert_file),
        path(&tls.key_file),
        path(&tls.client_ca_file),
    );
    let admin_addr = format!("0.0.0.0:{port}");
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let serve = Replica::spawn(
        dir.path(),
        &[
            ("TOLLGATE_DATABASE_URL", db.as_str()),
            ("TOLLGATE_GRPC_TLS_CERT_FILE", cert.as_str()),
            ("TOLLGATE_GRPC_TLS_KEY_FILE", key.as_str()),
            ("TOLLGATE_GRPC_TLS_CLIENT_CA_FILE", client_ca.as_str()),
            ("TOLLGATE_ADMIN_ADDR", admin_addr.as_str()),
            ("TOLLGATE_ADMIN_CLIENT_SANS", PORTAL),
        ],
    )
    .await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let portal = ca.client("key portal", &[PORTAL]);
    let created = Rest::tls(addr, None, &ca.pem, Some(&portal))
        .call("POST", "/v1/keys", Some(json!({"name": "from the portal"})))
        .await;
    assert_eq!(created.status, 200, "{}", created.text);
    let id = created.body["key"]["id"].as_str().unwrap().to_string();
    let secret = created.body["secret"].as_str().unwrap().to_string();
    let envoy = ca.client("envoy", &[ENVOY_SPIFFE_ID]);
    let refused = Rest::tls(addr, Some("some-token"), &ca.pem, Some(&envoy))
        .call("GET", "/v1/keys", None)
        .await;
    assert_eq!(refused.status, 401);
    let refused = Rest::tls(addr, None, &ca.pem, Some(&envoy))
        .call("GET", "/v1/keys", None)
        .await;
    assert_eq!(refused.status, 401);
    assert_eq!(serve.stop_with("-TERM").await.code(), Some(0));

    let log = std::fs::read_to_string(log_of(dir.path())).unwrap();
    let caller = format!("caller=client_cert:{PORTAL}");
    assert!(
        log.lines().any(|l| l.contains("admin call")
            && l.contains(&caller)
            && l.contains("method=\"CreateKey\"")
            && l.contains(&format!("key_id={id}"))),
        "no CreateKey line naming {caller} in\n{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("admin call unauthenticated")
            && l.contains("credentials=\"unlisted_client_cert\"")
            && l.contains(ENVOY_SPIFFE_ID)),
        "no refusal naming the unlisted certificate in\n{log}"
    );
    assert!(
        log.lines().any(
            |l| l.contains("admin call unauthenticated") && l.contains("credentials=\"wrong\"")
        ),
        "{log}"
    );
    assert!(!log.contains(&secret), "the key's secret is in the log");
    assert!(
        !log.contains("some-token"),
        "a presented token is in the log"
    );
}

/// The replica log in `dir` that has admin calls.
fn log_of(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .find(|p| std::fs::read_to_string(p).unwrap().contains("admin call"))
        .expect("the replica logged admin calls")
}

/// `admin.client_sans` without the client CA it needs stops the start (exit 64, naming it).
#[test]
fn client_sans_without_a_client_ca_are_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("tollgate test CA");
    let (cert, key) = ca.server(1).write(dir.path(), "tls");
    for with_tls in [false, true] {
        let mut cmd = tollgate_command(dir.path());
        cmd.args(["serve"])
            .env("TOLLGATE_ADMIN_ADDR", "127.0.0.1:0")
            .env("TOLLGATE_ADMIN_CLIENT_SANS", PORTAL)
            .env("TOLLGATE_DATABASE_URL", "sqlite://never.db");
        if with_tls {
            cmd.env("TOLLGATE_GRPC_TLS_CERT_FILE", &cert)
                .env("TOLLGATE_GRPC_TLS_KEY_FILE", &key);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{with_tls}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("admin.client_sans"), "{err}");
        assert!(err.contains("grpc_tls.client_ca_file"), "{err}");
        assert!(!dir.path().join("never.db").exists(), "nothing was opened");
    }
}
