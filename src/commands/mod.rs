//! The command line: `run`, `check`, and the operator commands, one file each.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};

mod check;
mod run;

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
        Command::Run { config } => run::run(&config).await,
        Command::Check { config } => check::check(&config).await,
    }
}

pub(crate) fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!(
            "error: {} is not a valid pgcache config:\n{e}",
            path.display()
        );
        ExitCode::from(2)
    })
}

pub(crate) fn init_logging(config: &Config) {
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
