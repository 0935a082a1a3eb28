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

use crate::keys::cache::KeyCache;
use crate::reqlog::RequestLog;
use crate::store::KeyStore;
use crate::telemetry::Metrics;

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub keys: Arc<dyn KeyStore>,
    pub cache: Arc<KeyCache>,
    pub log: RequestLog,
    pub shutting_down: Arc<AtomicBool>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if state.shutting_down.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_string(),
        );
    }
    match tokio::time::timeout(Duration::from_secs(1), state.keys.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_string()),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("database: {e}\n")),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "database: no answer within 1s\n".to_string(),
        ),
    }
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(state.log.depth(), state.cache.len()),
    )
}
