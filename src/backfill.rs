//! Backfill: loading a `mirror` table's existing rows into Redis without ever overwriting a
//! newer value (the watermark protocol of Netflix DBLog, run inside the daemon so it stays
//! in stream order).
//!
//! For each chunk: emit a low watermark into the WAL, read the chunk (keyset pagination by
//! primary key), emit a high watermark. The stream brings both watermarks back in WAL order;
//! every row the stream changes between them is dropped from the chunk (the stream's value is
//! at least as new), and what is left is written when the high watermark arrives, together
//! with the cursor, in the same `EXEC`. A row changed before the low watermark is in the
//! chunk with that change; one changed after the high watermark is written by the stream
//! after the chunk. Memory is bounded by the chunk size; the cursor makes it resumable.
//!
//! Rows are read with `COPY (SELECT ... ORDER BY pk LIMIT n) TO STDOUT`, whose text format is
//! each column's output function under the pinned session settings, escaped: unescaped, it
//! is the same text pgoutput sends, so the encoder produces byte-identical values (casting
//! to `::text` would not: see `reader::source`). COPY costs Postgres and the daemon less per
//! row than the rows of a query.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_postgres::Client;
use tracing::{info, warn};

use crate::apply::{now_ms, Op};
use crate::checkpoint::{BackfillProgress, FIELD_BACKFILL_PREFIX};
use crate::config::{Config, Format, Mode, TableRule};
use crate::encoder::{self, PgType};
use crate::metrics as m;
use crate::preflight::{quote_ident, quote_qualified};

mod copy_text;

/// Prefix of the logical messages pgcache emits and understands.
pub const MESSAGE_PREFIX: &str = "pgcache";

/// A logical message on the `pgcache` prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Low(String),
    High(String),
    /// `pgcache resync`: backfill this table again (`None`: every mirror table).
    Resync(Option<String>),
}

impl Control {
    pub fn parse(content: &[u8]) -> Option<Control> {
        let text = std::str::from_utf8(content).ok()?;
        let (kind, rest) = text.split_once(':')?;
        match kind {
            "low" => Some(Control::Low(rest.to_string())),
            "high" => Some(Control::High(rest.to_string())),
            "resync" if rest == "*" => Some(Control::Resync(None)),
            "resync" => Some(Control::Resync(Some(rest.to_string()))),
            _ => None,
        }
    }

    pub fn encode(&self) -> String {
        match self {
            Control::Low(id) => format!("low:{id}"),
            Control::High(id) => format!("high:{id}"),
            Control::Resync(None) => "resync:*".to_string(),
            Control::Resync(Some(table)) => format!("resync:{table}"),
        }
    }
}

/// Emits a control message into the WAL, non-transactionally: it is decoded at its position
/// (`pgcache resync`).
pub async fn emit(client: &Client, control: &Control) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT pg_logical_emit_message(false, $1, $2)",
            &[&MESSAGE_PREFIX, &control.encode()],
        )
        .await?;
    Ok(())
}

/// Emits a watermark in a transaction of its own, committed with `synchronous_commit = on`.
///
/// The walsender only sends WAL that is flushed. A non-transactional message is flushed
/// whenever the WAL writer gets to it (up to `wal_writer_delay`, 200 ms by default, later
/// with `synchronous_commit = off`), and every chunk waits for its high watermark: that
/// alone held backfills to ~25,000 rows/s. A commit flushes at once. The message arrives in
/// the stream inside its transaction, in commit order, which is the order the protocol needs.
async fn emit_watermark(client: &Client, control: &Control) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL synchronous_commit = on; \
             SELECT pg_logical_emit_message(true, '{MESSAGE_PREFIX}', '{}'); COMMIT;",
            control.encode().replace('\'', "''")
        ))
        .await
}

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("backfill of {table}: {source}")]
    Postgres {
        table: String,
        source: tokio_postgres::Error,
    },
    #[error("backfill of {table}: {message}")]
    Table { table: String, message: String },
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
            BackfillError::Task(_) => false,
        }
    }
}

/// How to read one table's rows the way the stream sees them.
pub struct TablePlan {
    pub rule: Arc<TableRule>,
    key_prefix: String,
    /// Cached columns, in the daemon's output order, with the select-list index of each.
    columns: Vec<(String, PgType)>,
    column_at: Vec<usize>,
    /// Select-list index of each key template column, in template order.
    key_at: Vec<usize>,
    /// Primary key columns: select-list index and SQL type (for casting the cursor).
    pk: Vec<(usize, String)>,
    /// `SELECT ... FROM t` (no WHERE / ORDER BY / LIMIT).
    select: String,
    /// Columns in the select list.
    width: usize,
    order_by: String,
    pk_tuple: String,
    /// Rows estimated from `pg_class.reltuples`.
    pub estimate: u64,
}

/// A row's value in the table's format.
#[derive(Debug, Clone, PartialEq)]
pub enum RowValue {
    Json(Vec<u8>),
    Hash(Vec<(String, Vec<u8>)>),
}

/// One chunk: the encoded rows by Redis key, and the cursor after them.
#[derive(Debug, Default)]
pub struct Chunk {
    pub rows: HashMap<String, RowValue>,
    /// Primary key of the last row read (`None`: the table was empty past the cursor).
    pub cursor: Option<Vec<String>>,
    /// Rows read (including any that could not be keyed).
    pub read: usize,
    /// Fewer rows than asked for: the table is done after this chunk.
    pub last: bool,
}

impl TablePlan {
    /// Looks the table up in the catalog.
    ///
    /// # Errors
    /// A missing table or column, a table without a primary key, a failed query.
    pub async fn new(
        client: &Client,
        rule: Arc<TableRule>,
        key_prefix: &str,
    ) -> Result<TablePlan, BackfillError> {
        let table = rule.qualified_name();
        let pg = |source| BackfillError::Postgres {
            table: table.clone(),
            source,
        };
        let fail = |message: String| BackfillError::Table {
            table: table.clone(),
            message,
        };
        let relation = quote_qualified(&rule.schema, &rule.name);
        let Some(row) = client
            .query_opt(
                "SELECT c.oid, greatest(c.reltuples, 0)::int8 FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&rule.schema, &rule.name],
            )
            .await
            .map_err(pg)?
        else {
            return Err(fail("the table does not exist".into()));
        };
        let oid: u32 = row.get(0);
        let mut estimate: i64 = row.get(1);
        if estimate == 0 {
            // Partitioned roots have no reltuples of their own; sum the partitions.
            estimate = client
                .query_one(
                    "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::int8 FROM pg_inherits i \
                     JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1",
                    &[&oid],
                )
                .await
                .map_err(pg)?
                .get(0);
        }
        // Columns as pgoutput sends them: attnum order, no dropped or generated columns.
        let rows = client
            .query(
                "SELECT attname::text, atttypid, format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' \
                 ORDER BY attnum",
                &[&oid],
            )
            .await
            .map_err(pg)?;
        let all: Vec<(String, u32, String)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let pk_names = crate::pgconn::primary_key_columns(client, oid)
            .await
            .map_err(pg)?;
        if pk_names.is_empty() {
            return Err(fail(
                "the table has no primary key, which backfill pages by; add one".into(),
            ));
        }

        let mut select_list: Vec<String> = Vec::new();
        let mut slot = |name: &str| -> Result<usize, BackfillError> {
            if let Some(at) = select_list.iter().position(|n| n == name) {
                return Ok(at);
            }
            if !all.iter().any(|(n, _, _)| n == name) {
                return Err(fail(format!("the table has no column {name:?}")));
            }
            select_list.push(name.to_string());
            Ok(select_list.len() - 1)
        };
        let names: Vec<String> = match &rule.columns {
            Some(columns) => columns.clone(),
            None => all.iter().map(|(n, _, _)| n.clone()).collect(),
        };
        let mut column_at = Vec::new();
        for name in &names {
            column_at.push(slot(name)?);
        }
        let mut key_at = Vec::new();
        for name in rule.key.columns() {
            key_at.push(slot(name)?);
        }
        let mut pk = Vec::new();
        for name in &pk_names {
            let sql_type = all
                .iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, _, t)| t.clone())
                .unwrap_or_default();
            pk.push((slot(name)?, sql_type));
        }
        let mut columns = Vec::new();
        for name in &names {
            let oid = all
                .iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, o, _)| *o)
                .unwrap_or(0);
            let ty = match PgType::from_oid(oid) {
                Some(ty) => ty,
                None => PgType::resolve(client, oid).await.map_err(pg)?,
            };
            columns.push((name.clone(), ty));
        }
        let select = format!(
            "SELECT {} FROM {relation}",
            select_list
                .iter()
                .map(|n| quote_ident(n))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let pk_cols: Vec<String> = pk_names.iter().map(|n| quote_ident(n)).collect();
        Ok(TablePlan {
            rule,
            key_prefix: key_prefix.to_string(),
            columns,
            column_at,
            key_at,
            pk,
            select,
            width: select_list.len(),
            order_by: pk_cols.join(", "),
            pk_tuple: format!("({})", pk_cols.join(", ")),
            estimate: estimate.max(0) as u64,
        })
    }

    /// Reads the next chunk after `cursor` and encodes it.
    ///
    /// # Errors
    /// A failed query. Rows that cannot be keyed or encoded are counted and skipped with a
    /// warning: their keys stay absent, which is safe.
    pub async fn read_chunk(
        &self,
        client: &Client,
        cursor: Option<&[String]>,
        limit: usize,
    ) -> Result<Chunk, BackfillError> {
        let mut sql = format!("COPY ({}", self.select);
        if let Some(cursor) = cursor {
            sql.push_str(" WHERE ");
            sql.push_str(&self.pk_tuple);
            sql.push_str(" > (");
            for (i, ((_, sql_type), value)) in self.pk.iter().zip(cursor).enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&literal(value));
                sql.push_str("::");
                sql.push_str(sql_type);
            }
            sql.push(')');
        }
        sql.push_str(&format!(
            " ORDER BY {} LIMIT {limit}) TO STDOUT",
            self.order_by
        ));
        let table = || self.rule.qualified_name();
        let stream =
            client
                .copy_out(sql.as_str())
                .await
                .map_err(|source| BackfillError::Postgres {
                    table: table(),
                    source,
                })?;
        let mut stream = std::pin::pin!(stream);
        let mut chunk = Chunk::default();
        chunk.rows.reserve(limit);
        let mut row = copy_text::Row::default();
        // The whole chunk's text (rows can span COPY messages), then row by row.
        let mut text = Vec::new();
        while let Some(data) = stream.next().await {
            let data = data.map_err(|source| BackfillError::Postgres {
                table: table(),
                source,
            })?;
            text.extend_from_slice(&data);
        }
        let Some(body) = text.strip_suffix(b"\n") else {
            if text.is_empty() {
                chunk.last = true;
                return Ok(chunk);
            }
            return Err(BackfillError::Table {
                table: table(),
                message: "COPY output does not end with a whole row".into(),
            });
        };
        let mut lines = body.split(|&b| b == b'\n').peekable();
        while let Some(line) = lines.next() {
            let row = row
                .parse(line, self.width)
                .map_err(|e| BackfillError::Table {
                    table: table(),
                    message: format!("cannot read a row: {e}"),
                })?;
            chunk.read += 1;
            if lines.peek().is_none() {
                // The cursor is the last row's primary key.
                chunk.cursor = Some(
                    self.pk
                        .iter()
                        .map(|(at, _)| {
                            String::from_utf8_lossy(row.get(*at).unwrap_or_default()).into_owned()
                        })
                        .collect(),
                );
            }
            // (The key and the value are kept, so each row allocates anyway.)
            let Some(key_values) = self
                .key_at
                .iter()
                .map(|&at| row.get(at))
                .collect::<Option<Vec<&[u8]>>>()
            else {
                warn!(table = %table(), "row with a NULL key column skipped");
                continue;
            };
            let mut key = String::with_capacity(32);
            self.rule
                .key
                .render_into(&mut key, &self.key_prefix, &key_values);
            match self.encode(&row) {
                Ok(value) => {
                    chunk.rows.insert(key, value);
                }
                Err(e) => {
                    warn!(table = %table(), %key, error = %e, "row not cached");
                }
            }
        }
        chunk.last = chunk.read < limit;
        Ok(chunk)
    }
}

impl TablePlan {
    fn encode(&self, row: &copy_text::Fields<'_>) -> Result<RowValue, encoder::EncodeError> {
        match self.rule.format {
            Format::Json => {
                let mut value = Vec::with_capacity(128);
                encoder::encode_row(
                    &mut value,
                    &self.columns,
                    self.column_at.iter().map(|&at| row.get(at)),
                    self.rule.encode,
                )?;
                Ok(RowValue::Json(value))
            }
            Format::Hash => {
                let mut fields = Vec::with_capacity(self.columns.len());
                for ((name, ty), &at) in self.columns.iter().zip(&self.column_at) {
                    if let Some(text) = row.get(at) {
                        let mut field = Vec::with_capacity(text.len());
                        encoder::encode_field(&mut field, ty, text, self.rule.encode)?;
                        fields.push((name.to_string(), field));
                    }
                }
                Ok(RowValue::Hash(fields))
            }
        }
    }
}

/// An escaped string literal, independent of `standard_conforming_strings`.
fn literal(value: &str) -> String {
    // Values here come from Postgres text output, which cannot hold NUL.
    let mut out = String::with_capacity(value.len() + 3);
    let _ = crate::reader::source::push_literal(&mut out, value);
    out
}

/// A table waiting for (more) backfill.
#[derive(Debug, Clone)]
struct Job {
    table: String,
    cursor: Option<Vec<String>>,
    rows: u64,
    started_ms: u64,
}

/// A chunk between its watermarks.
struct InFlight {
    id: String,
    job: Job,
    plan: Arc<TablePlan>,
    chunk: ChunkState,
    window_open: bool,
}

/// A chunk is read by a task of its own, so the stream (and Redis writes) go on meanwhile;
/// its low watermark can come back before the rows do.
enum ChunkState {
    /// The task is emitting the watermarks and reading the rows. What the stream changed in
    /// the window so far is noted, to be dropped from the rows when they arrive.
    Reading {
        task: tokio::task::JoinHandle<Result<Chunk, BackfillError>>,
        dropped: Vec<String>,
        cleared: bool,
    },
    Read(Chunk),
}

impl ChunkState {
    fn drop_keys<'a>(&mut self, keys: impl Iterator<Item = &'a str>) {
        match self {
            ChunkState::Reading { dropped, .. } => dropped.extend(keys.map(str::to_string)),
            ChunkState::Read(chunk) => {
                for key in keys {
                    chunk.rows.remove(key);
                }
            }
        }
    }

    fn drop_all(&mut self) {
        match self {
            ChunkState::Reading { cleared, .. } => *cleared = true,
            ChunkState::Read(chunk) => chunk.rows.clear(),
        }
    }
}

/// The daemon's backfills: a queue of tables, one chunk read at a time and up to
/// [`CHUNKS_IN_FLIGHT`] waiting for their watermarks.
pub struct Backfills {
    client: Arc<Client>,
    key_prefix: String,
    chunk_rows: usize,
    /// Distinguishes this session's watermarks from those of earlier sessions, which the
    /// stream may still bring.
    session: String,
    seq: u64,
    rules: HashMap<String, Arc<TableRule>>,
    plans: HashMap<String, Arc<TablePlan>>,
    queue: VecDeque<Job>,
    /// Chunks being read or waiting for their watermarks, oldest first. They are read one
    /// at a time, so their windows follow one another in the WAL (low 1, high 1, low 2,
    /// high 2) and at most one is open at a time.
    in_flight: VecDeque<InFlight>,
    progress: Progress,
    meta: Vec<(String, String)>,
}

impl Backfills {
    /// `client` is a connection of the backfill's own (it emits watermarks and reads chunks).
    pub fn new(client: Client, config: &Config) -> Backfills {
        let rules = config
            .tables
            .iter()
            .filter(|rule| rule.mode == Mode::Mirror)
            .map(|rule| (rule.qualified_name(), Arc::new(rule.clone())))
            .collect();
        Backfills {
            client: Arc::new(client),
            key_prefix: config.redis.key_prefix.clone(),
            chunk_rows: config.backfill.chunk_rows,
            session: format!("{:08x}", rand::random::<u32>()),
            seq: 0,
            rules,
            plans: HashMap::new(),
            queue: VecDeque::new(),
            in_flight: VecDeque::new(),
            progress: Progress::new(),
            meta: Vec::new(),
        }
    }

    /// Stops backfilling a table (it is not set up right).
    pub fn remove_table(&mut self, table: &str) {
        self.rules.remove(table);
        self.queue.retain(|job| job.table != table);
    }

    /// Qualified names of the tables backfills cover (mirror tables).
    pub fn tables(&self) -> impl Iterator<Item = &str> {
        self.rules.keys().map(String::as_str)
    }

    /// Queues `table` from the start, or from where `resume` left it.
    pub fn schedule(&mut self, table: &str, resume: Option<&BackfillProgress>) {
        if !self.rules.contains_key(table) {
            return;
        }
        let job = match resume {
            Some(p) if p.state == "running" => Job {
                table: table.to_string(),
                cursor: p.cursor.clone(),
                rows: p.rows,
                started_ms: p.started_ms,
            },
            _ => Job {
                table: table.to_string(),
                cursor: None,
                rows: 0,
                started_ms: now_ms(),
            },
        };
        if job.cursor.is_none() {
            // From the start: the table may have changed shape since its plan was made, and
            // the restart must survive a crash of the daemon, so it goes in the checkpoint.
            self.plans.remove(table);
            let progress = BackfillProgress {
                state: "running".into(),
                cursor: None,
                rows: 0,
                estimate: 0,
                started_ms: job.started_ms,
                updated_ms: job.started_ms,
            };
            self.meta.push((
                format!("{FIELD_BACKFILL_PREFIX}{table}"),
                serde_json::to_string(&progress).unwrap_or_default(),
            ));
        }
        match self.queue.iter_mut().find(|queued| queued.table == table) {
            Some(queued) => *queued = job,
            None => self.queue.push_back(job),
        }
    }

    /// Checkpoint fields to write with the next batch (restarted backfills).
    pub fn take_meta(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.meta)
    }

    /// `pgcache resync`: every mirror table, or one (unknown names are logged).
    pub fn resync(&mut self, table: Option<&str>) {
        match table {
            None => {
                let mut tables: Vec<String> = self.rules.keys().cloned().collect();
                tables.sort();
                info!(
                    tables = tables.len(),
                    "resync of every mirror table requested"
                );
                for table in tables {
                    self.schedule(&table, None);
                }
            }
            Some(table) => {
                let name = if table.contains('.') {
                    table.to_string()
                } else {
                    format!("public.{table}")
                };
                if self.rules.contains_key(&name) {
                    info!(table = %name, "resync requested");
                    self.schedule(&name, None);
                } else {
                    warn!(table = %name, "resync requested for a table that is not a mirror table in this daemon's config; ignored");
                }
            }
        }
    }

    /// A chunk can start: a table is waiting, no chunk is being read, and fewer than
    /// [`CHUNKS_IN_FLIGHT`] chunks wait for their watermarks (reading the next chunk overlaps
    /// writing the last one).
    pub fn can_start(&self) -> bool {
        self.in_flight.len() < CHUNKS_IN_FLIGHT && !self.queue.is_empty() && !self.reading()
    }

    /// Starts the next chunk of the first waiting table: a task emits the low watermark,
    /// reads the chunk and emits the high watermark, while the stream goes on. The stream
    /// brings the watermarks back ([`Backfills::on_low`], [`Backfills::on_high`]); the
    /// read's end is [`Backfills::read_finished`].
    ///
    /// # Errors
    /// The table's plan cannot be made for a reason of the connection's (a table's own
    /// fault is logged and the table dropped from the queue).
    pub async fn start_next(&mut self) -> Result<(), BackfillError> {
        let Some(job) = self.queue.pop_front() else {
            return Ok(());
        };
        let plan = match self.plans.get(&job.table) {
            Some(plan) => plan.clone(),
            None => {
                let rule = self.rules[&job.table].clone();
                match TablePlan::new(&self.client, rule, &self.key_prefix).await {
                    Ok(plan) => {
                        let plan = Arc::new(plan);
                        self.plans.insert(job.table.clone(), plan.clone());
                        plan
                    }
                    Err(e @ BackfillError::Table { .. }) => {
                        tracing::error!(error = %e, "backfill skipped");
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
        let task = tokio::spawn(read_between_watermarks(
            self.client.clone(),
            plan.clone(),
            id.clone(),
            job.cursor.clone(),
            self.chunk_rows,
        ));
        self.in_flight.push_back(InFlight {
            id,
            job,
            plan,
            chunk: ChunkState::Reading {
                task,
                dropped: Vec::new(),
                cleared: false,
            },
            window_open: false,
        });
        Ok(())
    }

    /// A chunk is being read.
    pub fn reading(&self) -> bool {
        self.in_flight
            .iter()
            .any(|c| matches!(c.chunk, ChunkState::Reading { .. }))
    }

    /// Resolves when the chunk being read is read (pending while none is). Cancel safe:
    /// the read goes on in its task. Hand the result to [`Backfills::on_read`].
    pub async fn read_finished(&mut self) -> Result<Chunk, BackfillError> {
        let reading = self.in_flight.iter_mut().find_map(|c| match &mut c.chunk {
            ChunkState::Reading { task, .. } => Some(task),
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

    /// Takes the chunk that was being read: drops what the stream changed meanwhile and
    /// queues the table's next chunk.
    ///
    /// # Errors
    /// The read failed for a reason of the connection's: the chunk will be read again.
    pub fn on_read(&mut self, result: Result<Chunk, BackfillError>) -> Result<(), BackfillError> {
        let Some(at) = self
            .in_flight
            .iter()
            .position(|c| matches!(c.chunk, ChunkState::Reading { .. }))
        else {
            return Ok(());
        };
        match result {
            Ok(mut chunk) => {
                let entry = &mut self.in_flight[at];
                if let ChunkState::Reading {
                    dropped, cleared, ..
                } = &entry.chunk
                {
                    if *cleared {
                        chunk.rows.clear();
                    }
                    for key in dropped {
                        chunk.rows.remove(key);
                    }
                }
                let job = &mut entry.job;
                job.rows += chunk.read as u64;
                if chunk.cursor.is_some() {
                    job.cursor = chunk.cursor.clone();
                }
                let next = (!chunk.last).then(|| job.clone());
                entry.chunk = ChunkState::Read(chunk);
                if let Some(next) = next {
                    if !self.queue.iter().any(|queued| queued.table == next.table) {
                        // The next chunk of this table can be read before this one is written.
                        self.queue.push_front(next);
                    }
                }
                Ok(())
            }
            Err(e) => {
                let Some(entry) = self.in_flight.remove(at) else {
                    return Ok(());
                };
                if e.is_schema_error() {
                    // The table changed under the plan (a column dropped, say). The stream's
                    // Relation message decides what happens to the table; a later resync or
                    // reshape starts over with a fresh plan.
                    self.plans.remove(&entry.job.table);
                    tracing::error!(error = %e, "backfill chunk failed; the table's backfill stops");
                    Ok(())
                } else {
                    self.queue.push_front(entry.job);
                    Err(e)
                }
            }
        }
    }

    /// A low watermark of ours opens its chunk's window.
    pub fn on_low(&mut self, id: &str) {
        if let Some(chunk) = self.in_flight.iter_mut().find(|c| c.id == id) {
            chunk.window_open = true;
        }
    }

    /// Key space of the table whose chunk window is open, if any.
    pub fn window_key_space(&self) -> Option<String> {
        let open = self.in_flight.iter().find(|c| c.window_open)?;
        Some(format!(
            "{}{}",
            self.key_prefix,
            open.plan.rule.key.literal_prefix()
        ))
    }

    /// The stream changed these keys inside the window: its values win.
    pub fn drop_keys<'a>(&mut self, keys: impl Iterator<Item = &'a str>) {
        if let Some(open) = self.in_flight.iter_mut().find(|c| c.window_open) {
            open.chunk.drop_keys(keys);
        }
    }

    /// The table was truncated inside the window: nothing of the chunk survives.
    pub fn drop_all(&mut self) {
        if let Some(open) = self.in_flight.iter_mut().find(|c| c.window_open) {
            open.chunk.drop_all();
        }
    }

    /// A high watermark of ours closes the window: returns the chunk's operations and the
    /// checkpoint field (progress and cursor) to write with them, and queues the rest of the
    /// table. The task emits the high watermark after the read, so if the stream brings it
    /// before the read's end was taken, the read is done or about to be: it is awaited here.
    ///
    /// # Errors
    /// The read failed for a reason of the connection's.
    pub async fn on_high(
        &mut self,
        id: &str,
    ) -> Result<Option<(Vec<Op>, String, String)>, BackfillError> {
        let Some(at) = self.in_flight.iter().position(|c| c.id == id) else {
            return Ok(None);
        };
        if matches!(self.in_flight[at].chunk, ChunkState::Reading { .. }) {
            let result = self.read_finished().await;
            self.on_read(result)?;
        }
        let Some(at) = self.in_flight.iter().position(|c| c.id == id) else {
            // The read failed because of the table: nothing to write.
            return Ok(None);
        };
        let Some(InFlight {
            job,
            plan,
            chunk: ChunkState::Read(chunk),
            ..
        }) = self.in_flight.remove(at)
        else {
            return Ok(None);
        };
        let ttl_ms = plan.rule.ttl.map(|ttl| ttl.as_millis().max(1) as u64);
        let written = chunk.rows.len();
        let ops: Vec<Op> = chunk
            .rows
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
        metrics::counter!(m::BACKFILL_ROWS, "table" => job.table.clone()).increment(written as u64);
        let done = chunk.last;
        let progress = BackfillProgress {
            state: if done { "done" } else { "running" }.to_string(),
            cursor: job.cursor.clone(),
            rows: job.rows,
            estimate: plan.estimate.max(job.rows),
            started_ms: job.started_ms,
            updated_ms: now_ms(),
        };
        self.progress.report(&job.table, &progress, done);
        let field = format!("{FIELD_BACKFILL_PREFIX}{}", job.table);
        let restarted = self
            .queue
            .iter()
            .find(|queued| queued.table == job.table && queued.cursor.is_none());
        let value = match restarted {
            // A resync was asked for while this chunk was in flight: its rows are right, but
            // the stored progress must keep saying "from the start".
            Some(queued) => serde_json::to_string(&BackfillProgress {
                state: "running".into(),
                cursor: None,
                rows: 0,
                estimate: 0,
                started_ms: queued.started_ms,
                updated_ms: now_ms(),
            }),
            None => serde_json::to_string(&progress),
        }
        .unwrap_or_default();
        Ok(Some((ops, field, value)))
    }
}

impl Drop for Backfills {
    fn drop(&mut self) {
        for entry in &self.in_flight {
            if let ChunkState::Reading { task, .. } = &entry.chunk {
                task.abort();
            }
        }
    }
}

/// A chunk's read, in a task of its own: the low watermark, the rows, the high watermark.
async fn read_between_watermarks(
    client: Arc<Client>,
    plan: Arc<TablePlan>,
    id: String,
    cursor: Option<Vec<String>>,
    limit: usize,
) -> Result<Chunk, BackfillError> {
    let pg = |source| BackfillError::Postgres {
        table: plan.rule.qualified_name(),
        source,
    };
    emit_watermark(&client, &Control::Low(id.clone()))
        .await
        .map_err(pg)?;
    let chunk = plan.read_chunk(&client, cursor.as_deref(), limit).await?;
    emit_watermark(&client, &Control::High(id))
        .await
        .map_err(pg)?;
    Ok(chunk)
}

/// Chunks read ahead of the stream: two lets Postgres read the next chunk while Redis
/// writes the last one, and bounds memory at two chunks.
const CHUNKS_IN_FLIGHT: usize = 2;

/// Progress on a terminal (a bar) or in the log (a line every few seconds).
struct Progress {
    bar: Option<(String, indicatif::ProgressBar)>,
    tty: bool,
    last_line: Instant,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            bar: None,
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            last_line: Instant::now(),
        }
    }

    fn report(&mut self, table: &str, p: &BackfillProgress, done: bool) {
        let elapsed = Duration::from_millis(p.updated_ms.saturating_sub(p.started_ms).max(1));
        let rate = p.rows as f64 / elapsed.as_secs_f64();
        if self.tty {
            if self.bar.as_ref().is_none_or(|(t, _)| t != table) {
                let bar = indicatif::ProgressBar::new(p.estimate.max(1));
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "backfill {msg} [{bar:30}] {pos}/{len} rows {per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar.set_message(table.to_string());
                self.bar = Some((table.to_string(), bar));
            }
            if let Some((_, bar)) = &self.bar {
                bar.set_length(p.estimate.max(p.rows));
                bar.set_position(p.rows);
                if done {
                    bar.finish();
                }
            }
        }
        if done || self.last_line.elapsed() >= Duration::from_secs(5) {
            self.last_line = Instant::now();
            let left = p.estimate.saturating_sub(p.rows);
            let eta = if rate > 0.0 {
                Duration::from_secs_f64(left as f64 / rate)
            } else {
                Duration::ZERO
            };
            info!(
                table,
                rows = p.rows,
                estimate = p.estimate,
                rows_per_sec = rate.round() as u64,
                eta = %humantime::format_duration(Duration::from_secs(eta.as_secs())),
                done,
                "backfill progress"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip() {
        for control in [
            Control::Low("a1:public.users:3".into()),
            Control::High("x".into()),
            Control::Resync(None),
            Control::Resync(Some("public.users".into())),
        ] {
            assert_eq!(Control::parse(control.encode().as_bytes()), Some(control));
        }
        assert_eq!(Control::parse(b"bogus"), None);
        assert_eq!(Control::parse(b"other:1"), None);
        assert_eq!(Control::parse(&[0xff, b':']), None);
    }

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(literal("o'k\\"), "E'o''k\\\\'");
    }
}
