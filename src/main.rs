//! The `pgcache` command: see `pgcache --help`.

use std::process::ExitCode;

use clap::Parser;
use pgcache::commands::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon is one pipeline (stream in, Redis out) whose connections' tasks and the
    // loop itself hand work to each other all the time: on one thread that costs nothing,
    // across threads every hand-off is a wake-up (measured: a quarter less CPU per
    // transaction at 10,000/s). Postgres and Redis do their work in their own processes.
    // The other commands (demo, bench) run several things at once and use every core.
    let mut builder = match cli.command {
        Command::Run { .. } => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(pgcache::commands::main(cli))
}
