//! The command line: `run`, `check`, and the operator commands, one file each.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

mod bench;
mod check;
mod demo;
mod resync;
mod run;
mod status;
mod verify;

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
    /// Measure pgcache against floors on throwaway servers; print a table, write JSON.
    Bench(bench::BenchArgs),
    /// Try pgcache on this machine: throwaway Postgres and Redis, a shop workload, a live view.
    Demo(demo::DemoArgs),
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
    /// Show slot lag, checkpoint, backfill progress, keys per table and the daemon's heartbeat.
    Status {
        #[arg(long, short, env = "PGCACHE_CONFIG")]
        config: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Compare Redis with Postgres; exit 0 when they agree, 1 on drift, 2 on a bad config.
    Verify {
        #[arg(long, short, env = "PGCACHE_CONFIG")]
        config: PathBuf,
        /// Only this table (schema.table, or table for public).
        #[arg(long)]
        table: Option<String>,
        /// Check this many random rows (and keys) per table instead of all of them.
        #[arg(long)]
        sample: Option<u64>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running daemon (through the replication stream) to backfill mirror tables again.
    Resync {
        #[arg(long, short, env = "PGCACHE_CONFIG")]
        config: PathBuf,
        /// Only this table (schema.table); every mirror table when omitted.
        #[arg(long)]
        table: Option<String>,
    },
}

pub async fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Bench(args) => bench::bench(args).await,
        Command::Demo(args) => demo::demo(args).await,
        Command::Run { config } => run::run(&config).await,
        Command::Check { config } => check::check(&config).await,
        Command::Status { config, json } => status::status(&config, json).await,
        Command::Verify {
            config,
            table,
            sample,
            json,
        } => verify::verify(&config, table.as_deref(), sample, json).await,
        Command::Resync { config, table } => resync::resync(&config, table.as_deref()).await,
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
