//! Windows kept in this process: the embedded default, exact for one replica.
//!
//! Counters live in a fixed number of mutex-guarded shards picked by the counter key's hash; a
//! hit locks one shard for a few instructions and never across an `.await`. A shard sweeps out
//! windows that have ended whenever it has doubled in size since its last sweep, so memory follows
//! the number of live counters, not the number ever seen.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{LimiterError, WindowLimiter, WindowState, reset_after_secs, window_start_ms};

const SHARDS: usize = 64;
const MIN_SWEEP: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Slot {
    window_start_ms: i64,
    window_end_ms: i64,
    count: u64,
}

#[derive(Debug, Default)]
struct Shard {
    slots: HashMap<(Box<str>, u64), Slot>,
    sweep_at: usize,
}

/// In-process fixed windows.
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

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// Live counters across all shards; for tests and metrics.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expect("limiter shard").slots.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl WindowLimiter for MemoryLimiter {
    async fn hit(
        &self,
        key: &str,
        limit: u64,
        window_secs: u64,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<WindowState, LimiterError> {
        let now_ms = now.timestamp_millis();
        let start = window_start_ms(now_ms, window_secs);
        let reset_after = reset_after_secs(now_ms, window_secs);
        let mut shard = self.shard(key).lock().expect("limiter shard");
        if shard.slots.len() >= shard.sweep_at.max(MIN_SWEEP) {
            shard.slots.retain(|_, slot| slot.window_end_ms > now_ms);
            shard.sweep_at = shard.slots.len() * 2;
        }
        let slot = shard
            .slots
            .entry((key.into(), window_secs))
            .or_insert(Slot {
                window_start_ms: start,
                window_end_ms: start + (window_secs * 1000) as i64,
                count: 0,
            });
        if slot.window_start_ms != start {
            *slot = Slot {
                window_start_ms: start,
                window_end_ms: start + (window_secs * 1000) as i64,
                count: 0,
            };
        }
        let allowed = slot.count.saturating_add(cost) <= limit;
        if allowed {
            slot.count += cost;
        }
        Ok(WindowState {
            allowed,
            limit,
            remaining: if allowed { limit - slot.count } else { 0 },
            reset_after,
        })
    }

    async fn refund(
        &self,
        key: &str,
        window_secs: u64,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<(), LimiterError> {
        let start = window_start_ms(now.timestamp_millis(), window_secs);
        let mut shard = self.shard(key).lock().expect("limiter shard");
        if let Some(slot) = shard.slots.get_mut(&(key.into(), window_secs))
            && slot.window_start_ms == start
        {
            slot.count = slot.count.saturating_sub(cost);
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

    #[tokio::test]
    async fn admits_up_to_the_limit_then_refuses_until_the_window_turns() {
        let l = MemoryLimiter::new();
        let now = t0() + Duration::seconds(20);
        for i in 0..3 {
            let s = l.hit("k", 3, 60, 1, now).await.unwrap();
            assert!(s.allowed);
            assert_eq!(s.remaining, 2 - i);
            assert_eq!(s.reset_after, 40);
        }
        let refused = l.hit("k", 3, 60, 1, now).await.unwrap();
        assert_eq!((refused.allowed, refused.remaining), (false, 0));
        let next = l
            .hit("k", 3, 60, 1, t0() + Duration::seconds(60))
            .await
            .unwrap();
        assert_eq!(
            (next.allowed, next.remaining, next.reset_after),
            (true, 2, 60)
        );
    }

    #[tokio::test]
    async fn a_cost_that_does_not_fit_counts_nothing() {
        let l = MemoryLimiter::new();
        assert!(l.hit("k", 5, 60, 4, t0()).await.unwrap().allowed);
        assert!(!l.hit("k", 5, 60, 2, t0()).await.unwrap().allowed);
        assert!(l.hit("k", 5, 60, 1, t0()).await.unwrap().allowed);
    }

    #[tokio::test]
    async fn refund_gives_back_only_in_the_same_window() {
        let l = MemoryLimiter::new();
        assert!(l.hit("k", 1, 60, 1, t0()).await.unwrap().allowed);
        l.refund("k", 60, 1, t0()).await.unwrap();
        assert!(l.hit("k", 1, 60, 1, t0()).await.unwrap().allowed);
        l.refund("k", 60, 1, t0() + Duration::seconds(61))
            .await
            .unwrap();
        assert!(!l.hit("k", 1, 60, 1, t0()).await.unwrap().allowed);
    }

    #[tokio::test]
    async fn ended_windows_are_swept() {
        let l = MemoryLimiter::new();
        for i in 0..(SHARDS * MIN_SWEEP * 2) {
            l.hit(&format!("k{i}"), 1, 60, 1, t0()).await.unwrap();
        }
        let later = t0() + Duration::seconds(120);
        for i in 0..(SHARDS * MIN_SWEEP * 2) {
            l.hit(&format!("j{i}"), 1, 60, 1, later).await.unwrap();
        }
        assert!(
            l.len() < SHARDS * MIN_SWEEP * 4,
            "old windows kept: {}",
            l.len()
        );
    }

    #[tokio::test]
    async fn many_tasks_on_one_key_admit_exactly_the_limit() {
        let l = std::sync::Arc::new(MemoryLimiter::new());
        let tasks: Vec<_> = (0..500)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move { l.hit("hot", 100, 60, 1, t0()).await.unwrap().allowed })
            })
            .collect();
        let mut allowed = 0;
        for t in tasks {
            allowed += t.await.unwrap() as usize;
        }
        assert_eq!(allowed, 100);
    }
}
