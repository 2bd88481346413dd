//! Backfill throughput: the daemon's watermark backfill of a large table against the
//! floor of `COPY (SELECT ...) TO STDOUT` piped straight into pipelined Redis `SET`s (each
//! row's COPY text under its key, no encoding), on the same table in the same run. Each side
//! runs twice, in the order floor, pgcache, pgcache, floor, and counts its faster run: on a
//! shared 2-core machine single runs swing by a fifth or more.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::StreamExt;
use serde_json::json;
use tokio_postgres::Client;

use super::lab::{execute, pg_error, redis_error, Lab, TableSpec};
use super::report::{Better, Figure, FigureSpec, Target};
use super::{per_second, BenchError, Progress, Scale};
use crate::checkpoint::{self, BackfillProgress, FIELD_BACKFILL_PREFIX};
use crate::config::DEFAULT_BACKFILL_CHUNK_ROWS;

const TABLE: TableSpec = ("public.bf_rows", "bf:{id}");
const COLUMNS: &str = "id, name, email, score, balance, active, created";
/// Rows per pipeline in the floor: the daemon's default chunk.
const FLOOR_BATCH: usize = DEFAULT_BACKFILL_CHUNK_ROWS;

pub fn spec(scale: &Scale) -> FigureSpec {
    FigureSpec::new(
        "backfill.rows",
        format!("Backfill of {} rows", scale.backfill_rows),
        "rows/s",
        "COPY + pipelined SET",
        Better::Higher,
        Target::RatioAtLeast(0.8),
    )
}

/// # Errors
/// Setup fails, either side fails, or Redis does not end up with every row.
pub async fn run(lab: &Lab, scale: &Scale, progress: Progress) -> Result<Figure, BenchError> {
    let n = scale.backfill_rows;
    let client = lab.connect().await?;
    progress.say(format!("backfill: writing {n} rows"));
    execute(
        &client,
        "creating the backfill table",
        &format!(
            "DROP TABLE IF EXISTS bf_rows;
             CREATE TABLE bf_rows (
                 id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL,
                 score double precision NOT NULL, balance numeric(12,2) NOT NULL,
                 active boolean NOT NULL, created timestamptz NOT NULL);
             INSERT INTO bf_rows
             SELECT g, 'customer ' || g, 'customer' || g || '@example.com', g * 0.37,
                    (g % 100000) / 100.0, g % 3 = 0,
                    timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second'
             FROM generate_series(1, {n}) g;
             "
        ),
    )
    .await?;
    // Alone: VACUUM cannot run in the implicit transaction of a multi-statement query.
    execute(&client, "vacuuming", "VACUUM ANALYZE bf_rows").await?;

    let (first_floor, first_floor_redis) = time_floor(lab, &client, n, progress).await?;
    let mut runs = Vec::with_capacity(2);
    for which in ["pgcache", "pgcache again"] {
        progress.say(format!("backfill: {which}"));
        lab.flush_redis().await?;
        runs.push(time_daemon(lab, &client, n).await?);
        // The rows and the checkpoint hash.
        expect_keys(lab, n + 1, "pgcache").await?;
    }
    let (second_floor, second_floor_redis) = time_floor(lab, &client, n, progress).await?;
    let floor = first_floor.min(second_floor);
    let best = runs
        .iter()
        .min_by_key(|run| run.elapsed)
        .ok_or_else(|| BenchError::Check("no backfill run".into()))?;
    let pgcache = best.elapsed;
    progress.say(format!(
        "backfill: COPY {:.2} s, pgcache {:.2} s",
        floor.as_secs_f64(),
        pgcache.as_secs_f64()
    ));
    let own_seconds = best
        .progress
        .updated_ms
        .saturating_sub(best.progress.started_ms) as f64
        / 1e3;
    Ok(spec(scale).measured(
        per_second(n, pgcache),
        per_second(n, floor),
        json!({
            "rows": n,
            "floor_seconds": floor.as_secs_f64(),
            "floor_runs_seconds": [first_floor.as_secs_f64(), second_floor.as_secs_f64()],
            "pgcache_seconds_from_spawn": pgcache.as_secs_f64(),
            "pgcache_runs_seconds_from_spawn": runs.iter().map(|r| r.elapsed.as_secs_f64()).collect::<Vec<_>>(),
            // Redis main-thread CPU seconds in each run: how close each side keeps Redis to
            // saturation (a run's Redis seconds near its wall seconds: Redis is the limit).
            "floor_runs_redis_cpu_seconds": [first_floor_redis, second_floor_redis],
            "pgcache_runs_redis_cpu_seconds": runs.iter().map(|r| r.redis_cpu_seconds).collect::<Vec<_>>(),
            "pgcache_runs_daemon_cpu_seconds": runs.iter().map(|r| r.daemon_cpu_seconds).collect::<Vec<_>>(),
            "pgcache_own_seconds": own_seconds,
            "chunk_rows": DEFAULT_BACKFILL_CHUNK_ROWS,
            "daemon_reconnects": best.reconnects,
            "floor_batch": FLOOR_BATCH,
        }),
    ))
}

/// One run of the floor into an empty Redis: its time, and the Redis CPU seconds it took.
async fn time_floor(
    lab: &Lab,
    client: &Client,
    n: u64,
    progress: Progress,
) -> Result<(Duration, f64), BenchError> {
    progress.say("backfill: the floor (COPY into pipelined SETs)");
    lab.flush_redis().await?;
    let redis_before = lab.redis_cpu_seconds().await?;
    let started = Instant::now();
    let copied = copy_into_redis(lab, client).await?;
    let floor = started.elapsed();
    let redis_cpu = lab.redis_cpu_seconds().await? - redis_before;
    if copied != n {
        return Err(BenchError::Check(format!(
            "the floor copied {copied} rows, not {n}"
        )));
    }
    expect_keys(lab, n, "the floor").await?;
    Ok((floor, redis_cpu))
}

/// The floor: every row's COPY text under `bf:<id>`, pipelines of `FLOOR_BATCH` with the
/// next batch read while the previous one is written. Returns the rows copied.
async fn copy_into_redis(lab: &Lab, client: &Client) -> Result<u64, BenchError> {
    let redis = lab.redis().await?;
    let stream = client
        .copy_out(&format!("COPY (SELECT {COLUMNS} FROM bf_rows) TO STDOUT"))
        .await
        .map_err(|e| pg_error("COPY", &e))?;
    let mut stream = std::pin::pin!(stream);
    let mut pending = BytesMut::new();
    let mut pipe = redis::pipe();
    let mut in_pipe = 0;
    let mut rows = 0u64;
    let mut in_flight: Option<tokio::task::JoinHandle<redis::RedisResult<()>>> = None;
    let mut key = String::new();
    loop {
        let chunk = stream.next().await;
        let last = chunk.is_none();
        if let Some(chunk) = chunk {
            pending.extend_from_slice(&chunk.map_err(|e| pg_error("COPY", &e))?);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line = pending.split_to(end + 1);
                let line = &line[..end];
                let id = line.split(|&b| b == b'\t').next().unwrap_or_default();
                key.clear();
                key.push_str("bf:");
                key.push_str(&String::from_utf8_lossy(id));
                pipe.cmd("SET").arg(&key).arg(line).ignore();
                in_pipe += 1;
                rows += 1;
            }
        }
        if in_pipe >= FLOOR_BATCH || (last && in_pipe > 0) {
            let batch = std::mem::replace(&mut pipe, redis::pipe());
            in_pipe = 0;
            if let Some(previous) = in_flight.take() {
                wait_written(previous).await?;
            }
            let mut conn = redis.clone();
            in_flight = Some(tokio::spawn(async move {
                batch.query_async::<()>(&mut conn).await
            }));
        }
        if last {
            break;
        }
    }
    if let Some(previous) = in_flight.take() {
        wait_written(previous).await?;
    }
    Ok(rows)
}

async fn wait_written(
    handle: tokio::task::JoinHandle<redis::RedisResult<()>>,
) -> Result<(), BenchError> {
    handle
        .await
        .map_err(|e| BenchError::Check(format!("a pipeline task failed: {e}")))?
        .map_err(|e| redis_error("writing a pipeline", e))
}

async fn expect_keys(lab: &Lab, expected: u64, who: &str) -> Result<(), BenchError> {
    let mut redis = lab.redis().await?;
    let keys: u64 = redis::cmd("DBSIZE")
        .query_async(&mut redis)
        .await
        .map_err(|e| redis_error("DBSIZE", e))?;
    if keys != expected {
        return Err(BenchError::Check(format!(
            "after {who}'s backfill Redis holds {keys} keys, not {expected}"
        )));
    }
    Ok(())
}

/// One run of the daemon's backfill.
struct DaemonRun {
    /// From spawning the daemon until the checkpoint says the table is done.
    elapsed: Duration,
    /// The checkpoint's progress at the end.
    progress: BackfillProgress,
    reconnects: usize,
    daemon_cpu_seconds: f64,
    /// Redis main-thread CPU seconds during the run.
    redis_cpu_seconds: f64,
}

/// Starts the daemon with automatic backfill on a fresh slot and times it until the
/// checkpoint says the table is done.
async fn time_daemon(lab: &Lab, client: &Client, rows: u64) -> Result<DaemonRun, BenchError> {
    let slot = "bf_pgcache";
    lab.drop_slots(client, &[slot]).await;
    lab.create_slots(client, &[slot]).await?;
    let mut redis = lab.redis().await?;
    let config = lab.daemon_config(slot, &[TABLE], true, None);
    let checkpoint_key = checkpoint::checkpoint_key("", slot);
    let field = format!("{FIELD_BACKFILL_PREFIX}{}", TABLE.0);
    let redis_before = lab.redis_cpu_seconds().await?;
    let started = Instant::now();
    let mut daemon = lab.spawn_daemon("backfill", &config)?;
    let limit = Duration::from_secs(600);
    let result = loop {
        let value: Option<String> = match redis::cmd("HGET")
            .arg(&checkpoint_key)
            .arg(&field)
            .query_async(&mut redis)
            .await
        {
            Ok(value) => value,
            Err(e) => break Err(redis_error("reading the backfill progress", e)),
        };
        if let Some(value) = value {
            match serde_json::from_str::<BackfillProgress>(&value) {
                Ok(p) if p.is_done() => break Ok((started.elapsed(), p)),
                Ok(_) => {}
                Err(e) => {
                    break Err(BenchError::Check(format!(
                        "backfill progress {value:?} is not what the daemon writes: {e}"
                    )))
                }
            }
        }
        if let Err(e) = daemon.check_running() {
            break Err(e);
        }
        if started.elapsed() > limit {
            break Err(BenchError::Timeout(format!(
                "the daemon's backfill of {rows} rows did not finish within {limit:?}\n--- its log ---\n{}",
                daemon.log_tail()
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let daemon_cpu_seconds = daemon.cpu_seconds().unwrap_or(0.0);
    let redis_after = lab.redis_cpu_seconds().await;
    daemon.stop().await;
    lab.drop_slots(client, &[slot]).await;
    let redis_cpu_seconds = redis_after? - redis_before;
    let (elapsed, progress) = result?;
    let reconnects = super::lab::reconnects_in(&daemon.log());
    if progress.rows != rows {
        return Err(BenchError::Check(format!(
            "the daemon says it backfilled {} rows, not {rows}",
            progress.rows
        )));
    }
    Ok(DaemonRun {
        elapsed,
        progress,
        reconnects,
        daemon_cpu_seconds,
        redis_cpu_seconds,
    })
}
