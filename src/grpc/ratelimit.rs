//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`: translates a
//! `RateLimitRequest` into a [`RateLimitQuery`], asks [`RateLimitService`], translates the
//! [`RateLimitAnswer`] back. A backend failure whose failure mode is `closed` becomes gRPC
//! `UNAVAILABLE`, so Envoy's `failure_mode_deny` decides, as with any rate limit service.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ratelimit::v3::{
    RateLimitRequest, RateLimitResponse,
    rate_limit_response::{Code, DescriptorStatus, RateLimit, rate_limit::Unit as PbUnit},
    rate_limit_service_server::RateLimitService as RateLimitApi,
};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use tonic::{Request, Response};

use crate::ratelimit::rules::Unit;
use crate::ratelimit::service::{Descriptor, RateLimitAnswer, RateLimitQuery, RateLimitService};

/// The tonic service for ratelimit.v3.
pub struct RateLimitGrpc {
    service: Arc<RateLimitService>,
}

impl RateLimitGrpc {
    pub fn new(service: Arc<RateLimitService>) -> Self {
        Self { service }
    }
}

fn unit_from_pb(unit: i32) -> Option<Unit> {
    Some(match PbUnit::try_from(unit).ok()? {
        PbUnit::Second => Unit::Second,
        PbUnit::Minute => Unit::Minute,
        PbUnit::Hour => Unit::Hour,
        PbUnit::Day => Unit::Day,
        PbUnit::Week => Unit::Week,
        PbUnit::Month => Unit::Month,
        PbUnit::Year => Unit::Year,
        PbUnit::Unknown => return None,
    })
}

fn unit_to_pb(unit: Unit) -> PbUnit {
    match unit {
        Unit::Second => PbUnit::Second,
        Unit::Minute => PbUnit::Minute,
        Unit::Hour => PbUnit::Hour,
        Unit::Day => PbUnit::Day,
        Unit::Week => PbUnit::Week,
        Unit::Month => PbUnit::Month,
        Unit::Year => PbUnit::Year,
    }
}

fn clamp_u32(n: u64) -> u32 {
    n.min(u64::from(u32::MAX)) as u32
}

#[tonic::async_trait]
impl RateLimitApi for RateLimitGrpc {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, tonic::Status> {
        let request = request.into_inner();
        let descriptors = request
            .descriptors
            .iter()
            .map(|d| Descriptor {
                entries: d
                    .entries
                    .iter()
                    .map(|e| (e.key.as_str(), e.value.as_str()))
                    .collect(),
                limit_override: d.limit.as_ref().and_then(|l| {
                    let unit = unit_from_pb(l.unit);
                    if unit.is_none() {
                        tracing::warn!(
                            unit = l.unit,
                            "descriptor limit override without a valid unit; ignored"
                        );
                    }
                    unit.map(|u| (u64::from(l.requests_per_unit), u))
                }),
                hits_addend: d.hits_addend.map(|h| h.value),
                negative: d.is_negative_hits,
            })
            .collect();
        let query = RateLimitQuery {
            domain: &request.domain,
            descriptors,
            hits_addend: u64::from(request.hits_addend),
        };
        match self.service.should_rate_limit(&query).await {
            Ok(answer) => Ok(Response::new(response(&answer))),
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        }
    }
}

fn response(answer: &RateLimitAnswer) -> RateLimitResponse {
    let statuses = answer
        .statuses
        .iter()
        .map(|s| DescriptorStatus {
            code: if s.over_limit {
                Code::OverLimit
            } else {
                Code::Ok
            } as i32,
            current_limit: s.limit.as_ref().map(|l| RateLimit {
                name: l.name.clone().unwrap_or_default(),
                requests_per_unit: clamp_u32(l.requests_per_unit),
                unit: unit_to_pb(l.unit) as i32,
            }),
            // As envoyproxy/ratelimit: an unlimited rule reports u32::MAX left.
            limit_remaining: if s.unlimited {
                u32::MAX
            } else {
                clamp_u32(s.remaining)
            },
            duration_until_reset: s.reset_after.map(|secs| PbDuration {
                seconds: secs.min(i64::MAX as u64) as i64,
                nanos: 0,
            }),
            ..Default::default()
        })
        .collect();
    let response_headers_to_add = answer
        .retry_after
        .filter(|_| answer.over_limit)
        .map(|secs| {
            vec![HeaderValue {
                key: "retry-after".into(),
                value: secs.to_string(),
                raw_value: Vec::new(),
            }]
        })
        .unwrap_or_default();
    RateLimitResponse {
        overall_code: if answer.over_limit {
            Code::OverLimit
        } else {
            Code::Ok
        } as i32,
        statuses,
        response_headers_to_add,
        ..Default::default()
    }
}
