//! `pgcache bench`: pgcache measured against the physical limits of the same machine.
//!
//! Every figure is set against a *floor* measured in the same run, on the same servers and
//! the same data, and reported as a ratio, so the numbers say how much pgcache costs on
//! top of what cannot be avoided, whatever the machine:
//!
//! - catch-up: the same WAL streamed by `pg_recvlogical` into /dev/null, then by the daemon
//!   into Redis, from two slots created at the same position;
//! - latency: commit to visible in Redis at a steady offered load, against the same
//!   commits arriving at a bare pgoutput consumer;
//! - backfill: against `COPY ... TO STDOUT` piped into pipelined Redis `SET`s;
//! - reader: the hit path against a raw `GET` plus `serde_json` parse, a stampede on a
//!   cold key against one direct database read, and lookups with Redis hung (`SIGSTOP`)
//!   against the same read;
//! - memory: the daemon's peak RSS in the large transaction, beside `pg_recvlogical`'s;
//! - cluster: the daemon on a local 3-master Redis Cluster against the daemon on one Redis,
//!   catch-up (keys spread over the slots, and tagged by tenant) and backfill.
//!
//! The daemon runs as a child process (this executable, `pgcache run`), so its memory and
//! its metrics endpoint are its own. Nothing is hard-coded and nothing is skipped: a figure
//! that cannot be measured is reported as failed, with the reason.
//!
//! # Layout
//! - `lab`: the throwaway servers, slots and daemon configs.
//! - `child`: child processes, their peak RSS, the daemon's `/metrics`.
//! - `consumer`: a bare pgoutput consumer, the strictest streaming floor.
//! - `catchup`, `latency`, `backfill`, `reader`, `cluster`: one measurement each (memory
//!   is taken in the catch-up of the large transaction).
//! - `stats`: percentiles and the daemon's histogram.
//! - `report`: figures, targets, the table and the JSON file.

mod backfill;
mod catchup;
mod child;
mod cluster;
mod consumer;
mod lab;
mod latency;
mod reader;
pub mod report;
mod stats;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use self::lab::Lab;
pub use self::report::{Figure, FigureSpec, Report};

/// One measurement, as `--only` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Catchup,
    Memory,
    Latency,
    Backfill,
    Reader,
    Cluster,
}

impl Part {
    pub const ALL: [Part; 6] = [
        Part::Catchup,
        Part::Memory,
        Part::Latency,
        Part::Backfill,
        Part::Reader,
        Part::Cluster,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Part::Catchup => "catchup",
            Part::Memory => "memory",
            Part::Latency => "latency",
            Part::Backfill => "backfill",
            Part::Reader => "reader",
            Part::Cluster => "cluster",
        }
    }
}

impl FromStr for Part {
    type Err = String;

    fn from_str(s: &str) -> Result<Part, String> {
        Part::ALL
            .into_iter()
            .find(|p| p.name() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown measurement {s:?} (expected catchup, latency, backfill, reader, memory or cluster)"
                )
            })
    }
}

/// How big each workload is.
#[derive(Debug, Clone)]
pub struct Scale {
    pub update_transactions: u64,
    pub insert_rows: u64,
    pub mixed_transactions: u64,
    pub latency_rates: [u32; 2],
    pub latency_seconds: f64,
    pub backfill_rows: u64,
    pub reader_rounds: usize,
    pub reader_ops_per_round: usize,
    pub stampede_callers: usize,
    /// Stampedes, each on a key of its own; the p99 is over every caller of every round.
    pub stampede_rounds: usize,
    /// How long lookups run with Redis paused, after the first timeout.
    pub hung_redis_seconds: f64,
}

impl Scale {
    /// The real measurement, as the issue defines it.
    pub fn full() -> Scale {
        Scale {
            update_transactions: 200_000,
            insert_rows: 1_000_000,
            mixed_transactions: 20_000,
            latency_rates: [1_000, 10_000],
            latency_seconds: 10.0,
            backfill_rows: 1_000_000,
            reader_rounds: 20,
            reader_ops_per_round: 5_000,
            stampede_callers: 1_000,
            stampede_rounds: 10,
            hung_redis_seconds: 5.0,
        }
    }

    /// About ten times smaller, for a smoke run (and the test that runs one).
    pub fn quick() -> Scale {
        Scale {
            update_transactions: 20_000,
            insert_rows: 100_000,
            mixed_transactions: 2_000,
            latency_rates: [1_000, 10_000],
            latency_seconds: 1.0,
            backfill_rows: 100_000,
            reader_rounds: 10,
            reader_ops_per_round: 500,
            stampede_callers: 1_000,
            stampede_rounds: 2,
            hung_redis_seconds: 2.0,
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub quick: bool,
    /// The measurements to run, in any order; each runs once.
    pub parts: Vec<Part>,
    /// The `pgcache` executable to run as the daemon (normally this one).
    pub daemon_exe: PathBuf,
    /// Print what is happening to stderr as it happens.
    pub progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("setup: {0}")]
    Setup(String),
    #[error("Postgres, {what}: {message}")]
    Postgres { what: String, message: String },
    #[error("Redis, {what}: {source}")]
    Redis {
        what: String,
        source: redis::RedisError,
    },
    #[error("{0}")]
    Child(String),
    #[error("timed out: {0}")]
    Timeout(String),
    /// A measurement that ran but whose result is wrong (missing rows, say).
    #[error("result check: {0}")]
    Check(String),
}

/// Prints progress lines with the time since the start.
#[derive(Clone, Copy)]
pub(crate) struct Progress {
    started: Instant,
    on: bool,
}

impl Progress {
    pub(crate) fn say(&self, message: impl AsRef<str>) {
        if self.on {
            eprintln!(
                "[{:>7.1}s] {}",
                self.started.elapsed().as_secs_f64(),
                message.as_ref()
            );
        }
    }
}

/// Every figure that `parts` produce, before measuring.
pub fn specs(parts: &[Part], scale: &Scale) -> Vec<FigureSpec> {
    let mut parts = parts.to_vec();
    parts.sort();
    parts.dedup();
    parts
        .into_iter()
        .flat_map(|part| match part {
            Part::Catchup => catchup::specs(scale),
            Part::Memory => vec![catchup::memory_spec(scale)],
            Part::Latency => latency::specs(scale),
            Part::Backfill => vec![backfill::spec(scale)],
            Part::Reader => reader::specs(scale),
            Part::Cluster => cluster::specs(scale),
        })
        .collect()
}

/// Runs the measurements and returns every figure (measured or failed).
pub async fn run(options: BenchOptions) -> Report {
    let started = Instant::now();
    let started_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let progress = Progress {
        started,
        on: options.progress,
    };
    let scale = if options.quick {
        Scale::quick()
    } else {
        Scale::full()
    };
    let mut parts = options.parts.clone();
    parts.sort();
    parts.dedup();
    let all_specs = specs(&parts, &scale);
    let mut figures: Vec<Figure> = Vec::new();
    let mut machine = machine_facts();
    machine["loadavg_at_start"] = json!(loadavg());
    if let Some(load) = loadavg().filter(|l| l[0] > 1.0) {
        progress.say(format!(
            "warning: the machine is already busy (load average {:.2}); the figures will be noisy",
            load[0]
        ));
    }

    progress.say("starting Postgres and Redis");
    match Lab::start(options.daemon_exe.clone()).await {
        Err(e) => {
            let reason = format!("the servers did not start: {e}");
            figures.extend(all_specs.iter().map(|s| s.failed(reason.clone())));
        }
        Ok(lab) => {
            server_facts(&lab, &mut machine).await;
            let mut bulk: Option<catchup::BulkRun> = None;
            for part in &parts {
                let specs = specs(&[*part], &scale);
                let produced = run_part(*part, &lab, &scale, progress, &mut bulk).await;
                figures.extend(complete(&specs, produced));
            }
            progress.say("stopping the servers");
            lab.shutdown().await;
        }
    }
    machine["loadavg_at_end"] = json!(loadavg());
    Report {
        quick: options.quick,
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        started_unix,
        seconds: started.elapsed().as_secs_f64(),
        machine,
        figures,
    }
}

async fn run_part(
    part: Part,
    lab: &Lab,
    scale: &Scale,
    progress: Progress,
    bulk: &mut Option<catchup::BulkRun>,
) -> Result<Vec<Figure>, BenchError> {
    match part {
        Part::Catchup => catchup::run(lab, scale, progress, bulk).await,
        Part::Memory => {
            if bulk.is_none() {
                *bulk = Some(catchup::run_bulk_alone(lab, scale, progress).await?);
            }
            let run = bulk.as_ref().ok_or_else(|| {
                BenchError::Check("the large transaction's catch-up did not run".into())
            })?;
            Ok(vec![catchup::memory_figure(scale, run)])
        }
        Part::Latency => latency::run(lab, scale, progress).await,
        Part::Backfill => backfill::run(lab, scale, progress).await.map(|f| vec![f]),
        Part::Reader => reader::run(lab, scale, progress).await,
        Part::Cluster => cluster::run(lab, scale, progress).await,
    }
}

/// The part's figures in spec order: a failed part fails all its figures with its
/// reason, and a figure the part did not produce is reported as not measured.
fn complete(specs: &[FigureSpec], produced: Result<Vec<Figure>, BenchError>) -> Vec<Figure> {
    match produced {
        Err(e) => specs.iter().map(|s| s.failed(e.to_string())).collect(),
        Ok(figures) => specs
            .iter()
            .map(|spec| {
                figures
                    .iter()
                    .find(|f| f.id == spec.id)
                    .cloned()
                    .unwrap_or_else(|| spec.failed("not measured (the bench has a bug)"))
            })
            .collect(),
    }
}

fn machine_facts() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        });
    json!({
        "extra_postgresql_conf": lab::extra_pg_conf(),
        "daemon_log_level": std::env::var("PGCACHE_BENCH_DAEMON_LOG").ok(),
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": cpu,
        "os": std::env::consts::OS,
    })
}

/// The 1, 5 and 15 minute load averages: other work on the machine makes figures noisy,
/// so each run records how busy the machine was.
fn loadavg() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

async fn server_facts(lab: &Lab, machine: &mut serde_json::Value) {
    if let Ok(client) = lab.connect().await {
        if let Ok(row) = client.query_one("SHOW server_version", &[]).await {
            machine["postgres"] = json!(row.get::<_, String>(0));
        }
    }
    if let Ok(mut redis) = lab.redis().await {
        let info: redis::RedisResult<String> = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut redis)
            .await;
        if let Ok(info) = info {
            let version = info
                .lines()
                .find_map(|l| l.strip_prefix("redis_version:"))
                .map(|v| v.trim().to_string());
            machine["redis"] = json!(version);
        }
    }
}

/// Seconds as a rate.
pub(crate) fn per_second(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_parse_by_name() {
        assert_eq!("latency".parse::<Part>(), Ok(Part::Latency));
        assert_eq!("cluster".parse::<Part>(), Ok(Part::Cluster));
        assert!("speed".parse::<Part>().is_err());
    }

    #[test]
    fn every_part_has_figures_with_unique_ids() {
        let specs = specs(&Part::ALL, &Scale::full());
        let mut ids: Vec<&str> = specs.iter().map(|s| s.id.as_str()).collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n);
        assert!(n >= 13, "{ids:?}");
    }

    #[test]
    fn a_failed_part_fails_each_of_its_figures() {
        let specs = specs(&[Part::Reader], &Scale::quick());
        let figures = complete(&specs, Err(BenchError::Setup("no Redis".into())));
        assert_eq!(figures.len(), specs.len());
        assert!(figures
            .iter()
            .all(|f| f.error.as_deref() == Some("setup: no Redis")));
        let figures = complete(&specs, Ok(Vec::new()));
        assert!(figures.iter().all(|f| f.error.is_some()));
    }
}
