//! The write of one batch: its operations and the checkpoint in one Lua script (`apply.lua`),
//! which Redis runs atomically, like `MULTI … EXEC`, and which first checks that this daemon
//! still owns the checkpoint and that Redis did not lose or roll back its data. A refused
//! batch writes nothing.
//!
//! Runs of plain writes (no TTL) go as one `MSET` and one `DEL` of their leases: inside the
//! script nothing sees the order within a run, and the last write of a key still wins, so
//! the result is the same as one `SET` and one `DEL` each, with a fraction of the calls.

use std::sync::LazyLock;

use redis::Script;

use super::{Merge, MergeValue, Op, Prepared, Repair};
use crate::checkpoint::{self, FIELD_HEARTBEAT_MS};
use crate::config::Format;
use crate::template::lease_key;
use crate::Lsn;

static APPLY: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("apply.lua")));

/// Most pairs one `MSET` carries (Lua's stack takes a few thousand arguments per call).
const MSET_PAIRS: usize = 1_000;

/// What identifies this daemon's writes to the checkpoint.
#[derive(Debug, Clone)]
pub struct Owner {
    pub checkpoint_key: String,
    /// This session's token, set by [`checkpoint::takeover`].
    pub token: String,
    pub epoch: String,
    /// The position the checkpoint holds now, as this session last wrote or read it.
    pub position: Option<Lsn>,
}

/// A batch Redis accepted.
#[derive(Debug, Default)]
pub struct Applied {
    /// Mirror keys deleted because their merge found no cached value: read them again.
    pub repairs: Vec<Repair>,
}

/// Why Redis refused a batch (nothing of it was written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("Redis lost its data: the checkpoint's epoch is gone (FLUSHALL, or a restart without persistence)")]
    EpochGone,
    #[error("another daemon took the slot over (the checkpoint's owner is {0:?}): this one stops writing")]
    Fenced(String),
    #[error("Redis went back in time: the checkpoint holds position {found:?} where this daemon wrote {expected} (a restore from an older snapshot, or a replica promoted)")]
    Moved { found: String, expected: String },
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Writes `prepared` with its checkpoint, if `owner` still owns the checkpoint.
///
/// # Errors
/// [`WriteError::Refused`] when the checks fail; a Redis error otherwise. Either way nothing
/// was written.
pub async fn write(
    conn: &mut impl redis::aio::ConnectionLike,
    owner: &Owner,
    prepared: &Prepared,
    now_ms: u64,
) -> Result<Applied, WriteError> {
    let mut call = APPLY.key(&owner.checkpoint_key);
    call.arg(&owner.token)
        .arg(&owner.epoch)
        .arg(checkpoint::position_text(owner.position));
    match prepared.position {
        Some(lsn) => call.arg(lsn.to_string()).arg(checkpoint::hex(lsn)),
        None => call.arg("").arg(""),
    };
    call.arg(now_ms).arg(prepared.fields.len());
    for (field, value) in &prepared.fields {
        call.arg(field).arg(value);
    }
    let mut repairs = Vec::new();
    add_ops(&mut call, &prepared.ops, &mut repairs);
    let reply: redis::Value = call.invoke_async(conn).await?;
    let (status, detail) = parse_reply(reply)?;
    match status.as_str() {
        "ok" => {
            let missing = match detail {
                redis::Value::Array(items) => items
                    .into_iter()
                    .filter_map(|v| match v {
                        redis::Value::Int(i) => usize::try_from(i).ok(),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            // `repairs` holds one entry per merge, in order; the script names the 1-based
            // merges that found no base.
            let repairs = missing
                .into_iter()
                .filter_map(|i: usize| repairs.get(i.checked_sub(1)?).cloned().flatten())
                .collect();
            Ok(Applied { repairs })
        }
        "epoch" => Err(Refused::EpochGone.into()),
        "owner" => Err(Refused::Fenced(text(&detail)).into()),
        "moved" => Err(Refused::Moved {
            found: text(&detail),
            expected: checkpoint::position_text(owner.position),
        }
        .into()),
        other => Err(WriteError::Redis(unexpected(other))),
    }
}

/// The heartbeat: checks the checkpoint as a batch does (so a daemon that has nothing to
/// write still notices data loss and fencing) and records the time.
///
/// # Errors
/// As [`write`].
pub async fn heartbeat(
    conn: &mut impl redis::aio::ConnectionLike,
    owner: &Owner,
    now_ms: u64,
) -> Result<(), WriteError> {
    let prepared = Prepared {
        fields: vec![(FIELD_HEARTBEAT_MS.to_string(), now_ms.to_string())],
        ..Prepared::default()
    };
    write(conn, owner, &prepared, now_ms).await.map(drop)
}

fn parse_reply(reply: redis::Value) -> Result<(String, redis::Value), redis::RedisError> {
    let redis::Value::Array(items) = reply else {
        return Err(unexpected("not an array"));
    };
    let mut items = items.into_iter();
    let status = items.next().map(|v| text(&v)).unwrap_or_default();
    Ok((status, items.next().unwrap_or(redis::Value::Nil)))
}

fn text(value: &redis::Value) -> String {
    match value {
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Okay => "OK".into(),
        redis::Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

fn unexpected(what: &str) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected reply from the pgcache apply script",
        what.to_string(),
    ))
}

/// Appends the operations as the script reads them; `repairs` gets one entry per merge.
fn add_ops(call: &mut redis::ScriptInvocation<'_>, ops: &[Op], repairs: &mut Vec<Option<Repair>>) {
    let plain = |op: &Op| {
        matches!(
            op,
            Op::Set { ttl_ms: None, .. } | Op::Fill { ttl_ms: None, .. }
        )
    };
    let mut at = 0;
    while at < ops.len() {
        if !plain(&ops[at]) {
            add_op(call, &ops[at], repairs);
            at += 1;
            continue;
        }
        let run = &ops[at..at
            + ops[at..]
                .iter()
                .take(MSET_PAIRS)
                .take_while(|op| plain(op))
                .count()];
        let leases = run.iter().filter(|op| matches!(op, Op::Set { .. })).count();
        call.arg("M").arg(run.len()).arg(leases);
        for op in run {
            if let Op::Set { key, value, .. } | Op::Fill { key, value, .. } = op {
                call.arg(key).arg(value);
            }
        }
        for op in run {
            if let Op::Set { key, .. } = op {
                call.arg(lease_key(key));
            }
        }
        at += run.len();
    }
}

fn add_op(call: &mut redis::ScriptInvocation<'_>, op: &Op, repairs: &mut Vec<Option<Repair>>) {
    let ttl = |ttl_ms: &Option<u64>| ttl_ms.map(|ms| ms.to_string()).unwrap_or_default();
    match op {
        Op::Set { key, value, ttl_ms } => {
            call.arg("S")
                .arg(key)
                .arg(value)
                .arg(ttl(ttl_ms))
                .arg(lease_key(key));
        }
        Op::Fill { key, value, ttl_ms } => {
            call.arg("S").arg(key).arg(value).arg(ttl(ttl_ms)).arg("");
        }
        Op::SetIfCached { key, value } => {
            call.arg("X").arg(key).arg(value).arg(lease_key(key));
        }
        Op::Hash {
            key,
            fields,
            ttl_ms,
            only_if_cached,
        } => {
            call.arg("H")
                .arg(key)
                .arg(lease_key(key))
                .arg(ttl(ttl_ms))
                .arg(if *only_if_cached { "1" } else { "0" })
                .arg(fields.len());
            for (field, value) in fields {
                call.arg(field).arg(value);
            }
        }
        Op::Del { key } => {
            call.arg("D").arg(key).arg(lease_key(key));
        }
        Op::DropKeySpace { key_space } => {
            let escaped = glob_escape(key_space);
            call.arg("K")
                .arg(format!("{escaped}*"))
                .arg(format!("{{{escaped}*"));
        }
        Op::Merge(merge) => {
            let Merge {
                key,
                base,
                format,
                columns,
                ttl_ms,
                only_if_cached,
                repair,
            } = &**merge;
            call.arg(match format {
                Format::Json => "J",
                Format::Hash => "G",
            })
            .arg(key)
            .arg(base)
            .arg(lease_key(key))
            .arg(ttl(ttl_ms))
            .arg(if *only_if_cached { "1" } else { "0" })
            .arg(repair.as_ref().map(Repair::encode).unwrap_or_default())
            .arg(columns.len());
            for (name, value) in columns {
                call.arg(&name[..]);
                match (format, value) {
                    (Format::Json, MergeValue::Value(v)) => call.arg(&v[..]),
                    (Format::Json, _) => call.arg(""),
                    (Format::Hash, MergeValue::Value(v)) => call.arg("v").arg(&v[..]),
                    (Format::Hash, MergeValue::Null) => call.arg("n").arg(""),
                    (Format::Hash, MergeValue::Unchanged) => call.arg("u").arg(""),
                };
            }
            repairs.push(repair.clone());
        }
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
