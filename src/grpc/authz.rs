//! `envoy.service.auth.v3.Authorization/Check`: translates a `CheckRequest` into a
//! [`CheckInput`], asks [`AuthzService`], and translates the [`Decision`] back.
//!
//! Anything a request lacks (no attributes, no HTTP part, a field or header that is not UTF-8)
//! simply reads as absent: the answer is always a well-formed allow or deny, never an error or a
//! panic. The request is decoded as [`check_request`]'s lean messages.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse, check_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status;

use super::check_request::{self, Authorization, CheckRequest, Entry, HttpRequest, lookup, text};
use crate::authz::{AuthzService, CheckInput};
use crate::decision::{Allowed, Decision, Denial, DenyReason, rate_limit_headers};

/// google.rpc.Code values Envoy sees in `CheckResponse.status`.
const OK: i32 = 0;
const PERMISSION_DENIED: i32 = 7;
const RESOURCE_EXHAUSTED: i32 = 8;
const INTERNAL: i32 = 13;
const UNAVAILABLE: i32 = 14;
const UNAUTHENTICATED: i32 = 16;

/// The namespace Envoy's ext_authz filter files tollgate's dynamic metadata under; its access
/// log carries it in `common_properties.metadata.filter_metadata`.
pub const EXT_AUTHZ_NAMESPACE: &str = "envoy.filters.http.ext_authz";

/// The dynamic metadata field with the id tollgate minted for the decision.
pub const DECISION_ID_METADATA: &str = "decision_id";

/// The ext_authz `context_extensions` entry (set per route in Envoy) with a request's cost.
pub const COST_EXTENSION: &str = "cost";

/// The ext_authz `context_extensions` entry (set per route in Envoy) naming the permission a
/// route needs.
pub const PERMISSION_EXTENSION: &str = "permission";

/// What the upstream header of a key metadata field is called: `x-tollgate-<field>`.
pub const METADATA_HEADER_PREFIX: &str = "x-tollgate-";

/// The tonic service for ext_authz.
pub struct AuthzGrpc {
    service: Arc<AuthzService>,
    key_id_header: String,
    hide_credentials: bool,
    /// `authz.metadata_headers`: (field, header name) pairs.
    metadata_headers: Vec<(String, String)>,
}

impl AuthzGrpc {
    pub fn new(service: Arc<AuthzService>, key_id_header: String, hide_credentials: bool) -> Self {
        Self {
            service,
            key_id_header,
            hide_credentials,
            metadata_headers: Vec::new(),
        }
    }

    /// Sends these key metadata fields upstream as `x-tollgate-<field>` headers.
    pub fn with_metadata_headers(mut self, fields: &[String]) -> Self {
        self.metadata_headers = fields
            .iter()
            .map(|f| (f.clone(), format!("{METADATA_HEADER_PREFIX}{f}")))
            .collect();
        self
    }
}

/// The request's headers, whichever way Envoy sent them (`headers`, or `header_map` when the
/// filter's `encode_raw_headers` is on).
struct Headers<'a> {
    map: &'a [Entry],
    raw: &'a [check_request::HeaderValue],
}

impl<'a> Headers<'a> {
    fn of(http: Option<&'a HttpRequest>) -> Self {
        Headers {
            map: http.map_or(&[], |h| &h.headers),
            raw: http
                .and_then(|h| h.header_map.as_ref())
                .map_or(&[], |m| &m.headers),
        }
    }

    fn get(&self, name: &str) -> Option<&'a str> {
        if let Some(v) = lookup(self.map, name) {
            return Some(v);
        }
        // Names first: only a matching header's value is read as UTF-8.
        self.raw
            .iter()
            .filter(|h| h.key.eq_ignore_ascii_case(name.as_bytes()))
            .find_map(|h| {
                text(if h.raw_value.is_empty() {
                    &h.value
                } else {
                    &h.raw_value
                })
            })
    }
}

impl Authorization for AuthzGrpc {
    async fn check(&self, request: CheckRequest) -> Result<CheckResponse, tonic::Status> {
        let attributes = request.attributes.as_ref();
        let http = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let headers = Headers::of(http);
        let client_addr = attributes
            .and_then(|a| a.source.as_ref())
            .and_then(|p| p.address.as_ref())
            .and_then(|a| a.socket_address.as_ref())
            .and_then(|s| text(&s.address));
        let extensions = attributes.map_or(&[][..], |a| &a.context_extensions);
        let input = CheckInput {
            credential: self.service.credential(|name| headers.get(name)),
            method: http.and_then(|h| non_empty(&h.method)),
            path: http.and_then(|h| non_empty(&h.path)),
            host: http.and_then(|h| non_empty(&h.host)),
            // Envoy's x-request-id (what its access log carries); the attribute `id` is only
            // Envoy's internal stream number.
            request_id: headers
                .get("x-request-id")
                .or_else(|| http.and_then(|h| non_empty(&h.id))),
            client_addr,
            cost: lookup(extensions, COST_EXTENSION),
            permission: lookup(extensions, PERMISSION_EXTENSION),
        };
        let (decision, decision_id) = self.service.check(&input).await;
        Ok(match decision {
            Decision::Allow(allowed) => self.ok_response(&allowed, decision_id),
            Decision::Deny(denial) => denied_response(&denial, decision_id),
        })
    }
}

impl AuthzGrpc {
    fn ok_response(&self, allowed: &Allowed, decision_id: String) -> CheckResponse {
        let key = &allowed.key;
        let mut headers = vec![header(&self.key_id_header, key.id.to_string())];
        let mut headers_to_remove = if self.hide_credentials {
            vec![allowed.credential_header.to_string()]
        } else {
            Vec::new()
        };
        // A configured field reaches the upstream only from the key: the client's own header of
        // that name is replaced, or removed when the key has no such field.
        for (field, name) in &self.metadata_headers {
            match key.metadata.get(field) {
                Some(value) => headers.push(header(name, value.clone())),
                None => headers_to_remove.push(name.clone()),
            }
        }
        let ok = OkHttpResponse {
            headers,
            headers_to_remove,
            response_headers_to_add: rate_limit_headers(&allowed.limits)
                .into_iter()
                .map(|(k, v)| header(k, v))
                .collect(),
            ..Default::default()
        };
        let mut fields = HashMap::with_capacity(3 + key.metadata.len());
        // The key's own fields first, so tollgate's (which no key's may be named) are never
        // replaced.
        for (k, v) in &key.metadata {
            fields.insert(k.clone(), string_value(v.clone()));
        }
        fields.insert("key_id".to_string(), string_value(key.id.to_string()));
        fields.insert("key_name".to_string(), string_value(key.name.to_string()));
        if let Some(identity) = key.identity.as_deref().copied() {
            fields.insert(
                "identity_id".to_string(),
                string_value(identity.id.to_string()),
            );
        }
        fields.insert(DECISION_ID_METADATA.to_string(), string_value(decision_id));
        let metadata = Struct { fields };
        CheckResponse {
            status: Some(Status {
                code: OK,
                ..Default::default()
            }),
            dynamic_metadata: Some(metadata),
            http_response: Some(check_response::HttpResponse::OkResponse(ok)),
        }
    }
}

fn denied_response(denial: &Denial, decision_id: String) -> CheckResponse {
    let code = match denial.reason {
        DenyReason::MissingKey | DenyReason::InvalidKey => UNAUTHENTICATED,
        DenyReason::KeyRevoked | DenyReason::KeyExpired | DenyReason::PermissionDenied => {
            PERMISSION_DENIED
        }
        DenyReason::BackendUnavailable => UNAVAILABLE,
        DenyReason::InvalidCost => INTERNAL,
        _ => RESOURCE_EXHAUSTED,
    };
    let denied = DeniedHttpResponse {
        status: Some(HttpStatus {
            code: denial.reason.status() as i32,
        }),
        headers: denial
            .headers()
            .into_iter()
            .map(|(k, v)| header(k, v))
            .collect(),
        body: denial.body(),
    };
    CheckResponse {
        status: Some(Status {
            code,
            message: denial.reason.code().to_string(),
            ..Default::default()
        }),
        // Envoy keeps a denied answer's metadata too, so its access log completes the row.
        dynamic_metadata: Some(Struct {
            fields: HashMap::from([(DECISION_ID_METADATA.to_string(), string_value(decision_id))]),
        }),
        http_response: Some(check_response::HttpResponse::DeniedResponse(denied)),
    }
}

/// A header that replaces any value of the same name (so a client cannot smuggle its own
/// `x-tollgate-key-id` upstream).
fn header(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value,
            raw_value: Vec::new(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// A text field, unless it is empty or not UTF-8.
fn non_empty(field: &Bytes) -> Option<&str> {
    text(field).filter(|s| !s.is_empty())
}

fn string_value(s: String) -> Value {
    Value {
        kind: Some(Kind::StringValue(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(key: &str, value: &[u8]) -> check_request::HeaderValue {
        check_request::HeaderValue {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::new(),
            raw_value: Bytes::copy_from_slice(value),
        }
    }

    /// The headers map wins; in the raw header map a name matches in any case, and the first
    /// matching header whose value is UTF-8 is the one read.
    #[test]
    fn a_header_is_read_from_the_map_first_then_the_first_usable_raw_one() {
        let http = HttpRequest {
            headers: vec![Entry {
                key: "x-api-key".into(),
                value: "from-map".into(),
            }],
            header_map: Some(check_request::HeaderMap {
                headers: vec![
                    raw("x-api-key", b"from-raw"),
                    raw("X-Request-Id", b"\xff"),
                    raw("x-request-ID", b"second"),
                    raw("x-other", b"third"),
                ],
            }),
            ..Default::default()
        };
        let headers = Headers::of(Some(&http));
        assert_eq!(headers.get("x-api-key"), Some("from-map"));
        assert_eq!(headers.get("x-request-id"), Some("second"));
        assert_eq!(headers.get("x-other"), Some("third"));
        assert_eq!(headers.get("x-absent"), None);
        assert_eq!(Headers::of(None).get("x-api-key"), None);
    }
}
