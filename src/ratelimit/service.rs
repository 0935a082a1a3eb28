//! ShouldRateLimit, the domain side: each descriptor of a request finds its limit (Envoy's
//! override, a rule, or the API key's own per-minute limit), is counted, and the answers are
//! combined. Envoy's types never appear here; `grpc/ratelimit.rs` translates.
//!
//! Differences from envoyproxy/ratelimit, all on the side of not counting what was refused: a
//! descriptor over its limit counts nothing, and when the request as a whole is refused the other
//! descriptors' hits are given back (in shadow mode nothing is refused, so nothing is given back).
//!
//! A backend that fails is handled by its [`FailurePolicy`](crate::failure::FailurePolicy), the
//! same one Check uses: `open` lets the descriptor through unchecked, `closed` answers
//! [`Unavailable`].

use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};

use super::counter_key::{bounded, push_entries};
use super::rules::{Rule, RuleLimit, Rules, Unit};
use crate::clock::Clock;
use crate::config::{LimitsConfig, RateLimitConfig};
use crate::failure::{FailurePolicies, LogEvery, Verdict};
use crate::keys::cache::KeyCache;
use crate::limiter::{Algorithm, Rate, WindowLimiter};
use crate::reqlog::RequestLog;
use crate::store::{IdentityStore, LogApi, LogRow};
use crate::telemetry::Metrics;

/// The descriptor entry that names an API key (tollgate's ext_authz `key_id` metadata).
pub const API_KEY_ENTRY: &str = "api_key_id";
/// The descriptor entry that names an identity: a descriptor of just this entry is counted
/// against the identity's per-minute limit, in the window Check hits for its keys.
pub const IDENTITY_ENTRY: &str = "identity_id";

/// Identities' per-minute limits as ShouldRateLimit reads them: from the database, each kept
/// for at most [`IDENTITY_TTL`] (so a change reaches every replica within a second), and at
/// most [`MAX_IDENTITIES`] of them.
pub struct IdentityLimits {
    store: Arc<dyn IdentityStore>,
    cached: std::sync::Mutex<std::collections::HashMap<i64, (std::time::Instant, Option<u64>)>>,
}

const IDENTITY_TTL: std::time::Duration = std::time::Duration::from_secs(1);
const MAX_IDENTITIES: usize = 4096;

impl IdentityLimits {
    pub fn new(store: Arc<dyn IdentityStore>) -> Self {
        IdentityLimits {
            store,
            cached: Default::default(),
        }
    }

    /// The identity's per-minute limit (`None`: no such identity, or unlimited).
    async fn per_minute(&self, id: i64) -> Result<Option<u64>, crate::store::StoreError> {
        let now = std::time::Instant::now();
        if let Some((at, v)) = self.cached.lock().expect("identity cache").get(&id)
            && now.duration_since(*at) < IDENTITY_TTL
        {
            return Ok(*v);
        }
        let v = self
            .store
            .get_identity(id)
            .await?
            .and_then(|i| i.per_minute);
        let mut cached = self.cached.lock().expect("identity cache");
        if cached.len() >= MAX_IDENTITIES {
            cached.retain(|_, (at, _)| now.duration_since(*at) < IDENTITY_TTL);
            if cached.len() >= MAX_IDENTITIES {
                cached.clear();
            }
        }
        cached.insert(id, (now, v));
        Ok(v)
    }
}

/// One descriptor of a request.
#[derive(Debug, Clone, Default)]
pub struct Descriptor<'a> {
    pub entries: Vec<(&'a str, &'a str)>,
    /// Envoy's `limit` override: requests per unit.
    pub limit_override: Option<(u64, Unit)>,
    /// This descriptor's hits, overriding the request's; 0 checks without counting.
    pub hits_addend: Option<u64>,
    /// Give hits back instead of adding them (Envoy's `is_negative_hits`).
    pub negative: bool,
}

/// A ShouldRateLimit request: a domain and its descriptors.
#[derive(Debug, Clone, Default)]
pub struct RateLimitQuery<'a> {
    pub domain: &'a str,
    pub descriptors: Vec<Descriptor<'a>>,
    /// Hits per descriptor; 0 means 1 (protobuf cannot tell unset from 0 here).
    pub hits_addend: u64,
}

/// The limit a descriptor was counted against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedLimit {
    pub requests_per_unit: u64,
    pub unit: Unit,
    pub name: Option<String>,
}

/// One descriptor's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorAnswer {
    pub over_limit: bool,
    /// `None`: no limit applies (no rule, unlimited, or replaced).
    pub limit: Option<AppliedLimit>,
    /// Hits left (`u32::MAX`-like large value for unlimited rules is left to the gRPC layer).
    pub remaining: u64,
    pub reset_after: Option<u64>,
    /// The descriptor matched an `unlimited` rule.
    pub unlimited: bool,
}

impl DescriptorAnswer {
    /// A descriptor let through without being counted against `limit`: no limit applies, its
    /// hits were given back, or the limiter failed open.
    fn uncounted(limit: Option<AppliedLimit>) -> Self {
        DescriptorAnswer {
            over_limit: false,
            limit,
            remaining: 0,
            reset_after: None,
            unlimited: false,
        }
    }
}

/// The answer to a whole [`RateLimitQuery`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitAnswer {
    pub over_limit: bool,
    pub statuses: Vec<DescriptorAnswer>,
    /// Seconds until every refused descriptor would fit again.
    pub retry_after: Option<u64>,
}

/// A backend failed and its failure mode is `closed`: Envoy's filter decides (`failure_mode_deny`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// What one descriptor is counted against.
#[derive(Debug, Clone)]
enum Plan {
    NoLimit,
    Unlimited,
    Count {
        /// Names the counter without any long value a client sent (see `counter_key`).
        counter_key: String,
        rate: Rate,
        limit: AppliedLimit,
        shadow: bool,
        replaces: Vec<String>,
        /// The rule that matched, if one did: what logs name (never a descriptor's values).
        rule: Option<Arc<Rule>>,
    },
}

/// What ShouldRateLimit works with besides its settings and rules: the window limiter, the key
/// cache (for descriptors that name a key), the request log, the clock, the metrics and the
/// backends' failure policies.
pub struct RateLimitDeps {
    pub limiter: Arc<dyn WindowLimiter>,
    pub keys: Arc<KeyCache>,
    /// For descriptors that name an identity.
    pub identities: IdentityLimits,
    pub log: RequestLog,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub failures: FailurePolicies,
}

/// Decides ShouldRateLimit requests.
pub struct RateLimitService {
    rules: RwLock<Arc<Rules>>,
    deps: RateLimitDeps,
    algorithm: Algorithm,
    key_algorithm: Algorithm,
    default_per_minute: Option<u64>,
    global_shadow: bool,
    /// Paces the line logged when a descriptor goes over its limit in shadow mode.
    shadow_log: LogEvery,
}

impl RateLimitService {
    /// The service with the `ratelimit` settings and `rules`; `limits` holds the per-minute
    /// limit of keys without one of their own, and how their windows count.
    pub fn new(
        config: &RateLimitConfig,
        limits: &LimitsConfig,
        rules: Rules,
        deps: RateLimitDeps,
    ) -> Self {
        Self {
            rules: RwLock::new(Arc::new(rules)),
            deps,
            algorithm: config.algorithm,
            key_algorithm: limits.algorithm,
            default_per_minute: limits.default_per_minute,
            global_shadow: config.shadow_mode,
            shadow_log: LogEvery::default(),
        }
    }

    pub fn rules(&self) -> Arc<Rules> {
        self.rules.read().expect("rules lock").clone()
    }

    /// Swaps in new rules; requests in flight finish with the old ones.
    pub fn replace_rules(&self, rules: Rules) {
        *self.rules.write().expect("rules lock") = Arc::new(rules);
    }

    pub async fn should_rate_limit(
        &self,
        query: &RateLimitQuery<'_>,
    ) -> Result<RateLimitAnswer, Unavailable> {
        use tracing::Instrument;
        let started = std::time::Instant::now();
        let span = tracing::debug_span!(
            "should_rate_limit",
            domain = query.domain,
            over_limit = tracing::field::Empty
        );
        let answer = self.decide(query).instrument(span.clone()).await;
        if let Ok(a) = &answer
            && !span.is_disabled()
        {
            span.record("over_limit", a.over_limit);
            tracing::debug!(parent: &span, descriptors = a.statuses.len(), "decided");
        }
        self.deps.metrics.rls_duration.observe(started.elapsed());
        match &answer {
            Ok(a) if a.over_limit => self.deps.metrics.rls_requests_over_limit.inc(),
            Ok(_) => self.deps.metrics.rls_requests_ok.inc(),
            Err(_) => self.deps.metrics.rls_requests_unavailable.inc(),
        }
        answer
    }

    async fn decide(&self, query: &RateLimitQuery<'_>) -> Result<RateLimitAnswer, Unavailable> {
        let now = self.deps.clock.now();
        let rules = self.rules();
        let mut plans = Vec::with_capacity(query.descriptors.len());
        for d in &query.descriptors {
            plans.push(self.plan(&rules, query.domain, d).await?);
        }
        // A rule that another matched rule replaces does not apply to this request.
        let replaced: Vec<String> = plans
            .iter()
            .filter_map(|p| match p {
                Plan::Count { replaces, .. } => Some(replaces.iter().cloned()),
                _ => None,
            })
            .flatten()
            .collect();
        if !replaced.is_empty() {
            for p in plans.iter_mut() {
                if let Plan::Count { limit, .. } = p
                    && limit.name.as_ref().is_some_and(|n| replaced.contains(n))
                {
                    *p = Plan::NoLimit;
                }
            }
        }

        let request_hits = query.hits_addend.max(1);
        let mut statuses = Vec::with_capacity(plans.len());
        let mut counted: Vec<(String, Rate, u64)> = Vec::new();
        let mut over_limit = false;
        let mut retry_after: Option<u64> = None;
        for (d, plan) in query.descriptors.iter().zip(&plans) {
            let Plan::Count {
                counter_key,
                rate,
                limit,
                shadow,
                rule,
                ..
            } = plan
            else {
                statuses.push(DescriptorAnswer {
                    unlimited: matches!(plan, Plan::Unlimited),
                    ..DescriptorAnswer::uncounted(None)
                });
                continue;
            };
            let hits = d.hits_addend.unwrap_or(request_hits);
            if d.negative {
                if let Err(e) = self
                    .deps
                    .limiter
                    .refund(counter_key, *rate, hits, now)
                    .await
                {
                    tracing::warn!(error = %e, "rate limit refund failed");
                }
                statuses.push(DescriptorAnswer::uncounted(Some(limit.clone())));
                continue;
            }
            let step = std::time::Instant::now();
            let hit = self.deps.limiter.hit(counter_key, *rate, hits, now).await;
            self.deps.metrics.limiter_duration.observe(step.elapsed());
            let state = match hit {
                Ok(state) => state,
                Err(e) => match self.deps.failures.limiter.on_error("descriptor window", &e) {
                    Verdict::Closed => {
                        self.give_back(&counted, now).await;
                        return Err(Unavailable(e.to_string()));
                    }
                    Verdict::Open => {
                        statuses.push(DescriptorAnswer::uncounted(Some(limit.clone())));
                        continue;
                    }
                },
            };
            let refused = !state.allowed;
            let shadowed = refused && (*shadow || self.global_shadow);
            if shadowed {
                self.deps.metrics.rls_shadow.inc();
                if let Some(suppressed) = self.shadow_log.due() {
                    let rule = rule.as_ref().map_or("", |r| r.id.as_str());
                    tracing::info!(rule, suppressed, "over limit in shadow mode; allowed");
                }
            } else if refused {
                self.deps.metrics.rls_over_limit.inc();
                over_limit = true;
                retry_after = Some(retry_after.unwrap_or(0).max(state.reset_after));
            } else {
                self.deps.metrics.rls_ok.inc();
                if hits > 0 {
                    counted.push((counter_key.clone(), *rate, hits));
                }
            }
            statuses.push(DescriptorAnswer {
                over_limit: refused && !shadowed,
                limit: Some(limit.clone()),
                remaining: state.remaining,
                reset_after: Some(state.reset_after),
                unlimited: false,
            });
        }
        if over_limit {
            self.give_back(&counted, now).await;
        }
        // A call that names a key is that key's request: log it (it spends no quota).
        if let Some(key_id) = query
            .descriptors
            .iter()
            .find_map(|d| match d.entries.as_slice() {
                [(API_KEY_ENTRY, id)] => id.parse::<i64>().ok(),
                _ => None,
            })
        {
            self.deps.log.record(LogRow {
                ts: now,
                api: LogApi::RateLimit,
                request_id: None,
                decision_id: None,
                key_id: Some(key_id),
                method: None,
                path: None,
                host: None,
                client_addr: None,
                allowed: !over_limit,
                reason: if over_limit { "rate_limited" } else { "ok" },
                status: if over_limit { 429 } else { 200 },
                cost: 0,
                key_prefix: None,
                identity_id: None,
            });
        }
        Ok(RateLimitAnswer {
            over_limit,
            statuses,
            retry_after,
        })
    }

    /// Refunds hits counted for a request that is refused as a whole.
    async fn give_back(&self, counted: &[(String, Rate, u64)], now: DateTime<Utc>) {
        for (key, rate, hits) in counted {
            if let Err(e) = self.deps.limiter.refund(key, *rate, *hits, now).await {
                tracing::warn!(error = %e, "rate limit refund failed");
            }
        }
    }

    async fn plan(
        &self,
        rules: &Rules,
        domain: &str,
        d: &Descriptor<'_>,
    ) -> Result<Plan, Unavailable> {
        // Envoy's override wins, counted per domain and descriptor, in a domain the rules define:
        // envoyproxy/ratelimit looks the domain up first, and an unknown one has no limits.
        if let Some((requests_per_unit, unit)) = d.limit_override
            && rules.has_domain(domain)
        {
            let mut counter_key = String::from("override:");
            push_entries(&mut counter_key, domain, &d.entries);
            counter_key.push_str(&format!("|{requests_per_unit}/{}", unit.name()));
            return Ok(Plan::Count {
                counter_key: bounded(counter_key),
                rate: Rate::new(requests_per_unit, unit.seconds(), self.algorithm),
                limit: AppliedLimit {
                    requests_per_unit,
                    unit,
                    name: None,
                },
                shadow: false,
                replaces: Vec::new(),
                rule: None,
            });
        }
        if let Some(m) = rules.find(domain, &d.entries) {
            return Ok(match m.rule.limit {
                RuleLimit::Unlimited => Plan::Unlimited,
                RuleLimit::PerUnit {
                    requests_per_unit,
                    unit,
                } => Plan::Count {
                    counter_key: bounded(format!("rule:{}", m.counter_key)),
                    rate: Rate::new(
                        requests_per_unit,
                        unit.seconds(),
                        m.rule.algorithm.unwrap_or(self.algorithm),
                    ),
                    limit: AppliedLimit {
                        requests_per_unit,
                        unit,
                        name: m.rule.name.clone(),
                    },
                    shadow: m.rule.shadow_mode,
                    replaces: m.rule.replaces.clone(),
                    rule: Some(m.rule.clone()),
                },
            });
        }
        // A descriptor that is just the API key: that key's own per-minute limit, counted in
        // the same window Check uses.
        if let [(API_KEY_ENTRY, id)] = d.entries.as_slice()
            && let Ok(id) = id.parse::<i64>()
        {
            let key = match self.deps.keys.lookup_id(id).await {
                Ok(key) => key,
                Err(e) => {
                    return match self
                        .deps
                        .failures
                        .database
                        .on_error("descriptor key lookup", &e)
                    {
                        Verdict::Closed => Err(Unavailable(e.to_string())),
                        Verdict::Open => Ok(Plan::NoLimit),
                    };
                }
            };
            let Some(per_minute) =
                key.and_then(|k| k.limits().per_minute.or(self.default_per_minute))
            else {
                return Ok(Plan::NoLimit);
            };
            return Ok(Plan::Count {
                counter_key: format!("key:{id}"),
                rate: Rate::new(per_minute, 60, self.key_algorithm),
                limit: AppliedLimit {
                    requests_per_unit: per_minute,
                    unit: Unit::Minute,
                    name: Some("per_minute".into()),
                },
                shadow: false,
                replaces: Vec::new(),
                rule: None,
            });
        }
        // A descriptor that is just an identity: its shared per-minute limit, counted in the
        // window Check hits for every key of the identity.
        if let [(IDENTITY_ENTRY, id)] = d.entries.as_slice()
            && let Ok(id) = id.parse::<i64>()
        {
            let per_minute = match self.deps.identities.per_minute(id).await {
                Ok(v) => v,
                Err(e) => {
                    return match self
                        .deps
                        .failures
                        .database
                        .on_error("descriptor identity lookup", &e)
                    {
                        Verdict::Closed => Err(Unavailable(e.to_string())),
                        Verdict::Open => Ok(Plan::NoLimit),
                    };
                }
            };
            let Some(per_minute) = per_minute else {
                return Ok(Plan::NoLimit);
            };
            return Ok(Plan::Count {
                counter_key: crate::authz::identity_window_key(id),
                rate: Rate::new(per_minute, 60, self.key_algorithm),
                limit: AppliedLimit {
                    requests_per_unit: per_minute,
                    unit: Unit::Minute,
                    name: Some("identity_per_minute".into()),
                },
                shadow: false,
                replaces: Vec::new(),
                rule: None,
            });
        }
        Ok(Plan::NoLimit)
    }
}
