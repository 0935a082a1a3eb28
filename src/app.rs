//! Builds tollgate from its configuration and runs it until shutdown.
//!
//! [`App::build`] does everything that can fail at start (bind the ports, open the database,
//! apply migrations) so a bad address or database stops the process before it serves anything.
//! [`App::run`] serves until its shutdown future resolves, then stops in order: gRPC health and
//! `/readyz` report not serving → stop accepting → finish in-flight checks → stop background
//! tasks → flush the request log → close the database → end the gRPC serving threads.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogServiceServer;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;

use crate::admin::auth::AdminAuth;
use crate::admin::listener::{AdminPeer, TlsListener};
use crate::admin::service::KeyAdmin;
use crate::authz::AuthzService;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::grpc::accesslog::AccessLogGrpc;
use crate::grpc::authz::AuthzGrpc;
use crate::grpc::check_request::AuthorizationServer;
use crate::grpc::ratelimit::RateLimitGrpc;
use crate::grpc::serving::{Lanes, Serve};
use crate::http::{HttpState, router};
use crate::keys::cache::KeyCache;
use crate::limiter::{self, WindowLimiter};
use crate::ratelimit::rules::Rules;
use crate::ratelimit::service::RateLimitService;
use crate::reqlog::{self, OutcomeLog, RequestLog};
use crate::store::batched::QuotaCounter;
use crate::store::{self, Stores};
use crate::telemetry::Metrics;
use crate::tls::GrpcTls;

/// A built, not yet running, tollgate.
pub struct App {
    config: Config,
    /// Bound at build, served by run.
    grpc: Option<TcpListener>,
    http: Option<TcpListener>,
    /// The admin API's port, when `admin_addr` is set.
    admin: Option<TcpListener>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    /// `grpc.serving_threads` as resolved once at build (`null` reads the CPU limit): the Redis
    /// connection count, the lanes and the start log all use this one number.
    serving_threads: usize,
    stores: Stores,
    cache: Arc<KeyCache>,
    authz: Arc<AuthzService>,
    ratelimit: Arc<RateLimitService>,
    limiter: Arc<dyn WindowLimiter>,
    /// TLS on the gRPC port, when configured.
    tls: Option<Arc<GrpcTls>>,
    log: RequestLog,
    outcomes: OutcomeLog,
    /// How quota is spent; blocks reserved and not spent are given back on flush.
    quotas: Arc<QuotaCounter>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    stops: Stops,
    /// The request log's writers, which end once their stop is cancelled and their queue written.
    log_writer: Option<JoinHandle<()>>,
    outcome_writer: Option<JoinHandle<()>>,
}

/// Where each part of a running tollgate hears that it is time to stop: one token per step of
/// the shutdown order, all children of one root (cancelling it stops everything at once).
#[derive(Debug, Clone)]
struct Stops {
    /// The gRPC and HTTP servers stop accepting, and access-log streams end.
    serving: CancellationToken,
    /// The background tasks: key change feed, rules reload, log maintenance, quota flushes.
    background: CancellationToken,
    /// The request log writer writes what is queued and ends...
    log: CancellationToken,
    /// ...then the access-log outcomes that complete those rows.
    outcomes: CancellationToken,
}

impl Stops {
    fn new() -> Self {
        let root = CancellationToken::new();
        Stops {
            serving: root.child_token(),
            background: root.child_token(),
            log: root.child_token(),
            outcomes: root.child_token(),
        }
    }
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// Like [`App::build`], with the clock every time-dependent rule reads (tests set it).
    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<App> {
        // Rules and certificates first: a bad file stops the start before anything is opened.
        let rules = match &config.ratelimit.rules {
            Some(path) => Rules::load(path, config.ratelimit.merge_domains)?,
            None => Rules::default(),
        };
        let tls = match config.grpc_tls.enabled() {
            true => Some(Arc::new(GrpcTls::load(&config.grpc_tls)?)),
            false => None,
        };
        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("cannot listen on grpc_addr {}", config.grpc_addr))?;
        let http = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("cannot listen on http_addr {}", config.http_addr))?;
        let admin = match config.admin_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on admin_addr {addr}"))?,
            ),
            None => None,
        };
        let stores = store::open(&config.database, true)
            .await
            .with_context(|| format!("cannot open database {}", config.database.url))?;
        let metrics = Arc::new(Metrics::default());
        let stops = Stops::new();
        let (log, log_writer) = reqlog::start(
            &config.request_log,
            stores.log.clone(),
            metrics.clone(),
            stops.log.clone(),
        );
        let (outcomes, outcome_writer) = reqlog::start_outcomes(
            &config.request_log,
            stores.log.clone(),
            metrics.clone(),
            stops.outcomes.clone(),
        );
        let cache = Arc::new(KeyCache::new(stores.keys.clone(), &config.cache));
        let serving_threads = config.grpc.serving_threads();
        let limiter = limiter::open(
            &config.redis,
            config.limits.max_counters,
            serving_threads,
            metrics.clone(),
        )?;
        let quotas = Arc::new(QuotaCounter::new(stores.quotas.clone(), &config.quota));
        let failures = crate::failure::FailurePolicies::new(
            config.database.failure_mode,
            config.redis.failure_mode,
            metrics.clone(),
        );
        let authz = Arc::new(AuthzService::new(
            &config.authz,
            &config.limits,
            crate::authz::AuthzDeps {
                keys: cache.clone(),
                limiter: limiter.clone(),
                quotas: quotas.clone(),
                log: log.clone(),
                clock: clock.clone(),
                metrics: metrics.clone(),
                failures: failures.clone(),
                database_timeout: config.database.timeout.0,
            },
        ));
        let ratelimit = Arc::new(RateLimitService::new(
            &config.ratelimit,
            &config.limits,
            rules,
            crate::ratelimit::service::RateLimitDeps {
                limiter: limiter.clone(),
                keys: cache.clone(),
                identities: crate::ratelimit::service::IdentityLimits::new(
                    stores.identities.clone(),
                ),
                log: log.clone(),
                clock: clock.clone(),
                metrics: metrics.clone(),
                failures,
            },
        ));
        Ok(App {
            config,
            grpc_addr: grpc.local_addr()?,
            http_addr: http.local_addr()?,
            admin_addr: admin.as_ref().map(TcpListener::local_addr).transpose()?,
            serving_threads,
            grpc: Some(grpc),
            http: Some(http),
            admin,
            stores,
            cache,
            authz,
            ratelimit,
            limiter,
            tls,
            log,
            outcomes,
            quotas,
            clock,
            metrics,
            stops,
            log_writer,
            outcome_writer,
        })
    }

    /// The bound gRPC address (useful when the configured port was 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The bound admin API address, if `admin_addr` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves until `shutdown` resolves (or a server fails), then shuts down in order.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let (grpc_addr, http_addr) = (self.grpc_addr(), self.http_addr());
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut lanes = self.grpc_lanes(health_service)?;
        let tasks = self.start_background();
        // Serve only once key changes are being heard, so no cached key can miss one.
        if !self.cache.wait_primed(Duration::from_secs(10)).await {
            tracing::warn!("key change feed not running after 10s; serving anyway");
        }
        set_health(&health, ServingStatus::Serving).await;
        let shutting_down = Arc::new(AtomicBool::new(false));
        let listener = self.grpc.take().expect("an App runs once");
        lanes.accept(listener, self.stops.serving.clone());
        // As configured: 0 is the main runtime (one lane, a task of it), not one thread.
        let serving_threads = self.serving_threads;
        let mut http_server = tokio::spawn(self.http_server(shutting_down.clone()));
        let mut admin_server = self.admin_server().map(tokio::spawn);
        match &self.tls {
            None => {
                tracing::info!(%grpc_addr, %http_addr, admin_addr = ?self.admin_addr, database = %self.config.database.url, serving_threads, "tollgate serving")
            }
            Some(tls) => {
                let cert = tls.info();
                tracing::info!(
                    %grpc_addr,
                    %http_addr,
                    admin_addr = ?self.admin_addr,
                    database = %self.config.database.url,
                    serving_threads,
                    grpc_tls = if self.config.grpc_tls.client_ca_file.is_some() { "mtls" } else { "tls" },
                    serial = %cert.serial,
                    not_after = %cert.not_after_rfc3339(),
                    "tollgate serving"
                );
            }
        }
        let admin_stopped = async {
            match admin_server.as_mut() {
                Some(server) => server.await,
                None => std::future::pending().await,
            }
        };

        let failure = tokio::select! {
            _ = shutdown => {
                tracing::info!("shutdown requested");
                None
            }
            r = lanes.stopped() => Some(format!("gRPC server stopped: {r:?}")),
            r = &mut http_server => Some(format!("HTTP server stopped: {r:?}")),
            r = admin_stopped => Some(format!("admin API server stopped: {r:?}")),
        };

        // 1. Tell Envoy and the orchestrator we are going, and keep answering while they notice.
        shutting_down.store(true, Ordering::Relaxed);
        set_health(&health, ServingStatus::NotServing).await;
        let delay = self.config.shutdown_delay.0;
        if !delay.is_zero() && failure.is_none() {
            tracing::info!(?delay, "reporting not serving; still answering");
            tokio::time::sleep(delay).await;
        }
        // 2. Stop accepting; let in-flight checks finish.
        let deadline = self.config.shutdown_timeout.0;
        self.stops.serving.cancel();
        if !lanes.finished(deadline).await {
            tracing::warn!("in-flight checks still running after {deadline:?}; stopping");
            lanes.abort();
        }
        if !finished(&mut http_server, deadline).await {
            http_server.abort();
        }
        if let Some(mut admin_server) = admin_server
            && !finished(&mut admin_server, deadline).await
        {
            admin_server.abort();
        }
        // 3. Background tasks.
        self.stops.background.cancel();
        tasks.close();
        tasks.wait().await;
        // 4. Every queued log row, then the outcomes that complete those rows, then quota
        //    reserved but not spent.
        self.stops.log.cancel();
        if let Some(mut writer) = self.log_writer.take()
            && !finished(&mut writer, deadline).await
        {
            tracing::error!("request log flush did not finish within {deadline:?}");
        }
        self.stops.outcomes.cancel();
        if let Some(mut writer) = self.outcome_writer.take()
            && !finished(&mut writer, deadline).await
        {
            tracing::error!("access log outcomes not written within {deadline:?}");
        }
        match tokio::time::timeout(deadline, self.quotas.flush()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "reserved quota not given back at shutdown"),
            Err(_) => tracing::error!("reserved quota not given back within {deadline:?}"),
        }
        // 5. The database (a Check still running after a forced stop may hold a connection),
        //    then the gRPC lanes' threads: sockets the database and Redis opened on a lane are
        //    served by its reactor until here.
        if tokio::time::timeout(deadline, self.stores.close())
            .await
            .is_err()
        {
            tracing::error!("database connections not closed within {deadline:?}");
        }
        lanes.close().await;
        tracing::info!("tollgate stopped");
        match failure {
            Some(f) => anyhow::bail!(f),
            None => Ok(()),
        }
    }

    /// Starts what runs beside the servers until [`Stops::background`]: the key change feed, log
    /// maintenance, quota flushes and, with a rules file, its reload.
    fn start_background(&self) -> TaskTracker {
        let stop = &self.stops.background;
        let tasks = TaskTracker::new();
        tasks.spawn(
            self.cache
                .clone()
                .watch_changes(self.config.cache.poll_interval.0, stop.clone()),
        );
        tasks.spawn(reqlog::maintain(
            self.stores.log.clone(),
            self.clock.clone(),
            self.config.request_log.retention.map(|d| d.0),
            stop.clone(),
        ));
        tasks.spawn(self.quotas.clone().run_flushes(stop.clone()));
        if let Some(tls) = &self.tls {
            tasks.spawn(crate::tls::reload::watch(
                tls.clone(),
                self.metrics.clone(),
                stop.clone(),
            ));
        }
        if let Some(path) = self.config.ratelimit.rules.clone() {
            tasks.spawn(crate::ratelimit::reload::watch(
                path,
                self.config.ratelimit.merge_domains,
                self.config.ratelimit.watch_interval.0,
                self.ratelimit.clone(),
                self.metrics.clone(),
                stop.clone(),
            ));
        }
        tasks
    }

    /// The gRPC port's lanes (`grpc::serving`): health, Check, ShouldRateLimit and the access
    /// log, until [`Stops::serving`]; all of them behind TLS when `grpc_tls` is set.
    fn grpc_lanes<H: Health>(&mut self, health: HealthServer<H>) -> anyhow::Result<Lanes> {
        let authz = AuthzGrpc::new(
            self.authz.clone(),
            self.config.authz.key_id_header.clone(),
            self.config.authz.hide_credentials,
        )
        .with_metadata_headers(&self.config.authz.metadata_headers);
        let stop = self.stops.serving.clone();
        let limits = &self.config.grpc;
        let max_message = limits.max_message_bytes;
        let mut server = tonic::transport::Server::builder()
            .http2_keepalive_interval(limits.keepalive_interval.map(|d| d.0))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout.0))
            .max_concurrent_streams(limits.max_concurrent_streams);
        if let Some(age) = limits.max_connection_age {
            server = server
                .max_connection_age(age.0)
                .max_connection_age_grace(self.config.shutdown_timeout.0);
        }
        let router = server
            .add_service(health)
            .add_service(AuthorizationServer::new(authz).max_decoding_message_size(max_message))
            .add_service(
                RateLimitServiceServer::new(RateLimitGrpc::new(self.ratelimit.clone()))
                    .max_decoding_message_size(max_message),
            )
            .add_service(
                AccessLogServiceServer::new(AccessLogGrpc::new(
                    self.outcomes.clone(),
                    stop.clone(),
                ))
                .max_decoding_message_size(max_message),
            );
        // Each lane serves its connections with a router of its own; each connection's answers
        // ready at one moment leave in one write (grpc::coalesce).
        let serve: Serve = Arc::new(move |connections| {
            let (router, stop) = (router.clone(), stop.clone());
            Box::pin(async move {
                router
                    .serve_with_incoming_shutdown(connections, stop.cancelled_owned())
                    .await
                    .map_err(anyhow::Error::from)
            })
        });
        Lanes::start(
            self.serving_threads,
            serve,
            self.tls.clone(),
            self.metrics.clone(),
        )
        .context("cannot start the gRPC serving threads")
    }

    /// The HTTP port: `/healthz`, `/readyz` and `/metrics`, until [`Stops::serving`].
    fn http_server(
        &mut self,
        shutting_down: Arc<AtomicBool>,
    ) -> impl Future<Output = std::io::Result<()>> + use<> {
        let state = HttpState {
            metrics: self.metrics.clone(),
            keys: self.stores.keys.clone(),
            limiter: self.limiter.clone(),
            database_failure: self.config.database.failure_mode,
            limiter_failure: self.config.redis.failure_mode,
            cache: self.cache.clone(),
            log: self.log.clone(),
            tls: self.tls.clone(),
            shutting_down,
        };
        axum::serve(self.http.take().expect("an App runs once"), router(state))
            .with_graceful_shutdown(self.stops.serving.clone().cancelled_owned())
            .into_future()
    }
}

impl App {
    /// The admin port (gRPC and REST), when `admin_addr` is set, until [`Stops::serving`]. With
    /// `grpc_tls` it speaks TLS only, with the gRPC port's certificate (renewals included): it
    /// carries bearer tokens and the secrets of keys it creates.
    fn admin_server(
        &mut self,
    ) -> Option<std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>> {
        let listener = self.admin.take()?;
        let auth = AdminAuth::new(&self.config.admin);
        if auth.is_open() {
            tracing::warn!(
                admin_addr = ?self.admin_addr,
                "admin API without credentials (admin.token_sha256 and admin.client_sans are \
                 empty): every local process can manage keys"
            );
        }
        let router = crate::admin::router(
            KeyAdmin::new(&self.stores, self.config.limits.default_per_minute),
            auth,
            self.clock.clone(),
            self.metrics.clone(),
        )
        .into_make_service_with_connect_info::<AdminPeer>();
        let stop = self.stops.serving.clone();
        Some(match &self.tls {
            None => Box::pin(
                axum::serve(listener, router)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .into_future(),
            ),
            Some(tls) => {
                let listener = match TlsListener::new(
                    listener,
                    tls.clone(),
                    self.metrics.clone(),
                    stop.clone(),
                ) {
                    Ok(listener) => listener,
                    Err(e) => return Some(Box::pin(std::future::ready(Err(e)))),
                };
                Box::pin(
                    axum::serve(listener, router)
                        .with_graceful_shutdown(stop.cancelled_owned())
                        .into_future(),
                )
            }
        })
    }
}

/// Reports every service tollgate serves, and the server as a whole, as `status`.
async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(AuthorizationServer::<AuthzGrpc>::NAME, status)
        .await;
    health
        .set_service_status(RateLimitServiceServer::<RateLimitGrpc>::NAME, status)
        .await;
}

/// Whether `task` finishes within `deadline` (one that does not keeps running).
async fn finished<T>(task: &mut JoinHandle<T>, deadline: Duration) -> bool {
    task.is_finished() || tokio::time::timeout(deadline, task).await.is_ok()
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
