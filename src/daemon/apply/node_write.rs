//! The cluster apply's fast path: the writes of many hash slots on one master in one script
//! ([`NodeWrite`], `node_write.lua`), each slot's part with its own checkpoint, instead of a
//! guarded transaction per slot ([`SlotWrite`](super::slot_write::SlotWrite): `WATCH`, the
//! check, `MULTI`, the operations, the checkpoint, `EXEC`).
//!
//! What holds is what the transaction gives, per slot:
//! - **Atomic per slot.** A script runs whole on its node; its writes reach replicas and the
//!   AOF as one `MULTI … EXEC`.
//! - **Guarded per slot.** Every slot's checkpoint is checked (epoch, owner, position)
//!   before anything is written; a refusal writes nothing.
//! - **Only where the keys are.** A slot whose keys are not all on the node (the map is
//!   stale, the slot is being migrated and a key has gone) is left out by the script's first
//!   pass, before any write, and the daemon sends it again as a transaction of its own, which
//!   follows `MOVED` and `ASK`. A migration cannot move keys while a script runs.
//!
//! - **All or nothing when Redis refuses writes.** Out of memory Redis refuses only a
//!   script's first write, and with writes stopped every write: the script stops at a
//!   refused first write, with nothing written, and the batch is sent again later (the
//!   session starts over), as a refused `MULTI … EXEC` would be.
//!
//! Parts with a merge or a hash replaced only if cached (themselves scripts) keep the
//! transaction.
//!
//! **Backfilled rows** (a part holding nothing else, [`fills_only`]) go in a compact form:
//! one `MSET` per slot (a `SET … PX` per row with a TTL) and the slot checkpoint's `HSET`,
//! with no `EXISTS` first and no check per slot:
//! - **Fenced per master.** Only the first slot checkpoint of the script found on the node
//!   is checked (a refusal writes nothing); past the first few, parts do not even carry
//!   their checkpoint's state. A daemon takes every slot over, one script per master, before
//!   it writes anything, so a late script of an old daemon runs before the new daemon's
//!   takeover of that master (older than anything the new daemon writes, and after every
//!   change of the old daemon the takeover saw) or after it, and is refused. (A position
//!   it moves in a slot the new daemon took over in an earlier script of that takeover is
//!   then seen as a loss by the new daemon, which rebuilds: costly, never stale.)
//! - **Every slot's position moves**, as with changes, so that a replica promoted without
//!   the rows is behind the daemon's record of each slot written. Past the first few, a
//!   part names only its checkpoint, and the script sets the fields every such move shares
//!   (the batch's position, given once): four arguments a slot besides its rows, not
//!   thirteen. A checkpoint no longer on the node (a migration moved it ahead of the rows)
//!   leaves the part out, to be sent again whole, rather than its position behind.
//! - **Where the rows are.** A row not on the node (its slot is being migrated away) makes
//!   Redis refuse its command; the part is then left out, its position unmoved, and sent
//!   again whole as a slot's transaction (writing a backfilled row twice is harmless).

use super::script::{add_ops, refusal, text, unexpected, Owner, Refused};
use super::slot_write::{checkpoint_commands, declared_keys, without_comments, SlotWriteError};
use super::Op;
use crate::checkpoint::{self, FIELD_APPLIED, FIELD_LSN, FIELD_UPDATED_MS};
use crate::Lsn;

/// The script without its comments (a batch carries it once per master).
static NODE_WRITE_BODY: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| without_comments(include_str!("node_write.lua")));

/// At most this many commands in one script, so that one master is not held for long.
pub const MAX_COMMANDS: usize = 4_096;

/// At most about this many bytes of values in one script (but a single slot's part): a
/// master holds a command's arguments until it runs, so this bounds what one script costs
/// it. (`client-query-buffer-limit` bounds the unparsed input, not a command's arguments:
/// Redis 7 took a 6 MB script under a 1 MB limit, and
/// `cluster_daemon::wide_rows_land_under_a_small_query_buffer_limit` writes wide rows so.)
pub const MAX_BYTES: usize = 64 << 20;

/// How many parts of backfilled rows in a script carry their slot checkpoint (the first
/// found on the node fences the others); more, in case the first are not on the node.
const CHECKED_FILL_PARTS: usize = 4;

/// The bytes of values `ops` carry.
pub fn value_bytes(ops: &[Op]) -> usize {
    ops.iter()
        .map(|op| match op {
            Op::Fill { value, .. } | Op::Set { value, .. } | Op::SetIfCached { value, .. } => {
                value.len()
            }
            Op::Hash { fields, .. } => fields.iter().map(|(f, v)| f.len() + v.len()).sum(),
            _ => 0,
        })
        .sum()
}

/// Whether `ops` are backfilled rows only, which go in a [`NodeWrite`] in a compact form,
/// fenced per master.
pub fn fills_only(ops: &[Op]) -> bool {
    !ops.is_empty() && ops.iter().all(|op| matches!(op, Op::Fill { .. }))
}

/// Whether `ops` can go in a [`NodeWrite`]: none of them is a script itself.
pub fn plain(ops: &[Op]) -> bool {
    ops.iter().all(|op| {
        !matches!(
            op,
            Op::Merge(_)
                | Op::Hash {
                    only_if_cached: true,
                    ..
                }
                | Op::DropKeySpace { .. }
                | Op::DropMatching { .. }
        )
    })
}

/// One slot's part in a [`NodeWrite`].
#[derive(Debug)]
pub struct NodePart<'a> {
    pub owner: Owner,
    pub ops: &'a [Op],
    /// Where the slot's checkpoint moves, if it does.
    pub position: Option<Lsn>,
    pub fields: &'a [(&'a str, &'a str)],
}

/// Several slots' writes for one master, built.
#[derive(Debug)]
pub struct NodeWrite {
    pub cmd: redis::Cmd,
    expected: Vec<Option<Lsn>>,
    /// How many commands the script runs.
    pub commands: usize,
}

/// What became of a [`NodeWrite`].
#[derive(Debug, PartialEq, Eq)]
pub enum NodeOutcome {
    /// Written, but for these parts (indexes into the parts), whose keys were not all on
    /// the node: nothing of theirs was written, or (backfilled rows only) not all of it,
    /// to be sent again whole.
    Applied { left_out: Vec<usize> },
}

impl NodeWrite {
    /// The script for `parts` (all [`plain`], all on one master), under session `token`.
    pub fn new(token: &str, parts: &[NodePart<'_>], now_ms: u64) -> NodeWrite {
        // Sized up front: a script may carry tens of MB of values.
        let (args, bytes) = parts
            .iter()
            .fold((10, NODE_WRITE_BODY.len() + 64), |(n, b), part| {
                let (ops, data) = part.ops.iter().fold((0, 0), |(n, b), op| {
                    let key = op.key().map_or(0, str::len);
                    (
                        n + 4,
                        b + 3 * key + value_bytes(std::slice::from_ref(op)) + 24,
                    )
                });
                (n + 12 + ops, b + 96 + data)
            });
        let mut cmd = redis::Cmd::with_capacity(args, bytes);
        cmd.arg("EVAL")
            .arg(NODE_WRITE_BODY.as_str())
            .arg(0)
            .arg(token);
        // The checkpoint fields a position move sets, once for the script: a batch moves
        // every slot it moves to the same position, so a part of backfilled rows names only
        // its checkpoint ('h'). A part moving elsewhere, or with fields of its own, carries
        // its commands ('g').
        let shared = parts.iter().find_map(|part| part.position);
        let (lsn, applied) = shared.map_or((String::new(), String::new()), |lsn| {
            (lsn.to_string(), checkpoint::hex(lsn))
        });
        cmd.arg(FIELD_UPDATED_MS)
            .arg(now_ms)
            .arg(FIELD_LSN)
            .arg(lsn)
            .arg(FIELD_APPLIED)
            .arg(applied);
        let mut commands = 0;
        let mut expected = Vec::with_capacity(parts.len());
        let add = |cmd: &mut redis::Cmd, commands: &mut usize, all: &[&redis::Cmd]| {
            cmd.arg(all.len());
            for one in all {
                cmd.arg(one.args_iter().len());
                for arg in one.args_iter() {
                    if let redis::Arg::Simple(bytes) = arg {
                        cmd.arg(bytes);
                    }
                }
                *commands += 1;
            }
        };
        // Parts of backfilled rows: the first few carry their checkpoint (the first found
        // on the node is checked and fences the others); the rest are bare ('g').
        let mut checked_fills = 0;
        for part in parts {
            let ck = &part.owner.checkpoint_key;
            let kind = if !fills_only(part.ops) {
                "w"
            } else if checked_fills < CHECKED_FILL_PARTS {
                checked_fills += 1;
                "f"
            } else if part.fields.is_empty() && (part.position.is_none() || part.position == shared)
            {
                "h"
            } else {
                "g"
            };
            cmd.arg(kind);
            if kind == "h" {
                // The checkpoint whose position moves, or none.
                cmd.arg(if part.position.is_some() {
                    ck.as_str()
                } else {
                    ""
                });
            } else if kind != "g" {
                cmd.arg(ck)
                    .arg(&part.owner.epoch)
                    .arg(checkpoint::position_text(part.owner.position));
            }
            if kind != "w" {
                // Backfilled rows: pairs for one MSET, then the rows with a TTL, then the
                // checkpoint's commands.
                let rows = || {
                    part.ops.iter().filter_map(|op| match op {
                        Op::Fill { key, value, ttl_ms } => Some((key, value, *ttl_ms)),
                        _ => None,
                    })
                };
                let plain = rows().filter(|(.., ttl)| ttl.is_none()).count();
                cmd.arg(plain);
                for (key, value, _) in rows().filter(|(.., ttl)| ttl.is_none()) {
                    cmd.arg(key).arg(value);
                }
                cmd.arg(part.ops.len() - plain);
                for (key, value, ttl) in rows() {
                    if let Some(ms) = ttl {
                        cmd.arg(key).arg(value).arg(ms);
                    }
                }
                commands += plain.div_ceil(500) + part.ops.len() - plain;
                if kind == "h" {
                    commands += usize::from(part.position.is_some());
                } else {
                    let tail = match part.position {
                        Some(_) => checkpoint_commands(ck, part.position, part.fields, now_ms),
                        None => Vec::new(),
                    };
                    add(&mut cmd, &mut commands, &tail.iter().collect::<Vec<_>>());
                }
            } else {
                let keys = declared_keys(part.ops);
                cmd.arg(keys.len()).arg(&keys);
                let mut pipe = redis::pipe();
                add_ops(&mut pipe, ck, part.ops, &mut Vec::new());
                let tail = checkpoint_commands(ck, part.position, part.fields, now_ms);
                let all: Vec<&redis::Cmd> = pipe.cmd_iter().chain(tail.iter()).collect();
                add(&mut cmd, &mut commands, &all);
            }
            expected.push(part.owner.position);
        }
        NodeWrite {
            cmd,
            expected,
            commands,
        }
    }

    /// Reads the script's reply.
    ///
    /// # Errors
    /// [`SlotWriteError::Refused`] with the index of the part whose check failed (nothing
    /// was written); a Redis error for a reply that makes no sense.
    pub fn outcome(&self, reply: &redis::Value) -> Result<NodeOutcome, (usize, SlotWriteError)> {
        let bad = |what: &str| (0, SlotWriteError::Redis(unexpected(what)));
        let redis::Value::Array(items) = reply else {
            return Err(bad(&format!("the node write replied {reply:?}")));
        };
        let index = |value: &redis::Value| match value {
            redis::Value::Int(i) if *i >= 1 && (*i as usize) <= self.expected.len() => {
                Some(*i as usize - 1)
            }
            _ => None,
        };
        let status = items.first().map(text).unwrap_or_default();
        match status.as_str() {
            "ok" => {
                let left_out = items[1..]
                    .iter()
                    .map(|v| index(v).ok_or_else(|| bad("a left-out index is out of range")))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(NodeOutcome::Applied { left_out })
            }
            "epoch" | "owner" | "moved" => {
                let found = items.get(1).map(text).unwrap_or_default();
                let at = items
                    .get(2)
                    .and_then(index)
                    .ok_or_else(|| bad("a refusal without its part"))?;
                let kind = match status.as_str() {
                    "epoch" => "epoch",
                    "owner" => "owner",
                    _ => "moved",
                };
                let refused: Refused = refusal((kind, found), self.expected[at]);
                Err((at, SlotWriteError::Refused(refused)))
            }
            "unwritten" => {
                // Redis refused the script's first write (out of memory, writes stopped):
                // nothing of it was written.
                let why = items.get(1).map(text).unwrap_or_default();
                Err((
                    0,
                    SlotWriteError::Redis(redis::RedisError::from((
                        redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
                        "redis refused the writes",
                        why,
                    ))),
                ))
            }
            other => Err(bad(&format!("the node write replied {other:?}"))),
        }
    }
}
