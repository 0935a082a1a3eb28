//! Renewed certificates without a restart. Kubernetes secret volumes (a `..data` symlink swap),
//! cert-manager and Istio renew by replacing files; this reads the certificate, key and client
//! CA every [`POLL`] and, once a change has held still for one poll (so a pair caught half
//! written is not tried), serves it to new connections. A renewal that does not load leaves the
//! pair before it in force: logged once, counted, and shown on `/readyz`, until the files change
//! again.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Files, GrpcTls};
use crate::telemetry::Metrics;

/// How often the files are read. A change is served within two polls.
pub(crate) const POLL: Duration = Duration::from_secs(1);

/// Watches the files of `tls` until `stop`.
pub(crate) async fn watch(tls: Arc<GrpcTls>, metrics: Arc<Metrics>, stop: CancellationToken) {
    metrics
        .grpc_tls_not_after
        .store(tls.info().not_after, Relaxed);
    // What was read at the last poll, and the contents last tried and refused.
    let mut seen = tls.current().files.clone();
    let mut refused: Option<Files> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let config = tls.config().clone();
        let Ok(now) = tokio::task::spawn_blocking(move || Files::read(&config)).await else {
            continue;
        };
        let changed = now != seen;
        seen = now.clone();
        if changed || refused.as_ref() == Some(&now) {
            continue;
        }
        if now == tls.current().files {
            // Back to the files served (a refused renewal undone): nothing has failed any more.
            if refused.take().is_some() {
                tls.clear_failure();
                metrics.grpc_tls_last_reload_failed.store(false, Relaxed);
            }
            continue;
        }
        match tls.replace(now.clone()) {
            Ok(info) => {
                refused = None;
                metrics.grpc_tls_reloads_ok.inc();
                metrics.grpc_tls_last_reload_failed.store(false, Relaxed);
                metrics.grpc_tls_not_after.store(info.not_after, Relaxed);
                tracing::info!(
                    serial = %info.serial,
                    subject = %info.subject,
                    not_after = %info.not_after_rfc3339(),
                    "gRPC TLS: renewed certificate served to new connections"
                );
            }
            Err(e) => {
                refused = Some(now);
                metrics.grpc_tls_reloads_failed.inc();
                metrics.grpc_tls_last_reload_failed.store(true, Relaxed);
                let served = tls.info();
                tracing::error!(
                    error = %e,
                    serial = %served.serial,
                    not_after = %served.not_after_rfc3339(),
                    "gRPC TLS: renewed files do not load; still serving the certificate before"
                );
            }
        }
    }
}
