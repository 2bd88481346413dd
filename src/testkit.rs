//! Throwaway Postgres and Redis servers, started from the local binaries on free ports.
//!
//! The integration tests and `pgcache demo` both need real servers that nobody else uses:
//! [`TestPostgres`] (logical replication on, optional TLS and a SCRAM user) and
//! [`TestRedis`] (optionally with an fsync-always append-only file). Both can be stopped,
//! killed with `SIGKILL` and started again on the same port and data, which is what the
//! fault tests are made of.
//!
//! Nothing here panics: every failure is an [`anyhow::Error`] that carries the server's log,
//! so a failing test says why the server did not come up.
//!
//! # Layout
//! - `pg_install`: the Postgres binaries (the directory in `PGCACHE_PG_BINDIR`, else the
//!   system's), the OS user the server runs as, the initdb template (one per installation).
//! - `pg_server`: [`TestPostgres`] and its options.
//! - `redis_server`: [`TestRedis`] and its options.
//! - `redis_cluster`: [`TestRedisCluster`], masters and replicas joined into a Redis
//!   Cluster.
//! - `tls_certs`: a throwaway CA and server certificate for `PgOptions::ssl` (and for tests
//!   that run TLS servers of their own: [`generate_tls_certs`]).
//! - here: free ports, process and log helpers shared by both servers.
//!
//! # Cleanup
//! `Drop` stops the server and removes its temporary directory. If the process dies without
//! unwinding (abort, `SIGKILL`, Ctrl-C), Redis dies with it (parent-death signal) and each
//! Postgres has a small watchdog shell that shuts it down and removes its directory once our
//! end of its stdin pipe closes. Only the initdb template, which is shared on purpose, stays.

mod pg_install;
mod pg_server;
mod proxy;
mod redis_cluster;
mod redis_sentinel;
mod redis_server;
mod tls_certs;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::Rng;

pub use crate::cluster::{parse_cluster_nodes, ClusterNode, CLUSTER_SLOTS};
pub use pg_server::{PgOptions, TestPostgres};
pub use proxy::{Direction, TcpProxy};
pub use redis_cluster::TestRedisCluster;
pub use redis_sentinel::TestSentinelGroup;
pub use redis_server::{RedisOptions, TestRedis, CLUSTER_NODE_TIMEOUT_MS};
pub use tls_certs::{generate as generate_tls_certs, CertFiles};

/// Ports of the system servers on this machine; never hand them out even if they look free.
const RESERVED_PORTS: [u16; 2] = [5432, 6379];

/// Returns a TCP port on 127.0.0.1 that nothing listens on right now.
///
/// Ports come from below the kernel's ephemeral range, so that the local end of some
/// outgoing connection cannot take a port while its server is stopped between `stop` and
/// `start_again`. A port is never handed out twice in one process, so servers started by
/// parallel tests do not collide; another process may still take it before the server
/// binds, which is why the servers retry a clashing start on a fresh port.
///
/// # Errors
/// When no port could be bound at all.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let usable = |port: u16| !RESERVED_PORTS.contains(&port) && !handed_out.contains(&port);

    let (low, high) = port_range_outside_ephemeral();
    let mut rng = rand::thread_rng();
    for _ in 0..500 {
        let port = rng.gen_range(low..=high);
        if usable(port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return Ok(port);
        }
    }
    // Fall back to whatever the kernel picks.
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .context("binding 127.0.0.1:0 to find a free port")?
            .port();
        if usable(port) {
            handed_out.insert(port);
            return Ok(port);
        }
    }
    bail!("found no free TCP port on 127.0.0.1")
}

/// The widest port range that stays out of the kernel's ephemeral range.
fn port_range_outside_ephemeral() -> (u16, u16) {
    let ephemeral = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((parts.next()??, parts.next()??))
        });
    match ephemeral {
        Some((first, _)) if first > 12_000 => (10_000, first - 1),
        Some((_, last)) if last < 55_000 => (last + 1, 65_000),
        _ => (20_000, 30_000),
    }
}

/// Runs a command to completion and returns its trimmed stdout.
///
/// # Errors
/// When it cannot be spawned or exits unsuccessfully; the error holds its stdout and stderr.
fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let output = cmd
        .output()
        .with_context(|| format!("{what}: could not run {:?}", cmd.get_program()))?;
    check_output(&output, what)
}

fn check_output(output: &Output, what: &str) -> Result<String> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!(
            "{what} failed ({}):\n{}\n{}",
            output.status,
            stderr.trim(),
            stdout.trim()
        );
    }
    Ok(stdout.trim().to_string())
}

/// Removes libpq's `PG*` variables from a command's environment, so a developer's
/// `PGHOST`, `PGSSLMODE` or `PGOPTIONS` cannot redirect or alter what the harness runs.
fn clear_pg_env(cmd: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PG") {
            cmd.env_remove(name);
        }
    }
}

/// The last `lines` lines of a log file (reads at most the last 256 KiB).
fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(256 * 1024);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return format!("(could not read {})", path.display());
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether the file at `path` contains `needle` after byte `offset`.
fn log_contains_since(path: &Path, offset: u64, needle: &str) -> bool {
    let Ok(mut file) = fs::File::open(path) else {
        return false;
    };
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(offset)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return false;
    }
    String::from_utf8_lossy(&bytes).contains(needle)
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Finds an executable on `PATH`.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Polls `done` every few milliseconds until it is true or `timeout` passes.
fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// One process as `/proc/<pid>/stat` shows it.
struct ProcStat {
    state: char,
    ppid: i32,
    pgrp: i32,
}

fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(ProcStat { state, ppid, pgrp })
}

/// Whether a process still runs. A zombie counts as gone: our init may never reap it.
fn process_alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|stat| stat.state != 'Z' && stat.state != 'X')
}

/// Living processes that are `pid`'s children or members of the process group `pid` leads.
fn family_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&other| other != pid)
        .filter(|&other| {
            proc_stat(other).is_some_and(|stat| {
                (stat.ppid == pid || stat.pgrp == pid) && stat.state != 'Z' && stat.state != 'X'
            })
        })
        .collect()
}

/// SIGKILLs a process with its children and process group, and waits (bounded) until all
/// of them are gone. Postgres backends would notice a dead postmaster on their own, but a
/// crash test wants the open connections to die at once, as they do when a machine fails.
fn kill_family(pid: i32) -> Result<()> {
    let family = family_of(pid);
    // SAFETY: kill(2) has no memory-safety preconditions. The group kill only reaches a
    // group that `pid` leads (a group id is its leader's pid and is not reused while the
    // group exists).
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
        for &member in &family {
            libc::kill(member, libc::SIGKILL);
        }
    }
    let gone = wait_for(Duration::from_secs(10), || {
        !process_alive(pid) && family.iter().all(|&member| !process_alive(member))
    });
    if !gone {
        bail!("process {pid} or its children still run 10 s after SIGKILL");
    }
    Ok(())
}

/// Wraps a cleanup script so it runs only once this process is gone: the shell blocks
/// reading its stdin, a pipe whose write end only we hold, so it reads EOF exactly when we
/// exit, however we exit. `Drop` kills the shell before its cleanup ever runs.
fn watchdog_script(cleanup: &str) -> String {
    format!("trap '' HUP INT\nread -r _ignored\n{cleanup}")
}

/// Spawns a watchdog shell built with [`watchdog_script`]. It gets its own process group
/// so that a Ctrl-C aimed at the tests does not kill it before it has cleaned up.
fn spawn_watchdog(mut cmd: Command) -> std::io::Result<Child> {
    cmd.process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}
