//! The daemon on a Redis Cluster against the daemon on one Redis, on the same workload in
//! the same run (`--only cluster`).
//!
//! A local cluster of three masters (no replicas) is started beside the lab's single Redis.
//! Each figure's floor is the single-node daemon, so the ratio says what splitting a batch
//! by hash slot costs: one guarded `MULTI … EXEC` with its slot's checkpoint per slot a
//! batch touches (docs/cluster.md), where one server takes the whole batch in one.
//!
//! - `cluster.catchup_spread`: catch-up of single-row update transactions on a table
//!   keyed `acct:{id}`, so the keys hash over all 16384 slots. Four slots are created at
//!   the same position before the workload; then, in the order single, cluster, cluster,
//!   single, a daemon streams one of them into an empty Redis (or an empty cluster), timed
//!   from its walsender taking the slot until the marker row's key (committed last) is
//!   visible and the root checkpoint covers the marker's commit. On the cluster the marker
//!   and the root checkpoint are read from the masters of their slots: the marker's slot is
//!   written at the same time as the batch's other slots, and only the root checkpoint,
//!   written once every slot acknowledged, says the batch is done.
//! - `cluster.catchup_tagged`: the same WAL (four more slots created at the same
//!   position), the key template `acct:{{{tenant}}}:{id}` putting 64 tenants in hash tags,
//!   so a batch touches at most 64 slots.
//! - `cluster.backfill`: the daemon's automatic backfill of a table (keys spread), from
//!   spawning the daemon until the root checkpoint says the table is done.
//!
//! Each side counts its faster run. After every run the table's keys are counted on every
//! master (`SCAN MATCH <prefix>*`: the slot checkpoints and the root checkpoint live there
//! too) and must equal the rows written. The details give every run's seconds, the
//! masters, the daemon's batches and operations per batch (its `/metrics`), the slots an
//! average batch touches (the workload's keys replayed in batches of that size: an
//! estimate, exact only when batches are equal), and the reconnects in its log.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use tokio_postgres::Client;

use super::catchup::wait_active;
use super::child::{self, Process};
use super::lab::{self, execute, pg_error, redis_error, Lab, TableSpec};
use super::report::{Better, Figure, FigureSpec, Target};
use super::{per_second, BenchError, Progress, Scale};
use crate::checkpoint::{self, BackfillProgress, FIELD_BACKFILL_PREFIX};
use crate::cluster::key_slot;
use crate::config::{DEFAULT_BACKFILL_CHUNK_ROWS, DEFAULT_CLUSTER_BACKFILL_CHUNK_ROWS};
use crate::daemon::slot_router::SlotRouter;
use crate::testkit::{self, RedisOptions, TestRedisCluster};
use crate::Lsn;

/// Masters of the test cluster, all on this machine.
const MASTERS: usize = 3;
/// Rows of the accounts table; the updates go round them. The tagged key names `tenant`,
/// so the replica identity is a unique index on `(id, tenant)`: a key column must be in it,
/// and updates (which change neither) log no more WAL than with the primary key.
const ACCOUNTS: u64 = 10_000;
const TENANTS: u64 = 64;
const SPREAD: TableSpec = ("public.cl_accounts", "acct:{id}");
const TAGGED: TableSpec = ("public.cl_accounts", "acct:{{{tenant}}}:{id}");
const ACCOUNT_KEYS: &str = "acct:*";
const MARKER: TableSpec = ("public.cl_marker", "clmarker:{id}");

/// A marker row committed after a workload: done once its key is visible and the root
/// checkpoint is past `after` (the WAL position before the marker's commit).
#[derive(Debug, Clone, Copy)]
struct Marker {
    id: i64,
    after: Lsn,
}

impl Marker {
    fn key(self) -> String {
        format!("clmarker:{}", self.id)
    }

    /// Commits marker `id` (synchronously, flushed) and returns it.
    async fn commit(lab: &Lab, client: &Client, id: i64) -> Result<Marker, BenchError> {
        let after = current_lsn(client).await?;
        execute(
            client,
            "writing the marker",
            &format!(
                "SET synchronous_commit = on;
                 INSERT INTO cl_marker VALUES ({id}, 'end of the workload');
                 RESET synchronous_commit"
            ),
        )
        .await?;
        lab.wait_flushed(client, current_lsn(client).await?).await?;
        Ok(Marker { id, after })
    }
}
const BACKFILL: TableSpec = ("public.cl_backfill", "clbf:{id}");
const BACKFILL_KEYS: &str = "clbf:*";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cl_marker (id bigint PRIMARY KEY, note text NOT NULL);
CREATE TABLE IF NOT EXISTS cl_accounts (
    id bigint PRIMARY KEY, tenant int NOT NULL, balance bigint NOT NULL, owner text NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS cl_accounts_identity ON cl_accounts (id, tenant);
ALTER TABLE cl_accounts REPLICA IDENTITY USING INDEX cl_accounts_identity;
";

/// The catch-up workload's size: a quarter of the catch-up part's updates.
fn catchup_transactions(scale: &Scale) -> u64 {
    (scale.update_transactions / 4).max(1)
}

/// The backfill's size: a quarter of the backfill part's rows.
fn backfill_rows(scale: &Scale) -> u64 {
    (scale.backfill_rows / 4).max(1)
}

/// How the accounts' keys fall into hash slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `acct:{id}`: over all 16384 slots.
    Spread,
    /// `acct:{<tenant>}:{id}`: one slot per tenant.
    Tagged,
}

impl Layout {
    fn id(self) -> &'static str {
        match self {
            Layout::Spread => "spread",
            Layout::Tagged => "tagged",
        }
    }

    fn table(self) -> TableSpec {
        match self {
            Layout::Spread => SPREAD,
            Layout::Tagged => TAGGED,
        }
    }

    /// The hash slot of account `id`'s key.
    fn slot_of(self, id: u64) -> u16 {
        match self {
            Layout::Spread => key_slot(format!("acct:{id}").as_bytes()),
            Layout::Tagged => key_slot(format!("acct:{{{}}}:{id}", id % TENANTS).as_bytes()),
        }
    }
}

fn catchup_spec(layout: Layout, scale: &Scale) -> FigureSpec {
    let keys = match layout {
        Layout::Spread => "keys spread over all slots".to_string(),
        Layout::Tagged => format!("keys tagged by {TENANTS} tenants"),
    };
    FigureSpec::new(
        format!("cluster.catchup_{}", layout.id()),
        format!(
            "Cluster ({MASTERS} masters) catch-up: {} single-row update transactions, {keys}",
            catchup_transactions(scale)
        ),
        "tx/s",
        "one Redis",
        Better::Higher,
        Target::RatioAtLeast(0.8),
    )
}

fn backfill_spec(scale: &Scale) -> FigureSpec {
    FigureSpec::new(
        "cluster.backfill",
        format!(
            "Cluster ({MASTERS} masters) backfill of {} rows, keys spread over all slots",
            backfill_rows(scale)
        ),
        "rows/s",
        "one Redis",
        Better::Higher,
        Target::RatioAtLeast(0.8),
    )
}

pub fn specs(scale: &Scale) -> Vec<FigureSpec> {
    vec![
        catchup_spec(Layout::Spread, scale),
        catchup_spec(Layout::Tagged, scale),
        backfill_spec(scale),
    ]
}

/// Where a daemon writes: the lab's one Redis, or the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Single,
    Cluster,
}

impl Side {
    fn id(self) -> &'static str {
        match self {
            Side::Single => "single",
            Side::Cluster => "cluster",
        }
    }
}

/// Reads and counts keys where a side's daemon writes.
enum Store {
    Single(MultiplexedConnection),
    Cluster {
        router: SlotRouter,
        /// One connection per master, without a response timeout (FLUSHALL, SCAN).
        masters: Vec<MultiplexedConnection>,
    },
}

impl Store {
    async fn open(lab: &Lab, side: Side, seeds: &[String]) -> Result<Store, BenchError> {
        match side {
            Side::Single => Ok(Store::Single(lab.redis().await?)),
            Side::Cluster => {
                let router = SlotRouter::connect(seeds, None)
                    .await
                    .map_err(|e| BenchError::Setup(format!("reaching the cluster: {e}")))?;
                let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
                let mut masters = Vec::new();
                for addr in router.masters() {
                    let conn = redis::Client::open(router.url_for(&addr))
                        .map_err(|e| redis_error("opening a cluster master", e))?
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                        .map_err(|e| redis_error("connecting to a cluster master", e))?;
                    masters.push(conn);
                }
                Ok(Store::Cluster { router, masters })
            }
        }
    }

    fn masters(&self) -> usize {
        match self {
            Store::Single(_) => 1,
            Store::Cluster { masters, .. } => masters.len(),
        }
    }

    /// One command on one key, on the master of its slot.
    async fn query<T: redis::FromRedisValue>(
        &mut self,
        what: &str,
        key: &str,
        cmd: redis::Cmd,
    ) -> Result<T, BenchError> {
        match self {
            Store::Single(conn) => cmd
                .query_async(conn)
                .await
                .map_err(|e| redis_error(what, e)),
            Store::Cluster { router, .. } => {
                let mut replies = router
                    .send_each(&[(key_slot(key.as_bytes()), cmd)])
                    .await
                    .map_err(|e| BenchError::Check(format!("{what}: {e}")))?;
                let reply = replies.pop().unwrap_or(redis::Value::Nil);
                if let redis::Value::ServerError(e) = &reply {
                    return Err(BenchError::Check(format!("{what}: {e:?}")));
                }
                redis::from_redis_value(reply)
                    .map_err(|e| BenchError::Check(format!("{what}: {e}")))
            }
        }
    }

    async fn exists(&mut self, key: &str) -> Result<bool, BenchError> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(key);
        self.query("polling for the marker", key, cmd).await
    }

    async fn hget(&mut self, key: &str, field: &str) -> Result<Option<String>, BenchError> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(key).arg(field);
        self.query("reading the root checkpoint", key, cmd).await
    }

    fn connections(&self) -> Vec<MultiplexedConnection> {
        match self {
            Store::Single(conn) => vec![conn.clone()],
            Store::Cluster { masters, .. } => masters.clone(),
        }
    }

    /// Empties every master.
    async fn flush(&self) -> Result<(), BenchError> {
        for mut conn in self.connections() {
            redis::cmd("FLUSHALL")
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| redis_error("FLUSHALL", e))?;
        }
        Ok(())
    }

    /// Main-thread CPU seconds (user + system) of every master so far, summed (`INFO cpu`):
    /// taken before and after a run, how busy the servers were, all of them together.
    async fn redis_cpu_seconds(&self) -> Result<f64, BenchError> {
        let mut total = 0.0;
        for mut conn in self.connections() {
            let info: String = redis::cmd("INFO")
                .arg("cpu")
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error("INFO cpu", e))?;
            for name in ["used_cpu_user_main_thread", "used_cpu_sys_main_thread"] {
                total += info
                    .lines()
                    .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .ok_or_else(|| BenchError::Check(format!("Redis INFO cpu has no {name}")))?;
            }
        }
        Ok(total)
    }

    /// Keys matching `pattern`, over every master.
    async fn count(&self, pattern: &str) -> Result<u64, BenchError> {
        let mut total = 0u64;
        for mut conn in self.connections() {
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(10_000)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| redis_error("SCAN", e))?;
                total += keys.len() as u64;
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(total)
    }
}

/// One daemon run.
#[derive(Debug, Clone)]
struct Run {
    side: Side,
    /// Catch-up: from the walsender taking the slot to the end; backfill: from spawn.
    seconds: f64,
    seconds_from_spawn: f64,
    reconnects: usize,
    cpu_seconds: f64,
    /// Main-thread CPU seconds of Redis (every master, summed) during the run.
    redis_cpu_seconds: f64,
    /// From the daemon's `/metrics`: batches written, and row operations per batch.
    batches: Option<u64>,
    ops_per_batch: Option<f64>,
    /// What the daemon's `/metrics` could not say, if anything.
    metrics_error: Option<String>,
}

impl Run {
    fn json(&self, slots_per_batch: Option<f64>) -> Value {
        json!({
            "side": self.side.id(),
            "seconds": self.seconds,
            "seconds_from_spawn": self.seconds_from_spawn,
            "daemon_reconnects": self.reconnects,
            "daemon_cpu_seconds": self.cpu_seconds,
            "redis_cpu_seconds": self.redis_cpu_seconds,
            "batches": self.batches,
            "ops_per_batch": self.ops_per_batch,
            "slots_per_batch_estimated": slots_per_batch,
            "metrics_error": self.metrics_error,
        })
    }
}

/// The faster run of each side, in the order they ran.
fn best(runs: &[Run], side: Side) -> Result<&Run, BenchError> {
    runs.iter()
        .filter(|r| r.side == side)
        .min_by(|a, b| a.seconds.total_cmp(&b.seconds))
        .ok_or_else(|| BenchError::Check(format!("no {} run", side.id())))
}

/// The order of the runs: each side once before and once after the other's two.
const ORDER: [Side; 4] = [Side::Single, Side::Cluster, Side::Cluster, Side::Single];

/// # Errors
/// The cluster does not start or the tables cannot be created; a failing figure fails only
/// itself.
pub async fn run(lab: &Lab, scale: &Scale, progress: Progress) -> Result<Vec<Figure>, BenchError> {
    progress.say(format!("cluster: starting {MASTERS} masters"));
    let cluster = tokio::task::spawn_blocking(|| {
        TestRedisCluster::start_with(MASTERS, 0, RedisOptions::default())
    })
    .await
    .map_err(|e| BenchError::Setup(format!("starting the cluster: {e}")))?
    .map_err(|e| BenchError::Setup(format!("starting the cluster: {e:#}")))?;
    let seeds = cluster.urls();
    let figures = run_on(lab, &seeds, scale, progress).await;
    let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
    figures
}

async fn run_on(
    lab: &Lab,
    seeds: &[String],
    scale: &Scale,
    progress: Progress,
) -> Result<Vec<Figure>, BenchError> {
    let client = lab.connect().await?;
    let mut figures = Vec::new();
    match catchup(lab, &client, seeds, scale, progress).await {
        Ok(mut both) => figures.append(&mut both),
        Err(e) => {
            progress.say(format!("cluster catch-up failed: {e}"));
            for layout in [Layout::Spread, Layout::Tagged] {
                figures.push(catchup_spec(layout, scale).failed(e.to_string()));
            }
        }
    }
    figures.push(match backfill(lab, &client, seeds, scale, progress).await {
        Ok(figure) => figure,
        Err(e) => {
            progress.say(format!("cluster backfill failed: {e}"));
            backfill_spec(scale).failed(e.to_string())
        }
    });
    Ok(figures)
}

/// The daemon's config for `side`: the lab's, with the cluster's seeds in place of the one
/// Redis.
fn config_for(
    lab: &Lab,
    side: Side,
    seeds: &[String],
    slot: &str,
    tables: &[TableSpec],
    auto_backfill: bool,
    metrics_port: u16,
) -> Result<String, BenchError> {
    let toml = lab.daemon_config(slot, tables, auto_backfill, Some(metrics_port));
    match side {
        Side::Single => Ok(toml),
        Side::Cluster => {
            let single = format!("[redis]\nurl = \"{}\"\n", lab.redis_url());
            if !toml.contains(&single) {
                return Err(BenchError::Setup(
                    "the lab's daemon config has no [redis] url to replace".into(),
                ));
            }
            let urls: Vec<String> = seeds.iter().map(|u| format!("{u:?}")).collect();
            Ok(toml.replacen(
                &single,
                &format!("[redis]\ncluster = true\nurls = [{}]\n", urls.join(", ")),
                1,
            ))
        }
    }
}

/// Batches and operations per batch, from the daemon's `/metrics`.
async fn batch_metrics(port: u16) -> Result<(u64, f64), String> {
    let text = child::scrape(port).await.map_err(|e| e.to_string())?;
    let value = |name: &str| {
        text.lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next() == Some(name)).then(|| fields.next()?.parse::<f64>().ok())?
            })
            .ok_or_else(|| format!("{name} is not in the daemon's /metrics"))
    };
    let batches = value("pgcache_batches_total")?;
    let ops = value("pgcache_batch_operations_sum")?;
    let counted = value("pgcache_batch_operations_count")?;
    Ok((batches as u64, ops / counted.max(1.0)))
}

/// Slots an average batch touches when the keys come in `keys` order in batches of
/// `batch` (the last one may be short).
fn slots_per_batch(slots: impl Iterator<Item = u16>, batch: f64) -> Option<f64> {
    let batch = batch.round() as usize;
    if batch == 0 {
        return None;
    }
    let mut touched = Vec::new();
    let mut current = HashSet::new();
    let mut in_batch = 0;
    for slot in slots {
        current.insert(slot);
        in_batch += 1;
        if in_batch == batch {
            touched.push(current.len());
            current.clear();
            in_batch = 0;
        }
    }
    if in_batch > 0 {
        touched.push(current.len());
    }
    (!touched.is_empty()).then(|| touched.iter().sum::<usize>() as f64 / touched.len() as f64)
}

// ---- catch-up ----

async fn catchup(
    lab: &Lab,
    client: &Client,
    seeds: &[String],
    scale: &Scale,
    progress: Progress,
) -> Result<Vec<Figure>, BenchError> {
    let n = catchup_transactions(scale);
    execute(client, "creating the cluster catch-up tables", SCHEMA).await?;
    execute(
        client,
        "seeding the accounts",
        &format!(
            "TRUNCATE cl_marker, cl_accounts;
             INSERT INTO cl_accounts
             SELECT g, g % {TENANTS}, 0, 'owner ' || g FROM generate_series(1, {ACCOUNTS}) g"
        ),
    )
    .await?;
    execute(client, "vacuuming", "VACUUM ANALYZE cl_accounts").await?;

    let names: Vec<String> = [Layout::Spread, Layout::Tagged]
        .iter()
        .flat_map(|layout| {
            ORDER
                .iter()
                .enumerate()
                .map(move |(i, side)| format!("cl_{}_{}_{i}", layout.id(), side.id()))
        })
        .collect();
    let slots: Vec<&str> = names.iter().map(String::as_str).collect();
    lab.drop_slots(client, &slots).await;
    let start = lab.create_slots(client, &slots).await?;

    progress.say(format!("cluster catch-up: writing {n} update transactions"));
    let written = Instant::now();
    execute(
        client,
        "writing the update transactions",
        &format!(
            "DO $$ BEGIN
               FOR i IN 0..{last} LOOP
                 UPDATE cl_accounts SET balance = balance + 1 WHERE id = (i % {ACCOUNTS}) + 1;
                 COMMIT;
               END LOOP;
             END $$",
            last = n - 1
        ),
    )
    .await?;
    let write_seconds = written.elapsed().as_secs_f64();
    // The marker commits last; the root checkpoint past its position covers it.
    let marker = Marker::commit(lab, client, 1).await?;
    let end = current_lsn(client).await?;
    let empty_runs = empty_stream(lab, client, seeds, progress).await;
    let empty = match &empty_runs {
        Ok(runs) => json!({
            "what": "a daemon on a slot with only a marker to stream: its start-up (on the \
                     cluster, the takeover of every slot checkpoint) and one small batch, \
                     timed as the runs; included in each run's seconds",
            "single_seconds": runs[0].seconds,
            "cluster_seconds": runs[1].seconds,
        }),
        Err(e) => json!({ "error": e.to_string() }),
    };

    let mut figures = Vec::new();
    for (layout, slots) in [(Layout::Spread, &names[..4]), (Layout::Tagged, &names[4..])] {
        let result =
            catchup_layout(lab, client, seeds, scale, layout, slots, marker, progress).await;
        figures.push(match result {
            Ok((runs, masters)) => {
                let single = best(&runs, Side::Single)?.clone();
                let cluster = best(&runs, Side::Cluster)?.clone();
                progress.say(format!(
                    "cluster catch-up {}: one Redis {:.2} s, cluster {:.2} s",
                    layout.id(),
                    single.seconds,
                    cluster.seconds
                ));
                let keys = || (0..n).map(|i| layout.slot_of(i % ACCOUNTS + 1));
                let estimate = |r: &Run| r.ops_per_batch.and_then(|b| slots_per_batch(keys(), b));
                catchup_spec(layout, scale).measured(
                    per_second(n, Duration::from_secs_f64(cluster.seconds)),
                    per_second(n, Duration::from_secs_f64(single.seconds)),
                    json!({
                        "transactions": n,
                        "accounts": ACCOUNTS,
                        "tenants": (layout == Layout::Tagged).then_some(TENANTS),
                        "key_template": layout.table().1,
                        "masters": masters,
                        "wal_bytes": end.0 - start.0,
                        "workload_write_seconds": write_seconds,
                        "single_seconds": single.seconds,
                        "cluster_seconds": cluster.seconds,
                        "runs": runs.iter().map(|r| r.json(estimate(r))).collect::<Vec<_>>(),
                        "timed": "from the walsender taking the slot until the marker is visible \
                                  and the root checkpoint covers it",
                        "empty_stream": empty,
                        // The ratio with each side's start-up (its empty stream) taken off:
                        // what a longer backlog tends to.
                        "ratio_without_startup": empty_runs.as_ref().ok().map(|e| {
                            (single.seconds - e[0].seconds) / (cluster.seconds - e[1].seconds)
                        }),
                        "slots_per_batch_note": "the workload's keys cut into batches of the \
                                                 daemon's mean size: an estimate",
                    }),
                )
            }
            Err(e) => {
                progress.say(format!("cluster catch-up {} failed: {e}", layout.id()));
                catchup_spec(layout, scale).failed(e.to_string())
            }
        });
    }
    lab.drop_slots(client, &slots).await;
    Ok(figures)
}

/// One daemon per side on a slot created after the workload, with only a marker to stream.
async fn empty_stream(
    lab: &Lab,
    client: &Client,
    seeds: &[String],
    progress: Progress,
) -> Result<Vec<Run>, BenchError> {
    progress.say("cluster catch-up: start-up alone (a marker to stream, nothing else)");
    let names = ["cl_empty_single", "cl_empty_cluster"];
    lab.drop_slots(client, &names).await;
    lab.create_slots(client, &names).await?;
    let result = async {
        let marker = Marker::commit(lab, client, 2).await?;
        let mut runs = Vec::new();
        for (side, slot) in [Side::Single, Side::Cluster].into_iter().zip(names) {
            let mut store = Store::open(lab, side, seeds).await?;
            store.flush().await?;
            runs.push(
                time_catchup(
                    lab,
                    client,
                    seeds,
                    &mut store,
                    side,
                    Layout::Spread,
                    slot,
                    marker,
                )
                .await?,
            );
        }
        Ok(runs)
    }
    .await;
    lab.drop_slots(client, &names).await;
    result
}

async fn current_lsn(client: &Client) -> Result<Lsn, BenchError> {
    let row = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(|e| pg_error("reading the WAL position", &e))?;
    lab::parse_lsn(row.get(0))
}

#[allow(clippy::too_many_arguments)]
async fn catchup_layout(
    lab: &Lab,
    client: &Client,
    seeds: &[String],
    scale: &Scale,
    layout: Layout,
    slots: &[String],
    marker: Marker,
    progress: Progress,
) -> Result<(Vec<Run>, usize), BenchError> {
    let expected = catchup_transactions(scale).min(ACCOUNTS);
    let mut runs = Vec::with_capacity(ORDER.len());
    let mut masters = 0;
    for (side, slot) in ORDER.into_iter().zip(slots) {
        progress.say(format!("cluster catch-up {}: {}", layout.id(), side.id()));
        let mut store = Store::open(lab, side, seeds).await?;
        if side == Side::Cluster {
            masters = store.masters();
        }
        store.flush().await?;
        let run = time_catchup(lab, client, seeds, &mut store, side, layout, slot, marker).await?;
        let keys = store.count(ACCOUNT_KEYS).await?;
        if keys != expected {
            return Err(BenchError::Check(format!(
                "after the {} run {} holds {keys} account keys, not {expected}",
                side.id(),
                if side == Side::Cluster {
                    "the cluster"
                } else {
                    "Redis"
                }
            )));
        }
        progress.say(format!(
            "cluster catch-up {}: {} {:.2} s",
            layout.id(),
            side.id(),
            run.seconds
        ));
        runs.push(run);
    }
    Ok((runs, masters))
}

#[allow(clippy::too_many_arguments)]
async fn time_catchup(
    lab: &Lab,
    client: &Client,
    seeds: &[String],
    store: &mut Store,
    side: Side,
    layout: Layout,
    slot: &str,
    marker: Marker,
) -> Result<Run, BenchError> {
    let port = testkit::free_port().map_err(|e| BenchError::Setup(format!("{e:#}")))?;
    let config = config_for(
        lab,
        side,
        seeds,
        slot,
        &[layout.table(), MARKER],
        false,
        port,
    )?;
    let root = checkpoint::checkpoint_key("", slot);
    let limit = Duration::from_secs(900);
    let redis_before = store.redis_cpu_seconds().await?;
    let spawned = Instant::now();
    let mut daemon = lab.spawn_daemon(&format!("cluster-catchup-{slot}"), &config)?;
    let result = async {
        let active = wait_active(lab, client, slot, &mut daemon)
            .await?
            .unwrap_or(spawned);
        let mut marker_seen = false;
        loop {
            if !marker_seen {
                marker_seen = store.exists(&marker.key()).await?;
            }
            if marker_seen {
                let position = store.hget(&root, checkpoint::FIELD_LSN).await?;
                let position = position.map(|text| lab::parse_lsn(&text)).transpose()?;
                if position.is_some_and(|p| p > marker.after) {
                    return Ok(active);
                }
            }
            daemon.check_running()?;
            if spawned.elapsed() > limit {
                return Err(BenchError::Timeout(format!(
                    "the daemon did not apply the workload within {limit:?}\n--- its log ---\n{}",
                    daemon.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    .await;
    let finished = Instant::now();
    let redis_after = store.redis_cpu_seconds().await;
    let metrics = batch_metrics(port).await;
    let exit = daemon.stop().await;
    let active = result?;
    Ok(run_of(
        side,
        finished - active,
        finished - spawned,
        &daemon,
        (exit.cpu_seconds, redis_after? - redis_before),
        metrics,
    ))
}

fn run_of(
    side: Side,
    timed: Duration,
    wall: Duration,
    daemon: &Process,
    (cpu_seconds, redis_cpu_seconds): (f64, f64),
    metrics: Result<(u64, f64), String>,
) -> Run {
    let (batches, ops_per_batch, metrics_error) = match metrics {
        Ok((b, o)) => (Some(b), Some(o), None),
        Err(e) => (None, None, Some(e)),
    };
    Run {
        side,
        seconds: timed.as_secs_f64(),
        seconds_from_spawn: wall.as_secs_f64(),
        reconnects: lab::reconnects_in(&daemon.log()),
        cpu_seconds,
        redis_cpu_seconds,
        batches,
        ops_per_batch,
        metrics_error,
    }
}

// ---- backfill ----

async fn backfill(
    lab: &Lab,
    client: &Client,
    seeds: &[String],
    scale: &Scale,
    progress: Progress,
) -> Result<Figure, BenchError> {
    let n = backfill_rows(scale);
    progress.say(format!("cluster backfill: writing {n} rows"));
    execute(
        client,
        "creating the cluster backfill table",
        &format!(
            "DROP TABLE IF EXISTS cl_backfill;
             CREATE TABLE cl_backfill (
                 id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL,
                 score double precision NOT NULL, balance numeric(12,2) NOT NULL,
                 active boolean NOT NULL, created timestamptz NOT NULL);
             INSERT INTO cl_backfill
             SELECT g, 'customer ' || g, 'customer' || g || '@example.com', g * 0.37,
                    (g % 100000) / 100.0, g % 3 = 0,
                    timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second'
             FROM generate_series(1, {n}) g;"
        ),
    )
    .await?;
    execute(client, "vacuuming", "VACUUM ANALYZE cl_backfill").await?;

    let mut runs = Vec::with_capacity(ORDER.len());
    let mut masters = 0;
    for (i, side) in ORDER.into_iter().enumerate() {
        progress.say(format!("cluster backfill: {}", side.id()));
        let mut store = Store::open(lab, side, seeds).await?;
        if side == Side::Cluster {
            masters = store.masters();
        }
        store.flush().await?;
        let slot = format!("cl_bf_{}_{i}", side.id());
        let run = time_backfill(lab, client, seeds, &mut store, side, &slot, n).await?;
        let keys = store.count(BACKFILL_KEYS).await?;
        if keys != n {
            return Err(BenchError::Check(format!(
                "after the {} backfill there are {keys} keys of the table, not {n}",
                side.id()
            )));
        }
        progress.say(format!(
            "cluster backfill: {} {:.2} s",
            side.id(),
            run.seconds
        ));
        runs.push(run);
    }
    let single = best(&runs, Side::Single)?.clone();
    let cluster = best(&runs, Side::Cluster)?.clone();
    progress.say(format!(
        "cluster backfill: one Redis {:.2} s, cluster {:.2} s",
        single.seconds, cluster.seconds
    ));
    // A chunk is the next rows by primary key.
    let chunk_slots = slots_per_batch(
        (1..=n).map(|id| key_slot(format!("clbf:{id}").as_bytes())),
        DEFAULT_CLUSTER_BACKFILL_CHUNK_ROWS as f64,
    );
    Ok(backfill_spec(scale).measured(
        per_second(n, Duration::from_secs_f64(cluster.seconds)),
        per_second(n, Duration::from_secs_f64(single.seconds)),
        json!({
            "rows": n,
            "masters": masters,
            "chunk_rows": DEFAULT_CLUSTER_BACKFILL_CHUNK_ROWS,
            "single_chunk_rows": DEFAULT_BACKFILL_CHUNK_ROWS,
            "slots_per_chunk": chunk_slots,
            "single_seconds": single.seconds,
            "cluster_seconds": cluster.seconds,
            "runs": runs.iter().map(|r| r.json(None)).collect::<Vec<_>>(),
            "timed": "from spawning the daemon until the root checkpoint says the table is done",
        }),
    ))
}

async fn time_backfill(
    lab: &Lab,
    client: &Client,
    seeds: &[String],
    store: &mut Store,
    side: Side,
    slot: &str,
    rows: u64,
) -> Result<Run, BenchError> {
    lab.drop_slots(client, &[slot]).await;
    lab.create_slots(client, &[slot]).await?;
    let port = testkit::free_port().map_err(|e| BenchError::Setup(format!("{e:#}")))?;
    let config = config_for(lab, side, seeds, slot, &[BACKFILL], true, port)?;
    let root = checkpoint::checkpoint_key("", slot);
    let field = format!("{FIELD_BACKFILL_PREFIX}{}", BACKFILL.0);
    let limit = Duration::from_secs(900);
    let redis_before = store.redis_cpu_seconds().await?;
    let spawned = Instant::now();
    let mut daemon = lab.spawn_daemon(&format!("cluster-backfill-{slot}"), &config)?;
    let result = async {
        loop {
            if let Some(value) = store.hget(&root, &field).await? {
                let progress = serde_json::from_str::<BackfillProgress>(&value).map_err(|e| {
                    BenchError::Check(format!(
                        "backfill progress {value:?} is not what the daemon writes: {e}"
                    ))
                })?;
                if progress.is_done() {
                    return Ok(progress);
                }
            }
            daemon.check_running()?;
            if spawned.elapsed() > limit {
                return Err(BenchError::Timeout(format!(
                    "the daemon's backfill of {rows} rows did not finish within {limit:?}\n--- its log ---\n{}",
                    daemon.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    .await;
    let elapsed = spawned.elapsed();
    let redis_after = store.redis_cpu_seconds().await;
    let metrics = batch_metrics(port).await;
    let exit = daemon.stop().await;
    lab.drop_slots(client, &[slot]).await;
    let done = result?;
    if done.rows != rows {
        return Err(BenchError::Check(format!(
            "the daemon says it backfilled {} rows, not {rows}",
            done.rows
        )));
    }
    Ok(run_of(
        side,
        elapsed,
        elapsed,
        &daemon,
        (exit.cpu_seconds, redis_after? - redis_before),
        metrics,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_keys_fall_into_at_most_one_slot_per_tenant() {
        let slots: HashSet<u16> = (1..=ACCOUNTS)
            .map(|id| Layout::Tagged.slot_of(id))
            .collect();
        assert!(slots.len() as u64 <= TENANTS, "{}", slots.len());
        let spread: HashSet<u16> = (1..=ACCOUNTS)
            .map(|id| Layout::Spread.slot_of(id))
            .collect();
        assert!(spread.len() > 4_000, "{}", spread.len());
    }

    #[test]
    fn slots_per_batch_averages_the_batches() {
        let slots = [1u16, 1, 2, 3, 3, 3, 4];
        // [1 1 2] [3 3 3] [4]: 2, 1, 1.
        let mean = slots_per_batch(slots.into_iter(), 3.0).unwrap();
        assert!((mean - 4.0 / 3.0).abs() < 1e-9, "{mean}");
        assert_eq!(slots_per_batch(slots.into_iter(), 0.2), None);
    }
}
