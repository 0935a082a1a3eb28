//! `rediss://`: the `tollgate serve` binary counts its windows in a private Redis that speaks only
//! TLS, with a certificate from a test CA that the process trusts through `SSL_CERT_FILE`.
//! (A separate process, because the trusted roots are read from the environment.)

use std::path::Path;
use std::process::{Child, Command, Stdio};

use harness::check::{denied, headers_of, key_header, ok};
use harness::cli::cli_create_key;
use harness::net::free_port;
use harness::replica::Replica;

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
    let (key, _) = cli_create_key(dir.path(), &db, &["--name", "t", "--per-minute", "2"]);
    let redis_url = format!("rediss://localhost:{port}");
    let ca = dir.path().join("ca.crt");
    let serve = Replica::spawn(
        dir.path(),
        &[
            ("TOLLGATE_DATABASE_URL", db.as_str()),
            ("TOLLGATE_REDIS_URL", redis_url.as_str()),
            // If TLS failed, checks would be refused with 503 rather than let through.
            ("TOLLGATE_REDIS_FAILURE_MODE", "closed"),
            ("TOLLGATE_REDIS_TIMEOUT", "2s"),
            ("SSL_CERT_FILE", ca.to_str().unwrap()),
        ],
    )
    .await;
    let mut c = serve.client().await;
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
