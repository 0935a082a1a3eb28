//! The request log: a bounded queue on the request path, a batch writer behind it.
//!
//! A check hands its row over with `try_send` and never waits (DESIGN rule 5). The writer takes
//! rows in batches of up to `batch_size`, writing whenever a batch is full or `flush_interval` has
//! passed. A write that fails because the database is away is retried with backoff while new
//! rows wait in the queue; a full queue drops the new row and counts it. A write the database
//! rejects is split to find the rows it rejects: those are dropped and counted, the others
//! written, so one bad row never holds up the rows behind it. On shutdown the queue is closed and
//! everything in it is written.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::RequestLogConfig;
use crate::store::{LogRow, RequestLogStore};
use crate::telemetry::Metrics;

/// Longest a row's text fields may be; longer values are cut (a 1 MB path is not worth storing).
const MAX_FIELD: usize = 2048;

/// Most writes spent, besides the first, on finding the rows of one batch the database rejects.
/// One bad row among 1,000 takes 20; past the limit a sub-batch still rejected is dropped whole,
/// so a batch full of bad rows costs a bounded number of statements, not one per row.
const MAX_SPLIT_WRITES: usize = 64;

/// The first wait before retrying a write the database could not take, doubled up to
/// [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

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
    /// Cleans the row's text (see [`clean`]) and queues it without waiting. A full queue drops
    /// it and counts the drop.
    pub fn record(&self, mut row: LogRow) {
        let Some(tx) = &self.tx else { return };
        for field in [
            &mut row.request_id,
            &mut row.method,
            &mut row.path,
            &mut row.host,
            &mut row.client_addr,
        ] {
            if let Some(text) = field
                && needs_cleaning(text)
            {
                *text = clean(text);
            }
        }
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

/// A request-log value as it is stored: every control character (C0, tab and newline
/// included, DEL, C1) replaced by U+FFFD, then cut to [`MAX_FIELD`] bytes on a character
/// boundary. A NUL would make PostgreSQL refuse the row, and escape sequences or line breaks have
/// no business in an id, a method, a path, a host or an address; the mark says one was there.
pub fn clean(s: &str) -> String {
    if !needs_cleaning(s) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len().min(MAX_FIELD));
    for c in s.chars() {
        let c = if c.is_control() {
            char::REPLACEMENT_CHARACTER
        } else {
            c
        };
        if out.len() + c.len_utf8() > MAX_FIELD {
            break;
        }
        out.push(c);
    }
    out
}

/// Whether `s` is too long or holds a control character. Read byte by byte: a C0 control or
/// DEL is one byte, a C1 control (U+0080..U+009F) is 0xC2 followed by 0x80..0x9F, and no other
/// character's encoding contains those sequences.
fn needs_cleaning(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() > MAX_FIELD
        || b.iter().enumerate().any(|(i, &c)| {
            c < 0x20
                || c == 0x7f
                || (c == 0xc2 && b.get(i + 1).is_some_and(|n| (0x80..0xa0).contains(n)))
        })
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

    /// Writes and clears `batch`. A write that fails because the database is away or busy (a
    /// transient error) is retried with backoff: while running until it succeeds, once draining
    /// a few times before its rows are counted as failed. A write the database rejects (any other
    /// error) is split in halves, recursively, so that the rows it rejects are found, dropped
    /// and counted, and the others written: about 2·log2(N) writes for one bad row among N, and
    /// never more than [`MAX_SPLIT_WRITES`] writes besides the first (past that, a sub-batch still
    /// rejected is dropped whole). One warning per batch says how many rows went and why, without
    /// their values.
    async fn write(&self, batch: &mut Vec<LogRow>, drain: &CancellationToken) {
        let mut backoff = INITIAL_BACKOFF;
        let mut tries_while_draining = 0;
        let mut split_writes = 0;
        let mut rejected = 0;
        let mut rejection = None;
        // The ranges of `batch` still to write: depth first, left half first, so at most
        // log2(N) + 1 wait here.
        let mut pending = Vec::new();
        pending.push(0..batch.len());
        while let Some(range) = pending.pop() {
            let rows = &batch[range.clone()];
            let e = match self.sink.write_batch(rows).await {
                Ok(()) => {
                    self.metrics.reqlog_written.add(rows.len() as u64);
                    backoff = INITIAL_BACKOFF;
                    continue;
                }
                Err(e) => e,
            };
            self.metrics.reqlog_write_errors.inc();
            if !e.is_transient() {
                rejection.get_or_insert_with(|| e.kind());
                if range.len() > 1 && split_writes + 2 <= MAX_SPLIT_WRITES {
                    split_writes += 2;
                    let mid = range.start + range.len() / 2;
                    pending.push(mid..range.end);
                    pending.push(range.start..mid);
                } else {
                    rejected += range.len();
                }
                continue;
            }
            tracing::warn!(error = %e, rows = rows.len(), "request log write failed; retrying");
            if drain.is_cancelled() {
                tries_while_draining += 1;
                if tries_while_draining >= 5 {
                    let lost = range.len() + pending.iter().map(|r| r.len()).sum::<usize>();
                    self.metrics.reqlog_failed.add(lost as u64);
                    tracing::error!(rows = lost, "request log rows lost at shutdown");
                    break;
                }
            }
            pending.push(range);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        if rejected > 0 {
            self.metrics.reqlog_rejected.add(rejected as u64);
            tracing::warn!(
                rows = rejected,
                batch = batch.len(),
                error_kind = rejection.as_deref().unwrap_or_default(),
                "request log rows rejected by the database; dropped"
            );
        }
        batch.clear();
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
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    use async_trait::async_trait;
    use chrono::{DateTime, Utc};

    use super::*;
    use crate::store::{LogApi, Maintenance, Outcome, StoreError, UsageQuery, UsageSummary};

    /// A request log that rejects every batch holding a row whose path is `/poison`, as a
    /// constraint would, and fails the writes numbered in `away` (from 0) as if the server were
    /// down.
    #[derive(Default)]
    struct FakeLog {
        away: std::ops::Range<usize>,
        writes: AtomicUsize,
        rows: Mutex<Vec<LogRow>>,
    }

    #[async_trait]
    impl RequestLogStore for FakeLog {
        async fn write_batch(&self, rows: &[LogRow]) -> Result<(), StoreError> {
            if self.away.contains(&self.writes.fetch_add(1, Relaxed)) {
                return Err(sqlx::Error::PoolTimedOut.into());
            }
            if rows.iter().any(|r| r.path.as_deref() == Some("/poison")) {
                return Err(sqlx::Error::Protocol("rejected".into()).into());
            }
            self.rows.lock().unwrap().extend_from_slice(rows);
            Ok(())
        }
        async fn complete(&self, outcomes: &[Outcome]) -> Result<(Vec<bool>, u64), StoreError> {
            Ok((vec![false; outcomes.len()], 0))
        }
        async fn maintain(
            &self,
            _: DateTime<Utc>,
            _: Option<Duration>,
        ) -> Result<Maintenance, StoreError> {
            Ok(Maintenance::default())
        }
        async fn summarize(&self, _: &UsageQuery) -> Result<UsageSummary, StoreError> {
            Ok(UsageSummary::default())
        }
    }

    fn row(i: usize, path: &str) -> LogRow {
        LogRow {
            ts: DateTime::from_timestamp(1_773_144_020, 0).unwrap(),
            api: LogApi::Authz,
            request_id: Some(format!("rid-{i}")),
            decision_id: None,
            key_id: None,
            method: Some("GET".into()),
            path: Some(path.into()),
            host: None,
            client_addr: None,
            allowed: false,
            reason: "missing_key",
            status: 401,
            cost: 0,
            key_prefix: None,
            identity_id: None,
        }
    }

    /// `n` rows, those at `bad` with the path the fake rejects.
    fn rows(n: usize, bad: &[usize]) -> Vec<LogRow> {
        (0..n)
            .map(|i| row(i, if bad.contains(&i) { "/poison" } else { "/ok" }))
            .collect()
    }

    fn writer(log: &Arc<FakeLog>) -> (Writer, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let writer = Writer {
            sink: log.clone(),
            metrics: metrics.clone(),
            batch_size: 1000,
            flush_interval: Duration::from_millis(50),
        };
        (writer, metrics)
    }

    /// The ids of the rows written, in order.
    fn written(log: &FakeLog) -> Vec<String> {
        let rows = log.rows.lock().unwrap();
        rows.iter().filter_map(|r| r.request_id.clone()).collect()
    }

    #[tokio::test]
    async fn one_rejected_row_is_found_in_about_two_log2_n_writes_and_only_it_is_dropped() {
        let log = Arc::new(FakeLog::default());
        let (writer, metrics) = writer(&log);
        let mut batch = rows(1000, &[637]);
        writer.write(&mut batch, &CancellationToken::new()).await;
        assert!(batch.is_empty());
        let want: Vec<String> = (0..1000)
            .filter(|&i| i != 637)
            .map(|i| format!("rid-{i}"))
            .collect();
        assert_eq!(written(&log), want, "every other row, in order");
        assert_eq!(metrics.reqlog_written.get(), 999);
        assert_eq!(metrics.reqlog_rejected.get(), 1);
        assert_eq!(metrics.reqlog_failed.get(), 0);
        // The whole batch, then two halves on each of the 10 levels down to the row.
        assert_eq!(log.writes.load(Relaxed), 21);
        assert_eq!(metrics.reqlog_write_errors.get(), 11);
    }

    #[tokio::test]
    async fn a_few_rejected_rows_are_each_found() {
        let log = Arc::new(FakeLog::default());
        let (writer, metrics) = writer(&log);
        let mut batch = rows(1000, &[0, 500, 999]);
        writer.write(&mut batch, &CancellationToken::new()).await;
        assert_eq!(metrics.reqlog_written.get(), 997);
        assert_eq!(metrics.reqlog_rejected.get(), 3);
        assert_eq!(written(&log).len(), 997);
        assert!(log.writes.load(Relaxed) <= 1 + MAX_SPLIT_WRITES);
    }

    #[tokio::test]
    async fn a_batch_of_rejected_rows_costs_a_bounded_number_of_writes() {
        let log = Arc::new(FakeLog::default());
        let (writer, metrics) = writer(&log);
        let all: Vec<usize> = (0..1000).collect();
        let mut batch = rows(1000, &all);
        writer.write(&mut batch, &CancellationToken::new()).await;
        assert_eq!(metrics.reqlog_written.get(), 0);
        assert_eq!(metrics.reqlog_rejected.get(), 1000);
        assert_eq!(log.writes.load(Relaxed), 1 + MAX_SPLIT_WRITES);
    }

    #[tokio::test]
    async fn a_database_that_is_away_is_waited_for_not_split() {
        let log = Arc::new(FakeLog {
            away: 0..3,
            ..Default::default()
        });
        let (writer, metrics) = writer(&log);
        let mut batch = rows(100, &[]);
        writer.write(&mut batch, &CancellationToken::new()).await;
        assert_eq!(metrics.reqlog_written.get(), 100);
        assert_eq!(metrics.reqlog_rejected.get(), 0);
        assert_eq!(metrics.reqlog_write_errors.get(), 3);
        assert_eq!(log.writes.load(Relaxed), 4, "the whole batch each time");
    }

    #[tokio::test]
    async fn a_database_away_during_a_split_is_waited_for_too() {
        // The whole batch is rejected; its first half then finds the server away twice.
        let log = Arc::new(FakeLog {
            away: 1..3,
            ..Default::default()
        });
        let (writer, metrics) = writer(&log);
        let mut batch = rows(8, &[5]);
        writer.write(&mut batch, &CancellationToken::new()).await;
        assert_eq!(metrics.reqlog_written.get(), 7);
        assert_eq!(metrics.reqlog_rejected.get(), 1);
        assert_eq!(metrics.reqlog_failed.get(), 0);
        // 1 rejected, 2 away, then halves: [0..4] ok, [4..8] rejected, [4..6] rejected, [4] ok,
        // [5] rejected, [6..8] ok.
        assert_eq!(log.writes.load(Relaxed), 3 + 6);
        assert_eq!(
            written(&log),
            [
                "rid-0", "rid-1", "rid-2", "rid-3", "rid-4", "rid-6", "rid-7"
            ]
        );
    }

    #[tokio::test]
    async fn shutdown_gives_up_on_a_database_that_stays_away_and_counts_the_rows() {
        let log = Arc::new(FakeLog {
            away: 0..usize::MAX,
            ..Default::default()
        });
        let (writer, metrics) = writer(&log);
        let drain = CancellationToken::new();
        drain.cancel();
        let mut batch = rows(10, &[]);
        writer.write(&mut batch, &drain).await;
        assert!(batch.is_empty());
        assert_eq!(log.writes.load(Relaxed), 5);
        assert_eq!(metrics.reqlog_failed.get(), 10);
        assert_eq!(metrics.reqlog_rejected.get(), 0);
    }

    #[test]
    fn what_needs_cleaning_is_what_char_is_control_says() {
        for c in (0..0x3000).filter_map(char::from_u32) {
            let s = format!("a{c}b");
            assert_eq!(needs_cleaning(&s), c.is_control(), "{:?}", c);
        }
        assert!(!needs_cleaning(&"x".repeat(MAX_FIELD)));
        assert!(needs_cleaning(&"x".repeat(MAX_FIELD + 1)));
    }

    #[test]
    fn clean_cuts_on_char_boundaries() {
        assert_eq!(clean("abc"), "abc");
        let long = "é".repeat(MAX_FIELD);
        let c = clean(&long);
        assert!(c.len() <= MAX_FIELD && c.chars().all(|ch| ch == 'é'));
        assert_eq!(c.len(), MAX_FIELD);
    }

    #[test]
    fn clean_marks_every_control_character() {
        assert_eq!(clean("a\0b"), "a\u{FFFD}b");
        assert_eq!(
            clean("\t\r\n\x1b[2J\x7f\u{85}"),
            "\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}[2J\u{FFFD}\u{FFFD}"
        );
        // What is not a control character stays.
        assert_eq!(clean("/v1/ünï cödé?q=1&r=%00"), "/v1/ünï cödé?q=1&r=%00");
        // The marks count against the length: three bytes each.
        let c = clean(&"\0".repeat(MAX_FIELD));
        assert_eq!(c.len(), MAX_FIELD / 3 * 3);
        assert!(c.chars().all(|ch| ch == char::REPLACEMENT_CHARACTER));
    }

    #[test]
    fn record_cleans_every_text_field_before_queueing() {
        let metrics = Arc::new(Metrics::default());
        let (tx, mut rx) = mpsc::channel(1);
        let log = RequestLog {
            tx: Some(tx),
            metrics,
        };
        let dirty = |s: &str| Some(format!("{s}\0{}", "x".repeat(3 * MAX_FIELD)));
        log.record(LogRow {
            request_id: dirty("id"),
            method: dirty("GET"),
            path: dirty("/"),
            host: dirty("h"),
            client_addr: dirty("10.0.0.1"),
            ..row(0, "/")
        });
        let row = rx.try_recv().unwrap();
        for (field, prefix) in [
            (&row.request_id, "id"),
            (&row.method, "GET"),
            (&row.path, "/"),
            (&row.host, "h"),
            (&row.client_addr, "10.0.0.1"),
        ] {
            let text = field.as_deref().unwrap();
            assert!(text.starts_with(&format!("{prefix}\u{FFFD}x")), "{prefix}");
            assert!(text.len() <= MAX_FIELD, "{prefix}");
        }
    }
}

/// How long an outcome waits for its Check row to be written before it is counted unmatched,
/// counted from when its decision id was minted (and never longer than this from when it
/// arrived). A row is queued when its Check is decided, so an entry for a request that took
/// longer than this finds its row at the first try or never: it is tried once.
const UNMATCHED_GRACE: Duration = Duration::from_secs(10);

/// Until when an outcome received `now` is tried again while its row is not found.
fn retry_deadline(outcome: &crate::store::Outcome, now: std::time::Instant) -> std::time::Instant {
    let left = crate::decision::decision_id_minted_at(&outcome.decision_id)
        .and_then(|minted| {
            (minted + UNMATCHED_GRACE)
                .duration_since(std::time::SystemTime::now())
                .ok()
        })
        .unwrap_or(Duration::ZERO);
    now + left.min(UNMATCHED_GRACE)
}

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

    /// Counts an entry that names no row (it carries no decision id tollgate minted): it is
    /// never queued, so it costs no statement.
    pub fn unmatched(&self) {
        self.metrics.access_log_unmatched.inc();
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
                    pending.extend(received.drain(..).map(|o| {
                        let until = retry_deadline(&o, now);
                        (o, until)
                    }));
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
        // The last flush keeps nothing, whatever the deadlines.
        self.flush(&mut pending, true).await;
    }

    /// Completes what it can. Outcomes whose row is not written yet wait for a later flush,
    /// until their deadline (see [`retry_deadline`]; none at the last flush); failed writes keep
    /// everything.
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
                        } else if !last && std::time::Instant::now() < *at {
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
