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
        .map(|d| (d.seconds.max(0) as u64) * 1000 + (d.nanos.max(0) as u64) / 1_000_000);
    Some(Outcome {
        request_id: crate::reqlog::clip(&request.request_id),
        status: status.min(u32::from(u16::MAX)) as u16,
        duration_ms,
        bytes_received: request.request_headers_bytes + request.request_body_bytes,
        bytes_sent: response.response_headers_bytes + response.response_body_bytes,
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
