//! What the benchmark (`examples/bench_requests.rs`) and the query-plan tests reach into, kept in
//! one place: not part of tollgate's API, and free to change with the internals it exposes.

/// PostgreSQL's quota statement for the requests waiting at one moment.
pub use crate::store::postgres::quota::CONSUME_SQL as POSTGRES_BATCH_SQL;
/// PostgreSQL's quota statement for a lone request, as the quota writer runs it (see
/// `store/postgres/quota.rs`).
pub use crate::store::postgres::quota::SPEND_ONE_SQL as POSTGRES_CONSUME_SQL;
/// SQLite's quota statement, as the quota writer runs it (see `store/sqlite/quota.rs`), and what
/// each of its positional parameters stands for.
pub use crate::store::sqlite::quota::{
    CONSUME_PARAMS as SQLITE_CONSUME_PARAMS, CONSUME_SQL as SQLITE_CONSUME_SQL,
    ConsumeParam as SqliteConsumeParam,
};
