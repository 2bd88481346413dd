//! Catch-up throughput on the same WAL, and the daemon's memory in the large transaction.
//!
//! For each workload: five slots are created at the same position, the workload is
//! written, and a marker row is committed last. Then, in the order A B B A, `pg_recvlogical`
//! streams a slot into /dev/null up to the marker, the daemon streams a slot into an empty
//! Redis until the marker's key appears (transactions apply in commit order, in one `EXEC`
//! with the checkpoint, so the marker is the last thing to become visible), the daemon does
//! it again on the third slot, and `pg_recvlogical` again on the fourth. Each side counts its
//! faster run, so that going first or last (caches, the machine's mood, which on a shared
//! 2-core machine swings single runs by a third) favours neither side. A fifth slot is
//! streamed by a bare pgoutput consumer (decode only, no output), reported in the details:
//! for small transactions `pg_recvlogical`'s own per-message writes make it slower than
//! what the walsender can deliver.
//!
//! The large transaction is also streamed by the daemon with `postgres.streaming = false`
//! (Postgres holds it, spilled to its disk, until the commit) and with `apply.max_spool_bytes`
//! above its size (streamed, spooled, and applied in one `EXEC`), each on a slot of its own;
//! the details report each run's time and its walsender's `spill_bytes` and `stream_bytes`
//! (`pg_stat_replication_slots`).
//!
//! Both are timed from the moment their walsender takes the slot (`pg_replication_slots.active`)
//! to the end, so the figure is streaming throughput, not process start-up; the wall time
//! from spawn is in the details too.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_postgres::Client;

use super::child::{self, Exit, Process};
use super::consumer;
use super::lab::{self, execute, pg_error, redis_error, Lab, TableSpec, DB, PUBLICATION};
use super::report::{Better, Figure, FigureSpec, Target};
use super::{per_second, BenchError, Progress, Scale};
use crate::checkpoint;
use crate::Lsn;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Updates,
    BulkInsert,
    Mixed,
}

impl Workload {
    fn id(self) -> &'static str {
        match self {
            Workload::Updates => "updates",
            Workload::BulkInsert => "bulk_insert",
            Workload::Mixed => "mixed",
        }
    }

    fn tables(self) -> &'static [TableSpec] {
        match self {
            Workload::Updates => &[("public.cu_accounts", "acct:{id}"), MARKER],
            Workload::BulkInsert => &[("public.cu_events", "event:{id}"), MARKER],
            Workload::Mixed => &[
                ("public.cu_users", "user:{id}"),
                ("public.cu_orders", "order:{id}"),
                ("public.cu_items", "item:{id}"),
                MARKER,
            ],
        }
    }
}

const MARKER: TableSpec = ("public.cu_marker", "marker:{id}");
const ACCOUNTS: u64 = 10_000;
const MIXED_SEED_ROWS: u64 = 20_000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cu_marker (id bigint PRIMARY KEY, note text NOT NULL);
CREATE TABLE IF NOT EXISTS cu_accounts (
    id bigint PRIMARY KEY, balance bigint NOT NULL, owner text NOT NULL);
CREATE TABLE IF NOT EXISTS cu_events (
    id bigint PRIMARY KEY, kind text NOT NULL, amount numeric(12,2) NOT NULL,
    created timestamptz NOT NULL, note text NOT NULL);
CREATE TABLE IF NOT EXISTS cu_users (
    id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL, score int NOT NULL);
CREATE TABLE IF NOT EXISTS cu_orders (
    id bigint PRIMARY KEY, user_id bigint NOT NULL, total numeric(12,2) NOT NULL,
    status text NOT NULL, created timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS cu_items (
    id bigint PRIMARY KEY, order_id bigint NOT NULL, sku text NOT NULL, qty int NOT NULL);
";

fn spec(w: Workload, scale: &Scale) -> FigureSpec {
    let (title, unit) = match w {
        Workload::Updates => (
            format!(
                "Catch-up: {} single-row update transactions",
                scale.update_transactions
            ),
            "tx/s",
        ),
        Workload::BulkInsert => (
            format!("Catch-up: one {}-row insert transaction", scale.insert_rows),
            "rows/s",
        ),
        Workload::Mixed => (
            format!(
                "Catch-up: {} transactions of 1-20 inserts/updates/deletes over 3 tables",
                scale.mixed_transactions
            ),
            "rows/s",
        ),
    };
    FigureSpec::new(
        format!("catchup.{}", w.id()),
        title,
        unit,
        "pg_recvlogical",
        Better::Higher,
        Target::RatioAtLeast(0.9),
    )
}

pub fn specs(scale: &Scale) -> Vec<FigureSpec> {
    [Workload::Updates, Workload::BulkInsert, Workload::Mixed]
        .into_iter()
        .map(|w| spec(w, scale))
        .collect()
}

pub fn memory_spec(scale: &Scale) -> FigureSpec {
    FigureSpec::new(
        "memory.peak_rss",
        format!(
            "Daemon peak RSS streaming the {}-row transaction",
            scale.insert_rows
        ),
        "MB",
        "pg_recvlogical",
        Better::Lower,
        Target::Below(64.0),
    )
}

/// How the daemon is configured for a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// The defaults: large transactions streamed, applied in parts above `max_spool_bytes`.
    Default,
    /// `postgres.streaming = false`.
    StreamingOff,
    /// `apply.max_spool_bytes` above the transaction: streamed and applied in one `EXEC`.
    Atomic,
}

impl Variant {
    fn id(self) -> &'static str {
        match self {
            Variant::Default => "default",
            Variant::StreamingOff => "streaming_off",
            Variant::Atomic => "streaming_atomic",
        }
    }

    fn config(self, toml: String) -> String {
        match self {
            Variant::Default => toml,
            Variant::StreamingOff => {
                toml.replacen("[postgres]\n", "[postgres]\nstreaming = false\n", 1)
            }
            Variant::Atomic => format!("{toml}\n[apply]\nmax_spool_bytes = \"4GB\"\n"),
        }
    }
}

/// A slot's decoding statistics after a run (`pg_stat_replication_slots`).
async fn slot_stats(client: &Client, slot: &str) -> Value {
    let row = client
        .query_opt(
            "SELECT spill_txns, spill_bytes, stream_txns, stream_bytes, total_txns, total_bytes \
             FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await;
    match row {
        Ok(Some(row)) => json!({
            "spill_txns": row.get::<_, i64>(0),
            "spill_bytes": row.get::<_, i64>(1),
            "stream_txns": row.get::<_, i64>(2),
            "stream_bytes": row.get::<_, i64>(3),
            "total_txns": row.get::<_, i64>(4),
            "total_bytes": row.get::<_, i64>(5),
        }),
        Ok(None) => json!({ "error": "no statistics for the slot" }),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

/// One consumer's run over the workload's WAL.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// From the slot turning active to the end.
    pub streaming: Duration,
    /// From spawning the process to the end.
    pub wall: Duration,
    pub max_rss_kib: u64,
    /// Sessions the daemon restarted on the way (always 0 for pg_recvlogical).
    pub reconnects: usize,
    /// CPU time of the whole process, start-up included.
    pub cpu_seconds: f64,
}

/// A workload streamed by both consumers.
#[derive(Debug, Clone)]
pub struct CatchupRun {
    rows: u64,
    transactions: u64,
    write_seconds: f64,
    wal_bytes: u64,
    /// The faster of the two `pg_recvlogical` runs.
    recv: Timing,
    recv_runs: [Timing; 2],
    /// The faster of the daemon's two runs.
    pgcache: Timing,
    pgcache_runs: [Timing; 2],
    /// The bare consumer's streaming time, or why it failed.
    bare: Result<Duration, String>,
    /// Each slot's decoding statistics, by consumer.
    slot_stats: Value,
    /// The large transaction only: the daemon's other configurations.
    variants: Vec<(Variant, Result<Timing, String>)>,
}

impl CatchupRun {
    fn figure(&self, w: Workload, scale: &Scale) -> Figure {
        let count = match w {
            Workload::Updates => self.transactions,
            _ => self.rows,
        };
        let details = json!({
            "rows": self.rows,
            "transactions": self.transactions,
            "wal_bytes": self.wal_bytes,
            "workload_write_seconds": self.write_seconds,
            "pg_recvlogical": timing_json(&self.recv),
            "pg_recvlogical_before": timing_json(&self.recv_runs[0]),
            "pg_recvlogical_after": timing_json(&self.recv_runs[1]),
            "pgcache": timing_json(&self.pgcache),
            "pgcache_first": timing_json(&self.pgcache_runs[0]),
            "pgcache_second": timing_json(&self.pgcache_runs[1]),
            "ratio_from_spawn": self.recv.wall.as_secs_f64() / self.pgcache.wall.as_secs_f64(),
            "bare_consumer": match &self.bare {
                Ok(t) => json!({
                    "streaming_seconds": t.as_secs_f64(),
                    "ratio_pgcache_vs_bare": t.as_secs_f64() / self.pgcache.streaming.as_secs_f64(),
                }),
                Err(e) => json!({ "error": e }),
            },
            "slot_stats": self.slot_stats,
            "pgcache_variants": self.variants.iter().map(|(v, t)| (v.id().to_string(), match t {
                Ok(t) => timing_json(t),
                Err(e) => json!({ "error": e }),
            })).collect::<serde_json::Map<String, Value>>(),
        });
        spec(w, scale).measured(
            per_second(count, self.pgcache.streaming),
            per_second(count, self.recv.streaming),
            details,
        )
    }
}

/// The large transaction's run, kept for the memory figure.
pub type BulkRun = CatchupRun;

fn timing_json(t: &Timing) -> Value {
    json!({
        "streaming_seconds": t.streaming.as_secs_f64(),
        "seconds_from_spawn": t.wall.as_secs_f64(),
        "peak_rss_mib": t.max_rss_kib as f64 / 1024.0,
        "reconnects": t.reconnects,
        "cpu_seconds": t.cpu_seconds,
    })
}

pub fn memory_figure(scale: &Scale, run: &BulkRun) -> Figure {
    let mb = |kib: u64| kib as f64 / 1024.0;
    // The larger of the daemon's two runs: memory is not a race.
    let daemon_kib = run
        .pgcache_runs
        .iter()
        .map(|t| t.max_rss_kib)
        .max()
        .unwrap_or(0);
    memory_spec(scale).measured(
        mb(daemon_kib),
        mb(run.recv.max_rss_kib),
        json!({
            "rows": run.rows,
            "daemon_peak_rss_kib": daemon_kib,
            "pg_recvlogical_peak_rss_kib": run.recv.max_rss_kib,
            "note": "MB = MiB; peak resident set (ru_maxrss) of the whole process",
        }),
    )
}

/// Runs the three workloads; the large transaction's run is kept in `bulk` for the
/// memory figure.
///
/// # Errors
/// The tables cannot be created. A failing workload fails only its own figure.
pub async fn run(
    lab: &Lab,
    scale: &Scale,
    progress: Progress,
    bulk: &mut Option<BulkRun>,
) -> Result<Vec<Figure>, BenchError> {
    let client = lab.connect().await?;
    prepare(&client).await?;
    let mut figures = Vec::new();
    for (i, w) in [Workload::Updates, Workload::BulkInsert, Workload::Mixed]
        .into_iter()
        .enumerate()
    {
        let result = run_workload(lab, &client, w, scale, i as i64 + 1, progress).await;
        match result {
            Ok(run) => {
                progress.say(format!(
                    "catch-up {}: pg_recvlogical {:.2} s, pgcache {:.2} s",
                    w.id(),
                    run.recv.streaming.as_secs_f64(),
                    run.pgcache.streaming.as_secs_f64()
                ));
                figures.push(run.figure(w, scale));
                if w == Workload::BulkInsert {
                    *bulk = Some(run);
                }
            }
            Err(e) => {
                progress.say(format!("catch-up {} failed: {e}", w.id()));
                figures.push(spec(w, scale).failed(e.to_string()));
            }
        }
    }
    Ok(figures)
}

/// Only the large transaction, for `--only memory`.
///
/// # Errors
/// As the catch-up of that workload.
pub async fn run_bulk_alone(
    lab: &Lab,
    scale: &Scale,
    progress: Progress,
) -> Result<BulkRun, BenchError> {
    let client = lab.connect().await?;
    prepare(&client).await?;
    run_workload(lab, &client, Workload::BulkInsert, scale, 2, progress).await
}

async fn prepare(client: &Client) -> Result<(), BenchError> {
    execute(client, "creating the catch-up tables", SCHEMA).await?;
    execute(
        client,
        "seeding the catch-up tables",
        &format!(
            "INSERT INTO cu_accounts SELECT g, 0, 'owner ' || g FROM generate_series(1, {ACCOUNTS}) g
               ON CONFLICT DO NOTHING;
             INSERT INTO cu_users SELECT g, 'user ' || g, 'user' || g || '@example.com', 0
               FROM generate_series(1, {MIXED_SEED_ROWS}) g ON CONFLICT DO NOTHING;
             INSERT INTO cu_orders SELECT g, g % 1000, (g % 997) / 10.0, 'new',
               timestamptz '2026-01-01 00:00:00+00' + g * interval '1 minute'
               FROM generate_series(1, {MIXED_SEED_ROWS}) g ON CONFLICT DO NOTHING;
             INSERT INTO cu_items SELECT g, g % 5000, 'sku-' || (g % 311), 1 + g % 5
               FROM generate_series(1, {MIXED_SEED_ROWS}) g ON CONFLICT DO NOTHING;"
        ),
    )
    .await?;
    // Alone: VACUUM cannot run in the implicit transaction of a multi-statement query.
    execute(
        client,
        "vacuuming",
        "VACUUM ANALYZE cu_accounts, cu_users, cu_orders, cu_items",
    )
    .await
}

async fn run_workload(
    lab: &Lab,
    client: &Client,
    w: Workload,
    scale: &Scale,
    marker: i64,
    progress: Progress,
) -> Result<CatchupRun, BenchError> {
    lab.flush_redis().await?;
    let before_slot = format!("cu_{}_recv_before", w.id());
    let pgc_slot = format!("cu_{}_pgcache", w.id());
    let pgc_again_slot = format!("cu_{}_pgcache_again", w.id());
    let after_slot = format!("cu_{}_recv_after", w.id());
    let bare_slot = format!("cu_{}_bare", w.id());
    let off_slot = format!("cu_{}_pgcache_nostream", w.id());
    let atomic_slot = format!("cu_{}_pgcache_atomic", w.id());
    let mut slots = vec![
        before_slot.as_str(),
        pgc_slot.as_str(),
        pgc_again_slot.as_str(),
        after_slot.as_str(),
        bare_slot.as_str(),
    ];
    let variants: &[(Variant, &str)] = if w == Workload::BulkInsert {
        &[
            (Variant::StreamingOff, off_slot.as_str()),
            (Variant::Atomic, atomic_slot.as_str()),
        ]
    } else {
        &[]
    };
    slots.extend(variants.iter().map(|(_, slot)| *slot));
    lab.drop_slots(client, &slots).await;
    let start = lab.create_slots(client, &slots).await?;

    progress.say(format!("catch-up {}: writing the workload", w.id()));
    let written = Instant::now();
    let (rows, transactions) = write_workload(client, w, scale).await?;
    let write_seconds = written.elapsed().as_secs_f64();
    // The marker commits last; its key appearing in Redis means the daemon is done.
    client
        .batch_execute("SET synchronous_commit = on")
        .await
        .map_err(|e| pg_error("synchronous_commit", &e))?;
    client
        .execute(
            "INSERT INTO cu_marker VALUES ($1, 'end of the workload')",
            &[&marker],
        )
        .await
        .map_err(|e| pg_error("writing the marker", &e))?;
    let end_row = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(|e| pg_error("reading the end position", &e))?;
    client
        .batch_execute("RESET synchronous_commit")
        .await
        .map_err(|e| pg_error("synchronous_commit", &e))?;
    let end = lab::parse_lsn(end_row.get(0))?;
    lab.wait_flushed(client, end).await?;
    progress.say(format!(
        "catch-up {}: {rows} rows in {transactions} transactions, {} MiB of WAL, written in {write_seconds:.1} s",
        w.id(),
        (end.0 - start.0) >> 20
    ));

    let result = stream_both(
        lab,
        client,
        w,
        [&before_slot, &pgc_slot, &pgc_again_slot, &after_slot],
        end,
        marker,
        progress,
    )
    .await;
    let bare = match &result {
        Ok((recv_runs, _)) => {
            progress.say(format!("catch-up {}: bare pgoutput consumer", w.id()));
            let limit = (recv_runs[0].wall * 20).max(Duration::from_secs(60));
            consumer::stream_to_marker(lab, &bare_slot, "cu_marker", limit)
                .await
                .map_err(|e| e.to_string())
        }
        Err(_) => Err("not run".to_string()),
    };
    let mut variant_runs = Vec::new();
    if result.is_ok() {
        let key = format!("marker:{marker}");
        let limit = Duration::from_secs(600);
        for &(variant, slot) in variants {
            progress.say(format!("catch-up {}: pgcache, {}", w.id(), variant.id()));
            lab.flush_redis().await?;
            let timing = time_daemon(lab, client, w, slot, &key, limit, variant)
                .await
                .map_err(|e| e.to_string());
            if let Ok(t) = &timing {
                progress.say(format!(
                    "catch-up {}: pgcache, {}: {:.2} s, peak RSS {} MiB",
                    w.id(),
                    variant.id(),
                    t.streaming.as_secs_f64(),
                    t.max_rss_kib / 1024
                ));
            }
            variant_runs.push((variant, timing));
        }
    }
    let mut stats = serde_json::Map::new();
    for slot in &slots {
        stats.insert((*slot).to_string(), slot_stats(client, slot).await);
    }
    lab.drop_slots(client, &slots).await;
    let (recv_runs, pgcache_runs) = result?;
    let faster = |[a, b]: [Timing; 2]| if a.streaming <= b.streaming { a } else { b };
    Ok(CatchupRun {
        rows,
        transactions,
        write_seconds,
        wal_bytes: end.0 - start.0,
        recv: faster(recv_runs),
        recv_runs,
        pgcache: faster(pgcache_runs),
        pgcache_runs,
        bare,
        slot_stats: Value::Object(stats),
        variants: variant_runs,
    })
}

/// pg_recvlogical, the daemon, the daemon again, pg_recvlogical again, each on its own slot;
/// the daemon into an empty Redis each time.
async fn stream_both(
    lab: &Lab,
    client: &Client,
    w: Workload,
    [before_slot, pgc_slot, pgc_again_slot, after_slot]: [&str; 4],
    end: Lsn,
    marker: i64,
    progress: Progress,
) -> Result<([Timing; 2], [Timing; 2]), BenchError> {
    progress.say(format!("catch-up {}: pg_recvlogical", w.id()));
    let before = time_recvlogical(lab, client, before_slot, end).await?;
    // The daemon gets far longer than pg_recvlogical needed: a slow daemon is a result,
    // only a stuck one is an error.
    let limit = (before.wall * 50).max(Duration::from_secs(120));
    let key = format!("marker:{marker}");
    let mut pgcache = Vec::with_capacity(2);
    for (slot, which) in [(pgc_slot, "pgcache"), (pgc_again_slot, "pgcache again")] {
        progress.say(format!("catch-up {}: {which}", w.id()));
        lab.flush_redis().await?;
        pgcache.push(time_daemon(lab, client, w, slot, &key, limit, Variant::Default).await?);
    }
    progress.say(format!("catch-up {}: pg_recvlogical again", w.id()));
    let after = time_recvlogical(lab, client, after_slot, end).await?;
    Ok(([before, after], [pgcache[0], pgcache[1]]))
}

/// Writes the workload; returns (row changes, transactions).
async fn write_workload(
    client: &Client,
    w: Workload,
    scale: &Scale,
) -> Result<(u64, u64), BenchError> {
    match w {
        Workload::Updates => {
            let n = scale.update_transactions;
            // COMMIT inside DO makes each update its own transaction, at server speed.
            execute(
                client,
                "writing the update transactions",
                &format!(
                    "DO $$ BEGIN
                       FOR i IN 0..{last} LOOP
                         UPDATE cu_accounts SET balance = balance + 1 WHERE id = (i % {ACCOUNTS}) + 1;
                         COMMIT;
                       END LOOP;
                     END $$",
                    last = n - 1
                ),
            )
            .await?;
            Ok((n, n))
        }
        Workload::BulkInsert => {
            let n = scale.insert_rows;
            execute(
                client,
                "writing the large transaction",
                &format!(
                    "INSERT INTO cu_events (id, kind, amount, created, note)
                     SELECT g, 'kind-' || (g % 7), (g % 100000) / 100.0,
                            timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second',
                            md5(g::text)
                     FROM generate_series(1, {n}) g"
                ),
            )
            .await?;
            Ok((n, 1))
        }
        Workload::Mixed => {
            let n = scale.mixed_transactions;
            // The DO block goes alone: COMMIT inside it fails in a multi-statement query.
            execute(
                client,
                "preparing the mixed workload's count",
                "CREATE TEMP TABLE IF NOT EXISTS bench_mixed_count (changes bigint);
                 TRUNCATE bench_mixed_count",
            )
            .await?;
            execute(client, "writing the mixed transactions", &mixed_sql(n)).await?;
            let row = client
                .query_one("SELECT changes FROM bench_mixed_count", &[])
                .await
                .map_err(|e| pg_error("reading the mixed workload's count", &e))?;
            let changes: i64 = row.get(0);
            Ok((changes as u64, n))
        }
    }
}

/// `transactions` transactions of 1 to 20 row changes each, every change touching exactly
/// one existing (or new) row: inserts append ids, deletes take the lowest live id, updates
/// hit a random live id. The count lands in a temporary table, which is not replicated.
fn mixed_sql(transactions: u64) -> String {
    format!(
        "DO $$
         DECLARE
           lo bigint[] := ARRAY[1, 1, 1];
           hi bigint[] := ARRAY[{seed}, {seed}, {seed}]::bigint[];
           n int; t int; op double precision; k bigint; changes_made bigint := 0;
         BEGIN
           PERFORM setseed(0.25);
           FOR tx IN 1..{transactions} LOOP
             n := 1 + floor(random() * 20)::int;
             FOR r IN 1..n LOOP
               t := 1 + floor(random() * 3)::int;
               op := random();
               IF op < 0.4 OR hi[t] - lo[t] < 10 THEN
                 hi[t] := hi[t] + 1;
                 k := hi[t];
                 IF t = 1 THEN
                   INSERT INTO cu_users VALUES (k, 'user ' || k, 'user' || k || '@example.com', 0);
                 ELSIF t = 2 THEN
                   INSERT INTO cu_orders VALUES (k, k % 1000, (k % 997) / 10.0, 'new', now());
                 ELSE
                   INSERT INTO cu_items VALUES (k, k % 5000, 'sku-' || (k % 311), 1 + (k % 5)::int);
                 END IF;
               ELSIF op < 0.8 THEN
                 k := lo[t] + floor(random() * (hi[t] - lo[t] + 1))::bigint;
                 IF t = 1 THEN
                   UPDATE cu_users SET score = score + 1 WHERE id = k;
                 ELSIF t = 2 THEN
                   UPDATE cu_orders SET status = 'paid', total = total + 1 WHERE id = k;
                 ELSE
                   UPDATE cu_items SET qty = qty + 1 WHERE id = k;
                 END IF;
               ELSE
                 k := lo[t];
                 lo[t] := lo[t] + 1;
                 IF t = 1 THEN
                   DELETE FROM cu_users WHERE id = k;
                 ELSIF t = 2 THEN
                   DELETE FROM cu_orders WHERE id = k;
                 ELSE
                   DELETE FROM cu_items WHERE id = k;
                 END IF;
               END IF;
               changes_made := changes_made + 1;
             END LOOP;
             COMMIT;
           END LOOP;
           INSERT INTO bench_mixed_count VALUES (changes_made);
         END $$",
        seed = MIXED_SEED_ROWS,
    )
}

/// Waits for a walsender to take `slot`, or for `done` to report the end first.
pub(super) async fn wait_active(
    lab: &Lab,
    client: &Client,
    slot: &str,
    process: &mut Process,
) -> Result<Option<Instant>, BenchError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if lab.slot_active(client, slot).await? {
            return Ok(Some(Instant::now()));
        }
        if process.try_exit().is_some() {
            return Ok(None);
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "nothing took slot {slot} within 60 s\n--- log ---\n{}",
                process.log_tail()
            )));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn time_recvlogical(
    lab: &Lab,
    client: &Client,
    slot: &str,
    end: Lsn,
) -> Result<Timing, BenchError> {
    let cmd = child::recvlogical_command(lab.pg_port(), DB, slot, PUBLICATION, end)?;
    let spawned = Instant::now();
    let mut process = Process::spawn(cmd, "pg_recvlogical", &lab.path(&format!("{slot}.log")))?;
    let active = wait_active(lab, client, slot, &mut process).await?;
    let exit: Exit = process.wait(Duration::from_secs(1800)).await?;
    let finished = Instant::now();
    if !exit.success() {
        return Err(BenchError::Child(format!(
            "pg_recvlogical failed ({})\n{}\n--- postgres log ---\n{}",
            exit.describe(),
            process.log_tail(),
            lab.pg_log()
        )));
    }
    Ok(Timing {
        streaming: finished - active.unwrap_or(spawned),
        wall: finished - spawned,
        max_rss_kib: exit.max_rss_kib,
        reconnects: 0,
        cpu_seconds: exit.cpu_seconds,
    })
}

async fn time_daemon(
    lab: &Lab,
    client: &Client,
    w: Workload,
    slot: &str,
    marker_key: &str,
    limit: Duration,
    variant: Variant,
) -> Result<Timing, BenchError> {
    let mut redis = lab.redis().await?;
    let config = variant.config(lab.daemon_config(slot, w.tables(), false, None));
    let spawned = Instant::now();
    let mut daemon = lab.spawn_daemon(&format!("catchup-{}-{}", w.id(), variant.id()), &config)?;
    let active = wait_active(lab, client, slot, &mut daemon).await?;
    daemon.check_running()?;
    let active = active.unwrap_or(spawned);
    loop {
        let present: bool = redis::cmd("EXISTS")
            .arg(marker_key)
            .query_async(&mut redis)
            .await
            .map_err(|e| redis_error("polling for the marker", e))?;
        if present {
            break;
        }
        daemon.check_running()?;
        if spawned.elapsed() > limit {
            let tail = daemon.log_tail();
            daemon.stop().await;
            return Err(BenchError::Timeout(format!(
                "the daemon did not apply the workload within {limit:?}\n--- its log ---\n{tail}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let finished = Instant::now();
    let checkpoint_key = checkpoint::checkpoint_key("", slot);
    let applied = checkpoint::read(&mut redis, &checkpoint_key)
        .await
        .map_err(|e| BenchError::Check(e.to_string()))?;
    let exit = daemon.stop().await;
    if applied.is_none() {
        return Err(BenchError::Check(format!(
            "the marker is in Redis but the checkpoint {checkpoint_key} is not"
        )));
    }
    Ok(Timing {
        streaming: finished - active,
        wall: finished - spawned,
        max_rss_kib: exit.max_rss_kib,
        reconnects: lab::reconnects_in(&daemon.log()),
        cpu_seconds: exit.cpu_seconds,
    })
}
