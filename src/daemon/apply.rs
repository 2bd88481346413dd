//! Redis apply: row changes become Redis operations ([`Op`]), and a batch of them becomes one
//! atomic script together with the checkpoint ([`script`]).
//!
//! The mapping from a change to operations is pure ([`Batch::insert`], [`Batch::update`],
//! [`Batch::delete`], [`Batch::truncate`]) and tested without a server (`apply/tests.rs`).
//!
//! Contract:
//! - The stream is at-least-once, so every operation is idempotent when replayed in order.
//! - Every operation on a row key also deletes that key's lease, so a read helper that read
//!   the row before this change cannot fill it (G4). Backfilled rows ([`Op::Fill`]) do not:
//!   a fill that could be older than the backfill's read exists only if the row changed
//!   meanwhile, and that change, applied by the stream, revokes the lease itself.
//! - Absence is always safe: when a correct value cannot be built (a value that cannot be
//!   encoded or is too large, an update whose unchanged TOASTed columns have no cached value
//!   to merge into), the key is deleted, never left old. A `mirror` key deleted for want of
//!   a merge base is reported back ([`script::Applied::repairs`]) and read again through the
//!   backfill, so nothing ends absent for good.

use crate::config::{Format, Mode};
use crate::daemon::pgoutput::{OldTuple, Tuple, TupleData};
use crate::daemon::relations::TableState;
use crate::encoder::{self, EncodeError};
use crate::Lsn;

pub mod node_write;
pub mod script;
pub mod slot_write;
pub mod slots;
#[cfg(test)]
mod tests;

/// One Redis operation on behalf of one row change.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `SET key value [PX ttl]` for a backfilled row; revokes no lease (see the contract).
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
    /// Every key matching one of these `SCAN MATCH` patterns: a table's invalidation keys
    /// (and their leases) when the rows to render them from are not at hand (TRUNCATE, a
    /// table stopped, Redis lost data). Absence is safe.
    DropMatching { patterns: Vec<String> },
    /// An update whose unchanged TOASTed columns were not sent: the new value takes them
    /// from the value under `base` (the old key when the key changed), in Redis, in stream
    /// order. Without a usable base the key is deleted.
    Merge(Box<Merge>),
}

/// See [`Op::Merge`].
#[derive(Debug, Clone, PartialEq)]
pub struct Merge {
    pub key: String,
    pub base: String,
    pub format: Format,
    /// Each column: for JSON its name with its quotes, for hashes its field name.
    pub columns: Vec<(Vec<u8>, MergeValue)>,
    pub ttl_ms: Option<u64>,
    /// Refresh mode: only a cached key is updated, and a missing base is not an error.
    pub only_if_cached: bool,
    /// Mirror mode: how to read the row again when the base is missing.
    pub repair: Option<Repair>,
    /// The cached value may be in an older shape (the table is being written again after
    /// its columns changed): it is not merged into; the key is deleted and read again.
    pub stale_base: bool,
}

/// A column's part in a [`Merge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeValue {
    /// The new value, encoded (JSON text, or a hash field's text).
    Value(Vec<u8>),
    /// NULL in a hash: the field goes (JSON writes `null` as a value).
    Null,
    /// An unchanged TOASTed column: taken from the base.
    Unchanged,
}

/// A row to read again from Postgres (its key was deleted for want of a merge base).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Repair {
    /// `schema.table`.
    pub table: String,
    pub key: String,
    /// The key template's column values, as Postgres prints them.
    pub key_texts: Vec<String>,
}

impl Repair {
    /// As kept in the checkpoint (field `repair:<key>`) until the row is read again.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(text: &str) -> Option<Repair> {
        serde_json::from_str(text).ok()
    }
}

impl Op {
    /// The row key this operation writes or deletes.
    pub fn key(&self) -> Option<&str> {
        match self {
            Op::Set { key, .. }
            | Op::Fill { key, .. }
            | Op::SetIfCached { key, .. }
            | Op::Hash { key, .. }
            | Op::Del { key } => Some(key),
            Op::Merge(merge) => Some(&merge.key),
            Op::DropKeySpace { .. } | Op::DropMatching { .. } => None,
        }
    }

    /// Bytes this operation holds, roughly: what bounds a batch's memory.
    fn size(&self) -> usize {
        const OVERHEAD: usize = 48;
        OVERHEAD
            + match self {
                Op::Set { key, value, .. }
                | Op::Fill { key, value, .. }
                | Op::SetIfCached { key, value } => key.len() + value.len(),
                Op::Hash { key, fields, .. } => {
                    key.len()
                        + fields
                            .iter()
                            .map(|(f, v)| f.len() + v.len() + 16)
                            .sum::<usize>()
                }
                Op::Del { key } => key.len(),
                Op::DropKeySpace { key_space } => key_space.len(),
                Op::DropMatching { patterns } => patterns.iter().map(String::len).sum(),
                Op::Merge(m) => {
                    m.key.len()
                        + m.base.len()
                        + m.columns
                            .iter()
                            .map(|(n, v)| {
                                n.len()
                                    + match v {
                                        MergeValue::Value(v) => v.len(),
                                        _ => 0,
                                    }
                            })
                            .sum::<usize>()
                }
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
    #[error("{table}: {key}: {source}; the key is deleted")]
    Encode {
        table: String,
        key: String,
        source: EncodeError,
    },
    #[error("{table}: {key}: the value is {size} bytes, over Redis's limit of {limit} (proto-max-bulk-len); the key is deleted")]
    TooLarge {
        table: String,
        key: String,
        size: usize,
        limit: usize,
    },
}

impl ChangeError {
    /// The `kind` label of `pgcache_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ChangeError::NoKey { .. } => "no_key",
            ChangeError::Encode { .. } => "encode",
            ChangeError::TooLarge { .. } => "too_large",
        }
    }
}

/// Operations waiting for the next write, with the transaction boundaries inside them.
pub struct Batch {
    ops: Vec<Op>,
    /// `ops[..committed]` belong to transactions whose Commit has been seen.
    committed: usize,
    /// The position the next write moves the checkpoint to: the end of the last committed
    /// transaction, or a later position past which nothing is pending.
    position: Option<Lsn>,
    /// Commit times (µs since 2000-01-01) of the transactions in the batch, for latency.
    commit_times: Vec<i64>,
    transactions: usize,
    /// Committed transactions that have operations here: Redis may show them only once
    /// Postgres readers can see them.
    xids: Vec<u32>,
    /// The open transaction's id, and whether it has added operations.
    open_xid: Option<u32>,
    open_has_ops: bool,
    /// Checkpoint fields to write with the committed operations; those from
    /// `committed_fields` on were pushed while the open transaction was being read, and go
    /// with its operations, never ahead of them (a table's new shape or OID recorded before
    /// the drop or rebuild it calls for would, after a crash in between, hide the change
    /// from the next start).
    fields: Vec<(String, String)>,
    committed_fields: usize,
    /// Bytes held by `ops`, and by `ops[..committed]`.
    bytes: usize,
    committed_bytes: usize,
    /// Recovery after Redis lost data: values of transactions that may have been applied
    /// before are not written again (they could be older than what readers saw); their keys
    /// are deleted instead, and the backfill that follows writes the current rows.
    muted: bool,
    /// Redis refuses values larger than this (`proto-max-bulk-len`).
    max_value: usize,
    /// Capacity for the next encoded value.
    value_size_hint: usize,
    /// Set by the stream while the table of the change at hand is being backfilled: its
    /// cached values may still be in an older shape, so none is merged into.
    stale_bases: bool,
    /// On a Redis Cluster, each operation's change ([`ChangeTag`]), parallel to `ops`, and
    /// the tag of the change at hand.
    tags: Option<Vec<Option<ChangeTag>>>,
    tag: Option<ChangeTag>,
}

/// Which change of which transaction an operation comes from: on a Redis Cluster a hash
/// slot whose own checkpoint already covers it skips it (docs/cluster.md, "Applying a
/// batch").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeTag {
    /// The transaction's commit LSN (pgoutput's `Begin::final_lsn`).
    pub commit_lsn: Lsn,
    /// The change's rank in the transaction, from 1, in stream order.
    pub change: u64,
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            ops: Vec::new(),
            committed: 0,
            position: None,
            commit_times: Vec::new(),
            transactions: 0,
            xids: Vec::new(),
            open_xid: None,
            open_has_ops: false,
            fields: Vec::new(),
            committed_fields: 0,
            bytes: 0,
            committed_bytes: 0,
            muted: false,
            max_value: DEFAULT_MAX_VALUE,
            value_size_hint: 0,
            stale_bases: false,
            tags: None,
            tag: None,
        }
    }
}

/// Redis's default `proto-max-bulk-len`.
pub const DEFAULT_MAX_VALUE: usize = 512 * 1024 * 1024;

/// What a write carries besides its operations, for the checkpoint, metrics and the
/// visibility wait.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub ops: Vec<Op>,
    /// The checkpoint position written with it, if it moves.
    pub position: Option<Lsn>,
    /// Checkpoint fields written with it.
    pub fields: Vec<(String, String)>,
    pub transactions: usize,
    pub commit_times: Vec<i64>,
    /// Transactions that must be visible to Postgres readers before this is written.
    pub xids: Vec<u32>,
    /// On a Redis Cluster: each operation's change, parallel to `ops` (empty otherwise).
    pub tags: Vec<Option<ChangeTag>>,
}

impl Batch {
    /// Values larger than `max_value` bytes are not written (their key is deleted).
    pub fn with_max_value(max_value: usize) -> Batch {
        Batch {
            max_value,
            ..Batch::default()
        }
    }

    /// Records each operation's change from now on (a Redis Cluster: see [`ChangeTag`]).
    /// Operations already in the batch (a refused table's key drop, queued at the start)
    /// come from no change a slot could skip.
    pub fn tag_changes(&mut self) {
        let before = self.ops.len();
        self.tags.get_or_insert_with(|| vec![None; before]);
    }

    /// The change the next operations come from (`None`: none that a slot could skip).
    pub fn set_tag(&mut self, tag: Option<ChangeTag>) {
        self.tag = tag;
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Nothing at all waits to be written: no operation, no checkpoint field, no position.
    pub fn is_idle(&self) -> bool {
        self.ops.is_empty() && self.fields.is_empty() && self.position.is_none()
    }

    /// Bytes held by the operations.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Operations of the transaction still open, and their bytes.
    pub fn open_len(&self) -> usize {
        self.ops.len() - self.committed
    }

    pub fn open_bytes(&self) -> usize {
        self.bytes - self.committed_bytes
    }

    /// Something is ready to be written: committed operations, fields, or a new position.
    pub fn has_committed(&self) -> bool {
        self.committed > 0 || self.position.is_some() || self.committed_fields > 0
    }

    /// Transactions committed here whose visibility is not yet established.
    pub fn xids(&self) -> &[u32] {
        &self.xids
    }

    /// Recovery: from now on write no values, only deletes (see the `muted` field).
    /// While set, updates with unchanged TOASTed columns do not merge into the cached value
    /// (it may be in an older shape): the key is deleted and its row read again.
    pub fn set_stale_bases(&mut self, stale: bool) {
        self.stale_bases = stale;
    }

    pub fn set_muted(&mut self, muted: bool) {
        self.muted = muted;
    }

    /// Adds an operation outside any transaction (between transactions).
    pub fn push_committed(&mut self, op: Op) {
        debug_assert_eq!(self.open_len(), 0, "outside a transaction only");
        self.push(op);
        self.committed = self.ops.len();
        self.committed_bytes = self.bytes;
    }

    /// A transaction begins.
    pub fn begin(&mut self, xid: u32) {
        self.open_xid = Some(xid);
        self.open_has_ops = false;
    }

    /// Marks the end of a transaction.
    pub fn commit(&mut self, end_lsn: Lsn, commit_time: i64) {
        self.committed = self.ops.len();
        self.committed_bytes = self.bytes;
        self.committed_fields = self.fields.len();
        self.position = Some(self.position.map_or(end_lsn, |p| p.max(end_lsn)));
        self.commit_times.push(commit_time);
        self.transactions += 1;
        if let (Some(xid), true) = (self.open_xid.take(), self.open_has_ops) {
            self.xids.push(xid);
        }
        self.open_has_ops = false;
    }

    /// Nothing is pending below `lsn` any more (a keepalive while idle): the next write may
    /// move the checkpoint there.
    pub fn advance(&mut self, lsn: Lsn) {
        debug_assert_eq!(self.open_len(), 0, "outside a transaction only");
        self.position = Some(self.position.map_or(lsn, |p| p.max(lsn)));
    }

    /// A checkpoint field to write with the next write; inside a transaction, with the
    /// transaction's operations (or a write before them that carries all of them).
    pub fn push_field(&mut self, field: String, value: String) {
        self.fields.push((field, value));
        if self.open_xid.is_none() {
            self.committed_fields = self.fields.len();
        }
    }

    fn push(&mut self, op: Op) {
        if let Some(key) = op.key() {
            // Redis refuses a key over `proto-max-bulk-len` in any command (with its lease
            // key, a little longer), so no such key can exist: there is nothing to write or
            // delete, and sending it would break the connection for every table.
            if key.len() + crate::template::LEASE_SUFFIX.len() + 2 > self.max_value {
                tracing::warn!(
                    key = %String::from_utf8_lossy(&key.as_bytes()[..key.len().min(200)]),
                    bytes = key.len(),
                    limit = self.max_value,
                    "a key longer than Redis's proto-max-bulk-len: not written (its row cannot be cached)"
                );
                metrics::counter!(crate::metrics::ERRORS, "kind" => "key_too_large").increment(1);
                return;
            }
        }
        self.bytes += op.size();
        if self.open_xid.is_some() {
            self.open_has_ops = true;
        }
        self.ops.push(op);
        if let Some(tags) = &mut self.tags {
            tags.push(self.tag);
        }
        if self.open_xid.is_none() {
            // Between transactions (a session's start: a table reshaped or swapped while
            // the daemon was stopped): ready now, with the fields pushed beside it.
            self.committed = self.ops.len();
            self.committed_bytes = self.bytes;
        }
    }

    pub fn insert(&mut self, table: &TableState, new: &Tuple) -> Result<(), ChangeError> {
        let result = row_key(table, new, "").and_then(|key| self.write_row(table, key, new, None));
        self.invalidate(table, Some(new), None);
        result
    }

    /// An update: a key change deletes the old key; unchanged TOASTed columns that neither
    /// the new row nor a FULL old row carry are merged from the cached value in Redis.
    /// The invalidation keys of the new row and of the old one go.
    pub fn update(
        &mut self,
        table: &TableState,
        old: Option<&OldTuple>,
        new: &Tuple,
    ) -> Result<(), ChangeError> {
        let result = self.update_row(table, old, new);
        self.invalidate(table, Some(new), old.map(OldTuple::tuple));
        result
    }

    /// Deletes each invalidation key of the table rendered from `new` and from `old` (the
    /// `DEL` revokes its lease too: a computed fill that began before this change loses).
    /// A NULL column renders no key. A column whose value is not at hand (an unchanged
    /// TOASTed value that the old row does not carry either) drops every key of the rule
    /// instead: absence is safe.
    fn invalidate(&mut self, table: &TableState, new: Option<&Tuple>, old: Option<&Tuple>) {
        for (rule, positions) in table
            .rule
            .invalidate
            .iter()
            .zip(&table.invalidate_positions)
        {
            let mut keys: Vec<String> = Vec::with_capacity(2);
            let mut unknown = false;
            for tuple in [new, old].into_iter().flatten() {
                let mut values: Vec<&[u8]> = Vec::with_capacity(positions.len());
                let mut null = false;
                for &at in positions {
                    let value = match tuple.0.get(at) {
                        Some(TupleData::Unchanged) => old.and_then(|old| old.0.get(at)),
                        other => other,
                    };
                    match value {
                        Some(TupleData::Text(v)) | Some(TupleData::Binary(v)) => values.push(v),
                        Some(TupleData::Null) => null = true,
                        _ => unknown = true,
                    }
                }
                if !null && values.len() == positions.len() {
                    let key = rule.key.render(&table.key_prefix, &values);
                    if !keys.contains(&key) {
                        keys.push(key);
                    }
                }
            }
            if unknown {
                self.push(Op::DropMatching {
                    patterns: rule.patterns(&table.key_prefix),
                });
            }
            for key in keys {
                self.push(Op::Del { key });
            }
        }
    }

    fn update_row(
        &mut self,
        table: &TableState,
        old: Option<&OldTuple>,
        new: &Tuple,
    ) -> Result<(), ChangeError> {
        // A key column stored out of line and left unchanged is not in the new image; Postgres
        // logs it in the old one (the replica identity) instead.
        let key = row_key_or_old(table, new, old.map(OldTuple::tuple))?;
        // Only key columns are sure to be in the old image; a key change moves the row.
        let old_key = old
            .and_then(|old| row_key(table, old.tuple(), "").ok())
            .filter(|old_key| *old_key != key);
        let unchanged = table
            .positions
            .iter()
            .any(|&at| matches!(new.0.get(at), Some(TupleData::Unchanged)));
        let complete_old = match old {
            Some(OldTuple::Full(old)) => table
                .positions
                .iter()
                .all(|&at| !matches!(old.0.get(at), Some(TupleData::Unchanged) | None)),
            _ => false,
        };
        if !unchanged || table.rule.mode == Mode::Invalidate || complete_old || self.muted {
            if let Some(old_key) = old_key {
                self.push(Op::Del { key: old_key });
            }
            let fallback = match old {
                Some(OldTuple::Full(old)) if complete_old => Some(old),
                _ => None,
            };
            return self.write_row(table, key, new, fallback);
        }
        if table.rule.mode == Mode::Refresh && old_key.is_some() {
            // Refresh mode caches only keys already cached, and the new key is new.
            self.push(Op::Del {
                key: old_key.unwrap_or_default(),
            });
            self.push(Op::Del { key });
            return Ok(());
        }
        let merge = self.merge(table, key.clone(), old_key.clone(), new);
        let result = match merge {
            Ok(merge) => {
                self.push(Op::Merge(Box::new(merge)));
                Ok(())
            }
            Err(e) => {
                self.push(Op::Del { key });
                Err(e)
            }
        };
        if let Some(old_key) = old_key {
            // After the merge, which reads it.
            self.push(Op::Del { key: old_key });
        }
        result
    }

    fn merge(
        &self,
        table: &TableState,
        key: String,
        old_key: Option<String>,
        new: &Tuple,
    ) -> Result<Merge, ChangeError> {
        let mut columns = Vec::with_capacity(table.columns.len());
        for ((name, ty), &at) in table.columns.iter().zip(&table.positions) {
            let value = match new.0.get(at) {
                Some(TupleData::Text(text)) | Some(TupleData::Binary(text)) => {
                    let mut out = Vec::with_capacity(text.len() + 2);
                    let encoded = match table.rule.format {
                        Format::Json => {
                            encoder::encode_value(&mut out, ty, text, table.rule.encode)
                        }
                        Format::Hash => {
                            encoder::encode_field(&mut out, ty, text, table.rule.encode)
                        }
                    };
                    encoded.map_err(|source| ChangeError::Encode {
                        table: table.rule.qualified_name(),
                        key: key.clone(),
                        source,
                    })?;
                    MergeValue::Value(out)
                }
                Some(TupleData::Null) | None => match table.rule.format {
                    Format::Json => MergeValue::Value(b"null".to_vec()),
                    Format::Hash => MergeValue::Null,
                },
                Some(TupleData::Unchanged) => MergeValue::Unchanged,
            };
            let name = match table.rule.format {
                Format::Json => json_name(name),
                Format::Hash => name.as_bytes().to_vec(),
            };
            columns.push((name, value));
        }
        let mirror = table.rule.mode == Mode::Mirror;
        Ok(Merge {
            base: old_key.unwrap_or_else(|| key.clone()),
            format: table.rule.format,
            columns,
            ttl_ms: if mirror { ttl_ms(table) } else { None },
            only_if_cached: !mirror,
            repair: mirror.then(|| Repair {
                table: table.rule.qualified_name(),
                key_texts: key_texts(table, new),
                key: key.clone(),
            }),
            stale_base: self.stale_bases,
            key,
        })
    }

    pub fn delete(&mut self, table: &TableState, old: &OldTuple) -> Result<(), ChangeError> {
        let hint = match old {
            OldTuple::Key(_) => {
                " (the key template uses a column outside the replica identity: \
                 run ALTER TABLE ... REPLICA IDENTITY FULL)"
            }
            OldTuple::Full(_) => "",
        };
        let result = row_key(table, old.tuple(), hint).map(|key| self.push(Op::Del { key }));
        self.invalidate(table, None, Some(old.tuple()));
        result
    }

    /// TRUNCATE: every key of the table goes, in stream order, and every key its
    /// invalidation rules could name.
    pub fn truncate(&mut self, table: &TableState) {
        self.drop_key_space(table.key_space.clone());
        self.drop_matching(table.rule.invalidation_patterns(&table.key_prefix));
    }

    /// Drops every key matching these patterns (a table's invalidation keys); nothing when
    /// there are none.
    pub fn drop_matching(&mut self, patterns: Vec<String>) {
        if !patterns.is_empty() {
            self.push(Op::DropMatching { patterns });
        }
    }

    /// Drops every key of a table (its rule no longer fits, it was renamed, truncated, or
    /// Redis must forget it: absence is safe, stale is not).
    pub fn drop_key_space(&mut self, key_space: String) {
        self.push(Op::DropKeySpace { key_space });
    }

    /// Deletes every key matching these `SCAN MATCH` patterns, inside the write: leases
    /// (fills that began before lose), or keys no row is at hand to render.
    pub fn revoke_leases(&mut self, patterns: Vec<String>) {
        self.push(Op::DropMatching { patterns });
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
        if table.rule.mode == Mode::Invalidate || self.muted {
            self.push(Op::Del { key });
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
        let encoded = match encoded {
            Ok(encoded) => encoded,
            Err(source) => {
                self.push(Op::Del { key: key.clone() });
                return Err(ChangeError::Encode {
                    table: table.rule.qualified_name(),
                    key,
                    source,
                });
            }
        };
        let size = encoded.largest();
        if size > self.max_value {
            self.push(Op::Del { key: key.clone() });
            return Err(ChangeError::TooLarge {
                table: table.rule.qualified_name(),
                key,
                size,
                limit: self.max_value,
            });
        }
        let mirror = table.rule.mode == Mode::Mirror;
        self.push(match encoded {
            Encoded::Json(value) if mirror => Op::Set {
                key,
                value,
                ttl_ms: ttl_ms(table),
            },
            Encoded::Json(value) => Op::SetIfCached { key, value },
            Encoded::Hash(fields) => Op::Hash {
                key,
                fields,
                ttl_ms: if mirror { ttl_ms(table) } else { None },
                only_if_cached: !mirror,
            },
        });
        Ok(())
    }

    /// Takes the committed part of the batch, or all of it when `include_open` (a transaction
    /// too large to hold), with what the write carries. `None` when there is nothing to
    /// write. The caller writes it; if that fails it must reconnect and replay from the
    /// checkpoint, since the operations are no longer here.
    pub fn prepare(&mut self, include_open: bool) -> Option<Prepared> {
        let upto = if include_open {
            self.ops.len()
        } else {
            self.committed
        };
        // A part of an open transaction does not move the position.
        let position = if upto == self.committed {
            self.position.take()
        } else {
            None
        };
        let fields_upto = if include_open {
            self.fields.len()
        } else {
            self.committed_fields
        };
        if upto == 0 && position.is_none() && fields_upto == 0 {
            return None;
        }
        let ops: Vec<Op> = self.ops.drain(..upto).collect();
        let tags = self
            .tags
            .as_mut()
            .map(|tags| tags.drain(..upto).collect())
            .unwrap_or_default();
        let mut xids = std::mem::take(&mut self.xids);
        if include_open && self.open_has_ops {
            xids.extend(self.open_xid);
        }
        if upto == self.committed {
            self.bytes -= self.committed_bytes;
            self.committed_bytes = 0;
        } else {
            self.bytes = 0;
            self.committed_bytes = 0;
        }
        self.committed = 0;
        self.committed_fields = 0;
        let prepared = Prepared {
            ops,
            position,
            fields: self.fields.drain(..fields_upto).collect(),
            transactions: std::mem::take(&mut self.transactions),
            commit_times: std::mem::take(&mut self.commit_times),
            xids,
            tags,
        };
        Some(prepared)
    }

    /// Adds what a backfill chunk writes (its rows, and checkpoint fields such as its
    /// cursor) to the open transaction, the one that carried its high watermark.
    pub fn push_chunk(&mut self, ops: impl IntoIterator<Item = Op>, fields: Vec<(String, String)>) {
        for op in ops {
            self.push(op);
        }
        self.fields.extend(fields);
    }

    /// The open transaction must be visible to Postgres readers before the next write even
    /// without operations of its own (it carried a control event).
    pub fn mark_transaction(&mut self) {
        if self.open_xid.is_some() {
            self.open_has_ops = true;
        }
    }

    /// The open transaction was skipped (the checkpoint covers it). What its schema
    /// messages queued (a table stopped or reshaped: a key drop and its checkpoint fields)
    /// is ready now, the operations with their fields: left open, the drop would wait for
    /// the next transaction while its fields went out, and a stop before one would lose it.
    pub fn commit_skipped(&mut self) {
        self.committed = self.ops.len();
        self.committed_bytes = self.bytes;
        self.committed_fields = self.fields.len();
        self.open_xid = None;
        self.open_has_ops = false;
    }

    /// Keys of the operations from index `from` on (to drop them from a backfill chunk).
    pub fn keys_since(&self, from: usize) -> impl Iterator<Item = &str> {
        self.ops[from.min(self.ops.len())..]
            .iter()
            .filter_map(Op::key)
    }

    /// Key spaces dropped by operations from index `from` on (TRUNCATE and the like).
    pub fn dropped_since(&self, from: usize) -> impl Iterator<Item = &str> {
        self.ops[from.min(self.ops.len())..]
            .iter()
            .filter_map(|op| match op {
                Op::DropKeySpace { key_space } => Some(key_space.as_str()),
                _ => None,
            })
    }

    /// Every key the batch holds an operation for.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys_since(0)
    }
}

/// A row's value in its table's format.
enum Encoded {
    Json(Vec<u8>),
    Hash(Vec<(String, Vec<u8>)>),
}

impl Encoded {
    /// The largest single Redis argument it makes.
    fn largest(&self) -> usize {
        match self {
            Encoded::Json(value) => value.len(),
            Encoded::Hash(fields) => fields.iter().map(|(_, v)| v.len()).max().unwrap_or(0),
        }
    }
}

/// The row's Redis key, from the key template's columns.
fn row_key(table: &TableState, tuple: &Tuple, hint: &'static str) -> Result<String, ChangeError> {
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
    let literal = table.rule.key.literal_prefix();
    let key_prefix = &table.key_space[..table.key_space.len() - literal.len()];
    let mut key = String::with_capacity(table.key_space.len() + 16);
    table.rule.key.render_into(&mut key, key_prefix, &values);
    Ok(key)
}

/// [`row_key`] of an update's new image, taking each key column the new image leaves out
/// (unchanged and stored out of line) from the old image, when there is one.
fn row_key_or_old(
    table: &TableState,
    new: &Tuple,
    old: Option<&Tuple>,
) -> Result<String, ChangeError> {
    let unchanged_key = table
        .key_positions
        .iter()
        .any(|&at| matches!(new.0.get(at), Some(TupleData::Unchanged)));
    let Some(old) = old.filter(|_| unchanged_key) else {
        return row_key(table, new, "");
    };
    let merged = Tuple(
        new.0
            .iter()
            .enumerate()
            .map(|(at, value)| match (value, old.0.get(at)) {
                (TupleData::Unchanged, Some(old @ (TupleData::Text(_) | TupleData::Binary(_)))) => {
                    old.clone()
                }
                _ => value.clone(),
            })
            .collect(),
    );
    row_key(table, &merged, "")
}

/// The key template's column values of `tuple`, as text (for reading the row again).
fn key_texts(table: &TableState, tuple: &Tuple) -> Vec<String> {
    table
        .key_positions
        .iter()
        .map(|&at| match tuple.0.get(at) {
            Some(TupleData::Text(v)) | Some(TupleData::Binary(v)) => {
                String::from_utf8_lossy(v).into_owned()
            }
            _ => String::new(),
        })
        .collect()
}

/// A column name as a JSON object key, with its quotes: serde_json's escaping, as the encoder
/// writes it, so merged values are byte-identical to fresh ones.
fn json_name(name: &str) -> Vec<u8> {
    serde_json::to_vec(name).expect("a string always serializes")
}

fn ttl_ms(table: &TableState) -> Option<u64> {
    table.rule.ttl.map(|ttl| ttl.as_millis().max(1) as u64)
}
