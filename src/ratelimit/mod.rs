//! Envoy's rate limit service (ratelimit.v3): descriptor rules and their evaluation.

pub mod reload;
pub mod rules;
pub mod service;
