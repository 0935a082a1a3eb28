//! The quota seam: each key's daily, monthly and total counters, checked and spent in one
//! atomic step (DESIGN rules 1 and 2).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::StoreError;

/// The daily and monthly limits a quota check enforces (`None` = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quota {
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
}

impl Quota {
    /// Neither a daily nor a monthly limit: nothing to enforce, only to count.
    pub fn is_uncapped(&self) -> bool {
        self.daily.is_none() && self.monthly.is_none()
    }
}

/// Units of one key's quota spent, or given back, at one moment: they count in the UTC day and
/// month `at` falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spend {
    pub key_id: i64,
    pub units: u64,
    pub at: DateTime<Utc>,
    /// The identity whose shared counters the units are spent from too (see
    /// [`QuotaStore::consume_shared`]); a give-back gives them back to both.
    pub identity_id: Option<i64>,
}

impl Spend {
    pub fn new(key_id: i64, units: u64, at: DateTime<Utc>) -> Self {
        Spend {
            key_id,
            units,
            at,
            identity_id: None,
        }
    }

    /// The same spend, from the key's counters and identity `identity_id`'s.
    pub fn with_identity(self, identity_id: i64) -> Self {
        Spend {
            identity_id: Some(identity_id),
            ..self
        }
    }
}

/// The answer of [`QuotaStore::consume_shared`]: what the key's counters and the identity's
/// said. Admitted: both are [`QuotaOutcome::Admitted`], with the counters after the increment.
/// Refused: nothing was spent; the one whose limit had no room is an `…Exceeded` (possibly both),
/// the other an `Admitted` with its counters as they are (it had room).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedOutcome {
    pub key: QuotaOutcome,
    pub identity: QuotaOutcome,
}

impl SharedOutcome {
    pub fn admitted(&self) -> bool {
        matches!(self.key, QuotaOutcome::Admitted { .. })
            && matches!(self.identity, QuotaOutcome::Admitted { .. })
    }
}

/// The answer of [`QuotaStore::consume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaOutcome {
    /// The cost was added; counters after the increment.
    Admitted { daily: u64, monthly: u64 },
    /// Nothing was added: the month has no room (reported before the day, as it resets later).
    MonthlyExceeded { used: u64 },
    /// Nothing was added: today has no room.
    DailyExceeded { used: u64 },
}

/// A key's usage counters as of `now` (a counter from an earlier day or month reads as 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub daily: u64,
    pub monthly: u64,
    pub total: u64,
}

impl Usage {
    /// From the (daily, monthly, total) counters a backend read.
    pub(crate) fn from_counts((daily, monthly, total): (i64, i64, i64)) -> Self {
        Usage {
            daily: daily.max(0) as u64,
            monthly: monthly.max(0) as u64,
            total: total.max(0) as u64,
        }
    }
}

/// Daily and monthly usage quotas.
#[async_trait]
pub trait QuotaStore: Send + Sync + 'static {
    /// Adds the spend's units to the key's daily, monthly and total counters if, and only if,
    /// they all fit in both that day's and that month's room under `quota`; one atomic statement
    /// (DESIGN rules 1 and 2). A counter from an earlier day or month counts as 0. Errors leave
    /// the counters unchanged.
    async fn consume(&self, spend: Spend, quota: Quota) -> Result<QuotaOutcome, StoreError>;

    /// Takes units spent back off the key's counters: the daily one only if it still belongs to
    /// the day they were spent in, the monthly one only if it still belongs to that month, and
    /// the total. Never below zero. For quota reserved and not used, or refunded.
    async fn give_back(&self, spent: Spend) -> Result<(), StoreError>;

    /// The key's counters as they stand at `now` (zero for a key without any).
    async fn usage(&self, key_id: i64, now: DateTime<Utc>) -> Result<Usage, StoreError>;

    /// For a key that belongs to an identity (`spend.identity_id`): adds the units to the key's
    /// counters and the identity's if, and only if, they fit in both, under `quota` (the key's)
    /// and `identity` (the identity's); both or neither, in one atomic step. On PostgreSQL the
    /// identity's usage row is locked before the key's, in every statement that locks both, so
    /// replicas never deadlock.
    async fn consume_shared(
        &self,
        spend: Spend,
        quota: Quota,
        identity: Quota,
    ) -> Result<SharedOutcome, StoreError> {
        let _ = (spend, quota, identity);
        Err(StoreError::Corrupt {
            table: "identity_usage",
            detail: "this quota store does not count identities".into(),
        })
    }

    /// An identity's shared counters as they stand at `now`.
    async fn identity_usage(
        &self,
        identity_id: i64,
        now: DateTime<Utc>,
    ) -> Result<Usage, StoreError> {
        let _ = (identity_id, now);
        Ok(Usage::default())
    }
}

/// Which limit refused a request of `cost`, given the counters as they were; `None` if both had
/// room (the request was not refused for its quota).
pub(crate) fn refusal(
    quota: Quota,
    cost: u64,
    daily_used: u64,
    monthly_used: u64,
) -> Option<QuotaOutcome> {
    if quota
        .monthly
        .is_some_and(|m| monthly_used.saturating_add(cost) > m)
    {
        Some(QuotaOutcome::MonthlyExceeded { used: monthly_used })
    } else if quota
        .daily
        .is_some_and(|d| daily_used.saturating_add(cost) > d)
    {
        Some(QuotaOutcome::DailyExceeded { used: daily_used })
    } else {
        None
    }
}

/// A count as the databases store it (`BIGINT` / `INTEGER`): past `i64::MAX` it is capped.
pub(crate) fn count_i64(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// SQL, in both dialects: the daily counter of usage row `$u` as it counts on day `$day`: 0 when
/// it belongs to an earlier day (DESIGN rule 2). When it already belongs to a later day (a
/// replica whose clock lags, just after midnight), the request counts in that later day, and a
/// statement that spends sets the row's day to the later of the two, so a lagging clock never
/// moves the counters back a day. Every statement that reads or spends the daily quota uses this
/// expression, so the rule is stated once.
macro_rules! daily_now {
    ($u:literal, $day:literal) => {
        concat!(
            "(CASE WHEN ",
            $u,
            ".day >= ",
            $day,
            " THEN ",
            $u,
            ".daily_requests ELSE 0 END)"
        )
    };
}

/// SQL, in both dialects: the monthly counter of usage row `$u` as it counts in month `$month`,
/// by the same rule as `daily_now!`.
macro_rules! monthly_now {
    ($u:literal, $month:literal) => {
        concat!(
            "(CASE WHEN ",
            $u,
            ".month >= ",
            $month,
            " THEN ",
            $u,
            ".monthly_requests ELSE 0 END)"
        )
    };
}

pub(crate) use {daily_now, monthly_now};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_month_before_the_day() {
        let both = Quota {
            daily: Some(5),
            monthly: Some(10),
        };
        assert_eq!(
            refusal(both, 1, 5, 10),
            Some(QuotaOutcome::MonthlyExceeded { used: 10 })
        );
        assert_eq!(
            refusal(both, 1, 5, 3),
            Some(QuotaOutcome::DailyExceeded { used: 5 })
        );
        assert_eq!(refusal(both, 1, 4, 3), None);
        assert_eq!(refusal(Quota::default(), u64::MAX, u64::MAX, 0), None);
    }

    #[test]
    fn the_rule_of_the_day_reads_as_sql() {
        assert_eq!(
            daily_now!("u", "$2"),
            "(CASE WHEN u.day >= $2 THEN u.daily_requests ELSE 0 END)"
        );
        assert_eq!(
            monthly_now!("u", "r.month"),
            "(CASE WHEN u.month >= r.month THEN u.monthly_requests ELSE 0 END)"
        );
    }
}
