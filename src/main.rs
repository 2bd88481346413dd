//! The `pgcache` command: see `pgcache --help`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = pgcache::commands::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(pgcache::commands::main(cli))
}
