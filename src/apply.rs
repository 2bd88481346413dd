//! Redis apply: row changes become Redis operations, and a batch of operations becomes one
//! `MULTI … EXEC` together with the checkpoint.
//!
//! The mapping from a change to operations is pure ([`Batch::insert`], [`Batch::update`],
//! [`Batch::delete`]) and unit-tested without a server; [`Batch::flush`] is the only I/O.
//!
//! Contract: the stream is at-least-once, so every operation here is idempotent when replayed
//! in order (SET, DEL, and pattern deletes). Every operation on a row key also deletes that
//! key's lease, so a read helper that read the row before this change cannot fill it (G4).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;

use crate::config::{Format, Mode};
use crate::encoder::{self, EncodeError};
use crate::pgoutput::{OldTuple, Tuple, TupleData};
use crate::relations::TableState;
use crate::template::lease_key;
use crate::{checkpoint, Lsn};

/// One Redis operation on behalf of one row change.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `SET key value [PX ttl]` for a backfilled row. It revokes no lease: a fill that could
    /// be older than the backfill's read can only exist if the row changed meanwhile, and
    /// that change, applied by the stream, revokes the lease itself.
    Fill {
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    },
    /// `SET key value [PX ttl]` (mode mirror).
    Set {
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    },
    /// `SET key value XX KEEPTTL` (mode refresh: only keys already cached).
    SetIfCached { key: String, value: Vec<u8> },
    /// Replace a hash: `DEL key` + `HSET key f v …` [+ `PEXPIRE`], or, with
    /// `only_if_cached`, the same only when the key exists, keeping its TTL.
    Hash {
        key: String,
        fields: Vec<(String, Vec<u8>)>,
        ttl_ms: Option<u64>,
        only_if_cached: bool,
    },
    /// `DEL key`.
    Del { key: String },
    /// Every key (and lease) whose name starts with `key_space` (TRUNCATE).
    DropKeySpace { key_space: String },
}

impl Op {
    fn key(&self) -> Option<&str> {
        match self {
            Op::Set { key, .. }
            | Op::Fill { key, .. }
            | Op::SetIfCached { key, .. }
            | Op::Hash { key, .. }
            | Op::Del { key } => Some(key),
            Op::DropKeySpace { .. } => None,
        }
    }
}

/// Why a change could not be turned into a value; the key is deleted instead (absence is safe).
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("{table}: key column {column:?} is NULL or was not sent, so the row has no key{hint}")]
    NoKey {
        table: String,
        column: String,
        hint: &'static str,
    },
    #[error("{table}: {source}")]
    Encode { table: String, source: EncodeError },
}

/// The result of mapping an update whose unchanged TOASTed columns were not sent.
pub enum Merge {
    /// Nothing more to do.
    Done,
    /// The new value needs the cached value of `key` for the columns marked unchanged: the
    /// caller fetches it (looking at this batch first, see [`Batch::pending_value`]) and calls
    /// [`Batch::merge`].
    NeedsCached { key: String },
}

/// Operations waiting for the next `EXEC`, with the transaction boundaries inside them.
#[derive(Default)]
pub struct Batch {
    ops: Vec<Op>,
    /// `ops[..committed]` belong to transactions whose Commit has been seen.
    committed: usize,
    /// End LSN of the last committed transaction in the batch.
    commit_end: Option<Lsn>,
    /// Commit times (µs since 2000-01-01) of the transactions in the batch, for latency.
    commit_times: Vec<i64>,
    transactions: usize,
    /// Extra checkpoint fields (backfill progress) to write with the committed operations.
    meta: Vec<(String, String)>,
    /// Capacity for the next encoded value.
    value_size_hint: usize,
}

/// What a flush applied, for progress and metrics.
#[derive(Debug, Clone, Default)]
pub struct Flushed {
    pub ops: usize,
    pub transactions: usize,
    /// The checkpoint written with it, if a commit was included.
    pub checkpoint: Option<Lsn>,
    pub commit_times: Vec<i64>,
    /// Whether an `EXEC` was sent at all.
    pub wrote: bool,
    /// The checkpoint's epoch as the `EXEC` found it (`None`: Redis lost its data).
    pub epoch: Option<String>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Operations of the transaction still open.
    pub fn open_len(&self) -> usize {
        self.ops.len() - self.committed
    }

    /// Committed transactions waiting to be flushed.
    pub fn has_committed(&self) -> bool {
        self.committed > 0 || self.commit_end.is_some() || !self.meta.is_empty()
    }

    /// Adds an operation outside any transaction (between transactions).
    pub fn push_committed(&mut self, op: Op) {
        debug_assert_eq!(self.open_len(), 0, "outside a transaction only");
        self.ops.push(op);
        self.committed = self.ops.len();
    }

    /// Marks the end of a transaction.
    pub fn commit(&mut self, end_lsn: Lsn, commit_time: i64) {
        self.committed = self.ops.len();
        self.commit_end = Some(end_lsn);
        self.commit_times.push(commit_time);
        self.transactions += 1;
    }

    /// Drops the operations of the open transaction (the stream broke inside it; it will be
    /// sent again).
    pub fn abandon_open(&mut self) {
        self.ops.truncate(self.committed);
    }

    pub fn insert(&mut self, table: &TableState, new: &Tuple) -> Result<(), ChangeError> {
        let key = self.row_key(table, new, "")?;
        self.write_row(table, key, new, None)
    }

    pub fn update(
        &mut self,
        table: &TableState,
        old: Option<&OldTuple>,
        new: &Tuple,
    ) -> Result<Merge, ChangeError> {
        let key = self.row_key(table, new, "")?;
        if let Some(old) = old {
            // Only key columns are sure to be in the old image; a key change moves the row.
            if let Ok(old_key) = self.row_key(table, old.tuple(), "") {
                if old_key != key {
                    self.ops.push(Op::Del { key: old_key });
                }
            }
        }
        let unchanged = table
            .positions
            .iter()
            .any(|&at| matches!(new.0.get(at), Some(TupleData::Unchanged)));
        if !unchanged || table.rule.mode == Mode::Invalidate {
            self.write_row(table, key, new, None)?;
            return Ok(Merge::Done);
        }
        // TOASTed columns that did not change were not sent. A FULL old image has them.
        if let Some(OldTuple::Full(old)) = old {
            let complete = table
                .positions
                .iter()
                .all(|&at| !matches!(old.0.get(at), Some(TupleData::Unchanged) | None));
            if complete {
                self.write_row(table, key, new, Some(old))?;
                return Ok(Merge::Done);
            }
        }
        if table.rule.format == Format::Hash {
            // Merging hashes would need a read-modify-write script; absence is safe.
            self.ops.push(Op::Del { key });
            return Ok(Merge::Done);
        }
        Ok(Merge::NeedsCached { key })
    }

    /// Completes an update that needed the cached value of its key (`cached` is `None` when
    /// the key is absent or its value cannot be used): merges or deletes.
    pub fn merge(
        &mut self,
        table: &TableState,
        key: String,
        new: &Tuple,
        cached: Option<&[u8]>,
    ) -> Result<(), ChangeError> {
        let parsed = cached.and_then(|bytes| {
            serde_json::from_slice::<std::collections::HashMap<String, Box<RawValue>>>(bytes).ok()
        });
        let Some(cached) = parsed else {
            self.ops.push(Op::Del { key });
            return Ok(());
        };
        let mut value = Vec::with_capacity(256);
        value.push(b'{');
        for (i, ((name, ty), &at)) in table.columns.iter().zip(&table.positions).enumerate() {
            if i > 0 {
                value.push(b',');
            }
            write_json_key(&mut value, name);
            match new.0.get(at) {
                Some(TupleData::Text(text)) | Some(TupleData::Binary(text)) => {
                    encoder::encode_value(&mut value, ty, text, table.rule.encode).map_err(
                        |source| ChangeError::Encode {
                            table: table.rule.qualified_name(),
                            source,
                        },
                    )?;
                }
                Some(TupleData::Null) | None => value.extend_from_slice(b"null"),
                Some(TupleData::Unchanged) => match cached.get(name.as_str()) {
                    Some(raw) => value.extend_from_slice(raw.get().as_bytes()),
                    None => {
                        self.ops.push(Op::Del { key });
                        return Ok(());
                    }
                },
            }
        }
        value.push(b'}');
        self.push_value(table, key, value);
        Ok(())
    }

    pub fn delete(&mut self, table: &TableState, old: &OldTuple) -> Result<(), ChangeError> {
        let hint = match old {
            OldTuple::Key(_) => {
                " (the key template uses a column outside the replica identity: \
                 run ALTER TABLE ... REPLICA IDENTITY FULL)"
            }
            OldTuple::Full(_) => "",
        };
        let key = self.row_key(table, old.tuple(), hint)?;
        self.ops.push(Op::Del { key });
        Ok(())
    }

    /// TRUNCATE: every key of the table goes, in stream order.
    pub fn truncate(&mut self, table: &TableState) {
        self.ops.push(Op::DropKeySpace {
            key_space: table.key_space.clone(),
        });
    }

    /// Deletes a key whose new value could not be built (absence is safe).
    pub fn delete_key(&mut self, key: String) {
        self.ops.push(Op::Del { key });
    }

    /// The value this batch will have left in `key`, if this batch touches it:
    /// `Some(Some(v))` a value, `Some(None)` absent or unknown, `None` not touched.
    pub fn pending_value(&self, key: &str) -> Option<Option<&[u8]>> {
        for op in self.ops.iter().rev() {
            match op {
                Op::Set { key: k, value, .. } | Op::Fill { key: k, value, .. } if k == key => {
                    return Some(Some(value))
                }
                Op::DropKeySpace { key_space } if key.starts_with(key_space.as_str()) => {
                    return Some(None)
                }
                op if op.key() == Some(key) => return Some(None),
                _ => {}
            }
        }
        None
    }

    fn row_key(
        &self,
        table: &TableState,
        tuple: &Tuple,
        hint: &'static str,
    ) -> Result<String, ChangeError> {
        let mut values: Vec<&[u8]> = Vec::with_capacity(table.key_positions.len());
        for (i, &at) in table.key_positions.iter().enumerate() {
            match tuple.0.get(at) {
                Some(TupleData::Text(v)) | Some(TupleData::Binary(v)) => values.push(v),
                _ => {
                    return Err(ChangeError::NoKey {
                        table: table.rule.qualified_name(),
                        column: table.rule.key.columns()[i].clone(),
                        hint,
                    })
                }
            }
        }
        let mut key = String::with_capacity(table.key_space.len() + 16);
        table
            .rule
            .key
            .render_into(&mut key, self.key_prefix(table), &values);
        Ok(key)
    }

    fn key_prefix<'t>(&self, table: &'t TableState) -> &'t str {
        let literal = table.rule.key.literal_prefix();
        &table.key_space[..table.key_space.len() - literal.len()]
    }

    /// Writes the row's value under `key` per the table's mode and format; columns marked
    /// unchanged are taken from `fallback` (a FULL old image).
    fn write_row(
        &mut self,
        table: &TableState,
        key: String,
        new: &Tuple,
        fallback: Option<&Tuple>,
    ) -> Result<(), ChangeError> {
        if table.rule.mode == Mode::Invalidate {
            self.ops.push(Op::Del { key });
            return Ok(());
        }
        let value_at = |at: usize| -> Option<&[u8]> {
            match new.0.get(at) {
                Some(TupleData::Text(v)) | Some(TupleData::Binary(v)) => Some(&v[..]),
                Some(TupleData::Unchanged) => match fallback.and_then(|old| old.0.get(at)) {
                    Some(TupleData::Text(v)) | Some(TupleData::Binary(v)) => Some(&v[..]),
                    _ => None,
                },
                _ => None,
            }
        };
        let encoded = match table.rule.format {
            Format::Json => {
                // Sized like the last value, so most rows encode without regrowing.
                let mut value = Vec::with_capacity(self.value_size_hint);
                encoder::encode_row(
                    &mut value,
                    &table.columns,
                    table.positions.iter().map(|&at| value_at(at)),
                    table.rule.encode,
                )
                .map(|()| {
                    self.value_size_hint = value.len().next_power_of_two();
                    Encoded::Json(value)
                })
            }
            Format::Hash => {
                let mut fields = Vec::with_capacity(table.columns.len());
                let mut result = Ok(());
                for ((name, ty), &at) in table.columns.iter().zip(&table.positions) {
                    if let Some(text) = value_at(at) {
                        let mut field = Vec::with_capacity(text.len());
                        if let Err(e) =
                            encoder::encode_field(&mut field, ty, text, table.rule.encode)
                        {
                            result = Err(e);
                            break;
                        }
                        fields.push((name.clone(), field));
                    }
                }
                result.map(|()| Encoded::Hash(fields))
            }
        };
        match encoded {
            Ok(Encoded::Json(value)) => {
                self.push_value(table, key, value);
                Ok(())
            }
            Ok(Encoded::Hash(fields)) => {
                self.ops.push(Op::Hash {
                    key,
                    fields,
                    ttl_ms: ttl_ms(table),
                    only_if_cached: table.rule.mode == Mode::Refresh,
                });
                Ok(())
            }
            Err(source) => {
                self.ops.push(Op::Del { key });
                Err(ChangeError::Encode {
                    table: table.rule.qualified_name(),
                    source,
                })
            }
        }
    }

    fn push_value(&mut self, table: &TableState, key: String, value: Vec<u8>) {
        self.ops.push(match table.rule.mode {
            Mode::Refresh => Op::SetIfCached { key, value },
            _ => Op::Set {
                key,
                value,
                ttl_ms: ttl_ms(table),
            },
        });
    }

    /// Takes the committed part of the batch, or all of it when `include_open` (a transaction
    /// too large to hold), as one `MULTI … EXEC` pipeline. The checkpoint goes in the same
    /// `EXEC` when it ends at a commit; the `EXEC` also reads back the checkpoint's epoch (see
    /// [`checkpoint::FIELD_EPOCH`]). `None` when there is nothing to write. The caller runs
    /// the pipeline; if that fails it must reconnect and replay from the checkpoint, since the
    /// operations are no longer here.
    pub fn prepare(
        &mut self,
        checkpoint_key: &str,
        include_open: bool,
    ) -> Option<(redis::Pipeline, Flushed)> {
        let upto = if include_open {
            self.ops.len()
        } else {
            self.committed
        };
        let checkpoint = if upto == self.committed {
            self.commit_end
        } else {
            None
        };
        if upto == 0 && checkpoint.is_none() && self.meta.is_empty() {
            return None;
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        // Read back inside the EXEC: if the epoch is gone, Redis lost its data (FLUSHALL, a
        // restart without persistence) and the daemon must backfill.
        pipe.cmd("HGET")
            .arg(checkpoint_key)
            .arg(checkpoint::FIELD_EPOCH);
        add_ops(&mut pipe, &self.ops[..upto]);
        checkpoint::write(&mut pipe, checkpoint_key, checkpoint, &self.meta, now_ms());
        self.ops.drain(..upto);
        self.meta.clear();
        let flushed = Flushed {
            ops: upto,
            transactions: self.transactions,
            checkpoint,
            commit_times: std::mem::take(&mut self.commit_times),
            wrote: true,
            epoch: None,
        };
        self.committed = 0;
        self.transactions = 0;
        if checkpoint.is_some() {
            self.commit_end = None;
        }
        Some((pipe, flushed))
    }

    /// [`Batch::prepare`] and run it.
    pub async fn flush(
        &mut self,
        conn: &mut impl redis::aio::ConnectionLike,
        checkpoint_key: &str,
        include_open: bool,
    ) -> Result<Flushed, redis::RedisError> {
        let Some((pipe, mut flushed)) = self.prepare(checkpoint_key, include_open) else {
            return Ok(Flushed::default());
        };
        let (epoch,): (Option<String>,) = pipe.query_async(conn).await?;
        flushed.epoch = epoch;
        Ok(flushed)
    }

    /// Adds rows read by a backfill (outside any transaction: the stream is between
    /// transactions when a watermark arrives) and a checkpoint field written with them.
    pub fn push_backfill(
        &mut self,
        ops: impl IntoIterator<Item = Op>,
        field: String,
        value: String,
    ) {
        debug_assert_eq!(self.open_len(), 0, "backfill rows inside a transaction");
        self.ops.extend(ops);
        self.committed = self.ops.len();
        self.meta.push((field, value));
    }

    /// A checkpoint field to write with the next flush.
    pub fn push_meta(&mut self, field: String, value: String) {
        self.meta.push((field, value));
    }

    /// Keys of the operations from index `from` on (to drop them from a backfill chunk).
    pub fn keys_since(&self, from: usize) -> impl Iterator<Item = &str> {
        self.ops[from.min(self.ops.len())..]
            .iter()
            .filter_map(Op::key)
    }

    /// Whether operations from index `from` on drop `key_space` (a TRUNCATE of its table).
    pub fn truncated_since(&self, from: usize, key_space: &str) -> bool {
        self.ops[from.min(self.ops.len())..]
            .iter()
            .any(|op| matches!(op, Op::DropKeySpace { key_space: k } if k == key_space))
    }

    /// Drops every key of a table (its rule no longer fits: absence is safe, stale is not).
    pub fn drop_key_space(&mut self, key_space: String) {
        self.ops.push(Op::DropKeySpace { key_space });
    }
}

/// A row's value in its table's format.
enum Encoded {
    Json(Vec<u8>),
    Hash(Vec<(String, Vec<u8>)>),
}

/// Deletes every key with a prefix, and the leases of those keys, inside the `EXEC`, so it is
/// ordered with the writes around it. Blocks Redis while it scans; TRUNCATE is rare.
const DROP_KEY_SPACE: &str = r"
local deleted = 0
for _, pattern in ipairs(ARGV) do
  local cursor = '0'
  repeat
    local reply = redis.call('SCAN', cursor, 'MATCH', pattern, 'COUNT', 1000)
    cursor = reply[1]
    if #reply[2] > 0 then
      deleted = deleted + redis.call('UNLINK', unpack(reply[2]))
    end
  until cursor == '0'
end
return deleted
";

/// Replaces a hash only if it exists, keeping its TTL.
const REPLACE_HASH_IF_CACHED: &str = r"
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV))
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
";

/// Most values pairs one `MSET` carries.
const MSET_PAIRS: usize = 1_000;

/// Appends the operations to the pipeline. Runs of plain writes (no TTL) become one `MSET`
/// and one `DEL` of their leases: inside the `EXEC` nothing sees the order within a run, and
/// the last write of a key still wins, so the result is the same as one `SET` and one `DEL`
/// each, with a fraction of the commands and replies.
fn add_ops(pipe: &mut redis::Pipeline, ops: &[Op]) {
    let plain = |op: &Op| {
        matches!(
            op,
            Op::Set { ttl_ms: None, .. } | Op::Fill { ttl_ms: None, .. }
        )
    };
    let mut at = 0;
    while at < ops.len() {
        if !plain(&ops[at]) {
            add_op(pipe, &ops[at]);
            at += 1;
            continue;
        }
        let run = ops[at..]
            .iter()
            .take(MSET_PAIRS)
            .take_while(|op| plain(op))
            .count();
        let mset = pipe.cmd("MSET");
        for op in &ops[at..at + run] {
            if let Op::Set { key, value, .. } | Op::Fill { key, value, .. } = op {
                mset.arg(key).arg(value);
            }
        }
        mset.ignore();
        let mut leases = redis::cmd("DEL");
        let mut any = false;
        for op in &ops[at..at + run] {
            if let Op::Set { key, .. } = op {
                leases.arg(lease_key(key));
                any = true;
            }
        }
        if any {
            pipe.add_command(leases).ignore();
        }
        at += run;
    }
}

fn add_op(pipe: &mut redis::Pipeline, op: &Op) {
    match op {
        Op::Set { key, value, ttl_ms } | Op::Fill { key, value, ttl_ms } => {
            let cmd = pipe.cmd("SET").arg(key).arg(value);
            if let Some(ms) = ttl_ms {
                cmd.arg("PX").arg(*ms);
            }
            cmd.ignore();
        }
        Op::SetIfCached { key, value } => {
            pipe.cmd("SET")
                .arg(key)
                .arg(value)
                .arg("XX")
                .arg("KEEPTTL")
                .ignore();
        }
        Op::Hash {
            key,
            fields,
            ttl_ms,
            only_if_cached,
        } => {
            if *only_if_cached {
                let cmd = pipe.cmd("EVAL").arg(REPLACE_HASH_IF_CACHED).arg(1).arg(key);
                for (field, value) in fields {
                    cmd.arg(field).arg(value);
                }
                cmd.ignore();
            } else {
                pipe.cmd("DEL").arg(key).ignore();
                if !fields.is_empty() {
                    let cmd = pipe.cmd("HSET").arg(key);
                    for (field, value) in fields {
                        cmd.arg(field).arg(value);
                    }
                    cmd.ignore();
                    if let Some(ms) = ttl_ms {
                        pipe.cmd("PEXPIRE").arg(key).arg(*ms).ignore();
                    }
                }
            }
        }
        Op::Del { key } => {
            pipe.cmd("DEL").arg(key).ignore();
        }
        Op::DropKeySpace { key_space } => {
            let escaped = glob_escape(key_space);
            pipe.cmd("EVAL")
                .arg(DROP_KEY_SPACE)
                .arg(0)
                .arg(format!("{escaped}*"))
                .arg(format!("{{{escaped}*"))
                .ignore();
            return;
        }
    }
    if let (Some(key), false) = (op.key(), matches!(op, Op::Fill { .. })) {
        // Revoke any lease: a fill that read the row before this change must lose (G4).
        pipe.cmd("DEL").arg(lease_key(key)).ignore();
    }
}

fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn write_json_key(out: &mut Vec<u8>, name: &str) {
    // serde_json's string escaping, so merged values are byte-identical to fresh ones.
    serde_json::to_writer(&mut *out, name).expect("writing to a Vec cannot fail");
    out.push(b':');
}

fn ttl_ms(table: &TableState) -> Option<u64> {
    table.rule.ttl.map(|ttl| ttl.as_millis().max(1) as u64)
}

/// Wall clock in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Shared handle to a table's state, as the daemon keeps it.
pub type Table = Arc<TableState>;
