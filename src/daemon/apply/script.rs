//! The write of one batch: its operations and the checkpoint in one `MULTI … EXEC`, guarded:
//!
//! ```text
//! WATCH <checkpoint>
//! EVAL check.lua <checkpoint> owner epoch position   -- touches the checkpoint on failure
//! MULTI
//!   ... the batch's operations ...
//!   HSET <checkpoint> lsn … applied … updated_ms … [fields]
//! EXEC                                                 -- nil if the checkpoint changed
//! ```
//!
//! The check refuses a batch when Redis lost its data, went back in time, or another daemon
//! took the checkpoint over; WATCH makes EXEC run nothing then, and also when a takeover
//! lands between the check and the EXEC. All of it goes out as one pipeline: one round
//! trip, and Redis's native commands for the data.
//!
//! Runs of plain writes (no TTL) go as one `MSET` and one `DEL` of their leases: inside the
//! `EXEC` nothing sees the order within a run, and the last write of a key still wins, so
//! the result is the same as one `SET` and one `DEL` each, with a fraction of the commands.

use super::{Merge, MergeValue, Op, Prepared, Repair};
use crate::checkpoint::{self, FIELD_APPLIED, FIELD_HEARTBEAT_MS, FIELD_LSN, FIELD_UPDATED_MS};
use crate::config::Format;
use crate::template::{glob_escape, lease_key, LEASE_SUFFIX};
use crate::Lsn;

pub(super) const CHECK: &str = include_str!("check.lua");
const MERGE: &str = include_str!("merge.lua");

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
if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
";

/// Most pairs one `MSET` carries.
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
    Write::new(owner, prepared, now_ms).send(conn).await
}

/// A batch's write, built: the operations' bytes now live in the pipeline alone, so the
/// batch's own copy can go before the write is sent (memory is bounded by bytes).
pub struct Write {
    pipe: redis::Pipeline,
    merges: Vec<(usize, Option<Repair>)>,
    expected: Option<Lsn>,
}

impl std::fmt::Debug for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Write")
            .field("commands", &self.pipe.len())
            .finish_non_exhaustive()
    }
}

impl Write {
    /// Builds the guarded pipeline for `prepared` (see the module's doc).
    pub fn new(owner: &Owner, prepared: &Prepared, now_ms: u64) -> Write {
        let ck = &owner.checkpoint_key;
        let mut pipe = redis::pipe();
        pipe.cmd("WATCH").arg(ck).ignore();
        pipe.cmd("EVAL")
            .arg(CHECK)
            .arg(1)
            .arg(ck)
            .arg(&owner.token)
            .arg(&owner.epoch)
            .arg(checkpoint::position_text(owner.position));
        pipe.cmd("MULTI").ignore();
        let mut merges = Vec::new();
        add_ops(&mut pipe, ck, &prepared.ops, &mut merges);
        let set = pipe.cmd("HSET").arg(ck).arg(FIELD_UPDATED_MS).arg(now_ms);
        if let Some(lsn) = prepared.position {
            set.arg(FIELD_LSN)
                .arg(lsn.to_string())
                .arg(FIELD_APPLIED)
                .arg(checkpoint::hex(lsn));
        }
        // A field pushed twice takes its last value (an empty one removes it).
        let last: std::collections::HashMap<&str, usize> = prepared
            .fields
            .iter()
            .enumerate()
            .map(|(at, (field, _))| (field.as_str(), at))
            .collect();
        let mut removed = Vec::new();
        for (at, (field, value)) in prepared.fields.iter().enumerate() {
            if last[field.as_str()] != at {
                continue;
            }
            if value.is_empty() {
                removed.push(field);
            } else {
                set.arg(field).arg(value);
            }
        }
        set.ignore();
        if !removed.is_empty() {
            pipe.cmd("HDEL").arg(ck).arg(removed).ignore();
        }
        pipe.cmd("EXEC");
        Write {
            pipe,
            merges,
            expected: owner.position,
        }
    }

    /// Sends the write and reads its outcome.
    ///
    /// # Errors
    /// [`WriteError::Refused`] when the checks fail; a Redis error otherwise. Either way
    /// nothing was written.
    pub async fn send(
        self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> Result<Applied, WriteError> {
        let Write {
            pipe,
            merges,
            expected,
        } = self;
        let (check, exec): (redis::Value, redis::Value) = pipe.query_async(conn).await?;
        match check_status(&check)? {
            None => {}
            Some(refused) => {
                // The failed check touched the checkpoint, so EXEC ran nothing.
                return Err(refusal(refused, expected).into());
            }
        }
        let replies = match exec {
            redis::Value::Array(replies) => replies,
            // The checkpoint changed between the check and the EXEC: a takeover.
            redis::Value::Nil => {
                return Err(
                    Refused::Fenced("(changed while this batch was in flight)".into()).into(),
                )
            }
            other => return Err(unexpected(&format!("EXEC replied {other:?}")).into()),
        };
        let mut repairs = Vec::new();
        for (at, repair) in merges {
            match replies.get(at) {
                Some(redis::Value::Int(0)) => repairs.extend(repair),
                Some(redis::Value::Int(_)) => {}
                Some(redis::Value::ServerError(e)) => {
                    return Err(unexpected(&format!("a merge failed: {e:?}")).into())
                }
                _ => return Err(unexpected("a merge's reply is missing").into()),
            }
        }
        Ok(Applied { repairs })
    }
}

/// The heartbeat: checks the checkpoint as a batch does (so a daemon that has nothing to
/// write still notices data loss and fencing) and records the time.
///
/// # Errors
/// As [`write()`].
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

/// The refusal for what the check found, when the checkpoint was expected at `expected`.
pub(super) fn refusal(status: (&'static str, String), expected: Option<Lsn>) -> Refused {
    match status {
        ("epoch", _) => Refused::EpochGone,
        ("owner", found) => Refused::Fenced(found),
        (_, found) => Refused::Moved {
            found,
            expected: checkpoint::position_text(expected),
        },
    }
}

/// `None` when the check passed, else its refusal and what it found.
pub(super) fn check_status(
    value: &redis::Value,
) -> Result<Option<(&'static str, String)>, redis::RedisError> {
    let redis::Value::Array(items) = value else {
        return Err(unexpected("the check script did not reply with an array"));
    };
    let status = items.first().map(text).unwrap_or_default();
    let found = items.get(1).map(text).unwrap_or_default();
    Ok(match status.as_str() {
        "ok" => None,
        "epoch" => Some(("epoch", found)),
        "owner" => Some(("owner", found)),
        "moved" => Some(("moved", found)),
        other => return Err(unexpected(&format!("check replied {other:?}"))),
    })
}

pub(super) fn text(value: &redis::Value) -> String {
    match value {
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Okay => "OK".into(),
        redis::Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

pub(super) fn unexpected(what: &str) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected reply to the daemon's write",
        what.to_string(),
    ))
}

/// Appends the operations inside the `MULTI`; `merges` gets each merge's index among the
/// `EXEC`'s replies, with its repair.
pub(super) fn add_ops(
    pipe: &mut redis::Pipeline,
    ck: &str,
    ops: &[Op],
    merges: &mut Vec<(usize, Option<Repair>)>,
) {
    // Commands so far, up to and including MULTI: replies in the EXEC count from here.
    let multi = pipe.len();
    let plain = |op: &Op| {
        matches!(
            op,
            Op::Set { ttl_ms: None, .. } | Op::Fill { ttl_ms: None, .. }
        )
    };
    let mut at = 0;
    while at < ops.len() {
        if !plain(&ops[at]) {
            if let Op::Merge(merge) = &ops[at] {
                merges.push((pipe.len() - multi, merge.repair.clone()));
            }
            add_op(pipe, ck, &ops[at]);
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

fn add_op(pipe: &mut redis::Pipeline, ck: &str, op: &Op) {
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
                // The leases of keys without a hash tag (`{<key>}:pgcache-lease`); a tagged
                // key's lease starts with the key itself. Not `{<key space>*`: that would
                // take in another table's keys hash-tagged with this one's prefix
                // (`{user:7}:order:1` beside `user:{id}`).
                .arg(format!("{{{escaped}*}}{LEASE_SUFFIX}"))
                .ignore();
            return;
        }
        Op::DropMatching { patterns } => {
            let cmd = pipe.cmd("EVAL").arg(DROP_KEY_SPACE).arg(0);
            for pattern in patterns {
                cmd.arg(pattern);
            }
            cmd.ignore();
            return;
        }
        Op::Merge(merge) => {
            // The merge script revokes the lease itself.
            add_merge(pipe, ck, merge);
            return;
        }
    }
    if let (Some(key), false) = (op.key(), matches!(op, Op::Fill { .. })) {
        // Revoke any lease: a fill that read the row before this change must lose (G4).
        pipe.cmd("DEL").arg(lease_key(key)).ignore();
    }
}

fn add_merge(pipe: &mut redis::Pipeline, ck: &str, merge: &Merge) {
    let Merge {
        key,
        base,
        format,
        columns,
        ttl_ms,
        only_if_cached,
        repair,
        stale_base,
    } = merge;
    let cmd = pipe
        .cmd("EVAL")
        .arg(MERGE)
        .arg(4)
        .arg(key)
        .arg(base)
        .arg(lease_key(key))
        .arg(ck)
        .arg(match format {
            // No base to merge into: the script deletes the key and records the repair.
            _ if *stale_base => "X",
            Format::Json => "J",
            Format::Hash => "G",
        })
        .arg(ttl_ms.map(|ms| ms.to_string()).unwrap_or_default())
        .arg(if *only_if_cached { "1" } else { "0" })
        .arg(repair.as_ref().map(Repair::encode).unwrap_or_default())
        .arg(columns.len());
    for (name, value) in columns {
        cmd.arg(&name[..]);
        match (format, value) {
            (Format::Json, MergeValue::Value(v)) => cmd.arg(&v[..]),
            (Format::Json, _) => cmd.arg(""),
            (Format::Hash, MergeValue::Value(v)) => cmd.arg("v").arg(&v[..]),
            (Format::Hash, MergeValue::Null) => cmd.arg("n").arg(""),
            (Format::Hash, MergeValue::Unchanged) => cmd.arg("u").arg(""),
        };
    }
    cmd.ignore();
}
