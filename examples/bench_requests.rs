//! Requests and ceilings for `scripts/bench` (issue 6): the benchmark's helper, not part of
//! tollgate.
//!
//! h2load sends one request body per run (`-d FILE`), so every distinct request is written to a
//! file of its own, ready to post: the 5-byte gRPC frame header (not compressed, big-endian
//! length) followed by the protobuf. The keys inside the Check bodies are real: `keys` creates
//! them in the bench database through tollgate's own store and records their plaintexts.
//!
//! ```sh
//! cargo run --release --example bench_requests -- keys --database-url URL --count 10000 --out keys.tsv
//! cargo run --release --example bench_requests -- check-bodies --keys keys.tsv --out bodies/
//! cargo run --release --example bench_requests -- rls-bodies --count 10000 --out bodies/
//! cargo run --release --example bench_requests -- verify --addr 127.0.0.1:8081 --api check bodies/check-00000.grpc
//! ```
//!
//! `verify` sends bodies with a real gRPC client and fails unless every answer is gRPC OK and
//! allowed (Check `status.code == 0`, ShouldRateLimit `overall_code == OK`); with many files it
//! also warms tollgate's caches. `pgbench-script` and `sqlite-ceiling` time the exact quota
//! statement tollgate runs, without tollgate around it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor::Entry,
};
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest,
    attribute_context::{HttpRequest, Request as AttrRequest},
    authorization_client::AuthorizationClient,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{
    RateLimitRequest, rate_limit_response::Code, rate_limit_service_client::RateLimitServiceClient,
};
use futures_util::StreamExt;
use prost::Message;
use tollgate::config::{DatabaseConfig, SecretUrl};
use tollgate::keys::{self, Limits};

#[derive(Parser)]
#[command(
    about = "Writes h2load-ready gRPC bodies and times the quota statement for scripts/bench"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Api {
    Check,
    Rls,
}

#[derive(Subcommand)]
enum Command {
    /// Creates keys in the database (migrating it first) and writes `id<TAB>plaintext` lines.
    Keys {
        #[arg(long)]
        database_url: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        per_minute: Option<u64>,
        #[arg(long)]
        daily: Option<u64>,
        #[arg(long)]
        monthly: Option<u64>,
        /// Names the keys `<name>-<n>`.
        #[arg(long, default_value = "bench")]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// One framed CheckRequest per key of a `keys` file: `<out>/<prefix>-<n>.grpc`.
    CheckBodies {
        #[arg(long)]
        keys: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "check")]
        prefix: String,
    },
    /// One framed RateLimitRequest per value: domain `<domain>`, one descriptor
    /// `(<descriptor-key>, v<n>)`: `<out>/<prefix>-<n>.grpc`.
    RlsBodies {
        #[arg(long)]
        count: usize,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "bench")]
        domain: String,
        #[arg(long, default_value = "bench_key")]
        descriptor_key: String,
        #[arg(long, default_value = "rls")]
        prefix: String,
    },
    /// Sends each body with a real gRPC client; fails unless every answer is OK and allowed.
    /// A directory stands for every `.grpc` file in it.
    Verify {
        #[arg(long)]
        addr: String,
        #[arg(long, value_enum)]
        api: Api,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Speak TLS to tollgate, trusting this PEM CA for its certificate (named `tollgate`).
        #[arg(long, value_name = "FILE")]
        tls_ca: Option<PathBuf>,
        files: Vec<PathBuf>,
    },
    /// Writes pgbench scripts that run tollgate's PostgreSQL quota statement, as tollgate binds it
    /// for a key with daily and monthly quotas: one for a hot row, one for spread rows.
    PgbenchScript {
        #[arg(long)]
        hot_id: i64,
        #[arg(long)]
        min_id: i64,
        #[arg(long)]
        max_id: i64,
        #[arg(long)]
        out_hot: PathBuf,
        #[arg(long)]
        out_spread: PathBuf,
    },
    /// Runs tollgate's SQLite quota statement back to back on one connection (SQLite has one
    /// writer, as tollgate's write pool) with tollgate's pragmas, and prints statements/s.
    SqliteCeiling {
        #[arg(long)]
        database_url: String,
        #[arg(long)]
        min_id: i64,
        #[arg(long)]
        max_id: i64,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Keys {
            database_url,
            count,
            per_minute,
            daily,
            monthly,
            name,
            out,
        } => {
            let limits = Limits {
                per_minute,
                daily,
                monthly,
                refund_5xx: false,
            };
            create_keys(&database_url, count, limits, &name, &out).await
        }
        Command::CheckBodies { keys, out, prefix } => {
            let text = std::fs::read_to_string(&keys)
                .with_context(|| format!("cannot read {}", keys.display()))?;
            std::fs::create_dir_all(&out)?;
            let mut n = 0;
            for (i, line) in text.lines().enumerate() {
                let (_, key) = line
                    .split_once('\t')
                    .with_context(|| format!("{}:{}: not id<TAB>key", keys.display(), i + 1))?;
                write_body(&out, &prefix, i, &check_request(key, i))?;
                n += 1;
            }
            println!("wrote {n} CheckRequest bodies to {}", out.display());
            Ok(())
        }
        Command::RlsBodies {
            count,
            out,
            domain,
            descriptor_key,
            prefix,
        } => {
            std::fs::create_dir_all(&out)?;
            for i in 0..count {
                write_body(&out, &prefix, i, &rls_request(&domain, &descriptor_key, i))?;
            }
            println!("wrote {count} RateLimitRequest bodies to {}", out.display());
            Ok(())
        }
        Command::Verify {
            addr,
            api,
            concurrency,
            tls_ca,
            files,
        } => verify(&addr, api, concurrency, tls_ca.as_deref(), &files).await,
        Command::PgbenchScript {
            hot_id,
            min_id,
            max_id,
            out_hot,
            out_spread,
        } => {
            let sql = pgbench_sql();
            std::fs::write(&out_hot, format!("\\set id {hot_id}\n{sql};\n"))?;
            std::fs::write(
                &out_spread,
                format!("\\set id random({min_id}, {max_id})\n{sql};\n"),
            )?;
            Ok(())
        }
        Command::SqliteCeiling {
            database_url,
            min_id,
            max_id,
            seconds,
        } => sqlite_ceiling(&database_url, min_id, max_id, seconds).await,
    }
}

/// A gRPC message frame: not compressed, 4-byte big-endian length, the message.
fn frame(message: &impl Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn unframe(bytes: &[u8], file: &Path) -> anyhow::Result<Vec<u8>> {
    if bytes.len() < 5 || bytes[0] != 0 {
        bail!("{}: not an uncompressed gRPC frame", file.display());
    }
    let len = u32::from_be_bytes(bytes[1..5].try_into().expect("4 bytes")) as usize;
    if bytes.len() != 5 + len {
        bail!(
            "{}: frame length {len} but {} bytes",
            file.display(),
            bytes.len() - 5
        );
    }
    Ok(bytes[5..].to_vec())
}

fn write_body(dir: &Path, prefix: &str, i: usize, body: &[u8]) -> anyhow::Result<()> {
    let path = dir.join(format!("{prefix}-{i:05}.grpc"));
    std::fs::write(&path, body).with_context(|| format!("cannot write {}", path.display()))
}

/// What Envoy's ext_authz filter sends for `GET /bench` with the key in `x-api-key`, as
/// `envoy/ext_authz.yaml` configures it (raw headers, only the allowed ones).
fn check_request(key: &str, i: usize) -> Vec<u8> {
    let header = |k: &str, v: &str| HeaderValue {
        key: k.into(),
        value: String::new(),
        raw_value: v.as_bytes().to_vec(),
    };
    frame(&CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    id: format!("bench-{i:05}"),
                    method: "GET".into(),
                    path: "/bench".into(),
                    host: "bench.local".into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    header_map: Some(HeaderMap {
                        headers: vec![
                            header(":authority", "bench.local"),
                            header(":method", "GET"),
                            header(":path", "/bench"),
                            header("x-api-key", key),
                        ],
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    })
}

fn rls_request(domain: &str, descriptor_key: &str, i: usize) -> Vec<u8> {
    frame(&RateLimitRequest {
        domain: domain.into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: descriptor_key.into(),
                value: format!("v{i:05}"),
            }],
            ..Default::default()
        }],
        hits_addend: 1,
    })
}

async fn create_keys(
    url: &str,
    count: usize,
    limits: Limits,
    name: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let config = DatabaseConfig {
        url: SecretUrl(url.to_string()),
        ..Default::default()
    };
    let stores = tollgate::store::open(&config, true)
        .await
        .context("cannot open the bench database")?;
    let now = chrono::Utc::now();
    let started = Instant::now();
    // Several at once: on PostgreSQL each create is a transaction with a round trip or two.
    let created: Vec<anyhow::Result<(i64, String)>> = futures_util::stream::iter(0..count)
        .map(|i| {
            let keys = stores.keys.clone();
            let name = format!("{name}-{i}");
            async move {
                let key = keys::generate();
                let record = tollgate::store::KeyRecord {
                    key: &key,
                    name: &name,
                    limits,
                    expires_at: None,
                    created_at: now,
                    permissions: &[],
                    metadata: &Default::default(),
                    identity_id: None,
                };
                let stored = keys.create(&record).await?;
                Ok((stored.id, key.plaintext))
            }
        })
        .buffered(8)
        .collect()
        .await;
    let mut lines = String::with_capacity(count * 52);
    for c in created {
        let (id, plaintext) = c?;
        lines.push_str(&format!("{id}\t{plaintext}\n"));
    }
    std::fs::write(out, lines).with_context(|| format!("cannot write {}", out.display()))?;
    stores.close().await;
    println!(
        "created {count} keys in {:.1} s; plaintexts in {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}

async fn verify(
    addr: &str,
    api: Api,
    concurrency: usize,
    tls_ca: Option<&std::path::Path>,
    args: &[PathBuf],
) -> anyhow::Result<()> {
    let mut files = Vec::with_capacity(args.len());
    for arg in args {
        if arg.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(arg)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "grpc"))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(arg.clone());
        }
    }
    let files = files.as_slice();
    if files.is_empty() {
        bail!("no body files given");
    }
    let mut endpoint = tonic::transport::Endpoint::from_shared(match tls_ca {
        None => format!("http://{addr}"),
        Some(_) => format!("https://{addr}"),
    })?;
    if let Some(ca) = tls_ca {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        endpoint = endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem))
                .domain_name("tollgate"),
        )?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let failures = Arc::new(AtomicU64::new(0));
    let first_failure = Arc::new(std::sync::Mutex::new(None::<String>));
    let results = futures_util::stream::iter(files)
        .map(|file| {
            let channel = channel.clone();
            let failures = failures.clone();
            let first_failure = first_failure.clone();
            async move {
                let outcome = verify_one(channel, api, file).await;
                if let Err(e) = outcome {
                    failures.fetch_add(1, Ordering::Relaxed);
                    first_failure
                        .lock()
                        .expect("lock")
                        .get_or_insert_with(|| format!("{e:#}"));
                }
            }
        })
        .buffer_unordered(concurrency.max(1));
    results.collect::<Vec<()>>().await;
    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        bail!(
            "{failed} of {} answers were not OK; first: {}",
            files.len(),
            first_failure
                .lock()
                .expect("lock")
                .clone()
                .unwrap_or_default()
        );
    }
    println!("{} answers, all gRPC OK and allowed", files.len());
    Ok(())
}

async fn verify_one(
    channel: tonic::transport::Channel,
    api: Api,
    file: &Path,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let message = unframe(&bytes, file)?;
    match api {
        Api::Check => {
            let request = CheckRequest::decode(message.as_slice())?;
            let answer = AuthorizationClient::new(channel)
                .check(request)
                .await
                .with_context(|| format!("{}: gRPC error", file.display()))?
                .into_inner();
            let code = answer.status.map(|s| s.code).unwrap_or_default();
            if code != 0 {
                bail!(
                    "{}: Check answered status code {code}, not OK",
                    file.display()
                );
            }
        }
        Api::Rls => {
            let request = RateLimitRequest::decode(message.as_slice())?;
            let answer = RateLimitServiceClient::new(channel)
                .should_rate_limit(request)
                .await
                .with_context(|| format!("{}: gRPC error", file.display()))?
                .into_inner();
            if answer.overall_code != Code::Ok as i32 {
                bail!(
                    "{}: ShouldRateLimit answered overall_code {}, not OK",
                    file.display(),
                    answer.overall_code
                );
            }
        }
    }
    Ok(())
}

/// PostgreSQL's quota statement with its parameters as tollgate binds them for a lone request of
/// a key with daily and monthly quotas that never run out: the key id from the
/// pgbench variable `:id`, the rest as today's values. pgbench's prepared mode (`-M prepared`)
/// sends it as a prepared statement, as sqlx does.
fn pgbench_sql() -> String {
    let today = chrono::Utc::now().date_naive();
    let month = today.format("%Y-%m-01").to_string();
    tollgate::bench_hooks::POSTGRES_CONSUME_SQL
        .replace("$1", ":id")
        .replace("$2", &format!("'{today}'::date"))
        .replace("$3", &format!("'{month}'::date"))
        .replace("$4", "1")
        .replace("$5", "1000000000000")
        .replace("$6", "1000000000000")
}

async fn sqlite_ceiling(url: &str, min_id: i64, max_id: i64, seconds: f64) -> anyhow::Result<()> {
    use sqlx::ConnectOptions;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    use std::str::FromStr;
    // The pragmas of tollgate's SqliteStore::open.
    let mut conn = SqliteConnectOptions::from_str(url)?
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true)
        .connect()
        .await?;
    let now = chrono::Utc::now();
    let day = tollgate::clock::day_label(now);
    let month = tollgate::clock::month_label(now);
    let now_text = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let span = (max_id - min_id + 1).max(1) as u64;
    let started = Instant::now();
    let mut n: u64 = 0;
    let mut admitted: u64 = 0;
    // A cheap deterministic spread over the ids (an LCG step per statement).
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    while started.elapsed().as_secs_f64() < seconds {
        for _ in 0..256 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let id = min_id + ((x >> 33) % span) as i64;
            use tollgate::bench_hooks::SqliteConsumeParam as P;
            let mut query = sqlx::query(tollgate::bench_hooks::SQLITE_CONSUME_SQL);
            for param in tollgate::bench_hooks::SQLITE_CONSUME_PARAMS {
                query = match param {
                    P::KeyId => query.bind(id),
                    P::Day => query.bind(day.clone()),
                    P::Month => query.bind(month.clone()),
                    P::Cost => query.bind(1_i64),
                    P::DailyLimit | P::MonthlyLimit => query.bind(1_000_000_000_000_i64),
                    P::Now => query.bind(now_text.clone()),
                    P::Index => query.bind(0_i64),
                };
            }
            let done = query.execute(&mut conn).await?;
            admitted += done.rows_affected();
            n += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if admitted != n {
        bail!("{} of {n} statements found no row or no room", n - admitted);
    }
    println!("{:.0}", n as f64 / elapsed);
    Ok(())
}
