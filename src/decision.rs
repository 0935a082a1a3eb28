//! What a check decides, and the one place that turns a decision into what the client sees:
//! status, `Retry-After`, rate-limit headers and the RFC 9457 problem body (DESIGN rule 6).

use std::sync::Arc;

use serde_json::json;

use crate::keys::ApiKey;

/// The largest cost one request may have.
pub const MAX_COST: u64 = 1_000_000;

/// Which limit a [`LimitState`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    PerMinute,
    Daily,
    Monthly,
}

impl LimitKind {
    /// The name used in problem bodies and `RateLimit-Policy`.
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::PerMinute => "per_minute",
            LimitKind::Daily => "daily",
            LimitKind::Monthly => "monthly",
        }
    }
}

/// Whose limit a [`LimitState`] is: the key's own, or that of the identity the key belongs to
/// (shared by all its keys).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LimitScope {
    #[default]
    Key,
    Identity,
}

impl LimitScope {
    /// The name in problem bodies (`limit_scope`).
    pub fn name(self) -> &'static str {
        match self {
            LimitScope::Key => "key",
            LimitScope::Identity => "identity",
        }
    }
}

/// One limit as it stands after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    pub kind: LimitKind,
    /// The key's limit or its identity's.
    pub scope: LimitScope,
    pub limit: u64,
    pub remaining: u64,
    /// Whole seconds until it resets.
    pub reset_after: u64,
    /// Length of its window in seconds (60, 86400, the month's length).
    pub window_secs: u64,
}

impl LimitState {
    /// The name in `RateLimit-Policy` and `RateLimit`: the kind, prefixed `identity_` for an
    /// identity's limit (`identity_daily`).
    pub fn policy_name(&self) -> &'static str {
        match (self.scope, self.kind) {
            (LimitScope::Key, k) => k.name(),
            (LimitScope::Identity, LimitKind::PerMinute) => "identity_per_minute",
            (LimitScope::Identity, LimitKind::Daily) => "identity_daily",
            (LimitScope::Identity, LimitKind::Monthly) => "identity_monthly",
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    MissingKey,
    InvalidKey,
    KeyRevoked,
    KeyExpired,
    RateLimited,
    DailyQuotaExceeded,
    MonthlyQuotaExceeded,
    BackendUnavailable,
    /// The route's `cost` setting is not a count: the operator's mistake, not the client's.
    InvalidCost,
    /// The route needs a permission the key does not have.
    PermissionDenied,
}

impl DenyReason {
    pub const ALL: [DenyReason; 10] = [
        DenyReason::MissingKey,
        DenyReason::InvalidKey,
        DenyReason::KeyRevoked,
        DenyReason::KeyExpired,
        DenyReason::RateLimited,
        DenyReason::DailyQuotaExceeded,
        DenyReason::MonthlyQuotaExceeded,
        DenyReason::BackendUnavailable,
        DenyReason::InvalidCost,
        DenyReason::PermissionDenied,
    ];

    /// The stable machine code in the body's `error` field.
    pub fn code(self) -> &'static str {
        match self {
            DenyReason::MissingKey => "missing_key",
            DenyReason::InvalidKey => "invalid_key",
            DenyReason::KeyRevoked => "key_revoked",
            DenyReason::KeyExpired => "key_expired",
            DenyReason::RateLimited => "rate_limited",
            DenyReason::DailyQuotaExceeded => "daily_quota_exceeded",
            DenyReason::MonthlyQuotaExceeded => "monthly_quota_exceeded",
            DenyReason::BackendUnavailable => "backend_unavailable",
            DenyReason::InvalidCost => "invalid_cost",
            DenyReason::PermissionDenied => "permission_denied",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            DenyReason::MissingKey | DenyReason::InvalidKey => 401,
            DenyReason::KeyRevoked | DenyReason::KeyExpired | DenyReason::PermissionDenied => 403,
            DenyReason::RateLimited
            | DenyReason::DailyQuotaExceeded
            | DenyReason::MonthlyQuotaExceeded => 429,
            DenyReason::BackendUnavailable => 503,
            DenyReason::InvalidCost => 500,
        }
    }

    fn title(self) -> &'static str {
        match self.status() {
            401 => "Unauthorized",
            403 => "Forbidden",
            429 => "Too Many Requests",
            500 => "Internal Server Error",
            _ => "Service Unavailable",
        }
    }
}

/// A refusal, with everything the client is told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: DenyReason,
    /// Seconds until a retry may succeed (limits) or is worth trying (outages).
    pub retry_after: Option<u64>,
    /// The limit that was hit, for 429s.
    pub limit: Option<LimitState>,
    /// The key, when it was identified.
    pub key_id: Option<i64>,
    /// The permission the route needs and the key lacks, for `permission_denied`.
    pub permission: Option<String>,
}

impl Denial {
    pub fn new(reason: DenyReason) -> Self {
        Self {
            reason,
            retry_after: None,
            limit: None,
            key_id: None,
            permission: None,
        }
    }

    /// A human sentence for `detail`.
    pub fn detail(&self) -> String {
        let retry = self
            .retry_after
            .map(|s| format!(" Retry in {s} s."))
            .unwrap_or_default();
        let limit = self.limit.map(|l| l.limit).unwrap_or_default();
        let whose = match self.limit.map(|l| l.scope) {
            Some(LimitScope::Identity) => "The identity's shared ",
            _ => "",
        };
        let of_whose = |s: String| {
            if whose.is_empty() {
                s
            } else {
                let mut lower = s;
                lower[..1].make_ascii_lowercase();
                format!("{whose}{lower}")
            }
        };
        match self.reason {
            DenyReason::MissingKey => {
                "No API key: send it in the x-api-key header or as Authorization: Bearer <key>."
                    .into()
            }
            DenyReason::InvalidKey => "The API key is not valid.".into(),
            DenyReason::KeyRevoked => "The API key has been revoked.".into(),
            DenyReason::KeyExpired => "The API key has expired.".into(),
            DenyReason::RateLimited => of_whose(format!(
                "Rate limit of {limit} requests per minute exceeded.{retry}"
            )),
            DenyReason::DailyQuotaExceeded => of_whose(format!(
                "Daily quota of {limit} requests exceeded; it resets at 00:00 UTC.{retry}"
            )),
            DenyReason::MonthlyQuotaExceeded => of_whose(format!(
                "Monthly quota of {limit} requests exceeded; it resets on the 1st at 00:00 UTC.{retry}"
            )),
            DenyReason::BackendUnavailable => {
                format!(
                    "tollgate cannot reach its database or its rate-limit store to check this request.{retry}"
                )
            }
            DenyReason::PermissionDenied => format!(
                "The API key does not have the permission {:?}, which this route needs.",
                self.permission.as_deref().unwrap_or_default()
            ),
            DenyReason::InvalidCost => format!(
                "This route's cost setting is not a whole number from 0 to {MAX_COST}: \
                 fix the ext_authz context_extensions \"cost\" in Envoy's configuration."
            ),
        }
    }

    /// The RFC 9457 problem body.
    pub fn body(&self) -> String {
        let detail = self.detail();
        let mut body = json!({
            "type": format!("urn:tollgate:error:{}", self.reason.code()),
            "title": self.reason.title(),
            "status": self.reason.status(),
            "detail": detail,
            "error": self.reason.code(),
            "message": detail,
        });
        if let Some(s) = self.retry_after {
            body["retry_after"] = s.into();
        }
        if let Some(p) = &self.permission {
            body["permission"] = p.as_str().into();
        }
        if let Some(l) = self.limit {
            // Whose limit refused it: the key's own, or its identity's (shared by its keys).
            body["limit_scope"] = l.scope.name().into();
            body["limit"] = json!({
                "scope": l.scope.name(),
                "name": l.kind.name(),
                "limit": l.limit,
                "remaining": l.remaining,
                "reset": l.reset_after,
            });
        }
        body.to_string()
    }

    /// Headers of the denied response (besides the body's content type).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![
            ("content-type", "application/problem+json".to_string()),
            ("cache-control", "no-store".to_string()),
        ];
        match self.reason {
            DenyReason::MissingKey => {
                h.push(("www-authenticate", r#"Bearer realm="tollgate""#.into()))
            }
            DenyReason::InvalidKey => h.push((
                "www-authenticate",
                r#"Bearer realm="tollgate", error="invalid_token""#.into(),
            )),
            _ => {}
        }
        if let Some(s) = self.retry_after {
            h.push(("retry-after", s.to_string()));
        }
        if let Some(l) = self.limit {
            h.extend(rate_limit_headers(&[l]));
        }
        h
    }
}

/// Characters of a decision id: 32 lowercase hex digits.
pub const DECISION_ID_LEN: usize = 32;

/// Mints the id of one Check's decision: 48 bits of Unix milliseconds then 80 bits from the
/// thread's cryptographically secure generator, as 32 lowercase hex digits. It goes to Envoy in
/// the answer's dynamic metadata, never to the client, and Envoy's access log brings it back:
/// only it says which log row an access log entry completes (and refunds), so no value a
/// client chose decides billing. Unguessable, and unique across replicas without coordination;
/// the time in front says how recently it was minted and keeps the index in insertion order.
pub fn mint_decision_id() -> String {
    use rand::RngExt;
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
        & 0xffff_ffff_ffff;
    let random = rand::rng().random::<u128>() >> 48;
    // 48 bits of time, then 80 random bits: 128 bits, written as hex by hand into a buffer on
    // the stack (a fifth of what `format!` costs, on every Check).
    let bits = (u128::from(ms) << 80) | random;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; DECISION_ID_LEN];
    for (i, digit) in id.iter_mut().enumerate() {
        *digit = HEX[((bits >> (4 * (DECISION_ID_LEN - 1 - i))) & 0xf) as usize];
    }
    std::str::from_utf8(&id).expect("hex digits").to_owned()
}

/// When a decision id was minted, if `id` has the shape [`mint_decision_id`] gives.
pub fn decision_id_minted_at(id: &str) -> Option<std::time::SystemTime> {
    let well_formed = id.len() == DECISION_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !well_formed {
        return None;
    }
    let ms = u64::from_str_radix(&id[..12], 16).ok()?;
    std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms))
}

/// The outcome of a check.
#[derive(Debug, Clone)]
pub enum Decision {
    Allow(Allowed),
    Deny(Denial),
}

/// An admitted request.
#[derive(Debug, Clone)]
pub struct Allowed {
    pub key: Arc<ApiKey>,
    /// Every limit the key has, after this request.
    pub limits: Vec<LimitState>,
    /// The request header that carried the key (removed upstream with `hide_credentials`).
    pub credential_header: Arc<str>,
    /// What the request spent of the key's quota (0 when it was let in uncounted).
    pub cost: u64,
}

impl Decision {
    pub fn status(&self) -> u16 {
        match self {
            Decision::Allow(_) => 200,
            Decision::Deny(d) => d.reason.status(),
        }
    }

    pub fn reason_code(&self) -> &'static str {
        match self {
            Decision::Allow(_) => "ok",
            Decision::Deny(d) => d.reason.code(),
        }
    }
}

/// The limit closest to exhaustion: fewest remaining, then the latest reset.
pub fn closest(states: &[LimitState]) -> Option<&LimitState> {
    states.iter().min_by(|a, b| {
        a.remaining
            .cmp(&b.remaining)
            .then(b.reset_after.cmp(&a.reset_after))
    })
}

/// `X-RateLimit-*` (Reset in seconds from now, like Envoy's draft-03 headers) and the IETF draft
/// `RateLimit` for the limit closest to exhaustion; `RateLimit-Policy` lists every limit.
pub fn rate_limit_headers(states: &[LimitState]) -> Vec<(&'static str, String)> {
    let Some(c) = closest(states) else {
        return Vec::new();
    };
    use std::fmt::Write;
    let mut policy = String::with_capacity(40 * states.len());
    for (i, s) in states.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        // Writing to a String cannot fail.
        let _ = write!(
            policy,
            "{sep}\"{}\";q={};w={}",
            s.policy_name(),
            s.limit,
            s.window_secs
        );
    }
    vec![
        ("x-ratelimit-limit", c.limit.to_string()),
        ("x-ratelimit-remaining", c.remaining.to_string()),
        ("x-ratelimit-reset", c.reset_after.to_string()),
        ("ratelimit-policy", policy),
        (
            "ratelimit",
            format!(
                "\"{}\";r={};t={}",
                c.policy_name(),
                c.remaining,
                c.reset_after
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_ids_are_32_hex_digits_unique_and_say_when_they_were_minted() {
        let before = std::time::SystemTime::now() - std::time::Duration::from_millis(1);
        let ids: std::collections::HashSet<String> =
            (0..1000).map(|_| mint_decision_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), DECISION_ID_LEN);
            let at = decision_id_minted_at(id).unwrap();
            assert!(at >= before && at <= std::time::SystemTime::now(), "{id}");
        }
    }

    #[test]
    fn only_the_minted_shape_is_a_decision_id() {
        for bad in [
            "",
            "rid-1",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdef0",
            "0123456789ABCDEF0123456789ABCDEF",
            "0123456789abcdef0123456789abcdeg",
            "é123456789abcdef0123456789abcde",
        ] {
            assert!(decision_id_minted_at(bad).is_none(), "{bad:?}");
        }
        assert!(decision_id_minted_at("0123456789abcdef0123456789abcdef").is_some());
    }

    fn minute(remaining: u64, reset: u64) -> LimitState {
        LimitState {
            kind: LimitKind::PerMinute,
            limit: 100,
            remaining,
            reset_after: reset,
            window_secs: 60,
            scope: Default::default(),
        }
    }

    fn day(remaining: u64) -> LimitState {
        LimitState {
            kind: LimitKind::Daily,
            limit: 1000,
            remaining,
            reset_after: 3600,
            window_secs: 86_400,
            scope: Default::default(),
        }
    }

    fn header<'a>(h: &'a [(&'static str, String)], name: &str) -> Option<&'a str> {
        h.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn headers_describe_the_limit_closest_to_exhaustion() {
        let h = rate_limit_headers(&[minute(42, 18), day(7)]);
        assert_eq!(header(&h, "x-ratelimit-limit"), Some("1000"));
        assert_eq!(header(&h, "x-ratelimit-remaining"), Some("7"));
        assert_eq!(header(&h, "x-ratelimit-reset"), Some("3600"));
        assert_eq!(header(&h, "ratelimit"), Some("\"daily\";r=7;t=3600"));
        assert_eq!(
            header(&h, "ratelimit-policy"),
            Some("\"per_minute\";q=100;w=60, \"daily\";q=1000;w=86400")
        );
        let h = rate_limit_headers(&[minute(3, 18), day(7)]);
        assert_eq!(header(&h, "ratelimit"), Some("\"per_minute\";r=3;t=18"));
        assert!(rate_limit_headers(&[]).is_empty());
    }

    #[test]
    fn ties_pick_the_later_reset() {
        let states = [minute(0, 18), day(0)];
        assert_eq!(closest(&states).unwrap().kind, LimitKind::Daily);
    }

    #[test]
    fn rate_limited_body_and_headers() {
        let d = Denial {
            reason: DenyReason::RateLimited,
            retry_after: Some(23),
            limit: Some(minute(0, 23)),
            key_id: Some(9),
            permission: None,
        };
        let body: serde_json::Value = serde_json::from_str(&d.body()).unwrap();
        assert_eq!(body["status"], 429);
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(body["title"], "Too Many Requests");
        assert_eq!(body["type"], "urn:tollgate:error:rate_limited");
        assert_eq!(body["retry_after"], 23);
        assert_eq!(body["limit"]["name"], "per_minute");
        assert_eq!(body["limit"]["limit"], 100);
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("100 requests per minute")
        );
        let h = d.headers();
        assert_eq!(header(&h, "retry-after"), Some("23"));
        assert_eq!(header(&h, "content-type"), Some("application/problem+json"));
        assert_eq!(header(&h, "x-ratelimit-remaining"), Some("0"));
        assert_eq!(header(&h, "www-authenticate"), None);
    }

    #[test]
    fn every_reason_has_a_status_code_and_body() {
        for reason in DenyReason::ALL {
            let d = Denial::new(reason);
            let body: serde_json::Value = serde_json::from_str(&d.body()).unwrap();
            assert_eq!(body["status"], reason.status());
            assert_eq!(body["error"], reason.code());
            assert!(body.get("retry_after").is_none());
            let www = header(&d.headers(), "www-authenticate").is_some();
            assert_eq!(www, reason.status() == 401, "{reason:?}");
        }
    }
}
