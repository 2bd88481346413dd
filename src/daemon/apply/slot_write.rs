//! The guarded write of one hash slot's part of a batch, for the cluster apply
//! (`daemon::cluster_apply`; docs/cluster.md): the write of [`script`](super::script)
//! with the slot's own checkpoint, as a [`SlotTransaction`] for the [`SlotRouter`].
//!
//! ```text
//! WATCH <slot checkpoint>
//! EVAL check.lua <slot checkpoint> <every key, lease and merge base> owner epoch position
//! MULTI
//!   ... the slot's operations ...
//!   HSET <slot checkpoint> lsn … applied … updated_ms …
//! EXEC
//! ```
//!
//! The check declares every key of the part, not only the checkpoint: during a migration
//! of the slot it then runs only where all of them are (docs/cluster.md, "Resharding").
//! An `EXEC` that answers nil is [`SlotOutcome::Retry`], not fencing: `MIGRATE` of the
//! checkpoint touches the `WATCH`; the check decides again when it is sent again.

use std::collections::BTreeSet;

use super::script::{add_ops, check_status, refusal, unexpected, Owner, Refused, CHECK};
use super::{Op, Repair};
use crate::checkpoint::{
    self, CheckpointError, Takeover, FIELD_APPLIED, FIELD_LSN, FIELD_UPDATED_MS,
};
use crate::cluster::CLUSTER_SLOTS;
use crate::daemon::slot_router::{RouteError, SlotReplies, SlotRouter, SlotTransaction};
use crate::template::lease_key;
use crate::Lsn;

/// The check script without its comments: a batch carries it once per slot it touches.
static CHECK_BODY: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| without_comments(CHECK));

/// The takeover script without its comments: a start carries it 16384 times.
static TAKEOVER_BODY: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| without_comments(checkpoint::TAKEOVER_LUA));

/// A Lua script without its comment lines (the scripts' comments are whole lines).
pub(super) fn without_comments(script: &str) -> String {
    script
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One slot's write, built.
#[derive(Debug)]
pub struct SlotWrite {
    pub tx: SlotTransaction,
    merges: Vec<(usize, Option<Repair>)>,
    expected: Option<Lsn>,
}

/// What became of a slot's write.
#[derive(Debug, PartialEq, Eq)]
pub enum SlotOutcome {
    /// Written; mirror keys whose merge found no base, to read again.
    Applied { repairs: Vec<Repair> },
    /// Nothing was written: the watched checkpoint changed (a migration moved it, or a
    /// takeover); send the same write again, and its check decides.
    Retry,
}

/// Why a slot's write failed.
#[derive(Debug, thiserror::Error)]
pub enum SlotWriteError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl SlotWrite {
    /// The write of `ops` (all in the hash slot of `owner.checkpoint_key`), moving the slot's
    /// checkpoint to `position` if given.
    pub fn new(owner: &Owner, ops: &[Op], position: Option<Lsn>, now_ms: u64) -> SlotWrite {
        SlotWrite::with_fields(owner, ops, position, &[], now_ms)
    }

    /// As [`new`](Self::new), also setting checkpoint `fields` (an empty value removes one).
    pub fn with_fields(
        owner: &Owner,
        ops: &[Op],
        position: Option<Lsn>,
        fields: &[(&str, &str)],
        now_ms: u64,
    ) -> SlotWrite {
        let ck = &owner.checkpoint_key;
        let keys = declared_keys(ops);
        let mut watch = redis::cmd("WATCH");
        watch.arg(ck);
        let mut check = redis::cmd("EVAL");
        check
            .arg(CHECK_BODY.as_str())
            .arg(1 + keys.len())
            .arg(ck)
            .arg(&keys)
            .arg(&owner.token)
            .arg(&owner.epoch)
            .arg(checkpoint::position_text(owner.position));
        let mut pipe = redis::pipe();
        let mut merges = Vec::new();
        add_ops(&mut pipe, ck, ops, &mut merges);
        let mut queued: Vec<redis::Cmd> = pipe.cmd_iter().cloned().collect();
        queued.extend(checkpoint_commands(ck, position, fields, now_ms));
        SlotWrite {
            tx: SlotTransaction {
                pre: vec![watch, check],
                ops: queued,
            },
            merges,
            expected: owner.position,
        }
    }

    /// Reads what the router got back.
    ///
    /// # Errors
    /// [`SlotWriteError::Refused`] when the check failed (nothing was written); a Redis
    /// error for a reply that makes no sense.
    pub fn outcome(&self, replies: &SlotReplies) -> Result<SlotOutcome, SlotWriteError> {
        let check = replies
            .pre
            .get(1)
            .ok_or_else(|| unexpected("the check's reply is missing"))?;
        if let Some(status) = check_status(check)? {
            return Err(refusal(status, self.expected).into());
        }
        let results = match &replies.exec {
            redis::Value::Array(results) => results,
            redis::Value::Nil => return Ok(SlotOutcome::Retry),
            other => return Err(unexpected(&format!("EXEC replied {other:?}")).into()),
        };
        let mut repairs = Vec::new();
        for (at, repair) in &self.merges {
            match results.get(*at) {
                Some(redis::Value::Int(0)) => repairs.extend(repair.clone()),
                Some(redis::Value::Int(_)) => {}
                Some(redis::Value::ServerError(e)) => {
                    return Err(unexpected(&format!("a merge failed: {e:?}")).into())
                }
                _ => return Err(unexpected("a merge's reply is missing").into()),
            }
        }
        Ok(SlotOutcome::Applied { repairs })
    }
}

/// Every key a slot's part touches and must find on its node: each row key, its lease
/// (but for a backfilled row's, which is left alone), and each merge base.
pub(super) fn declared_keys(ops: &[Op]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut keys = Vec::new();
    let mut declare = |key: String| {
        if seen.insert(key.clone()) {
            keys.push(key);
        }
    };
    for op in ops {
        if let Some(key) = op.key() {
            declare(key.to_string());
            if !matches!(op, Op::Fill { .. }) {
                declare(lease_key(key));
            }
        }
        if let Op::Merge(merge) = op {
            declare(merge.base.clone());
        }
    }
    keys
}

/// The commands that end a slot's write: its checkpoint's `updated_ms`, its position if it
/// moves, and `fields` (an empty value removes one).
pub(super) fn checkpoint_commands(
    ck: &str,
    position: Option<Lsn>,
    fields: &[(&str, &str)],
    now_ms: u64,
) -> Vec<redis::Cmd> {
    let mut set = redis::cmd("HSET");
    set.arg(ck).arg(FIELD_UPDATED_MS).arg(now_ms);
    if let Some(lsn) = position {
        set.arg(FIELD_LSN)
            .arg(lsn.to_string())
            .arg(FIELD_APPLIED)
            .arg(checkpoint::hex(lsn));
    }
    let mut removed = Vec::new();
    for (field, value) in fields {
        if value.is_empty() {
            removed.push(*field);
        } else {
            set.arg(*field).arg(*value);
        }
    }
    let mut out = vec![set];
    if !removed.is_empty() {
        let mut del = redis::cmd("HDEL");
        del.arg(ck).arg(removed);
        out.push(del);
    }
    out
}

/// The takeover script over many slot checkpoints of one master (see [`per_master`]).
const TAKEOVER_MANY: &str = r"
local out = {}
for i = 3, #ARGV do
  local ck = ARGV[i]
  -- 1 when the hash had no epoch (now set): Redis lost the slot's data, or a first start.
  local fresh = redis.pcall('HSETNX', ck, 'epoch', ARGV[2])
  if type(fresh) == 'table' then
    out[#out + 1] = 'elsewhere'
  else
    redis.call('HSET', ck, 'owner', ARGV[1])
    out[#out + 1] = {fresh, redis.call('HGETALL', ck)}
  end
end
return out
";

/// What a script of [`per_master`] answers for a key that is not on its node.
const ELSEWHERE: &[u8] = b"elsewhere";

/// Runs `body` once per master (and per 4096 keys) over the slot checkpoints `keys` (one
/// per slot) it serves, the masters at once, with `fixed` as its first arguments and the
/// keys after them. The script answers one value per key, or `'elsewhere'` for a key its
/// node refused (the map is stale, or the slot is migrating and the key has gone), which
/// it must not have touched: that key's answer here is `None`, for the caller to send on
/// its own through the router, which follows redirections.
///
/// A script without a shebang may touch keys of several slots as long as they are all on
/// its node; a master's part is then one command instead of one per slot.
///
/// # Errors
/// A connection error, or a reply that is not one value per key.
pub async fn per_master(
    router: &mut SlotRouter,
    body: &str,
    fixed: &[&str],
    keys: &[(u16, String)],
) -> Result<Vec<Option<redis::Value>>, RouteError> {
    const CHUNK: usize = 4_096;
    let mut by_node: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for (i, (slot, _)) in keys.iter().enumerate() {
        if let Some(addr) = router.owner(*slot) {
            by_node.entry(addr.to_string()).or_default().push(i);
        }
    }
    let mut sends = Vec::new();
    for (addr, indexes) in by_node {
        let conn = router.node(&addr).await?;
        for chunk in indexes.chunks(CHUNK) {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(body).arg(0).arg(fixed);
            for &i in chunk {
                cmd.arg(&keys[i].1);
            }
            sends.push((chunk.to_vec(), cmd, conn.clone()));
        }
    }
    let replies = futures_util::future::join_all(sends.iter().map(|(_, cmd, conn)| {
        let mut conn = conn.clone();
        async move { cmd.query_async::<redis::Value>(&mut conn).await }
    }))
    .await;
    let mut out = vec![None; keys.len()];
    for ((chunk, _, _), reply) in sends.iter().zip(replies) {
        let values = match reply {
            Ok(redis::Value::Array(values)) if values.len() == chunk.len() => values,
            Ok(other) => {
                return Err(RouteError::Redis(unexpected(&format!(
                    "a script over {} slot checkpoints replied {other:?}",
                    chunk.len()
                ))))
            }
            // The node is not serving (a failover, the cluster down): each key on its own.
            Err(e) if e.kind() != redis::ErrorKind::Io && e.code().is_some() => continue,
            Err(e) => return Err(e.into()),
        };
        for (&i, value) in chunk.iter().zip(values) {
            let elsewhere = matches!(&value, redis::Value::BulkString(b) if b == ELSEWHERE);
            if !elsewhere {
                out[i] = Some(value);
            }
        }
    }
    Ok(out)
}

/// Why the takeover of the slot checkpoints failed.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// Makes every hash slot's checkpoint this session's (docs/cluster.md, "Fencing per slot"):
/// the takeover script of one server on each of the 16384 slot checkpoints, pipelined per
/// master, before the first write. Returns each slot's state as the takeover found it,
/// indexed by slot (`fresh`: the slot had no epoch, first start or its data lost).
///
/// # Errors
/// A routing error, or a checkpoint that does not parse.
pub async fn takeover_slots(
    router: &mut SlotRouter,
    key_prefix: &str,
    pg_slot: &str,
    owner: &str,
    new_epoch: &str,
) -> Result<Vec<Takeover>, TakeoverError> {
    let keys: Vec<String> = (0..CLUSTER_SLOTS)
        .map(|slot| checkpoint::slot_checkpoint_key(key_prefix, pg_slot, slot))
        .collect();
    let by_slot: Vec<(u16, String)> = (0..CLUSTER_SLOTS)
        .map(|slot| (slot, keys[usize::from(slot)].clone()))
        .collect();
    let mut replies = per_master(router, TAKEOVER_MANY, &[owner, new_epoch], &by_slot).await?;
    // What the masters' scripts left out, one slot at a time.
    let left: Vec<(u16, redis::Cmd)> = (0..CLUSTER_SLOTS)
        .filter(|&slot| replies[usize::from(slot)].is_none())
        .map(|slot| {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(TAKEOVER_BODY.as_str())
                .arg(1)
                .arg(&keys[usize::from(slot)])
                .arg(owner)
                .arg(new_epoch);
            (slot, cmd)
        })
        .collect();
    if !left.is_empty() {
        for ((slot, _), reply) in left.iter().zip(router.send_each(&left).await?) {
            replies[usize::from(*slot)] = Some(reply);
        }
    }
    let replies = replies
        .into_iter()
        .map(|reply| reply.unwrap_or(redis::Value::Nil));
    let mut out = Vec::with_capacity(replies.len());
    for (key, reply) in keys.iter().zip(replies) {
        let (fresh, fields): (i64, Vec<(String, String)>) = redis::from_redis_value(reply)
            .map_err(|e| CheckpointError::from(redis::RedisError::from(e)))?;
        out.push(Takeover {
            state: checkpoint::parse_state(key, fields)?,
            fresh: fresh == 1,
        });
    }
    Ok(out)
}
