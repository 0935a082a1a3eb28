//! The operator's HTTP port: `/healthz` (the process is up), `/readyz` (it can reach its
//! database and is not shutting down) and `/metrics` (Prometheus text).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::config::FailureMode;
use crate::keys::cache::KeyCache;
use crate::limiter::WindowLimiter;
use crate::reqlog::RequestLog;
use crate::store::KeyStore;
use crate::telemetry::Metrics;
use crate::tls::GrpcTls;

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub keys: Arc<dyn KeyStore>,
    pub limiter: Arc<dyn WindowLimiter>,
    pub database_failure: FailureMode,
    pub limiter_failure: FailureMode,
    pub cache: Arc<KeyCache>,
    pub log: RequestLog,
    /// The gRPC port's TLS, whose served certificate `/readyz` names.
    pub tls: Option<Arc<GrpcTls>>,
    pub shutting_down: Arc<AtomicBool>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// 200 when every backend whose failure mode is `closed` answers; a backend in `open` mode
/// that is down is reported in the body but does not fail readiness, since tollgate still
/// answers for it (taking a sidecar out of service would defeat `open`).
async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if state.shutting_down.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_string(),
        );
    }
    let limit = Duration::from_secs(1);
    let (db, limiter) = tokio::join!(
        tokio::time::timeout(limit, state.keys.ping()),
        tokio::time::timeout(limit, state.limiter.ping()),
    );
    let problem = |r: Result<Result<(), String>, _>| match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some("no answer within 1s".to_string()),
    };
    let mut ready = true;
    let mut body = String::new();
    for (name, problem, mode) in [
        (
            "database",
            problem(db.map(|r| r.map_err(|e| e.to_string()))),
            state.database_failure,
        ),
        (
            "rate limiter",
            problem(limiter.map(|r| r.map_err(|e| e.to_string()))),
            state.limiter_failure,
        ),
    ] {
        match problem {
            None => body.push_str(&format!("{name}: ok\n")),
            Some(p) => {
                ready &= mode == FailureMode::Open;
                let effect = match mode {
                    FailureMode::Open => "failure_mode open: serving",
                    FailureMode::Closed => "failure_mode closed: not ready",
                };
                body.push_str(&format!("{name}: {p} ({effect})\n"));
            }
        }
    }
    if let Some(tls) = &state.tls {
        body.push_str(&tls_line(tls));
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

/// Which certificate the gRPC port serves, and whether its last renewal failed: serial, subject
/// and expiry (nothing secret). Readiness does not depend on it: every replica renews from the
/// same files, so failing readiness on a bad renewal would take them all out at once while the
/// certificate they serve is still good.
fn tls_line(tls: &GrpcTls) -> String {
    let cert = tls.info();
    let expired = if cert.not_after < chrono::Utc::now().timestamp() {
        " (EXPIRED)"
    } else {
        ""
    };
    let mut line = format!(
        "grpc tls: serving certificate serial {}, subject {}, expires {}{expired}",
        cert.serial,
        cert.subject,
        cert.not_after_rfc3339()
    );
    if let Some(failure) = tls.last_failure() {
        line.push_str(&format!(
            "; the renewed files do not load, so this one stays: {failure}"
        ));
    }
    line.push('\n');
    line
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(state.log.depth(), state.cache.stats()),
    )
}
