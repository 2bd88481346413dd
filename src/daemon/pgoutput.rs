//! The pgoutput decoder: one XLogData payload in, one typed [`Message`] out.
//!
//! We speak protocol version 1, or 2 with `streaming 'on'` (PostgreSQL docs, "Logical
//! Replication Message Formats"): no two-phase transactions. Version 2 adds the stream
//! messages (Stream Start, Stop, Commit and Abort), and inside a stream block every Relation,
//! Type, Insert, Update, Delete, Truncate and Message carries the xid of its (sub)transaction
//! before its usual fields: [`decode_streamed`] reads those. Decoding is a pure
//! function over [`Bytes`] so it can be tested from captured fixtures and fuzzed; column values
//! are slices of the input buffer, never copies, because a row can be large and the daemon must
//! not double its memory per change (G8). Anything malformed is a [`DecodeError`], never a
//! panic: the bytes come from the network.

use bytes::Bytes;

use crate::Lsn;

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01 UTC), for turning
/// `commit_time` into wall-clock time (replication lag).
pub use crate::clock::PG_EPOCH_UNIX_MICROS;

/// Message tags (the first byte of every payload).
mod tag {
    pub const BEGIN: u8 = b'B';
    pub const COMMIT: u8 = b'C';
    pub const ORIGIN: u8 = b'O';
    pub const RELATION: u8 = b'R';
    pub const TYPE: u8 = b'Y';
    pub const INSERT: u8 = b'I';
    pub const UPDATE: u8 = b'U';
    pub const DELETE: u8 = b'D';
    pub const TRUNCATE: u8 = b'T';
    pub const MESSAGE: u8 = b'M';
    pub const STREAM_START: u8 = b'S';
    pub const STREAM_STOP: u8 = b'E';
    pub const STREAM_COMMIT: u8 = b'c';
    pub const STREAM_ABORT: u8 = b'A';
}

/// Markers inside change messages that say which tuple follows.
mod part {
    pub const NEW: u8 = b'N';
    pub const KEY: u8 = b'K';
    pub const OLD: u8 = b'O';
}

/// Column kinds inside a TupleData part.
mod column {
    pub const NULL: u8 = b'n';
    pub const UNCHANGED: u8 = b'u';
    pub const TEXT: u8 = b't';
    pub const BINARY: u8 = b'b';
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeMessage),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
}

impl Message {
    /// The message's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Begin(_) => "begin",
            Message::Commit(_) => "commit",
            Message::Origin(_) => "origin",
            Message::Relation(_) => "relation",
            Message::Type(_) => "type",
            Message::Insert(_) => "insert",
            Message::Update(_) => "update",
            Message::Delete(_) => "delete",
            Message::Truncate(_) => "truncate",
            Message::Message(_) => "message",
            Message::StreamStart(_) => "stream start",
            Message::StreamStop => "stream stop",
            Message::StreamCommit(_) => "stream commit",
            Message::StreamAbort(_) => "stream abort",
        }
    }
}

/// A message inside a stream block (between [`StreamStart`] and [`Message::StreamStop`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Streamed {
    /// The xid of the (sub)transaction the change belongs to: Relation, Type, Insert,
    /// Update, Delete, Truncate and Message carry one; Stream Stop does not.
    pub xid: Option<u32>,
    pub message: Message,
}

/// A block of a large in-progress transaction's changes follows, up to Stream Stop
/// (protocol version 2, `streaming 'on'`).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamStart {
    /// The top-level transaction's xid.
    pub xid: u32,
    /// Whether this is the transaction's first block.
    pub first_segment: bool,
}

/// A streamed transaction committed: apply its blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamCommit {
    /// The top-level transaction's xid.
    pub xid: u32,
    /// Currently always 0.
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// Where the transaction ends in the WAL: the position to confirm once it is applied.
    pub end_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
}

/// A streamed transaction (`subxid == xid`) or one of its subtransactions rolled back: its
/// changes (those carrying `subxid`) are discarded. Postgres sends one per aborted
/// subtransaction that had changes streamed, nested ones included.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamAbort {
    /// The top-level transaction's xid.
    pub xid: u32,
    pub subxid: u32,
}

impl StreamAbort {
    /// The whole transaction rolled back, not one subtransaction.
    pub fn is_top_level(&self) -> bool {
        self.xid == self.subxid
    }
}

/// Start of a transaction; its changes follow, then a [`Commit`].
#[derive(Debug, Clone, PartialEq)]
pub struct Begin {
    /// The LSN of the commit record; equals the [`Commit::commit_lsn`] that closes it.
    pub final_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC (see [`PG_EPOCH_UNIX_MICROS`]).
    pub commit_time: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    /// Currently always 0.
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// Where the transaction ends in the WAL: the position to confirm once it is applied.
    pub end_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
}

/// The transaction was replayed from another node (sent after Begin).
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    /// The commit LSN on the origin server.
    pub commit_lsn: Lsn,
    pub name: String,
}

/// The schema of a relation, sent before its first change in a session and after DDL.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    /// The table's OID; change messages refer to it.
    pub id: u32,
    /// Empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    /// `relreplident`: `b'd'` default (primary key), `b'n'` nothing, `b'f'` full, `b'i'` index.
    /// Passed through as sent, so a caller can name an unexpected value in its own error.
    pub replica_identity: u8,
    /// In table order, without generated columns; tuples have exactly these columns.
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// 1 = part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod`, -1 when the type has none.
    pub type_modifier: i32,
}

impl Column {
    /// Whether the column is part of the replica identity (what 'K' old tuples carry).
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// A user-defined type used by a relation's columns (sent before the Relation).
#[derive(Debug, Clone, PartialEq)]
pub struct TypeMessage {
    pub id: u32,
    /// Empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Insert {
    pub relation_id: u32,
    pub new: Tuple,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub relation_id: u32,
    /// Present when the key changed (`Key`) or the table has REPLICA IDENTITY FULL (`Full`).
    pub old: Option<OldTuple>,
    pub new: Tuple,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delete {
    pub relation_id: u32,
    pub old: OldTuple,
}

/// The old row of an update or delete.
#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    /// 'K': only the key columns have values; the others are [`TupleData::Null`].
    Key(Tuple),
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Truncate {
    /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
    pub options: u8,
    pub relation_ids: Vec<u32>,
}

/// A message from `pg_logical_emit_message`. pgcache asks for none (`messages 'false'`): any role
/// can emit one, so nothing it says could be trusted.
#[derive(Debug, Clone, PartialEq)]
pub struct LogicalMessage {
    /// Transactional messages arrive between Begin and Commit; the others arrive on their own,
    /// as soon as they are decoded, even when emitted inside a transaction.
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    /// Arbitrary bytes, not necessarily UTF-8.
    pub content: Bytes,
}

/// A row's columns, in the order of the relation's [`Relation::columns`].
#[derive(Debug, Clone, PartialEq)]
pub struct Tuple(pub Vec<TupleData>);

#[derive(Debug, Clone, PartialEq)]
pub enum TupleData {
    Null,
    /// 'u': an unchanged TOASTed value that Postgres did not send.
    Unchanged,
    /// The value in the type's text output format (what pgcache asks for).
    Text(Bytes),
    /// The value in the type's binary send format (only with the `binary` option).
    Binary(Bytes),
}

/// Why a payload is not a valid protocol-version-1 or -2 pgoutput message. `at` is a byte offset
/// into the payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message (no tag byte)")]
    Empty,
    #[error(
        "pgoutput message truncated: {what} at byte {at} needs {needed} bytes, {available} left"
    )]
    Truncated {
        what: &'static str,
        at: usize,
        needed: usize,
        available: usize,
    },
    #[error("unknown pgoutput message tag 0x{0:02x} ({c:?})", c = char::from(*.0))]
    UnknownTag(u8),
    #[error("pgoutput {name} message (tag {c:?}) is not part of protocol versions 1 and 2 without two-phase", c = char::from(*.tag))]
    Unsupported { tag: u8, name: &'static str },
    #[error("pgoutput string {what} at byte {at} has no NUL terminator")]
    UnterminatedString { what: &'static str, at: usize },
    #[error("pgoutput string {what} at byte {at} is not valid UTF-8")]
    BadString { what: &'static str, at: usize },
    #[error("pgoutput {what} at byte {at}: expected {expected}, found 0x{found:02x} ({c:?})", c = char::from(*.found))]
    UnexpectedPart {
        what: &'static str,
        at: usize,
        expected: &'static str,
        found: u8,
    },
    #[error("pgoutput {what} at byte {at} has negative length {len}")]
    NegativeLength {
        what: &'static str,
        at: usize,
        len: i32,
    },
    #[error("pgoutput {what} count {count} at byte {at} cannot fit in the {available} bytes left")]
    CountTooLarge {
        what: &'static str,
        at: usize,
        count: u64,
        available: usize,
    },
    #[error("pgoutput {message} message has {len} unexpected bytes after byte {at}")]
    TrailingBytes {
        message: &'static str,
        at: usize,
        len: usize,
    },
}

type Result<T> = std::result::Result<T, DecodeError>;

/// Decodes one pgoutput message outside a stream block: the payload of one XLogData frame,
/// or one row's `data` from `pg_logical_slot_get_binary_changes`.
///
/// # Errors
/// Any payload that is not exactly one well-formed message: truncated, unknown tag or part
/// marker, negative length, string without NUL or not UTF-8, a count larger than the bytes
/// left, or bytes left over at the end.
pub fn decode(buf: Bytes) -> Result<Message> {
    decode_with(buf, false).map(|streamed| streamed.message)
}

/// Whether a message (streamed or not) is a Relation message, without decoding it.
pub fn is_relation(buf: &[u8]) -> bool {
    buf.first() == Some(&tag::RELATION)
}

/// Decodes one pgoutput message inside a stream block, where changes carry their
/// (sub)transaction's xid after the tag.
///
/// # Errors
/// As [`decode`].
pub fn decode_streamed(buf: Bytes) -> Result<Streamed> {
    decode_with(buf, true)
}

fn decode_with(buf: Bytes, in_stream: bool) -> Result<Streamed> {
    let mut cur = Cursor::new(buf);
    let tag = cur.u8("message tag").map_err(|_| DecodeError::Empty)?;
    let carries_xid = in_stream
        && matches!(
            tag,
            tag::RELATION
                | tag::TYPE
                | tag::INSERT
                | tag::UPDATE
                | tag::DELETE
                | tag::TRUNCATE
                | tag::MESSAGE
        );
    let xid = if carries_xid {
        Some(cur.u32("streamed change xid")?)
    } else {
        None
    };
    let message = match tag {
        tag::BEGIN => Message::Begin(Begin {
            final_lsn: cur.lsn("begin final_lsn")?,
            commit_time: cur.i64("begin commit_time")?,
            xid: cur.u32("begin xid")?,
        }),
        tag::COMMIT => Message::Commit(Commit {
            flags: cur.u8("commit flags")?,
            commit_lsn: cur.lsn("commit commit_lsn")?,
            end_lsn: cur.lsn("commit end_lsn")?,
            commit_time: cur.i64("commit commit_time")?,
        }),
        tag::ORIGIN => Message::Origin(Origin {
            commit_lsn: cur.lsn("origin commit_lsn")?,
            name: cur.string("origin name")?,
        }),
        tag::RELATION => Message::Relation(relation(&mut cur)?),
        tag::TYPE => Message::Type(TypeMessage {
            id: cur.u32("type id")?,
            namespace: cur.string("type namespace")?,
            name: cur.string("type name")?,
        }),
        tag::INSERT => {
            let relation_id = cur.u32("insert relation id")?;
            cur.expect_part("insert tuple marker", "'N'", &[part::NEW])?;
            Message::Insert(Insert {
                relation_id,
                new: tuple(&mut cur)?,
            })
        }
        tag::UPDATE => Message::Update(update(&mut cur)?),
        tag::DELETE => {
            let relation_id = cur.u32("delete relation id")?;
            let marker =
                cur.expect_part("delete tuple marker", "'K' or 'O'", &[part::KEY, part::OLD])?;
            Message::Delete(Delete {
                relation_id,
                old: old_tuple(marker, tuple(&mut cur)?),
            })
        }
        tag::TRUNCATE => Message::Truncate(truncate(&mut cur)?),
        tag::MESSAGE => Message::Message(logical_message(&mut cur)?),
        tag::STREAM_START => Message::StreamStart(StreamStart {
            xid: cur.u32("stream start xid")?,
            // Only 1 means first; anything else is a later block, as Postgres reads it.
            first_segment: cur.u8("stream start first-segment flag")? == 1,
        }),
        tag::STREAM_STOP => Message::StreamStop,
        tag::STREAM_COMMIT => Message::StreamCommit(StreamCommit {
            xid: cur.u32("stream commit xid")?,
            flags: cur.u8("stream commit flags")?,
            commit_lsn: cur.lsn("stream commit commit_lsn")?,
            end_lsn: cur.lsn("stream commit end_lsn")?,
            commit_time: cur.i64("stream commit commit_time")?,
        }),
        tag::STREAM_ABORT => Message::StreamAbort(StreamAbort {
            xid: cur.u32("stream abort xid")?,
            subxid: cur.u32("stream abort subxid")?,
        }),
        other => {
            return Err(match unsupported_name(other) {
                Some(name) => DecodeError::Unsupported { tag: other, name },
                None => DecodeError::UnknownTag(other),
            })
        }
    };
    cur.finish(message.kind())?;
    Ok(Streamed { xid, message })
}

/// Tags of two-phase decoding (protocol version 3): seeing one means the server was asked
/// for more than we speak, which is worth saying plainly.
fn unsupported_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'b' => "begin prepare",
        b'P' => "prepare",
        b'K' => "commit prepared",
        b'r' => "rollback prepared",
        b'p' => "stream prepare",
        _ => return None,
    })
}

fn relation(cur: &mut Cursor) -> Result<Relation> {
    let id = cur.u32("relation id")?;
    let namespace = cur.string("relation namespace")?;
    let name = cur.string("relation name")?;
    let replica_identity = cur.u8("relation replica identity")?;
    let at = cur.pos;
    let count = cur.u16("relation column count")?;
    // Smallest column: flags, an empty name's NUL, type OID, type modifier.
    cur.check_count("relation column", at, u64::from(count), 1 + 1 + 4 + 4)?;
    let mut columns = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        columns.push(Column {
            flags: cur.u8("column flags")?,
            name: cur.string("column name")?,
            type_oid: cur.u32("column type oid")?,
            type_modifier: cur.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn update(cur: &mut Cursor) -> Result<Update> {
    let relation_id = cur.u32("update relation id")?;
    let marker = cur.expect_part(
        "update tuple marker",
        "'K', 'O' or 'N'",
        &[part::KEY, part::OLD, part::NEW],
    )?;
    let old = if marker == part::NEW {
        None
    } else {
        let old = old_tuple(marker, tuple(cur)?);
        cur.expect_part("update new tuple marker", "'N'", &[part::NEW])?;
        Some(old)
    };
    Ok(Update {
        relation_id,
        old,
        new: tuple(cur)?,
    })
}

fn old_tuple(marker: u8, tuple: Tuple) -> OldTuple {
    if marker == part::KEY {
        OldTuple::Key(tuple)
    } else {
        OldTuple::Full(tuple)
    }
}

fn truncate(cur: &mut Cursor) -> Result<Truncate> {
    let at = cur.pos;
    let count = cur.u32("truncate relation count")?;
    let options = cur.u8("truncate options")?;
    cur.check_count("truncate relation", at, u64::from(count), 4)?;
    let mut relation_ids = Vec::with_capacity(count as usize);
    for _ in 0..count {
        relation_ids.push(cur.u32("truncate relation id")?);
    }
    Ok(Truncate {
        options,
        relation_ids,
    })
}

fn logical_message(cur: &mut Cursor) -> Result<LogicalMessage> {
    let flags = cur.u8("message flags")?;
    let lsn = cur.lsn("message lsn")?;
    let prefix = cur.string("message prefix")?;
    let len = cur.len("message content")?;
    Ok(LogicalMessage {
        // Only bit 0 is defined; other bits would come from a newer server and do not change
        // how the message must be handled.
        transactional: flags & 1 != 0,
        lsn,
        prefix,
        content: cur.take(len, "message content")?,
    })
}

fn tuple(cur: &mut Cursor) -> Result<Tuple> {
    let at = cur.pos;
    let count = cur.u16("tuple column count")?;
    // Every column takes at least its kind byte.
    cur.check_count("tuple column", at, u64::from(count), 1)?;
    let mut values = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let at = cur.pos;
        let value = match cur.u8("tuple column kind")? {
            column::NULL => TupleData::Null,
            column::UNCHANGED => TupleData::Unchanged,
            column::TEXT => {
                let len = cur.len("text column value")?;
                TupleData::Text(cur.take(len, "text column value")?)
            }
            column::BINARY => {
                let len = cur.len("binary column value")?;
                TupleData::Binary(cur.take(len, "binary column value")?)
            }
            found => {
                return Err(DecodeError::UnexpectedPart {
                    what: "tuple column kind",
                    at,
                    expected: "'n', 'u', 't' or 'b'",
                    found,
                })
            }
        };
        values.push(value);
    }
    Ok(Tuple(values))
}

/// A read position in one message. Reads are big-endian (network order) and bounds-checked;
/// `take` hands out slices that share the input's allocation.
struct Cursor {
    buf: Bytes,
    pos: usize,
}

impl Cursor {
    fn new(buf: Bytes) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next `n` bytes as a slice of the input, without copying.
    fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes> {
        self.need(n, what)?;
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        self.need(N, what)?;
        let mut out = [0; N];
        out.copy_from_slice(&self.buf[self.pos..self.pos + N]);
        self.pos += N;
        Ok(out)
    }

    fn need(&self, n: usize, what: &'static str) -> Result<()> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated {
                what,
                at: self.pos,
                needed: n,
                available: self.remaining(),
            });
        }
        Ok(())
    }

    fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    fn lsn(&mut self, what: &'static str) -> Result<Lsn> {
        Ok(Lsn(u64::from_be_bytes(self.array(what)?)))
    }

    /// An Int32 byte length; -1 never appears here (NULLs have their own column kind).
    fn len(&mut self, what: &'static str) -> Result<usize> {
        let at = self.pos;
        let len = self.i32(what)?;
        usize::try_from(len).map_err(|_| DecodeError::NegativeLength { what, at, len })
    }

    /// A NUL-terminated UTF-8 string (identifiers and prefixes, so copying is cheap).
    fn string(&mut self, what: &'static str) -> Result<String> {
        let at = self.pos;
        let rest = &self.buf[at..];
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::UnterminatedString { what, at })?;
        let s = std::str::from_utf8(&rest[..nul])
            .map_err(|_| DecodeError::BadString { what, at })?
            .to_owned();
        self.pos += nul + 1;
        Ok(s)
    }

    /// Reads a marker byte that must be one of `allowed`.
    fn expect_part(
        &mut self,
        what: &'static str,
        expected: &'static str,
        allowed: &[u8],
    ) -> Result<u8> {
        let at = self.pos;
        let found = self.u8(what)?;
        if allowed.contains(&found) {
            Ok(found)
        } else {
            Err(DecodeError::UnexpectedPart {
                what,
                at,
                expected,
                found,
            })
        }
    }

    /// Refuses a count of items that cannot fit in the bytes left, before anything is
    /// allocated for them: a corrupt count must not become a huge allocation.
    /// `at` is where the count was read.
    fn check_count(&self, what: &'static str, at: usize, count: u64, min_each: u64) -> Result<()> {
        let available = self.remaining();
        if count.saturating_mul(min_each) > available as u64 {
            return Err(DecodeError::CountTooLarge {
                what,
                at,
                count,
                available,
            });
        }
        Ok(())
    }

    fn finish(self, message: &'static str) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            len => Err(DecodeError::TrailingBytes {
                message,
                at: self.pos,
                len,
            }),
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod props;
