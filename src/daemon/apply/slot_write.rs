//! The guarded write of one hash slot's part of a batch, for the planned cluster apply
//! (docs/cluster.md): the write of [`script`](super::script) with the slot's own checkpoint,
//! as a [`SlotTransaction`] for the [`SlotRouter`](crate::daemon::slot_router::SlotRouter).
//! Nothing in the daemon uses it yet.
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
use crate::checkpoint::{self, FIELD_APPLIED, FIELD_LSN, FIELD_UPDATED_MS};
use crate::daemon::slot_router::{SlotReplies, SlotTransaction};
use crate::template::lease_key;
use crate::Lsn;

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
        let ck = &owner.checkpoint_key;
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
                declare(lease_key(key));
            }
            if let Op::Merge(merge) = op {
                declare(merge.base.clone());
            }
        }
        let mut watch = redis::cmd("WATCH");
        watch.arg(ck);
        let mut check = redis::cmd("EVAL");
        check
            .arg(CHECK)
            .arg(1 + keys.len())
            .arg(ck)
            .arg(&keys)
            .arg(&owner.token)
            .arg(&owner.epoch)
            .arg(checkpoint::position_text(owner.position));
        let mut pipe = redis::pipe();
        let mut merges = Vec::new();
        add_ops(&mut pipe, ck, ops, &mut merges);
        let mut set = redis::cmd("HSET");
        set.arg(ck).arg(FIELD_UPDATED_MS).arg(now_ms);
        if let Some(lsn) = position {
            set.arg(FIELD_LSN)
                .arg(lsn.to_string())
                .arg(FIELD_APPLIED)
                .arg(checkpoint::hex(lsn));
        }
        let mut queued: Vec<redis::Cmd> = pipe.cmd_iter().cloned().collect();
        queued.push(set);
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
