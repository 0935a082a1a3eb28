//! PostgreSQL over TLS, with the libpq URL parameters (`sslmode`, `sslrootcert`, `sslcert`,
//! `sslkey`), against a private server that takes TLS only: its certificate comes from a test
//! CA, and its `pg_hba.conf` rejects every connection without TLS, so a connection that works
//! used TLS. The stores, `tollgate serve`, `migrate` and the `keys` commands take the same URLs,
//! and no log line or `check-config` shows a password or where the keys are.

use std::path::Path;

use harness::cli::tollgate_command;
use harness::pg::{CERT_USER, PrivatePostgres};
use harness::replica::Replica;
use harness::tls::TestCa;
use tollgate::config::{DatabaseConfig, SecretUrl};

/// A CA, the server it signed, and the CA's file in `dir`.
fn tls_server(dir: &Path) -> (TestCa, PrivatePostgres, String) {
    let ca = TestCa::new("postgres test CA");
    let pg = PrivatePostgres::start_tls(&ca);
    let ca_file = ca.write(dir, "pg-ca.crt").display().to_string();
    (ca, pg, ca_file)
}

fn url(pg: &PrivatePostgres, user: &str, params: &str) -> String {
    format!(
        "postgres://{user}:hunter2@127.0.0.1:{}/postgres?{params}",
        pg.port()
    )
}

async fn open(url: &str) -> Result<tollgate::store::Stores, String> {
    let config = DatabaseConfig {
        url: SecretUrl(url.to_string()),
        ..Default::default()
    };
    tollgate::store::open(&config, true)
        .await
        .map_err(|e| tollgate::config::error_chain(&e))
}

/// Whether this connection to `url` is encrypted, as the server sees it.
async fn uses_tls(url: &str) -> bool {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut c)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sslmode_but_disable_connects_to_a_tls_only_server_and_disable_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, pg, ca_file) = tls_server(dir.path());
    for params in [
        format!("sslmode=verify-full&sslrootcert={ca_file}"),
        format!("sslmode=verify-ca&sslrootcert={ca_file}"),
        "sslmode=require".to_string(),
        "sslmode=prefer".to_string(),
        // sqlx's (and libpq's) default is prefer.
        "application_name=x".to_string(),
    ] {
        let url = url(&pg, "postgres", &params);
        let stores = open(&url).await.unwrap_or_else(|e| panic!("{params}: {e}"));
        stores.close().await;
        assert!(uses_tls(&url).await, "{params}");
    }
    // The server rejects a connection without TLS: so the ones above used it.
    let e = open(&url(&pg, "postgres", "sslmode=disable"))
        .await
        .expect_err("a plaintext connection is refused");
    assert!(e.contains("no encryption"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_is_refused_with_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, pg, _) = tls_server(dir.path());
    let other = TestCa::new("another CA")
        .write(dir.path(), "other-ca.crt")
        .display()
        .to_string();
    for mode in ["verify-full", "verify-ca"] {
        let url = url(
            &pg,
            "postgres",
            &format!("sslmode={mode}&sslrootcert={other}"),
        );
        let out = tollgate_command(dir.path())
            .arg("migrate")
            .env("TOLLGATE_DATABASE_URL", &url)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        let line = lines[0];
        assert!(
            line.starts_with("tollgate: cannot open database postgres://postgres:***@127.0.0.1:"),
            "{line}"
        );
        // The problem, said once, in the URL's terms.
        assert_eq!(line.matches("UnknownIssuer").count(), 1, "{line}");
        assert_eq!(
            line.matches("certificate is not signed by a CA in sslrootcert")
                .count(),
            1,
            "{line}"
        );
        assert!(
            !line.contains("hunter2") && !line.contains(&other),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_sslcert_and_sslkey_is_presented() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, pg, ca_file) = tls_server(dir.path());
    let (cert, key) = ca.client(CERT_USER, &[]).write(dir.path(), "client");
    let with_cert = url(
        &pg,
        CERT_USER,
        &format!(
            "sslmode=verify-full&sslrootcert={ca_file}&sslcert={}&sslkey={}",
            cert.display(),
            key.display()
        ),
    );
    open(&with_cert).await.unwrap().close().await;
    assert!(uses_tls(&with_cert).await);
    // The same user without one is refused by the server's `cert` rule.
    let e = open(&url(
        &pg,
        CERT_USER,
        &format!("sslmode=verify-full&sslrootcert={ca_file}"),
    ))
    .await
    .expect_err("refused without a client certificate");
    assert!(e.contains("certificate"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_migrate_and_keys_take_tls_urls_and_show_none_of_their_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, pg, ca_file) = tls_server(dir.path());
    let (cert, key) = ca.client(CERT_USER, &[]).write(dir.path(), "client");
    let db = url(
        &pg,
        CERT_USER,
        &format!(
            "sslmode=verify-full&sslrootcert={ca_file}&sslcert={}&sslkey={}&sslpassword=k3y",
            cert.display(),
            key.display()
        ),
    );
    let secrets = [
        "hunter2",
        "k3y",
        ca_file.as_str(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    ];
    let run = |args: &[&str]| {
        let out = tollgate_command(dir.path())
            .args(args)
            .env("TOLLGATE_DATABASE_URL", &db)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{args:?}: {text}");
        for s in secrets {
            assert!(!text.contains(s), "{args:?} shows {s:?}: {text}");
        }
        text
    };
    let migrated = run(&["migrate"]);
    assert!(
        migrated.contains("sslmode=verify-full&sslrootcert=***"),
        "{migrated}"
    );
    run(&["keys", "create", "--name", "over-tls", "--daily", "5"]);
    assert!(run(&["keys", "list"]).contains("over-tls"));
    let config = run(&["check-config"]);
    assert!(config.contains("sslkey=***"), "{config}");

    let serve = Replica::spawn(
        dir.path(),
        &[
            ("TOLLGATE_DATABASE_URL", db.as_str()),
            ("TOLLGATE_LOG_LEVEL", "debug"),
        ],
    )
    .await;
    let ready = serve.metrics_text().await;
    assert!(ready.contains("tollgate_backend_errors_total{backend=\"database\"} 0"));
    let log_path = serve.log.clone();
    let stopped = serve.stop_with("-TERM").await;
    assert!(stopped.success());
    let log = std::fs::read_to_string(log_path).unwrap();
    assert!(log.contains("tollgate serving"), "{log}");
    assert!(
        log.contains("sslpassword"),
        "the ignored parameter is named: {log}"
    );
    for s in secrets {
        assert!(!log.contains(s), "the log shows {s:?}: {log}");
    }
}
