//! [`Tollgate`]: a real tollgate in the test's process, serving on ephemeral ports from a
//! database of its own, with a [`ManualClock`] starting at [`t0`]; its stores for setting up keys
//! (with [`limits`]) and reading usage, and a graceful stop that hands back the database.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate::app::App;
use tollgate::clock::ManualClock;
use tollgate::config::{Config, Dur, SecretUrl};
use tollgate::keys::{self, Limits};
use tollgate::store::{self, Stores};
use tollgate::telemetry::Metrics;
use tonic::transport::Channel;

use crate::cli::tollgate_command;
use crate::db::{Db, TestDb, scalar};
use crate::net::metrics_text;

/// 2026-03-10 12:00:20 UTC: 40 s before the minute turns, a Tuesday mid-month.
pub fn t0() -> DateTime<Utc> {
    "2026-03-10T12:00:20Z".parse().unwrap()
}

/// A key's limits: these windows and quotas (`None`: unlimited), no refunds on 5xx answers.
pub fn limits(per_minute: Option<u64>, daily: Option<u64>, monthly: Option<u64>) -> Limits {
    Limits {
        per_minute,
        daily,
        monthly,
        refund_5xx: false,
    }
}

/// A tollgate serving on ephemeral ports from its own database.
pub struct Tollgate {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// The admin API's address, when the configuration serves it.
    pub admin: Option<SocketAddr>,
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
        let admin = app.admin_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run(async {
            let _ = stopped.await;
        }));
        let stores = store::open(&config_db, false).await.unwrap();
        Tollgate {
            grpc,
            http,
            admin,
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
            .create(&tollgate::store::KeyRecord {
                key: &new,
                name,
                limits,
                expires_at,
                created_at: self.clock_now(),
                permissions: &[],
                metadata: &Default::default(),
                identity_id: None,
            })
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
        tollgate_command(self.dir.path())
            .args(args)
            .env("TOLLGATE_DATABASE_URL", &self.db_url)
            .output()
            .expect("tollgate binary runs")
    }

    pub async fn client(&self) -> AuthorizationClient<Channel> {
        AuthorizationClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connects")
    }

    pub async fn ratelimit_client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connects")
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        scalar(&self.db_url, sql).await
    }

    /// Waits, while tollgate runs, until `sql` counts `want`; fails after 10 s saying what it
    /// counted.
    pub async fn wait_for_count(&self, sql: &str, want: i64) {
        let started = std::time::Instant::now();
        loop {
            let got = self.scalar(sql).await;
            if got == want {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{got}, want {want} within 10 s: {sql}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What `/metrics` says now.
    pub async fn metrics_text(&self) -> String {
        metrics_text(&format!("http://{}", self.http)).await
    }

    /// Checks `key` (it must be allowed) until one check is answered from the key cache. A new
    /// key's creation reaches the cache asynchronously, and a lookup that overlaps that
    /// announcement is not cached; a test that then takes the database away needs the key
    /// cached for sure. Returns how many checks it made.
    pub async fn check_until_cached(&self, key: &str) -> u32 {
        let hits = |m: String| -> u64 {
            m.lines()
                .find_map(|l| {
                    l.strip_prefix("tollgate_key_cache_lookups_total{outcome=\"hit\"} ")?
                        .parse()
                        .ok()
                })
                .unwrap_or(0)
        };
        let mut client = self.client().await;
        for made in 1..=100 {
            let before = hits(self.metrics_text().await);
            let answer = client
                .check(crate::check::key_header(key))
                .await
                .expect("check answered")
                .into_inner();
            assert_eq!(answer.status.map(|s| s.code), Some(0), "{key:.8}… allowed");
            if hits(self.metrics_text().await) > before {
                return made;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the key never came from the cache");
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
        self.db
    }
}

/// What is left of a stopped tollgate: its database.
pub type Stopped = TestDb;
