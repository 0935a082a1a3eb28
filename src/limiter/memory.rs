//! Counters kept in this process: the embedded default, exact for one replica.
//!
//! Counters live in a fixed number of mutex-guarded shards picked by the counter key's hash; a
//! hit locks one shard for a few instructions and never across an `.await`. The arithmetic is
//! the pure functions of [`super`]. A shard sweeps out counters that can no longer matter (fixed
//! window ended, sliding window's next window ended, bucket full again) whenever it has doubled
//! in size since its last sweep, so memory follows the number of live counters, not the number
//! ever seen.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    Algorithm, Bucket, Fixed, LimiterError, Rate, Sliding, WindowLimiter, WindowState, bucket_hit,
    bucket_refund, fixed_hit, fixed_refund, sliding_hit, sliding_refund,
};

const SHARDS: usize = 64;
const MIN_SWEEP: usize = 1024;

#[derive(Debug, Clone, Copy)]
enum Counter {
    Fixed(Fixed),
    Sliding(Sliding),
    Bucket(Bucket),
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    counter: Counter,
    /// After this instant (ms) the counter no longer affects any answer.
    expires_ms: i64,
}

type SlotKey = (Box<str>, u64, Algorithm);

#[derive(Debug, Default)]
struct Shard {
    slots: HashMap<SlotKey, Slot>,
    sweep_at: usize,
}

/// In-process counters.
#[derive(Debug)]
pub struct MemoryLimiter {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl MemoryLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        // A panic while holding a shard cannot leave a counter half-written (every update is a
        // single assignment), so a poisoned lock is still good to use.
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Live counters across all shards; for tests and metrics.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).slots.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Until when a counter can still matter.
fn expiry(counter: &Counter, rate: Rate) -> i64 {
    let w = rate.window_ms();
    match counter {
        Counter::Fixed(f) => f.start_ms.saturating_add(w),
        Counter::Sliding(s) => s.start_ms.saturating_add(2 * w),
        Counter::Bucket(b) => b
            .base_ms
            .saturating_add((b.debt / rate.limit.max(1)) as i64 + 1),
    }
}

fn fresh(alg: Algorithm) -> Counter {
    match alg {
        Algorithm::FixedWindow => Counter::Fixed(Fixed::default()),
        Algorithm::SlidingWindow => Counter::Sliding(Sliding::default()),
        Algorithm::TokenBucket => Counter::Bucket(Bucket::default()),
    }
}

#[async_trait]
impl WindowLimiter for MemoryLimiter {
    async fn hit(
        &self,
        key: &str,
        rate: Rate,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<WindowState, LimiterError> {
        let now_ms = now.timestamp_millis();
        let mut shard = self.shard(key);
        if shard.slots.len() >= shard.sweep_at.max(MIN_SWEEP) {
            shard.slots.retain(|_, slot| slot.expires_ms > now_ms);
            shard.sweep_at = shard.slots.len() * 2;
        }
        let slot = shard
            .slots
            .entry((key.into(), rate.window_secs, rate.algorithm))
            .or_insert(Slot {
                counter: fresh(rate.algorithm),
                expires_ms: i64::MIN,
            });
        let (counter, state) = match slot.counter {
            Counter::Fixed(f) => {
                let (f, s) = fixed_hit(f, rate, cost, now_ms);
                (Counter::Fixed(f), s)
            }
            Counter::Sliding(sl) => {
                let (sl, s) = sliding_hit(sl, rate, cost, now_ms);
                (Counter::Sliding(sl), s)
            }
            Counter::Bucket(b) => {
                let (b, s) = bucket_hit(b, rate, cost, now_ms);
                (Counter::Bucket(b), s)
            }
        };
        *slot = Slot {
            counter,
            expires_ms: expiry(&counter, rate),
        };
        Ok(state)
    }

    async fn refund(
        &self,
        key: &str,
        rate: Rate,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<(), LimiterError> {
        let now_ms = now.timestamp_millis();
        let mut shard = self.shard(key);
        if let Some(slot) = shard
            .slots
            .get_mut(&(key.into(), rate.window_secs, rate.algorithm))
        {
            let counter = match slot.counter {
                Counter::Fixed(f) => Counter::Fixed(fixed_refund(f, rate, cost, now_ms)),
                Counter::Sliding(s) => Counter::Sliding(sliding_refund(s, rate, cost, now_ms)),
                Counter::Bucket(b) => Counter::Bucket(bucket_refund(b, rate, cost, now_ms)),
            };
            *slot = Slot {
                counter,
                expires_ms: expiry(&counter, rate),
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn t0() -> DateTime<Utc> {
        "2026-03-01T10:00:00Z".parse().unwrap()
    }

    fn rate(limit: u64, alg: Algorithm) -> Rate {
        Rate::new(limit, 60, alg)
    }

    #[tokio::test]
    async fn ended_counters_are_swept() {
        for alg in [
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
            Algorithm::TokenBucket,
        ] {
            let l = MemoryLimiter::new();
            let r = rate(1, alg);
            for i in 0..(SHARDS * MIN_SWEEP * 2) {
                l.hit(&format!("k{i}"), r, 1, t0()).await.unwrap();
            }
            let later = t0() + Duration::seconds(180);
            for i in 0..(SHARDS * MIN_SWEEP * 2) {
                l.hit(&format!("j{i}"), r, 1, later).await.unwrap();
            }
            assert!(
                l.len() < SHARDS * MIN_SWEEP * 4,
                "{alg:?}: old counters kept: {}",
                l.len()
            );
        }
    }

    #[tokio::test]
    async fn algorithms_and_windows_count_apart() {
        let l = MemoryLimiter::new();
        assert!(
            l.hit("k", rate(1, Algorithm::FixedWindow), 1, t0())
                .await
                .unwrap()
                .allowed
        );
        assert!(
            l.hit("k", rate(1, Algorithm::TokenBucket), 1, t0())
                .await
                .unwrap()
                .allowed
        );
        assert!(
            l.hit("k", Rate::new(1, 1, Algorithm::FixedWindow), 1, t0())
                .await
                .unwrap()
                .allowed
        );
    }
}
