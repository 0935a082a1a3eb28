//! `envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`: Envoy's gRPC access logger
//! streams one entry per finished request; tollgate turns each into an [`Outcome`] (status,
//! duration, bytes) that completes the request-log row of the Check with the same request id.
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

/// The outcome in one entry, if it names a request and a response.
pub fn outcome(entry: &HttpAccessLogEntry) -> Option<Outcome> {
    let request = entry.request.as_ref()?;
    let response = entry.response.as_ref()?;
    if request.request_id.is_empty() {
        return None;
    }
    let status = response.response_code.as_ref()?.value;
    let duration_ms = entry
        .common_properties
        .as_ref()
        .and_then(|c| c.time_to_last_downstream_tx_byte.as_ref())
        .map(|d| {
            (d.seconds.max(0) as u64)
                .saturating_mul(1000)
                .saturating_add(d.nanos.max(0) as u64 / 1_000_000)
        });
    Some(Outcome {
        // Cleaned as the Check row's request id was, so the two still match.
        request_id: crate::reqlog::clean(&request.request_id),
        status: status.min(u32::from(u16::MAX)) as u16,
        duration_ms,
        // Sums of what a client sent: they saturate rather than overflow.
        bytes_received: request
            .request_headers_bytes
            .saturating_add(request.request_body_bytes),
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
                    if let Some(o) = outcome(entry) {
                        self.outcomes.record(o);
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
    use envoy_types::pb::envoy::data::accesslog::v3::{
        AccessLogCommon, HttpRequestProperties, HttpResponseProperties,
    };

    /// Sizes and durations a client made up, at their largest, give the largest outcome instead
    /// of an overflow.
    #[test]
    fn absurd_sizes_and_durations_saturate() {
        let entry = HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                time_to_last_downstream_tx_byte: Some(
                    envoy_types::pb::google::protobuf::Duration {
                        seconds: i64::MAX,
                        nanos: i32::MAX,
                    },
                ),
                ..Default::default()
            }),
            request: Some(HttpRequestProperties {
                request_id: "r".into(),
                request_headers_bytes: u64::MAX,
                request_body_bytes: u64::MAX,
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: Some(envoy_types::pb::google::protobuf::UInt32Value {
                    value: u32::MAX,
                }),
                response_headers_bytes: u64::MAX,
                response_body_bytes: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let o = outcome(&entry).unwrap();
        assert_eq!(o.bytes_received, u64::MAX);
        assert_eq!(o.bytes_sent, u64::MAX);
        assert_eq!(o.duration_ms, Some(u64::MAX));
        assert_eq!(o.status, u16::MAX);
    }

    /// The request id is cleaned as the Check row's was, so the outcome still finds the row.
    #[test]
    fn the_request_id_is_cleaned_as_the_rows_is() {
        let raw = format!("bad\0id{}", "x".repeat(5000));
        let entry = HttpAccessLogEntry {
            request: Some(HttpRequestProperties {
                request_id: raw.clone(),
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 200 }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let o = outcome(&entry).unwrap();
        assert_eq!(o.request_id, crate::reqlog::clean(&raw));
        assert!(o.request_id.starts_with("bad\u{FFFD}id") && o.request_id.len() <= 2048);
    }
}
