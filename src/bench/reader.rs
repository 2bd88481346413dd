//! The read helper: its hit path against a raw `GET` plus `serde_json` parse on the same
//! kind of connection (a `ConnectionManager`, as the reader uses), and a stampede of
//! concurrent callers on one cold key against a single direct database read.
//!
//! The hit path is timed in rounds that alternate which side goes first, so drift in the
//! machine's load cancels out instead of favouring one side.

use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::lab::{execute, pg_error, redis_error, Lab};
use super::report::{Better, Figure, FigureSpec, Target};
use super::stats::{median, ms, percentile};
use super::{BenchError, Progress, Scale};
use crate::reader::{Reader, ReaderOptions};

const TABLE: &str = "public.rd_users";
const TEMPLATE: &str = "rd:{id}";
const HOT_ID: i64 = 1;
const COLD_ID: i64 = 2;
const ROWS: i64 = 1_000;

pub fn specs(scale: &Scale) -> Vec<FigureSpec> {
    vec![
        FigureSpec::new(
            "reader.hit",
            "Reader hit path (Reader::get_json on a warm key)",
            "ops/s",
            "redis-rs GET + serde_json",
            Better::Higher,
            Target::RatioAtLeast(0.9),
        ),
        FigureSpec::new(
            "reader.stampede.db_reads",
            format!(
                "Stampede: {} concurrent callers on one cold key, database reads",
                scale.stampede_callers
            ),
            "reads",
            "one read",
            Better::Lower,
            Target::Exactly(1.0),
        ),
        FigureSpec::new(
            "reader.stampede.p99",
            format!(
                "Stampede: p99 latency of {} concurrent callers",
                scale.stampede_callers
            ),
            "ms",
            "one direct database read",
            Better::Lower,
            Target::AtMostFloorPlus(5.0),
        ),
    ]
}

/// # Errors
/// Setup fails, or a lookup fails or returns the wrong row.
pub async fn run(lab: &Lab, scale: &Scale, progress: Progress) -> Result<Vec<Figure>, BenchError> {
    let specs = specs(scale);
    let client = lab.connect().await?;
    execute(
        &client,
        "creating the reader table",
        &format!(
            "DROP TABLE IF EXISTS rd_users;
             CREATE TABLE rd_users (
                 id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL,
                 score numeric(10,2) NOT NULL, created timestamptz NOT NULL);
             INSERT INTO rd_users
             SELECT g, 'user ' || g, 'user' || g || '@example.com', g / 7.0,
                    timestamptz '2026-01-01 00:00:00+00' + g * interval '1 hour'
             FROM generate_series(1, {ROWS}) g;
             "
        ),
    )
    .await?;
    // Alone: VACUUM cannot run in the implicit transaction of a multi-statement query.
    execute(&client, "vacuuming", "VACUUM ANALYZE rd_users").await?;
    lab.flush_redis().await?;
    let reader = Reader::builder(&lab.pg_url(), &lab.redis_url())
        .table(TABLE, TEMPLATE)
        .options(ReaderOptions::default())
        .build()
        .map_err(|e| BenchError::Setup(format!("building the reader: {e}")))?;
    // The first lookup is a miss that fills the key (and builds the table's query).
    let warm = get(&reader, HOT_ID).await?;
    let key = reader
        .table(TABLE)
        .and_then(|t| t.key(HOT_ID))
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let raw = raw_connection(lab).await?;
    let raw_value = raw_get(&raw, &key).await?;
    if raw_value != warm {
        return Err(BenchError::Check(format!(
            "the reader returned {warm} but {key} holds {raw_value}"
        )));
    }

    progress.say("reader: hit path");
    let hit = hit_path(&reader, &raw, &key, scale).await?;
    progress.say(format!(
        "reader: hit {:.1} us/op, raw {:.1} us/op",
        hit.reader_ns / 1e3,
        hit.raw_ns / 1e3
    ));
    let hit_figure = specs[0].measured(
        1e9 / hit.reader_ns,
        1e9 / hit.raw_ns,
        json!({
            "reader_ns_per_op": hit.reader_ns,
            "raw_ns_per_op": hit.raw_ns,
            "ops_per_side": hit.ops,
            "rounds": scale.reader_rounds,
            "connection": "redis::aio::ConnectionManager, one caller at a time",
        }),
    );

    progress.say("reader: stampede");
    let stampede = stampede(&reader, lab, scale.stampede_callers).await?;
    let direct = direct_read(&client).await?;
    let herd = raw_herd(&raw, &key, scale.stampede_callers).await?;
    let details = json!({
        "callers": scale.stampede_callers,
        "db_reads": stampede.db_reads,
        "coalesced": stampede.coalesced,
        "reader_stats": stampede.stats,
        "raw_get_herd_p99_ms": herd,
        "raw_get_herd": "the same number of concurrent raw GETs of a warm key on one ConnectionManager: what the herd costs before any lease",
        "p50_ms": stampede.p50_ms,
        "p99_ms": stampede.p99_ms,
        "max_ms": stampede.max_ms,
        "direct_read_ms": direct,
    });
    Ok(vec![
        hit_figure,
        specs[1].measured(stampede.db_reads as f64, 1.0, details.clone()),
        specs[2].measured(stampede.p99_ms, direct, details),
    ])
}

async fn get(reader: &Reader, id: i64) -> Result<Value, BenchError> {
    reader
        .get_json(TABLE, id)
        .await
        .map_err(|e| BenchError::Check(format!("Reader::get_json({id}): {e}")))?
        .ok_or_else(|| BenchError::Check(format!("Reader::get_json({id}) found no row")))
}

/// The same kind of connection the reader makes for itself.
async fn raw_connection(lab: &Lab) -> Result<ConnectionManager, BenchError> {
    let options = ReaderOptions::default();
    let client =
        redis::Client::open(lab.redis_url()).map_err(|e| redis_error("opening Redis", e))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(options.redis_timeout))
        .set_response_timeout(Some(options.redis_timeout))
        .set_number_of_retries(0);
    ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|e| redis_error("connecting the raw client", e))
}

async fn raw_get(conn: &ConnectionManager, key: &str) -> Result<Value, BenchError> {
    let mut conn = conn.clone();
    let bytes: Option<Vec<u8>> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .map_err(|e| redis_error("GET", e))?;
    let bytes = bytes.ok_or_else(|| BenchError::Check(format!("{key} is not in Redis")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| BenchError::Check(format!("{key} does not hold JSON: {e}")))
}

struct Hit {
    reader_ns: f64,
    raw_ns: f64,
    ops: usize,
}

async fn hit_path(
    reader: &Reader,
    raw: &ConnectionManager,
    key: &str,
    scale: &Scale,
) -> Result<Hit, BenchError> {
    let n = scale.reader_ops_per_round;
    let reader_side = || async {
        let started = Instant::now();
        for _ in 0..n {
            std::hint::black_box(get(reader, HOT_ID).await?);
        }
        Ok::<_, BenchError>(started.elapsed())
    };
    let raw_side = || async {
        let started = Instant::now();
        for _ in 0..n {
            std::hint::black_box(raw_get(raw, key).await?);
        }
        Ok::<_, BenchError>(started.elapsed())
    };
    // One untimed round each: connections warm, allocator settled.
    reader_side().await?;
    raw_side().await?;
    let (mut reader_time, mut raw_time) = (Duration::ZERO, Duration::ZERO);
    for round in 0..scale.reader_rounds {
        if round % 2 == 0 {
            reader_time += reader_side().await?;
            raw_time += raw_side().await?;
        } else {
            raw_time += raw_side().await?;
            reader_time += reader_side().await?;
        }
    }
    let ops = n * scale.reader_rounds;
    Ok(Hit {
        reader_ns: reader_time.as_nanos() as f64 / ops as f64,
        raw_ns: raw_time.as_nanos() as f64 / ops as f64,
        ops,
    })
}

struct Stampede {
    db_reads: u64,
    coalesced: u64,
    /// Everything the reader counted during the stampede.
    stats: Value,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// `callers` tasks wait on one signal, then all look up the same cold key.
async fn stampede(reader: &Reader, lab: &Lab, callers: usize) -> Result<Stampede, BenchError> {
    let key = reader
        .table(TABLE)
        .and_then(|t| t.key(COLD_ID))
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let mut redis = lab.redis().await?;
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut redis)
        .await
        .map_err(|e| redis_error("DEL", e))?;
    let before = reader.stats();
    let (go, ready) = watch::channel(None::<Instant>);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let reader = reader.clone();
        let mut ready = ready.clone();
        tasks.spawn(async move {
            let released = match ready.wait_for(Option::is_some).await {
                Ok(at) => at.unwrap_or_else(Instant::now),
                Err(_) => Instant::now(),
            };
            let value = get(&reader, COLD_ID).await;
            value.map(|v| (released.elapsed(), v))
        });
    }
    // Let every task reach its wait before the signal.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = go.send(Some(Instant::now()));
    let mut latencies = Vec::with_capacity(callers);
    let mut first: Option<Value> = None;
    while let Some(done) = tasks.join_next().await {
        let (latency, value) =
            done.map_err(|e| BenchError::Check(format!("a caller task failed: {e}")))??;
        match &first {
            None => first = Some(value),
            Some(v) if *v != value => {
                return Err(BenchError::Check(format!(
                    "callers got different values: {v} and {value}"
                )))
            }
            Some(_) => {}
        }
        latencies.push(latency);
    }
    latencies.sort();
    let after = reader.stats();
    let q = |p: f64| percentile(&latencies, p).map_or(f64::NAN, ms);
    Ok(Stampede {
        db_reads: after.db_reads - before.db_reads,
        coalesced: after.coalesced - before.coalesced,
        stats: json!({
            "hits": after.hits - before.hits,
            "misses": after.misses - before.misses,
            "fills": after.fills - before.fills,
            "waits": after.waits - before.waits,
            "coalesced": after.coalesced - before.coalesced,
            "fallbacks": after.fallbacks - before.fallbacks,
            "wait_timeouts": after.wait_timeouts - before.wait_timeouts,
        }),
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        max_ms: q(1.0),
    })
}

/// p99 latency of `callers` concurrent raw `GET`s of a warm key, released together.
async fn raw_herd(conn: &ConnectionManager, key: &str, callers: usize) -> Result<f64, BenchError> {
    let (go, ready) = watch::channel(None::<Instant>);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let conn = conn.clone();
        let key = key.to_string();
        let mut ready = ready.clone();
        tasks.spawn(async move {
            let released = match ready.wait_for(Option::is_some).await {
                Ok(at) => at.unwrap_or_else(Instant::now),
                Err(_) => Instant::now(),
            };
            raw_get(&conn, &key).await.map(|_| released.elapsed())
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = go.send(Some(Instant::now()));
    let mut latencies = Vec::with_capacity(callers);
    while let Some(done) = tasks.join_next().await {
        latencies.push(done.map_err(|e| BenchError::Check(format!("a GET task failed: {e}")))??);
    }
    latencies.sort();
    percentile(&latencies, 0.99)
        .map(ms)
        .ok_or_else(|| BenchError::Check("no GET samples".into()))
}

/// The floor of a cold read: the row read directly on an open connection (median of 21).
async fn direct_read(client: &tokio_postgres::Client) -> Result<f64, BenchError> {
    let mut samples = Vec::new();
    for _ in 0..21 {
        let started = Instant::now();
        // One round trip, as the reader's own read (simple protocol).
        let messages = client
            .simple_query(&format!(
                "SELECT id, name, email, score, created FROM rd_users WHERE id = {COLD_ID}"
            ))
            .await
            .map_err(|e| pg_error("the direct read", &e))?;
        samples.push(started.elapsed());
        let rows = messages
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count();
        if rows != 1 {
            return Err(BenchError::Check("the direct read found no row".into()));
        }
    }
    median(samples)
        .map(ms)
        .ok_or_else(|| BenchError::Check("no direct read samples".into()))
}
