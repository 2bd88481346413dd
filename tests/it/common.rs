//! Shared pieces of the integration tests: a Postgres + Redis pair set up with our SQL
//! scripts, the daemon (in process or as a child process), and polling with deadlines.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgcache::config::Config;
use pgcache::testkit::{PgOptions, RedisOptions, TestPostgres, TestRedis};
use tokio::sync::watch;

pub const DB: &str = "app";

/// A database and a Redis server with a publication and a slot, made by `sql/setup.sql`.
pub struct Env {
    pub pg: TestPostgres,
    pub redis: TestRedis,
    pub dir: tempfile::TempDir,
}

impl Env {
    /// Starts both servers, creates the schema with `schema_sql`, then runs `sql/setup.sql`
    /// for `tables` (comma separated, schema qualified; none: no setup at all).
    pub fn start(schema_sql: &str, tables: &str) -> Env {
        Self::start_with(
            PgOptions::default(),
            RedisOptions::default(),
            schema_sql,
            tables,
        )
    }

    pub fn start_with(pg: PgOptions, redis: RedisOptions, schema_sql: &str, tables: &str) -> Env {
        let pg = TestPostgres::start_with(pg).expect("start postgres");
        let redis = TestRedis::start_with(redis).expect("start redis");
        pg.create_database(DB).expect("create database");
        pg.psql(DB, schema_sql)
            .unwrap_or_else(|e| panic!("schema: {e:#}\n{}", pg.log()));
        let env = Env {
            pg,
            redis,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        if tables.is_empty() {
            return env;
        }
        env.run_sql_file(
            "sql/setup.sql",
            &[
                ("role", "pgcache"),
                ("password", "pgcache-secret"),
                ("publication", "pgcache"),
                ("slot", "pgcache"),
                ("tables", tables),
            ],
        );
        env
    }

    /// Runs one of our SQL scripts with psql variables, as the scripts' headers say.
    pub fn run_sql_file(&self, file: &str, vars: &[(&str, &str)]) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let mut cmd = Command::new(TestPostgres::bin("psql").expect("psql"));
        cmd.args([
            "-X",
            "-q",
            "-At",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            DB,
        ])
        .arg("-p")
        .arg(self.pg.port().to_string())
        .arg("-f")
        .arg(&path);
        for (name, value) in vars {
            cmd.arg("-v").arg(format!("{name}={value}"));
        }
        let out = cmd.output().expect("run psql");
        assert!(
            out.status.success(),
            "{file} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.pg.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Lets `role` (a daemon role made by the test) write the control table, as
    /// `sql/events.sql` does for the role it is given.
    pub fn grant_control(&self, role: &str) {
        self.sql(&format!(
            "GRANT USAGE ON SCHEMA pgcache TO {role}; \
             GRANT SELECT, INSERT, DELETE ON pgcache.events TO {role};"
        ));
    }

    pub fn sql(&self, sql: &str) -> String {
        self.pg
            .psql(DB, sql)
            .unwrap_or_else(|e| panic!("{sql}: {e:#}\n{}", self.pg.log()))
    }

    /// A config file for these servers with the given `[[tables]]` TOML.
    pub fn config_toml(&self, tables: &str) -> String {
        format!(
            "[postgres]\nurl = \"{}\"\nslot = \"pgcache\"\npublication = \"pgcache\"\n\n\
             [redis]\nurl = \"{}\"\n\n[metrics]\nlisten = \"\"\n\n{tables}\n",
            self.pg.url(DB),
            self.redis.url()
        )
    }

    pub fn write_config(&self, tables: &str) -> PathBuf {
        let path = self.dir.path().join("pgcache.toml");
        std::fs::write(&path, self.config_toml(tables)).expect("write config");
        path
    }

    pub fn config(&self, tables: &str) -> Arc<Config> {
        Arc::new(Config::from_toml_str(&self.config_toml(tables)).expect("valid config"))
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect redis")
    }

    /// A plain client of the test database.
    pub async fn pg_client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.pg.url(DB), tokio_postgres::NoTls)
            .await
            .expect("connect postgres");
        tokio::spawn(conn);
        client
    }
}

/// Waits until a daemon has taken the checkpoint over and written a position: it streams.
pub async fn wait_streaming(r: &mut redis::aio::MultiplexedConnection) {
    eventually(Duration::from_secs(30), "the daemon to stream", || {
        let mut r = r.clone();
        async move {
            let applied: Option<String> = redis::cmd("HGET")
                .arg("pgcache:{pgcache}:checkpoint")
                .arg("applied")
                .query_async(&mut r)
                .await
                .ok()?;
            applied.map(drop)
        }
    })
    .await;
}

/// The checkpoint's progress field for a table, if any.
pub async fn backfill_progress(
    r: &mut redis::aio::MultiplexedConnection,
    table: &str,
) -> Option<serde_json::Value> {
    let value: Option<String> = redis::cmd("HGET")
        .arg("pgcache:{pgcache}:checkpoint")
        .arg(format!("backfill:{table}"))
        .query_async(r)
        .await
        .ok()?;
    value.map(|v| serde_json::from_str(&v).expect("progress is JSON"))
}

pub async fn wait_backfill_done(
    r: &mut redis::aio::MultiplexedConnection,
    table: &str,
    limit: Duration,
) {
    eventually(limit, &format!("backfill of {table} to finish"), || {
        let mut r = r.clone();
        async move {
            let p = backfill_progress(&mut r, table).await?;
            (p["state"] == "done").then_some(())
        }
    })
    .await;
}

/// The daemon running inside the test process.
pub struct InProcess {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), pgcache::daemon::RunError>>,
}

impl InProcess {
    pub fn start(config: Arc<Config>) -> InProcess {
        // RUST_LOG=pgcache=debug shows the daemon's log in a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(pgcache::daemon::run(
            config,
            stopped,
            pgcache::daemon::Hooks::default(),
        ));
        InProcess { stop, task }
    }

    /// Waits for the daemon to end by itself (a fatal error), up to `limit`.
    pub async fn ended(self, limit: Duration) -> Result<(), pgcache::daemon::RunError> {
        tokio::time::timeout(limit, self.task)
            .await
            .expect("the daemon ends by itself")
            .expect("daemon task")
    }

    pub async fn stop(self) -> Result<(), pgcache::daemon::RunError> {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("daemon stops within 30 s")
            .expect("daemon task")
    }
}

/// The `pgcache` binary as a child process (for kill -9 and exit codes).
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    pub fn spawn(config: &Path, log: &Path) -> Daemon {
        Self::spawn_logging(config, log, "pgcache=debug")
    }

    /// Like [`spawn`](Self::spawn), with this `RUST_LOG` filter.
    pub fn spawn_logging(config: &Path, log: &Path, filter: &str) -> Daemon {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("daemon log");
        let child = Command::new(env!("CARGO_BIN_EXE_pgcache"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", filter)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn pgcache");
        Daemon {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the process where it is (SIGSTOP): a daemon that lags.
    pub fn pause(&self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGSTOP);
        }
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGCONT);
        }
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.wait(Duration::from_secs(30))
    }

    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("pgcache did not exit in {limit:?}\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `pgcache` with arguments to completion: (exit code, stdout, stderr).
pub fn pgcache(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgcache"))
        .args(args)
        .output()
        .expect("run pgcache");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `check` until it returns `Some`, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

pub async fn get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("GET")
}

pub async fn get_json(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Option<serde_json::Value> {
    get(conn, key).await.map(|text| {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{key} holds bad JSON {text:?}: {e}"))
    })
}

/// Waits until `key` holds `expected` (or is absent, for `None`).
pub async fn wait_for_json(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    expected: Option<serde_json::Value>,
) {
    let mut last;
    let limit = Duration::from_secs(20);
    let deadline = Instant::now() + limit;
    loop {
        let now = get_json(conn, key).await;
        if now == expected {
            return;
        }
        last = Some(now);
        if Instant::now() > deadline {
            panic!("{key}: expected {expected:?}, still {last:?} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn keys(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(conn)
        .await
        .expect("KEYS");
    keys.sort();
    keys
}

impl Daemon {
    /// The child's process id, e.g. to read its memory use from `/proc/<pid>/status`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Waits until the daemon has applied everything written so far.
pub async fn settled(env: &Env, r: &mut redis::aio::MultiplexedConnection) {
    let client = env.pg_client().await;
    let lsn: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let lsn: pgcache::Lsn = lsn.parse().unwrap();
    let want = pgcache::checkpoint::hex(lsn);
    eventually(Duration::from_secs(60), "the daemon to catch up", || {
        let mut r = r.clone();
        let want = want.clone();
        async move {
            let applied: Option<String> = redis::cmd("HGET")
                .arg("pgcache:{pgcache}:checkpoint")
                .arg("applied")
                .query_async(&mut r)
                .await
                .ok()?;
            applied.filter(|a| *a >= want).map(drop)
        }
    })
    .await;
}

/// Waits until the slot has confirmed what Redis's checkpoint holds: from then on, Redis
/// going back to an older state is behind the slot.
pub async fn wait_slot_confirms(env: &Env, r: &mut redis::aio::MultiplexedConnection) {
    let client = env.pg_client().await;
    let applied: String = redis::cmd("HGET")
        .arg("pgcache:{pgcache}:checkpoint")
        .arg("lsn")
        .query_async(r)
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "the slot to confirm", || {
        let client = &client;
        let applied = applied.clone();
        async move {
            let ok: bool = client
                .query_one(
                    "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots",
                    &[&applied],
                )
                .await
                .ok()?
                .get(0);
            ok.then_some(())
        }
    })
    .await;
}

/// `pgcache verify` on a config file: its exit code and output.
pub async fn verify(config: &Path) -> (i32, String) {
    let config = config.display().to_string();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || pgcache(&["verify", "--config", &config]))
            .await
            .unwrap();
    (code, format!("{out}{err}"))
}

impl Env {
    /// Asserts that `pgcache verify` finds Redis equal to Postgres for these `[[tables]]`.
    pub async fn assert_converged(&self, tables: &str) {
        let (code, out) = verify(&self.write_config(tables)).await;
        assert_eq!(code, 0, "{out}");
    }
}

/// `VmHWM` (peak resident set) and `VmRSS` of a process, in kB.
pub fn memory_kb(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// How many keys match `pattern`, by SCAN (KEYS on a million keys outlasts a reply timeout).
pub async fn count_keys(r: &mut redis::aio::MultiplexedConnection, pattern: &str) -> u64 {
    let mut cursor = 0u64;
    let mut count = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(r)
            .await
            .expect("SCAN");
        count += batch.len() as u64;
        if next == 0 {
            return count;
        }
        cursor = next;
    }
}
