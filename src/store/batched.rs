//! Quota counted in blocks reserved from the database and spent in memory: `quota.mode: batched`
//! for keys with quotas, and always for keys without (nothing to enforce, only to count). The
//! [`QuotaCounter`] puts both behind one [`QuotaStore`], so the Check path spends quota without
//! knowing how it is counted.
//!
//! A replica reserves a block of units for a key with the same conditional statement as exact
//! mode (`QuotaStore::consume` with the block as the cost), shrinking the block to the room left
//! when the whole block does not fit, and spends it in memory without a round trip. Every
//! `flush_interval` (at most 1 s) it gives back what it has not spent, so the counters exceed
//! real use by at most what replicas hold for that long. Since a replica spends only what the
//! database granted it, no more than the limit is ever admitted across all replicas; near the
//! limit, a unit held by one replica may make another refuse until the next flush.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::{Quota, QuotaOutcome, QuotaStore, SharedOutcome, Spend, StoreError, Usage};
use crate::config::{QuotaConfig, QuotaMode};

/// Block size for counting keys without quotas.
const UNCAPPED_BLOCK: u64 = 1_000;

/// How quota is spent: exactly (one conditional statement per request) or in blocks
/// (`quota.mode`) for keys with a daily or monthly limit, in blocks for keys without one.
pub struct QuotaCounter {
    db: Arc<dyn QuotaStore>,
    /// Keys with quotas, when `quota.mode` is `batched`.
    batched: Option<BatchedQuota>,
    uncapped: BatchedQuota,
    flush_interval: std::time::Duration,
}

impl std::fmt::Debug for QuotaCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaCounter")
            .field("batched", &self.batched.is_some())
            .finish_non_exhaustive()
    }
}

impl QuotaCounter {
    /// Counts on `db` as `config` says.
    pub fn new(db: Arc<dyn QuotaStore>, config: &QuotaConfig) -> Self {
        Self {
            batched: (config.mode == QuotaMode::Batched)
                .then(|| BatchedQuota::new(db.clone(), config.max_block)),
            uncapped: BatchedQuota::new(db.clone(), UNCAPPED_BLOCK),
            flush_interval: config.flush_interval.0,
            db,
        }
    }

    /// Gives back every unit reserved and not spent. Units whose return fails are kept and
    /// tried again at the next flush; the first error is returned.
    pub async fn flush(&self) -> Result<u64, StoreError> {
        let uncapped = self.uncapped.flush().await;
        let batched = match &self.batched {
            Some(b) => b.flush().await,
            None => Ok(0),
        };
        Ok(uncapped? + batched?)
    }

    /// Gives back what is reserved and not spent every `quota.flush_interval`, until `stop`.
    pub async fn run_flushes(self: Arc<Self>, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(self.flush_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if let Err(e) = self.flush().await {
                tracing::warn!(error = %e, "giving back reserved quota failed; retrying");
            }
        }
    }
}

#[async_trait]
impl QuotaStore for QuotaCounter {
    async fn consume(&self, spend: Spend, quota: Quota) -> Result<QuotaOutcome, StoreError> {
        if quota.is_uncapped() {
            self.uncapped.consume(spend, quota).await
        } else if let Some(batched) = &self.batched {
            batched.consume(spend, quota).await
        } else {
            self.db.consume(spend, quota).await
        }
    }

    async fn give_back(&self, spent: Spend) -> Result<(), StoreError> {
        self.db.give_back(spent).await
    }

    async fn usage(&self, key_id: i64, now: DateTime<Utc>) -> Result<Usage, StoreError> {
        self.db.usage(key_id, now).await
    }

    /// Always exact, whatever `quota.mode` says: the identity's counters are shared by keys
    /// that may be on any replica, so they are never reserved in blocks.
    async fn consume_shared(
        &self,
        spend: Spend,
        quota: Quota,
        identity: Quota,
    ) -> Result<SharedOutcome, StoreError> {
        self.db.consume_shared(spend, quota, identity).await
    }

    async fn identity_usage(
        &self,
        identity_id: i64,
        now: DateTime<Utc>,
    ) -> Result<Usage, StoreError> {
        self.db.identity_usage(identity_id, now).await
    }
}

/// What a replica holds for one key.
#[derive(Debug, Default)]
struct Slot {
    /// Units reserved and not yet spent.
    available: u64,
    /// When they were reserved: the day and month they count in.
    reserved_at: Option<DateTime<Utc>>,
    /// The counters as the database left them after the last reservation.
    daily_after: u64,
    monthly_after: u64,
    /// The last block asked for; grows for busy keys.
    block: u64,
}

/// Batched quotas in front of a [`QuotaStore`].
pub struct BatchedQuota {
    inner: Arc<dyn QuotaStore>,
    max_block: u64,
    slots: Mutex<HashMap<i64, Arc<tokio::sync::Mutex<Slot>>>>,
}

impl std::fmt::Debug for BatchedQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchedQuota")
            .field("max_block", &self.max_block)
            .finish_non_exhaustive()
    }
}

/// Whether `a` and `b` count in the same UTC day (and so the same month).
fn same_period(a: DateTime<Utc>, b: DateTime<Utc>) -> bool {
    a.date_naive() == b.date_naive()
}

impl BatchedQuota {
    pub fn new(inner: Arc<dyn QuotaStore>, max_block: u64) -> Self {
        Self {
            inner,
            max_block: max_block.max(1),
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, key_id: i64) -> Arc<tokio::sync::Mutex<Slot>> {
        self.slots
            .lock()
            .expect("slots lock")
            .entry(key_id)
            .or_default()
            .clone()
    }

    /// Gives back every unit reserved and not spent, and forgets idle keys. Units whose return
    /// fails are kept and tried at the next flush.
    pub async fn flush(&self) -> Result<u64, StoreError> {
        let slots: Vec<(i64, Arc<tokio::sync::Mutex<Slot>>)> = self
            .slots
            .lock()
            .expect("slots lock")
            .iter()
            .map(|(k, s)| (*k, s.clone()))
            .collect();
        let mut returned = 0;
        let mut first_error = None;
        for (key_id, slot) in slots {
            let mut s = slot.lock().await;
            if s.available > 0
                && let Some(at) = s.reserved_at
            {
                match self
                    .inner
                    .give_back(Spend::new(key_id, s.available, at))
                    .await
                {
                    Ok(()) => {
                        returned += s.available;
                        s.available = 0;
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                        continue;
                    }
                }
            }
            // Idle: nothing held. A busy key's next check makes a new slot.
            drop(s);
            let mut slots = self.slots.lock().expect("slots lock");
            if let Some(current) = slots.get(&key_id)
                && Arc::ptr_eq(current, &slot)
                && Arc::strong_count(&slot) == 2
            {
                slots.remove(&key_id);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(returned),
        }
    }
}

#[async_trait]
impl QuotaStore for BatchedQuota {
    async fn consume(&self, spend: Spend, quota: Quota) -> Result<QuotaOutcome, StoreError> {
        let Spend {
            key_id,
            units: cost,
            at: now,
            identity_id: _,
        } = spend;
        let slot = self.slot(key_id);
        let mut s = slot.lock().await;
        // Units reserved on another day or in another month do not count now: give them back.
        if let Some(at) = s.reserved_at
            && !same_period(at, now)
        {
            if s.available > 0 {
                self.inner
                    .give_back(Spend::new(key_id, s.available, at))
                    .await?;
            }
            *s = Slot::default();
        }
        if s.available < cost {
            // Reserve a block, doubling for busy keys, shrunk to the room left.
            let mut want = (s.block.max(1) * 2).min(self.max_block).max(cost);
            let mut granted = false;
            for _ in 0..4 {
                match self
                    .inner
                    .consume(Spend::new(key_id, want, now), quota)
                    .await?
                {
                    QuotaOutcome::Admitted { daily, monthly } => {
                        s.available += want;
                        s.reserved_at = Some(now);
                        s.daily_after = daily;
                        s.monthly_after = monthly;
                        s.block = want;
                        granted = true;
                        break;
                    }
                    refused @ (QuotaOutcome::DailyExceeded { used }
                    | QuotaOutcome::MonthlyExceeded { used }) => {
                        let limit = match refused {
                            QuotaOutcome::DailyExceeded { .. } => quota.daily,
                            _ => quota.monthly,
                        }
                        .unwrap_or(0);
                        let room = limit.saturating_sub(used);
                        if room + s.available < cost || room == 0 {
                            return Ok(refused);
                        }
                        want = room.min(want);
                    }
                }
            }
            if !granted || s.available < cost {
                // Room kept moving under us: answer as the database would.
                return self.inner.consume(spend, quota).await;
            }
        }
        s.available -= cost;
        Ok(QuotaOutcome::Admitted {
            daily: s.daily_after.saturating_sub(s.available),
            monthly: s.monthly_after.saturating_sub(s.available),
        })
    }

    async fn give_back(&self, spent: Spend) -> Result<(), StoreError> {
        self.inner.give_back(spent).await
    }

    async fn usage(&self, key_id: i64, now: DateTime<Utc>) -> Result<Usage, StoreError> {
        self.inner.usage(key_id, now).await
    }
}

#[cfg(test)]
mod tests {
    use super::same_period;
    use chrono::{DateTime, Utc};

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn a_period_is_one_utc_day() {
        assert!(same_period(
            at("2026-03-04T00:00:00Z"),
            at("2026-03-04T23:59:59Z")
        ));
        assert!(!same_period(
            at("2026-03-04T23:59:59Z"),
            at("2026-03-05T00:00:00Z")
        ));
        // The same day of the month in another month or year is another period.
        assert!(!same_period(
            at("2026-03-04T12:00:00Z"),
            at("2026-04-04T12:00:00Z")
        ));
        assert!(!same_period(
            at("2026-03-04T12:00:00Z"),
            at("2027-03-04T12:00:00Z")
        ));
        // UTC, whatever offset the time was written with.
        assert!(same_period(
            at("2026-03-04T23:30:00-02:00"),
            at("2026-03-05T01:00:00Z")
        ));
    }
}
