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
use crate::store::{LogRow, RequestLogStore};
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
    sink: Arc<dyn RequestLogStore>,
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
    sink: Arc<dyn RequestLogStore>,
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

/// Keeps the request log in shape (partitions ahead, retention) at start and every hour.
pub async fn maintain(
    log: Arc<dyn RequestLogStore>,
    clock: Arc<dyn crate::clock::Clock>,
    retention: Option<std::time::Duration>,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(3600));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match log.maintain(clock.now(), retention).await {
            Ok(done) => {
                if !done.partitions_created.is_empty()
                    || !done.partitions_dropped.is_empty()
                    || done.rows_deleted > 0
                {
                    tracing::info!(
                        created = ?done.partitions_created,
                        dropped = ?done.partitions_dropped,
                        rows_deleted = done.rows_deleted,
                        "request log maintained"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "request log maintenance failed; retrying in an hour")
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

/// How long an outcome waits for its Check row to be written before it is counted unmatched.
const UNMATCHED_GRACE: Duration = Duration::from_secs(10);

/// The access log's end: outcomes (status, latency, bytes) waiting to complete their rows.
#[derive(Clone)]
pub struct OutcomeLog {
    tx: Option<mpsc::Sender<crate::store::Outcome>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for OutcomeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutcomeLog")
            .field("enabled", &self.tx.is_some())
            .finish()
    }
}

impl OutcomeLog {
    /// Queues an outcome without waiting; a full queue drops it and counts the drop.
    pub fn record(&self, outcome: crate::store::Outcome) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(outcome).is_err() {
            self.metrics.access_log_dropped.inc();
        }
    }
}

/// Creates the outcome queue and its writer, which runs until `drain` is cancelled (after the
/// request log's own writer has finished, so the rows to complete are written), then completes
/// what it can and returns.
pub fn start_outcomes(
    config: &RequestLogConfig,
    sink: Arc<dyn RequestLogStore>,
    metrics: Arc<Metrics>,
    drain: CancellationToken,
) -> (OutcomeLog, Option<tokio::task::JoinHandle<()>>) {
    if !config.enabled {
        return (OutcomeLog { tx: None, metrics }, None);
    }
    let (tx, rx) = mpsc::channel(config.queue_capacity);
    let writer = OutcomeWriter {
        sink,
        metrics: metrics.clone(),
        batch_size: config.batch_size,
        flush_interval: config.flush_interval.0,
        capacity: config.queue_capacity,
    };
    let handle = tokio::spawn(writer.run(rx, drain));
    (
        OutcomeLog {
            tx: Some(tx),
            metrics,
        },
        Some(handle),
    )
}

struct OutcomeWriter {
    sink: Arc<dyn RequestLogStore>,
    metrics: Arc<Metrics>,
    batch_size: usize,
    flush_interval: Duration,
    capacity: usize,
}

impl OutcomeWriter {
    async fn run(self, mut rx: mpsc::Receiver<crate::store::Outcome>, drain: CancellationToken) {
        let mut pending: Vec<(crate::store::Outcome, std::time::Instant)> = Vec::new();
        let mut received = Vec::with_capacity(self.batch_size);
        let mut ticker = tokio::time::interval(self.flush_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = drain.cancelled() => break,
                _ = ticker.tick() => self.flush(&mut pending, false).await,
                n = rx.recv_many(&mut received, self.batch_size) => {
                    if n == 0 {
                        break;
                    }
                    let now = std::time::Instant::now();
                    pending.extend(received.drain(..).map(|o| (o, now)));
                    if pending.len() >= self.batch_size {
                        self.flush(&mut pending, false).await;
                    }
                }
            }
        }
        rx.close();
        let now = std::time::Instant::now();
        while let Some(o) = rx.recv().await {
            pending.push((o, now));
        }
        self.flush(&mut pending, true).await;
    }

    /// Completes what it can. Outcomes whose row is not written yet wait for a later flush,
    /// up to [`UNMATCHED_GRACE`] (or none, at the last flush); failed writes keep everything.
    async fn flush(
        &self,
        pending: &mut Vec<(crate::store::Outcome, std::time::Instant)>,
        last: bool,
    ) {
        if pending.is_empty() {
            return;
        }
        let mut kept = Vec::new();
        for chunk in pending.chunks(self.batch_size.max(1)) {
            let outcomes: Vec<_> = chunk.iter().map(|(o, _)| o.clone()).collect();
            match self.sink.complete(&outcomes).await {
                Ok((found, refunded)) => {
                    self.metrics.quota_refunds.add(refunded);
                    for ((o, at), found) in chunk.iter().zip(found) {
                        if found {
                            self.metrics.access_log_completed.inc();
                        } else if !last && at.elapsed() < UNMATCHED_GRACE {
                            kept.push((o.clone(), *at));
                        } else {
                            self.metrics.access_log_unmatched.inc();
                        }
                    }
                }
                Err(e) => {
                    self.metrics.reqlog_write_errors.inc();
                    tracing::warn!(error = %e, "completing request log rows failed; retrying");
                    if last {
                        self.metrics.access_log_unmatched.add(chunk.len() as u64);
                    } else {
                        kept.extend(chunk.iter().cloned());
                    }
                }
            }
        }
        // Bounded: past the queue's capacity the oldest go.
        if kept.len() > self.capacity {
            let excess = kept.len() - self.capacity;
            self.metrics.access_log_dropped.add(excess as u64);
            kept.drain(..excess);
        }
        *pending = kept;
    }
}
