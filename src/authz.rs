//! ext_authz Check, the domain side: key extraction → key lookup → per-minute window → quota →
//! decision. Reads top to bottom in the order a request meets the rules.
//!
//! Envoy's types never appear here; `grpc/authz.rs` translates.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::clock::{self, Clock};
use crate::config::{AuthzConfig, LimitsConfig};
use crate::decision::{
    Allowed, Decision, Denial, DenyReason, LimitKind, LimitScope, LimitState, MAX_COST,
    mint_decision_id,
};
use crate::failure::{FailurePolicies, Verdict};
use crate::keys::{self, ApiKey, KeyStatus, cache::KeyCache};
use crate::limiter::{Algorithm, Rate, WindowLimiter};
use crate::reqlog::RequestLog;
use crate::store::{LogApi, LogRow, Quota, QuotaOutcome, QuotaStore, Spend, StoreError};
use crate::telemetry::Metrics;

/// Per-minute window length.
const MINUTE: u64 = 60;
/// Values longer than this in a key header are refused without a look.
const MAX_CREDENTIAL_LEN: usize = 512;
/// Characters of a route's permission a refusal quotes.
const MAX_PERMISSION_SHOWN: usize = 128;

/// What a check needs to know about the HTTP request.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckInput<'a> {
    /// The key and the header it came in, if any.
    pub credential: Option<(&'a str, &'a Arc<str>)>,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub host: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub client_addr: Option<&'a str>,
    /// What the request costs, as the route configured it (unset: 1).
    pub cost: Option<&'a str>,
    /// The permission the route needs, as it configured it (unset: none).
    pub permission: Option<&'a str>,
}

/// What Check works with besides its settings: the key cache, the backends, the request log,
/// the clock, the metrics and the backends' failure policies.
pub struct AuthzDeps {
    pub keys: Arc<KeyCache>,
    pub limiter: Arc<dyn WindowLimiter>,
    /// How quota is spent (exactly, or in blocks; see `store::batched`): Check does not know.
    pub quotas: Arc<dyn QuotaStore>,
    pub log: RequestLog,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub failures: FailurePolicies,
    /// `database.timeout`: how long one check waits for the database in all (its key lookup
    /// and its quota together), counted from its arrival.
    pub database_timeout: Duration,
}

/// Decides Check requests.
pub struct AuthzService {
    key_headers: Vec<Arc<str>>,
    authorization: Arc<str>,
    bearer: bool,
    rate_limit: bool,
    default_per_minute: Option<u64>,
    algorithm: Algorithm,
    deps: AuthzDeps,
}

impl AuthzService {
    /// Check with the `authz` settings; `limits` holds the per-minute limit of keys without one
    /// of their own, and how their windows count.
    pub fn new(config: &AuthzConfig, limits: &LimitsConfig, deps: AuthzDeps) -> Self {
        Self {
            key_headers: config
                .key_headers
                .iter()
                .map(|h| Arc::from(h.as_str()))
                .collect(),
            authorization: Arc::from("authorization"),
            bearer: config.bearer,
            rate_limit: config.rate_limit,
            default_per_minute: limits.default_per_minute,
            algorithm: limits.algorithm,
            deps,
        }
    }

    /// Finds the key among the request's headers: the configured key headers in order, then
    /// `Authorization: Bearer <key>`. `header` looks a lower-case header name up.
    pub fn credential<'a>(
        &'a self,
        header: impl Fn(&str) -> Option<&'a str>,
    ) -> Option<(&'a str, &'a Arc<str>)> {
        for name in &self.key_headers {
            if let Some(v) = header(name).map(str::trim).filter(|v| !v.is_empty()) {
                return Some((v, name));
            }
        }
        if self.bearer {
            let auth = header(&self.authorization)?.trim();
            let (scheme, token) = auth.split_once(' ')?;
            let token = token.trim();
            if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() {
                return Some((token, &self.authorization));
            }
        }
        None
    }

    /// Decides one request, counts it, and queues its log row. Returns the decision and the id
    /// minted for it (see [`mint_decision_id`]), which the row carries: Envoy hands it back in
    /// its access log, and only it completes the row.
    ///
    /// Dropped before it answers (Envoy gave up on the Check: its timeout, a disconnect), the
    /// check charges nothing: what it spent is given back and its row says `cancelled`.
    pub async fn check(&self, input: &CheckInput<'_>) -> (Decision, String) {
        use tracing::Instrument;
        let started = std::time::Instant::now();
        let now = self.deps.clock.now();
        let deadline = Instant::from_std(started) + self.deps.database_timeout;
        let mut progress = Progress {
            deps: &self.deps,
            input,
            now,
            key_id: None,
            identity_id: None,
            windows: Vec::new(),
            answered: false,
        };
        // One span per check (debug level, so free unless asked for), with what was decided.
        // The key itself is never recorded, only its id once known.
        let span = tracing::debug_span!(
            "check",
            key_id = tracing::field::Empty,
            key_prefix = tracing::field::Empty,
            decision = tracing::field::Empty,
            reason = tracing::field::Empty,
        );
        let decision = self
            .decide(input, now, deadline, &mut progress)
            .instrument(span.clone())
            .await;
        // From here on nothing waits: the answer is the caller's.
        progress.answered = true;
        if !span.is_disabled() {
            let key_id = match &decision {
                Decision::Allow(a) => Some(a.key.id),
                Decision::Deny(d) => d.key_id,
            };
            if let Some(id) = key_id {
                span.record("key_id", id);
            }
            span.record(
                "decision",
                if matches!(decision, Decision::Allow(_)) {
                    "allow"
                } else {
                    "deny"
                },
            );
            span.record("reason", decision.reason_code());
            tracing::debug!(parent: &span, status = decision.status(), "decided");
        }
        self.deps.metrics.record_decision(&decision);
        self.deps.metrics.check_duration.observe(started.elapsed());
        let key_id = match &decision {
            Decision::Allow(a) => Some(a.key.id),
            Decision::Deny(d) => d.key_id,
        };
        let decision_id = mint_decision_id();
        // The identity the key belonged to as this check saw it (a later move does not rewrite
        // the log).
        let mut row = log_row(input, now, key_id, key_id.and(progress.identity_id));
        // Which secret a known key came with (the old one or the new, while a rotation's grace
        // runs): its visible prefix, never the secret.
        row.key_prefix = key_id
            .and(input.credential)
            .and_then(|(presented, _)| presented.get(..keys::VISIBLE_PREFIX_LEN))
            .map(str::to_owned);
        if let Some(prefix) = &row.key_prefix
            && !span.is_disabled()
        {
            span.record("key_prefix", prefix.as_str());
        }
        row.decision_id = Some(decision_id.clone());
        row.allowed = matches!(decision, Decision::Allow(_));
        row.reason = decision.reason_code();
        row.status = decision.status();
        row.cost = match &decision {
            Decision::Allow(a) => a.cost,
            Decision::Deny(_) => 0,
        };
        self.deps.log.record(row);
        (decision, decision_id)
    }

    /// Decides; every database wait ends by `deadline`. `progress` learns what was spent as it
    /// is spent, so a check dropped halfway can give it back.
    async fn decide(
        &self,
        input: &CheckInput<'_>,
        now: DateTime<Utc>,
        deadline: Instant,
        progress: &mut Progress<'_>,
    ) -> Decision {
        // 1. A key, of the right shape.
        let Some((presented, header)) = input.credential else {
            return deny(DenyReason::MissingKey, None);
        };
        if presented.len() > MAX_CREDENTIAL_LEN || !keys::is_well_formed(presented) {
            return deny(DenyReason::InvalidKey, None);
        }

        // What the route says this request costs: 0 checks without spending.
        let cost = match input.cost.map(|c| c.trim().parse::<u64>()) {
            None => 1,
            Some(Ok(c)) if c <= MAX_COST => c,
            Some(_) => {
                tracing::error!(cost = ?input.cost, "invalid cost in the route's ext_authz context_extensions");
                return deny(DenyReason::InvalidCost, None);
            }
        };

        // 2. A known key, active and unexpired.
        let hash = keys::hash(presented);
        let looked_up = tokio::time::timeout_at(deadline, self.deps.keys.lookup(&hash))
            .await
            .unwrap_or(Err(StoreError::TimedOut));
        let key = match looked_up {
            Ok((found, outcome)) => {
                self.deps.metrics.record_cache(outcome);
                match found {
                    // A rotated key's old secret, past its grace, is as unknown as any other.
                    Some(key) if key.secret_works(now) => key,
                    _ => return deny(DenyReason::InvalidKey, None),
                }
            }
            Err(e) => {
                // Whatever the failure mode: a key that could not be looked up is not known to be valid.
                self.deps
                    .failures
                    .database
                    .on_error_closed("key lookup", &e);
                return unavailable(None);
            }
        };
        progress.key_id = Some(key.id);
        progress.identity_id = key.identity.as_deref().map(|i| i.id);
        if key.status == KeyStatus::Revoked {
            return deny(DenyReason::KeyRevoked, Some(key.id));
        }
        if key.is_expired(now) {
            return deny(DenyReason::KeyExpired, Some(key.id));
        }
        // The route's permission, if it needs one: checked before anything is spent.
        if let Some(permission) = input.permission
            && !key.may(permission)
        {
            return Decision::Deny(Denial {
                permission: Some(permission.chars().take(MAX_PERMISSION_SHOWN).collect()),
                ..deny_denial(DenyReason::PermissionDenied, Some(key.id))
            });
        }

        // 3. The per-minute window. Checked before the quota, so a request it refuses
        //    spends no quota (DESIGN rule 4).
        //    A key of an identity with a per-minute limit also hits the identity's window
        //    (shared by its keys): both are counted or neither.
        let mut limits = Vec::with_capacity(6);
        let own_rate = self
            .rate_limit
            .then(|| key.limits().per_minute.or(self.default_per_minute))
            .flatten()
            .map(|limit| Rate::new(limit, MINUTE, self.algorithm));
        let identity_rate = key
            .identity
            .as_deref()
            .copied()
            .filter(|_| self.rate_limit)
            .and_then(|i| Some((i.id, i.per_minute?)))
            .map(|(id, limit)| (id, Rate::new(limit, MINUTE, self.algorithm)));
        let mut windows: Vec<(String, Rate, LimitScope)> = Vec::with_capacity(2);
        if let Some(rate) = own_rate {
            windows.push((window_key(&key), rate, LimitScope::Key));
        }
        if let Some((id, rate)) = identity_rate {
            windows.push((identity_window_key(id), rate, LimitScope::Identity));
        }
        if !windows.is_empty() {
            let step = std::time::Instant::now();
            let hits = match windows.as_slice() {
                [(k, r, _)] => self
                    .deps
                    .limiter
                    .hit(k, *r, cost, now)
                    .await
                    .map(|w| vec![w]),
                [(k1, r1, _), (k2, r2, _)] => self
                    .deps
                    .limiter
                    .hit_both((k1, *r1), (k2, *r2), cost, now)
                    .await
                    .map(|(a, b)| std::iter::once(a).chain(b).collect()),
                _ => unreachable!("at most two windows"),
            };
            self.deps.metrics.limiter_duration.observe(step.elapsed());
            match hits {
                Ok(states) => {
                    for ((_, rate, scope), w) in windows.iter().zip(&states) {
                        let state = LimitState {
                            kind: LimitKind::PerMinute,
                            limit: rate.limit,
                            remaining: w.remaining,
                            reset_after: w.reset_after,
                            window_secs: MINUTE,
                            scope: *scope,
                        };
                        if !w.allowed {
                            // Nothing was counted (a pair takes the first hit back).
                            return Decision::Deny(Denial {
                                retry_after: Some(w.reset_after),
                                limit: Some(state),
                                ..deny_denial(DenyReason::RateLimited, Some(key.id))
                            });
                        }
                        limits.push(state);
                    }
                    // Counted: a later refusal, or the check being dropped, gives them back.
                    progress.windows = windows
                        .into_iter()
                        .map(|(k, rate, _)| (k, rate, cost))
                        .collect();
                }
                Err(e) => match self.deps.failures.limiter.on_error("per-minute window", &e) {
                    // Not limited per minute while the limiter is away.
                    Verdict::Open => {}
                    Verdict::Closed => return unavailable(Some(key.id)),
                },
            }
        }

        // 4. The daily and monthly quota: one atomic statement (exact mode), or spent from a
        //    block reserved with that statement (batched mode, and keys without quotas, which
        //    have nothing to enforce). Every admitted request is counted, so usage and the log
        //    agree.
        //    A key of an identity spends from the key's counters and the identity's, both or
        //    neither, always exactly (never from a reserved block).
        let quota = Quota {
            daily: key.limits().daily,
            monthly: key.limits().monthly,
        };
        let identity_quota = key.identity.as_deref().map(|i| Quota {
            daily: i.daily,
            monthly: i.monthly,
        });
        let step = std::time::Instant::now();
        let outcome = match key.identity.as_deref().copied() {
            None => {
                let spend = self
                    .deps
                    .quotas
                    .consume(Spend::new(key.id, cost, now), quota);
                tokio::time::timeout_at(deadline, spend)
                    .await
                    .unwrap_or(Err(StoreError::TimedOut))
                    .map(|o| (o, None))
            }
            Some(identity) => {
                let spend = self.deps.quotas.consume_shared(
                    Spend::new(key.id, cost, now).with_identity(identity.id),
                    quota,
                    identity_quota.unwrap_or_default(),
                );
                tokio::time::timeout_at(deadline, spend)
                    .await
                    .unwrap_or(Err(StoreError::TimedOut))
                    .map(|o| (o.key, Some(o.identity)))
            }
        };
        self.deps.metrics.database_duration.observe(step.elapsed());
        // The key's own limit is named when both refused; then the identity's.
        let (outcome, scope, scope_quota) = match outcome {
            Ok((key_outcome, Some(identity_outcome)))
                if matches!(key_outcome, QuotaOutcome::Admitted { .. })
                    && !matches!(identity_outcome, QuotaOutcome::Admitted { .. }) =>
            {
                (
                    Ok((identity_outcome, None)),
                    LimitScope::Identity,
                    identity_quota.unwrap_or_default(),
                )
            }
            other => (other, LimitScope::Key, quota),
        };
        let refused = match outcome {
            Ok((QuotaOutcome::Admitted { daily, monthly }, identity_outcome)) => {
                if let Some(limit) = quota.daily {
                    limits.push(quota_state(LimitKind::Daily, limit, daily, now));
                }
                if let Some(limit) = quota.monthly {
                    limits.push(quota_state(LimitKind::Monthly, limit, monthly, now));
                }
                if let (Some(QuotaOutcome::Admitted { daily, monthly }), Some(identity_quota)) =
                    (identity_outcome, identity_quota)
                {
                    let shared = |kind, limit, used| LimitState {
                        scope: LimitScope::Identity,
                        ..quota_state(kind, limit, used, now)
                    };
                    if let Some(limit) = identity_quota.daily {
                        limits.push(shared(LimitKind::Daily, limit, daily));
                    }
                    if let Some(limit) = identity_quota.monthly {
                        limits.push(shared(LimitKind::Monthly, limit, monthly));
                    }
                }
                return Decision::Allow(Allowed {
                    key,
                    limits,
                    credential_header: header.clone(),
                    cost,
                });
            }
            Ok((QuotaOutcome::DailyExceeded { .. }, _)) => {
                let limit = scope_quota.daily.unwrap_or_default();
                let state = LimitState {
                    scope,
                    ..quota_state(LimitKind::Daily, limit, limit, now)
                };
                quota_denial(DenyReason::DailyQuotaExceeded, state, key.id)
            }
            Ok((QuotaOutcome::MonthlyExceeded { .. }, _)) => {
                let limit = scope_quota.monthly.unwrap_or_default();
                let state = LimitState {
                    scope,
                    ..quota_state(LimitKind::Monthly, limit, limit, now)
                };
                quota_denial(DenyReason::MonthlyQuotaExceeded, state, key.id)
            }
            Err(e) => match self.deps.failures.database.on_error("quota update", &e) {
                // Admitted uncounted: the database cannot count it.
                Verdict::Open => {
                    return Decision::Allow(Allowed {
                        key,
                        limits,
                        credential_header: header.clone(),
                        cost: 0,
                    });
                }
                Verdict::Closed => unavailable(Some(key.id)),
            },
        };
        // The request was refused after its per-minute hit was counted: give the hit back,
        // so a refused request costs nothing.
        for (window_key, rate, cost) in std::mem::take(&mut progress.windows) {
            if let Err(e) = self.deps.limiter.refund(&window_key, rate, cost, now).await {
                tracing::warn!(error = %e, key_id = key.id, "rate limit refund failed");
            }
        }
        refused
    }
}

/// What a check has done so far, so that one dropped before its answer (Envoy gave up on it)
/// is not charged: its per-minute hit is given back and its row says `cancelled`. Quota spent
/// for it goes back by itself (the store's [`Charge`](crate::store::consume)), whatever moment
/// it was dropped at.
struct Progress<'a> {
    deps: &'a AuthzDeps,
    input: &'a CheckInput<'a>,
    now: DateTime<Utc>,
    key_id: Option<i64>,
    /// The identity of the key, once known.
    identity_id: Option<i64>,
    /// The per-minute hits counted for it (the key's, its identity's): counter key, rate, cost.
    windows: Vec<(String, Rate, u64)>,
    /// The check has its answer: nothing to undo.
    answered: bool,
}

impl Drop for Progress<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.deps.metrics.checks_cancelled.inc();
        let mut row = log_row(self.input, self.now, self.key_id, self.identity_id);
        row.reason = CANCELLED;
        row.status = CANCELLED_STATUS;
        self.deps.log.record(row);
        let windows = std::mem::take(&mut self.windows);
        if !windows.is_empty()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let limiter = self.deps.limiter.clone();
            let (now, key_id) = (self.now, self.key_id);
            runtime.spawn(async move {
                for (window_key, rate, cost) in windows {
                    if let Err(e) = limiter.refund(&window_key, rate, cost, now).await {
                        tracing::warn!(error = %e, key_id, "rate limit refund of a cancelled check failed");
                    }
                }
            });
        }
    }
}

/// The reason a cancelled check's row gives, and the status it records: 499, as proxies log a
/// request whose client closed it before the answer.
pub const CANCELLED: &str = "cancelled";
const CANCELLED_STATUS: u16 = 499;

/// A log row for `input` with the request's own fields filled in, denied with no reason yet.
fn log_row(
    input: &CheckInput<'_>,
    now: DateTime<Utc>,
    key_id: Option<i64>,
    identity_id: Option<i64>,
) -> LogRow {
    LogRow {
        ts: now,
        api: LogApi::Authz,
        request_id: input.request_id.map(str::to_owned),
        decision_id: None,
        key_id,
        method: input.method.map(str::to_owned),
        path: input.path.map(str::to_owned),
        host: input.host.map(str::to_owned),
        client_addr: input.client_addr.map(str::to_owned),
        allowed: false,
        reason: "",
        status: 0,
        cost: 0,
        key_prefix: None,
        identity_id,
    }
}

/// The counter key of a key's per-minute window.
fn window_key(key: &ApiKey) -> String {
    format!("key:{}", key.id)
}

/// The counter key of an identity's per-minute window, shared by its keys (and counted by
/// ShouldRateLimit for an `identity_id` descriptor).
pub fn identity_window_key(identity_id: i64) -> String {
    format!("identity:{identity_id}")
}

/// The daily or monthly quota `limit` with `used` spent, as it stands at `now`: it resets at the
/// next UTC midnight or first of the month.
fn quota_state(kind: LimitKind, limit: u64, used: u64, now: DateTime<Utc>) -> LimitState {
    let (reset_after, window_secs) = match kind {
        LimitKind::Monthly => (
            clock::secs_until_next_month(now),
            clock::month_length_secs(now),
        ),
        LimitKind::Daily | LimitKind::PerMinute => (clock::secs_until_next_day(now), 86_400),
    };
    LimitState {
        kind,
        limit,
        remaining: limit.saturating_sub(used),
        reset_after,
        window_secs,
        scope: Default::default(),
    }
}

/// A refusal by a spent quota: retry when it resets.
fn quota_denial(reason: DenyReason, state: LimitState, key_id: i64) -> Decision {
    Decision::Deny(Denial {
        retry_after: Some(state.reset_after),
        limit: Some(state),
        ..deny_denial(reason, Some(key_id))
    })
}

fn deny_denial(reason: DenyReason, key_id: Option<i64>) -> Denial {
    Denial {
        key_id,
        ..Denial::new(reason)
    }
}

fn deny(reason: DenyReason, key_id: Option<i64>) -> Decision {
    Decision::Deny(deny_denial(reason, key_id))
}

fn unavailable(key_id: Option<i64>) -> Decision {
    Decision::Deny(Denial {
        retry_after: Some(1),
        ..deny_denial(DenyReason::BackendUnavailable, key_id)
    })
}
