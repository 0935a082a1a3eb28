//! The admin API's gRPC service: turns `tollgate.admin.v1` messages into [`KeyAdmin`] calls and
//! the answers back, maps errors to gRPC codes, and logs and counts every call. The REST side
//! (`admin::rest`) calls these same methods, so both transports share one translation.
//!
//! Who called, and over which transport, arrive in the request's extensions, put there by the
//! admin port's authentication (`admin::authenticate`); a request without them is refused.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use prost_types::{FieldMask, Timestamp};
use tonic::{Request, Response, Status};

use crate::admin::auth::Caller;
use crate::admin::pb::{self, admin_service_server::AdminService};
use crate::admin::service::{
    AdminError, DEFAULT_GRACE, KeyAdmin, KeyListing, MAX_NAME_CHARS, NewKeySpec, UsageReport,
    status_at,
};
use crate::clock::Clock;
use crate::keys::{ApiKey, Limits};
use crate::store::{Identity, IdentityLimitsPatch, KeyUpdate, LimitsPatch, StatusFilter, Usage};
use crate::telemetry::Metrics;

/// Which transport a call came over, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Rest,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Rest => "rest",
        }
    }
}

/// The gRPC name of a code, as metrics label it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
        Unknown => "unknown",
    }
}

/// The admin service, as tonic serves it.
#[derive(Clone)]
pub struct AdminGrpc {
    admin: KeyAdmin,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

impl AdminGrpc {
    pub fn new(admin: KeyAdmin, clock: Arc<dyn Clock>, metrics: Arc<Metrics>) -> Self {
        AdminGrpc {
            admin,
            clock,
            metrics,
        }
    }

    /// Runs one call: checks who called, runs `op`, logs and counts the outcome.
    async fn call<T, R, F>(
        &self,
        method: &'static str,
        request: Request<T>,
        key_id: impl Fn(&T) -> Option<i64>,
        op: impl FnOnce(T) -> F,
    ) -> Result<Response<R>, Status>
    where
        F: Future<Output = Result<(R, Option<i64>), Status>>,
    {
        let transport = request
            .extensions()
            .get::<Transport>()
            .copied()
            .unwrap_or(Transport::Grpc);
        let Some(caller) = request.extensions().get::<Caller>().cloned() else {
            // Only a server built without the authentication layer gets here.
            self.metrics
                .admin
                .inc((method, transport.as_str(), "unauthenticated"));
            return Err(Status::unauthenticated("admin credentials required"));
        };
        let message = request.into_inner();
        let asked = key_id(&message);
        let result = op(message).await;
        let (code, key) = match &result {
            Ok((_, id)) => (tonic::Code::Ok, id.or(asked)),
            Err(s) => (s.code(), asked),
        };
        self.metrics
            .admin
            .inc((method, transport.as_str(), code_name(code)));
        match &result {
            Ok(_) => tracing::info!(
                target: "tollgate::admin",
                %caller, transport = transport.as_str(), method, key_id = key,
                "admin call"
            ),
            Err(s) => tracing::info!(
                target: "tollgate::admin",
                %caller, transport = transport.as_str(), method, key_id = key,
                code = code_name(code), error = s.message(),
                "admin call refused"
            ),
        }
        result.map(|(r, _)| Response::new(r))
    }

    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    fn key(&self, key: &ApiKey) -> pb::Key {
        key_message(key, self.admin.effective_per_minute(key), self.now())
    }
}

#[tonic::async_trait]
impl AdminService for AdminGrpc {
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        self.call(
            "CreateKey",
            request,
            |_| None,
            |r| async move {
                let spec = NewKeySpec {
                    name: r.name,
                    limits: limits_from(r.limits.unwrap_or_default())?,
                    expires_at: r.expires_at.map(time_from).transpose()?,
                    permissions: r.permissions,
                    metadata: r.metadata.into_iter().collect(),
                    identity_id: r.identity_id,
                };
                let created = self
                    .admin
                    .create(spec, self.now())
                    .await
                    .map_err(status_of)?;
                let id = created.key.id;
                Ok((
                    pb::CreateKeyResponse {
                        key: Some(self.key(&created.key)),
                        secret: created.secret,
                    },
                    Some(id),
                ))
            },
        )
        .await
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.call(
            "GetKey",
            request,
            |r| Some(r.id),
            |r| async move {
                let key = self.admin.get(r.id).await.map_err(status_of)?;
                Ok((self.key(&key), None))
            },
        )
        .await
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.call(
            "ListKeys",
            request,
            |_| None,
            |r| async move {
                let page_size = u32::try_from(r.page_size)
                    .map_err(|_| Status::invalid_argument("page_size: must not be negative"))?;
                let status = match pb::KeyStatus::try_from(r.status) {
                    Ok(pb::KeyStatus::Unspecified) => None,
                    Ok(pb::KeyStatus::Active) => Some(StatusFilter::Active),
                    Ok(pb::KeyStatus::Revoked) => Some(StatusFilter::Revoked),
                    Ok(pb::KeyStatus::Expired) => Some(StatusFilter::Expired),
                    Err(_) => {
                        return Err(Status::invalid_argument(format!(
                            "status: {} is not a KeyStatus",
                            r.status
                        )));
                    }
                };
                let name_prefix = (!r.name_prefix.is_empty()).then_some(r.name_prefix);
                let filter = PageFilter {
                    status: r.status,
                    name_prefix: name_prefix.as_deref().unwrap_or(""),
                    identity_id: r.identity_id,
                };
                let after_id = match r.page_token.as_str() {
                    "" => 0,
                    token => filter.after_id(token)?,
                };
                let listing = KeyListing {
                    page_size,
                    after_id,
                    status,
                    name_prefix: name_prefix.clone(),
                    identity_id: r.identity_id,
                };
                let page = self
                    .admin
                    .list(&listing, self.now())
                    .await
                    .map_err(status_of)?;
                Ok((
                    pb::ListKeysResponse {
                        keys: page.keys.iter().map(|k| self.key(k)).collect(),
                        next_page_token: page
                            .next_after_id
                            .map(|id| filter.token(id))
                            .unwrap_or_default(),
                    },
                    None,
                ))
            },
        )
        .await
    }

    async fn update_key(
        &self,
        request: Request<pb::UpdateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.call(
            "UpdateKey",
            request,
            |r| Some(r.id),
            |r| async move {
                let id = r.id;
                let update = update_from(r)?;
                let key = self
                    .admin
                    .update(id, update, self.now())
                    .await
                    .map_err(status_of)?;
                Ok((self.key(&key), None))
            },
        )
        .await
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        self.call(
            "RevokeKey",
            request,
            |r| Some(r.id),
            |r| async move {
                let key = self
                    .admin
                    .revoke(r.id, self.now())
                    .await
                    .map_err(status_of)?;
                Ok((self.key(&key), None))
            },
        )
        .await
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        self.call(
            "RotateKey",
            request,
            |r| Some(r.id),
            |r| async move {
                let grace = match r.grace {
                    None => DEFAULT_GRACE,
                    Some(d) => u64::try_from(d.seconds)
                        .ok()
                        .zip(u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000))
                        .map(|(s, n)| std::time::Duration::new(s, n))
                        .ok_or_else(|| {
                            Status::invalid_argument("grace: must be a duration of at least 0")
                        })?,
                };
                let rotated = self
                    .admin
                    .rotate(r.id, grace, self.now())
                    .await
                    .map_err(status_of)?;
                Ok((
                    pb::RotateKeyResponse {
                        key: Some(self.key(&rotated.key)),
                        secret: rotated.secret,
                        old_key_expires_at: Some(timestamp(rotated.old_key_expires_at)),
                    },
                    None,
                ))
            },
        )
        .await
    }

    async fn get_key_usage(
        &self,
        request: Request<pb::GetKeyUsageRequest>,
    ) -> Result<Response<pb::KeyUsage>, Status> {
        self.call(
            "GetKeyUsage",
            request,
            |r| Some(r.id),
            |r| async move {
                let days = u32::try_from(r.days)
                    .map_err(|_| Status::invalid_argument("days: must not be negative"))?;
                let report = self
                    .admin
                    .usage(r.id, days, self.now())
                    .await
                    .map_err(status_of)?;
                let (today, this_month, total, days) = usage_fields(report);
                Ok((
                    pb::KeyUsage {
                        key_id: r.id,
                        today,
                        this_month,
                        total,
                        days,
                    },
                    None,
                ))
            },
        )
        .await
    }

    async fn create_identity(
        &self,
        request: Request<pb::CreateIdentityRequest>,
    ) -> Result<Response<pb::Identity>, Status> {
        self.call(
            "CreateIdentity",
            request,
            |_| None,
            |r| async move {
                let l = r.limits.unwrap_or_default();
                let limits = IdentityLimitsPatch {
                    per_minute: Some(limit_from("limits.per_minute", l.per_minute)?),
                    daily: Some(limit_from("limits.daily", l.daily)?),
                    monthly: Some(limit_from("limits.monthly", l.monthly)?),
                };
                let identity = self
                    .admin
                    .create_identity(&r.name, limits, self.now())
                    .await
                    .map_err(status_of)?;
                Ok((identity_message(&identity, Usage::default()), None))
            },
        )
        .await
    }

    async fn get_identity(
        &self,
        request: Request<pb::GetIdentityRequest>,
    ) -> Result<Response<pb::Identity>, Status> {
        self.call(
            "GetIdentity",
            request,
            |_| None,
            |r| async move {
                let identity = self.admin.get_identity(r.id).await.map_err(status_of)?;
                let usage = self
                    .admin
                    .identity_usage(r.id, self.now())
                    .await
                    .map_err(status_of)?;
                Ok((identity_message(&identity, usage), None))
            },
        )
        .await
    }

    async fn get_identity_usage(
        &self,
        request: Request<pb::GetIdentityUsageRequest>,
    ) -> Result<Response<pb::IdentityUsage>, Status> {
        self.call(
            "GetIdentityUsage",
            request,
            |_| None,
            |r| async move {
                let days = u32::try_from(r.days)
                    .map_err(|_| Status::invalid_argument("days: must not be negative"))?;
                let report = self
                    .admin
                    .identity_usage_report(r.id, days, self.now())
                    .await
                    .map_err(status_of)?;
                let (today, this_month, total, days) = usage_fields(report);
                Ok((
                    pb::IdentityUsage {
                        identity_id: r.id,
                        today,
                        this_month,
                        total,
                        days,
                    },
                    None,
                ))
            },
        )
        .await
    }

    async fn list_identities(
        &self,
        request: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, Status> {
        self.call(
            "ListIdentities",
            request,
            |_| None,
            |r| async move {
                let page_size = u32::try_from(r.page_size)
                    .map_err(|_| Status::invalid_argument("page_size: must not be negative"))?;
                let after_id = match r.page_token.as_str() {
                    "" => 0,
                    token => IDENTITY_PAGES.after_id(token)?,
                };
                let page = self
                    .admin
                    .list_identities(page_size, after_id)
                    .await
                    .map_err(status_of)?;
                let now = self.now();
                let mut identities = Vec::with_capacity(page.identities.len());
                for i in &page.identities {
                    let usage = self
                        .admin
                        .identity_usage(i.id, now)
                        .await
                        .map_err(status_of)?;
                    identities.push(identity_message(i, usage));
                }
                Ok((
                    pb::ListIdentitiesResponse {
                        identities,
                        next_page_token: page
                            .next_after_id
                            .map(|id| IDENTITY_PAGES.token(id))
                            .unwrap_or_default(),
                    },
                    None,
                ))
            },
        )
        .await
    }

    async fn update_identity_limits(
        &self,
        request: Request<pb::UpdateIdentityLimitsRequest>,
    ) -> Result<Response<pb::Identity>, Status> {
        self.call(
            "UpdateIdentityLimits",
            request,
            |_| None,
            |r| async move {
                let patch = identity_patch_from(&r)?;
                let now = self.now();
                let identity = self
                    .admin
                    .set_identity_limits(r.id, patch, now)
                    .await
                    .map_err(status_of)?;
                let usage = self
                    .admin
                    .identity_usage(r.id, now)
                    .await
                    .map_err(status_of)?;
                Ok((identity_message(&identity, usage), None))
            },
        )
        .await
    }

    async fn delete_identity(
        &self,
        request: Request<pb::DeleteIdentityRequest>,
    ) -> Result<Response<pb::DeleteIdentityResponse>, Status> {
        self.call(
            "DeleteIdentity",
            request,
            |_| None,
            |r| async move {
                self.admin
                    .delete_identity(r.id, self.now())
                    .await
                    .map_err(status_of)?;
                Ok((pb::DeleteIdentityResponse {}, None))
            },
        )
        .await
    }
}

/// An [`AdminError`] as gRPC says it. Database errors name only their kind: the database's own
/// message may quote values.
pub(crate) fn status_of(e: AdminError) -> Status {
    match e {
        AdminError::NotFound(_) | AdminError::IdentityNotFound(_) => {
            Status::not_found(e.to_string())
        }
        AdminError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        AdminError::Store(s) if s.is_transient() => {
            tracing::warn!(error = %s.kind(), "admin call: database unavailable");
            Status::unavailable("the database is unavailable; retry later")
        }
        AdminError::Store(s) => {
            tracing::error!(error = %s.kind(), "admin call: database error");
            Status::internal("database error")
        }
    }
}

/// A stored key as the API shows it.
pub(crate) fn key_message(
    key: &ApiKey,
    effective_per_minute: Option<u64>,
    now: DateTime<Utc>,
) -> pb::Key {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    pb::Key {
        id: key.id,
        name: key.name.to_string(),
        prefix: key.prefix.to_string(),
        status: match status_at(key, now) {
            StatusFilter::Active => pb::KeyStatus::Active,
            StatusFilter::Revoked => pb::KeyStatus::Revoked,
            StatusFilter::Expired => pb::KeyStatus::Expired,
        } as i32,
        limits: Some(pb::Limits {
            per_minute: key.limits().per_minute.map(count),
            daily: key.limits().daily.map(count),
            monthly: key.limits().monthly.map(count),
            refund_5xx: Some(key.limits().refund_5xx),
        }),
        effective_per_minute: effective_per_minute.map(count),
        expires_at: key.expires_at.map(timestamp),
        permissions: key.permissions.to_vec(),
        metadata: key
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        old_prefix: key
            .old_secret
            .as_ref()
            .map(|o| o.prefix.clone())
            .unwrap_or_default(),
        old_key_expires_at: key.old_secret.as_ref().map(|o| timestamp(o.expires_at)),
        identity_id: key.identity.as_deref().map(|i| i.id),
    }
}

fn identity_message(identity: &Identity, usage: Usage) -> pb::Identity {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    pb::Identity {
        id: identity.id,
        name: identity.name.clone(),
        limits: Some(pb::IdentityLimits {
            per_minute: identity.per_minute.map(count),
            daily: identity.daily.map(count),
            monthly: identity.monthly.map(count),
        }),
        created_at: Some(timestamp(identity.created_at)),
        today: count(usage.daily),
        this_month: count(usage.monthly),
        total: count(usage.total),
    }
}

/// A usage report as KeyUsage and IdentityUsage carry it: today, this month, in all, and the
/// days.
fn usage_fields(report: UsageReport) -> (i64, i64, i64, Vec<pb::DayUsage>) {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let days = report
        .days
        .into_iter()
        .map(|d| pb::DayUsage {
            day: d.day,
            allowed: count(d.allowed),
            denied: count(d.denied),
        })
        .collect();
    (
        count(report.counters.daily),
        count(report.counters.monthly),
        count(report.counters.total),
        days,
    )
}

/// What an UpdateIdentityLimitsRequest changes: the limits its mask names, or, without a mask,
/// those it has.
fn identity_patch_from(r: &pb::UpdateIdentityLimitsRequest) -> Result<IdentityLimitsPatch, Status> {
    let limits = r.limits.unwrap_or_default();
    let mask = r.update_mask.clone().unwrap_or_default();
    if mask.paths.is_empty() {
        return Ok(IdentityLimitsPatch {
            per_minute: limit_from("limits.per_minute", limits.per_minute)?.map(Some),
            daily: limit_from("limits.daily", limits.daily)?.map(Some),
            monthly: limit_from("limits.monthly", limits.monthly)?.map(Some),
        });
    }
    const PATHS: [&str; 4] = [
        "limits",
        "limits.per_minute",
        "limits.daily",
        "limits.monthly",
    ];
    let mut patch = IdentityLimitsPatch::default();
    for path in mask.paths.iter().take(PATHS.len() + 1) {
        if !PATHS.contains(&path.as_str()) {
            let shown: String = path.chars().take(64).collect();
            return Err(Status::invalid_argument(format!(
                "update_mask: {shown:?} is not a field that can be changed (use {})",
                PATHS.join(", ")
            )));
        }
        let all = path == "limits";
        if all || path == "limits.per_minute" {
            patch.per_minute = Some(limit_from("limits.per_minute", limits.per_minute)?);
        }
        if all || path == "limits.daily" {
            patch.daily = Some(limit_from("limits.daily", limits.daily)?);
        }
        if all || path == "limits.monthly" {
            patch.monthly = Some(limit_from("limits.monthly", limits.monthly)?);
        }
    }
    Ok(patch)
}

/// The filter identity page tokens are made with (never valid for a key listing).
const IDENTITY_PAGES: PageFilter<'static> = PageFilter {
    status: -1,
    name_prefix: "identities",
    identity_id: None,
};

fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// A limit as the domain takes it: the API's int64 must be a count (0 and negatives are
/// refused by the domain's own check, with its message).
fn limit_from(field: &str, v: Option<i64>) -> Result<Option<u64>, Status> {
    match v {
        Some(n) if n < 0 => Err(Status::invalid_argument(format!(
            "{field}: {n} is not a limit: use a count of at least 1, or none for unlimited"
        ))),
        Some(n) => Ok(Some(n as u64)),
        None => Ok(None),
    }
}

fn limits_from(l: pb::Limits) -> Result<Limits, Status> {
    Ok(Limits {
        per_minute: limit_from("limits.per_minute", l.per_minute)?,
        daily: limit_from("limits.daily", l.daily)?,
        monthly: limit_from("limits.monthly", l.monthly)?,
        refund_5xx: l.refund_5xx.unwrap_or(false),
    })
}

fn time_from(t: Timestamp) -> Result<DateTime<Utc>, Status> {
    u32::try_from(t.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .ok_or_else(|| Status::invalid_argument("expires_at: not a valid time"))
}

/// What an UpdateKeyRequest changes: the fields its mask names, or, without a mask, the fields
/// it has.
fn update_from(r: pb::UpdateKeyRequest) -> Result<KeyUpdate, Status> {
    let limits = r.limits.unwrap_or_default();
    let mask = r.update_mask.unwrap_or_default();
    let mut update = KeyUpdate::default();
    if mask.paths.is_empty() {
        update.name = r.name;
        update.expires_at = r.expires_at.map(time_from).transpose()?.map(Some);
        update.permissions = (!r.permissions.is_empty()).then_some(r.permissions);
        update.metadata = (!r.metadata.is_empty()).then(|| r.metadata.into_iter().collect());
        update.identity_id = r.identity_id.map(Some);
        update.limits = LimitsPatch {
            per_minute: limit_from("limits.per_minute", limits.per_minute)?.map(Some),
            daily: limit_from("limits.daily", limits.daily)?.map(Some),
            monthly: limit_from("limits.monthly", limits.monthly)?.map(Some),
            refund_5xx: limits.refund_5xx,
        };
        return Ok(update);
    }
    check_mask(&mask)?;
    for path in &mask.paths {
        let all = path == "limits";
        match path.as_str() {
            "name" => {
                update.name = Some(r.name.clone().ok_or_else(|| {
                    Status::invalid_argument("name: named in update_mask but absent")
                })?);
            }
            "expires_at" => {
                update.expires_at = Some(r.expires_at.map(time_from).transpose()?);
            }
            "permissions" => update.permissions = Some(r.permissions.clone()),
            "identity_id" => update.identity_id = Some(r.identity_id),
            "metadata" => {
                update.metadata = Some(
                    r.metadata
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                );
            }
            _ => {}
        }
        if all || path == "limits.per_minute" {
            update.limits.per_minute = Some(limit_from("limits.per_minute", limits.per_minute)?);
        }
        if all || path == "limits.daily" {
            update.limits.daily = Some(limit_from("limits.daily", limits.daily)?);
        }
        if all || path == "limits.monthly" {
            update.limits.monthly = Some(limit_from("limits.monthly", limits.monthly)?);
        }
        if all || path == "limits.refund_5xx" {
            update.limits.refund_5xx = Some(limits.refund_5xx.unwrap_or(false));
        }
    }
    Ok(update)
}

/// The paths an update mask may name.
const MASK_PATHS: [&str; 10] = [
    "name",
    "permissions",
    "metadata",
    "identity_id",
    "expires_at",
    "limits",
    "limits.per_minute",
    "limits.daily",
    "limits.monthly",
    "limits.refund_5xx",
];

fn check_mask(mask: &FieldMask) -> Result<(), Status> {
    if mask.paths.len() > MASK_PATHS.len() {
        return Err(Status::invalid_argument(
            "update_mask: names more paths than there are",
        ));
    }
    for path in &mask.paths {
        if !MASK_PATHS.contains(&path.as_str()) {
            let shown: String = path.chars().take(64).collect();
            return Err(Status::invalid_argument(format!(
                "update_mask: {shown:?} is not a field that can be changed (use {})",
                MASK_PATHS.join(", ")
            )));
        }
    }
    Ok(())
}

/// The filters a page token belongs to: a token is only valid with the filters it was made
/// with, so a page never mixes two listings.
struct PageFilter<'a> {
    status: i32,
    name_prefix: &'a str,
    identity_id: Option<i64>,
}

/// Page tokens start with this (a version, so their format can change).
const TOKEN_PREFIX: &str = "p1.";

impl PageFilter<'_> {
    /// 16 hex digits of the SHA-256 of the filters.
    fn digest(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.status.to_be_bytes());
        h.update(self.name_prefix.as_bytes());
        if let Some(id) = self.identity_id {
            h.update(b"\0identity");
            h.update(id.to_be_bytes());
        }
        crate::keys::hash_hex(&h.finalize().into())[..16].to_string()
    }

    /// The token of the page after key `after_id`: opaque to clients, `p1.<id>.<filters>`.
    fn token(&self, after_id: i64) -> String {
        format!("{TOKEN_PREFIX}{after_id}.{}", self.digest())
    }

    fn after_id(&self, token: &str) -> Result<i64, Status> {
        let invalid = || {
            Status::invalid_argument(
                "page_token: not a next_page_token of this listing (same filters)",
            )
        };
        if token.len() > 64 {
            return Err(invalid());
        }
        let (id, digest) = token
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|rest| rest.split_once('.'))
            .ok_or_else(invalid)?;
        let id: i64 = id.parse().map_err(|_| invalid())?;
        if id < 0 || digest != self.digest() {
            return Err(invalid());
        }
        Ok(id)
    }
}

// The name bound is the domain's; the proto's comments state it too.
const _: () = assert!(MAX_NAME_CHARS == 200);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_belong_to_their_filters() {
        let all = PageFilter {
            status: 0,
            name_prefix: "",
            identity_id: None,
        };
        let alpha = PageFilter {
            status: 0,
            name_prefix: "alpha",
            identity_id: None,
        };
        let of_identity = |id| PageFilter {
            status: 0,
            name_prefix: "",
            identity_id: Some(id),
        };
        let t = all.token(42);
        assert_eq!(all.after_id(&t).unwrap(), 42);
        assert!(alpha.after_id(&t).is_err());
        assert!(of_identity(7).after_id(&t).is_err());
        let t7 = of_identity(7).token(42);
        assert_eq!(of_identity(7).after_id(&t7).unwrap(), 42);
        assert!(of_identity(8).after_id(&t7).is_err());
        assert!(all.after_id(&t7).is_err());
        for bad in [
            "",
            "42",
            "p1.x.y",
            "p1.-1.abc",
            &format!("{t}0"),
            &"p".repeat(100),
        ] {
            assert!(all.after_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn masks_name_what_changes() {
        let r = pb::UpdateKeyRequest {
            id: 1,
            limits: Some(pb::Limits {
                daily: Some(10),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec![
                    "limits.daily".into(),
                    "limits.monthly".into(),
                    "expires_at".into(),
                ],
            }),
            ..Default::default()
        };
        let u = update_from(r).unwrap();
        assert_eq!(u.limits.daily, Some(Some(10)));
        assert_eq!(u.limits.monthly, Some(None));
        assert_eq!(u.limits.per_minute, None);
        assert_eq!(u.expires_at, Some(None));
        assert_eq!(u.name, None);
        // Without a mask: what is present.
        let u = update_from(pb::UpdateKeyRequest {
            name: Some("n".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(u.name.as_deref(), Some("n"));
        assert!(u.limits == LimitsPatch::default() && u.expires_at.is_none());
        let bad = pb::UpdateKeyRequest {
            update_mask: Some(FieldMask {
                paths: vec!["prefix".into()],
            }),
            ..Default::default()
        };
        assert_eq!(
            update_from(bad).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
