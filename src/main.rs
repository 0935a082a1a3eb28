//! The `tollgate` binary: parse the command line, load the configuration, run the command.

use std::process::ExitCode;

use clap::Parser;
use tollgate::app::{App, shutdown_signal};
use tollgate::cli::{Cli, Command, run_identities, run_keys, run_usage};
use tollgate::config::Config;
use tollgate::{store, telemetry};

/// mimalloc instead of the system allocator: every request allocates and frees dozens of small
/// buffers (protobuf messages, HTTP/2 frames, headers), and glibc's malloc and free were a fifth
/// of tollgate's CPU under load (BENCHMARKS.md, "Profile").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_process(cli.config.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tollgate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match run(cli.command, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {}", tollgate::config::error_chain(e.as_ref()));
            // Bad rules and certificate files are bad configuration.
            if e.downcast_ref::<tollgate::ratelimit::rules::RulesError>()
                .is_some()
                || e.downcast_ref::<tollgate::tls::TlsError>().is_some()
            {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            telemetry::init_logging(&config.log);
            for w in &config.warnings {
                tracing::warn!("{w}");
            }
            App::build(config).await?.run(shutdown_signal()).await
        }
        Command::Migrate => {
            open_database(&config).await?.close().await;
            println!("Migrations applied to {}.", config.database.url);
            Ok(())
        }
        Command::CheckConfig => {
            for w in &config.warnings {
                eprintln!("tollgate: warning: {w}");
            }
            if config.grpc_tls.enabled() {
                let cert = tollgate::tls::GrpcTls::load(&config.grpc_tls)?.info();
                println!(
                    "gRPC TLS certificate is valid: serial {}, subject {}, expires {}.",
                    cert.serial,
                    cert.subject,
                    cert.not_after_rfc3339()
                );
            }
            if let Some(path) = &config.ratelimit.rules {
                let rules =
                    tollgate::ratelimit::rules::Rules::load(path, config.ratelimit.merge_domains)?;
                println!(
                    "Rate limit rules are valid: {} domain(s).",
                    rules.domains().count()
                );
            }
            println!("Configuration is valid.\n{config:#?}");
            Ok(())
        }
        Command::Usage(args) => {
            let stores = open_database(&config).await?;
            let out = run_usage(args, &stores, chrono::Utc::now()).await;
            stores.close().await;
            print!("{}", out?);
            Ok(())
        }
        Command::Keys { command } => {
            let stores = open_database(&config).await?;
            let out = run_keys(command, &config, &stores, chrono::Utc::now()).await;
            stores.close().await;
            print!("{}", out?);
            Ok(())
        }
        Command::Identities { command } => {
            let stores = open_database(&config).await?;
            let out = run_identities(command, &config, &stores, chrono::Utc::now()).await;
            stores.close().await;
            print!("{}", out?);
            Ok(())
        }
    }
}

/// The database the commands use, migrated; an error names it (without its secrets).
async fn open_database(config: &Config) -> anyhow::Result<store::Stores> {
    use anyhow::Context;
    store::open(&config.database, true)
        .await
        .with_context(|| format!("cannot open database {}", config.database.url))
}
