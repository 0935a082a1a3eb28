//! tollgate: a sidecar that decides, for every request Envoy forwards, whether it may pass.
//!
//! # Layout
//!
//! - [`app`]: builds everything from the configuration, serves, shuts down in order.
//! - [`config`]: the YAML file and `TOLLGATE_*` overrides, validated at start.
//! - [`setting`]: the types settings are written in (durations, secret URLs, failure modes).
//! - [`grpc`]: Envoy's protobuf APIs, translated to and from the domain (nothing decided there).
//! - [`authz`]: the Check decision: key → per-minute window → daily/monthly quota.
//! - [`decision`]: decisions and how the client sees them (status, headers, problem body).
//! - [`failure`]: what a request does when a backend fails, counted and logged in one place.
//! - [`keys`]: key format, hashing, and the in-memory key cache.
//! - [`limiter`]: per-minute windows (fixed, sliding, token bucket), in-process or in Redis.
//! - [`ratelimit`]: Envoy's rate limit service: envoyproxy/ratelimit-style rules and how
//!   a request's descriptors are counted.
//! - [`store`]: keys, quotas and the request log in the database (SQLite now).
//! - [`reqlog`]: the bounded queue and batch writer of the request log.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`telemetry`]: logging setup and metrics.
//! - [`clock`]: time, settable in tests.
//! - [`cli`]: the command line and the `tollgate keys` commands.

pub mod app;
pub mod authz;
pub mod cli;
pub mod clock;
pub mod config;
pub mod decision;
pub mod failure;
pub mod grpc;
pub mod http;
pub mod keys;
pub mod limiter;
pub mod ratelimit;
pub mod reqlog;
pub mod setting;
pub mod store;
pub mod telemetry;
