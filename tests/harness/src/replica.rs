//! [`Replica`]: a `tollgate serve` process on free ports, as a deployment runs it: started with
//! environment variables, ready once `/readyz` answers, stopped with a signal, killed if a test
//! leaves it running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tonic::transport::Channel;

use crate::cli::tollgate_command;
use crate::net::{free_port, http_client, metrics_text};

/// A `tollgate serve` process on free ports.
pub struct Replica {
    child: Child,
    pub grpc: String,
    pub http: String,
    /// Where its standard error (its log) goes.
    pub log: PathBuf,
}

impl Replica {
    /// Starts `tollgate serve` with these environment variables (on top of free ports) and
    /// waits until `/readyz` answers 200. The ports are picked free and then handed to the
    /// process, so another test can take one in between: a tollgate that could not listen is
    /// started again on other ports (three tries).
    pub async fn spawn(dir: &Path, env: &[(&str, &str)]) -> Replica {
        for attempt in 1..=3 {
            let mut replica = Self::start(dir, env);
            match replica.wait_ready().await {
                Ok(()) => return replica,
                Err(log) if attempt < 3 && log.contains("cannot listen on") => continue,
                Err(log) => panic!("tollgate serve not ready: {log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn start(dir: &Path, env: &[(&str, &str)]) -> Replica {
        let (grpc, http) = (free_port(), free_port());
        let log = dir.join(format!("tollgate-{grpc}.log"));
        let mut cmd = tollgate_command(dir);
        cmd.arg("serve")
            .env("TOLLGATE_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
            .env("TOLLGATE_HTTP_ADDR", format!("127.0.0.1:{http}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        Replica {
            child: cmd.spawn().expect("tollgate serve starts"),
            grpc: format!("http://127.0.0.1:{grpc}"),
            http: format!("http://127.0.0.1:{http}"),
            log,
        }
    }

    /// Waits up to 20 s for `/readyz`; what the process logged if it exits or is not ready.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(format!("it exited ({status}):\n{log}"));
            }
            if let Ok(r) = http_client()
                .get(format!("{}/readyz", self.http))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("not ready in 20s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id, e.g. to read its `/proc/PID/status`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What `/metrics` says now.
    pub async fn metrics_text(&self) -> String {
        metrics_text(&self.http).await
    }

    pub async fn client(&self) -> AuthorizationClient<Channel> {
        AuthorizationClient::connect(self.grpc.clone())
            .await
            .expect("connects")
    }

    pub async fn ratelimit_client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::connect(self.grpc.clone())
            .await
            .expect("connects")
    }

    /// Sends a signal (`-TERM`, `-HUP`) and returns without waiting for its effect.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(sent);
    }

    /// Sends a signal (`-TERM`, `-INT`) and waits for the exit status.
    pub async fn stop_with(mut self, signal: &str) -> std::process::ExitStatus {
        self.signal(signal);
        tokio::task::spawn_blocking(move || self.child.wait())
            .await
            .unwrap()
            .unwrap()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
