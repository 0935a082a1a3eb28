//! The figures of `scripts/bench`, from what its loads printed: the benchmark's report, not part
//! of tollgate.
//!
//! The script starts and stops the services and runs the load tools; each tool's own output
//! goes into the run's results directory (its layout: `results.rs`). This reads it back: the
//! checks the script makes right after a load (`check-grpc`, and one figure of a tool's output
//! where the script needs it), and at the end the whole Markdown report (`report`): the tables,
//! the best of alternating loads, the ratios and the targets.
//!
//! ```sh
//! cargo run --release --example bench_report -- report WORK/results
//! cargo run --release --example bench_report -- check-grpc WORK/results/grpc/001-embedded-check-q-hot
//! cargo run --release --example bench_report -- wrk-errors WORK/results/envoy/001-direct/wrk.out
//! ```
//!
//! `scripts/bench --keep` keeps the work directory, so a report can be printed again from it.

mod report;
mod results;
mod tools;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use results::{H2loadRun, Results, Step, TollgateLoad};

#[derive(Parser)]
#[command(about = "Reads what scripts/bench's loads printed: its checks and its Markdown report")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prints the Markdown report of a results directory.
    Report { results: PathBuf },
    /// Fails unless every answer of a load on tollgate was an allowed, gRPC OK one; prints why
    /// on standard output, and what grew of the backend failures on standard error.
    CheckGrpc {
        load: PathBuf,
        /// tollgate's log, whose end is shown on backend failures.
        #[arg(long)]
        tollgate_log: Option<PathBuf>,
    },
    /// Prints how many requests of an h2load load (its `h2load.I.*` files) failed, errored,
    /// timed out or were not HTTP 200.
    H2loadErrors { load: PathBuf },
    /// Prints the errors and non-2xx answers of a wrk load (`examples/bench/wrk-report.lua`).
    WrkErrors { output: PathBuf },
    /// Prints redis-benchmark's figure (`--csv`); fails when there is none.
    RedisBenchmarkRps { output: PathBuf },
    /// Prints pgbench's tps; fails when there is none.
    PgbenchTps { output: PathBuf },
    /// Prints one sample of a `/metrics` page (0 when absent).
    Metric { name: String, page: PathBuf },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench_report: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Report { results } => {
            let results = Results::read(&results)?;
            let date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
            print!("{}", report::render(&results, &date));
        }
        Command::CheckGrpc { load, tollgate_log } => {
            let found = TollgateLoad::read(&load)?;
            if let Err(why) = results::verdict(&found.run, &found.decisions, &load) {
                for (series, more) in &found.decisions.failures_by_series {
                    eprintln!("{series} +{more}");
                }
                if found.decisions.backend_failures != 0.0
                    && let Some(log) = tollgate_log
                {
                    eprint!("{}", tail(&log, 20));
                }
                println!("{why}");
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::H2loadErrors { load } => println!("{}", H2loadRun::read(&load)?.errors),
        Command::WrkErrors { output } => {
            let wrk = tools::wrk_report(&read(&output)?)
                .with_context(|| format!("{}: no BENCH line", output.display()))?;
            println!("{}", wrk.errors);
        }
        Command::RedisBenchmarkRps { output } => println!("{}", figure(Step::Redis, &output)?),
        Command::PgbenchTps { output } => println!("{}", figure(Step::Postgres, &output)?),
        Command::Metric { name, page } => {
            println!("{}", tools::Metrics::parse(&read(&page)?).value(&name));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read(file: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
}

fn figure(step: Step, output: &Path) -> anyhow::Result<f64> {
    step.figure(&read(output)?)
        .with_context(|| format!("{}: no figure", output.display()))
}

/// The last `n` lines of a file, or nothing when it cannot be read.
fn tail(file: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A results directory as `scripts/bench` leaves it, from the captured tool output of
    /// `examples/bench/samples/`: one gRPC load, ceilings, Envoy alone and the memory part.
    fn results_dir() -> tempfile::TempDir {
        let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bench/samples");
        let dir = tempfile::tempdir().expect("tempdir");
        let put = |to: &str, text: &str| {
            let path = dir.path().join(to);
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        };
        let copy = |to: &str, sample: &str| {
            put(to, &read(&samples.join(sample)).expect("a sample"));
        };
        put(
            "facts",
            "describe abc1234\ncores 2\nduration 3\nin_flight 32\nenvoy_concurrency 2\n\
             request_log on\nclk_tck 100\n",
        );
        let grpc = "grpc/001-embedded-check-q-hot";
        put(
            &format!("{grpc}/facts"),
            "backend embedded\napi check\nkeyset q\nshape hot\nquota_mode exact\nset_size 1000\n",
        );
        copy(&format!("{grpc}/h2load.0.out"), "h2load.out");
        copy(&format!("{grpc}/h2load.0.log"), "h2load.log");
        copy(&format!("{grpc}/metrics.before"), "metrics-before.txt");
        copy(&format!("{grpc}/metrics.after"), "metrics-after.txt");
        copy(&format!("{grpc}/stat.before"), "proc-stat-before");
        copy(&format!("{grpc}/stat.after"), "proc-stat-after");
        copy(&format!("{grpc}/status.after"), "proc-status");
        copy("ceilings/redis-hot-1.out", "redis-benchmark.csv");
        put(
            "ceilings/redis-hot-2.out",
            "\"test\",\"rps\"\n\"EVALSHA\",\"16000.40\"\n",
        );
        copy("ceilings/pgbench-hot-1.out", "pgbench.out");
        put("ceilings/sqlite-hot-1.out", "9340\n");
        put("ceilings/synchronous_commit", "on\n");
        put("envoy/002-direct/facts", "filter none\n");
        copy("envoy/002-direct/wrk.out", "wrk.out");
        put("memory/facts", "keys 1000000\n");
        copy("memory/metrics", "metrics-after.txt");
        copy("memory/status", "proc-status");
        dir
    }

    #[test]
    fn a_report_from_captured_output() {
        let dir = results_dir();
        let results = Results::read(dir.path()).expect("results");
        let page = report::render(&results, "2026-11-27 01:26 UTC");
        let lines: Vec<&str> = page.lines().collect();
        assert_eq!(
            lines[0],
            "tollgate abc1234, 2026-11-27 01:26 UTC, 2 cores, 3 s per load, 32 requests in flight, request log on"
        );
        for row in [
            // 4 ticks over 200 decisions; VmHWM 15,780 KiB.
            "| Check, key with quotas | embedded | 1; 4 conns × 8 streams | 3917 | 5.11 | 20.43 | 20.44 | 0.200 | 15 |",
            "| Redis: `fixed_window.lua` by EVALSHA (redis-benchmark, 32 clients) | hot | 16000 (15886, 16000) |",
            "| PostgreSQL: `CONSUME_SQL` (pgbench -M prepared, 16 clients, synchronous_commit=on) | hot | 421 (421) |",
            "| SQLite: `CONSUME_SQL` (one connection, WAL, synchronous=NORMAL) | hot | 9340 (9340) |",
            "| Check with quotas, embedded / SQLite UPDATE | 42% | n/a |",
            "| Envoy → upstream | 12334 | 0.252 | 21.524 | 29.664 | — | — | — | — |",
            "| 1000000 | 1 | 15 | 15 |",
            "| Check with quotas embedded, hot ≥ 80% of SQLite UPDATE | 3917 | 7472 | not met (52%) |",
            "| Check on PostgreSQL + Redis, hot row ≥ 80% of pgbench | not measured | 337 | — |",
            "| Peak RSS ≤ 64 MiB, 1 million keys in the database, 100,000 cached | 15 MiB | 64 MiB | met |",
        ] {
            assert!(lines.contains(&row), "no row {row:?} in\n{page}");
        }
        assert!(!page.contains("peer rate limit services"));
        assert!(page.ends_with("| met |\n"));
    }

    #[test]
    fn a_clean_grpc_load_passes_its_check() {
        let dir = results_dir();
        let load =
            TollgateLoad::read(&dir.path().join("grpc/001-embedded-check-q-hot")).expect("a load");
        assert_eq!(load.decisions.decided, 200.0);
        assert_eq!(load.cpu_ticks, 4);
        assert_eq!(
            results::verdict(&load.run, &load.decisions, dir.path()),
            Ok(())
        );
    }
}
