//! Counters kept in this process: the embedded default, exact for one replica.
//!
//! Counters live in mutex-guarded shards picked by the counter key's hash; a hit locks one shard
//! for a few instructions and never across an `.await`. The arithmetic is the pure functions of
//! [`super`].
//!
//! **Bounded, whatever clients send.** At most `max_counters` counters are held
//! (`limits.max_counters`), split evenly over the shards. Each shard keeps its counters in
//! least-recently-used order: a hit moves its counter to the back. A new counter in a full shard
//! first has the shard drop the counters that can no longer matter (fixed window ended, sliding
//! window's next window ended, bucket full again), at most once per half a shard of new
//! counters; if the shard is still full, the least recently used counter goes. A counter dropped
//! while it still mattered (an eviction, counted in `tollgate_limiter_counters_evicted_total`)
//! starts again from zero if its key comes back, so the cap should exceed the number of
//! counters live at once. Below the cap, a shard also drops ended counters whenever it has
//! doubled since it last did, so memory follows the number of live counters, not the number
//! ever seen. Each hit costs O(1), amortised.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hashlink::LinkedHashMap;
use hashlink::linked_hash_map::RawEntryMut;

use super::{
    Algorithm, Bucket, Fixed, LimiterError, Rate, Sliding, WindowLimiter, WindowState, bucket_hit,
    bucket_refund, fixed_hit, fixed_refund, sliding_hit, sliding_refund,
};
use crate::telemetry::Metrics;

/// Counters held at most when nothing else is configured (`limits.max_counters`).
pub const DEFAULT_MAX_COUNTERS: usize = 100_000;
/// Most shards there are; fewer for a small cap, so that each holds at least `MIN_SHARD`.
const SHARDS: usize = 64;
const MIN_SHARD: usize = 1024;
/// Below its cap, a shard drops ended counters once it has this many, then whenever it doubles.
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

/// Counter key, window and algorithm. Hashes as `(&str, u64, Algorithm)` does, which is how a
/// hit looks it up without allocating.
type SlotKey = (Box<str>, u64, Algorithm);

#[derive(Debug)]
struct Shard {
    /// Least recently used first.
    slots: LinkedHashMap<SlotKey, Slot, RandomState>,
    capacity: usize,
    /// Below the cap, drop ended counters when the shard has grown to this many.
    sweep_at: usize,
    /// New counters since ended ones were last dropped.
    added: usize,
}

impl Shard {
    /// Drops the counters that ended by `now_ms`.
    fn sweep(&mut self, now_ms: i64, metrics: &Metrics) {
        let before = self.slots.len();
        self.slots.retain(|_, slot| slot.expires_ms > now_ms);
        metrics
            .limiter_counters
            .sub((before - self.slots.len()) as u64);
        self.sweep_at = self.slots.len() * 2;
        self.added = 0;
    }

    /// Makes room for one more counter: ended counters go first, then, in a full shard, the
    /// least recently used one.
    fn make_room(&mut self, now_ms: i64, metrics: &Metrics) {
        let len = self.slots.len();
        if len >= self.capacity {
            if self.added >= self.capacity / 2 {
                self.sweep(now_ms, metrics);
            }
            if self.slots.len() >= self.capacity
                && let Some((_, slot)) = self.slots.pop_front()
            {
                metrics.limiter_counters.sub(1);
                if slot.expires_ms > now_ms {
                    metrics.limiter_counters_evicted.inc();
                }
            }
        } else if len >= self.sweep_at.max(MIN_SWEEP) {
            self.sweep(now_ms, metrics);
        }
        self.added += 1;
    }
}

/// In-process counters, at most `max_counters` of them.
#[derive(Debug)]
pub struct MemoryLimiter {
    shards: Box<[Mutex<Shard>]>,
    /// Picks the shard, and is every shard's hasher too, so one hash serves both.
    hasher: RandomState,
    metrics: Arc<Metrics>,
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryLimiter {
    /// [`DEFAULT_MAX_COUNTERS`] counters at most, counted in metrics of its own.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_MAX_COUNTERS, Arc::default())
    }

    /// At most `max_counters` counters (at least 1); evictions and the counters held are
    /// counted in `metrics`.
    pub fn with_capacity(max_counters: usize, metrics: Arc<Metrics>) -> Self {
        let max_counters = max_counters.max(1);
        let n = (max_counters / MIN_SHARD).clamp(1, SHARDS);
        let hasher = RandomState::new();
        let shards = (0..n)
            .map(|i| {
                Mutex::new(Shard {
                    slots: LinkedHashMap::with_hasher(hasher.clone()),
                    // The remainder goes one each to the first shards: the caps add up to
                    // `max_counters` exactly.
                    capacity: max_counters / n + usize::from(i < max_counters % n),
                    sweep_at: 0,
                    added: 0,
                })
            })
            .collect();
        Self {
            shards,
            hasher,
            metrics,
        }
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        // High bits pick the shard: the map inside indexes by the low ones and tags by the top.
        let shard = &self.shards[(hash >> 32) as usize % self.shards.len()];
        // A panic while holding a shard cannot leave a counter half-written (every update is a
        // single assignment), so a poisoned lock is still good to use.
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counters held across all shards; for tests.
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

fn fresh(alg: Algorithm) -> Slot {
    Slot {
        counter: match alg {
            Algorithm::FixedWindow => Counter::Fixed(Fixed::default()),
            Algorithm::SlidingWindow => Counter::Sliding(Sliding::default()),
            Algorithm::TokenBucket => Counter::Bucket(Bucket::default()),
        },
        expires_ms: i64::MIN,
    }
}

/// Applies a hit to `slot`.
fn hit_slot(slot: &mut Slot, rate: Rate, cost: u64, now_ms: i64) -> WindowState {
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
    state
}

impl MemoryLimiter {
    fn hash_of(&self, key: &str, rate: Rate) -> u64 {
        self.hasher
            .hash_one((key, rate.window_secs, rate.algorithm))
    }

    fn shard_index(&self, hash: u64) -> usize {
        (hash >> 32) as usize % self.shards.len()
    }

    /// A hit on `shard`, which holds `key`'s counter (`hash` is its hash).
    fn hit_in(
        &self,
        shard: &mut Shard,
        hash: u64,
        key: &str,
        rate: Rate,
        cost: u64,
        now_ms: i64,
    ) -> WindowState {
        let (window, alg) = (rate.window_secs, rate.algorithm);
        let is_key = |k: &SlotKey| &*k.0 == key && k.1 == window && k.2 == alg;
        if let RawEntryMut::Occupied(mut entry) =
            shard.slots.raw_entry_mut().from_hash(hash, is_key)
        {
            entry.to_back();
            return hit_slot(entry.get_mut(), rate, cost, now_ms);
        }
        shard.make_room(now_ms, &self.metrics);
        let mut slot = fresh(alg);
        let state = hit_slot(&mut slot, rate, cost, now_ms);
        if let RawEntryMut::Vacant(entry) = shard.slots.raw_entry_mut().from_hash(hash, is_key) {
            entry.insert_hashed_nocheck(hash, (key.into(), window, alg), slot);
            self.metrics.limiter_counters.add(1);
        }
        state
    }

    /// A refund on `shard`, which holds `key`'s counter.
    fn refund_in(shard: &mut Shard, hash: u64, key: &str, rate: Rate, cost: u64, now_ms: i64) {
        let (window, alg) = (rate.window_secs, rate.algorithm);
        let is_key = |k: &SlotKey| &*k.0 == key && k.1 == window && k.2 == alg;
        if let RawEntryMut::Occupied(mut entry) =
            shard.slots.raw_entry_mut().from_hash(hash, is_key)
        {
            let slot = entry.get_mut();
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
        let hash = self.hash_of(key, rate);
        let mut shard = self.shard(hash);
        Ok(self.hit_in(&mut shard, hash, key, rate, cost, now.timestamp_millis()))
    }

    async fn refund(
        &self,
        key: &str,
        rate: Rate,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<(), LimiterError> {
        let hash = self.hash_of(key, rate);
        let mut shard = self.shard(hash);
        Self::refund_in(&mut shard, hash, key, rate, cost, now.timestamp_millis());
        Ok(())
    }

    /// One step: both counters' shards are locked (the lower-numbered first, so two pairs
    /// never wait for each other in a circle) while both are hit, and the first taken back if
    /// the second did not fit. No other check sees the first's hit in between.
    async fn hit_both(
        &self,
        first: (&str, Rate),
        second: (&str, Rate),
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<(WindowState, Option<WindowState>), LimiterError> {
        let now_ms = now.timestamp_millis();
        let (h1, h2) = (
            self.hash_of(first.0, first.1),
            self.hash_of(second.0, second.1),
        );
        let (i1, i2) = (self.shard_index(h1), self.shard_index(h2));
        let lock = |i: usize| self.shards[i].lock().unwrap_or_else(|p| p.into_inner());
        let run = |s1: &mut Shard, s2: &mut Shard| {
            let a = self.hit_in(s1, h1, first.0, first.1, cost, now_ms);
            if !a.allowed {
                return (a, None);
            }
            let b = self.hit_in(s2, h2, second.0, second.1, cost, now_ms);
            if !b.allowed {
                Self::refund_in(s1, h1, first.0, first.1, cost, now_ms);
            }
            (a, Some(b))
        };
        Ok(if i1 == i2 {
            let mut s = lock(i1);
            let a = self.hit_in(&mut s, h1, first.0, first.1, cost, now_ms);
            if !a.allowed {
                (a, None)
            } else {
                let b = self.hit_in(&mut s, h2, second.0, second.1, cost, now_ms);
                if !b.allowed {
                    Self::refund_in(&mut s, h1, first.0, first.1, cost, now_ms);
                }
                (a, Some(b))
            }
        } else if i1 < i2 {
            let mut s1 = lock(i1);
            let mut s2 = lock(i2);
            run(&mut s1, &mut s2)
        } else {
            let mut s2 = lock(i2);
            let mut s1 = lock(i1);
            run(&mut s1, &mut s2)
        })
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

    const ALGORITHMS: [Algorithm; 3] = [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
        Algorithm::TokenBucket,
    ];

    #[tokio::test]
    async fn ended_counters_are_swept() {
        for alg in ALGORITHMS {
            let l = MemoryLimiter::new();
            let r = rate(1, alg);
            let n = DEFAULT_MAX_COUNTERS / 2;
            for i in 0..n {
                l.hit(&format!("k{i}"), r, 1, t0()).await.unwrap();
            }
            let later = t0() + Duration::seconds(180);
            for i in 0..n {
                l.hit(&format!("j{i}"), r, 1, later).await.unwrap();
            }
            assert!(
                l.len() < n + n / 2,
                "{alg:?}: old counters kept: {}",
                l.len()
            );
            assert_eq!(l.metrics.limiter_counters.get(), l.len() as u64);
            assert_eq!(
                l.metrics.limiter_counters_evicted.get(),
                0,
                "{alg:?}: ended counters are not evictions"
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

    #[tokio::test]
    async fn the_least_recently_used_counter_is_evicted_and_counted() {
        for alg in ALGORITHMS {
            let metrics = Arc::new(Metrics::default());
            let l = MemoryLimiter::with_capacity(3, metrics.clone());
            let r = rate(3, alg);
            let hit = |key: &'static str| {
                let l = &l;
                async move { l.hit(key, r, 1, t0()).await.unwrap() }
            };
            hit("a").await;
            hit("b").await;
            hit("c").await;
            // "a" is used again, so "b" is now the least recently used.
            hit("a").await;
            assert_eq!(l.len(), 3);
            assert_eq!(metrics.limiter_counters_evicted.get(), 0);
            hit("d").await;
            assert_eq!(l.len(), 3, "{alg:?}");
            assert_eq!(metrics.limiter_counters_evicted.get(), 1, "{alg:?}");
            assert_eq!(metrics.limiter_counters.get(), 3, "{alg:?}");
            // "a" kept its count: one hit left of three, then refused.
            assert!(hit("a").await.allowed, "{alg:?}");
            assert!(!hit("a").await.allowed, "{alg:?}");
            // "b" was evicted: it starts again from zero (and "c" goes to make room).
            assert_eq!(hit("b").await.remaining, 2, "{alg:?}");
            assert_eq!(metrics.limiter_counters_evicted.get(), 2, "{alg:?}");
            // "c" is gone, "d" and "a" are still there.
            assert_eq!(hit("d").await.remaining, 1, "{alg:?}");
            assert!(!hit("a").await.allowed, "{alg:?}");
            assert_eq!(metrics.limiter_counters_evicted.get(), 2, "{alg:?}");
        }
    }

    #[tokio::test]
    async fn a_full_shard_drops_ended_counters_before_live_ones() {
        let metrics = Arc::new(Metrics::default());
        let l = MemoryLimiter::with_capacity(4, metrics.clone());
        let per_second = Rate::new(5, 1, Algorithm::FixedWindow);
        let per_hour = Rate::new(5, 3600, Algorithm::FixedWindow);
        l.hit("hour", per_hour, 1, t0()).await.unwrap();
        for key in ["s1", "s2", "s3"] {
            l.hit(key, per_second, 1, t0()).await.unwrap();
        }
        // Two seconds on the per-second counters have ended; "hour", the least recently used,
        // still matters and is kept.
        let later = t0() + Duration::seconds(2);
        for key in ["n1", "n2", "n3"] {
            l.hit(key, per_second, 1, later).await.unwrap();
        }
        assert_eq!(metrics.limiter_counters_evicted.get(), 0);
        assert_eq!(
            l.hit("hour", per_hour, 1, later).await.unwrap().remaining,
            3
        );
        assert_eq!(l.len(), 4);
    }

    #[tokio::test]
    async fn the_cap_holds_across_shards() {
        let metrics = Arc::new(Metrics::default());
        let cap = 10_000;
        let l = MemoryLimiter::with_capacity(cap, metrics.clone());
        let r = rate(5, Algorithm::FixedWindow);
        for i in 0..3 * cap {
            l.hit(&format!("k{i}"), r, 1, t0()).await.unwrap();
        }
        assert!(l.len() <= cap, "{} counters held", l.len());
        assert!(l.len() > cap * 9 / 10, "{} counters held", l.len());
        assert_eq!(metrics.limiter_counters.get(), l.len() as u64);
        assert_eq!(
            metrics.limiter_counters_evicted.get(),
            (3 * cap - l.len()) as u64
        );
    }
}
