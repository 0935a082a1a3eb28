//! What tollgate's integration tests (`tests/*.rs`) share: a real tollgate on port 0 with a
//! settable clock, databases of their own, real Envoy and Redis, and readers of what a client
//! sees. A library crate, so that each test binary takes the pieces it needs and the rest is not
//! dead code in it.
//!
//! # Layout
//! - [`admin`]: the admin API's REST and gRPC clients, and the test token.
//! - [`db`]: a database of the test's own (SQLite or PostgreSQL): reading it, locking it, opening
//!   tollgate's stores on it; and [`every_database!`], which runs a test body on each.
//! - [`server`]: [`server::Tollgate`], an in-process tollgate on ephemeral ports, with its
//!   clients and stores; [`server::t0`] and [`server::limits`].
//! - [`check`]: CheckRequest builders, and what a client sees of the answers.
//! - [`cli`]: the `tollgate` binary: running a command, creating a key with it.
//! - [`replica`]: [`replica::Replica`], a `tollgate serve` process.
//! - [`envoy`]: [`envoy::Envoy`], a real Envoy in front of a tollgate.
//! - [`redis`]: the shared Redis node and cluster, key prefixes, the keys on each node, and a
//!   private Redis to stop.
//! - [`pg`]: [`pg::PrivatePostgres`], a PostgreSQL server of the test's own, plaintext or TLS only.
//! - [`net`]: free ports, the HTTP client, `/metrics`.
//! - [`tls`]: certificates made in the test (a CA, server and client pairs), and TLS clients.

pub mod admin;
pub mod check;
pub mod cli;
pub mod db;
pub mod envoy;
pub mod net;
pub mod pg;
pub mod redis;
pub mod replica;
pub mod server;
pub mod tls;
