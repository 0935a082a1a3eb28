//! The queue between [`QuotaStore::consume`](super::QuotaStore::consume) and a backend's quota
//! writer: each request waits here with a channel for its answer, and the writer runs the
//! requests waiting at one moment as one batch (one statement on PostgreSQL, one transaction on
//! SQLite), answering each as if it had run alone.

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

use super::StoreError;
use super::quota::{Quota, QuotaOutcome, Spend, count_i64, refusal};

/// A quota request queued for a store's writer, which may run it together with others.
#[derive(Debug)]
pub(crate) struct PendingConsume {
    pub key_id: i64,
    pub quota: Quota,
    pub cost: i64,
    pub now: DateTime<Utc>,
    pub reply: oneshot::Sender<Result<QuotaOutcome, StoreError>>,
}

/// Where a [`PendingConsume`]'s answer arrives.
pub(crate) type ConsumeAnswer = oneshot::Receiver<Result<QuotaOutcome, StoreError>>;

impl PendingConsume {
    /// A request, and where its answer will arrive.
    pub(crate) fn new(spend: Spend, quota: Quota) -> (Self, ConsumeAnswer) {
        let (reply, answer) = oneshot::channel();
        let pending = PendingConsume {
            key_id: spend.key_id,
            quota,
            cost: count_i64(spend.units),
            now: spend.at,
            reply,
        };
        (pending, answer)
    }

    /// Queues a request on `queue` and waits for the writer's answer. A writer that is gone
    /// (the store is closed) reads as an unavailable database.
    pub(crate) async fn queue(
        queue: &mpsc::Sender<PendingConsume>,
        spend: Spend,
        quota: Quota,
    ) -> Result<QuotaOutcome, StoreError> {
        let (pending, answer) = PendingConsume::new(spend, quota);
        queue
            .send(pending)
            .await
            .map_err(|_| StoreError::closed())?;
        answer.await.map_err(|_| StoreError::closed())?
    }
}

/// One row of a batch's answer: request `i` was admitted, with its counters after the increment,
/// or refused, with its counters as they count now (which tell which limit had no room).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct BatchRow {
    pub i: i64,
    pub admitted: bool,
    pub daily: i64,
    pub monthly: i64,
}

/// Answers every request of `batch` from the rows its statement returned, and sends each answer.
/// A request without a row (its key has no usage row: the key is gone), or with a refusal its
/// counters do not explain, gets an error: both mean the database is not as tollgate left it.
pub(crate) fn answer_batch(batch: Vec<PendingConsume>, rows: &[BatchRow]) {
    let mut answers: Vec<Option<QuotaOutcome>> = vec![None; batch.len()];
    for row in rows {
        let Some(p) = usize::try_from(row.i).ok().and_then(|i| batch.get(i)) else {
            continue;
        };
        let (daily, monthly) = (row.daily.max(0) as u64, row.monthly.max(0) as u64);
        answers[row.i as usize] = if row.admitted {
            Some(QuotaOutcome::Admitted { daily, monthly })
        } else {
            refusal(p.quota, p.cost.max(0) as u64, daily, monthly)
        };
    }
    for (p, answer) in batch.into_iter().zip(answers) {
        let outcome = answer.ok_or_else(|| StoreError::Corrupt {
            table: "api_usage",
            detail: format!(
                "quota update for key {} neither admitted nor refused (no usage row?)",
                p.key_id
            ),
        });
        p.reply.send(outcome).ok();
    }
}

/// Sends every request of `batch` the same error.
pub(crate) fn fail_batch(batch: Vec<PendingConsume>, e: &StoreError) {
    for p in batch {
        p.reply.send(Err(e.clone())).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_request_gets_the_answer_its_row_gives() {
        let now = Utc::now();
        let capped = Quota {
            daily: Some(5),
            monthly: Some(9),
        };
        let mut batch = Vec::new();
        let mut answers = Vec::new();
        for cost in [1, 2, 3, 4] {
            let (p, a) = PendingConsume::new(Spend::new(cost as i64, cost, now), capped);
            batch.push(p);
            answers.push(a);
        }
        let row = |i, admitted, daily, monthly| BatchRow {
            i,
            admitted,
            daily,
            monthly,
        };
        answer_batch(
            batch,
            &[
                row(1, false, 4, 4),
                row(0, true, 1, 1),
                row(2, false, 0, 7),
                // Row 3 missing; a row for no request is ignored.
                row(9, true, 1, 1),
            ],
        );
        let mut got = Vec::new();
        for a in answers {
            got.push(a.await.unwrap());
        }
        assert_eq!(
            got[0].clone().unwrap(),
            QuotaOutcome::Admitted {
                daily: 1,
                monthly: 1
            }
        );
        assert_eq!(
            got[1].clone().unwrap(),
            QuotaOutcome::DailyExceeded { used: 4 }
        );
        assert_eq!(
            got[2].clone().unwrap(),
            QuotaOutcome::MonthlyExceeded { used: 7 }
        );
        assert!(
            matches!(got[3], Err(StoreError::Corrupt { .. })),
            "{:?}",
            got[3]
        );
    }
}
