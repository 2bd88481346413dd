//! Child processes the bench times: `pgcache run` and `pg_recvlogical`.
//!
//! Children are reaped with `wait4(2)` rather than `Child::wait`, because its resource
//! usage holds the child's peak resident set (`ru_maxrss`) exactly, even for a process
//! that exits on its own before anyone could read `/proc/<pid>/status`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::BenchError;
use crate::testkit;

/// How a child ended.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    /// The raw wait status.
    pub status: i32,
    /// Peak resident set, in KiB.
    pub max_rss_kib: u64,
    /// CPU time used, user plus system.
    pub cpu_seconds: f64,
}

impl Exit {
    pub fn success(&self) -> bool {
        libc::WIFEXITED(self.status) && libc::WEXITSTATUS(self.status) == 0
    }

    pub fn describe(&self) -> String {
        if libc::WIFEXITED(self.status) {
            format!("exit code {}", libc::WEXITSTATUS(self.status))
        } else if libc::WIFSIGNALED(self.status) {
            format!("killed by signal {}", libc::WTERMSIG(self.status))
        } else {
            format!("wait status {}", self.status)
        }
    }
}

/// A running child, with its output going to a log file.
pub struct Process {
    pid: i32,
    /// What it is, for messages.
    name: String,
    log: PathBuf,
    exit: Option<Exit>,
}

impl Process {
    /// Starts `cmd` with stdout and stderr appended to `log`. The child gets SIGKILL if the
    /// bench dies, so an interrupted run leaves no daemon behind. Must be called from a
    /// thread that lives as long as the child (a runtime worker, not a blocking-pool
    /// thread): the parent-death signal follows the thread that forked.
    ///
    /// # Errors
    /// The program cannot be started or the log opened.
    pub fn spawn(mut cmd: Command, name: &str, log: &Path) -> Result<Process, BenchError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| BenchError::Setup(format!("opening {}: {e}", log.display())))?;
        let err = file
            .try_clone()
            .map_err(|e| BenchError::Setup(format!("opening {}: {e}", log.display())))?;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| BenchError::Setup(format!("cannot start {name}: {e}")))?;
        Ok(Process {
            pid: child.id() as i32,
            name: name.to_string(),
            log: log.to_path_buf(),
            exit: None,
        })
    }

    /// The exit, if the child has ended (reaping it the first time).
    pub fn try_exit(&mut self) -> Option<Exit> {
        if self.exit.is_none() {
            self.exit = reap(self.pid, false);
        }
        self.exit
    }

    /// An error if the child has ended, with the end of its log.
    ///
    /// # Errors
    /// The child is gone.
    pub fn check_running(&mut self) -> Result<(), BenchError> {
        match self.try_exit() {
            None => Ok(()),
            Some(exit) => Err(BenchError::Child(format!(
                "{} ended early ({})\n--- its log ---\n{}",
                self.name,
                exit.describe(),
                self.log_tail()
            ))),
        }
    }

    /// Waits for the child to end by itself, polling every millisecond (the bench times
    /// children by their exit).
    ///
    /// # Errors
    /// It did not end within `limit` (it is then killed).
    pub async fn wait(&mut self, limit: Duration) -> Result<Exit, BenchError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(exit) = self.try_exit() {
                return Ok(exit);
            }
            if Instant::now() > deadline {
                self.kill().await;
                return Err(BenchError::Timeout(format!(
                    "{} did not finish within {limit:?}\n--- its log ---\n{}",
                    self.name,
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// SIGTERM, then SIGKILL after 30 s; returns how it ended.
    pub async fn stop(&mut self) -> Exit {
        if let Some(exit) = self.try_exit() {
            return exit;
        }
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(exit) = self.try_exit() {
                return exit;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.kill().await
    }

    async fn kill(&mut self) -> Exit {
        if let Some(exit) = self.try_exit() {
            return exit;
        }
        // SAFETY: as above.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        loop {
            if let Some(exit) = self.try_exit() {
                return exit;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// CPU time used so far (user plus system), from `/proc/<pid>/stat`.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds_of(self.pid)
    }

    /// Everything the child has written.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 60 lines of the child's output.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exit.is_none() {
            // SAFETY: as above; then reap so no zombie is left.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = reap(self.pid, true);
        }
    }
}

/// A process's CPU time (user plus system) so far.
pub fn cpu_seconds_of(pid: i32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) / ticks as f64)
}

/// The machine's CPU time so far, busy and total, from `/proc/stat` (in clock ticks).
pub fn machine_cpu() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    // idle and iowait are the 4th and 5th.
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// `wait4` on one child; `None` while it runs (or if it is not ours to reap).
fn reap(pid: i32, block: bool) -> Option<Exit> {
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let flags = if block { 0 } else { libc::WNOHANG };
    // SAFETY: valid pointers to locals.
    let got = unsafe { libc::wait4(pid, &mut status, flags, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (got == pid).then(|| Exit {
        status,
        max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
        cpu_seconds: seconds(usage.ru_utime) + seconds(usage.ru_stime),
    })
}

/// `pgcache run --config <file>` as a child, its log in `log`.
pub fn daemon_command(exe: &Path, config: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("run").arg("--config").arg(config);
    // Only the config file decides; a developer's PGCACHE__ variables must not leak in.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PGCACHE") || name == "RUST_LOG" {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// `pg_recvlogical` streaming `slot` with pgoutput into /dev/null until `end`.
///
/// # Errors
/// The binary is not installed.
pub fn recvlogical_command(
    port: u16,
    db: &str,
    slot: &str,
    publication: &str,
    end: crate::Lsn,
) -> Result<Command, BenchError> {
    let bin = testkit::TestPostgres::bin("pg_recvlogical")
        .map_err(|e| BenchError::Setup(format!("{e:#}")))?;
    let mut cmd = Command::new(bin);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PG") {
            cmd.env_remove(name);
        }
    }
    cmd.args(["-h", "127.0.0.1", "-U", "postgres", "--no-loop", "--start"])
        .arg("-p")
        .arg(port.to_string())
        .arg("-d")
        .arg(db)
        .arg("--slot")
        .arg(slot)
        .args(["-o", "proto_version=1", "-o"])
        .arg(format!("publication_names={publication}"))
        .args(["-o", "messages=true", "-f", "/dev/null"])
        .arg("-E")
        .arg(end.to_string());
    Ok(cmd)
}

/// `GET /metrics` from the daemon's endpoint: the body.
///
/// # Errors
/// The endpoint does not answer with 200.
pub async fn scrape(port: u16) -> Result<String, BenchError> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await?;
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&bytes).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| BenchError::Child("the daemon's /metrics did not answer in 5 s".into()))?
        .map_err(|e| BenchError::Child(format!("reading the daemon's /metrics: {e}")))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        let status = head.lines().next().unwrap_or_default();
        return Err(BenchError::Child(format!(
            "the daemon's /metrics answered {status:?}"
        )));
    }
    Ok(body.to_string())
}
