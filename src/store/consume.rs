//! The queue between [`QuotaStore::consume`](super::QuotaStore::consume) and a backend's quota
//! writer: each request waits here with a channel for its answer, and the writer runs the
//! requests waiting at one moment as one batch (one statement on PostgreSQL, one transaction on
//! SQLite), answering each as if it had run alone.
//!
//! A request whose caller stops waiting (its deadline passed, or Envoy cancelled the Check) is
//! never charged: the writer skips it if it has not run yet, and units it spent are carried to
//! the caller in a [`Charge`], which gives them back unless the caller takes them. Whichever
//! side drops the answer (the writer, because nobody listens any more, or the caller's dropped
//! channel, with the answer in it), the charge goes back, so there is no moment at which spent
//! units can be lost.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

use super::StoreError;
use super::quota::{Quota, QuotaOutcome, SharedOutcome, Spend, count_i64, refusal};

/// Most give-backs waiting for their statement; past it, units of unanswered requests stay
/// spent (and say so in the log), rather than memory growing while the database is away.
const MAX_GIVE_BACKS: usize = 4096;

/// A quota request queued for a store's writer, which may run it together with others.
#[derive(Debug)]
pub(crate) struct PendingConsume {
    pub key_id: i64,
    pub quota: Quota,
    pub cost: i64,
    pub now: DateTime<Utc>,
    /// For a key of an identity: the identity and its limits. Such a request is never run in
    /// a batch with others (see `consume_shared`).
    pub identity: Option<(i64, Quota)>,
    pub reply: oneshot::Sender<Result<Answered, StoreError>>,
}

/// A writer's answer to one request: the outcome, and for an admission, the units spent.
#[derive(Debug)]
pub(crate) struct Answered {
    pub outcome: QuotaOutcome,
    /// For a request with an identity: what the identity's counters said.
    identity_outcome: Option<QuotaOutcome>,
    /// What an admission spent; given back unless the caller takes it.
    charge: Option<Charge>,
}

/// Where a [`PendingConsume`]'s answer arrives.
pub(crate) type ConsumeAnswer = oneshot::Receiver<Result<Answered, StoreError>>;

impl PendingConsume {
    /// A request, and where its answer will arrive.
    pub(crate) fn new(spend: Spend, quota: Quota) -> (Self, ConsumeAnswer) {
        let (reply, answer) = oneshot::channel();
        let pending = PendingConsume {
            key_id: spend.key_id,
            quota,
            cost: count_i64(spend.units),
            now: spend.at,
            identity: None,
            reply,
        };
        (pending, answer)
    }

    /// Queues a request on `queue` and waits for the writer's answer. A writer that is gone
    /// (the store is closed) reads as an unavailable database. Dropped before the answer comes
    /// (a timeout, a cancelled Check), the request is skipped or, if it was already spent,
    /// given back.
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
        let answered = answer.await.map_err(|_| StoreError::closed())??;
        // From here to the caller's answer there is no await: the units are the caller's.
        if let Some(charge) = answered.charge {
            charge.keep();
        }
        Ok(answered.outcome)
    }

    /// Queues a request for a key of an identity (see [`PendingConsume::queue`]).
    pub(crate) async fn queue_shared(
        queue: &mpsc::Sender<PendingConsume>,
        spend: Spend,
        quota: Quota,
        identity: Quota,
    ) -> Result<SharedOutcome, StoreError> {
        let identity_id = spend.identity_id.ok_or_else(|| StoreError::Corrupt {
            table: "identity_usage",
            detail: "a shared spend without an identity".into(),
        })?;
        let (mut pending, answer) = PendingConsume::new(spend, quota);
        pending.identity = Some((identity_id, identity));
        queue
            .send(pending)
            .await
            .map_err(|_| StoreError::closed())?;
        let answered = answer.await.map_err(|_| StoreError::closed())??;
        if let Some(charge) = answered.charge {
            charge.keep();
        }
        Ok(SharedOutcome {
            key: answered.outcome,
            identity: answered.identity_outcome.unwrap_or(answered.outcome),
        })
    }

    /// Whether the caller stopped waiting: a writer skips such a request instead of running it.
    pub(crate) fn is_abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    /// The spend this request asks for.
    fn spend(&self) -> Spend {
        let spend = Spend::new(self.key_id, self.cost.max(0) as u64, self.now);
        match self.identity {
            Some((identity_id, _)) => spend.with_identity(identity_id),
            None => spend,
        }
    }
}

/// Units a writer spent for one request, on their way to its caller. Dropped without
/// [`keep`](Charge::keep) (nobody took the answer), they are given back.
#[derive(Debug)]
pub(crate) struct Charge {
    spent: Option<Spend>,
    to: GiveBacks,
}

impl Charge {
    /// The caller took the answer: the units stay spent.
    pub(crate) fn keep(mut self) {
        self.spent = None;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(spent) = self.spent.take() {
            self.to.send(spent);
        }
    }
}

/// A writer's statement in flight (see [`GiveBacks::in_flight`]).
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Gives back units spent for requests that were not answered: a bounded queue, and a task that
/// runs the backend's give-back statement for each, in order.
#[derive(Debug, Clone)]
pub(crate) struct GiveBacks {
    queue: mpsc::Sender<Spend>,
    /// Give-backs queued and not yet run, and writer statements in flight.
    pending: Arc<AtomicUsize>,
}

impl GiveBacks {
    /// Starts the task that runs `give_back` for every spend queued; it ends when every handle
    /// is gone. A give-back the database refuses for now is tried twice more.
    pub(crate) fn start<F, Fut>(give_back: F) -> Self
    where
        F: Fn(Spend) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), StoreError>> + Send,
    {
        let (queue, mut spends) = mpsc::channel::<Spend>(MAX_GIVE_BACKS);
        let pending = Arc::new(AtomicUsize::new(0));
        let left = pending.clone();
        tokio::spawn(async move {
            while let Some(spent) = spends.recv().await {
                let mut backoff = Duration::from_millis(100);
                for attempt in 1..=3 {
                    match give_back(spent).await {
                        Ok(()) => break,
                        Err(e) if e.is_transient() && attempt < 3 => {
                            tokio::time::sleep(backoff).await;
                            backoff *= 2;
                        }
                        Err(e) => {
                            tracing::error!(
                                error = %e.kind(),
                                key_id = spent.key_id,
                                units = spent.units,
                                "could not give back quota spent for an unanswered check"
                            );
                            break;
                        }
                    }
                }
                left.fetch_sub(1, Ordering::AcqRel);
            }
        });
        GiveBacks { queue, pending }
    }

    fn send(&self, spent: Spend) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self.queue.try_send(spent).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            tracing::error!(
                key_id = spent.key_id,
                units = spent.units,
                "too many quota give-backs waiting; units of an unanswered check stay spent"
            );
        }
    }

    /// Marks a statement of the writer in flight until dropped: what it spends for callers
    /// that have left is given back when it ends, so [`GiveBacks::drain`] waits for it too.
    pub(crate) fn in_flight(&self) -> InFlight {
        self.pending.fetch_add(1, Ordering::AcqRel);
        InFlight(self.pending.clone())
    }

    /// Waits, at most `within`, until every statement in flight has ended and every give-back
    /// queued has run: before the store closes.
    pub(crate) async fn drain(&self, within: Duration) {
        let until = tokio::time::Instant::now() + within;
        while self.pending.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The charge for what `p` spent, when it spent anything.
    fn charge(&self, p: &PendingConsume) -> Option<Charge> {
        (p.cost > 0).then(|| Charge {
            spent: Some(p.spend()),
            to: self.clone(),
        })
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
pub(crate) fn answer_batch(batch: Vec<PendingConsume>, rows: &[BatchRow], give_backs: &GiveBacks) {
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
        let answered = match answer {
            Some(outcome @ QuotaOutcome::Admitted { .. }) => Ok(Answered {
                outcome,
                identity_outcome: None,
                charge: give_backs.charge(&p),
            }),
            Some(outcome) => Ok(Answered {
                outcome,
                identity_outcome: None,
                charge: None,
            }),
            None => Err(StoreError::Corrupt {
                table: "api_usage",
                detail: format!(
                    "quota update for key {} neither admitted nor refused (no usage row?)",
                    p.key_id
                ),
            }),
        };
        // Nobody listening: the answer, and with it the charge, is dropped and given back.
        p.reply.send(answered).ok();
    }
}

/// The row a shared spend's statement returns: whether it spent, and the key's and the
/// identity's counters (after the increment when it spent, as they count now when not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct SharedRow {
    pub admitted: bool,
    pub daily: i64,
    pub monthly: i64,
    pub identity_daily: i64,
    pub identity_monthly: i64,
}

/// Answers a request for a key of an identity from its statement's row. No row (the key or
/// the identity has no usage row), or a refusal the counters do not explain, is an error.
pub(crate) fn answer_shared(p: PendingConsume, row: Option<SharedRow>, give_backs: &GiveBacks) {
    let cost = p.cost.max(0) as u64;
    let identity_quota = p.identity.map(|(_, q)| q).unwrap_or_default();
    let answered = match row {
        Some(r) => {
            let (d, m) = (r.daily.max(0) as u64, r.monthly.max(0) as u64);
            let (id, im) = (
                r.identity_daily.max(0) as u64,
                r.identity_monthly.max(0) as u64,
            );
            let key_room = QuotaOutcome::Admitted {
                daily: d,
                monthly: m,
            };
            let identity_room = QuotaOutcome::Admitted {
                daily: id,
                monthly: im,
            };
            if r.admitted {
                Some((key_room, identity_room, give_backs.charge(&p)))
            } else {
                let key = refusal(p.quota, cost, d, m);
                let identity = refusal(identity_quota, cost, id, im);
                (key.is_some() || identity.is_some()).then(|| {
                    (
                        key.unwrap_or(key_room),
                        identity.unwrap_or(identity_room),
                        None,
                    )
                })
            }
        }
        None => None,
    };
    let answered = match answered {
        Some((outcome, identity, charge)) => Ok(Answered {
            outcome,
            identity_outcome: Some(identity),
            charge,
        }),
        None => Err(StoreError::Corrupt {
            table: "identity_usage",
            detail: format!(
                "shared quota update for key {} neither admitted nor refused (no usage row?)",
                p.key_id
            ),
        }),
    };
    p.reply.send(answered).ok();
}

/// Sends every request of `batch` the same error.
pub(crate) fn fail_batch(batch: Vec<PendingConsume>, e: &StoreError) {
    for p in batch {
        p.reply.send(Err(e.clone())).ok();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Give-backs that only remember what they were given.
    fn recorded() -> (GiveBacks, Arc<Mutex<Vec<Spend>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let give_backs = GiveBacks::start(move |s| {
            sink.lock().unwrap().push(s);
            async { Ok(()) }
        });
        (give_backs, seen)
    }

    fn row(i: i64, admitted: bool, daily: i64, monthly: i64) -> BatchRow {
        BatchRow {
            i,
            admitted,
            daily,
            monthly,
        }
    }

    #[tokio::test]
    async fn every_request_gets_the_answer_its_row_gives() {
        let (give_backs, given) = recorded();
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
        answer_batch(
            batch,
            &[
                row(1, false, 4, 4),
                row(0, true, 1, 1),
                row(2, false, 0, 7),
                // Row 3 missing; a row for no request is ignored.
                row(9, true, 1, 1),
            ],
            &give_backs,
        );
        let mut got = Vec::new();
        for a in answers {
            got.push(a.await.unwrap().map(|a| {
                if let Some(c) = a.charge {
                    c.keep();
                }
                a.outcome
            }));
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
        give_backs.drain(Duration::from_secs(1)).await;
        assert!(given.lock().unwrap().is_empty(), "an answer taken is kept");
    }

    #[tokio::test]
    async fn an_admission_nobody_takes_is_given_back_whenever_the_caller_left() {
        let (give_backs, given) = recorded();
        let now = Utc::now();
        let quota = Quota::default();
        // The caller left before the writer answered.
        let (before, answer) = PendingConsume::new(Spend::new(1, 3, now), quota);
        drop(answer);
        assert!(before.is_abandoned());
        // The caller left after the answer was sent, before reading it.
        let (after, answer) = PendingConsume::new(Spend::new(2, 5, now), quota);
        // A refusal spends nothing, so there is nothing to give back.
        let (refused, refused_answer) = PendingConsume::new(Spend::new(3, 7, now), quota);
        assert!(!after.is_abandoned());
        answer_batch(
            vec![before, after, refused],
            &[row(0, true, 3, 3), row(1, true, 5, 5), row(2, false, 0, 0)],
            &give_backs,
        );
        drop(answer);
        drop(refused_answer);
        give_backs.drain(Duration::from_secs(1)).await;
        let mut given = given.lock().unwrap().clone();
        given.sort_by_key(|s| s.key_id);
        assert_eq!(given, vec![Spend::new(1, 3, now), Spend::new(2, 5, now)]);
    }

    #[tokio::test]
    async fn a_queued_request_dropped_while_waiting_is_given_back() {
        let (give_backs, given) = recorded();
        let (queue, mut writer) = mpsc::channel(4);
        let now = Utc::now();
        let waiting = tokio::spawn(async move {
            PendingConsume::queue(&queue, Spend::new(7, 2, now), Quota::default()).await
        });
        let p = writer.recv().await.unwrap();
        // The caller gives up (Envoy cancelled the Check) while the statement runs.
        waiting.abort();
        let _ = waiting.await;
        answer_batch(vec![p], &[row(0, true, 2, 2)], &give_backs);
        give_backs.drain(Duration::from_secs(1)).await;
        assert_eq!(*given.lock().unwrap(), vec![Spend::new(7, 2, now)]);
    }
}
