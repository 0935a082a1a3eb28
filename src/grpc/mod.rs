//! The gRPC edge: Envoy's protobuf in, domain calls, protobuf out. Nothing here decides anything.

pub mod accesslog;
pub mod authz;
pub mod ratelimit;
