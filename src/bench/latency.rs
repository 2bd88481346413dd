//! Latency, commit to visible in Redis, at steady offered loads, measured from outside the
//! daemon.
//!
//! Writers commit single-row inserts with distinct ids on a fixed schedule (open loop: a
//! transaction starts at its time whether or not earlier ones have returned, spread over
//! several connections), with `synchronous_commit = on` so a commit returns once its WAL
//! is flushed and a walsender may send it. A watcher subscribed to Redis keyspace
//! notifications records when each key is set. Latency = arrival − commit return, both on
//! this process's monotonic clock.
//!
//! The floor is the same schedule with a bare pgoutput consumer (our replication client
//! and decoder, nothing else) in place of the daemon: the moment each commit reaches any
//! logical consumer. The daemon's own `pgcache_apply_latency_seconds` histogram (commit
//! timestamp to `EXEC` acknowledged, bucketed) is scraped and reported beside it.
//!
//! Read-your-writes: one more run at [`RYW_RATE`] in which every writer, once its commit
//! returns, calls [`Reader::wait_for_writes`]; the time from commit to the wait returning is
//! set against the same run's commit-to-visible latency (the stream's own).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_postgres::{Client, Statement};

use super::child::{self, Process};
use super::lab::{execute, pg_error, redis_error, Lab, PUBLICATION};
use super::report::{Better, Figure, FigureSpec, Target};
use super::stats::{ms, percentile, Histogram};
use super::{per_second, BenchError, Progress, Scale};
use crate::daemon::pgoutput::{self, Message, TupleData};
use crate::daemon::replication::{ReplicationConnection, ReplicationEvent};
use crate::metrics::APPLY_LATENCY;
use crate::pgconn::PgTarget;
use crate::testkit;
use crate::{Lsn, Reader};

/// Writer connections. One connection commits a few thousand transactions a second at
/// most; the load is spread so that the writers are not what limits the offered rate.
const WRITERS: usize = 8;
const QUANTILES: [(f64, &str); 3] = [(0.5, "p50"), (0.99, "p99"), (0.999, "p999")];
const FLOOR_NAME: &str = "bare pgoutput consumer";
const TABLE: (&str, &str) = ("public.lat_events", "lat:{id}");
/// The offered rate of the read-your-writes run.
const RYW_RATE: u32 = 1_000;
const RYW_FLOOR_NAME: &str = "commit to visible in Redis, same run";

pub fn specs(scale: &Scale) -> Vec<FigureSpec> {
    scale
        .latency_rates
        .iter()
        .flat_map(|&rate| QUANTILES.iter().map(move |&(_, name)| spec(rate, name)))
        .chain(QUANTILES[..2].iter().map(|&(_, name)| ryw_spec(name)))
        .collect()
}

fn ryw_spec(name: &str) -> FigureSpec {
    FigureSpec::new(
        format!("latency.ryw.{RYW_RATE}.{name}"),
        format!(
            "Read-your-writes at {RYW_RATE} tx/s: commit to Reader::wait_for_writes returned, {name}"
        ),
        "ms",
        RYW_FLOOR_NAME,
        Better::Lower,
        if name == "p99" {
            Target::Below(5.0)
        } else {
            Target::None
        },
    )
}

fn spec(rate: u32, name: &str) -> FigureSpec {
    let target = if rate >= 10_000 && name == "p99" {
        Target::Below(5.0)
    } else {
        Target::None
    };
    FigureSpec::new(
        format!("latency.{rate}.{name}"),
        format!("Commit to visible in Redis at {rate} tx/s offered, {name}"),
        "ms",
        FLOOR_NAME,
        Better::Lower,
        target,
    )
}

/// One rate's run: what was offered and achieved, and the latencies seen.
struct LoadRun {
    offered: f64,
    launched: f64,
    committed: u64,
    committed_rate: f64,
    write_errors: u64,
    first_error: Option<String>,
    /// Sorted.
    latencies: Vec<Duration>,
    missing: u64,
    /// Arrivals seen before the writer got its commit back (counted as zero).
    early: u64,
    /// How busy the whole machine was while the load ran, in percent of all cores.
    machine_busy_percent: Option<f64>,
    /// With a reader: commit returned to `wait_for_writes` returned, sorted.
    waits: Vec<Duration>,
    wait_errors: u64,
    first_wait_error: Option<String>,
}

impl LoadRun {
    fn details(&self) -> Value {
        json!({
            "offered_tx_per_s": self.offered,
            "launched_tx_per_s": self.launched,
            "committed": self.committed,
            "committed_tx_per_s": self.committed_rate,
            "write_errors": self.write_errors,
            "first_write_error": self.first_error,
            "samples": self.latencies.len(),
            "missing": self.missing,
            "arrived_before_commit_returned": self.early,
            "max_ms": self.latencies.last().map(|d| ms(*d)),
            "machine_cpu_busy_percent": self.machine_busy_percent,
            "read_your_writes_waits": self.waits.len(),
            "read_your_writes_wait_errors": self.wait_errors,
            "first_wait_error": self.first_wait_error,
            "read_your_writes_max_ms": self.waits.last().map(|d| ms(*d)),
        })
    }

    fn quantile_ms(&self, q: f64) -> Option<f64> {
        percentile(&self.latencies, q).map(ms)
    }
}

/// # Errors
/// Setup fails; a failing rate fails only its own figures.
pub async fn run(lab: &Lab, scale: &Scale, progress: Progress) -> Result<Vec<Figure>, BenchError> {
    let client = lab.connect().await?;
    execute(
        &client,
        "creating the latency table",
        "CREATE TABLE IF NOT EXISTS lat_events (id bigint PRIMARY KEY, v bigint NOT NULL, note text NOT NULL)",
    )
    .await?;
    let writers = connect_writers(lab).await?;
    lab.flush_redis().await?;

    progress.say("latency: the floor (a bare pgoutput consumer)");
    let floor = floor_phase(lab, &client, &writers, scale, progress).await?;
    progress.say("latency: pgcache");
    let pgcache = pgcache_phase(lab, &client, &writers, scale, progress).await;
    let (pgcache, ryw) = match pgcache {
        Ok(runs) => runs,
        Err(e) => (
            scale
                .latency_rates
                .iter()
                .map(|_| Err(e.to_string()))
                .collect(),
            Err(e.to_string()),
        ),
    };

    let mut figures = Vec::new();
    for (i, &rate) in scale.latency_rates.iter().enumerate() {
        let floor_run = &floor[i];
        let (pgc_run, daemon_view) = match &pgcache[i] {
            Ok((run, view)) => (Ok(run), view.clone()),
            Err(e) => (Err(e.clone()), Value::Null),
        };
        for &(q, name) in &QUANTILES {
            let spec = spec(rate, name);
            let figure = match (&pgc_run, floor_run) {
                (Err(e), _) => spec.failed(format!("pgcache: {e}")),
                (_, Err(e)) => spec.failed(format!("floor: {e}")),
                (Ok(run), _) if run.missing > 0 => spec.failed(format!(
                    "pgcache: {} of {} committed rows never became visible in Redis within 15 s",
                    run.missing, run.committed
                )),
                (_, Ok(floor_run)) if floor_run.missing > 0 => spec.failed(format!(
                    "floor: {} of {} commits never reached the pgoutput consumer within 15 s",
                    floor_run.missing, floor_run.committed
                )),
                (Ok(run), Ok(floor_run)) => match (run.quantile_ms(q), floor_run.quantile_ms(q)) {
                    (Some(p), Some(f)) => spec.measured(
                        p,
                        f,
                        json!({
                            "pgcache": run.details(),
                            "floor": floor_run.details(),
                            "daemon_histogram": daemon_view,
                        }),
                    ),
                    _ => spec.failed("no latency samples"),
                },
            };
            figures.push(figure);
        }
    }
    figures.extend(ryw_figures(&ryw));
    Ok(figures)
}

fn ryw_figures(run: &PgcacheRun) -> Vec<Figure> {
    QUANTILES[..2]
        .iter()
        .map(|&(q, name)| {
            let spec = ryw_spec(name);
            let run = match run {
                Ok((run, _)) => run,
                Err(e) => return spec.failed(format!("pgcache: {e}")),
            };
            if run.wait_errors > 0 {
                return spec.failed(format!(
                    "{} of {} waits failed; the first: {}",
                    run.wait_errors,
                    run.committed,
                    run.first_wait_error.as_deref().unwrap_or_default()
                ));
            }
            match (percentile(&run.waits, q), run.quantile_ms(q)) {
                (Some(wait), Some(floor)) => {
                    spec.measured(ms(wait), floor, json!({ "run": run.details() }))
                }
                _ => spec.failed("no samples"),
            }
        })
        .collect()
}

type Writer = (Arc<Client>, Statement);

async fn connect_writers(lab: &Lab) -> Result<Vec<Writer>, BenchError> {
    let mut writers = Vec::with_capacity(WRITERS);
    for _ in 0..WRITERS {
        let client = lab.connect().await?;
        client
            .batch_execute("SET synchronous_commit = on")
            .await
            .map_err(|e| pg_error("synchronous_commit", &e))?;
        let statement = client
            .prepare("INSERT INTO lat_events (id, v, note) VALUES ($1, $1, 'latency probe')")
            .await
            .map_err(|e| pg_error("preparing the insert", &e))?;
        writers.push((Arc::new(client), statement));
    }
    Ok(writers)
}

/// Ids of one rate's run, distinct across phases and rates.
fn first_id(phase: i64, rate_index: usize) -> i64 {
    1 + phase * 1_000_000_000 + rate_index as i64 * 100_000_000
}

async fn floor_phase(
    lab: &Lab,
    client: &Client,
    writers: &[Writer],
    scale: &Scale,
    progress: Progress,
) -> Result<Vec<Result<LoadRun, String>>, BenchError> {
    let slot = "lat_floor";
    lab.drop_slots(client, &[slot]).await;
    lab.create_slots(client, &[slot]).await?;
    let target = PgTarget::parse(&lab.pg_url())
        .map_err(|e| BenchError::Setup(format!("the bench's Postgres URL: {e}")))?;
    let replication = ReplicationConnection::connect(&target)
        .await
        .map_err(|e| BenchError::Setup(format!("replication connection: {e}")))?;
    let stream = replication
        .start_logical(slot, Lsn::ZERO, PUBLICATION)
        .await
        .map_err(|e| BenchError::Setup(format!("START_REPLICATION: {e}")))?;
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let (stop, stopped) = watch::channel(false);
    let consumer = tokio::spawn(consume(stream, arrivals_tx, stopped));
    let mut runs = Vec::new();
    for (i, &rate) in scale.latency_rates.iter().enumerate() {
        let run = offered_load(
            writers,
            rate,
            scale.latency_seconds,
            first_id(0, i),
            &mut arrivals,
            None,
        )
        .await;
        if let Ok(run) = &run {
            progress.say(format!(
                "latency floor at {rate}/s: p99 {:.2} ms ({} committed/s)",
                run.quantile_ms(0.99).unwrap_or(f64::NAN),
                run.committed_rate.round()
            ));
        }
        runs.push(run.map_err(|e| e.to_string()));
    }
    let _ = stop.send(true);
    let consumed = consumer
        .await
        .map_err(|e| BenchError::Check(format!("the pgoutput consumer panicked: {e}")))?;
    lab.drop_slots(client, &[slot]).await;
    consumed?;
    Ok(runs)
}

/// The floor: reads the stream, decodes every message, and records when each
/// transaction's commit arrives, keyed by the id its insert carried.
async fn consume(
    mut stream: crate::daemon::replication::ReplicationStream,
    arrivals: mpsc::UnboundedSender<(i64, Instant)>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), BenchError> {
    let mut last_id: Option<i64> = None;
    loop {
        let event = tokio::select! {
            _ = stop.changed() => break,
            event = stream.next() => event
                .map_err(|e| BenchError::Child(format!("the pgoutput consumer: {e}")))?,
        };
        match event {
            ReplicationEvent::XLogData { data, .. } => {
                let message = pgoutput::decode(data)
                    .map_err(|e| BenchError::Check(format!("decoding pgoutput: {e}")))?;
                match message {
                    Message::Insert(insert) => {
                        last_id = match insert.new.0.first() {
                            Some(TupleData::Text(text)) => {
                                std::str::from_utf8(text).ok().and_then(|t| t.parse().ok())
                            }
                            _ => None,
                        };
                    }
                    Message::Commit(_) => {
                        if let Some(id) = last_id.take() {
                            let _ = arrivals.send((id, Instant::now()));
                        }
                    }
                    _ => {}
                }
            }
            ReplicationEvent::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                if reply_requested {
                    stream
                        .send_status(wal_end, wal_end, wal_end, false)
                        .await
                        .map_err(|e| BenchError::Child(format!("the pgoutput consumer: {e}")))?;
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.finish()).await;
    Ok(())
}

type PgcacheRun = Result<(LoadRun, Value), String>;

async fn pgcache_phase(
    lab: &Lab,
    client: &Client,
    writers: &[Writer],
    scale: &Scale,
    progress: Progress,
) -> Result<(Vec<PgcacheRun>, PgcacheRun), BenchError> {
    let slot = "lat_pgcache";
    lab.drop_slots(client, &[slot]).await;
    lab.create_slots(client, &[slot]).await?;
    let mut redis = lab.redis().await?;
    set_notifications(&mut redis, "K$").await?;
    let metrics_port = testkit::free_port().map_err(|e| BenchError::Setup(format!("{e:#}")))?;
    let config = lab.daemon_config(slot, &[TABLE], false, Some(metrics_port));
    let mut daemon = lab.spawn_daemon("latency", &config)?;
    let result = async {
        let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let watcher = watch_keys(lab, arrivals_tx, stopped).await?;
        warm_up(client, &mut daemon, &mut arrivals).await?;
        let mut runs = Vec::new();
        for (i, &rate) in scale.latency_rates.iter().enumerate() {
            let before = scrape_histogram(metrics_port).await;
            let cpu_before = daemon.cpu_seconds();
            let started = Instant::now();
            let run = offered_load(
                writers,
                rate,
                scale.latency_seconds,
                first_id(1, i),
                &mut arrivals,
                None,
            )
            .await;
            let daemon_cpu_percent = match (cpu_before, daemon.cpu_seconds()) {
                (Some(a), Some(b)) => Some((b - a) * 100.0 / started.elapsed().as_secs_f64()),
                _ => None,
            };
            let after = scrape_histogram(metrics_port).await;
            daemon.check_running()?;
            let mut view = daemon_view(before, after);
            view["daemon_reconnects_so_far"] = json!(super::lab::reconnects_in(&daemon.log()));
            view["daemon_cpu_percent_of_one_core"] = json!(daemon_cpu_percent);
            if let Ok(run) = &run {
                progress.say(format!(
                    "latency pgcache at {rate}/s: p99 {:.2} ms ({} committed/s)",
                    run.quantile_ms(0.99).unwrap_or(f64::NAN),
                    run.committed_rate.round()
                ));
            }
            runs.push(run.map(|r| (r, view)).map_err(|e| e.to_string()));
        }
        let reader = Reader::builder(&lab.pg_url(), &lab.redis_url())
            .table(TABLE.0, TABLE.1)
            .slot(slot)
            .build()
            .map_err(|e| BenchError::Setup(format!("building the reader: {e}")))?;
        let ryw = offered_load(
            writers,
            RYW_RATE,
            scale.latency_seconds,
            first_id(2, 0),
            &mut arrivals,
            Some(&reader),
        )
        .await;
        if let Ok(run) = &ryw {
            progress.say(format!(
                "latency read-your-writes at {RYW_RATE}/s: wait p99 {:.2} ms, commit to visible p99 {:.2} ms",
                percentile(&run.waits, 0.99).map_or(f64::NAN, ms),
                run.quantile_ms(0.99).unwrap_or(f64::NAN),
            ));
        }
        daemon.check_running()?;
        let ryw = ryw.map(|r| (r, Value::Null)).map_err(|e| e.to_string());
        let _ = stop.send(true);
        let _ = watcher.await;
        Ok((runs, ryw))
    }
    .await;
    daemon.stop().await;
    let _ = set_notifications(&mut redis, "").await;
    lab.drop_slots(client, &[slot]).await;
    result
}

async fn set_notifications(
    redis: &mut redis::aio::MultiplexedConnection,
    classes: &str,
) -> Result<(), BenchError> {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg(classes)
        .query_async::<()>(redis)
        .await
        .map_err(|e| redis_error("CONFIG SET notify-keyspace-events", e))
}

/// Subscribes to the keyspace events of `lat:*` and reports each key's arrival; returns
/// once the subscription is confirmed.
async fn watch_keys(
    lab: &Lab,
    arrivals: mpsc::UnboundedSender<(i64, Instant)>,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, BenchError> {
    let client =
        redis::Client::open(lab.redis_url()).map_err(|e| redis_error("opening Redis", e))?;
    let mut pubsub = client
        .get_async_pubsub()
        .await
        .map_err(|e| redis_error("connecting the watcher", e))?;
    pubsub
        .psubscribe("__keyspace@0__:lat:*")
        .await
        .map_err(|e| redis_error("PSUBSCRIBE", e))?;
    Ok(tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        loop {
            let message = tokio::select! {
                _ = stop.changed() => return,
                message = messages.next() => match message {
                    Some(message) => message,
                    None => return,
                },
            };
            let at = Instant::now();
            let id = message
                .get_channel_name()
                .rsplit_once(':')
                .and_then(|(_, id)| id.parse::<i64>().ok());
            if let Some(id) = id {
                let _ = arrivals.send((id, at));
            }
        }
    }))
}

/// Commits one row and waits until it is visible, so the daemon streams before the clock
/// starts.
async fn warm_up(
    client: &Client,
    daemon: &mut Process,
    arrivals: &mut mpsc::UnboundedReceiver<(i64, Instant)>,
) -> Result<(), BenchError> {
    client
        .execute(
            "INSERT INTO lat_events VALUES (0, 0, 'warm-up') ON CONFLICT (id) DO UPDATE SET v = lat_events.v + 1",
            &[],
        )
        .await
        .map_err(|e| pg_error("the warm-up insert", &e))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        while let Ok((id, _)) = arrivals.try_recv() {
            if id == 0 {
                return Ok(());
            }
        }
        daemon.check_running()?;
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "the daemon did not apply the warm-up row within 60 s\n--- its log ---\n{}",
                daemon.log_tail()
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn scrape_histogram(port: u16) -> Result<Histogram, String> {
    let text = child::scrape(port).await.map_err(|e| e.to_string())?;
    Histogram::parse(&text, APPLY_LATENCY)
        .ok_or_else(|| format!("{APPLY_LATENCY} is not in the daemon's /metrics"))
}

/// The daemon's own histogram over one rate's run, as bucket bounds ("p99 <= 2.5 ms").
fn daemon_view(before: Result<Histogram, String>, after: Result<Histogram, String>) -> Value {
    match (before, after) {
        (Ok(before), Ok(after)) => {
            let delta = after.since(&before);
            let bound = |q: f64| delta.quantile_bound(q).map(|s| s * 1e3);
            json!({
                "metric": APPLY_LATENCY,
                "what": "commit timestamp to EXEC acknowledged, bucket upper bounds",
                "count": delta.count,
                "mean_ms": (delta.count > 0).then(|| delta.sum / delta.count as f64 * 1e3),
                "p50_at_most_ms": bound(0.5),
                "p99_at_most_ms": bound(0.99),
                "p999_at_most_ms": bound(0.999),
            })
        }
        (Err(e), _) | (_, Err(e)) => json!({ "unavailable": e }),
    }
}

/// Offers `rate` single-row transactions a second for `seconds`, then waits for every
/// committed id to arrive (or 15 s), and pairs commits with arrivals.
async fn offered_load(
    writers: &[Writer],
    rate: u32,
    seconds: f64,
    first_id: i64,
    arrivals: &mut mpsc::UnboundedReceiver<(i64, Instant)>,
    reader: Option<&Reader>,
) -> Result<LoadRun, BenchError> {
    // Arrivals from before this run (the warm-up, stragglers) are not ours.
    while arrivals.try_recv().is_ok() {}
    let total = (f64::from(rate) * seconds).round() as u64;
    let cpu_before = child::machine_cpu();
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / f64::from(rate))).await;
        let (client, statement) = writers[i as usize % writers.len()].clone();
        let id = first_id + i as i64;
        let reader = reader.cloned();
        tasks.spawn(async move {
            client.execute(&statement, &[&id]).await?;
            let committed = Instant::now();
            let waited = match reader {
                Some(reader) => Some(
                    reader
                        .wait_for_writes()
                        .await
                        .map(|()| committed.elapsed())
                        .map_err(|e| e.to_string()),
                ),
                None => None,
            };
            Ok::<_, tokio_postgres::Error>((id, committed, waited))
        });
    }
    let launched = per_second(total, start.elapsed());
    let start = start.into_std();
    let mut commits = Vec::with_capacity(total as usize);
    let mut write_errors = 0;
    let mut first_error = None;
    let (mut waits, mut wait_errors, mut first_wait_error) = (Vec::new(), 0, None);
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok((id, committed, waited))) => {
                commits.push((id, committed));
                match waited {
                    Some(Ok(waited)) => waits.push(waited),
                    Some(Err(e)) => {
                        wait_errors += 1;
                        first_wait_error.get_or_insert(e);
                    }
                    None => {}
                }
            }
            Ok(Err(e)) => {
                write_errors += 1;
                first_error.get_or_insert_with(|| pg_error("insert", &e).to_string());
            }
            Err(e) => {
                write_errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    if commits.is_empty() {
        return Err(BenchError::Check(format!(
            "no transaction committed: {}",
            first_error.unwrap_or_default()
        )));
    }
    let machine_busy_percent = match (cpu_before, child::machine_cpu()) {
        (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
            Some((busy1 - busy0) as f64 * 100.0 / (total1 - total0) as f64)
        }
        _ => None,
    };
    let last_commit = commits.iter().map(|(_, at)| *at).max().unwrap_or(start);
    let committed_rate = per_second(commits.len() as u64, last_commit - start);

    let mut seen: HashMap<i64, Instant> = HashMap::with_capacity(commits.len());
    let deadline = Instant::now() + Duration::from_secs(15);
    while seen.len() < commits.len() && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(100), arrivals.recv()).await {
            Ok(Some((id, at))) => {
                if (first_id..first_id + total as i64).contains(&id) {
                    seen.entry(id).or_insert(at);
                }
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    let mut latencies = Vec::with_capacity(commits.len());
    let mut early = 0;
    for (id, committed) in &commits {
        if let Some(arrived) = seen.get(id) {
            if arrived < committed {
                early += 1;
            }
            latencies.push(arrived.saturating_duration_since(*committed));
        }
    }
    latencies.sort();
    waits.sort();
    Ok(LoadRun {
        offered: f64::from(rate),
        launched,
        committed: commits.len() as u64,
        committed_rate,
        write_errors,
        first_error,
        missing: (commits.len() - latencies.len()) as u64,
        latencies,
        early,
        machine_busy_percent,
        waits,
        wait_errors,
        first_wait_error,
    })
}
