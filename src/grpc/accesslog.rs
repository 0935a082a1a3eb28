//! `envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`: Envoy's gRPC access logger
//! streams one entry per finished request; tollgate turns each into an [`Outcome`] (status,
//! duration, bytes) that completes the request-log row of the Check whose decision id the entry
//! carries in its dynamic metadata (`common_properties.metadata.filter_metadata`, namespace
//! `envoy.filters.http.ext_authz`, field `decision_id`). The entry's request id is the client's
//! own and decides nothing. An entry without a decision id completes nothing: it is counted as
//! unmatched at once and never queued, so a ratelimit-only deployment keeps none of them.
//!
//! The stream is long-lived; it ends when Envoy closes it or when tollgate starts shutting down,
//! so it never holds the shutdown up.

use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse, access_log_service_server::AccessLogService,
    stream_access_logs_message::LogEntries,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use envoy_types::pb::google::protobuf::value::Kind;

use crate::decision::decision_id_minted_at;
use crate::grpc::authz::{DECISION_ID_METADATA, EXT_AUTHZ_NAMESPACE};
use crate::reqlog::OutcomeLog;
use crate::store::Outcome;

/// The tonic service for the access log API.
pub struct AccessLogGrpc {
    outcomes: OutcomeLog,
    stop: CancellationToken,
}

impl AccessLogGrpc {
    pub fn new(outcomes: OutcomeLog, stop: CancellationToken) -> Self {
        Self { outcomes, stop }
    }
}

/// The outcome in one entry, if it carries a decision id tollgate minted and a response.
pub fn outcome(entry: &HttpAccessLogEntry) -> Option<Outcome> {
    let common = entry.common_properties.as_ref()?;
    let decision_id = match common
        .metadata
        .as_ref()?
        .filter_metadata
        .get(EXT_AUTHZ_NAMESPACE)?
        .fields
        .get(DECISION_ID_METADATA)?
        .kind
        .as_ref()?
    {
        Kind::StringValue(id) if decision_id_minted_at(id).is_some() => id.clone(),
        _ => return None,
    };
    let request = entry.request.as_ref();
    let response = entry.response.as_ref()?;
    let status = response.response_code.as_ref()?.value;
    let duration_ms = common.time_to_last_downstream_tx_byte.as_ref().map(|d| {
        (d.seconds.max(0) as u64)
            .saturating_mul(1000)
            .saturating_add(d.nanos.max(0) as u64 / 1_000_000)
    });
    Some(Outcome {
        decision_id,
        status: status.min(u32::from(u16::MAX)) as u16,
        duration_ms,
        // Sums of what a client sent: they saturate rather than overflow.
        bytes_received: request.map_or(0, |r| {
            r.request_headers_bytes.saturating_add(r.request_body_bytes)
        }),
        bytes_sent: response
            .response_headers_bytes
            .saturating_add(response.response_body_bytes),
    })
}

#[tonic::async_trait]
impl AccessLogService for AccessLogGrpc {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let mut stream = request.into_inner();
        loop {
            let message = tokio::select! {
                _ = self.stop.cancelled() => break,
                m = stream.message() => m?,
            };
            let Some(message) = message else { break };
            if let Some(LogEntries::HttpLogs(http)) = message.log_entries {
                for entry in &http.log_entry {
                    match outcome(entry) {
                        Some(o) => self.outcomes.record(o),
                        None => self.outcomes.unmatched(),
                    }
                }
            }
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::envoy::data::accesslog::v3::{
        AccessLogCommon, HttpRequestProperties, HttpResponseProperties,
    };
    use envoy_types::pb::google::protobuf::{Struct, UInt32Value, Value};

    /// Common properties whose ext_authz metadata has `decision_id` set to `id`.
    fn minted(id: &str) -> AccessLogCommon {
        let fields = [(
            DECISION_ID_METADATA.to_string(),
            Value {
                kind: Some(Kind::StringValue(id.into())),
            },
        )];
        AccessLogCommon {
            metadata: Some(Metadata {
                filter_metadata: [(
                    EXT_AUTHZ_NAMESPACE.to_string(),
                    Struct {
                        fields: fields.into(),
                    },
                )]
                .into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn answered(status: u32) -> Option<HttpResponseProperties> {
        Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: status }),
            ..Default::default()
        })
    }

    /// Sizes and durations a client made up, at their largest, give the largest outcome instead
    /// of an overflow.
    #[test]
    fn absurd_sizes_and_durations_saturate() {
        let id = crate::decision::mint_decision_id();
        let entry = HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                time_to_last_downstream_tx_byte: Some(
                    envoy_types::pb::google::protobuf::Duration {
                        seconds: i64::MAX,
                        nanos: i32::MAX,
                    },
                ),
                ..minted(&id)
            }),
            request: Some(HttpRequestProperties {
                request_id: "r".into(),
                request_headers_bytes: u64::MAX,
                request_body_bytes: u64::MAX,
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_headers_bytes: u64::MAX,
                response_body_bytes: 1,
                ..answered(u32::MAX).unwrap()
            }),
            ..Default::default()
        };
        let o = outcome(&entry).unwrap();
        assert_eq!(o.decision_id, id);
        assert_eq!(o.bytes_received, u64::MAX);
        assert_eq!(o.bytes_sent, u64::MAX);
        assert_eq!(o.duration_ms, Some(u64::MAX));
        assert_eq!(o.status, u16::MAX);
    }

    /// Only the id tollgate minted names a row: the client's request id, or anything in the
    /// metadata field that is not a minted id, names none.
    #[test]
    fn only_a_minted_decision_id_makes_an_outcome() {
        let by_request_id = HttpAccessLogEntry {
            request: Some(HttpRequestProperties {
                request_id: "rid-1".into(),
                ..Default::default()
            }),
            response: answered(500),
            ..Default::default()
        };
        assert_eq!(outcome(&by_request_id), None);
        for bad in ["rid-1", "", &"f".repeat(5000), "bad\0id"] {
            let entry = HttpAccessLogEntry {
                common_properties: Some(minted(bad)),
                response: answered(500),
                ..Default::default()
            };
            assert_eq!(outcome(&entry), None, "{bad:?}");
        }
        let id = crate::decision::mint_decision_id();
        let entry = HttpAccessLogEntry {
            common_properties: Some(minted(&id)),
            response: answered(503),
            ..Default::default()
        };
        let o = outcome(&entry).unwrap();
        assert_eq!((o.decision_id.as_str(), o.status), (id.as_str(), 503));
        // No response, no outcome.
        let entry = HttpAccessLogEntry {
            common_properties: Some(minted(&id)),
            ..Default::default()
        };
        assert_eq!(outcome(&entry), None);
    }
}
