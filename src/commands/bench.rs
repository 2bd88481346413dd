//! `pgcache bench`: throwaway servers, every measurement against its floor, a table and a
//! JSON file.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::bench::{self, BenchOptions, Part};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Scale every workload down about ten times: a smoke run, not a measurement.
    #[arg(long)]
    pub quick: bool,
    /// Where to write the figures as JSON.
    #[arg(long, value_name = "FILE", default_value = "bench-results.json")]
    pub json: PathBuf,
    /// Run only these measurements (comma separated): catchup, latency, backfill, reader,
    /// memory, cluster (the daemon on a local 3-master Redis Cluster against one Redis).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub only: Vec<Part>,
}

pub(crate) async fn bench(args: BenchArgs) -> ExitCode {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
    let daemon_exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("error: cannot find this executable to run the daemon: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: this is a debug build; its numbers say little. Measure with \
             `cargo run --release -- bench`."
        );
    }
    let parts = if args.only.is_empty() {
        Part::ALL.to_vec()
    } else {
        args.only
    };
    let report = bench::run(BenchOptions {
        quick: args.quick,
        parts,
        daemon_exe,
        progress: true,
    })
    .await;
    println!("{}", report.table());
    println!("{}", report.summary());
    if let Err(e) = report.write_json(&args.json) {
        eprintln!("error: cannot write {}: {e}", args.json.display());
        return ExitCode::FAILURE;
    }
    eprintln!("figures written to {}", args.json.display());
    if report.failures().next().is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
