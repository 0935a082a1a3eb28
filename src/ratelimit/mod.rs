//! Envoy's rate limit service (ratelimit.v3): descriptor rules and their evaluation.

pub mod counter_key;
pub(crate) mod reload;
pub mod rules;
pub(crate) mod service;
