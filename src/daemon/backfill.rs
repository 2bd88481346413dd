//! Backfill: loading rows into Redis from Postgres without ever overwriting a newer value,
//! inside the daemon so it stays in stream order (the watermark protocol of Netflix DBLog,
//! with the window opened where the daemon starts the chunk).
//!
//! Three kinds of work go through it:
//! - **backfills** of `mirror` tables, a chunk at a time by primary key (first start, Redis
//!   lost its data, a table added or reshaped, `pgcache resync`, an attached partition);
//! - **repairs**: `mirror` keys the stream had to delete because their new value could not be
//!   built (an update whose unchanged TOASTed columns had no cached value to merge into);
//! - **reconciles**: keys whose rows vanished without row changes in the WAL (a partition
//!   truncated, detached or dropped) are found by scanning the table's keys and deleted.
//!
//! For each chunk, a task reads it in a `REPEATABLE READ` snapshot and then writes a *high
//! watermark* into the WAL (a row of `pgcache.events`). The chunk is correct at the high
//! watermark because:
//! - every transaction the stream brought before the chunk started is visible in the read's
//!   snapshot (the daemon applies a transaction only once readers can see it, and the read
//!   checks those it had not yet applied: a read that misses one is done again);
//! - every key the stream touches from the chunk's start to its high watermark is dropped
//!   from the chunk: the stream's value is at least as new (per row, a later commit is a
//!   later version), and a TRUNCATE of the table drops the whole chunk;
//! - what commits after the high watermark is newer than the read and is applied after it.
//!
//! What is left is written when the high watermark arrives, in the same write as the
//! cursor, so a backfill resumes after a crash. Memory is bounded: a chunk holds at most
//! `chunk_rows` rows and `max_chunk_bytes` of values, and at most `CHUNKS_IN_FLIGHT` (2)
//! chunks exist at a time.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tracing::{error, info, warn};

use crate::checkpoint::{
    BackfillProgress, BackfillState, FIELD_BACKFILL_PREFIX, FIELD_RECONCILE_PREFIX,
    FIELD_REPAIR_PREFIX,
};
use crate::clock::now_ms;
use crate::config::{Config, Mode, TableRule};
use crate::daemon::apply::{Op, Repair};
use crate::daemon::visibility::Snapshot;
use crate::metrics as m;
use crate::template::glob_escape;

pub mod control;
mod copy_text;
mod plan;
mod read;

pub use control::Control;
pub use plan::{RowValue, TablePlan};
pub use read::ChunkRead;

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("backfill of {table}: {}", crate::sql::describe_error(source))]
    Postgres {
        table: String,
        source: tokio_postgres::Error,
    },
    #[error("backfill of {table}: {message}")]
    Table { table: String, message: String },
    #[error("backfill of {table}: redis: {source}")]
    Redis {
        table: String,
        source: redis::RedisError,
    },
    #[error("backfill: {0}")]
    Task(String),
}

impl BackfillError {
    /// The query was refused because of the table's shape (SQLSTATE class 42: undefined
    /// column or table, ...), not because of the connection: retrying will not help.
    pub fn is_schema_error(&self) -> bool {
        match self {
            BackfillError::Postgres { source, .. } => source
                .code()
                .is_some_and(|code| code.code().starts_with("42")),
            BackfillError::Table { .. } => true,
            BackfillError::Redis { .. } | BackfillError::Task(_) => false,
        }
    }
}

/// Reports a table's backfill progress (the run command draws a bar with it on a terminal).
pub type ProgressFn = Arc<dyn Fn(&str, &BackfillProgress) + Send + Sync>;

/// What a job reads.
#[derive(Debug, Clone)]
enum Work {
    /// The next chunk of rows after `cursor`.
    Rows {
        cursor: Option<Vec<String>>,
        rows: u64,
        started_ms: u64,
    },
    /// These keys' rows (repairs): Redis key and key template values.
    Keys(Vec<(String, Vec<String>)>),
    /// The next batch of the table's keys from this scan cursor (reconciles).
    Reconcile { scan: String },
}

/// A table waiting for (more) work.
#[derive(Debug, Clone)]
struct Job {
    table: String,
    work: Work,
}

/// A chunk between its start and its high watermark.
struct InFlight {
    id: String,
    job: Job,
    plan: Arc<TablePlan>,
    state: ChunkState,
    /// Keys the stream touched since the chunk started: its values win.
    touched: HashSet<String>,
    /// The stream dropped the table's whole key space (TRUNCATE) since the chunk started.
    cleared: bool,
    /// Transactions the stream had brought, but the daemon not yet applied, when the chunk
    /// started: the read's snapshot must show them.
    pending_xids: Vec<u32>,
}

enum ChunkState {
    Reading(tokio::task::JoinHandle<Result<ChunkRead, BackfillError>>),
    Read(Box<ChunkRead>),
}

/// Chunks in flight: two lets Postgres read the next chunk while Redis writes the last one,
/// and bounds memory at two chunks.
const CHUNKS_IN_FLIGHT: usize = 2;

/// Keys per repair read.
const REPAIR_KEYS: usize = 500;

/// The daemon's backfills, repairs and reconciles: a queue of jobs, one chunk read at a time
/// and up to `CHUNKS_IN_FLIGHT` (2) waiting for their high watermarks.
pub struct Backfills {
    client: Arc<Client>,
    /// One connection per server that holds keys (every master of a cluster), for scans.
    redis: Vec<redis::aio::MultiplexedConnection>,
    key_prefix: String,
    chunk_rows: usize,
    max_chunk_bytes: usize,
    /// Distinguishes this session's watermarks from those of earlier sessions, which the
    /// stream may still bring.
    session: String,
    seq: u64,
    /// Every configured table (reconciles and repairs); backfills cover the mirror ones.
    rules: HashMap<String, Arc<TableRule>>,
    plans: HashMap<String, Arc<TablePlan>>,
    /// Tables whose plan waits for transactions to be visible (see
    /// [`Backfills::start_next`]): the ones pending when it first had to wait. Later ones
    /// are not waited for, or a steady stream of commits held by a synchronous standby
    /// would keep the plan from ever being made.
    plan_waits: HashMap<String, Vec<u32>>,
    queue: VecDeque<Job>,
    in_flight: VecDeque<InFlight>,
    /// Bytes per row seen in each table's chunks, to size the next chunk.
    row_bytes: HashMap<String, usize>,
    progress: Progress,
    /// Checkpoint fields to write with the next batch.
    fields: Vec<(String, String)>,
    last_prune: Instant,
}

impl Backfills {
    /// `client` is a connection of the backfill's own (it reads chunks and writes
    /// watermarks); `redis` scans keys for reconciles.
    pub fn new(
        client: Client,
        redis: Vec<redis::aio::MultiplexedConnection>,
        config: &Config,
        on_progress: Option<ProgressFn>,
    ) -> Backfills {
        let rules = config
            .tables
            .iter()
            .map(|rule| (rule.qualified_name(), Arc::new(rule.clone())))
            .collect();
        Backfills {
            client: Arc::new(client),
            redis,
            key_prefix: config.redis.key_prefix.clone(),
            chunk_rows: config.backfill.chunk_rows,
            max_chunk_bytes: config.backfill.max_chunk_bytes,
            session: format!("{:08x}", rand::random::<u32>()),
            seq: 0,
            rules,
            plans: HashMap::new(),
            plan_waits: HashMap::new(),
            queue: VecDeque::new(),
            in_flight: VecDeque::new(),
            row_bytes: HashMap::new(),
            progress: Progress::new(on_progress),
            fields: Vec::new(),
            last_prune: Instant::now(),
        }
    }

    /// Stops working on a table (it is not set up right, or its rule broke).
    pub fn remove_table(&mut self, table: &str) {
        self.rules.remove(table);
        self.queue.retain(|job| job.table != table);
    }

    /// Covers a table again (one [`remove_table`](Self::remove_table) took out, which fits
    /// its rule again).
    pub fn restore_table(&mut self, rule: Arc<TableRule>) {
        self.rules.insert(rule.qualified_name(), rule);
    }

    /// Qualified names of the tables backfills cover (mirror tables).
    pub fn mirror_tables(&self) -> Vec<String> {
        let mut tables: Vec<String> = self
            .rules
            .values()
            .filter(|rule| rule.mode == Mode::Mirror)
            .map(|rule| rule.qualified_name())
            .collect();
        tables.sort();
        tables
    }

    fn is_mirror(&self, table: &str) -> bool {
        self.rules
            .get(table)
            .is_some_and(|r| r.mode == Mode::Mirror)
    }

    /// Queues a mirror table's backfill from the start, or from where `resume` left it.
    pub fn schedule(&mut self, table: &str, resume: Option<&BackfillProgress>) {
        if !self.is_mirror(table) {
            return;
        }
        let work = match resume {
            Some(p) if p.state == BackfillState::Running => Work::Rows {
                cursor: p.cursor.clone(),
                rows: p.rows,
                started_ms: p.started_ms,
            },
            _ => Work::Rows {
                cursor: None,
                rows: 0,
                started_ms: now_ms(),
            },
        };
        if let Work::Rows {
            cursor: None,
            started_ms,
            ..
        } = &work
        {
            // From the start: the table may have changed shape since its plan was made, and
            // the restart must survive a crash of the daemon, so it goes in the checkpoint.
            self.plans.remove(table);
            // A schema change since: the wait starts over with what is pending then.
            self.plan_waits.remove(table);
            let progress = BackfillProgress {
                state: BackfillState::Running,
                cursor: None,
                rows: 0,
                estimate: 0,
                started_ms: *started_ms,
                updated_ms: *started_ms,
            };
            self.fields.push((
                format!("{FIELD_BACKFILL_PREFIX}{table}"),
                serde_json::to_string(&progress).unwrap_or_default(),
            ));
        }
        let job = Job {
            table: table.to_string(),
            work,
        };
        let queued = self
            .queue
            .iter_mut()
            .find(|q| q.table == table && matches!(q.work, Work::Rows { .. }));
        match queued {
            Some(queued) => *queued = job,
            None => self.queue.push_back(job),
        }
    }

    /// `pgcache resync` (or an attached partition): every mirror table, or one.
    pub fn resync(&mut self, table: Option<&str>) {
        match table {
            None => {
                let tables = self.mirror_tables();
                info!(
                    tables = tables.len(),
                    "resync of every mirror table requested"
                );
                for table in tables {
                    self.schedule(&table, None);
                }
            }
            Some(table) => {
                let name = qualified(table);
                if self.is_mirror(&name) {
                    info!(table = %name, "resync requested");
                    self.schedule(&name, None);
                } else {
                    warn!(table = %name, "resync requested for a table that is not a mirror table in this daemon's config; ignored");
                }
            }
        }
    }

    /// Reads a key's row again (its key was deleted for want of a merge base).
    pub fn repair(&mut self, repair: Repair) {
        if !self.rules.contains_key(&repair.table) {
            return;
        }
        metrics::counter!(m::REPAIRS, "table" => repair.table.clone()).increment(1);
        let entry = (repair.key, repair.key_texts);
        let queued = self.queue.iter_mut().find(|q| {
            q.table == repair.table
                && matches!(&q.work, Work::Keys(keys) if keys.len() < REPAIR_KEYS)
        });
        match queued {
            Some(Job {
                work: Work::Keys(keys),
                ..
            }) => keys.push(entry),
            _ => self.queue.push_back(Job {
                table: repair.table,
                work: Work::Keys(vec![entry]),
            }),
        }
    }

    /// Whether the table is being backfilled (queued or reading): its cached values may
    /// still be in the shape they had before.
    pub fn rows_pending(&self, table: &str) -> bool {
        self.queue
            .iter()
            .any(|q| q.table == table && matches!(q.work, Work::Rows { .. }))
            || self
                .in_flight
                .iter()
                .any(|c| c.job.table == table && matches!(c.job.work, Work::Rows { .. }))
    }

    /// Forgets the keys of `table` waiting to be read again: its rule changed, so they are
    /// in the old form and the table is written again anyway.
    pub fn drop_repairs(&mut self, table: &str) {
        self.queue
            .retain(|q| !(q.table == table && matches!(q.work, Work::Keys(_))));
    }

    /// Deletes the keys of `table` whose rows are gone, scanning from `scan` ("0": the
    /// start).
    pub fn reconcile(&mut self, table: &str, scan: Option<&str>) {
        let name = qualified(table);
        if !self.rules.contains_key(&name) {
            warn!(table = %name, "reconcile requested for a table that is not in this daemon's config; ignored");
            return;
        }
        let already = self
            .queue
            .iter()
            .any(|q| q.table == name && matches!(&q.work, Work::Reconcile { scan } if scan == "0"));
        if already {
            return;
        }
        info!(table = %name, "rows vanished without row changes (a partition truncated, detached or dropped): deleting the keys whose rows are gone");
        let scan = scan.unwrap_or("0").to_string();
        self.fields
            .push((format!("{FIELD_RECONCILE_PREFIX}{name}"), scan.clone()));
        self.queue.push_back(Job {
            table: name,
            work: Work::Reconcile { scan },
        });
    }

    /// Checkpoint fields to write with the next batch.
    pub fn take_fields(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.fields)
    }

    /// A chunk can start: work is waiting, no chunk is being read, and fewer than
    /// `CHUNKS_IN_FLIGHT` (2) chunks wait for their high watermarks.
    pub fn can_start(&self) -> bool {
        self.in_flight.len() < CHUNKS_IN_FLIGHT && !self.queue.is_empty() && !self.reading()
    }

    /// Whether any chunk is between its start and its high watermark.
    pub fn active(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Starts the next chunk: a task reads it and writes its high watermark while the stream
    /// goes on. Call it between transactions; `pending_xids` are the transactions the stream
    /// brought that the daemon has not applied yet. The stream brings the watermark back
    /// ([`Backfills::on_high`]); the read's end is [`Backfills::read_finished`].
    ///
    /// # Errors
    /// The table's plan cannot be made for a reason of the connection's (a table's own
    /// fault is logged and its work dropped).
    pub async fn start_next(&mut self, pending_xids: Vec<u32>) -> Result<(), BackfillError> {
        let Some(job) = self.queue.pop_front() else {
            return Ok(());
        };
        let plan = match self.plans.get(&job.table) {
            Some(plan) => plan.clone(),
            None => {
                let Some(rule) = self.rules.get(&job.table).cloned() else {
                    return Ok(());
                };
                // The plan (the columns a chunk selects) is read from the catalog: read
                // before a transaction the stream brought is visible (a column added and
                // set in it), it would lack the column, and every row would be written
                // again without it. The chunk's own snapshot check cannot see that, so the
                // plan waits for them (the loop comes back at its next tick): for the ones
                // pending the first time it had to, not for every later one.
                if !pending_xids.is_empty() || self.plan_waits.contains_key(&job.table) {
                    let waits = self
                        .plan_waits
                        .entry(job.table.clone())
                        .or_insert_with(|| pending_xids.clone())
                        .clone();
                    let visible = match Snapshot::current(&self.client).await {
                        Ok(now) => now.is_some_and(|s| waits.iter().all(|&x| s.shows(x))),
                        Err(source) => {
                            let table = job.table.clone();
                            self.queue.push_front(job);
                            return Err(BackfillError::Postgres { table, source });
                        }
                    };
                    if !visible {
                        self.queue.push_front(job);
                        return Ok(());
                    }
                    self.plan_waits.remove(&job.table);
                }
                match TablePlan::new(&self.client, rule, &self.key_prefix).await {
                    Ok(plan) => {
                        let plan = Arc::new(plan);
                        self.plans.insert(job.table.clone(), plan.clone());
                        plan
                    }
                    Err(e) if e.is_schema_error() => {
                        error!(error = %e, "backfill skipped");
                        return Ok(());
                    }
                    Err(e) => {
                        self.queue.push_front(job);
                        return Err(e);
                    }
                }
            }
        };
        self.seq += 1;
        let id = format!("{}:{}", self.session, self.seq);
        let limit = match self.row_bytes.get(&job.table) {
            Some(&bytes) if bytes > 0 => (self.max_chunk_bytes / bytes).clamp(1, self.chunk_rows),
            _ => self.chunk_rows,
        };
        let prune = self.last_prune.elapsed() > Duration::from_secs(60);
        if prune {
            self.last_prune = Instant::now();
        }
        let task = tokio::spawn(read_then_watermark(
            self.client.clone(),
            self.redis.clone(),
            plan.clone(),
            id.clone(),
            job.work.clone(),
            Limits {
                rows: limit,
                bytes: self.max_chunk_bytes,
            },
            prune,
        ));
        self.in_flight.push_back(InFlight {
            id,
            job,
            plan,
            state: ChunkState::Reading(task),
            touched: HashSet::new(),
            cleared: false,
            pending_xids,
        });
        Ok(())
    }

    /// A chunk is being read.
    pub fn reading(&self) -> bool {
        self.in_flight
            .iter()
            .any(|c| matches!(c.state, ChunkState::Reading(_)))
    }

    /// Resolves when the chunk being read is read (pending while none is). Cancel safe:
    /// the read goes on in its task. Hand the result to [`Backfills::on_read`].
    pub async fn read_finished(&mut self) -> Result<ChunkRead, BackfillError> {
        let reading = self.in_flight.iter_mut().find_map(|c| match &mut c.state {
            ChunkState::Reading(task) => Some(task),
            ChunkState::Read(_) => None,
        });
        match reading {
            Some(task) => task.await.unwrap_or_else(|e| {
                Err(BackfillError::Task(format!(
                    "the chunk read task failed: {e}"
                )))
            }),
            None => std::future::pending().await,
        }
    }

    /// Takes the chunk that was being read: checks its snapshot and queues the table's next
    /// chunk (what the stream changes is dropped at the high watermark).
    ///
    /// # Errors
    /// The read failed for a reason of the connection's: the chunk will be read again.
    pub fn on_read(
        &mut self,
        result: Result<ChunkRead, BackfillError>,
    ) -> Result<(), BackfillError> {
        let Some(at) = self
            .in_flight
            .iter()
            .position(|c| matches!(c.state, ChunkState::Reading(_)))
        else {
            return Ok(());
        };
        let chunk = match result {
            Ok(chunk) => chunk,
            Err(e) => {
                let Some(entry) = self.in_flight.remove(at) else {
                    return Ok(());
                };
                if e.is_schema_error() {
                    // The table changed under the plan (a column dropped, say). The stream's
                    // Relation message decides what happens to the table; a later resync or
                    // reshape starts over with a fresh plan.
                    self.plans.remove(&entry.job.table);
                    error!(error = %e, "backfill chunk failed; the table's backfill stops");
                    return Ok(());
                }
                self.queue.push_front(entry.job);
                return Err(e);
            }
        };
        let entry = &mut self.in_flight[at];
        let unseen: Vec<u32> = entry
            .pending_xids
            .iter()
            .copied()
            .filter(|&xid| !chunk.snapshot.as_ref().is_some_and(|s| s.shows(xid)))
            .collect();
        if !unseen.is_empty() {
            // The read's snapshot predates a commit the stream already brought: its rows
            // could be older than what the stream writes before the high watermark.
            tracing::debug!(xids = ?unseen, table = %entry.job.table, "chunk read before a streamed commit became visible: reading it again");
            let entry = self.in_flight.remove(at).expect("the entry is there");
            self.queue.push_front(entry.job);
            return Ok(());
        }
        if chunk.read > 0 {
            self.row_bytes
                .insert(entry.job.table.clone(), chunk.bytes.div_ceil(chunk.read));
        }
        let next = match &mut entry.job.work {
            Work::Rows { cursor, rows, .. } => {
                *rows += chunk.read as u64;
                if chunk.cursor.is_some() {
                    cursor.clone_from(&chunk.cursor);
                }
                (!chunk.last).then(|| entry.job.clone())
            }
            Work::Reconcile { .. } => chunk.scan.clone().map(|scan| Job {
                table: entry.job.table.clone(),
                work: Work::Reconcile { scan },
            }),
            Work::Keys(_) => None,
        };
        entry.state = ChunkState::Read(Box::new(chunk));
        if let Some(next) = next {
            let same = |q: &Job| {
                q.table == next.table
                    && std::mem::discriminant(&q.work) == std::mem::discriminant(&next.work)
            };
            if !self.queue.iter().any(same) {
                // The next chunk of this table can be read before this one is written.
                self.queue.push_front(next);
            }
        }
        Ok(())
    }

    /// The stream touched these keys, or dropped these key spaces: chunks in flight must
    /// not write over them.
    pub fn touched<'a>(
        &mut self,
        keys: impl Iterator<Item = &'a str>,
        dropped: impl Iterator<Item = &'a str>,
    ) {
        if self.in_flight.is_empty() {
            return;
        }
        for space in dropped {
            for chunk in &mut self.in_flight {
                if chunk.plan.key_space == space {
                    chunk.cleared = true;
                }
            }
        }
        for key in keys {
            for chunk in &mut self.in_flight {
                if key.starts_with(chunk.plan.key_space.as_str()) {
                    chunk.touched.insert(key.to_string());
                }
            }
        }
    }

    /// A high watermark of ours: returns the chunk's operations and the checkpoint fields
    /// to write with them (progress, cursors, repairs done). The task writes the watermark
    /// after the read, so if the stream brings it before the read's end was taken, the read
    /// is done or about to be: it is awaited here.
    ///
    /// # Errors
    /// The read failed for a reason of the connection's.
    pub async fn on_high(
        &mut self,
        id: &str,
    ) -> Result<Option<(Vec<Op>, Vec<(String, String)>)>, BackfillError> {
        let Some(at) = self.in_flight.iter().position(|c| c.id == id) else {
            return Ok(None);
        };
        if matches!(self.in_flight[at].state, ChunkState::Reading(_)) {
            let result = self.read_finished().await;
            self.on_read(result)?;
        }
        let Some(at) = self.in_flight.iter().position(|c| c.id == id) else {
            // The read failed, or is read again: nothing to write.
            return Ok(None);
        };
        let Some(InFlight {
            job,
            plan,
            state: ChunkState::Read(mut chunk),
            touched,
            cleared,
            ..
        }) = self.in_flight.remove(at)
        else {
            return Ok(None);
        };
        let (ops, written, deleted) = chunk_ops(&mut chunk, &touched, cleared, &plan);
        metrics::counter!(m::BACKFILL_ROWS, "table" => job.table.clone()).increment(written);
        let fields = self.done_fields(job, &plan, &mut chunk, written, deleted);
        Ok(Some((ops, fields)))
    }

    /// The checkpoint fields a written chunk moves: the backfill's progress, repairs done,
    /// the reconcile's scan cursor.
    fn done_fields(
        &mut self,
        job: Job,
        plan: &TablePlan,
        chunk: &mut ChunkRead,
        written: u64,
        deleted: usize,
    ) -> Vec<(String, String)> {
        let mut fields = Vec::new();
        match job.work {
            Work::Rows {
                cursor,
                rows,
                started_ms,
            } => {
                let state = if chunk.last {
                    BackfillState::Done
                } else {
                    BackfillState::Running
                };
                let progress = BackfillProgress {
                    state,
                    cursor,
                    rows,
                    estimate: plan.estimate.max(rows),
                    started_ms,
                    updated_ms: now_ms(),
                };
                self.progress.report(&job.table, &progress);
                let restarted = self.queue.iter().find_map(|q| match &q.work {
                    Work::Rows {
                        cursor: None,
                        started_ms,
                        ..
                    } if q.table == job.table => Some(*started_ms),
                    _ => None,
                });
                let progress = match restarted {
                    // A resync was asked for while this chunk was in flight: its rows are
                    // right, but the stored progress must keep saying "from the start".
                    Some(started_ms) => BackfillProgress {
                        state: BackfillState::Running,
                        cursor: None,
                        rows: 0,
                        estimate: 0,
                        started_ms,
                        updated_ms: now_ms(),
                    },
                    None => progress,
                };
                fields.push((
                    format!("{FIELD_BACKFILL_PREFIX}{}", job.table),
                    serde_json::to_string(&progress).unwrap_or_default(),
                ));
            }
            Work::Keys(keys) => {
                info!(table = %job.table, keys = keys.len(), rows = written, "keys read again after their values could not be built");
                for (key, _) in keys {
                    // An empty value removes the field (see the apply script).
                    fields.push((format!("{FIELD_REPAIR_PREFIX}{key}"), String::new()));
                }
            }
            Work::Reconcile { .. } => {
                if deleted > 0 {
                    info!(table = %job.table, keys = deleted, "deleted keys whose rows are gone");
                }
                fields.push((
                    format!("{FIELD_RECONCILE_PREFIX}{}", job.table),
                    chunk.scan.take().unwrap_or_default(),
                ));
            }
        }
        fields
    }
}

/// A read chunk's writes, once what the stream touched from the chunk's start to its high
/// watermark is taken out (the stream wins): the operations, rows written, keys deleted.
fn chunk_ops(
    chunk: &mut ChunkRead,
    touched: &HashSet<String>,
    cleared: bool,
    plan: &TablePlan,
) -> (Vec<Op>, u64, usize) {
    if cleared {
        chunk.rows.clear();
        chunk.deletes.clear();
    }
    for key in touched {
        chunk.rows.remove(key);
    }
    chunk.deletes.retain(|key| !touched.contains(key));
    let ttl_ms = plan.rule.ttl.map(|ttl| ttl.as_millis().max(1) as u64);
    let written = chunk.rows.len() as u64;
    let mut ops: Vec<Op> = std::mem::take(&mut chunk.rows)
        .into_iter()
        .map(|(key, value)| match value {
            RowValue::Json(value) => Op::Fill { key, value, ttl_ms },
            RowValue::Hash(fields) => Op::Hash {
                key,
                fields,
                ttl_ms,
                only_if_cached: false,
            },
        })
        .collect();
    let deleted = chunk.deletes.len();
    ops.extend(chunk.deletes.drain(..).map(|key| Op::Del { key }));
    (ops, written, deleted)
}

impl Drop for Backfills {
    fn drop(&mut self) {
        for entry in &self.in_flight {
            if let ChunkState::Reading(task) = &entry.state {
                task.abort();
            }
        }
    }
}

/// `public.` before a bare table name.
pub(crate) fn qualified(table: &str) -> String {
    if table.contains('.') {
        table.to_string()
    } else {
        format!("public.{table}")
    }
}

/// How much one chunk may hold.
#[derive(Debug, Clone, Copy)]
struct Limits {
    rows: usize,
    bytes: usize,
}

/// A chunk's read, in a task of its own: the rows, then the high watermark.
async fn read_then_watermark(
    client: Arc<Client>,
    redis: Vec<redis::aio::MultiplexedConnection>,
    plan: Arc<TablePlan>,
    id: String,
    work: Work,
    limits: Limits,
    prune: bool,
) -> Result<ChunkRead, BackfillError> {
    let table = plan.rule.qualified_name();
    let pg = |source| BackfillError::Postgres {
        table: table.clone(),
        source,
    };
    if prune {
        if let Err(e) = control::prune(&client).await {
            warn!(error = %e, "could not prune old control events");
        }
    }
    let chunk = match work {
        Work::Rows { cursor, .. } => {
            plan.read_chunk(&client, cursor.as_deref(), limits.rows, limits.bytes)
                .await?
        }
        Work::Keys(keys) => {
            let texts: Vec<Vec<String>> = keys.into_iter().map(|(_, texts)| texts).collect();
            plan.read_keys(&client, &texts).await?
        }
        Work::Reconcile { scan } => {
            let (next, keys) = scan_keys(redis, &plan, &scan, limits.rows).await?;
            let mut chunk = plan.missing_keys(&client, keys).await?;
            chunk.scan = next;
            chunk
        }
    };
    control::emit_watermark(&client, &Control::High(id))
        .await
        .map_err(pg)?;
    Ok(chunk)
}

/// One `SCAN` step over the table's keys: the next cursor (`None` at the end) and the keys
/// with their template values (lease keys and keys that do not parse are skipped).
///
/// On several servers (the masters of a cluster) the cursor is `<server>:<cursor>`, the
/// servers taken one after the other in the order given.
async fn scan_keys(
    servers: Vec<redis::aio::MultiplexedConnection>,
    plan: &TablePlan,
    scan: &str,
    count: usize,
) -> Result<(Option<String>, Vec<(String, Vec<String>)>), BackfillError> {
    let (server, scan) = match scan.split_once(':') {
        Some((server, cursor)) if servers.len() > 1 => (server.parse().unwrap_or(0), cursor),
        _ => (0, scan),
    };
    let Some(mut redis) = servers.get(server).cloned() else {
        return Ok((None, Vec::new()));
    };
    let pattern = format!("{}*", glob_escape(&plan.key_space));
    let (next, keys): (String, Vec<String>) = redis::cmd("SCAN")
        .arg(scan)
        .arg("MATCH")
        .arg(&pattern)
        .arg("COUNT")
        .arg(count.max(100))
        .query_async(&mut redis)
        .await
        .map_err(|source| BackfillError::Redis {
            table: plan.rule.qualified_name(),
            source,
        })?;
    // Lease keys and keys of other tables whose prefix starts like ours do not parse.
    let parsed = keys
        .into_iter()
        .filter_map(|key| {
            let values = plan.rule.key.parse_key(&plan.key_prefix, &key)?;
            let texts = values
                .into_iter()
                .map(|v| String::from_utf8(v).ok())
                .collect::<Option<Vec<_>>>()?;
            Some((key, texts))
        })
        .collect();
    let next = match (next.as_str(), servers.len() > 1) {
        ("0", false) => None,
        (_, false) => Some(next),
        ("0", true) => (server + 1 < servers.len()).then(|| format!("{}:0", server + 1)),
        (_, true) => Some(format!("{server}:{next}")),
    };
    Ok((next, parsed))
}

/// Progress in the log (a line every few seconds per table) and to the run command's hook.
struct Progress {
    hook: Option<ProgressFn>,
    last_line: HashMap<String, Instant>,
}

impl Progress {
    fn new(hook: Option<ProgressFn>) -> Progress {
        Progress {
            hook,
            last_line: HashMap::new(),
        }
    }

    fn report(&mut self, table: &str, p: &BackfillProgress) {
        if let Some(hook) = &self.hook {
            hook(table, p);
        }
        let done = p.is_done();
        let due = self
            .last_line
            .get(table)
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(5));
        if !done && !due {
            return;
        }
        self.last_line.insert(table.to_string(), Instant::now());
        let elapsed = Duration::from_millis(p.updated_ms.saturating_sub(p.started_ms).max(1));
        let rate = p.rows as f64 / elapsed.as_secs_f64();
        let left = p.estimate.saturating_sub(p.rows);
        let eta = if rate > 0.0 {
            Duration::from_secs((left as f64 / rate) as u64)
        } else {
            Duration::ZERO
        };
        info!(
            table,
            rows = p.rows,
            estimate = p.estimate,
            rows_per_sec = rate.round() as u64,
            eta = %humantime::format_duration(eta),
            done,
            "backfill progress"
        );
    }
}
