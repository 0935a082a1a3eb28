//! Redis for the tests: the shared single node ([`redis_url`]) and Redis Cluster
//! ([`redis_cluster_url`]), which fail the test, naming them, when they do not answer; key
//! prefixes no other test uses; a connection to every node, and the keys under a prefix on each,
//! to list or delete; and [`PrivateRedis`], a server of the test's own that it may stop and start
//! again.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ::redis::aio::MultiplexedConnection;

use crate::net::free_port;

/// The shared single Redis node: `TEST_REDIS_URL` (scripts/test sets it), else
/// `redis://127.0.0.1:6379`. Panics, naming it, when it does not answer.
pub async fn redis_url() -> String {
    let url =
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
    let client = ::redis::Client::open(url.as_str()).expect("TEST_REDIS_URL is a Redis URL");
    let ping = async {
        let mut c = client.get_multiplexed_async_connection().await?;
        ::redis::cmd("PING").query_async::<String>(&mut c).await
    };
    match tokio::time::timeout(Duration::from_secs(3), ping).await {
        Ok(Ok(_)) => url,
        other => panic!(
            "Redis is not reachable at {url} (TEST_REDIS_URL): {other:?}. \
             Run scripts/test, which starts it."
        ),
    }
}

/// The test Redis Cluster: `TEST_REDIS_CLUSTER_URL` (scripts/test starts one and sets it), else
/// `redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002`. Panics, naming it, when
/// it does not answer or is not in state ok.
pub async fn redis_cluster_url() -> String {
    let url = std::env::var("TEST_REDIS_CLUSTER_URL").unwrap_or_else(|_| {
        "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002".to_string()
    });
    for node in redis_nodes(&url) {
        let client = ::redis::Client::open(node.as_str()).expect("cluster node URL");
        let info = async {
            let mut c = client.get_multiplexed_async_connection().await?;
            ::redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async::<String>(&mut c)
                .await
        };
        match tokio::time::timeout(Duration::from_secs(3), info).await {
            Ok(Ok(info)) if info.contains("cluster_state:ok") => {}
            other => panic!(
                "Redis Cluster is not ready at {url} (TEST_REDIS_CLUSTER_URL), node {node}: \
                 {other:?}. Run scripts/test, which starts a local 3-master cluster."
            ),
        }
    }
    url
}

/// Every node URL in a `redis://` or `redis+cluster://` URL.
fn redis_nodes(url: &str) -> Vec<String> {
    match tollgate::limiter::redis::parse_url(url).expect("a Redis URL") {
        tollgate::limiter::redis::Target::Node(u) => vec![u],
        tollgate::limiter::redis::Target::Cluster(nodes) => nodes,
    }
}

/// A key prefix no other test (or test run) uses.
pub fn unique_prefix(tag: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "tollgate-test:{tag}:{}:{nanos}:{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A connection to each node of `url` (one for a single node), to read or change what it holds.
pub async fn node_connections(url: &str) -> Vec<MultiplexedConnection> {
    let mut connections = Vec::new();
    for node in redis_nodes(url) {
        let client = ::redis::Client::open(node.as_str()).unwrap();
        connections.push(client.get_multiplexed_async_connection().await.unwrap());
    }
    connections
}

/// Keys under `prefix` on the node `c` is connected to.
pub async fn keys_on(c: &mut MultiplexedConnection, prefix: &str) -> Vec<String> {
    ::redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(c)
        .await
        .unwrap()
}

/// Keys under `prefix` on every node of `url`.
pub async fn redis_keys(url: &str, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for mut c in node_connections(url).await {
        keys.extend(keys_on(&mut c, prefix).await);
    }
    keys
}

/// Deletes every key under `prefix` on every node of `url`.
pub async fn delete_redis_keys(url: &str, prefix: &str) {
    for mut c in node_connections(url).await {
        for key in keys_on(&mut c, prefix).await {
            let _: i64 = ::redis::cmd("DEL")
                .arg(&key)
                .query_async(&mut c)
                .await
                .unwrap();
        }
    }
}

/// A Redis server of this test's own, on a free port, that the test may stop and restart
/// (never the shared one).
pub struct PrivateRedis {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let mut r = PrivateRedis {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again, empty) on the same port; waits until it answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        self.child = Some(child);
        let client = ::redis::Client::open(self.url()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && ::redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "private redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills it (SIGKILL: no goodbye to clients) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
