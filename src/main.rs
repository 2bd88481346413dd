//! The `pgcache` command: see `pgcache --help`.

use std::process::ExitCode;

use clap::Parser;
use pgcache::commands::{Cli, Command};

fn main() -> ExitCode {
    fixed_mmap_threshold();
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

/// Keeps glibc's mmap threshold fixed (G8). By default glibc raises it each time a block
/// above it is freed, up to 32 MB; after a few batches every script and chunk buffer then
/// comes from the heap, which keeps what it grew to, fragmented. Measured with
/// `cluster_daemon::a_backfill_on_a_cluster_stays_in_bounded_memory` (a million rows):
/// peak RSS 90-108 MB with the default, 76-99 MB with a fixed 256 kB, with the same live heap
/// (~48 MB at the peak). Buffers over 256 kB are few (a batch's scripts, a chunk's rows), so
/// mapping and unmapping each costs nothing measurable.
fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called first thing in `main`, before any other thread exists; `mallopt` only
    // sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}
