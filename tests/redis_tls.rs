//! `rediss://`: the `tollgate serve` binary counts its windows in a private Redis that speaks only
//! TLS, with a certificate from a test CA that the process trusts through `SSL_CERT_FILE`.
//! (A separate process, because the trusted roots are read from the environment.)

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::check::{denied, headers_of, key_header, ok};
use harness::net::{free_port, http_client};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// A CA and a certificate for localhost/127.0.0.1 signed by it.
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=tollgate test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.crt",
            "-extfile",
            "ext.cnf",
        ],
    );
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_counts_windows_in_a_tls_redis() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let port = free_port();
    let _redis = Killed(
        Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)"),
    );

    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let tollgate = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        c.args(args)
            .env("TOLLGATE_DATABASE_URL", &db)
            .env("TOLLGATE_REDIS_URL", format!("rediss://localhost:{port}"))
            // If TLS failed, checks would be refused with 503 rather than let through.
            .env("TOLLGATE_REDIS_FAILURE_MODE", "closed")
            .env("TOLLGATE_REDIS_TIMEOUT", "2s")
            .env("SSL_CERT_FILE", dir.path().join("ca.crt"))
            .current_dir(dir.path());
        c
    };
    let out = tollgate(&[
        "keys",
        "create",
        "--name",
        "t",
        "--per-minute",
        "2",
        "--json",
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = created["key"].as_str().unwrap().to_string();

    let (grpc, http) = (free_port(), free_port());
    let _serve = Killed(
        tollgate(&["serve"])
            .env("TOLLGATE_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
            .env("TOLLGATE_HTTP_ADDR", format!("127.0.0.1:{http}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http_client()
            .get(format!("http://127.0.0.1:{http}/readyz"))
            .send()
            .await
            && r.status().is_success()
        {
            break;
        }
        assert!(Instant::now() < deadline, "tollgate serve not ready in 20s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::connect(
        format!("http://127.0.0.1:{grpc}"),
    )
    .await
    .unwrap();
    for left in ["1", "0"] {
        let resp = c.check(key_header(&key)).await.unwrap().into_inner();
        let h = headers_of(&ok(&resp).response_headers_to_add);
        assert_eq!(h["x-ratelimit-remaining"], left);
    }
    let d = denied(&c.check(key_header(&key)).await.unwrap().into_inner());
    assert_eq!(
        (d.status, d.body["error"].as_str()),
        (429, Some("rate_limited"))
    );
}
