//! The part of ext_authz's `CheckRequest` a Check reads, decoded without copying, and the
//! `Authorization` service that decodes it.
//!
//! Envoy's `CheckRequest` carries every request header, both peers, TLS and route metadata;
//! decoding all of it into owned strings and hash maps was a tenth of a Check's instructions
//! (BENCHMARKS.md, "CPU per decision"). These messages name only the fields a Check reads, with
//! the same tags, so everything else is skipped as unknown fields are, and text fields are
//! [`Bytes`] slices of the received frame rather than copies. A text field is only read as
//! UTF-8 when a Check uses it: a header that is not UTF-8 is one the Check cannot use, not a
//! message that cannot be decoded (an error, which Envoy counts as tollgate failing). Envoy
//! itself sends valid UTF-8; this is for any other client of the gRPC port.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::server::NamedService;

/// `envoy.service.auth.v3.CheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckRequest {
    #[prost(message, optional, tag = "1")]
    pub attributes: Option<AttributeContext>,
}

/// `envoy.service.auth.v3.AttributeContext`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeContext {
    #[prost(message, optional, tag = "1")]
    pub source: Option<Peer>,
    #[prost(message, optional, tag = "4")]
    pub request: Option<Request>,
    /// `map<string, string> context_extensions`: on the wire, repeated key-value entries.
    #[prost(message, repeated, tag = "10")]
    pub context_extensions: Vec<Entry>,
}

/// `AttributeContext.Peer`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Peer {
    #[prost(message, optional, tag = "1")]
    pub address: Option<Address>,
}

/// `envoy.config.core.v3.Address`, its `socket_address` alone.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Address {
    #[prost(message, optional, tag = "1")]
    pub socket_address: Option<SocketAddress>,
}

/// `envoy.config.core.v3.SocketAddress`, its `address` alone.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SocketAddress {
    #[prost(bytes = "bytes", tag = "2")]
    pub address: Bytes,
}

/// `AttributeContext.Request`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    #[prost(message, optional, tag = "2")]
    pub http: Option<HttpRequest>,
}

/// `AttributeContext.HttpRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequest {
    #[prost(bytes = "bytes", tag = "1")]
    pub id: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub method: Bytes,
    /// `map<string, string> headers`.
    #[prost(message, repeated, tag = "3")]
    pub headers: Vec<Entry>,
    #[prost(bytes = "bytes", tag = "4")]
    pub path: Bytes,
    #[prost(bytes = "bytes", tag = "5")]
    pub host: Bytes,
    /// `envoy.config.core.v3.HeaderMap header_map`, sent instead of `headers` when the filter's
    /// `encode_raw_headers` is on.
    #[prost(message, optional, tag = "13")]
    pub header_map: Option<HeaderMap>,
}

/// An entry of a `map<string, string>`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
}

/// `envoy.config.core.v3.HeaderMap`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderMap {
    #[prost(message, repeated, tag = "1")]
    pub headers: Vec<HeaderValue>,
}

/// `envoy.config.core.v3.HeaderValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValue {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
    #[prost(bytes = "bytes", tag = "3")]
    pub raw_value: Bytes,
}

/// A text field as UTF-8, if it is.
pub fn text(field: &Bytes) -> Option<&str> {
    std::str::from_utf8(field).ok()
}

/// The value of `name` in a decoded `map<string, string>`: the last entry wins, as in a map.
pub fn lookup<'a>(entries: &'a [Entry], name: &str) -> Option<&'a str> {
    entries
        .iter()
        .rev()
        .find(|e| e.key == name.as_bytes())
        .and_then(|e| text(&e.value))
}

/// The gRPC service `envoy.service.auth.v3.Authorization`, decoding [`CheckRequest`].
pub trait Authorization: Send + Sync + 'static {
    fn check(
        &self,
        request: CheckRequest,
    ) -> impl Future<Output = Result<CheckResponse, tonic::Status>> + Send;
}

/// Serves `/envoy.service.auth.v3.Authorization/Check` with `T`; any other method of the
/// service is answered UNIMPLEMENTED.
#[derive(Debug)]
pub struct AuthorizationServer<T> {
    inner: Arc<T>,
    max_decoding_message_size: Option<usize>,
}

impl<T> Clone for AuthorizationServer<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            max_decoding_message_size: self.max_decoding_message_size,
        }
    }
}

impl<T> AuthorizationServer<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner: Arc::new(inner),
            max_decoding_message_size: None,
        }
    }

    /// Messages larger than `limit` are refused with OUT_OF_RANGE.
    #[must_use]
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_decoding_message_size = Some(limit);
        self
    }
}

impl<T> NamedService for AuthorizationServer<T> {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

/// One Check, for tonic's unary call.
struct CheckCall<T>(Arc<T>);

impl<T: Authorization> tonic::server::UnaryService<CheckRequest> for CheckCall<T> {
    type Response = CheckResponse;
    type Future = BoxFuture<tonic::Response<CheckResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<CheckRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move {
            inner
                .check(request.into_inner())
                .await
                .map(tonic::Response::new)
        })
    }
}

impl<T, B> Service<http::Request<B>> for AuthorizationServer<T>
where
    T: Authorization,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != "/envoy.service.auth.v3.Authorization/Check" {
            return Box::pin(async {
                Ok(tonic::Status::unimplemented("").into_http::<tonic::body::Body>())
            });
        }
        let call = CheckCall(self.inner.clone());
        let max = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                CheckResponse,
                CheckRequest,
            >::default())
            .apply_max_message_size_config(max, None);
            Ok(grpc.unary(call, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::envoy::service::auth::v3 as full;
    use prost::Message;

    /// A request as Envoy builds it, with fields a Check does not read as well.
    fn envoy_request() -> full::CheckRequest {
        use full::attribute_context;
        let socket = |address: &str, port| core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                address: address.into(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        };
        full::CheckRequest {
            attributes: Some(full::AttributeContext {
                source: Some(attribute_context::Peer {
                    address: Some(socket("10.0.0.7", 40_000)),
                    principal: "spiffe://cluster.local/ns/a/sa/b".into(),
                    ..Default::default()
                }),
                destination: Some(attribute_context::Peer {
                    address: Some(socket("10.0.0.1", 8080)),
                    ..Default::default()
                }),
                request: Some(attribute_context::Request {
                    time: Some(Default::default()),
                    http: Some(attribute_context::HttpRequest {
                        id: "1234".into(),
                        method: "POST".into(),
                        headers: [
                            ("x-api-key".to_string(), "tg_first".to_string()),
                            ("x-request-id".to_string(), "req-1".to_string()),
                        ]
                        .into(),
                        path: "/v1/things?x=1".into(),
                        host: "api.example.com".into(),
                        scheme: "https".into(),
                        body: "ignored".into(),
                        header_map: Some(core::HeaderMap {
                            headers: vec![
                                core::HeaderValue {
                                    key: "authorization".into(),
                                    value: "Bearer tg_raw".into(),
                                    raw_value: Vec::new(),
                                },
                                core::HeaderValue {
                                    key: "x-bin".into(),
                                    value: String::new(),
                                    raw_value: b"raw value".to_vec(),
                                },
                            ],
                        }),
                        ..Default::default()
                    }),
                }),
                context_extensions: [("cost".to_string(), "3".to_string())].into(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn reads_the_fields_a_check_uses_from_what_envoy_sends() {
        let bytes = Bytes::from(envoy_request().encode_to_vec());
        let lean = CheckRequest::decode(bytes).unwrap();
        let attributes = lean.attributes.unwrap();
        let address = attributes.source.unwrap().address.unwrap();
        assert_eq!(
            text(&address.socket_address.unwrap().address),
            Some("10.0.0.7")
        );
        assert_eq!(lookup(&attributes.context_extensions, "cost"), Some("3"));
        let http = attributes.request.unwrap().http.unwrap();
        assert_eq!(text(&http.id), Some("1234"));
        assert_eq!(text(&http.method), Some("POST"));
        assert_eq!(text(&http.path), Some("/v1/things?x=1"));
        assert_eq!(text(&http.host), Some("api.example.com"));
        assert_eq!(lookup(&http.headers, "x-api-key"), Some("tg_first"));
        assert_eq!(lookup(&http.headers, "x-request-id"), Some("req-1"));
        assert_eq!(lookup(&http.headers, "absent"), None);
        let raw = http.header_map.unwrap().headers;
        assert_eq!(raw.len(), 2);
        assert_eq!(text(&raw[0].key), Some("authorization"));
        assert_eq!(text(&raw[0].value), Some("Bearer tg_raw"));
        assert_eq!(&raw[1].raw_value[..], b"raw value");
    }

    #[test]
    fn a_map_entry_given_twice_reads_as_the_last_one() {
        let entries = [
            Entry {
                key: "x".into(),
                value: "first".into(),
            },
            Entry {
                key: "x".into(),
                value: "second".into(),
            },
        ];
        assert_eq!(lookup(&entries, "x"), Some("second"));
    }

    /// A header that is not UTF-8 does not make the message undecodable: the full message's
    /// decoder refuses it, which Envoy would count as tollgate failing.
    #[test]
    fn a_header_that_is_not_utf8_is_one_header_unread_not_a_failed_decode() {
        let mut wire = Vec::new();
        // headers entry: key "x-odd", value 0xff 0xfe.
        let entry = [&[0x0a, 5][..], b"x-odd", &[0x12, 2, 0xff, 0xfe]].concat();
        let http = [&[0x1a, entry.len() as u8][..], &entry].concat();
        let request = [&[0x12, http.len() as u8][..], &http].concat();
        let attributes = [&[0x22, request.len() as u8][..], &request].concat();
        wire.extend_from_slice(&[0x0a, attributes.len() as u8]);
        wire.extend_from_slice(&attributes);
        assert!(full::CheckRequest::decode(&wire[..]).is_err());
        let lean = CheckRequest::decode(Bytes::from(wire)).unwrap();
        let http = lean.attributes.unwrap().request.unwrap().http.unwrap();
        assert_eq!(http.headers.len(), 1);
        assert_eq!(lookup(&http.headers, "x-odd"), None);
    }
}
