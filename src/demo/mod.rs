//! `pgcache demo`: the whole system on one machine in a few seconds.
//!
//! It starts a throwaway Postgres and Redis from the local binaries (the test harness,
//! [`crate::testkit`]), creates a small shop, runs our `sql/setup.sql` against it, runs the
//! daemon in this process, and drives a shop workload (writes to Postgres only) and
//! cache-aside reads through [`crate::Reader`], showing what happens live. When the traffic
//! stops it proves the point: Redis holds what Postgres holds, byte for byte. Then it
//! stops the daemon and the servers and removes their files, also on Ctrl-C.
//!
//! # Layout
//! - `shop`: schema, seed, table rules, and the SQL setup.
//! - `workload`: the writer and the readers.
//! - `meter`: the daemon's progress, from its metrics, in process.
//! - `sample`: one look at everything once a second.
//! - `view`: the live view (terminal screen or plain lines).
//! - `servers`: the throwaway servers and the SQL setup.
//! - `converge`: the final comparison of Redis with Postgres.
//! - `summary`: the text that ends a run.
//! - here: the order of things, and cleanup.

mod converge;
mod meter;
mod sample;
mod servers;
pub mod shop;
mod summary;
mod view;
mod workload;

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::converge::TableCheck;
use self::meter::Meter;
use self::sample::{Sample, Sampler};
use self::servers::Servers;
use self::summary::Summary;
use self::view::View;
use self::workload::{Counts as WorkloadCounts, Workload};
use crate::config::Config;
use crate::daemon::{self, RunError};
use crate::pgconn::{self, PgTarget};
use crate::reader::{ReaderError, ReaderOptions};
use crate::Reader;

/// What `pgcache demo` was asked to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Run this long, then summarize and exit; `None`: until Ctrl-C.
    pub duration: Option<Duration>,
    /// Write transactions per second.
    pub rate: u32,
    /// After the summary, keep the servers and the daemon running until Ctrl-C.
    pub keep: bool,
    /// Redis as a local 3-master cluster.
    pub cluster: bool,
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Postgres or Redis binaries are missing; each line says what to install.
    #[error("cannot run the demo:\n{}", .0.join("\n"))]
    MissingBinaries(Vec<String>),
    #[error("setting up the demo: {0}")]
    Setup(String),
    #[error("Postgres: {what}: {message}")]
    Postgres { what: &'static str, message: String },
    #[error("Redis: {what}: {source}")]
    Redis {
        what: &'static str,
        source: redis::RedisError,
    },
    #[error("the daemon stopped: {0}")]
    Daemon(String),
    #[error("the read helper: {0}")]
    Reader(#[from] ReaderError),
    #[error("comparing Redis with Postgres: {0}")]
    Compare(String),
    #[error("Redis did not converge to Postgres within {seconds} s after the writes stopped:\n{details}")]
    NotConverged { seconds: u64, details: String },
    #[error("interrupted before the workload started")]
    Interrupted,
}

impl DemoError {
    pub(crate) fn postgres(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> DemoError {
        move |e| DemoError::Postgres {
            what,
            message: match e.as_db_error() {
                Some(db) => format!("{} ({})", db.message(), db.code().code()),
                None => e.to_string(),
            },
        }
    }

    pub(crate) fn redis(what: &'static str) -> impl FnOnce(redis::RedisError) -> DemoError {
        move |source| DemoError::Redis { what, source }
    }

    /// 130 for an interrupted setup (as shells report Ctrl-C), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            DemoError::Interrupted => 130,
            _ => 1,
        }
    }
}

/// How long the seed may take to reach Redis, and Redis to match Postgres at the end.
const SEED_PATIENCE: Duration = Duration::from_secs(20);
const CONVERGE_PATIENCE: Duration = Duration::from_secs(10);

/// Runs the demo, printing to stdout, and cleans up whatever happens.
///
/// # Errors
/// Missing binaries, servers that do not start, a daemon that stops, or a Redis that does
/// not match Postgres once the writes stop.
pub async fn run(options: DemoOptions) -> Result<(), DemoError> {
    let signals = Signals::listen();
    servers::check_binaries()?;
    say("starting a throwaway Postgres and Redis from the local binaries...");
    let cluster = options.cluster;
    let servers = tokio::task::spawn_blocking(move || Servers::start(cluster))
        .await
        .map_err(|e| DemoError::Setup(format!("the setup task failed: {e}")))??;
    say(&format!(
        "servers: postgres=127.0.0.1:{} redis=127.0.0.1:{}{}",
        servers.pg.port(),
        servers.redis.port(),
        servers
            .cluster_ports()
            .map_or(String::new(), |ports| format!(
                " (a Redis Cluster of 3 masters on ports {ports})"
            ))
    ));
    say(&format!(
        "temporary directories: {} {}",
        servers.pg_dir().display(),
        servers.redis.dir().display()
    ));
    for line in &servers.setup_report {
        say(&format!("  {line}"));
    }
    let result = if signals.count() > 0 {
        Err(DemoError::Interrupted)
    } else {
        with_servers(&servers, &options, &signals).await
    };
    let (pg_dir, redis_dir) = (servers.pg_dir(), servers.redis.dir().to_path_buf());
    // Drop stops both servers and removes their directories; it blocks for a moment.
    let _ = tokio::task::spawn_blocking(move || drop(servers)).await;
    say(&format!(
        "cleaned up: stopped Postgres and Redis, removed {} and {}",
        pg_dir.display(),
        redis_dir.display()
    ));
    result
}

fn say(line: &str) {
    print(&format!("{line}\n"));
}

/// Writes to stdout and flushes (the view redraws in place, so nothing may wait in a buffer).
fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// The daemon, running in this process.
struct DaemonTask {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), RunError>>,
    health: Arc<crate::ops::health::Health>,
}

impl DaemonTask {
    fn start(config: Arc<Config>) -> DaemonTask {
        let (stop, stopped) = watch::channel(false);
        let hooks = daemon::Hooks::default();
        DaemonTask {
            stop,
            health: hooks.health.clone(),
            task: tokio::spawn(daemon::run(config, stopped, hooks)),
        }
    }

    fn has_stopped(&self) -> bool {
        self.task.is_finished()
    }

    /// Asks the daemon to finish its batch and stop, and waits for it.
    async fn stop(self) -> Result<(), DemoError> {
        let _ = self.stop.send(true);
        match tokio::time::timeout(Duration::from_secs(30), self.task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(DemoError::Daemon(e.to_string())),
            Ok(Err(e)) => Err(DemoError::Daemon(format!("its task failed: {e}"))),
            Err(_) => Err(DemoError::Daemon("it did not stop within 30 s".to_string())),
        }
    }
}

/// Ctrl-C and SIGTERM, counted, so that the demo can clean up instead of dying.
#[derive(Clone)]
struct Signals(watch::Receiver<u32>);

impl Signals {
    fn listen() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let (count, counted) = watch::channel(0u32);
        // Installing the handlers here, before any server starts, means a Ctrl-C during
        // setup no longer kills the process: it is seen after setup, and cleanup runs.
        let int = signal(SignalKind::interrupt());
        let term = signal(SignalKind::terminate());
        if let (Ok(mut int), Ok(mut term)) = (int, term) {
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                    count.send_modify(|n| *n += 1);
                }
            });
        }
        Signals(counted)
    }

    fn count(&self) -> u32 {
        *self.0.borrow()
    }

    /// Resolves on the next signal after `seen` of them.
    async fn after(&self, seen: u32) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|n| *n > seen).await;
    }
}

/// Sets up the config, the daemon and the traffic; stops the daemon whatever happens.
async fn with_servers(
    servers: &Servers,
    options: &DemoOptions,
    signals: &Signals,
) -> Result<(), DemoError> {
    let daemon_url = servers
        .pg
        .url_as(shop::ROLE, Some(shop::ROLE_PASSWORD), shop::DATABASE);
    let config = Config::from_toml_str(&shop::config_toml(&daemon_url, &servers.redis_toml()))
        .map_err(|e| DemoError::Setup(format!("the demo's own config is invalid: {e}")))?;
    let config = Arc::new(config);
    let meter = match Meter::install() {
        Ok(meter) => Some(meter),
        Err(e) => {
            say(&format!(
                "note: {e}; the daemon's progress is shown as unknown"
            ));
            None
        }
    };
    let daemon = DaemonTask::start(config.clone());
    say(&format!(
        "daemon: starting on slot {:?} of publication {:?} (in this process, as role {:?})",
        shop::SLOT,
        shop::PUBLICATION,
        shop::ROLE
    ));
    let stage = Stage {
        servers,
        options,
        signals,
        config: &config,
        daemon: &daemon,
    };
    let result = traffic(&stage, meter).await;
    let stopped = daemon.stop().await;
    result.and(stopped)
}

/// What every step of a run works with.
struct Stage<'a> {
    servers: &'a Servers,
    options: &'a DemoOptions,
    signals: &'a Signals,
    config: &'a Config,
    daemon: &'a DaemonTask,
}

/// Seeds the shop, runs the workload with the live view, then checks and summarizes.
async fn traffic(stage: &Stage<'_>, meter: Option<Arc<Meter>>) -> Result<(), DemoError> {
    let Stage {
        servers,
        options,
        config,
        ..
    } = *stage;
    let app_url = servers.pg.url(shop::DATABASE);
    let target = PgTarget::parse(&app_url)
        .map_err(|e| DemoError::Setup(format!("Postgres URL {app_url}: {e}")))?;
    let connect = || async {
        pgconn::connect(&target)
            .await
            .map_err(|e| DemoError::Setup(format!("connecting to Postgres: {e}")))
    };
    let app = connect().await?;
    // Patient timeouts: on a busy machine a sample or a comparison may wait a while, and
    // that is no reason to stop the demo.
    let redis = crate::ops::verify::Servers::connect(config, Duration::from_secs(5))
        .await
        .map_err(DemoError::redis("connecting"))?;

    wait_until_streaming(stage, redis.clone()).await?;
    let mut sampler = Sampler::new(connect().await?, redis.clone(), meter, shop::SLOT);
    let seed_rows = seed(stage, &app, &mut sampler).await?;

    let reader = Reader::from_config_with(
        config,
        ReaderOptions {
            pool_size: 4,
            ..ReaderOptions::default()
        },
    )?;
    say(&format!(
        "workload: {} write transactions/s to Postgres, {} reads/s through pgcache::Reader{}",
        options.rate,
        options.rate * 4,
        match options.duration {
            Some(d) => format!(", for {} s", d.as_secs()),
            None => ", until Ctrl-C".to_string(),
        }
    ));
    let workload = Workload::start(app, reader.clone(), options.rate, seed_rows);
    sampler.started = Instant::now();
    let first = sampler
        .take(workload.counts(), reader.stats(), &Sample::default())
        .await;
    let (last, daemon_died) = live_view(stage, &mut sampler, &workload, &reader, first).await;
    let (counts, problem) = workload.stop().await;
    let stopped_at = Instant::now();
    if daemon_died {
        return Err(DemoError::Daemon(
            "it stopped during the run (see the log above)".to_string(),
        ));
    }

    conclude(
        stage,
        &mut sampler,
        &reader,
        (counts, problem),
        &last,
        stopped_at,
    )
    .await
}

/// Inserts the seed and waits until it reached Redis through the stream: the rows seeded.
async fn seed(
    stage: &Stage<'_>,
    app: &tokio_postgres::Client,
    sampler: &mut Sampler,
) -> Result<u64, DemoError> {
    // The daemon is streaming past its initial backfill, so the seed reaches Redis through
    // the stream, as every later write does.
    app.batch_execute(&shop::seed_sql())
        .await
        .map_err(DemoError::postgres("inserting the seed"))?;
    let seeded = Instant::now();
    loop {
        // Until the deadline, a Redis that does not answer in time is asked again.
        let keys = match sampler.key_counts().await {
            Ok(keys) => keys,
            Err(e) if seeded.elapsed() > SEED_PATIENCE => return Err(e),
            Err(_) => Default::default(),
        };
        if keys.get("product") == shop::SEED_PRODUCTS as u64
            && keys.get("customer") == shop::SEED_CUSTOMERS as u64
        {
            break;
        }
        if stage.daemon.has_stopped() {
            return Err(DemoError::Daemon(
                "it stopped before the seed reached Redis (see the log above)".to_string(),
            ));
        }
        if stage.signals.count() > 0 {
            return Err(DemoError::Interrupted);
        }
        if seeded.elapsed() > SEED_PATIENCE {
            return Err(DemoError::Setup(format!(
                "the seed did not reach Redis within {} s: {}",
                SEED_PATIENCE.as_secs(),
                keys.pairs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    say(&format!(
        "seed: {} products and {} customers inserted in Postgres reached Redis through the stream in {} ms",
        shop::SEED_PRODUCTS,
        shop::SEED_CUSTOMERS,
        seeded.elapsed().as_millis()
    ));
    Ok((shop::SEED_PRODUCTS + shop::SEED_CUSTOMERS) as u64)
}

/// After the workload: waits for Redis to equal Postgres, prints the summary, and with
/// `--keep` leaves everything running until Ctrl-C.
async fn conclude(
    stage: &Stage<'_>,
    sampler: &mut Sampler,
    reader: &Reader,
    (counts, problem): (WorkloadCounts, Option<String>),
    last: &Sample,
    stopped_at: Instant,
) -> Result<(), DemoError> {
    let Stage {
        servers,
        options,
        signals,
        ..
    } = *stage;
    say("writes stopped; comparing Redis with Postgres...");
    let checks = wait_for_convergence(&sampler.pg, &mut sampler.redis.clone()).await?;
    let converged = checks.iter().all(TableCheck::matches);
    let final_sample = sampler.take(counts, reader.stats(), last).await;
    let summary = Summary {
        ran: last.elapsed,
        sample: &final_sample,
        checks: &checks,
        converged_in: converged.then(|| stopped_at.elapsed()),
        patience: CONVERGE_PATIENCE,
        problem: problem.as_deref(),
        redis_port: servers.redis_port(),
        cluster: servers.cluster.is_some(),
        pg_port: servers.pg.port(),
        psql: &servers::psql_command(),
        keep: options.keep,
    };
    print(&summary.text());
    if !converged {
        return Err(DemoError::NotConverged {
            seconds: CONVERGE_PATIENCE.as_secs(),
            details: checks
                .iter()
                .map(|c| format!("  {c}"))
                .collect::<Vec<_>>()
                .join("\n"),
        });
    }
    if options.keep {
        say("\n--keep: Postgres, Redis and the daemon keep running; try the commands above. Ctrl-C stops and cleans up.");
        signals.after(signals.count()).await;
    }
    Ok(())
}

/// Waits until the daemon streams and has finished the initial backfill of the (still
/// empty) mirror tables, which it runs on a first start when `backfill.auto` is on.
async fn wait_until_streaming(
    stage: &Stage<'_>,
    redis: crate::ops::verify::Servers,
) -> Result<(), DemoError> {
    let Stage {
        config,
        daemon,
        signals,
        ..
    } = *stage;
    let started = Instant::now();
    let key = crate::checkpoint::checkpoint_key(&config.redis.key_prefix, &config.postgres.slot);
    let mirrors: Vec<&str> = shop::TABLES
        .iter()
        .filter(|t| t.mirror)
        .map(|t| t.table)
        .collect();
    loop {
        if daemon.health.is_streaming() {
            if !config.backfill.auto {
                break;
            }
            // Not answering in time counts as not done yet.
            let state = crate::checkpoint::read_state(&mut redis.data.clone(), &key)
                .await
                .ok();
            let done = state.is_some_and(|state| {
                mirrors.iter().all(|table| {
                    state
                        .backfills
                        .get(*table)
                        .is_some_and(|progress| progress.is_done())
                })
            });
            if done {
                break;
            }
        }
        if daemon.has_stopped() {
            return Err(DemoError::Daemon(
                "it stopped before streaming (see the log above)".to_string(),
            ));
        }
        if signals.count() > 0 {
            return Err(DemoError::Interrupted);
        }
        if started.elapsed() > SEED_PATIENCE {
            return Err(DemoError::Daemon(format!(
                "it did not start streaming within {} s",
                SEED_PATIENCE.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    say(&format!(
        "daemon: streaming after {} ms{}",
        started.elapsed().as_millis(),
        if config.backfill.auto {
            " (its initial backfill of the still empty mirror tables is done)"
        } else {
            ""
        }
    ));
    Ok(())
}

/// Samples and draws once a second until the run ends. Returns the last sample and whether
/// the daemon stopped on its own.
async fn live_view(
    stage: &Stage<'_>,
    sampler: &mut Sampler,
    workload: &Workload,
    reader: &Reader,
    first: Sample,
) -> (Sample, bool) {
    let Stage {
        servers,
        options,
        signals,
        daemon,
        ..
    } = *stage;
    let tty = std::io::stdout().is_terminal();
    let mut view = View::new(
        tty,
        format!(
            "pgcache demo: Postgres 127.0.0.1:{} -> pgcache daemon -> Redis{} 127.0.0.1:{}",
            servers.pg.port(),
            if servers.cluster.is_some() {
                " Cluster"
            } else {
                ""
            },
            servers.redis_port()
        ),
    );
    let deadline = options.duration.map(|d| tokio::time::Instant::now() + d);
    let seen = signals.count();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut prev = first;
    loop {
        let end = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let finished = tokio::select! {
            _ = tick.tick() => false,
            _ = end => true,
            _ = signals.after(seen) => true,
        };
        let now = sampler.take(workload.counts(), reader.stats(), &prev).await;
        if now.elapsed.saturating_sub(prev.elapsed) >= Duration::from_millis(200) {
            print(&view.frame(&prev, &now));
        }
        if daemon.has_stopped() {
            return (now, true);
        }
        if finished {
            return (now, false);
        }
        prev = now;
    }
}

/// Compares until everything matches or the patience runs out; returns the last checks.
async fn wait_for_convergence(
    pg: &tokio_postgres::Client,
    redis: &mut crate::ops::verify::Servers,
) -> Result<Vec<TableCheck>, DemoError> {
    let deadline = Instant::now() + CONVERGE_PATIENCE;
    loop {
        // A server too busy to answer in time is asked again until the deadline.
        let checks = match converge::check_all(pg, redis).await {
            Ok(checks) => checks,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => Vec::new(),
        };
        if !checks.is_empty() && checks.iter().all(TableCheck::matches) {
            return Ok(checks);
        }
        if !checks.is_empty() && Instant::now() >= deadline {
            return Ok(checks);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
