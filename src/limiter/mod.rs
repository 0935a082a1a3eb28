//! Rate-limit windows: "at most N hits per window" per counter key.
//!
//! One async trait, [`WindowLimiter`], with one backend per file. `memory.rs` keeps the windows
//! in this process (the embedded default). Windows are fixed and epoch-aligned: a 60 s window
//! runs from hh:mm:00 to hh:mm+1:00 UTC, the same on every replica and in Envoy's rate limit
//! service.

pub mod memory;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

/// What went wrong talking to the limiter's backend.
#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    #[error("rate limiter backend unavailable: {0}")]
    Unavailable(String),
}

impl LimiterError {
    pub fn is_transient(&self) -> bool {
        matches!(self, LimiterError::Unavailable(_))
    }
}

/// The state of one window after a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowState {
    /// Whether the hit fitted and was counted.
    pub allowed: bool,
    pub limit: u64,
    /// Hits left in this window after this one (0 when refused).
    pub remaining: u64,
    /// Whole seconds until the window resets, 1..=window length.
    pub reset_after: u64,
}

/// Counts hits in fixed windows.
#[async_trait]
pub trait WindowLimiter: Send + Sync + 'static {
    /// Adds `cost` hits to `key`'s current window of `window_secs` seconds if the window's total
    /// stays within `limit`; otherwise counts nothing. Check and increment are one atomic step.
    async fn hit(
        &self,
        key: &str,
        limit: u64,
        window_secs: u64,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<WindowState, LimiterError>;

    /// Gives back `cost` hits counted in `key`'s window that `now` falls in (for a request that a
    /// later step refused). Does nothing once that window has passed.
    async fn refund(
        &self,
        key: &str,
        window_secs: u64,
        cost: u64,
        now: DateTime<Utc>,
    ) -> Result<(), LimiterError>;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_epoch_aligned() {
        assert_eq!(window_start_ms(0, 60), 0);
        assert_eq!(window_start_ms(59_999, 60), 0);
        assert_eq!(window_start_ms(60_000, 60), 60_000);
        assert_eq!(window_start_ms(1_700_000_123_456, 60), 1_700_000_100_000);
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
}
