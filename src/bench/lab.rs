//! The servers a bench run measures against: a throwaway Postgres and Redis of our own,
//! one database with a publication of all its tables, and the daemon's config files.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use super::child::{self, Process};
use super::BenchError;
use crate::testkit::{PgOptions, RedisOptions, TestPostgres, TestRedis};
use crate::Lsn;

pub const DB: &str = "bench";
pub const PUBLICATION: &str = "bench";

/// A table the daemon caches in one measurement: `(schema.table, key template)`.
pub type TableSpec = (&'static str, &'static str);

/// Postgres, Redis, and a directory for configs and logs.
pub struct Lab {
    pg: TestPostgres,
    redis: TestRedis,
    dir: tempfile::TempDir,
    exe: PathBuf,
}

impl Lab {
    /// Starts both servers and prepares the database.
    ///
    /// # Errors
    /// A server does not start (the message holds its log), or setup SQL fails.
    pub async fn start(exe: PathBuf) -> Result<Lab, BenchError> {
        let (pg, redis) = tokio::task::spawn_blocking(|| {
            // A steady machine: no checkpoints or autovacuum in the middle of a timing.
            let mut extra_conf: Vec<String> = vec![
                "max_wal_size = '8GB'".into(),
                "checkpoint_timeout = '1h'".into(),
                "autovacuum = off".into(),
            ];
            extra_conf.extend(extra_pg_conf());
            let pg = TestPostgres::start_with(PgOptions {
                extra_conf,
                ..PgOptions::default()
            })?;
            pg.create_database(DB)?;
            let redis = TestRedis::start_with(RedisOptions::default())?;
            Ok::<_, anyhow::Error>((pg, redis))
        })
        .await
        .map_err(|e| BenchError::Setup(format!("starting the servers: {e}")))?
        .map_err(|e| BenchError::Setup(format!("{e:#}")))?;
        let dir = tempfile::Builder::new()
            .prefix("pgcache-bench-")
            .tempdir()
            .map_err(|e| BenchError::Setup(format!("creating a temporary directory: {e}")))?;
        let lab = Lab {
            pg,
            redis,
            dir,
            exe,
        };
        let client = lab.connect().await?;
        execute(
            &client,
            "creating the publication",
            &format!("CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES"),
        )
        .await?;
        // The control table the daemon's backfill watermarks go through.
        lab.pg
            .psql(
                DB,
                &format!(
                    "\\set role postgres\n\\set publication {PUBLICATION}\n{}",
                    include_str!("../../sql/events.sql")
                ),
            )
            .map_err(|e| BenchError::Setup(format!("running sql/events.sql: {e:#}")))?;
        Ok(lab)
    }

    pub fn pg_url(&self) -> String {
        self.pg.url(DB)
    }

    pub fn pg_port(&self) -> u16 {
        self.pg.port()
    }

    pub fn redis_url(&self) -> String {
        self.redis.url()
    }

    /// Stops Redis where it is (`SIGSTOP`): a hung Redis.
    pub fn pause_redis(&self) -> Result<(), BenchError> {
        self.redis
            .pause()
            .map_err(|e| BenchError::Setup(format!("pausing Redis: {e:#}")))
    }

    /// Lets a paused Redis go on (`SIGCONT`).
    pub fn resume_redis(&self) -> Result<(), BenchError> {
        self.redis
            .resume()
            .map_err(|e| BenchError::Setup(format!("resuming Redis: {e:#}")))
    }

    /// The end of the Postgres log, for failure messages.
    pub fn pg_log(&self) -> String {
        self.pg.log()
    }

    /// An ordinary connection as the superuser.
    ///
    /// # Errors
    /// Postgres does not accept it.
    pub async fn connect(&self) -> Result<Client, BenchError> {
        let (client, connection) = tokio_postgres::connect(&self.pg_url(), NoTls)
            .await
            .map_err(|e| pg_error("connecting to Postgres", &e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// A multiplexed Redis connection without a response timeout: FLUSHALL of a million
    /// keys, or a pipeline of thousands of SETs, takes longer than redis-rs's default 500 ms.
    ///
    /// # Errors
    /// Redis does not answer.
    pub async fn redis(&self) -> Result<redis::aio::MultiplexedConnection, BenchError> {
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        redis::Client::open(self.redis_url())
            .map_err(|e| redis_error("opening Redis", e))?
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| redis_error("connecting to Redis", e))
    }

    /// Empties Redis, so each measurement writes into the same empty server.
    ///
    /// # Errors
    /// Redis fails.
    pub async fn flush_redis(&self) -> Result<(), BenchError> {
        let mut redis = self.redis().await?;
        redis::cmd("FLUSHALL")
            .query_async::<()>(&mut redis)
            .await
            .map_err(|e| redis_error("FLUSHALL", e))
    }

    /// CPU seconds (user + system) Redis's main thread has used so far, from `INFO cpu`:
    /// taken before and after a run, it says how much of the run Redis was busy.
    ///
    /// # Errors
    /// Redis fails, or its `INFO` lacks the fields.
    pub async fn redis_cpu_seconds(&self) -> Result<f64, BenchError> {
        let mut redis = self.redis().await?;
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query_async(&mut redis)
            .await
            .map_err(|e| redis_error("INFO cpu", e))?;
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .ok_or_else(|| BenchError::Check(format!("Redis INFO cpu has no {name}")))
        };
        Ok(field("used_cpu_user_main_thread")? + field("used_cpu_sys_main_thread")?)
    }

    /// Creates logical slots (pgoutput) that all start at the same position: the first is
    /// created, the others are copies of it. Returns that position.
    ///
    /// # Errors
    /// Postgres refuses (e.g. too many slots).
    pub async fn create_slots(&self, client: &Client, names: &[&str]) -> Result<Lsn, BenchError> {
        let Some((first, rest)) = names.split_first() else {
            return Err(BenchError::Setup("no slot names".into()));
        };
        let row = client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[first],
            )
            .await
            .map_err(|e| pg_error(&format!("creating slot {first}"), &e))?;
        for name in rest {
            client
                .execute(
                    "SELECT pg_copy_logical_replication_slot($1, $2)",
                    &[first, name],
                )
                .await
                .map_err(|e| pg_error(&format!("copying slot {first} to {name}"), &e))?;
        }
        parse_lsn(row.get(0))
    }

    /// Drops slots if they exist (a slot left behind pins WAL for the rest of the run),
    /// waiting up to 5 s for a consumer that just stopped to let go of one.
    pub async fn drop_slots(&self, client: &Client, names: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for name in names {
            loop {
                let left = client
                    .query_one(
                        "SELECT count(*) FILTER (WHERE active), \
                                count(pg_drop_replication_slot(slot_name)) FILTER (WHERE NOT active) \
                         FROM pg_replication_slots WHERE slot_name = $1",
                        &[name],
                    )
                    .await
                    .map(|row| row.get::<_, i64>(0));
                match left {
                    Ok(active) if active > 0 && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => break,
                }
            }
        }
    }

    /// Whether a walsender streams from `slot` right now.
    ///
    /// # Errors
    /// Postgres fails.
    pub async fn slot_active(&self, client: &Client, slot: &str) -> Result<bool, BenchError> {
        let row = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| pg_error("reading pg_replication_slots", &e))?;
        Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
    }

    /// Waits until the WAL is flushed up to `lsn`: walsenders only send flushed WAL, and
    /// the bench's writers commit asynchronously.
    ///
    /// # Errors
    /// Not flushed within 30 s.
    pub async fn wait_flushed(&self, client: &Client, lsn: Lsn) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let row = client
                .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
                .await
                .map_err(|e| pg_error("reading the flush position", &e))?;
            if parse_lsn(row.get(0))? >= lsn {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout(format!(
                    "the WAL was not flushed up to {lsn} within 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A daemon config for these servers: one slot, the given tables in mirror mode.
    pub fn daemon_config(
        &self,
        slot: &str,
        tables: &[TableSpec],
        auto_backfill: bool,
        metrics_port: Option<u16>,
    ) -> String {
        let listen = metrics_port.map_or(String::new(), |p| format!("127.0.0.1:{p}"));
        let mut toml = format!(
            "[postgres]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"{PUBLICATION}\"\n\n\
             [redis]\nurl = \"{}\"\n\n[backfill]\nauto = {auto_backfill}\n\n\
             [metrics]\nlisten = \"{listen}\"\n\n[log]\nlevel = \"{level}\"\n",
            self.pg_url(),
            self.redis_url(),
            level = daemon_log_level(),
        );
        for (table, key) in tables {
            toml.push_str(&format!(
                "\n[[tables]]\ntable = \"{table}\"\nkey = \"{key}\"\nmode = \"mirror\"\n"
            ));
        }
        toml
    }

    /// Starts `pgcache run` (this very executable) on a config, its log in the lab
    /// directory as `<name>.log`.
    ///
    /// # Errors
    /// The config cannot be written or the process started.
    pub fn spawn_daemon(&self, name: &str, config_toml: &str) -> Result<Process, BenchError> {
        let config = self.path(&format!("{name}.toml"));
        std::fs::write(&config, config_toml)
            .map_err(|e| BenchError::Setup(format!("writing {}: {e}", config.display())))?;
        let log = self.path(&format!("{name}.log"));
        Process::spawn(
            child::daemon_command(&self.exe, &config),
            &format!("the daemon ({name})"),
            &log,
        )
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Stops both servers (off the async threads: stopping waits for the processes).
    ///
    /// With `PGCACHE_BENCH_KEEP_LOGS=<dir>`, the daemons' configs and logs are copied there
    /// first, for looking into a figure.
    pub async fn shutdown(self) {
        if let Ok(keep) = std::env::var("PGCACHE_BENCH_KEEP_LOGS") {
            let keep = PathBuf::from(keep);
            let _ = std::fs::create_dir_all(&keep);
            if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
                for entry in entries.flatten() {
                    let _ = std::fs::copy(entry.path(), keep.join(entry.file_name()));
                }
            }
        }
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }
}

/// The daemons' log level: `info`, or `PGCACHE_BENCH_DAEMON_LOG` (e.g. `debug` to see every
/// batch when looking into a figure; it costs time, so not for the figures themselves).
fn daemon_log_level() -> String {
    std::env::var("PGCACHE_BENCH_DAEMON_LOG")
        .ok()
        .filter(|level| !level.is_empty() && !level.contains(['"', '\\', '\n']))
        .unwrap_or_else(|| "info".to_string())
}

/// Extra `postgresql.conf` lines from `PGCACHE_BENCH_PG_CONF` (separated by `;`), for
/// experiments such as `wal_writer_delay = 1ms`; the run's JSON records them.
pub fn extra_pg_conf() -> Vec<String> {
    std::env::var("PGCACHE_BENCH_PG_CONF")
        .unwrap_or_default()
        .split(';')
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect()
}

/// How often the daemon's log says a session ended and it reconnected: a figure measured
/// across reconnects is not the steady state, so the count goes into its details.
pub fn reconnects_in(log: &str) -> usize {
    log.matches("session ended; reconnecting").count()
}

/// Runs SQL (one or more statements, simple protocol).
///
/// # Errors
/// Postgres refuses it; the message names `what`.
pub async fn execute(client: &Client, what: &str, sql: &str) -> Result<(), BenchError> {
    client
        .batch_execute(sql)
        .await
        .map_err(|e| pg_error(what, &e))
}

/// Reads an LSN that Postgres printed.
///
/// # Errors
/// It is not one.
pub fn parse_lsn(text: &str) -> Result<Lsn, BenchError> {
    text.parse()
        .map_err(|e| BenchError::Setup(format!("Postgres returned {e}")))
}

/// A Postgres error with the server's message, which `Display` of the error leaves out.
pub fn pg_error(what: &str, e: &tokio_postgres::Error) -> BenchError {
    let message = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    };
    BenchError::Postgres {
        what: what.to_string(),
        message,
    }
}

pub fn redis_error(what: &str, e: redis::RedisError) -> BenchError {
    BenchError::Redis {
        what: what.to_string(),
        source: e,
    }
}
