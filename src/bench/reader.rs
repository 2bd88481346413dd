//! The read helper: its hit path against a raw `GET` plus `serde_json` parse on the same
//! kind of connection (a `ConnectionManager`, as the reader uses), and a stampede of
//! concurrent callers on one cold key against a single direct database read.
//!
//! The hit path is timed in rounds that alternate which side goes first, so drift in the
//! machine's load cancels out instead of favouring one side.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use super::lab::{execute, pg_error, redis_error, Lab};
use super::report::{Better, Figure, FigureSpec, Target};
use super::stats::{median, ms, percentile};
use super::{BenchError, Progress, Scale};
use crate::reader::{Reader, ReaderOptions, Served};

const TABLE: &str = "public.rd_users";
const SLOT: &str = "rd_pgcache";
const TEMPLATE: &str = "rd:{id}";
const HOT_ID: i64 = 1;
/// The stampedes' keys: `COLD_ID`, `COLD_ID + 1`, ...
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
                "Stampede: {} concurrent callers on one cold key, database reads per stampede",
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
                "Stampede: p99 latency of {} concurrent callers ({} stampedes)",
                scale.stampede_callers, scale.stampede_rounds
            ),
            "ms",
            "one direct database read",
            Better::Lower,
            Target::AtMostFloorPlus(5.0),
        ),
        FigureSpec::new(
            "reader.hung_redis.p99",
            format!(
                "Hung Redis (SIGSTOP): p99 of {:.0} s of lookups after the first timeout",
                scale.hung_redis_seconds
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
    // The daemon runs beside the reader, as in production: fills wait until it has applied
    // the stream up to where their rows were read (monotonic reads).
    lab.drop_slots(&client, &[SLOT]).await;
    lab.create_slots(&client, &[SLOT]).await?;
    let config = lab
        .daemon_config(SLOT, &[(TABLE, TEMPLATE)], false, None)
        .replace("mode = \"mirror\"", "mode = \"refresh\"");
    let mut daemon = lab.spawn_daemon("reader", &config)?;
    let measured = measure(lab, &client, &specs, scale, progress).await;
    daemon.stop().await;
    lab.drop_slots(&client, &[SLOT]).await;
    let mut figures = measured?;
    // Without the daemon, which would stall on the paused Redis too.
    progress.say("reader: hung Redis");
    figures.push(
        match hung_redis(lab, &client, &specs[3], scale, progress).await {
            Ok(figure) => figure,
            Err(e) => specs[3].failed(e.to_string()),
        },
    );
    Ok(figures)
}

/// Waits until the daemon has written its first position.
async fn daemon_streaming(lab: &Lab) -> Result<(), BenchError> {
    let mut redis = lab.redis().await?;
    let key = crate::checkpoint::checkpoint_key("", SLOT);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let applied: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg(crate::checkpoint::FIELD_APPLIED)
            .query_async(&mut redis)
            .await
            .map_err(|e| redis_error("reading the checkpoint", e))?;
        if applied.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(
                "the daemon did not start streaming".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn measure(
    lab: &Lab,
    client: &tokio_postgres::Client,
    specs: &[FigureSpec],
    scale: &Scale,
    progress: Progress,
) -> Result<Vec<Figure>, BenchError> {
    daemon_streaming(lab).await?;
    let reader = Reader::builder(&lab.pg_url(), &lab.redis_url())
        .table(TABLE, TEMPLATE)
        .slot(SLOT)
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

    progress.say(format!("reader: {} stampedes", scale.stampede_rounds));
    let stampede = stampedes(&reader, lab, scale).await?;
    // A herd on a reader built just before it, as after a deploy: with the warm-up the
    // build starts, and with none.
    let cold_id = COLD_ID + scale.stampede_rounds as i64;
    let cold_bare = cold_round(
        lab,
        scale,
        ReaderOptions::default().warm_connections(0),
        cold_id,
    )
    .await?;
    let cold = cold_round(lab, scale, ReaderOptions::default(), cold_id + 1).await?;
    progress.say(format!(
        "reader: a herd on a just-built reader: p99 {cold:.2} ms (without warm connections {cold_bare:.2} ms)"
    ));
    let direct = direct_read(client, Duration::ZERO).await?;
    let direct_after_idle = direct_read(client, Duration::from_millis(100)).await?;
    let (herd_p99, herd_from_release_p99) = raw_herd(&raw, &key, scale.stampede_callers).await?;
    let details = json!({
        "callers": scale.stampede_callers,
        "rounds": scale.stampede_rounds,
        "latency": "per call, from each caller's call to its return; from_release: from the signal that released all callers",
        "round_p99_ms": stampede.round_p99_ms,
        "round_lag_waits": stampede.round_lag_waits,
        "cold_reader_p99_ms": cold,
        "cold_reader_without_warm_connections_p99_ms": cold_bare,
        "cold_reader": "one herd on a reader built 100 ms before it (not in the p99 above); without warm connections: warm_connections = 0, so the herd's leader connects",
        "db_reads": stampede.db_reads,
        "coalesced": stampede.coalesced,
        "reader_stats": stampede.stats,
        "p50_ms": stampede.p50_ms,
        "p99_ms": stampede.p99_ms,
        "max_ms": stampede.max_ms,
        "from_release_p99_ms": stampede.from_release_p99_ms,
        "raw_get_herd_p99_ms": herd_p99,
        "raw_get_herd_from_release_p99_ms": herd_from_release_p99,
        "raw_get_herd": "the same number of concurrent raw GETs of a warm key on one ConnectionManager: what the herd costs before any lease",
        "direct_read_ms": direct,
        "direct_read_after_idle_ms": direct_after_idle,
        "direct_read_after_idle": "the same read after 100 ms with nothing to do, as the stampede's own read comes after the herd's 100 ms wait (not the floor: the floor is the warm read)",
    });
    Ok(vec![
        hit_figure,
        specs[1].measured(
            stampede.db_reads as f64 / scale.stampede_rounds.max(1) as f64,
            1.0,
            details.clone(),
        ),
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
    /// In all rounds.
    db_reads: u64,
    coalesced: u64,
    /// Everything the reader counted during the stampede.
    stats: Value,
    /// Over every caller of every round.
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Each round's own p99.
    round_p99_ms: Vec<f64>,
    /// Each round's fills that waited for the daemon to apply up to their read.
    round_lag_waits: Vec<u64>,
    /// Over every caller, timed from the release instead of from its call.
    from_release_p99_ms: f64,
}

/// Stampedes one after another, each on a cold key of its own: `callers` tasks wait on one
/// signal, then all look up the same key. One round alone is at the mercy of whatever else
/// the machine does in those few milliseconds.
async fn stampedes(reader: &Reader, lab: &Lab, scale: &Scale) -> Result<Stampede, BenchError> {
    let callers = scale.stampede_callers;
    let mut redis = lab.redis().await?;
    let before = reader.stats();
    let mut latencies = Vec::with_capacity(callers * scale.stampede_rounds);
    let mut from_release = Vec::with_capacity(callers * scale.stampede_rounds);
    let mut round_p99_ms = Vec::with_capacity(scale.stampede_rounds);
    let mut round_lag_waits = Vec::with_capacity(scale.stampede_rounds);
    for round in 0..scale.stampede_rounds {
        let id = COLD_ID + round as i64;
        let key = reader
            .table(TABLE)
            .and_then(|t| t.key(id))
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        redis::cmd("DEL")
            .arg(&key)
            .query_async::<()>(&mut redis)
            .await
            .map_err(|e| redis_error("DEL", e))?;
        let lag_waits_before = reader.stats().lag_waits;
        let results = herd(callers, move || {
            let reader = reader.clone();
            async move { get(&reader, id).await }
        })
        .await?;
        let mut round_latencies = Vec::with_capacity(callers);
        let mut first: Option<Value> = None;
        for Timed {
            value,
            call,
            from_release: since_release,
        } in results
        {
            match &first {
                None => first = Some(value),
                Some(v) if *v != value => {
                    return Err(BenchError::Check(format!(
                        "callers got different values: {v} and {value}"
                    )))
                }
                Some(_) => {}
            }
            round_latencies.push(call);
            from_release.push(since_release);
        }
        if first.as_ref().and_then(|v| v.get("id")) != Some(&json!(id)) {
            return Err(BenchError::Check(format!(
                "the stampede on id {id} returned {first:?}"
            )));
        }
        round_latencies.sort();
        round_p99_ms.push(percentile(&round_latencies, 0.99).map_or(f64::NAN, ms));
        round_lag_waits.push(reader.stats().lag_waits - lag_waits_before);
        latencies.extend(round_latencies);
    }
    latencies.sort();
    from_release.sort();
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
            "lag_waits": after.lag_waits - before.lag_waits,
            "db_reads": after.db_reads - before.db_reads,
        }),
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        max_ms: q(1.0),
        round_p99_ms,
        round_lag_waits,
        from_release_p99_ms: percentile(&from_release, 0.99).map_or(f64::NAN, ms),
    })
}

/// p99 of one herd of `callers` on key `id`, released 100 ms after a new reader is built.
async fn cold_round(
    lab: &Lab,
    scale: &Scale,
    options: ReaderOptions,
    id: i64,
) -> Result<f64, BenchError> {
    let reader = Reader::builder(&lab.pg_url(), &lab.redis_url())
        .table(TABLE, TEMPLATE)
        .slot(SLOT)
        .options(options)
        .build()
        .map_err(|e| BenchError::Setup(format!("building the reader: {e}")))?;
    let results = herd(scale.stampede_callers, || {
        let reader = reader.clone();
        async move { get(&reader, id).await }
    })
    .await?;
    let mut latencies = Vec::with_capacity(results.len());
    for timed in results {
        if timed.value.get("id") != Some(&json!(id)) {
            return Err(BenchError::Check(format!(
                "the herd on id {id} returned {}",
                timed.value
            )));
        }
        latencies.push(timed.call);
    }
    latencies.sort();
    Ok(percentile(&latencies, 0.99).map_or(f64::NAN, ms))
}

/// p99 latency of `callers` concurrent raw `GET`s of a warm key, released together: per
/// call, and from the release.
async fn raw_herd(
    conn: &ConnectionManager,
    key: &str,
    callers: usize,
) -> Result<(f64, f64), BenchError> {
    let results = herd(callers, || {
        let conn = conn.clone();
        let key = key.to_string();
        async move { raw_get(&conn, &key).await }
    })
    .await?;
    let (mut calls, mut from_release): (Vec<Duration>, Vec<Duration>) =
        results.iter().map(|t| (t.call, t.from_release)).unzip();
    calls.sort();
    from_release.sort();
    match (percentile(&calls, 0.99), percentile(&from_release, 0.99)) {
        (Some(call), Some(release)) => Ok((ms(call), ms(release))),
        _ => Err(BenchError::Check("no GET samples".into())),
    }
}

/// One caller of a herd: what it got, how long its call took, and how long after the
/// release it returned.
struct Timed<T> {
    value: T,
    /// From the call to its return: the caller's latency.
    call: Duration,
    /// From the release: also the time the runtime took to start this caller at all.
    from_release: Duration,
}

/// Runs `callers` tasks made by `caller`, released together by one signal, and returns what
/// each got with its latencies.
///
/// The caller's latency is timed from its call: on 2 cores, merely starting the last of
/// 1,000 released tasks takes the runtime 1-3 ms (measured with a timestamp at each task's
/// start), time in which that caller has asked nothing yet. The time from the release is
/// kept too, and reported beside it.
///
/// Completions are collected only after the last caller is done (a countdown wakes this
/// task once), so that collecting does not compete with the callers it measures.
async fn herd<F, Fut, T>(callers: usize, caller: F) -> Result<Vec<Timed<T>>, BenchError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, BenchError>> + Send + 'static,
    T: Send + 'static,
{
    let (go, ready) = watch::channel(None::<Instant>);
    let remaining = Arc::new(AtomicUsize::new(callers));
    let all_done = Arc::new(Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let call = caller();
        let mut ready = ready.clone();
        let remaining = remaining.clone();
        let all_done = all_done.clone();
        tasks.spawn(async move {
            // Counts down however the caller ends, a panic included.
            let _done = CountDown(remaining, all_done);
            let released = match ready.wait_for(Option::is_some).await {
                Ok(at) => at.unwrap_or_else(Instant::now),
                Err(_) => Instant::now(),
            };
            let called = Instant::now();
            let value = call.await?;
            Ok(Timed {
                value,
                call: called.elapsed(),
                from_release: released.elapsed(),
            })
        });
    }
    // Let every task reach its wait before the signal.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let done = all_done.notified();

    let _ = go.send(Some(Instant::now()));
    done.await;

    let mut results = Vec::with_capacity(callers);
    while let Some(done) = tasks.join_next().await {
        results.push(done.map_err(|e| BenchError::Check(format!("a caller task failed: {e}")))??);
    }
    Ok(results)
}

struct CountDown(Arc<AtomicUsize>, Arc<Notify>);

impl Drop for CountDown {
    fn drop(&mut self) {
        if self.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.1.notify_one();
        }
    }
}

/// The floor of a cold read: the row read directly on an open connection (median of 21),
/// each read after `pause` (none for the floor itself). It is the shortest read the
/// stampede's leader could do; its own read also checks the table's columns (see
/// `reader::source`) and comes after a `GET` and a lease.
async fn direct_read(client: &tokio_postgres::Client, pause: Duration) -> Result<f64, BenchError> {
    let mut samples = Vec::new();
    for _ in 0..21 {
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
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

/// Resumes a paused Redis however the measurement ends.
struct Resume<'a>(&'a Lab);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        let _ = self.0.resume_redis();
    }
}

/// Lookups with Redis stopped by `SIGSTOP`: the first one waits for `redis_timeout` and
/// opens the circuit breaker; the ones after it, one at a time for a few seconds (across
/// several cool-downs and their background probes), are timed against a direct read.
async fn hung_redis(
    lab: &Lab,
    client: &tokio_postgres::Client,
    spec: &FigureSpec,
    scale: &Scale,
    progress: Progress,
) -> Result<Figure, BenchError> {
    let options = ReaderOptions::default();
    let reader = Reader::builder(&lab.pg_url(), &lab.redis_url())
        .table(TABLE, TEMPLATE)
        .slot(SLOT)
        .options(options.clone())
        .build()
        .map_err(|e| BenchError::Setup(format!("building the reader: {e}")))?;
    // A hit: the Redis connection is open and the pool warm before Redis hangs.
    let hot = get(&reader, HOT_ID).await?;
    let table = reader
        .table(TABLE)
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    lab.pause_redis()?;
    let resume = Resume(lab);
    let started = Instant::now();
    let first = table
        .lookup::<Value>(HOT_ID)
        .await
        .map_err(|e| BenchError::Check(format!("the first lookup with Redis paused: {e}")))?;
    let first_ms = ms(started.elapsed());
    if first.value.as_ref() != Some(&hot) {
        return Err(BenchError::Check(format!(
            "with Redis paused, the reader returned {:?} for {HOT_ID}, not {hot}",
            first.value
        )));
    }
    let mut latencies = Vec::new();
    let mut direct_latencies = Vec::new();
    let mut served = std::collections::BTreeMap::<String, u64>::new();
    let until = Instant::now() + Duration::from_secs_f64(scale.hung_redis_seconds);
    let mut id = COLD_ID;
    while Instant::now() < until {
        id = id % ROWS + 1;
        let started = Instant::now();
        let found = table
            .lookup::<Value>(id)
            .await
            .map_err(|e| BenchError::Check(format!("lookup of {id} with Redis paused: {e}")))?;
        latencies.push(started.elapsed());
        if found.value.as_ref().and_then(|v| v.get("id")) != Some(&json!(id)) {
            return Err(BenchError::Check(format!(
                "with Redis paused, the lookup of {id} returned {:?}",
                found.value
            )));
        }
        *served.entry(format!("{:?}", found.served)).or_default() += 1;
        // The same row read directly, under the same load, for the tail beside the floor.
        let started = Instant::now();
        client
            .simple_query(&format!(
                "SELECT id, name, email, score, created FROM rd_users WHERE id = {id}"
            ))
            .await
            .map_err(|e| pg_error("the interleaved direct read", &e))?;
        direct_latencies.push(started.elapsed());
    }
    let paused_stats = reader.stats();
    drop(resume);
    // The breaker closes again once a probe gets an answer.
    let resumed = Instant::now();
    let closed_ms = loop {
        let found = table
            .lookup::<Value>(HOT_ID)
            .await
            .map_err(|e| BenchError::Check(format!("lookup after Redis resumed: {e}")))?;
        if found.served == Served::Hit {
            break ms(resumed.elapsed());
        }
        if resumed.elapsed() > options.redis_timeout + options.breaker_cooldown * 4 {
            return Err(BenchError::Check(
                "the breaker did not close after Redis resumed".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let direct = direct_read(client, Duration::ZERO).await?;
    latencies.sort();
    direct_latencies.sort();
    let q = |p: f64| percentile(&latencies, p).map_or(f64::NAN, ms);
    let direct_q = |p: f64| percentile(&direct_latencies, p).map_or(f64::NAN, ms);
    progress.say(format!(
        "reader: hung Redis: first lookup {first_ms:.0} ms, then p99 {:.2} ms over {} lookups \
         (direct reads beside them: p99 {:.2} ms)",
        q(0.99),
        latencies.len(),
        direct_q(0.99)
    ));
    let details = json!({
        "redis_timeout_ms": ms(options.redis_timeout),
        "breaker_failures": options.breaker_failures,
        "breaker_cooldown_ms": ms(options.breaker_cooldown),
        "first_lookup_ms": first_ms,
        "lookups": latencies.len(),
        "served": served,
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
        "max_ms": q(1.0),
        "breaker_fallbacks": paused_stats.breaker_fallbacks,
        "fallbacks": paused_stats.fallbacks,
        "closed_after_resume_ms": closed_ms,
        "direct_read_ms": direct,
        "interleaved_direct_read_p50_ms": direct_q(0.5),
        "interleaved_direct_read_p99_ms": direct_q(0.99),
        "interleaved_direct_read": "after each lookup, the same row read directly on the bench's own connection: the tail of a bare read under the same load",
        "latency": "one caller at a time, each from its call to its return, after the first lookup (which waits for redis_timeout)",
    });
    Ok(spec.measured(q(0.99), direct, details))
}
