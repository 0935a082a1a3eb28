//! A bench run's results directory, as `scripts/bench` fills it, read into typed loads. Every
//! file in it is a tool's own output, or a few `KEY VALUE` lines (`facts`) of what the output
//! does not say:
//!
//! ```text
//! facts                           describe, cores, duration, in_flight, request_log,
//!                                 envoy_concurrency, clk_tck
//! peers                           NAME ADDR, a line per --peer-rls, in their order
//! grpc/NNN-LABEL/                 one h2load load on tollgate; NNN: the order they ran in
//!   facts                         backend, api, keyset, shape, quota_mode, set_size, tls
//!                                 (on, off), and next_to, round for a load right before a
//!                                 peer's, part (tls) for a load of the TLS comparison
//!   h2load.I.out, h2load.I.log    each h2load process's summary and --log-file
//!   metrics.before, metrics.after tollgate's /metrics around the load
//!   stat.before, stat.after       tollgate's /proc/PID/stat around the load
//!   status.after                  tollgate's /proc/PID/status after it
//! peer/NNN-NAME-SHAPE-ROUND/      one h2load load on a peer: facts (peer, shape, round,
//!                                 set_size), h2load.I.out, h2load.I.log, and the peer's
//!                                 /proc/PID/stat around it (server.stat.before, .after) when
//!                                 the script found its process
//! ceilings/STEP-SHAPE-ROUND.out   redis-benchmark --csv, pgbench, or `bench_requests
//!                                 sqlite-ceiling` (STEP: redis, pgbench, sqlite)
//! ceilings/synchronous_commit     the PostgreSQL server's setting
//! envoy/NNN-NAME/                 one wrk load through Envoy: facts (filter, backend,
//!                                 quota_mode or peer), wrk.out, and /proc/PID/stat around it
//!                                 of Envoy (envoy.stat.*) and of the service behind it
//!                                 (server.stat.*)
//! memory/                         facts (keys), metrics, status
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::tools::{self, Metrics, WrkReport};

/// `KEY VALUE` lines; the value is the rest of the line.
#[derive(Debug)]
pub struct Facts {
    file: PathBuf,
    values: BTreeMap<String, String>,
}

impl Facts {
    pub fn read(file: &Path) -> anyhow::Result<Self> {
        let text = read(file)?;
        let values = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let (k, v) = l.split_once(' ').unwrap_or((l, ""));
                (k.to_string(), v.to_string())
            })
            .collect();
        Ok(Self {
            file: file.to_path_buf(),
            values,
        })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    pub fn text(&self, key: &str) -> anyhow::Result<&str> {
        self.get(key)
            .with_context(|| format!("{}: no {key}", self.file.display()))
    }

    pub fn number<T: std::str::FromStr>(&self, key: &str) -> anyhow::Result<T> {
        let v = self.text(key)?;
        v.parse()
            .ok()
            .with_context(|| format!("{}: {key} {v:?} is not a number", self.file.display()))
    }
}

fn read(file: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
}

/// The files of `dir` whose names start with `prefix` and end with `suffix`, sorted.
fn files(dir: &Path, prefix: &str, suffix: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(prefix) && name.ends_with(suffix) {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// The subdirectories of `dir`, sorted by name; none when `dir` does not exist.
fn subdirs(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    found.sort();
    Ok(found)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite, limits in memory: the default.
    Embedded,
    /// PostgreSQL for keys and quotas, Redis for the limits.
    Postgres,
}

impl Backend {
    fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "embedded" => Ok(Self::Embedded),
            "postgres" => Ok(Self::Postgres),
            _ => bail!("unknown backend {s:?}"),
        }
    }
}

/// What a load asks tollgate: the API, and for Check which kind of key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    CheckWithQuotas,
    CheckWithoutQuotas,
    ShouldRateLimit,
}

impl Request {
    fn parse(api: &str, keyset: &str) -> anyhow::Result<Self> {
        match (api, keyset) {
            ("check", "q") => Ok(Self::CheckWithQuotas),
            ("check", "n") => Ok(Self::CheckWithoutQuotas),
            ("rls", _) => Ok(Self::ShouldRateLimit),
            _ => bail!("unknown request: api {api:?}, keyset {keyset:?}"),
        }
    }
}

/// How the requests in flight are spread over connections and keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// One key; one h2load process, 4 connections with a quarter of the streams each.
    Hot,
    /// One key; a process per request in flight, one connection and one stream each.
    Hot32,
    /// As `Hot32`, each process with a different key of the set.
    Spread,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Hot, Shape::Hot32, Shape::Spread];

    fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "hot" => Ok(Self::Hot),
            "hot32" => Ok(Self::Hot32),
            "spread" => Ok(Self::Spread),
            _ => bail!("unknown shape {s:?}"),
        }
    }
}

/// The run's options and machine.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    /// `git describe` of the tree that was built.
    pub describe: String,
    pub cores: u32,
    /// Seconds per load.
    pub duration: u32,
    /// Requests in flight in every h2load load, connections of every wrk load.
    pub in_flight: u32,
    pub request_log: bool,
    pub envoy_concurrency: String,
    /// Clock ticks per second of `/proc/PID/stat`.
    pub clk_tck: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Peer {
    pub name: String,
    pub addr: String,
}

/// One h2load load, its processes added up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct H2loadRun {
    /// The sum of each process's requests per second over its own run, rounded.
    pub rps: f64,
    pub started: u64,
    pub done: u64,
    /// Requests that failed, errored, timed out or were not HTTP 200.
    pub errors: u64,
    /// Every request's time to the end of its response, in µs, sorted.
    pub latencies_us: Vec<u64>,
}

impl H2loadRun {
    /// Every `h2load.I.out` and `h2load.I.log` in `dir`.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let outs = files(dir, "h2load.", ".out")?;
        if outs.is_empty() {
            bail!("{}: no h2load output", dir.display());
        }
        let outs = outs
            .iter()
            .map(|f| read(f))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let logs = files(dir, "h2load.", ".log")?;
        let logs = logs
            .iter()
            .map(|f| read(f))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self::from_outputs(&outs, &logs))
    }

    pub fn from_outputs(outs: &[String], logs: &[String]) -> Self {
        let mut run = Self::default();
        for out in outs {
            let s = tools::h2load_summary(out);
            run.rps += s.rps;
            run.started += s.started;
            run.done += s.done;
            run.errors += s.errors;
        }
        run.rps = run.rps.round();
        for log in logs {
            let log = tools::h2load_log(log);
            run.errors += log.not_ok;
            run.latencies_us.extend(log.latencies_us);
        }
        run.latencies_us.sort_unstable();
        run
    }

    /// p50, p99 and p99.9 in ms, nearest rank over every request of every process.
    pub fn percentiles_ms(&self) -> Option<[f64; 3]> {
        let at = |q| tools::nearest_rank(&self.latencies_us, q).map(|us| us as f64 / 1000.0);
        Some([at(0.5)?, at(0.99)?, at(0.999)?])
    }
}

/// What tollgate's `/metrics` say it decided during a load.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decisions {
    /// Requests decided, in any way.
    pub decided: f64,
    /// Of those, allowed (Check) or OK (ShouldRateLimit).
    pub allowed: f64,
    /// Backend errors and fail-open answers.
    pub backend_failures: f64,
    /// The series of those that grew, with how much.
    pub failures_by_series: Vec<(String, f64)>,
}

impl Decisions {
    pub fn between(request: Request, before: &Metrics, after: &Metrics) -> Self {
        let grew = |prefix: &str| after.sum(prefix) - before.sum(prefix);
        let (all, ok) = match request {
            Request::ShouldRateLimit => (
                "tollgate_ratelimit_descriptors_total{",
                r#"tollgate_ratelimit_descriptors_total{outcome="ok"}"#,
            ),
            _ => (
                "tollgate_decisions_total{",
                r#"tollgate_decisions_total{api="authz",outcome="allow",reason="ok"}"#,
            ),
        };
        let failures = [
            "tollgate_backend_errors_total{",
            "tollgate_fail_open_total{",
        ];
        let failures_by_series = failures
            .iter()
            .flat_map(|prefix| after.series(prefix))
            .filter_map(|(name, v)| {
                let more = v - before.value(name);
                (more > 0.0).then(|| (name.to_string(), more))
            })
            .collect();
        Self {
            decided: grew(all),
            allowed: after.value(ok) - before.value(ok),
            backend_failures: failures.iter().map(|p| grew(p)).sum(),
            failures_by_series,
        }
    }
}

/// Whether every answer of a load on tollgate was an allowed, gRPC OK one: h2load saw only
/// complete HTTP 200s; tollgate decided every request h2load finished (a request answered with
/// a gRPC error is decided nowhere) and none it did not start; all were allowed; no backend
/// failed. The error is the sentence the bench fails with.
pub fn verdict(run: &H2loadRun, d: &Decisions, outputs: &Path) -> Result<(), String> {
    if run.errors != 0 {
        return Err(format!(
            "{} requests failed or were not HTTP 200 (see {}/h2load.*.out)",
            run.errors,
            outputs.display()
        ));
    }
    if d.allowed != d.decided {
        return Err(format!(
            "{} of {} answers were refusals",
            d.decided - d.allowed,
            d.decided
        ));
    }
    if d.backend_failures != 0.0 {
        return Err(format!(
            "{} backend errors or fail-open answers during the load",
            d.backend_failures
        ));
    }
    if d.decided < run.done as f64 || d.decided > run.started as f64 {
        return Err(format!(
            "h2load finished {} requests (started {}) but tollgate decided {}: some answers were gRPC errors",
            run.done, run.started, d.decided
        ));
    }
    if run.done == 0 {
        return Err("no request finished".into());
    }
    Ok(())
}

/// One h2load load on tollgate.
#[derive(Clone, Debug, PartialEq)]
pub struct TollgateLoad {
    pub backend: Backend,
    pub request: Request,
    pub shape: Shape,
    /// `quota.mode: batched` instead of exact.
    pub batched: bool,
    /// The peer this load ran right before, and which of the alternating rounds it was; none
    /// for the gRPC part's loads.
    pub next_to: Option<(String, u32)>,
    /// One of the TLS part's alternating loads (no row in the gRPC table); `tls`: tollgate
    /// served gRPC over TLS (`grpc_tls`) and h2load spoke TLS to it.
    pub tls_part: bool,
    pub tls: bool,
    /// Keys (or descriptor values) in the set the spread shape picks from.
    pub set_size: usize,
    pub run: H2loadRun,
    pub decisions: Decisions,
    /// tollgate's user and system CPU over the load, in clock ticks.
    pub cpu_ticks: u64,
    /// tollgate's peak RSS over its life (`VmHWM`), in KiB.
    pub peak_rss_kib: u64,
}

impl TollgateLoad {
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let facts = Facts::read(&dir.join("facts"))?;
        let request = Request::parse(facts.text("api")?, facts.get("keyset").unwrap_or("-"))?;
        let metrics = |name: &str| read(&dir.join(name)).map(|t| Metrics::parse(&t));
        let ticks = |name: &str| -> anyhow::Result<u64> {
            let file = dir.join(name);
            tools::cpu_ticks(&read(&file)?)
                .with_context(|| format!("{}: no CPU times", file.display()))
        };
        let status = dir.join("status.after");
        let next_to = match facts.get("next_to") {
            Some(peer) => Some((peer.to_string(), facts.number("round")?)),
            None => None,
        };
        Ok(Self {
            backend: Backend::parse(facts.text("backend")?)?,
            request,
            shape: Shape::parse(facts.text("shape")?)?,
            batched: facts.get("quota_mode") == Some("batched"),
            next_to,
            tls_part: facts.get("part") == Some("tls"),
            tls: facts.get("tls") == Some("on"),
            set_size: facts.number("set_size")?,
            run: H2loadRun::read(dir)?,
            decisions: Decisions::between(
                request,
                &metrics("metrics.before")?,
                &metrics("metrics.after")?,
            ),
            cpu_ticks: ticks("stat.after")?.saturating_sub(ticks("stat.before")?),
            peak_rss_kib: tools::status_kib(&read(&status)?, "VmHWM")
                .with_context(|| format!("{}: no VmHWM", status.display()))?,
        })
    }
}

/// CPU ticks (user + system) between `PREFIX.stat.before` and `PREFIX.stat.after` in `dir`, when
/// the script recorded them (a process it could name).
fn optional_ticks(dir: &Path, prefix: &str) -> anyhow::Result<Option<u64>> {
    let (before, after) = (
        dir.join(format!("{prefix}.stat.before")),
        dir.join(format!("{prefix}.stat.after")),
    );
    if !before.exists() || !after.exists() {
        return Ok(None);
    }
    let ticks = |file: &Path| -> anyhow::Result<u64> {
        tools::cpu_ticks(&read(file)?).with_context(|| format!("{}: no CPU times", file.display()))
    };
    Ok(Some(ticks(&after)?.saturating_sub(ticks(&before)?)))
}

/// One h2load load on a peer rate limit service.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerLoad {
    pub peer: String,
    pub shape: Shape,
    pub round: u32,
    pub set_size: usize,
    pub run: H2loadRun,
    /// The peer's user and system CPU over the load, in clock ticks (`server.stat.*`), when the
    /// script found its process.
    pub cpu_ticks: Option<u64>,
}

impl PeerLoad {
    fn read(dir: &Path) -> anyhow::Result<Self> {
        let facts = Facts::read(&dir.join("facts"))?;
        Ok(Self {
            peer: facts.text("peer")?.to_string(),
            shape: Shape::parse(facts.text("shape")?)?,
            round: facts.number("round")?,
            set_size: facts.number("set_size")?,
            run: H2loadRun::read(dir)?,
            cpu_ticks: optional_ticks(dir, "server")?,
        })
    }
}

/// The atomic step of a request, without tollgate around it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `fixed_window.lua` by EVALSHA, redis-benchmark.
    Redis,
    /// PostgreSQL's `CONSUME_SQL`, pgbench.
    Postgres,
    /// SQLite's `CONSUME_SQL` on one connection, `bench_requests sqlite-ceiling`.
    Sqlite,
}

impl Step {
    pub const ALL: [Step; 3] = [Step::Redis, Step::Postgres, Step::Sqlite];

    fn file_stem(self) -> &'static str {
        match self {
            Step::Redis => "redis",
            Step::Postgres => "pgbench",
            Step::Sqlite => "sqlite",
        }
    }

    /// The figure in what the step's tool printed.
    pub fn figure(self, output: &str) -> Option<f64> {
        match self {
            Step::Redis => tools::redis_benchmark_rps(output),
            Step::Postgres => tools::pgbench_tps(output),
            Step::Sqlite => output.trim().parse().ok(),
        }
    }
}

/// A ceiling's loads, in the order they ran (steps per second).
#[derive(Clone, Debug, PartialEq)]
pub struct Ceiling {
    pub step: Step,
    /// Hot (one row or counter) or spread.
    pub shape: Shape,
    pub rounds: Vec<f64>,
}

impl Ceiling {
    /// The best of the rounds: a ceiling bounds what the machine can do.
    pub fn best(&self) -> Option<f64> {
        self.rounds.iter().copied().reduce(f64::max).map(f64::round)
    }
}

fn read_ceilings(dir: &Path) -> anyhow::Result<Vec<Ceiling>> {
    let mut ceilings = Vec::new();
    for step in Step::ALL {
        for (shape, name) in [(Shape::Hot, "hot"), (Shape::Spread, "spread")] {
            let mut rounds = Vec::new();
            for round in 1.. {
                let file = dir.join(format!("{}-{name}-{round}.out", step.file_stem()));
                if !file.exists() {
                    break;
                }
                let figure = step
                    .figure(&read(&file)?)
                    .with_context(|| format!("{}: no figure", file.display()))?;
                rounds.push(figure);
            }
            if !rounds.is_empty() {
                ceilings.push(Ceiling {
                    step,
                    shape,
                    rounds,
                });
            }
        }
    }
    Ok(ceilings)
}

/// What a request through Envoy passes before the upstream.
#[derive(Clone, Debug, PartialEq)]
pub enum EnvoyPath {
    /// Nothing: Envoy alone.
    Direct,
    ExtAuthz {
        backend: Backend,
        batched: bool,
    },
    RateLimit {
        backend: Backend,
    },
    /// The ratelimit filter calling a peer instead of tollgate.
    PeerRateLimit {
        peer: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct EnvoyLoad {
    pub path: EnvoyPath,
    pub wrk: WrkReport,
    /// Envoy's and the service's (tollgate's or the peer's) CPU over the load, in clock ticks
    /// (`envoy.stat.*`, `server.stat.*`), when recorded.
    pub envoy_ticks: Option<u64>,
    pub server_ticks: Option<u64>,
}

impl EnvoyLoad {
    fn read(dir: &Path) -> anyhow::Result<Self> {
        let facts = Facts::read(&dir.join("facts"))?;
        let backend = || Backend::parse(facts.text("backend")?);
        let path = match (facts.text("filter")?, facts.get("peer")) {
            ("none", _) => EnvoyPath::Direct,
            ("ext_authz", _) => EnvoyPath::ExtAuthz {
                backend: backend()?,
                batched: facts.get("quota_mode") == Some("batched"),
            },
            ("ratelimit", Some(peer)) => EnvoyPath::PeerRateLimit { peer: peer.into() },
            ("ratelimit", None) => EnvoyPath::RateLimit {
                backend: backend()?,
            },
            (other, _) => bail!("{}: unknown filter {other:?}", dir.display()),
        };
        let out = dir.join("wrk.out");
        let wrk = tools::wrk_report(&read(&out)?)
            .with_context(|| format!("{}: no BENCH line", out.display()))?;
        Ok(Self {
            path,
            wrk,
            envoy_ticks: optional_ticks(dir, "envoy")?,
            server_ticks: optional_ticks(dir, "server")?,
        })
    }
}

/// tollgate with many keys in its database, some of them cached.
#[derive(Clone, Debug, PartialEq)]
pub struct Memory {
    pub keys: u64,
    pub cached: u64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

impl Memory {
    fn read(dir: &Path) -> anyhow::Result<Self> {
        let facts = Facts::read(&dir.join("facts"))?;
        let metrics = Metrics::parse(&read(&dir.join("metrics"))?);
        let status = read(&dir.join("status"))?;
        let kib = |field| {
            tools::status_kib(&status, field)
                .with_context(|| format!("{}: no {field}", dir.join("status").display()))
        };
        Ok(Self {
            keys: facts.number("keys")?,
            cached: metrics.value("tollgate_key_cache_entries") as u64,
            rss_kib: kib("VmRSS")?,
            peak_rss_kib: kib("VmHWM")?,
        })
    }
}

/// Everything one bench run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Results {
    pub run: Run,
    pub peers: Vec<Peer>,
    /// tollgate's h2load loads, in the order they ran.
    pub tollgate: Vec<TollgateLoad>,
    pub peer_loads: Vec<PeerLoad>,
    pub ceilings: Vec<Ceiling>,
    pub synchronous_commit: String,
    /// The loads through Envoy, in the order they ran.
    pub envoy: Vec<EnvoyLoad>,
    pub memory: Option<Memory>,
}

impl Results {
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let facts = Facts::read(&dir.join("facts"))?;
        let run = Run {
            describe: facts.text("describe")?.to_string(),
            cores: facts.number("cores")?,
            duration: facts.number("duration")?,
            in_flight: facts.number("in_flight")?,
            request_log: facts.text("request_log")? == "on",
            envoy_concurrency: facts.text("envoy_concurrency")?.to_string(),
            clk_tck: facts.number("clk_tck")?,
        };
        let peers_file = dir.join("peers");
        let peers = if peers_file.exists() {
            read(&peers_file)?
                .lines()
                .filter_map(|l| l.split_once(' '))
                .map(|(name, addr)| Peer {
                    name: name.into(),
                    addr: addr.into(),
                })
                .collect()
        } else {
            Vec::new()
        };
        let each = |part: &str| subdirs(&dir.join(part));
        let ceilings_dir = dir.join("ceilings");
        let sync_file = ceilings_dir.join("synchronous_commit");
        Ok(Self {
            run,
            peers,
            tollgate: each("grpc")?
                .iter()
                .map(|d| TollgateLoad::read(d))
                .collect::<anyhow::Result<_>>()?,
            peer_loads: each("peer")?
                .iter()
                .map(|d| PeerLoad::read(d))
                .collect::<anyhow::Result<_>>()?,
            ceilings: if ceilings_dir.is_dir() {
                read_ceilings(&ceilings_dir)?
            } else {
                Vec::new()
            },
            synchronous_commit: if sync_file.exists() {
                read(&sync_file)?.trim().to_string()
            } else {
                String::new()
            },
            envoy: each("envoy")?
                .iter()
                .map(|d| EnvoyLoad::read(d))
                .collect::<anyhow::Result<_>>()?,
            memory: if dir.join("memory").is_dir() {
                Some(Memory::read(&dir.join("memory"))?)
            } else {
                None
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(errors: u64, started: u64, done: u64) -> H2loadRun {
        H2loadRun {
            rps: 1000.0,
            started,
            done,
            errors,
            latencies_us: vec![1000],
        }
    }

    fn decided(decided: f64, allowed: f64, backend_failures: f64) -> Decisions {
        Decisions {
            decided,
            allowed,
            backend_failures,
            failures_by_series: Vec::new(),
        }
    }

    #[test]
    fn h2load_processes_add_up() {
        let out = |rps, n| {
            format!(
                "finished in 3.00s, {rps} req/s, 1MB/s\n\
                 requests: {n} total, {n} started, {n} done, {n} succeeded, 0 failed, 0 errored, 0 timeout\n\
                 status codes: {n} 2xx, 0 3xx, 0 4xx, 0 5xx\n"
            )
        };
        let run = H2loadRun::from_outputs(
            &[out("100.4", 300), out("200.4", 600)],
            &[
                "1\t200\t3000\n2\t200\t1000\n".into(),
                "3\t200\t2000\n".into(),
            ],
        );
        assert_eq!(run.rps, 301.0);
        assert_eq!((run.started, run.done, run.errors), (900, 900, 0));
        assert_eq!(run.latencies_us, [1000, 2000, 3000]);
        assert_eq!(run.percentiles_ms(), Some([2.0, 3.0, 3.0]));
        assert_eq!(H2loadRun::default().percentiles_ms(), None);
    }

    #[test]
    fn decisions_from_metrics() {
        let before = Metrics::parse(
            "tollgate_decisions_total{api=\"authz\",outcome=\"allow\",reason=\"ok\"} 10\n\
             tollgate_backend_errors_total{backend=\"database\"} 1\n",
        );
        let after = Metrics::parse(
            "tollgate_decisions_total{api=\"authz\",outcome=\"allow\",reason=\"ok\"} 110\n\
             tollgate_decisions_total{api=\"authz\",outcome=\"deny\",reason=\"missing_key\"} 2\n\
             tollgate_backend_errors_total{backend=\"database\"} 1\n\
             tollgate_backend_errors_total{backend=\"limiter\"} 3\n\
             tollgate_ratelimit_descriptors_total{outcome=\"ok\"} 7\n",
        );
        let d = Decisions::between(Request::CheckWithQuotas, &before, &after);
        assert_eq!(
            (d.decided, d.allowed, d.backend_failures),
            (102.0, 100.0, 3.0)
        );
        assert_eq!(
            d.failures_by_series,
            [(
                "tollgate_backend_errors_total{backend=\"limiter\"}".to_string(),
                3.0
            )]
        );
        let d = Decisions::between(Request::ShouldRateLimit, &before, &after);
        assert_eq!((d.decided, d.allowed), (7.0, 7.0));
    }

    #[test]
    fn verdict_passes_only_clean_loads() {
        let dir = Path::new("/w/grpc/001-x");
        assert_eq!(
            verdict(&run_with(0, 105, 100), &decided(102.0, 102.0, 0.0), dir),
            Ok(())
        );
        assert_eq!(
            verdict(&run_with(3, 105, 100), &decided(102.0, 102.0, 0.0), dir),
            Err("3 requests failed or were not HTTP 200 (see /w/grpc/001-x/h2load.*.out)".into())
        );
        assert_eq!(
            verdict(&run_with(0, 105, 100), &decided(102.0, 98.0, 0.0), dir),
            Err("4 of 102 answers were refusals".into())
        );
        assert_eq!(
            verdict(&run_with(0, 105, 100), &decided(102.0, 102.0, 2.0), dir),
            Err("2 backend errors or fail-open answers during the load".into())
        );
        let gaps = "h2load finished 100 requests (started 105) but tollgate decided";
        assert_eq!(
            verdict(&run_with(0, 105, 100), &decided(99.0, 99.0, 0.0), dir),
            Err(format!("{gaps} 99: some answers were gRPC errors"))
        );
        assert_eq!(
            verdict(&run_with(0, 105, 100), &decided(106.0, 106.0, 0.0), dir),
            Err(format!("{gaps} 106: some answers were gRPC errors"))
        );
        assert_eq!(
            verdict(&run_with(0, 0, 0), &decided(0.0, 0.0, 0.0), dir),
            Err("no request finished".into())
        );
    }

    #[test]
    fn ceiling_keeps_the_better_round() {
        let c = |rounds: &[f64]| Ceiling {
            step: Step::Redis,
            shape: Shape::Hot,
            rounds: rounds.to_vec(),
        };
        assert_eq!(c(&[50684.2, 61125.4]).best(), Some(61125.0));
        assert_eq!(c(&[11670.6, 9287.0]).best(), Some(11671.0));
        assert_eq!(c(&[]).best(), None);
    }

    #[test]
    fn facts_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("facts");
        std::fs::write(&file, "describe 4951faa-dirty\ncores 2\nempty\n").expect("write");
        let facts = Facts::read(&file).expect("facts");
        assert_eq!(facts.text("describe").expect("describe"), "4951faa-dirty");
        assert_eq!(facts.number::<u32>("cores").expect("cores"), 2);
        assert_eq!(facts.get("empty"), Some(""));
        assert!(facts.text("missing").is_err());
        assert!(facts.number::<u32>("describe").is_err());
    }
}
