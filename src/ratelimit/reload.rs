//! Rules reload: the rules in force change when their files do (checked every
//! `ratelimit.watch_interval`) or on SIGHUP, without dropping a request.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use super::rules::{Rules, rule_files};
use super::service::RateLimitService;
use crate::telemetry::Metrics;

/// Reloads the rate limit rules when their files change (checked every `interval`) or on
/// SIGHUP. A change is loaded once the files have stayed the same for a whole interval, so a
/// file caught half-written is not loaded. A file that does not load leaves the rules in force
/// as they were: the error is logged and counted, and the next change is tried again.
/// `merge_domains` is `ratelimit.merge_domains`: each reload merges the files as the start did.
pub async fn watch(
    path: PathBuf,
    merge_domains: bool,
    interval: std::time::Duration,
    service: Arc<RateLimitService>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut seen = rules_fingerprint(&path);
    let mut pending = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let forced = tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => false,
            _ = hangup => true,
        };
        let now = rules_fingerprint(&path);
        if !forced {
            if now == seen {
                pending = None;
                continue;
            }
            // Changed: wait until it holds still for one interval.
            if pending.as_ref() != Some(&now) {
                pending = Some(now);
                continue;
            }
        }
        pending = None;
        seen = now;
        match Rules::load(&path, merge_domains) {
            Ok(rules) => {
                service.replace_rules(rules);
                metrics.rules_reloads_ok.inc();
                metrics
                    .rules_last_reload_failed
                    .store(false, Ordering::Relaxed);
                tracing::info!(path = %path.display(), "rate limit rules reloaded");
            }
            Err(e) => {
                metrics.rules_reloads_failed.inc();
                metrics
                    .rules_last_reload_failed
                    .store(true, Ordering::Relaxed);
                tracing::error!(error = %e, "rate limit rules not reloaded; the previous rules stay in force");
            }
        }
    }
}

/// What identifies the rules as they are on disk: each file's name, size and modification time
/// (through links, so a ConfigMap's `..data` swap changes it), or the error that hides them.
type Fingerprint = Result<Vec<(PathBuf, u64, Option<SystemTime>)>, String>;

/// The rules files as [`Rules::load`] finds them, and their sizes and times: changes when any
/// file does.
fn rules_fingerprint(path: &Path) -> Fingerprint {
    let files = rule_files(path).map_err(|e| e.to_string())?;
    Ok(files
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let modified = meta.and_then(|m| m.modified().ok());
            (f, len, modified)
        })
        .collect())
}
