//! The command line: `run`, `check`, and the operator commands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::sync::watch;

use crate::config::{Config, LogFormat};
use crate::daemon::{self, RunError};
use crate::pgconn::{self, PgTarget};
use crate::preflight::{self, Level};

#[derive(Debug, Parser)]
#[command(
    name = "pgcache",
    version,
    about = "Keeps Redis in step with PostgreSQL"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream committed changes from the replication slot into Redis until SIGTERM/SIGINT.
    Run {
        /// The TOML config file (every key can be overridden as PGCACHE__SECTION__KEY).
        #[arg(long, short, env = "PGCACHE_CONFIG")]
        config: PathBuf,
    },
    /// Check the config and the servers; print OK / WARN / FAIL with fixes; exit 1 on FAIL.
    Check {
        #[arg(long, short, env = "PGCACHE_CONFIG")]
        config: PathBuf,
    },
}

pub async fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { config } => run(&config).await,
        Command::Check { config } => check(&config).await,
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!(
            "error: {} is not a valid pgcache config:\n{e}",
            path.display()
        );
        ExitCode::from(2)
    })
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,pgcache={}", config.log.level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

async fn run(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => Arc::new(config),
        Err(code) => return code,
    };
    init_logging(&config);
    crate::metrics::describe();
    if let Some(addr) = config.metrics.listen {
        let installed = metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install();
        if let Err(e) = installed {
            eprintln!("error: metrics.listen {addr}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: finishing the batch in hand");
        let _ = stop.send(true);
    });
    match daemon::run(config, stopped).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Fatal(message) | RunError::Transient(message)) => {
            tracing::error!("{message}");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn check(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    println!(
        "OK   config {} ({} tables)",
        path.display(),
        config.tables.len()
    );
    let mut worst = Level::Ok;
    match postgres_findings(&config).await {
        Ok(findings) => {
            for finding in findings {
                worst = worst.max(finding.level);
                println!("{finding}");
            }
        }
        Err(message) => {
            worst = Level::Fail;
            println!("FAIL {message}");
        }
    }
    match redis_ping(&config).await {
        Ok(()) => println!("OK   redis reachable"),
        Err(message) => {
            worst = Level::Fail;
            println!("FAIL redis: {message}\n     fix: check redis.url and that Redis is running");
        }
    }
    if worst == Level::Fail {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn postgres_findings(config: &Config) -> Result<Vec<preflight::Finding>, String> {
    let target =
        PgTarget::parse(config.postgres.url.expose()).map_err(|e| format!("postgres.url: {e}"))?;
    let client = pgconn::connect(&target)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", target.redacted()))?;
    preflight::postgres_findings(&client, config)
        .await
        .map_err(|e| format!("catalog query failed: {e}"))
}

async fn redis_ping(config: &Config) -> Result<(), String> {
    let client = redis::Client::open(config.redis.url.expose()).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
