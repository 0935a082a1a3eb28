//! Rate-limit windows: "at most N hits per window" per counter key.
//!
//! One async trait, [`WindowLimiter`], with one backend per file: `memory.rs` keeps the counters
//! in this process (the embedded default, exact for one replica); `redis.rs` keeps them in Redis
//! or a Redis Cluster (exact across replicas). Every call carries a [`Rate`]: a limit, a window
//! and one of three [`Algorithm`]s. The arithmetic of each algorithm lives here, as pure
//! functions on integer milliseconds, so both backends give the same answers: the memory backend
//! runs these functions, and the Redis Lua scripts do the same state change step for step and
//! hand their result to the same report functions.
//!
//! Windows are epoch-aligned: a 60 s window runs from hh:mm:00 to hh:mm+1:00 UTC, the same on
//! every replica and in Envoy's rate limit service.
//!
//! The limiter owns its settings ([`RedisConfig`], the file's `redis:` section) and picks its
//! backend from them in [`open`]; the in-process counters' cap is `limits.max_counters`.
//!
//! Counter keys come from the callers (`key:<id>` for an API key, and what
//! [`ratelimit::counter_key`](crate::ratelimit::counter_key) builds for a descriptor), already
//! short: no long value a client sent reaches a backend.

pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use self::memory::MemoryLimiter;
use self::redis::{RedisLimiter, parse_url};
use crate::setting::{Dur, FailureMode, InvalidSetting, SecretUrl};
use crate::telemetry::Metrics;

/// What went wrong talking to the limiter's backend.
#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    /// The backend could not be reached, or did not answer in time, or said it is busy or
    /// failing over: asking again later may work.
    #[error("rate limiter backend unavailable: {0}")]
    Unavailable(String),
    /// The backend answered, with an error or with a reply tollgate cannot read (a script that
    /// failed, a refused command, a reply of the wrong shape): asking again gets the same.
    #[error("rate limiter backend error: {0}")]
    Backend(String),
    /// The settings name no usable backend (a bad URL).
    #[error("rate limiter misconfigured: {0}")]
    Config(String),
}

impl LimiterError {
    /// Whether retrying later may succeed (the backend is away or busy), as opposed to a bug,
    /// a misconfigured server or bad settings that retrying cannot fix.
    pub fn is_transient(&self) -> bool {
        matches!(self, LimiterError::Unavailable(_))
    }
}

/// Where windows are counted (the `redis:` section of the configuration).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Unset: per-minute windows are counted in this process. `redis://HOST:PORT[/DB]`,
    /// `rediss://…` (TLS), or `redis+cluster://HOST:PORT,HOST:PORT,…` for a Redis Cluster.
    pub url: Option<SecretUrl>,
    /// Per-minute limits when Redis cannot be reached (or answers too slowly).
    pub failure_mode: FailureMode,
    /// The longest a check waits for Redis, connecting included.
    pub timeout: Dur,
    /// Put before every Redis key tollgate writes.
    pub key_prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            failure_mode: FailureMode::Open,
            timeout: Dur(Duration::from_millis(100)),
            key_prefix: "tollgate:".into(),
        }
    }
}

impl RedisConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if let Some(url) = &self.url
            && let Err(e) = parse_url(url.expose())
        {
            return Err(InvalidSetting::new("redis.url", format!("{url}: {e}")));
        }
        if self.timeout.0.is_zero() {
            return Err(InvalidSetting::new(
                "redis.timeout",
                "must be longer than 0",
            ));
        }
        if self.key_prefix.contains(['{', '}']) {
            return Err(InvalidSetting::new(
                "redis.key_prefix",
                format!(
                    "{:?} contains {{ or }}, which would break the hash tags that keep a counter's keys in one cluster slot",
                    self.key_prefix
                ),
            ));
        }
        Ok(())
    }
}

/// The window store, chosen once at start: Redis when `redis.url` is set (with a connection for
/// each of `lanes` gRPC serving threads), else this process, holding at most `max_counters`
/// counters (evictions counted in `metrics`).
/// Redis is not contacted here: if it is down at start, tollgate serves anyway, follows
/// `redis.failure_mode`, and the connection comes up when Redis does. Must run inside a Tokio
/// runtime.
pub fn open(
    config: &RedisConfig,
    max_counters: usize,
    lanes: usize,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Arc<dyn WindowLimiter>> {
    Ok(match &config.url {
        Some(url) => {
            let redis =
                RedisLimiter::for_lanes(url.expose(), &config.key_prefix, config.timeout.0, lanes)
                    .with_context(|| format!("cannot use redis.url {url}"))?;
            tracing::info!(redis = %url, "rate-limit windows in Redis");
            Arc::new(redis)
        }
        None => Arc::new(MemoryLimiter::with_capacity(max_counters, metrics)),
    })
}

/// How hits are counted against a [`Rate`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Epoch-aligned windows; the count starts from zero when the window turns. Cheapest, but
    /// a client can spend a window's limit at its end and again at the start of the next.
    #[default]
    FixedWindow,
    /// The two-window weighted counter: the previous window's count, weighted by the part of
    /// it still inside a window-long span ending now, plus the current window's count. No
    /// burst of twice the limit across a window edge.
    SlidingWindow,
    /// GCRA (a token bucket): `limit` tokens, one coming back every `window / limit`.
    /// Bursts up to the limit, then a steady rate.
    TokenBucket,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::TokenBucket => "token_bucket",
        }
    }
}

/// At most `limit` hits per `window_secs`, counted by `algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub limit: u64,
    pub window_secs: u64,
    pub algorithm: Algorithm,
}

impl Rate {
    pub fn new(limit: u64, window_secs: u64, algorithm: Algorithm) -> Self {
        Self {
            limit,
            window_secs,
            algorithm,
        }
    }

    /// The window in milliseconds (at least one second).
    pub fn window_ms(&self) -> i64 {
        (self.window_secs.max(1) as i64).saturating_mul(1000)
    }
}

/// The state of a counter after a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowState {
    /// Whether the hit fitted and was counted.
    pub allowed: bool,
    pub limit: u64,
    /// Unit hits that would still fit now, after this one (0 when refused).
    pub remaining: u64,
    /// Whole seconds, at least 1. Allowed: until the window ends (fixed and sliding window) or
    /// the bucket is full again (token bucket). Refused: until the window ends (fixed window)
    /// or until this cost would fit (sliding window, token bucket).
    pub reset_after: u64,
}

/// Counts hits against rates.
///
/// Implementations must give the answers of the functions in this module ([`fixed_hit`],
/// [`sliding_hit`], [`bucket_hit`] and their refunds) for the same sequence of calls.
#[async_trait]
pub trait WindowLimiter: Send + Sync + 'static {
    /// Adds `cost` hits to `key`'s counter for `rate` if they fit; a cost that does not fit
    /// counts nothing. Check and count are one atomic step, also across replicas sharing a
    /// backend. `now` is tollgate's clock, not the backend's.
    ///
    /// Errors mean the backend could not be asked (down, too slow) or could not answer (a script
    /// error, a reply of the wrong shape); [`LimiterError::is_transient`] tells which.
    async fn hit(
        &self,
        key: &str,
        rate: Rate,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<WindowState, LimiterError>;

    /// Gives back `cost` hits (for a request that a later step refused): fixed and sliding
    /// windows take them off the window `now` falls in, and do nothing once it has passed; the
    /// token bucket moves its theoretical arrival time back, never before `now`.
    async fn refund(
        &self,
        key: &str,
        rate: Rate,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<(), LimiterError>;

    /// Hits `first`'s counter and then `second`'s with the same cost, both or neither: a key's
    /// own per-minute window and its identity's. Returns `first`'s state and, when it fitted,
    /// `second`'s; when `second` did not fit, `first`'s hit is taken back, so nothing is
    /// counted unless both are.
    ///
    /// This default takes three steps (hit, hit, refund if refused): never more than either
    /// limit is admitted, but a hit taken back may, for that moment, make another request of
    /// the same counter see one fewer unit of room. The in-process limiter and a single Redis
    /// node do it in one step (both shards' locks; one script); a Redis Cluster, whose slots
    /// keep the two counters apart, takes the three.
    async fn hit_both(
        &self,
        first: (&str, Rate),
        second: (&str, Rate),
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<(WindowState, Option<WindowState>), LimiterError> {
        hit_both_in_steps(self, first, second, cost, now).await
    }

    /// A cheap round trip to the backend, for `/readyz`. In-process counters always answer.
    async fn ping(&self) -> Result<(), LimiterError> {
        Ok(())
    }
}

/// [`WindowLimiter::hit_both`] in three steps: hit, hit, and the first taken back if the
/// second did not fit.
pub(crate) async fn hit_both_in_steps<L: WindowLimiter + ?Sized>(
    limiter: &L,
    first: (&str, Rate),
    second: (&str, Rate),
    cost: u64,
    now: DateTime<Utc>,
) -> Result<(WindowState, Option<WindowState>), LimiterError> {
    let a = limiter.hit(first.0, first.1, cost, now).await?;
    if !a.allowed {
        return Ok((a, None));
    }
    let b = match limiter.hit(second.0, second.1, cost, now).await {
        Ok(b) => b,
        Err(e) => {
            if let Err(e) = limiter.refund(first.0, first.1, cost, now).await {
                tracing::warn!(error = %e, "rate limit refund failed");
            }
            return Err(e);
        }
    };
    if !b.allowed
        && let Err(e) = limiter.refund(first.0, first.1, cost, now).await
    {
        tracing::warn!(error = %e, "rate limit refund failed");
    }
    Ok((a, Some(b)))
}

/// Start (ms since the epoch) of the fixed window of `window_secs` that `now_ms` falls in.
pub fn window_start_ms(now_ms: i64, window_secs: u64) -> i64 {
    let len = (window_secs.max(1) * 1000) as i64;
    now_ms.div_euclid(len) * len
}

/// Whole seconds from `now_ms` until the window it falls in ends: 1..=window_secs.
pub fn reset_after_secs(now_ms: i64, window_secs: u64) -> u64 {
    let end = window_start_ms(now_ms, window_secs) + (window_secs.max(1) * 1000) as i64;
    ((end - now_ms) as u64).div_ceil(1000).max(1)
}

/// Milliseconds to whole seconds, rounding up, at least 1.
fn ceil_secs(ms: u128) -> u64 {
    u64::try_from(ms.div_ceil(1000)).unwrap_or(u64::MAX).max(1)
}

fn sat(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Fixed window

/// A fixed-window counter: `count` hits in the window starting at `start_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fixed {
    pub start_ms: i64,
    pub count: u64,
}

/// A hit on a fixed window. `state` is the counter as stored (any window); returns the counter
/// to store and the answer.
pub fn fixed_hit(state: Fixed, rate: Rate, cost: u64, now_ms: i64) -> (Fixed, WindowState) {
    let start = window_start_ms(now_ms, rate.window_secs);
    let count = if state.start_ms == start {
        state.count
    } else {
        0
    };
    let allowed = count.saturating_add(cost) <= rate.limit;
    let count = if allowed { count + cost } else { count };
    (
        Fixed {
            start_ms: start,
            count,
        },
        fixed_report(allowed, count, rate, now_ms),
    )
}

/// The answer of a fixed-window hit, given the window's count after it.
pub fn fixed_report(allowed: bool, count: u64, rate: Rate, now_ms: i64) -> WindowState {
    WindowState {
        allowed,
        limit: rate.limit,
        remaining: if allowed {
            rate.limit.saturating_sub(count)
        } else {
            0
        },
        reset_after: reset_after_secs(now_ms, rate.window_secs),
    }
}

/// A refund on a fixed window: only the window `now_ms` falls in.
pub fn fixed_refund(state: Fixed, rate: Rate, cost: u64, now_ms: i64) -> Fixed {
    if state.start_ms == window_start_ms(now_ms, rate.window_secs) {
        Fixed {
            count: state.count.saturating_sub(cost),
            ..state
        }
    } else {
        state
    }
}

// ---------------------------------------------------------------------------------------------
// Sliding window

/// A sliding-window counter: the count of the window starting at `start_ms` and of the one
/// before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sliding {
    pub start_ms: i64,
    pub prev: u64,
    pub cur: u64,
}

impl Sliding {
    /// The counter moved to the window `now_ms` falls in, and how far into it `now_ms` is.
    /// A `now_ms` before the stored window (a replica whose clock is behind) is taken as the
    /// stored window's start, so a lagging clock never wipes counts.
    pub fn rolled(self, window_ms: i64, now_ms: i64) -> (Sliding, i64) {
        let now = now_ms.max(self.start_ms);
        let start = now.div_euclid(window_ms) * window_ms;
        let rolled = if start == self.start_ms {
            self
        } else if start == self.start_ms.saturating_add(window_ms) {
            Sliding {
                start_ms: start,
                prev: self.cur,
                cur: 0,
            }
        } else {
            Sliding {
                start_ms: start,
                prev: 0,
                cur: 0,
            }
        };
        (rolled, now - start)
    }
}

/// A hit on a sliding window. Admits when
/// `prev × (window − elapsed) + (cur + cost) × window ≤ limit × window` (all in ms, integers).
pub fn sliding_hit(state: Sliding, rate: Rate, cost: u64, now_ms: i64) -> (Sliding, WindowState) {
    let w = rate.window_ms();
    let (mut s, elapsed) = state.rolled(w, now_ms);
    let wu = w as u128;
    let weighted = s.prev as u128 * (w - elapsed) as u128;
    let allowed = weighted + (s.cur as u128 + cost as u128) * wu <= rate.limit as u128 * wu;
    if allowed {
        s.cur += cost;
    }
    (
        s,
        sliding_report(allowed, s.prev, s.cur, elapsed, rate, cost),
    )
}

/// The answer of a sliding-window hit, given the rolled counter after it and how far into the
/// current window the hit was.
pub fn sliding_report(
    allowed: bool,
    prev: u64,
    cur: u64,
    elapsed_ms: i64,
    rate: Rate,
    cost: u64,
) -> WindowState {
    let w = rate.window_ms() as u128;
    let limit = rate.limit as u128;
    let (prev, cur, cost) = (prev as u128, cur as u128, cost as u128);
    let left = w - (elapsed_ms as u128).min(w); // ms until the current window ends
    let weighted = prev * left;
    if allowed {
        let room = (limit * w).saturating_sub(weighted + cur * w);
        return WindowState {
            allowed,
            limit: rate.limit,
            remaining: sat(room / w),
            reset_after: ceil_secs(left),
        };
    }
    // When would `cost` more fit? Within this window, as the previous window's weight fades;
    // else in the next one, where this window's count is the previous.
    let wait_ms = if cur + cost <= limit && prev > 0 {
        // prev × (w − e') ≤ (limit − cur − cost) × w  ⇔  e' ≥ w − ⌊(limit − cur − cost) × w / prev⌋
        let need = w.saturating_sub((limit - cur - cost) * w / prev);
        need.saturating_sub(w - left)
    } else if cost <= limit {
        let need = ((limit - cost) * w)
            .checked_div(cur)
            .map_or(0, |fits| w.saturating_sub(fits));
        left + need
    } else {
        // Never fits: report the end of the next window.
        left + w
    };
    WindowState {
        allowed,
        limit: rate.limit,
        remaining: 0,
        reset_after: ceil_secs(wait_ms),
    }
}

/// A refund on a sliding window: only the window `now_ms` falls in.
pub fn sliding_refund(state: Sliding, rate: Rate, cost: u64, now_ms: i64) -> Sliding {
    let w = rate.window_ms();
    if now_ms.max(state.start_ms).div_euclid(w) * w == state.start_ms {
        Sliding {
            cur: state.cur.saturating_sub(cost),
            ..state
        }
    } else {
        state
    }
}

// ---------------------------------------------------------------------------------------------
// Token bucket (GCRA)

/// A GCRA counter. The theoretical arrival time is `base_ms + debt / limit` ms: `debt` is kept
/// in units of 1/limit ms, so the emission interval `window / limit` is exactly `window_ms` of
/// them and nothing is rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bucket {
    pub base_ms: i64,
    pub debt: u64,
}

impl Bucket {
    /// How far the theoretical arrival time is ahead of `now_ms`, in 1/limit ms (0 when the
    /// bucket is full). A `now_ms` before `base_ms` is taken as `base_ms`.
    pub fn debt_at(self, rate: Rate, now_ms: i64) -> u64 {
        let elapsed = now_ms.saturating_sub(self.base_ms).max(0);
        if elapsed >= rate.window_ms() {
            return 0;
        }
        self.debt
            .saturating_sub((elapsed as u64).saturating_mul(rate.limit))
    }
}

/// A hit on a token bucket: admits if `max(TAT, now) + T × cost − now ≤ window`, then moves
/// the TAT on by `T × cost`.
pub fn bucket_hit(state: Bucket, rate: Rate, cost: u64, now_ms: i64) -> (Bucket, WindowState) {
    let now = now_ms.max(state.base_ms);
    let debt = state.debt_at(rate, now) as u128;
    let need = debt + cost as u128 * rate.window_ms() as u128;
    let allowed = need <= rate.limit as u128 * rate.window_ms() as u128;
    let stored = if allowed {
        Bucket {
            base_ms: now,
            debt: sat(need),
        }
    } else {
        state
    };
    let debt_after = if allowed { sat(need) } else { sat(debt) };
    (stored, bucket_report(allowed, debt_after, rate, cost))
}

/// The answer of a token-bucket hit, given the debt after it (allowed) or before it (refused).
pub fn bucket_report(allowed: bool, debt: u64, rate: Rate, cost: u64) -> WindowState {
    let w = rate.window_ms() as u128;
    let limit = rate.limit as u128;
    let debt = debt as u128;
    if allowed {
        WindowState {
            allowed,
            limit: rate.limit,
            remaining: sat((limit * w).saturating_sub(debt) / w),
            // Until the TAT is now: debt / limit ms.
            reset_after: ceil_secs(debt.div_ceil(limit.max(1))),
        }
    } else {
        let over = (debt + cost as u128 * w).saturating_sub(limit * w);
        WindowState {
            allowed,
            limit: rate.limit,
            remaining: 0,
            reset_after: ceil_secs(over.div_ceil(limit.max(1))),
        }
    }
}

/// A refund on a token bucket: the TAT moves back by `T × cost`, never before `now_ms`.
pub fn bucket_refund(state: Bucket, rate: Rate, cost: u64, now_ms: i64) -> Bucket {
    let now = now_ms.max(state.base_ms);
    let debt = state.debt_at(rate, now);
    Bucket {
        base_ms: now,
        debt: debt.saturating_sub(cost.saturating_mul(rate.window_ms() as u64)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_773_144_000_000; // 2026-03-10T12:00:00Z, a minute boundary

    fn rate(limit: u64, alg: Algorithm) -> Rate {
        Rate::new(limit, 60, alg)
    }

    #[test]
    fn windows_are_epoch_aligned() {
        assert_eq!(window_start_ms(0, 60), 0);
        assert_eq!(window_start_ms(59_999, 60), 0);
        assert_eq!(window_start_ms(60_000, 60), 60_000);
        assert_eq!(window_start_ms(1_700_000_123_456, 60), 1_700_000_100_000);
        assert_eq!(window_start_ms(T0, 60), T0);
    }

    #[test]
    fn reset_is_whole_seconds_between_1_and_window() {
        assert_eq!(reset_after_secs(60_000, 60), 60);
        assert_eq!(reset_after_secs(60_001, 60), 60);
        assert_eq!(reset_after_secs(60_999, 60), 60);
        assert_eq!(reset_after_secs(61_000, 60), 59);
        assert_eq!(reset_after_secs(119_999, 60), 1);
        assert_eq!(reset_after_secs(119_000, 60), 1);
        assert_eq!(reset_after_secs(5_500, 1), 1);
    }

    #[test]
    fn algorithm_names() {
        for (a, name) in [
            (Algorithm::FixedWindow, "\"fixed_window\""),
            (Algorithm::SlidingWindow, "\"sliding_window\""),
            (Algorithm::TokenBucket, "\"token_bucket\""),
        ] {
            assert_eq!(serde_json::to_string(&a).unwrap(), name);
            assert_eq!(format!("\"{}\"", a.as_str()), name);
        }
        assert_eq!(Algorithm::default(), Algorithm::FixedWindow);
    }

    #[test]
    fn fixed_counts_in_the_window_and_starts_over() {
        let r = rate(2, Algorithm::FixedWindow);
        let (s, a) = fixed_hit(Fixed::default(), r, 1, T0 + 20_000);
        assert_eq!((a.allowed, a.remaining, a.reset_after), (true, 1, 40));
        let (s, a) = fixed_hit(s, r, 1, T0 + 20_000);
        assert_eq!((a.allowed, a.remaining), (true, 0));
        let (s, a) = fixed_hit(s, r, 1, T0 + 59_500);
        assert_eq!((a.allowed, a.remaining, a.reset_after), (false, 0, 1));
        assert_eq!(s.count, 2, "refused hits count nothing");
        let (_, a) = fixed_hit(s, r, 1, T0 + 60_000);
        assert_eq!((a.allowed, a.remaining, a.reset_after), (true, 1, 60));
        let s = fixed_refund(s, r, 1, T0 + 30_000);
        assert_eq!(s.count, 1);
        assert_eq!(fixed_refund(s, r, 1, T0 + 61_000), s, "window passed");
    }

    #[test]
    fn sliding_weighs_the_previous_window() {
        let r = rate(10, Algorithm::SlidingWindow);
        // 10 hits at the end of one window...
        let mut s = Sliding::default();
        for _ in 0..10 {
            let (n, a) = sliding_hit(s, r, 1, T0 - 1_000);
            assert!(a.allowed);
            s = n;
        }
        // ...leave no room right after the edge: 10 × 59/60 + 1 > 10.
        let (s, a) = sliding_hit(s, r, 1, T0 + 1_000);
        assert!(!a.allowed);
        assert_eq!(s.prev, 10);
        assert_eq!(s.cur, 0);
        // One hit fits once a tenth of the window has passed: 10 × 54/60 + 1 = 10.
        assert_eq!(a.reset_after, 5);
        assert!(!sliding_hit(s, r, 1, T0 + 5_999).1.allowed);
        let (s, a) = sliding_hit(s, r, 1, T0 + 6_000);
        assert!(a.allowed);
        assert_eq!(a.remaining, 0);
        assert_eq!(a.reset_after, 54);
        // Half way through: prev weighs 5, 1 counted, room for 4.
        let (_, a) = sliding_hit(s, r, 1, T0 + 30_000);
        assert_eq!((a.allowed, a.remaining), (true, 3));
        // Two windows on, nothing weighs.
        let (_, a) = sliding_hit(s, r, 1, T0 + 120_000);
        assert_eq!((a.allowed, a.remaining, a.reset_after), (true, 9, 60));
    }

    #[test]
    fn sliding_refusal_waits_for_the_next_window_when_this_one_is_full() {
        let r = rate(4, Algorithm::SlidingWindow);
        let mut s = Sliding::default();
        for _ in 0..4 {
            s = sliding_hit(s, r, 1, T0 + 45_000).0;
        }
        // cur = 4: nothing fits until the next window, and then only once 4 × (60 − e)/60 ≤ 3,
        // i.e. e ≥ 15 s: 15 s + 15 s = 30 s from now.
        let (s, a) = sliding_hit(s, r, 1, T0 + 45_000);
        assert_eq!((a.allowed, a.reset_after), (false, 30));
        assert!(!sliding_hit(s, r, 1, T0 + 74_999).1.allowed);
        assert!(sliding_hit(s, r, 1, T0 + 75_000).1.allowed);
        // A refund in the same window gives room back; after the window, it does nothing.
        let back = sliding_refund(s, r, 1, T0 + 50_000);
        assert_eq!(back.cur, 3);
        assert_eq!(sliding_refund(s, r, 1, T0 + 61_000), s);
    }

    #[test]
    fn sliding_lagging_clock_keeps_counts() {
        let r = rate(2, Algorithm::SlidingWindow);
        let (s, _) = sliding_hit(Sliding::default(), r, 2, T0 + 60_500);
        let (s2, a) = sliding_hit(s, r, 1, T0 + 59_900);
        assert!(!a.allowed);
        assert_eq!(s2, s);
    }

    #[test]
    fn token_bucket_bursts_to_the_limit_then_refills_one_per_interval() {
        // 3 per minute: T = 20 s.
        let r = rate(3, Algorithm::TokenBucket);
        let mut b = Bucket::default();
        for left in [2, 1, 0] {
            let (n, a) = bucket_hit(b, r, 1, T0);
            assert_eq!((a.allowed, a.remaining), (true, left));
            b = n;
        }
        // Full again 60 s after three hits.
        assert_eq!(bucket_hit(Bucket::default(), r, 3, T0).1.reset_after, 60);
        let (b2, a) = bucket_hit(b, r, 1, T0 + 500);
        assert_eq!((a.allowed, a.remaining, a.reset_after), (false, 0, 20));
        assert_eq!(b2, b, "refused hits count nothing");
        // 19.5 s in: one token back at 20 s.
        assert!(!bucket_hit(b, r, 1, T0 + 19_999).1.allowed);
        let (b, a) = bucket_hit(b, r, 1, T0 + 20_000);
        assert_eq!((a.allowed, a.remaining, a.reset_after), (true, 0, 60));
        // Cost 2 needs 40 s.
        assert_eq!(bucket_hit(b, r, 2, T0 + 20_000).1.reset_after, 40);
    }

    #[test]
    fn token_bucket_inexact_interval_admits_exactly_the_limit() {
        // 7 per minute: T = 8571.43 ms, which no float would add up exactly.
        let r = rate(7, Algorithm::TokenBucket);
        let mut b = Bucket::default();
        for _ in 0..7 {
            let (n, a) = bucket_hit(b, r, 1, T0);
            assert!(a.allowed);
            b = n;
        }
        assert!(!bucket_hit(b, r, 1, T0).1.allowed);
        assert!(!bucket_hit(b, r, 1, T0 + 8_571).1.allowed);
        assert!(bucket_hit(b, r, 1, T0 + 8_572).1.allowed);
    }

    #[test]
    fn token_bucket_refund_moves_tat_back_but_not_before_now() {
        let r = rate(3, Algorithm::TokenBucket);
        let (b, _) = bucket_hit(Bucket::default(), r, 2, T0);
        let back = bucket_refund(b, r, 1, T0);
        assert_eq!(back.debt_at(r, T0), 60_000);
        let back = bucket_refund(back, r, 5, T0);
        assert_eq!(back.debt_at(r, T0), 0);
        assert!(bucket_hit(back, r, 3, T0).1.allowed);
    }

    #[test]
    fn a_cost_above_the_limit_never_fits_and_counts_nothing() {
        for alg in [
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
            Algorithm::TokenBucket,
        ] {
            let r = rate(3, alg);
            let a = match alg {
                Algorithm::FixedWindow => fixed_hit(Fixed::default(), r, 4, T0).1,
                Algorithm::SlidingWindow => sliding_hit(Sliding::default(), r, 4, T0).1,
                Algorithm::TokenBucket => bucket_hit(Bucket::default(), r, 4, T0).1,
            };
            assert!(!a.allowed, "{alg:?}");
            assert!(a.reset_after >= 1, "{alg:?}");
        }
    }
}
