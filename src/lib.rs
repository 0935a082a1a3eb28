//! tollgate: a sidecar that decides, for every request Envoy forwards, whether it may pass.
//!
//! # Layout
//!
//! A Check reads top to bottom: [`grpc`] turns Envoy's protobuf into domain types, [`authz`]
//! decides (key → per-minute window → quota), [`decision`] says how the client sees it.
//!
//! - [`admin`]: the admin API (gRPC and REST/JSON from one proto, on `admin_addr`) and
//!   [`admin::service::KeyAdmin`], the key operations it and `tollgate keys` share.
//! - [`app`]: composes everything from the configuration, serves, shuts down in order.
//! - [`config`]: the YAML file and `TOLLGATE_*` overrides, validated at start.
//! - [`setting`]: the types settings are written in (durations, secret URLs, failure modes).
//! - [`grpc`]: Envoy's protobuf APIs, translated to and from the domain (nothing decided there).
//! - [`authz`]: the Check decision: key → per-minute window → daily/monthly quota.
//! - [`decision`]: decisions and how the client sees them (status, headers, problem body).
//! - [`failure`]: what a request does when a backend fails, counted and logged in one place.
//! - [`keys`]: key format, hashing, and the in-memory key cache.
//! - [`limiter`]: per-minute windows (fixed, sliding, token bucket), in-process or in Redis.
//! - [`ratelimit`]: Envoy's rate limit service: envoyproxy/ratelimit-style rules, how a
//!   request's descriptors are counted, and the rules' reload.
//! - [`store`]: keys, quotas and the request log in the database, one trait per seam, one file
//!   per backend per seam (SQLite, the embedded default, and PostgreSQL).
//! - [`reqlog`]: the bounded queue and batch writer of the request log, and its maintenance.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`tls`]: TLS and mTLS on the gRPC port, and certificates renewed while serving.
//! - [`telemetry`]: logging setup and metrics.
//! - [`clock`]: time, settable in tests.
//! - [`cli`]: the command line and the `tollgate keys` and `tollgate usage` commands.
//! - `bench_hooks`: internals the benchmark times alone; not an API.

pub mod admin;
pub mod app;
pub(crate) mod authz;
#[doc(hidden)]
pub mod bench_hooks;
pub mod cli;
pub mod clock;
pub mod config;
pub mod decision;
pub(crate) mod failure;
pub(crate) mod grpc;
/// The messages a Check is decoded as, for the hostile-input tests; not an API.
#[doc(hidden)]
pub use grpc::check_request;
pub(crate) mod http;
pub mod keys;
pub mod limiter;
pub mod ratelimit;
pub(crate) mod reqlog;
pub(crate) mod setting;
pub mod store;
pub mod telemetry;
pub mod tls;
