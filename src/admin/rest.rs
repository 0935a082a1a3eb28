//! The admin API as REST/JSON, transcoded from the proto's `google.api.http` options: each RPC's
//! path template (`/v1/keys/{id}:revoke`) and body rule come from the descriptors, requests are
//! read with proto3's JSON mapping (unknown fields refused), handed to the same
//! [`AdminGrpc`] methods gRPC calls, and answered in proto3 JSON, or with an RFC 9457 problem.
//!
//! Only what the admin proto uses is supported: variables that are whole segments and name a
//! top-level integer field, a body of `*` or none, query parameters for the top-level scalar and
//! enum fields of a request without a body. [`bindings`] panics on anything else, and a unit
//! test builds them, so an unsupported option fails the tests, not a server.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Method, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MethodDescriptor,
    SerializeOptions, Value,
};
use serde_json::json;

use crate::admin::auth::Caller;
use crate::admin::pb;
use crate::grpc::admin::{AdminGrpc, Transport, code_name};
use crate::telemetry::Metrics;

/// The largest request body read, in bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// The most query parameters a request may have.
const MAX_QUERY_PARAMS: usize = 16;

/// One RPC's HTTP binding, as its `google.api.http` option gives it.
#[derive(Debug, Clone)]
pub struct Binding {
    pub rpc: MethodDescriptor,
    pub method: Method,
    /// The template as written: `/v1/keys/{id}:revoke`.
    pub path: String,
    /// The path's segments (a variable as its field), and the custom verb after `:`.
    segments: Vec<Segment>,
    verb: Option<String>,
    /// `body: "*"`: the request body is the request message.
    pub body: bool,
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Field(FieldDescriptor),
}

impl Binding {
    /// The request fields bound to the path.
    pub fn path_fields(&self) -> impl Iterator<Item = &FieldDescriptor> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Field(f) => Some(f),
            Segment::Literal(_) => None,
        })
    }

    /// The request fields read from the query string (none when the body is the request).
    pub fn query_fields(&self) -> Vec<FieldDescriptor> {
        if self.body {
            return Vec::new();
        }
        let bound: Vec<_> = self.path_fields().map(|f| f.number()).collect();
        self.rpc
            .input()
            .fields()
            .filter(|f| !bound.contains(&f.number()))
            .collect()
    }

    /// The path's variables' values, if `path` matches this template.
    fn matches<'p>(&self, path: &'p str) -> Option<Vec<(&FieldDescriptor, &'p str)>> {
        let path = path.strip_prefix('/')?;
        let (path, verb) = match (&self.verb, path.rsplit_once(':')) {
            (Some(_), Some((p, v))) if !v.contains('/') => (p, Some(v)),
            (Some(_), _) => return None,
            (None, _) => (path, None),
        };
        if verb != self.verb.as_deref() {
            return None;
        }
        let parts: Vec<&str> = path.split('/').collect();
        if parts.len() != self.segments.len() {
            return None;
        }
        let mut vars = Vec::new();
        for (segment, part) in self.segments.iter().zip(parts) {
            match segment {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Field(_) if part.is_empty() => return None,
                Segment::Field(f) => vars.push((f, part)),
            }
        }
        Some(vars)
    }
}

/// Every RPC of the admin service with its HTTP binding.
///
/// # Panics
/// When an RPC has no `google.api.http` option, or one this module does not support (see the
/// module's doc): the proto is tollgate's own, and a unit test builds these.
pub fn bindings(pool: &DescriptorPool) -> Vec<Binding> {
    let service = pool
        .get_service_by_name("tollgate.admin.v1.AdminService")
        .expect("the admin service is in its descriptors");
    let http = pool
        .get_extension_by_name("google.api.http")
        .expect("google.api.http is in the admin descriptors");
    service
        .methods()
        .map(|rpc| {
            let options = rpc.options();
            let rule = options.get_extension(&http);
            let rule = rule
                .as_message()
                .unwrap_or_else(|| panic!("{} has no google.api.http option", rpc.name()));
            let (method, path) = [
                ("get", Method::GET),
                ("post", Method::POST),
                ("patch", Method::PATCH),
                ("put", Method::PUT),
                ("delete", Method::DELETE),
            ]
            .into_iter()
            .find_map(|(name, method)| {
                rule.has_field_by_name(name).then(|| {
                    let path = rule.get_field_by_name(name).expect("set");
                    (method, path.as_str().expect("a string").to_string())
                })
            })
            .unwrap_or_else(|| panic!("{}: no HTTP method in its option", rpc.name()));
            let body = match rule
                .get_field_by_name("body")
                .expect("HttpRule.body")
                .as_str()
            {
                Some("*") => true,
                Some("") => false,
                other => panic!("{}: body {other:?} is not supported", rpc.name()),
            };
            let (segments, verb) = parse_template(&rpc, &path);
            Binding {
                rpc,
                method,
                path,
                segments,
                verb,
                body,
            }
        })
        .collect()
}

fn parse_template(rpc: &MethodDescriptor, template: &str) -> (Vec<Segment>, Option<String>) {
    let path = template
        .strip_prefix('/')
        .unwrap_or_else(|| panic!("{}: {template} does not start with /", rpc.name()));
    let (path, verb) = match path.rsplit_once(':') {
        Some((p, v)) if !v.contains('/') && !v.contains('}') => (p, Some(v.to_string())),
        _ => (path, None),
    };
    let segments =
        path.split('/')
            .map(
                |part| match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                    Some(name) => {
                        let field = rpc.input().get_field_by_name(name).unwrap_or_else(|| {
                            panic!("{}: {template}: no field {name}", rpc.name())
                        });
                        assert!(
                            matches!(field.kind(), Kind::Int64 | Kind::Int32) && !field.is_list(),
                            "{}: path variable {name} must be an integer field",
                            rpc.name()
                        );
                        Segment::Field(field)
                    }
                    None => Segment::Literal(part.to_string()),
                },
            )
            .collect();
    (segments, verb)
}

/// What a path and method found.
pub(crate) enum Found<'a> {
    Rpc(&'a Binding, Vec<(&'a FieldDescriptor, &'a str)>),
    OpenApi,
    /// The path exists, with other methods.
    WrongMethod,
    Nothing,
}

/// The REST side: the bindings, and the gRPC service they call.
pub(crate) struct Rest {
    bindings: Vec<Binding>,
    grpc: AdminGrpc,
    metrics: Arc<Metrics>,
    /// The OpenAPI document, rendered once.
    openapi: Bytes,
}

impl Rest {
    pub fn new(grpc: AdminGrpc, metrics: Arc<Metrics>) -> Self {
        let pool = pb::descriptor_pool();
        Rest {
            bindings: bindings(pool),
            grpc,
            metrics,
            openapi: Bytes::from(crate::admin::openapi::document(pool).to_string()),
        }
    }

    pub fn find<'a>(&'a self, method: &Method, path: &'a str) -> Found<'a> {
        if path == crate::admin::openapi::PATH {
            return if method == Method::GET {
                Found::OpenApi
            } else {
                Found::WrongMethod
            };
        }
        let mut wrong_method = false;
        for b in &self.bindings {
            if let Some(vars) = b.matches(path) {
                if b.method == *method {
                    return Found::Rpc(b, vars);
                }
                wrong_method = true;
            }
        }
        if wrong_method {
            Found::WrongMethod
        } else {
            Found::Nothing
        }
    }

    pub fn openapi(&self) -> Response {
        (
            [(header::CONTENT_TYPE, "application/json")],
            self.openapi.clone(),
        )
            .into_response()
    }

    /// Runs one RPC from an authenticated REST request.
    pub async fn call(
        &self,
        binding: &Binding,
        vars: Vec<(&FieldDescriptor, &str)>,
        parts: Parts,
        body: Body,
        caller: Caller,
    ) -> Response {
        let name = binding.rpc.name();
        let request = match self.request(binding, vars, &parts, body).await {
            Ok(r) => r,
            Err(refusal) => {
                let label = rpc_label(name);
                self.metrics.admin.inc((label, "rest", refusal.code));
                tracing::info!(
                    target: "tollgate::admin",
                    %caller, transport = "rest", method = label, code = refusal.code,
                    error = %refusal.detail, "admin call refused"
                );
                return refusal.into_response();
            }
        };
        let mut extensions = axum::http::Extensions::new();
        extensions.insert(caller);
        extensions.insert(Transport::Rest);
        match self.dispatch(binding, request, extensions).await {
            Ok(message) => json_response(&message),
            Err(status) => problem_of_status(&status),
        }
    }

    /// The request message: body, path variables and query parameters.
    async fn request(
        &self,
        binding: &Binding,
        vars: Vec<(&FieldDescriptor, &str)>,
        parts: &Parts,
        body: Body,
    ) -> Result<DynamicMessage, Refusal> {
        let input = binding.rpc.input();
        let mut message = if binding.body {
            if parts.uri.query().is_some_and(|q| !q.is_empty()) {
                return Err(Refusal::invalid(
                    "this operation takes its fields in a JSON body, not query parameters",
                ));
            }
            let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
                .await
                .map_err(|_| Refusal {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    code: "payload_too_large",
                    detail: format!("The request body is larger than {MAX_BODY_BYTES} bytes."),
                })?;
            if bytes.iter().all(u8::is_ascii_whitespace) {
                DynamicMessage::new(input.clone())
            } else {
                if !is_json(parts) {
                    return Err(Refusal {
                        status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        code: "unsupported_media_type",
                        detail: "Send the body as JSON, with content-type: application/json."
                            .into(),
                    });
                }
                let mut de = serde_json::Deserializer::from_slice(&bytes);
                let message = DynamicMessage::deserialize_with_options(
                    input.clone(),
                    &mut de,
                    &DeserializeOptions::new().deny_unknown_fields(true),
                )
                .and_then(|m| de.end().map(|()| m))
                .map_err(|e| {
                    Refusal::invalid(format!("The body is not a valid {}: {e}", input.name()))
                })?;
                for field in binding.path_fields() {
                    if message.has_field(field) {
                        return Err(Refusal::invalid(format!(
                            "{} comes from the path; leave it out of the body",
                            field.json_name()
                        )));
                    }
                }
                message
            }
        } else {
            let mut message = DynamicMessage::new(input.clone());
            set_query(&mut message, binding, parts.uri.query().unwrap_or(""))?;
            message
        };
        for (field, raw) in vars {
            let value = scalar(field, raw)?;
            message.set_field(field, value);
        }
        Ok(message)
    }

    /// Calls the gRPC service's method for `rpc` with `request`.
    async fn dispatch(
        &self,
        binding: &Binding,
        request: DynamicMessage,
        extensions: axum::http::Extensions,
    ) -> Result<DynamicMessage, tonic::Status> {
        use pb::admin_service_server::AdminService;
        macro_rules! call {
            ($method:ident) => {{
                let message = request
                    .transcode_to()
                    .map_err(|_| tonic::Status::invalid_argument("the request does not encode"))?;
                let mut r = tonic::Request::new(message);
                *r.extensions_mut() = extensions;
                let answer = self.grpc.$method(r).await?.into_inner();
                let mut out = DynamicMessage::new(binding.rpc.output());
                out.transcode_from(&answer)
                    .map_err(|_| tonic::Status::internal("the answer does not encode"))?;
                Ok(out)
            }};
        }
        match binding.rpc.name() {
            "CreateKey" => call!(create_key),
            "GetKey" => call!(get_key),
            "ListKeys" => call!(list_keys),
            "UpdateKey" => call!(update_key),
            "RevokeKey" => call!(revoke_key),
            "RotateKey" => call!(rotate_key),
            "GetKeyUsage" => call!(get_key_usage),
            "CreateIdentity" => call!(create_identity),
            "GetIdentity" => call!(get_identity),
            "ListIdentities" => call!(list_identities),
            "UpdateIdentityLimits" => call!(update_identity_limits),
            "DeleteIdentity" => call!(delete_identity),
            "GetIdentityUsage" => call!(get_identity_usage),
            _ => Err(tonic::Status::unimplemented("not served over REST")),
        }
    }
}

/// The admin service's RPCs, as metrics label them (a unit test keeps this the proto's list).
pub const RPCS: [&str; 13] = [
    "CreateKey",
    "GetKey",
    "ListKeys",
    "UpdateKey",
    "RevokeKey",
    "RotateKey",
    "GetKeyUsage",
    "CreateIdentity",
    "GetIdentity",
    "ListIdentities",
    "UpdateIdentityLimits",
    "DeleteIdentity",
    "GetIdentityUsage",
];

/// The RPC's name as a metrics label: one of [`RPCS`], else `unknown`.
pub(crate) fn rpc_label(name: &str) -> &'static str {
    RPCS.iter()
        .find(|n| **n == name)
        .copied()
        .unwrap_or("unknown")
}

fn is_json(parts: &Parts) -> bool {
    parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|t| {
            let t = t.trim().to_ascii_lowercase();
            t == "application/json" || (t.starts_with("application/") && t.ends_with("+json"))
        })
        .unwrap_or(false)
}

/// Sets the query parameters' fields (by JSON name or proto name).
fn set_query(message: &mut DynamicMessage, binding: &Binding, query: &str) -> Result<(), Refusal> {
    let fields = binding.query_fields();
    let mut seen = Vec::new();
    for (i, (name, raw)) in form_urlencoded::parse(query.as_bytes()).enumerate() {
        if i >= MAX_QUERY_PARAMS {
            return Err(Refusal::invalid("too many query parameters"));
        }
        let field = fields
            .iter()
            .find(|f| f.json_name() == name || f.name() == name)
            .ok_or_else(|| {
                let known: Vec<_> = fields.iter().map(|f| f.json_name().to_string()).collect();
                Refusal::invalid(format!(
                    "unknown query parameter {:?} (known: {})",
                    shorten(&name),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })?;
        if seen.contains(&field.number()) {
            return Err(Refusal::invalid(format!(
                "query parameter {} given twice",
                field.json_name()
            )));
        }
        seen.push(field.number());
        let value = scalar(field, &raw)?;
        message.set_field(field, value);
    }
    Ok(())
}

/// A path variable's or query parameter's text as the field's value.
fn scalar(field: &FieldDescriptor, raw: &str) -> Result<Value, Refusal> {
    let bad = |what: &str| {
        Refusal::invalid(format!(
            "{}: {:?} is not {what}",
            field.json_name(),
            shorten(raw)
        ))
    };
    Ok(match field.kind() {
        Kind::Int64 => Value::I64(raw.parse().map_err(|_| bad("a 64-bit integer"))?),
        Kind::Int32 => Value::I32(raw.parse().map_err(|_| bad("a 32-bit integer"))?),
        Kind::Bool => Value::Bool(raw.parse().map_err(|_| bad("true or false"))?),
        Kind::String => Value::String(raw.to_string()),
        Kind::Enum(e) => {
            let names: Vec<_> = e.values().map(|v| v.name().to_string()).collect();
            Value::EnumNumber(
                e.get_value_by_name(raw)
                    .ok_or_else(|| bad(&format!("one of {}", names.join(", "))))?
                    .number(),
            )
        }
        _ => return Err(bad("a value this parameter takes")),
    })
}

/// At most 64 characters of something a client sent, to quote it in an error.
fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A message as proto3 JSON, every field with no presence included (a count of 0 is `"0"`, not
/// left out), so clients need not know the mapping's defaults.
fn json_response(message: &DynamicMessage) -> Response {
    let mut out = Vec::with_capacity(256);
    let mut ser = serde_json::Serializer::new(&mut out);
    match message.serialize_with_options(
        &mut ser,
        &SerializeOptions::new().skip_default_fields(false),
    ) {
        Ok(()) => ([(header::CONTENT_TYPE, "application/json")], out).into_response(),
        Err(_) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "The answer could not be written as JSON.",
        ),
    }
}

/// A request refused before it reached the service.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    detail: String,
}

impl Refusal {
    fn invalid(detail: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_argument",
            detail: detail.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        problem(self.status, self.code, &self.detail)
    }
}

/// The HTTP status of a gRPC code (as grpc-gateway maps them).
pub fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        Ok => StatusCode::OK,
        InvalidArgument | FailedPrecondition | OutOfRange => StatusCode::BAD_REQUEST,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        PermissionDenied => StatusCode::FORBIDDEN,
        NotFound => StatusCode::NOT_FOUND,
        AlreadyExists | Aborted => StatusCode::CONFLICT,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Cancelled | Unknown | Internal | DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn problem_of_status(status: &tonic::Status) -> Response {
    problem(
        http_status(status.code()),
        code_name(status.code()),
        status.message(),
    )
}

/// An RFC 9457 problem body, shaped as Check's denials are: `type`, `title`, `status`,
/// `detail`, and `error`/`message` (the machine code and the sentence again).
pub fn problem(status: StatusCode, code: &str, detail: &str) -> Response {
    let body = json!({
        "type": format!("urn:tollgate:error:{code}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
        "error": code,
        "message": detail,
    });
    let mut response = (status, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_has_a_binding_and_paths_match_their_templates() {
        let pool = pb::descriptor_pool();
        let all = bindings(pool);
        let service = pool
            .get_service_by_name("tollgate.admin.v1.AdminService")
            .unwrap();
        assert_eq!(all.len(), service.methods().len());
        let find = |method: Method, path: &str| {
            all.iter().find_map(|b| {
                (b.method == method)
                    .then(|| b.matches(path).map(|v| (b.rpc.name().to_string(), v.len())))
                    .flatten()
            })
        };
        assert_eq!(
            find(Method::POST, "/v1/keys"),
            Some(("CreateKey".into(), 0))
        );
        assert_eq!(find(Method::GET, "/v1/keys"), Some(("ListKeys".into(), 0)));
        assert_eq!(find(Method::GET, "/v1/keys/7"), Some(("GetKey".into(), 1)));
        assert_eq!(
            find(Method::PATCH, "/v1/keys/7"),
            Some(("UpdateKey".into(), 1))
        );
        assert_eq!(
            find(Method::POST, "/v1/keys/7:revoke"),
            Some(("RevokeKey".into(), 1))
        );
        assert_eq!(
            find(Method::GET, "/v1/keys/7/usage"),
            Some(("GetKeyUsage".into(), 1))
        );
        assert_eq!(
            find(Method::GET, "/v1/identities/7/usage"),
            Some(("GetIdentityUsage".into(), 1))
        );
        for (method, path) in [
            (Method::POST, "/v1/keys/7:delete"),
            (Method::GET, "/v1/keys/"),
            (Method::GET, "/v1/keys/7/usage/x"),
            (Method::GET, "/v2/keys"),
            (Method::POST, "/v1/keys/7"),
            (Method::GET, "/v1/keys:revoke"),
        ] {
            assert_eq!(find(method.clone(), path), None, "{method} {path}");
        }
    }

    #[test]
    fn rpc_labels_are_the_protos_names() {
        let service = pb::descriptor_pool()
            .get_service_by_name("tollgate.admin.v1.AdminService")
            .unwrap();
        let names: Vec<_> = service.methods().map(|m| m.name().to_string()).collect();
        assert_eq!(names, RPCS);
        assert_eq!(rpc_label("CreateKey"), "CreateKey");
        assert_eq!(rpc_label("DropTables"), "unknown");
    }
}
