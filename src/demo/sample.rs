//! One look at everything the live view shows, taken once a second: the workload's counts,
//! the daemon's progress (in process, through the metrics recorder), how far Redis is
//! behind Postgres, the keys per table, and the read helper's counters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ops::verify::Servers;

use super::meter::{Latency, Meter, Progress};
use super::shop::TABLES;
use super::workload::Counts;
use super::DemoError;
use crate::checkpoint;
use crate::reader::Stats;
use crate::Lsn;

/// Keys in Redis per cached table, in [`TABLES`] order, named by their key prefix without
/// the colon (`product`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyCounts(pub Vec<(&'static str, u64)>);

impl KeyCounts {
    /// `product=200 customer=104 order=37`.
    pub fn pairs(&self) -> String {
        self.0
            .iter()
            .map(|(name, n)| format!("{name}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn get(&self, name: &str) -> u64 {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, count)| *count)
    }
}

/// Everything at one instant.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Since the workload started.
    pub elapsed: Duration,
    pub workload: Counts,
    /// `None` when the demo could not install its metrics recorder.
    pub progress: Option<Progress>,
    /// Apply latencies since the previous sample.
    pub latency: Option<Latency>,
    /// WAL bytes written in Postgres that the daemon has not yet applied or confirmed.
    pub lag_bytes: Option<u64>,
    pub keys: KeyCounts,
    pub reader: Stats,
    /// Why a number could not be read this time (it then shows as unknown or as before).
    pub problem: Option<String>,
}

/// What a sample reads from: connections of its own, so sampling never waits on the
/// workload's.
pub struct Sampler {
    pub pg: tokio_postgres::Client,
    pub redis: Servers,
    pub meter: Option<Arc<Meter>>,
    pub started: Instant,
    checkpoint_key: String,
}

impl Sampler {
    pub fn new(
        pg: tokio_postgres::Client,
        redis: Servers,
        meter: Option<Arc<Meter>>,
        slot: &str,
    ) -> Sampler {
        Sampler {
            pg,
            redis,
            meter,
            started: Instant::now(),
            checkpoint_key: checkpoint::checkpoint_key("", slot),
        }
    }

    /// Takes a sample. `workload` and `reader` are read by the caller, which owns them.
    /// A server that does not answer in time (a busy machine) is not an error here: what
    /// could not be read is unknown this time, the key counts stay those of `previous`, and
    /// `problem` says why.
    pub async fn take(&mut self, workload: Counts, reader: Stats, previous: &Sample) -> Sample {
        let mut problems = Vec::new();
        let lag_bytes = self.lag_bytes().await.unwrap_or_else(|e| {
            problems.push(e.to_string());
            None
        });
        let keys = self.key_counts().await.unwrap_or_else(|e| {
            problems.push(e.to_string());
            previous.keys.clone()
        });
        Sample {
            elapsed: self.started.elapsed(),
            workload,
            progress: self.meter.as_ref().map(|m| m.progress()),
            latency: self.meter.as_ref().map(|m| m.take_latency_window()),
            lag_bytes,
            keys,
            reader,
            problem: (!problems.is_empty()).then(|| problems.join("; ")),
        }
    }

    /// The distance from Postgres's WAL write position to the furthest point the daemon
    /// has handled: its checkpoint in Redis (last applied commit) or, when idle, the
    /// position it confirmed to the slot (keepalives with nothing of ours pending).
    async fn lag_bytes(&mut self) -> Result<Option<u64>, DemoError> {
        let row = self
            .pg
            .query_one(
                "SELECT pg_current_wal_lsn()::text, \
                 (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1)",
                &[&super::shop::SLOT],
            )
            .await
            .map_err(DemoError::postgres("reading the WAL position"))?;
        let parse = |i: usize| -> Option<Lsn> {
            row.try_get::<_, Option<String>>(i)
                .ok()
                .flatten()
                .and_then(|s| s.parse().ok())
        };
        let (Some(current), confirmed) = (parse(0), parse(1)) else {
            return Ok(None);
        };
        let applied = checkpoint::read(&mut self.redis.data, &self.checkpoint_key)
            .await
            .map_err(|e| DemoError::Compare(format!("reading the checkpoint: {e}")))?;
        let handled = applied.max(confirmed).unwrap_or(Lsn::ZERO);
        Ok(Some(current.0.saturating_sub(handled.0)))
    }

    /// One SCAN over the whole (small) keyspace, counted by table prefix.
    pub async fn key_counts(&mut self) -> Result<KeyCounts, DemoError> {
        key_counts(&mut self.redis).await
    }
}

/// Keys per table, from one pass of SCAN.
///
/// # Errors
/// When a SCAN fails.
pub async fn key_counts(redis: &mut Servers) -> Result<KeyCounts, DemoError> {
    let keys = super::converge::scan(redis, "*").await?;
    let mut counts: Vec<(&'static str, u64)> = TABLES
        .iter()
        .map(|t| (t.prefix.trim_end_matches(':'), 0))
        .collect();
    for key in keys {
        if let Some(i) = TABLES.iter().position(|t| key.starts_with(t.prefix)) {
            counts[i].1 += 1;
        }
    }
    Ok(KeyCounts(counts))
}
