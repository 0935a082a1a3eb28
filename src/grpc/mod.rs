//! The gRPC edge: Envoy's protobuf (and the admin API's) in, domain calls, protobuf out.
//! Nothing here decides anything.

pub mod accesslog;
pub mod admin;
pub mod authz;
pub mod check_request;
pub mod coalesce;
pub mod ratelimit;
pub mod serving;
