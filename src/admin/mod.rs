//! The admin API: what the systems that provision keys (a portal, billing, a support console)
//! call, on its own port (`admin_addr`), over gRPC and REST/JSON from one proto.
//!
//! - [`service`]: [`service::KeyAdmin`], the key operations and their validation; the
//!   `tollgate keys` commands use it too.
//! - [`pb`]: the protobuf types and tonic service generated from `proto/tollgate/admin/v1`.
//! - [`auth`]: who may call: configured bearer tokens, compared in constant time, and client
//!   certificates with a listed SAN.
//! - [`listener`]: the port's connections (TLS when `grpc_tls` is set) and who is at the other
//!   end of each ([`listener::AdminPeer`]).
//! - [`rest`]: REST/JSON transcoded from the proto's `google.api.http` options.
//! - [`openapi`]: the REST side's OpenAPI document, generated from the same descriptors.
//! - `crate::grpc::admin`: the gRPC service both transports call; it logs and counts each call.
//!
//! [`router`] puts them on one port: gRPC requests (`content-type: application/grpc`, HTTP/2)
//! reach tonic, everything else the REST side. Authentication comes first on both, before a path
//! is looked at, so a caller without credentials learns nothing (not even which paths or key ids
//! exist).

pub mod auth;
pub mod listener;
pub mod openapi;
pub mod pb;
pub mod rest;
pub mod service;

use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::clock::Clock;
use crate::grpc::admin::{AdminGrpc, Transport};
use crate::telemetry::Metrics;
use auth::{AdminAuth, AuthFailure, Credentials};
use listener::AdminPeer;
use pb::admin_service_server::AdminServiceServer;
use rest::{Found, MAX_BODY_BYTES, Rest, problem, rpc_label};
use service::KeyAdmin;

/// What the admin port's handlers share.
struct AdminState {
    auth: AdminAuth,
    rest: Rest,
    metrics: Arc<Metrics>,
}

/// The admin port's routes: gRPC (`/tollgate.admin.v1.AdminService/…`) and REST (`/v1/…`),
/// both behind [`AdminAuth`]. Serve it with `into_make_service_with_connect_info::<AdminPeer>`
/// (the client certificate's SANs are credentials; the peer's address is logged with refused
/// calls).
pub fn router(
    admin: KeyAdmin,
    auth: AdminAuth,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
) -> axum::Router {
    let grpc = AdminGrpc::new(admin, clock, metrics.clone());
    let state = Arc::new(AdminState {
        auth,
        rest: Rest::new(grpc.clone(), metrics.clone()),
        metrics,
    });
    let service = AdminServiceServer::new(grpc)
        .max_decoding_message_size(MAX_BODY_BYTES)
        .max_encoding_message_size(16 << 20);
    let rest_state = state.clone();
    tonic::service::Routes::new(service)
        .into_axum_router()
        .route_layer(axum::middleware::from_fn_with_state(state, grpc_auth))
        .fallback(move |request: Request| rest_call(rest_state.clone(), request))
}

/// What a request presents, from its headers and its connection's client certificate.
fn credentials(request: &Request) -> Credentials<'_> {
    Credentials {
        authorization: request
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
        client_sans: peer(request).map_or(&[], |p| &p.client_sans[..]),
    }
}

fn peer(request: &Request) -> Option<&AdminPeer> {
    request
        .extensions()
        .get::<ConnectInfo<AdminPeer>>()
        .map(|c| &c.0)
}

/// Logs and counts a refused authentication; never what was presented.
fn refused(
    state: &AdminState,
    request: &Request,
    transport: Transport,
    method: &'static str,
    failure: AuthFailure,
) {
    state
        .metrics
        .admin
        .inc((method, transport.as_str(), "unauthenticated"));
    let peer = peer(request);
    tracing::warn!(
        target: "tollgate::admin",
        peer = ?peer.map(|p| p.addr), client_sans = ?peer.map(|p| &p.client_sans[..]),
        transport = transport.as_str(), method, credentials = failure.as_str(),
        "admin call unauthenticated"
    );
}

/// Authenticates a gRPC call before tonic sees it.
async fn grpc_auth(
    State(state): State<Arc<AdminState>>,
    mut request: Request,
    next: Next,
) -> Response {
    match state.auth.authenticate(&credentials(&request)) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            request.extensions_mut().insert(Transport::Grpc);
            next.run(request).await
        }
        Err(failure) => {
            let method = rpc_label(request.uri().path().rsplit('/').next().unwrap_or(""));
            refused(&state, &request, Transport::Grpc, method, failure);
            unauthenticated_grpc()
        }
    }
}

fn unauthenticated_grpc() -> Response {
    tonic::Status::unauthenticated("admin credentials required").into_http()
}

fn is_grpc(request: &Request) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Everything that is not a gRPC call of the admin service: authentication, then the REST
/// routes.
async fn rest_call(state: Arc<AdminState>, request: Request) -> Response {
    let grpc = is_grpc(&request);
    let caller = match state.auth.authenticate(&credentials(&request)) {
        Ok(caller) => caller,
        Err(failure) => {
            let transport = if grpc {
                Transport::Grpc
            } else {
                Transport::Rest
            };
            refused(&state, &request, transport, "unknown", failure);
            if grpc {
                return unauthenticated_grpc();
            }
            let mut response = problem(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "Admin credentials required: send Authorization: Bearer <token>.",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    };
    if grpc {
        // A service or method this port does not have.
        state
            .metrics
            .admin
            .inc(("unknown", "grpc", "unimplemented"));
        return tonic::Status::unimplemented("no such service or method on the admin port")
            .into_http();
    }
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    match state.rest.find(&parts.method, &path) {
        Found::Rpc(binding, vars) => state.rest.call(binding, vars, parts, body, caller).await,
        Found::OpenApi => state.rest.openapi(),
        Found::WrongMethod => {
            state
                .metrics
                .admin
                .inc(("unknown", "rest", "method_not_allowed"));
            problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "This path does not take this method: see /v1/openapi.json.",
            )
        }
        Found::Nothing => {
            state.metrics.admin.inc(("unknown", "rest", "not_found"));
            problem(
                StatusCode::NOT_FOUND,
                "not_found",
                "No such resource: see /v1/openapi.json.",
            )
        }
    }
}
