//! `pgcache demo`: throwaway Postgres and Redis, a shop, the daemon and a live view.

use std::process::ExitCode;
use std::time::Duration;

use crate::demo::{self, DemoOptions};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Run this many seconds without waiting for Ctrl-C, then summarize, check that Redis
    /// matches Postgres (exit 1 if not) and clean up.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: Option<u64>,
    /// Write transactions per second (reads run at four times this rate).
    #[arg(
        long,
        value_name = "TX_PER_SEC",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    pub rate: u32,
    /// After the summary, keep Postgres, Redis and the daemon running until Ctrl-C, to try
    /// the suggested commands.
    #[arg(long)]
    pub keep: bool,
    /// Run Redis as a local 3-master Redis Cluster instead of one server: the daemon writes
    /// each hash slot with its own checkpoint, and the reader reads each key from its master.
    #[arg(long)]
    pub cluster: bool,
}

pub(crate) async fn demo(args: DemoArgs) -> ExitCode {
    use tracing_subscriber::EnvFilter;
    // Only warnings by default: the live view is the output.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
    let options = DemoOptions {
        duration: args.seconds.map(Duration::from_secs),
        rate: args.rate,
        keep: args.keep,
        cluster: args.cluster,
    };
    match demo::run(options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
