//! A throwaway Redis server: a `redis-server` child process on a free port.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::{file_len, find_on_path, free_port, log_contains_since, run, tail, wait_for};

/// How to set up a [`TestRedis`].
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// `appendonly yes` with `appendfsync always`: every acknowledged write survives
    /// [`TestRedis::kill9`].
    pub appendonly: bool,
    /// More `redis-server` arguments, e.g. `["--maxmemory", "10mb"]`.
    pub extra_args: Vec<String>,
    /// `cluster-enabled yes`, with the cluster bus on a free port of its own (Redis 7 on):
    /// a node for [`TestRedisCluster`](super::TestRedisCluster), which joins the nodes.
    pub cluster: bool,
    /// Runs a sentinel (`redis-server sentinel.conf --sentinel`) with these lines of
    /// configuration, written to `sentinel.conf` in its directory at the first start (the
    /// sentinel rewrites it as it learns). See [`TestSentinelGroup`](super::TestSentinelGroup).
    pub sentinel: Option<String>,
    /// TLS as well, on a port of its own ([`TestRedis::tls_port`]), with this certificate;
    /// clients are not asked for one. A cluster node also speaks TLS on the cluster bus
    /// (`tls-cluster yes`), so the cluster gives TLS clients the nodes' TLS ports.
    pub tls: Option<super::CertFiles>,
}

/// A Redis server of our own, on a free port, with its files in a temporary directory.
/// RDB snapshots are off (`--save ""`).
pub struct TestRedis {
    /// The working directory: AOF files, the log, the captured stdout and stderr.
    dir: tempfile::TempDir,
    port: u16,
    /// The cluster bus port (`cluster-port`) with [`RedisOptions::cluster`], else 0.
    bus_port: u16,
    /// The TLS port with [`RedisOptions::tls`], else 0.
    tls_port: u16,
    opts: RedisOptions,
    /// The running server; `None` after `stop` or `kill9`.
    child: Option<Child>,
    /// Removes `dir` if this process dies without running `Drop` (the server itself dies
    /// by its parent-death signal).
    watchdog: Option<Child>,
}

/// `cluster-node-timeout` of cluster nodes: how long a master may be unreachable before
/// its replica takes over. Short, so that failover tests are quick.
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 2_000;

/// How long a server gets to answer PING after it is started, or to exit after SHUTDOWN.
const PATIENCE: Duration = Duration::from_secs(10);

impl TestRedis {
    /// Starts a server with [`RedisOptions::default`] (no persistence).
    ///
    /// # Errors
    /// See [`start_with`](Self::start_with).
    pub fn start() -> Result<TestRedis> {
        Self::start_with(RedisOptions::default())
    }

    /// Starts a server and waits until it answers PING.
    ///
    /// # Errors
    /// When `redis-server` is missing or does not come up within 10 s; the error holds
    /// its log.
    pub fn start_with(opts: RedisOptions) -> Result<TestRedis> {
        let dir = tempfile::Builder::new()
            .prefix("pgcache-redis-")
            .tempdir()
            .context("creating a temporary directory for Redis")?;
        let mut redis = TestRedis {
            dir,
            port: 0,
            bus_port: 0,
            tls_port: 0,
            opts,
            child: None,
            watchdog: None,
        };
        // The server may still write for a moment after our death; retry once.
        let cleanup = r#"rm -rf -- "$0" 2>/dev/null || { sleep 1; rm -rf -- "$0"; }"#;
        let mut watchdog = Command::new("/bin/sh");
        watchdog
            .arg("-c")
            .arg(super::watchdog_script(cleanup))
            .arg(redis.dir.path())
            .current_dir(redis.dir.path());
        redis.watchdog =
            Some(super::spawn_watchdog(watchdog).context("starting the Redis watchdog shell")?);
        if redis.opts.cluster && redis_major_version() < 7 {
            bail!(
                "a cluster node needs redis-server 7 or newer (for cluster-port); this one is {}",
                redis_major_version()
            );
        }
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            redis.port = free_port()?;
            if redis.opts.cluster {
                redis.bus_port = free_port()?;
            }
            if redis.opts.tls.is_some() {
                redis.tls_port = free_port()?;
            }
            let log_offset = file_len(&redis.log_path());
            match redis.launch() {
                Ok(()) => return Ok(redis),
                // Another process took the port between our check and the server's bind.
                Err(_)
                    if attempt < ATTEMPTS
                        && log_contains_since(&redis.log_path(), log_offset, "in use") => {}
                Err(err) => return Err(err),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// The TCP port on 127.0.0.1; it stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server runs (not stopped or killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The cluster bus port of a cluster node (`cluster-port`); 0 when not one.
    pub fn bus_port(&self) -> u16 {
        self.bus_port
    }

    /// The TLS port with [`RedisOptions::tls`] (on 127.0.0.1, the same across restarts);
    /// 0 without.
    pub fn tls_port(&self) -> u16 {
        self.tls_port
    }

    /// `rediss://127.0.0.1:{tls_port}/`, with [`RedisOptions::tls`].
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.tls_port)
    }

    /// The server's working directory (AOF files, `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `redis://127.0.0.1:{port}/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Runs `redis-cli --raw` with `args` and returns its trimmed output.
    ///
    /// # Errors
    /// When redis-cli fails, including when Redis answers with an error (the error then
    /// holds the reply).
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let cli = find_on_path("redis-cli").ok_or_else(|| {
            anyhow!(
                "redis-cli not found in PATH; install it with `apt-get install -y redis-server`"
            )
        })?;
        let port = self.port.to_string();
        let mut cmd = Command::new(cli);
        cmd.args(["-h", "127.0.0.1", "-p", &port, "--raw"]);
        // Without -e (Redis 7 on) redis-cli exits 0 on an error reply.
        let exits_on_error = redis_major_version() >= 7;
        if exits_on_error {
            cmd.arg("-e");
        }
        cmd.args(args).stdin(Stdio::null());
        let output = run(&mut cmd, &format!("redis-cli {}", args.join(" ")))?;
        let first = output.split_whitespace().next().unwrap_or_default();
        if !exits_on_error && ["ERR", "WRONGTYPE", "NOSCRIPT", "LOADING", "BUSY"].contains(&first) {
            bail!("redis-cli {}: {output}", args.join(" "));
        }
        Ok(output)
    }

    /// Shuts the server down cleanly (`SHUTDOWN SAVE` when it persists, so the data is on
    /// disk) and waits for it to exit; kills it if it takes longer than 10 s. Stopping a
    /// stopped server does nothing.
    ///
    /// # Errors
    /// When the server could not be made to exit.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let command = if self.opts.appendonly {
            ["SHUTDOWN", "SAVE"]
        } else {
            ["SHUTDOWN", "NOSAVE"]
        };
        // The server closes the connection instead of answering.
        let _ = resp_command(self.port, &command);
        let exited = wait_for(PATIENCE, || matches!(child.try_wait(), Ok(Some(_))));
        if !exited {
            let _ = child.kill();
            child.wait().context("waiting for redis-server")?;
            bail!(
                "Redis on port {} ignored SHUTDOWN for 10 s and was killed\n--- log ---\n{}",
                self.port,
                self.log()
            );
        }
        Ok(())
    }

    /// Kills the server with `SIGKILL` and waits for it; only the AOF (with `appendonly`)
    /// survives.
    ///
    /// # Errors
    /// When it is not running.
    pub fn kill9(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("Redis on port {} is not running", self.port);
        };
        child.kill().context("killing redis-server")?;
        child.wait().context("waiting for redis-server")?;
        Ok(())
    }

    /// Stops the server where it is (`SIGSTOP`): its connections stay open and nothing is
    /// answered, as with a hung Redis, until [`resume`](Self::resume).
    ///
    /// # Errors
    /// When it is not running or cannot be signalled.
    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// Lets a paused server go on (`SIGCONT`); it then answers what it was sent meanwhile.
    ///
    /// # Errors
    /// When it is not running or cannot be signalled.
    pub fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, signal: libc::c_int) -> Result<()> {
        let Some(child) = &self.child else {
            bail!("Redis on port {} is not running", self.port);
        };
        let pid = libc::pid_t::try_from(child.id()).context("the server's pid")?;
        // SAFETY: kill(2) with our own child's pid and a valid signal number.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signalling redis-server (pid {pid})"));
        }
        Ok(())
    }

    /// Starts the stopped (or killed) server again on the same port and directory.
    ///
    /// # Errors
    /// When it already runs or does not come up.
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("Redis on port {} is already running", self.port);
        }
        self.launch()
    }

    /// The end of the server log, plus anything it printed before the log was open.
    pub fn log(&self) -> String {
        let early = fs::read_to_string(self.output_path()).unwrap_or_default();
        let log = tail(&self.log_path(), 200);
        if early.trim().is_empty() {
            log
        } else {
            format!("{log}\n--- stdout/stderr ---\n{}", early.trim())
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn output_path(&self) -> PathBuf {
        self.dir.path().join("redis.out")
    }

    /// Spawns `redis-server` and waits until it answers PING.
    fn launch(&mut self) -> Result<()> {
        let server = find_on_path("redis-server").ok_or_else(|| {
            anyhow!(
                "redis-server not found in PATH; install it with `apt-get install -y redis-server`"
            )
        })?;
        let output = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.output_path())
            .context("opening redis.out")?;
        let mut cmd = Command::new(server);
        if let Some(lines) = &self.opts.sentinel {
            let conf = self.dir.path().join("sentinel.conf");
            if !conf.exists() {
                fs::write(&conf, lines).context("writing sentinel.conf")?;
            }
            cmd.arg(conf).arg("--sentinel");
        }
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .args([
                "--appendonly",
                if self.opts.appendonly { "yes" } else { "no" },
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path());
        if self.opts.appendonly {
            cmd.args(["--appendfsync", "always"]);
        }
        if self.opts.cluster {
            // nodes.conf lives in --dir, so a restarted node rejoins with its identity.
            cmd.args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .arg("--cluster-port")
                .arg(self.bus_port.to_string())
                .args([
                    "--cluster-node-timeout",
                    &CLUSTER_NODE_TIMEOUT_MS.to_string(),
                ])
                // The topology stays as the test built it: no replica moves to another master.
                .args(["--cluster-allow-replica-migration", "no"]);
        }
        if let Some(certs) = &self.opts.tls {
            cmd.arg("--tls-port")
                .arg(self.tls_port.to_string())
                .arg("--tls-cert-file")
                .arg(&certs.server_cert)
                .arg("--tls-key-file")
                .arg(&certs.server_key)
                .arg("--tls-ca-cert-file")
                .arg(&certs.ca_cert)
                .args(["--tls-auth-clients", "no"]);
            if self.opts.cluster {
                cmd.args(["--tls-cluster", "yes"]);
            }
        }
        if redis_major_version() >= 7 && self.opts.sentinel.is_none() {
            cmd.args(["--enable-debug-command", "yes"]);
        }
        cmd.args(&self.opts.extra_args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(output.try_clone().context("cloning redis.out")?)
            .stderr(output);
        let mut child = spawn_tied_to_process(cmd).context("starting redis-server")?;

        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "redis-server on port {} exited at startup ({status})\n--- log ---\n{}",
                    self.port,
                    self.log()
                );
            }
            // Until the AOF is loaded the answer is -LOADING, so wait for the PONG itself.
            if resp_command(self.port, &["PING"]).is_ok_and(|reply| reply == "+PONG") {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "redis-server on port {} did not answer PING within 10 s\n--- log ---\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        for mut process in [self.child.take(), self.watchdog.take()]
            .into_iter()
            .flatten()
        {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

/// Sends one command and returns the first line of the reply.
fn resp_command(port: u16, args: &[&str]) -> std::io::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

/// The major version of `redis-server` (`--enable-debug-command` exists from 7 on).
pub(super) fn redis_major_version() -> u32 {
    static MAJOR: OnceLock<u32> = OnceLock::new();
    *MAJOR.get_or_init(|| {
        let Some(server) = find_on_path("redis-server") else {
            return 0;
        };
        let Ok(output) = Command::new(server).arg("--version").output() else {
            return 0;
        };
        // "Redis server v=7.0.15 sha=..."
        String::from_utf8_lossy(&output.stdout)
            .split("v=")
            .nth(1)
            .and_then(|rest| rest.split('.').next()?.parse().ok())
            .unwrap_or(0)
    })
}

/// Spawns a child that the kernel kills when this process dies, even by `SIGKILL`.
///
/// The parent-death signal fires when the *thread* that forked the child exits, not the
/// process, so the fork happens on one thread that lives as long as the process. Otherwise
/// a server started on a test's thread (or in a `spawn_blocking`) would die with it.
fn spawn_tied_to_process(mut cmd: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();

    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls, without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl took effect.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("testkit-spawner".to_string())
            .spawn(move || {
                for (mut cmd, reply) in incoming {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map(drop)
            .unwrap_or_else(|err| eprintln!("testkit: cannot start the spawner thread: {err}"));
        Mutex::new(requests)
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("the testkit spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the testkit spawner thread is gone"))?
}
