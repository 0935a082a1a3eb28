//! The request log: a bounded queue on the request path, a batch writer behind it.
//!
//! A check hands its row over with `try_send` and never waits (DESIGN rule 5). The writer takes
//! rows in batches of up to `batch_size`, writing whenever a batch is full or `flush_interval` has
//! passed. A failed write is retried with backoff while new rows wait in the queue; a full queue
//! drops the new row and counts it. On shutdown the queue is closed and everything in it is written.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::RequestLogConfig;
use crate::store::{LogRow, RequestLogSink};
use crate::telemetry::Metrics;

/// Longest a row's text fields may be; longer values are cut (a 1 MB path is not worth storing).
const MAX_FIELD: usize = 2048;

/// The request path's end of the log.
#[derive(Clone)]
pub struct RequestLog {
    tx: Option<mpsc::Sender<LogRow>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for RequestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestLog")
            .field("enabled", &self.tx.is_some())
            .finish()
    }
}

impl RequestLog {
    /// Queues a row without waiting. A full queue drops it and counts the drop.
    pub fn record(&self, row: LogRow) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(row).is_err() {
            self.metrics.reqlog_dropped.inc();
        }
    }

    /// Rows waiting to be written.
    pub fn depth(&self) -> usize {
        self.tx
            .as_ref()
            .map(|tx| tx.max_capacity() - tx.capacity())
            .unwrap_or(0)
    }
}

/// Cuts a text field to [`MAX_FIELD`] bytes on a character boundary.
pub fn clip(s: &str) -> String {
    if s.len() <= MAX_FIELD {
        return s.to_string();
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Creates the queue and its writer. The writer runs until `drain` is cancelled, then writes
/// what is queued and returns.
pub fn start(
    config: &RequestLogConfig,
    sink: Arc<dyn RequestLogSink>,
    metrics: Arc<Metrics>,
    drain: CancellationToken,
) -> (RequestLog, Option<tokio::task::JoinHandle<()>>) {
    if !config.enabled {
        return (RequestLog { tx: None, metrics }, None);
    }
    let (tx, rx) = mpsc::channel(config.queue_capacity);
    let writer = Writer {
        sink,
        metrics: metrics.clone(),
        batch_size: config.batch_size,
        flush_interval: config.flush_interval.0,
    };
    let handle = tokio::spawn(writer.run(rx, drain));
    (
        RequestLog {
            tx: Some(tx),
            metrics,
        },
        Some(handle),
    )
}

struct Writer {
    sink: Arc<dyn RequestLogSink>,
    metrics: Arc<Metrics>,
    batch_size: usize,
    flush_interval: Duration,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<LogRow>, drain: CancellationToken) {
        let mut batch = Vec::with_capacity(self.batch_size);
        let mut ticker = tokio::time::interval(self.flush_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let room = self.batch_size - batch.len();
            tokio::select! {
                _ = drain.cancelled() => break,
                _ = ticker.tick() => {
                    if !batch.is_empty() {
                        self.write(&mut batch, &drain).await;
                    }
                }
                n = rx.recv_many(&mut batch, room) => {
                    if n == 0 {
                        break;
                    }
                    if batch.len() >= self.batch_size {
                        self.write(&mut batch, &drain).await;
                    }
                }
            }
        }
        // Shutdown: take no new rows, write every queued one.
        rx.close();
        while let Some(row) = rx.recv().await {
            batch.push(row);
            if batch.len() >= self.batch_size {
                self.write(&mut batch, &drain).await;
            }
        }
        if !batch.is_empty() {
            self.write(&mut batch, &drain).await;
        }
    }

    /// Writes and clears `batch`, retrying with backoff. While running, retries until the write
    /// succeeds; once draining, gives up after a few tries and counts the rows as failed.
    async fn write(&self, batch: &mut Vec<LogRow>, drain: &CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        let mut tries_while_draining = 0;
        loop {
            match self.sink.write_batch(batch).await {
                Ok(()) => {
                    self.metrics.reqlog_written.add(batch.len() as u64);
                    batch.clear();
                    return;
                }
                Err(e) => {
                    self.metrics.reqlog_write_errors.inc();
                    tracing::warn!(error = %e, rows = batch.len(), "request log write failed; retrying");
                    if drain.is_cancelled() {
                        tries_while_draining += 1;
                        if tries_while_draining >= 5 {
                            self.metrics.reqlog_failed.add(batch.len() as u64);
                            tracing::error!(
                                rows = batch.len(),
                                "request log rows lost at shutdown"
                            );
                            batch.clear();
                            return;
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_respects_char_boundaries() {
        assert_eq!(clip("abc"), "abc");
        let long = "é".repeat(MAX_FIELD);
        let c = clip(&long);
        assert!(c.len() <= MAX_FIELD && c.chars().all(|ch| ch == 'é'));
    }
}
