//! Builds tollgate from its configuration and runs it until shutdown.
//!
//! [`App::build`] does everything that can fail at start (bind both ports, open the database,
//! apply migrations) so a bad address or database stops the process before it serves anything.
//! [`App::run`] serves until its shutdown future resolves, then stops in order: gRPC health and
//! `/readyz` report not serving → stop accepting → finish in-flight checks → stop background
//! tasks → flush the request log → close the database.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogServiceServer;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::authz::AuthzService;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::grpc::accesslog::AccessLogGrpc;
use crate::grpc::authz::AuthzGrpc;
use crate::grpc::ratelimit::RateLimitGrpc;
use crate::http::{HttpState, router};
use crate::keys::cache::KeyCache;
use crate::limiter::{self, WindowLimiter};
use crate::ratelimit::rules::Rules;
use crate::ratelimit::service::RateLimitService;
use crate::reqlog::{self, OutcomeLog, RequestLog};
use crate::store::batched::QuotaCounter;
use crate::store::{self, Stores};
use crate::telemetry::Metrics;

/// A built, not yet running, tollgate.
pub struct App {
    config: Config,
    grpc: TcpListener,
    http: TcpListener,
    stores: Stores,
    cache: Arc<KeyCache>,
    authz: Arc<AuthzService>,
    ratelimit: Arc<RateLimitService>,
    limiter: Arc<dyn WindowLimiter>,
    log: RequestLog,
    log_writer: Option<JoinHandle<()>>,
    drain: CancellationToken,
    outcomes: OutcomeLog,
    outcome_writer: Option<JoinHandle<()>>,
    drain_outcomes: CancellationToken,
    clock: Arc<dyn Clock>,
    /// How quota is spent; blocks reserved and not spent are given back on flush.
    quotas: Arc<QuotaCounter>,
    metrics: Arc<Metrics>,
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// Like [`App::build`], with the clock every time-dependent rule reads (tests set it).
    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<App> {
        // Rules first: a bad file stops the start before anything is opened.
        let rules = match &config.ratelimit.rules {
            Some(path) => Rules::load(path)?,
            None => Rules::default(),
        };
        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("cannot listen on grpc_addr {}", config.grpc_addr))?;
        let http = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("cannot listen on http_addr {}", config.http_addr))?;
        let stores = store::open(&config.database, true)
            .await
            .with_context(|| format!("cannot open database {}", config.database.url))?;
        let metrics = Arc::new(Metrics::default());
        let drain = CancellationToken::new();
        let (log, log_writer) = reqlog::start(
            &config.request_log,
            stores.log.clone(),
            metrics.clone(),
            drain.clone(),
        );
        let drain_outcomes = CancellationToken::new();
        let (outcomes, outcome_writer) = reqlog::start_outcomes(
            &config.request_log,
            stores.log.clone(),
            metrics.clone(),
            drain_outcomes.clone(),
        );
        let cache = Arc::new(KeyCache::new(
            stores.keys.clone(),
            config.cache.key_ttl.0,
            config.cache.negative_ttl.0,
        ));
        let limiter = limiter::open(&config.redis)?;
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
            },
        ));
        let ratelimit = Arc::new(RateLimitService::new(
            &config.ratelimit,
            &config.limits,
            rules,
            crate::ratelimit::service::RateLimitDeps {
                limiter: limiter.clone(),
                keys: cache.clone(),
                log: log.clone(),
                clock: clock.clone(),
                metrics: metrics.clone(),
                failures,
            },
        ));
        Ok(App {
            config,
            grpc,
            http,
            stores,
            cache,
            authz,
            ratelimit,
            limiter,
            log,
            log_writer,
            drain,
            outcomes,
            outcome_writer,
            drain_outcomes,
            clock,
            quotas,
            metrics,
        })
    }

    /// The bound gRPC address (useful when the configured port was 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().expect("bound socket")
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr().expect("bound socket")
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves until `shutdown` resolves (or a server fails), then shuts down in order.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let App {
            config,
            grpc,
            http,
            stores,
            cache,
            authz,
            ratelimit,
            limiter,
            log,
            log_writer,
            drain,
            outcomes,
            outcome_writer,
            drain_outcomes,
            clock,
            quotas,
            metrics,
        } = self;
        let grpc_addr = grpc.local_addr()?;
        let http_addr = http.local_addr()?;

        let background = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(
            cache
                .clone()
                .watch_changes(config.cache.poll_interval.0, background.clone()),
        );
        tasks.spawn(reqlog::maintain(
            stores.log.clone(),
            clock.clone(),
            config.request_log.retention.map(|d| d.0),
            background.clone(),
        ));
        tasks.spawn(quotas.clone().run_flushes(background.clone()));
        // Serve only once key changes are being heard, so no cached key can miss one.
        if !cache.wait_primed(std::time::Duration::from_secs(10)).await {
            tracing::warn!("key change feed not running after 10s; serving anyway");
        }
        if let Some(path) = config.ratelimit.rules.clone() {
            tasks.spawn(crate::ratelimit::reload::watch(
                path,
                config.ratelimit.watch_interval.0,
                ratelimit.clone(),
                metrics.clone(),
                background.clone(),
            ));
        }

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<AuthorizationServer<AuthzGrpc>>().await;
        health
            .set_serving::<RateLimitServiceServer<RateLimitGrpc>>()
            .await;
        let shutting_down = Arc::new(AtomicBool::new(false));

        let grpc_stop = CancellationToken::new();
        let authz_grpc = AuthzGrpc::new(
            authz,
            config.authz.key_id_header.clone(),
            config.authz.hide_credentials,
        );
        let mut grpc_server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(AuthorizationServer::new(authz_grpc))
                .add_service(RateLimitServiceServer::new(RateLimitGrpc::new(ratelimit)))
                .add_service(AccessLogServiceServer::new(AccessLogGrpc::new(
                    outcomes,
                    grpc_stop.clone(),
                )))
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(grpc).with_nodelay(Some(true)),
                    grpc_stop.clone().cancelled_owned(),
                ),
        );

        let http_stop = CancellationToken::new();
        let state = HttpState {
            metrics,
            keys: stores.keys.clone(),
            limiter,
            database_failure: config.database.failure_mode,
            limiter_failure: config.redis.failure_mode,
            cache,
            log,
            shutting_down: shutting_down.clone(),
        };
        let mut http_server = tokio::spawn(
            axum::serve(http, router(state))
                .with_graceful_shutdown(http_stop.clone().cancelled_owned())
                .into_future(),
        );
        tracing::info!(%grpc_addr, %http_addr, database = %config.database.url, "tollgate serving");

        let mut failure = None;
        tokio::select! {
            _ = shutdown => tracing::info!("shutdown requested"),
            r = &mut grpc_server => failure = Some(format!("gRPC server stopped: {r:?}")),
            r = &mut http_server => failure = Some(format!("HTTP server stopped: {r:?}")),
        }

        // 1. Tell Envoy and the orchestrator we are going.
        shutting_down.store(true, Ordering::Relaxed);
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        health
            .set_not_serving::<AuthorizationServer<AuthzGrpc>>()
            .await;
        health
            .set_not_serving::<RateLimitServiceServer<RateLimitGrpc>>()
            .await;
        // ...and keep answering while they notice.
        if !config.shutdown_delay.0.is_zero() && failure.is_none() {
            tracing::info!(delay = ?config.shutdown_delay.0, "reporting not serving; still answering");
            tokio::time::sleep(config.shutdown_delay.0).await;
        }
        // 2. Stop accepting; let in-flight checks finish.
        let deadline = config.shutdown_timeout.0;
        grpc_stop.cancel();
        http_stop.cancel();
        if !grpc_server.is_finished()
            && tokio::time::timeout(deadline, &mut grpc_server)
                .await
                .is_err()
        {
            tracing::warn!("in-flight checks still running after {deadline:?}; stopping");
            grpc_server.abort();
        }
        if tokio::time::timeout(deadline, &mut http_server)
            .await
            .is_err()
        {
            http_server.abort();
        }
        // 3. Background tasks.
        background.cancel();
        tasks.close();
        tasks.wait().await;
        // 4. Every queued log row.
        drain.cancel();
        if let Some(writer) = log_writer
            && tokio::time::timeout(deadline, writer).await.is_err()
        {
            tracing::error!("request log flush did not finish within {deadline:?}");
        }
        // ...then the outcomes that complete those rows.
        drain_outcomes.cancel();
        if let Some(writer) = outcome_writer
            && tokio::time::timeout(deadline, writer).await.is_err()
        {
            tracing::error!("access log outcomes not written within {deadline:?}");
        }
        // ...and quota reserved but not spent.
        if let Err(e) = quotas.flush().await {
            tracing::error!(error = %e, "reserved quota not given back at shutdown");
        }
        // 5. The database.
        stores.close().await;
        tracing::info!("tollgate stopped");
        match failure {
            Some(f) => anyhow::bail!(f),
            None => Ok(()),
        }
    }
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
