//! The daemon's apply on a Redis Cluster (docs/cluster.md, "Design").
//!
//! A `MULTI … EXEC` can only span one hash slot, so each hash slot has a checkpoint of its
//! own ([`checkpoint::slot_checkpoint_key`], in that slot), and a batch is written slot by
//! slot: each slot's operations with its checkpoint in one guarded transaction
//! ([`SlotWrite`]), the transactions for one master in one pipeline, the masters at once
//! ([`SlotRouter::send_many`]). The stream's own checkpoint (the root) is written after every
//! slot acknowledged the batch, with its position: the frontier `F` up to which every slot
//! holds every change, and the only position confirmed to Postgres.
//!
//! - **Exactly once per key.** A session streams from `F`. A change whose slot's checkpoint
//!   already covers it (its transaction, or for a transaction written in parts, its rank
//!   below the slot's `partial`) is left out for that slot ([`ClusterApply::covered`]).
//! - **Atomic per hash slot**, in stream order per slot. A key-space operation (`TRUNCATE`,
//!   dropped invalidation keys) becomes, per slot that holds matching keys, a delete with
//!   that slot's checkpoint.
//! - **A slot's position** moves only with its last write of a batch, and so does the
//!   batch's `partial` mark, so a crash between two of a batch's writes to one slot replays
//!   the batch's part for that slot in order. (A mark written with an earlier write made a
//!   crash skip the rest of the part in that slot: review 4.)
//! - **Fencing per slot.** The takeover writes the session's owner into every slot
//!   checkpoint before the first write ([`takeover_slots`]); a late write of an older
//!   session fails its check there. The heartbeat reads every slot checkpoint back
//!   ([`ClusterApply::check_slots`]), so a slot that lost writes (a replica promoted
//!   without them) is noticed within seconds even if no change reaches it.
//! - **`stopped`** (tables whose keys readers may not fill) is written into every slot
//!   checkpoint before the keys are dropped, since a fill checks its own slot's.
//! - **Repairs** (`repair:<key>`, a mirror key deleted because its merge had no base, to be
//!   read again) are recorded in the key's slot checkpoint in the same transaction as the
//!   delete, read back at the takeover, and removed there after the read wrote the key.

use std::collections::{BTreeMap, BTreeSet};

use futures_util::{FutureExt, StreamExt};
use tracing::{debug, info, warn};

use super::apply::node_write::{self, NodeOutcome, NodePart, NodeWrite};
use super::apply::script::{Owner, Refused};
use super::apply::slot_write::{
    per_master, takeover_slots, SlotOutcome, SlotWrite, SlotWriteError,
};
use super::apply::slots::{split_skipping, Segment};
use super::apply::{ChangeTag, Op, Repair};
use super::slot_router::{RouteError, SlotRouter, SlotTransaction};
use super::RunError;
use crate::checkpoint::{
    self, Partial, Takeover, FIELD_PARTIAL, FIELD_REPAIR_PREFIX, FIELD_STOPPED,
};
use crate::cluster::{key_slot, CLUSTER_SLOTS};
use crate::template::{glob_escape, LEASE_SUFFIX};
use crate::Lsn;

/// Sets or removes the `stopped` field of a slot checkpoint, if this session owns it.
const SET_STOPPED: &str = r"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('HDEL', KEYS[1], 'stopped')
else redis.call('HSET', KEYS[1], 'stopped', ARGV[2]) end
return 1
";

/// [`SET_STOPPED`] over many slot checkpoints of one master (see [`per_master`]).
const SET_STOPPED_MANY: &str = r"
local out = {}
for i = 3, #ARGV do
  local ck = ARGV[i]
  local owner = redis.pcall('HGET', ck, 'owner')
  if type(owner) == 'table' then
    out[#out + 1] = 'elsewhere'
  elseif owner ~= ARGV[1] then
    out[#out + 1] = 0
  else
    if ARGV[2] == '' then redis.call('HDEL', ck, 'stopped')
    else redis.call('HSET', ck, 'stopped', ARGV[2]) end
    out[#out + 1] = 1
  end
end
return out
";

/// How many times a slot's write is sent again after its `WATCH` saw a change (a
/// migration moving the checkpoint) before the session gives up.
const RETRIES: usize = 50;

/// What this session expects of one slot's checkpoint.
#[derive(Debug, Clone)]
struct SlotMark {
    epoch: String,
    position: Option<Lsn>,
}

/// A slot checkpoint as the takeover found it: what the slot already holds.
#[derive(Debug, Clone, Copy, Default)]
struct Found {
    position: Option<Lsn>,
    partial: Option<Partial>,
}

/// A batch every slot acknowledged.
#[derive(Debug, Default)]
pub(crate) struct ClusterApplied {
    /// Mirror keys to read again (a merge without a base, or with its base in another slot).
    pub repairs: Vec<Repair>,
    /// Slots whose checkpoint moved, and where to (recorded in the root checkpoint).
    pub moved: Vec<(u16, Lsn)>,
}

/// What a slot's last write of a batch carries.
struct Mark<'a> {
    position: Option<Lsn>,
    fields: &'a [(&'a str, &'a str)],
    now_ms: u64,
}

/// The slots a batch with a key-space operation wrote, and those whose last write of the
/// batch is done.
#[derive(Default)]
struct Track {
    written: BTreeSet<u16>,
    finished: BTreeSet<u16>,
}

/// The cluster side of a session: the router, and every slot checkpoint's state.
pub(crate) struct ClusterApply {
    router: SlotRouter,
    token: String,
    marks: Vec<SlotMark>,
    found: Vec<Found>,
    /// Each slot's checkpoint key, by slot (formatted once: a batch names thousands).
    checkpoint_keys: Vec<String>,
    /// The `stopped` text every slot checkpoint holds (`None`: the slots did not agree when
    /// the session took them over, so the next value is written whatever it is).
    stopped: Option<String>,
    /// Masters written since the last `WAIT`.
    written: BTreeSet<String>,
}

impl std::fmt::Debug for ClusterApply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterApply")
            .field("masters", &self.router.masters())
            .finish_non_exhaustive()
    }
}

/// One `SCAN … MATCH` step on one node: the next cursor ("0" at the end) and the keys.
async fn scan_step(
    conn: &mut redis::aio::MultiplexedConnection,
    cursor: &str,
    pattern: &str,
) -> Result<(String, Vec<String>), redis::RedisError> {
    redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(SCAN_COUNT)
        .query_async(conn)
        .await
}

/// Every key of one node that matches `pattern`, a page at a time to `page`.
async fn scan_pages(
    mut conn: redis::aio::MultiplexedConnection,
    pattern: &str,
    mut page: impl FnMut(Vec<String>),
) -> Result<(), redis::RedisError> {
    let mut cursor = "0".to_string();
    loop {
        let (next, keys) = scan_step(&mut conn, &cursor, pattern).await?;
        page(keys);
        if next == "0" {
            return Ok(());
        }
        cursor = next;
    }
}

/// Keys one pass of a key-space drop lists at most: a drop of more lists a range of slots
/// at a time (a slot with more, a part of it at a time), each a scan of every master, so
/// that the daemon's memory does not grow with the table (G8). A 600,000-key drop raised
/// the daemon's peak RSS by about 8 MB.
const DROP_KEYS_PER_PASS: usize = 100_000;

/// Keys of one slot one write of a key-space drop deletes at most: a slot with more (a big
/// hash tag) is deleted in several writes, its position and fields moving with the last.
/// (A write costs the daemon several times its keys' size while it is built and sent.)
const DROP_KEYS_PER_WRITE: usize = 10_000;

/// What a pass of a key-space drop found.
#[derive(Debug)]
enum Listing {
    /// The keys, by slot.
    Keys(BTreeMap<u16, Vec<String>>),
    /// Too many to hold: how many each slot has.
    TooMany(Vec<u32>),
    /// One slot with too many to hold: the first of them (the budget's worth); more are
    /// left.
    Part(BTreeMap<u16, Vec<String>>),
}

/// A key-space drop's listing as its pages come (see [`ClusterApply::keys_of`]).
struct Collect<'a> {
    range: (u16, u16),
    /// Slots the drop leaves out (their checkpoint covers it): neither listed nor counted.
    skip: &'a [bool],
    budget: usize,
    counts: Vec<u32>,
    keys: BTreeMap<u16, Vec<String>>,
    held: usize,
    over: bool,
}

impl Collect<'_> {
    fn new(range: (u16, u16), budget: usize, skip: &[bool]) -> Collect<'_> {
        Collect {
            range,
            skip,
            budget,
            counts: vec![0; usize::from(CLUSTER_SLOTS)],
            keys: BTreeMap::new(),
            held: 0,
            over: false,
        }
    }

    fn page(&mut self, keys: Vec<String>) {
        let one_slot = self.range.0 == self.range.1;
        for key in keys {
            let slot = key_slot(key.as_bytes());
            if slot < self.range.0
                || slot > self.range.1
                || self.skip.get(usize::from(slot)).copied().unwrap_or(false)
            {
                continue;
            }
            self.counts[usize::from(slot)] += 1;
            if self.over {
                continue;
            }
            if self.held == self.budget {
                // Over the budget: a range of slots is listed again in smaller ranges;
                // one slot keeps the budget's worth, to be deleted before the rest.
                self.over = true;
                if !one_slot {
                    self.keys = BTreeMap::new();
                }
                continue;
            }
            self.keys.entry(slot).or_default().push(key);
            self.held += 1;
        }
    }

    fn finish(self) -> Listing {
        if self.over && self.range.0 != self.range.1 {
            return Listing::TooMany(self.counts);
        }
        let mut keys = self.keys;
        for keys in keys.values_mut() {
            keys.sort();
            keys.dedup();
        }
        if self.over {
            Listing::Part(keys)
        } else {
            Listing::Keys(keys)
        }
    }
}

/// Consecutive slot ranges holding at most `budget` keys each by `counts` (a slot with more
/// has a range of its own); slots without keys at either end are left out.
fn drop_ranges(counts: &[u32], budget: usize) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    let mut current: Option<(u16, u16, usize)> = None;
    for (slot, &n) in counts.iter().enumerate() {
        let (slot, n) = (slot as u16, n as usize);
        if n == 0 {
            continue;
        }
        current = match current {
            Some((lo, _, held)) if held + n <= budget => Some((lo, slot, held + n)),
            Some((lo, hi, _)) => {
                out.push((lo, hi));
                Some((slot, slot, n))
            }
            None => Some((slot, slot, n)),
        };
    }
    if let Some((lo, hi, _)) = current {
        out.push((lo, hi));
    }
    out
}

/// Keys a `SCAN` call looks at: a node spends well under a millisecond on them.
const SCAN_COUNT: usize = 5_000;

/// Deletes the given keys of the node it runs on, whichever slots they are in; returns how
/// many were not there to delete (their slot moved away).
const DEL_HERE: &str = r"
local missed = 0
for i = 1, #ARGV do
  local r = redis.pcall('DEL', ARGV[i])
  if type(r) == 'table' and r.err then missed = missed + 1 end
end
return missed
";

/// Deletes, on every master, the leases that match `patterns` (a lease lives in its row
/// key's slot, so on that key's node). `false` when a lease was not on the node that listed
/// it (its slot moved meanwhile): the caller starts again.
async fn revoke_leases(
    conns: &[redis::aio::MultiplexedConnection],
    patterns: &[String],
) -> Result<bool, RunError> {
    // A page at a time: cached absences are leases too, and there can be millions (G8).
    let revoked = futures_util::future::try_join_all(conns.iter().map(|conn| async move {
        let mut conn = conn.clone();
        let mut missed = 0u64;
        for pattern in patterns {
            let mut cursor = "0".to_string();
            loop {
                let (next, keys) = scan_step(&mut conn, &cursor, pattern).await?;
                let leases: Vec<String> = keys
                    .into_iter()
                    .filter(|k| k.ends_with(LEASE_SUFFIX))
                    .collect();
                for chunk in leases.chunks(1_000) {
                    missed += redis::cmd("EVAL")
                        .arg(DEL_HERE)
                        .arg(0)
                        .arg(chunk)
                        .query_async::<u64>(&mut conn)
                        .await?;
                }
                if next == "0" {
                    break;
                }
                cursor = next;
            }
        }
        Ok::<_, redis::RedisError>(missed == 0)
    }))
    .await?;
    Ok(revoked.into_iter().all(|ok| ok))
}

/// What became of one script of a [`ClusterApply::send_nodes`].
enum Sent {
    /// Written, but for these parts (indexes into the script's parts).
    Applied(Vec<usize>),
    /// A part's check failed: nothing of the script was written.
    Refused((usize, SlotWriteError)),
    /// The node did not serve it (a failover, the cluster down): nothing was written.
    NotServing(redis::RedisError),
    /// Redis or the connection failed.
    Failed(redis::RedisError),
}

impl Sent {
    /// Whether the session ends on it: nothing more is sent to that master.
    fn ends_session(&self) -> bool {
        matches!(self, Sent::Refused(_) | Sent::Failed(_))
    }

    fn of(write: &NodeWrite, reply: redis::RedisResult<redis::Value>) -> Sent {
        match reply {
            Ok(reply) => match write.outcome(&reply) {
                Ok(NodeOutcome::Applied { left_out }) => Sent::Applied(left_out),
                Err(refused) => Sent::Refused(refused),
            },
            Err(e)
                if matches!(
                    e.kind(),
                    redis::ErrorKind::Server(
                        redis::ServerErrorKind::ClusterDown
                            | redis::ServerErrorKind::TryAgain
                            | redis::ServerErrorKind::Moved
                            | redis::ServerErrorKind::Ask
                    )
                ) =>
            {
                Sent::NotServing(e)
            }
            Err(e) => Sent::Failed(e),
        }
    }
}

/// How many node-write scripts may be alive (built or sent, not yet answered) per master.
const SCRIPTS_IN_FLIGHT: usize = 2;

fn route_error(e: RouteError) -> RunError {
    match e {
        RouteError::Redis(e) => e.into(),
        other => RunError::transient("redis", other.to_string()),
    }
}

fn slot_error(slot: u16, e: SlotWriteError) -> RunError {
    match e {
        SlotWriteError::Redis(e) => e.into(),
        SlotWriteError::Refused(refused) => {
            let kind = match refused {
                Refused::Fenced(_) => {
                    metrics::counter!(crate::metrics::FENCED).increment(1);
                    "fenced"
                }
                Refused::EpochGone | Refused::Moved { .. } => "redis_data_lost",
            };
            RunError::transient(kind, format!("redis cluster hash slot {slot}: {refused}"))
        }
    }
}

impl ClusterApply {
    /// Takes every slot checkpoint over for this session (`token`, the root's owner token)
    /// and returns the apply with each slot's state as found.
    ///
    /// # Errors
    /// A routing error, or a slot checkpoint that does not parse.
    pub(crate) async fn take_over(
        mut router: SlotRouter,
        key_prefix: &str,
        pg_slot: &str,
        token: &str,
    ) -> Result<(ClusterApply, Vec<Takeover>), RunError> {
        let taken = takeover_slots(
            &mut router,
            key_prefix,
            pg_slot,
            token,
            &checkpoint::random_token(),
        )
        .await
        .map_err(|e| match e {
            super::apply::slot_write::TakeoverError::Route(e) => route_error(e),
            super::apply::slot_write::TakeoverError::Checkpoint(e) => e.into(),
        })?;
        let marks = taken
            .iter()
            .map(|t| SlotMark {
                epoch: t.state.epoch.clone().unwrap_or_default(),
                position: t.state.lsn,
            })
            .collect();
        let found = taken
            .iter()
            .map(|t| Found {
                position: t.state.lsn,
                partial: t.state.partial,
            })
            .collect();
        Ok((
            ClusterApply {
                router,
                token: token.to_string(),
                marks,
                found,
                checkpoint_keys: (0..CLUSTER_SLOTS)
                    .map(|slot| checkpoint::slot_checkpoint_key(key_prefix, pg_slot, slot))
                    .collect(),
                // What every slot says is stopped, where they agree: a session writes it
                // again only if it differs (at start, usually not: no table stopped).
                stopped: taken
                    .split_first()
                    .filter(|(first, rest)| {
                        rest.iter().all(|t| t.state.stopped == first.state.stopped)
                    })
                    .map(|(first, _)| first.state.stopped.clone()),
                written: BTreeSet::new(),
            },
            taken,
        ))
    }

    /// The furthest position a slot held when the session took it over: until the stream
    /// is past it, some slots skip changes they hold.
    pub(crate) fn ahead(&self) -> Option<Lsn> {
        self.found.iter().filter_map(|f| f.position).max()
    }

    /// Whether slot `slot` held the change `tag` when the session took it over.
    fn covered(found: &[Found], slot: u16, tag: ChangeTag) -> bool {
        let found = &found[usize::from(slot)];
        if found.position.is_some_and(|p| tag.commit_lsn < p) {
            return true;
        }
        found
            .partial
            .is_some_and(|p| p.commit_lsn == tag.commit_lsn && tag.change <= p.changes)
    }

    /// A connection to each master, for scans.
    ///
    /// # Errors
    /// A master cannot be reached.
    async fn master_connections(
        &mut self,
    ) -> Result<Vec<redis::aio::MultiplexedConnection>, RunError> {
        let mut out = Vec::new();
        for addr in self.router.masters() {
            out.push(self.router.node(&addr).await?);
        }
        Ok(out)
    }

    fn owner_of(&self, slot: u16) -> Owner {
        let mark = &self.marks[usize::from(slot)];
        Owner {
            checkpoint_key: self.checkpoint_keys[usize::from(slot)].clone(),
            token: self.token.clone(),
            epoch: mark.epoch.clone(),
            position: mark.position,
        }
    }

    /// Writes a batch: its operations slot by slot, each slot's checkpoint moved to
    /// `position` with the slot's last write of the batch; `fields` are the root's
    /// checkpoint fields (of which `stopped` and `partial` also go to the slots).
    ///
    /// # Errors
    /// A slot refused the write (fencing, or a slot that lost data), or Redis failed. Slots
    /// written before the error keep their part; the root is not moved, so the next
    /// session replays the batch from `F` and those slots skip what they hold.
    pub(crate) async fn write(
        &mut self,
        ops: Vec<Op>,
        tags: Vec<Option<ChangeTag>>,
        position: Option<Lsn>,
        fields: &[(String, String)],
        now_ms: u64,
    ) -> Result<ClusterApplied, RunError> {
        let last = |name: &str| {
            fields
                .iter()
                .rev()
                .find(|(field, _)| field == name)
                .map(|(_, value)| value.clone())
        };
        if let Some(stopped) = last(FIELD_STOPPED) {
            if self.stopped.as_ref() != Some(&stopped) {
                self.write_stopped(&stopped).await?;
                self.stopped = Some(stopped);
            }
        }
        let partial = last(FIELD_PARTIAL);
        let slot_fields: Vec<(&str, &str)> = partial
            .as_deref()
            .map(|p| (FIELD_PARTIAL, p))
            .into_iter()
            .collect();
        let found = &self.found;
        let split = split_skipping(ops, tags, |slot, tag| {
            ClusterApply::covered(found, slot, tag)
        });
        let mut out = ClusterApplied::default();
        // Each slot's last Slots segment, and the last key-space segment. (A slot's position
        // moves with backfilled rows too: a promoted replica without them is then seen
        // behind the root's record of the slot.)
        let mut last_write: BTreeMap<u16, usize> = BTreeMap::new();
        let mut last_everywhere = None;
        for (at, segment) in split.segments.iter().enumerate() {
            match segment {
                Segment::Slots(slots) => {
                    for &slot in slots.keys() {
                        last_write.insert(slot, at);
                    }
                }
                Segment::Everywhere(..) => last_everywhere = Some(at),
            }
        }
        // Whether a slot's write in segment `at` is its last of the batch: the one that
        // moves its position and carries the batch's slot fields (`partial`). An earlier
        // write carries neither, so that a crash after it replays the rest of the batch in
        // that slot, not less.
        let last_at = |slot: u16, at: usize, everywhere: bool| -> bool {
            let later_slots = last_write.get(&slot).is_some_and(|&l| l > at);
            if everywhere {
                !later_slots && last_everywhere == Some(at)
            } else {
                !later_slots && last_everywhere.is_none_or(|e| e < at)
            }
        };
        let mark = Mark {
            position,
            fields: &slot_fields,
            now_ms,
        };
        // With a key-space segment, the slots written and those whose last write is done,
        // to finish any left behind at the end.
        let mut track = Track::default();
        for (at, segment) in split.segments.into_iter().enumerate() {
            let everywhere = last_everywhere == Some(at);
            let last = |slot| last_at(slot, at, everywhere);
            let (op, tag) = match segment {
                Segment::Slots(slots) => {
                    let parts: Vec<(u16, Vec<Op>)> = slots.into_iter().collect();
                    let track = last_everywhere.is_some().then_some(&mut track);
                    self.write_segment(parts, last, &mark, track, &mut out)
                        .await?;
                    continue;
                }
                Segment::Everywhere(op, tag) => (op, tag),
            };
            // A key-space operation: every slot's keys at once if they fit, else a range
            // of slots at a time (each slot's keys in one pass, so each slot's delete is
            // still one write), and a slot with more than a pass holds a part at a time
            // (its position and fields with the last part).
            // Slots whose checkpoint covers the drop (a batch written again after a
            // restart) are left out of the listing itself: their keys may be newer, and
            // a slot of them over the budget was listed again for ever (review 5).
            let skip: Vec<bool> = (0..CLUSTER_SLOTS)
                .map(|slot| tag.is_some_and(|tag| ClusterApply::covered(&self.found, slot, tag)))
                .collect();
            let mut ranges = vec![(0, CLUSTER_SLOTS - 1)];
            let mut first = true;
            while let Some(range) = ranges.pop() {
                let (by_slot, last_part) = match self
                    .keys_of(&op, range, DROP_KEYS_PER_PASS, &skip, first)
                    .await?
                {
                    Listing::Keys(by_slot) => (by_slot, true),
                    Listing::Part(by_slot) => {
                        // Listed again once these are gone.
                        debug!(
                            slot = range.0,
                            "a slot with more keys than a pass holds: a part of them"
                        );
                        ranges.push(range);
                        (by_slot, false)
                    }
                    Listing::TooMany(counts) => {
                        first = false;
                        let mut split = drop_ranges(&counts, DROP_KEYS_PER_PASS);
                        split.reverse();
                        info!(
                            keys = counts.iter().map(|&n| u64::from(n)).sum::<u64>(),
                            passes = split.len(),
                            "a key-space drop too big to list at once: a range of slots at a \
                             time, each a scan of every master"
                        );
                        ranges.extend(split);
                        continue;
                    }
                };
                first = false;
                // A slot's keys past `DROP_KEYS_PER_WRITE` go ahead in writes of their own,
                // unmarked; its last write has the rest.
                let mut ahead: Vec<(u16, Vec<String>)> = Vec::new();
                // (Covered slots are not listed: `skip`.)
                let parts: Vec<(u16, Vec<Op>)> = by_slot
                    .into_iter()
                    .map(|(slot, mut keys)| {
                        while keys.len() > DROP_KEYS_PER_WRITE {
                            let rest = keys.split_off(DROP_KEYS_PER_WRITE);
                            ahead.push((slot, std::mem::replace(&mut keys, rest)));
                        }
                        (slot, keys.into_iter().map(|key| Op::Del { key }).collect())
                    })
                    .collect();
                for (slot, keys) in ahead {
                    let dels = keys.into_iter().map(|key| Op::Del { key }).collect();
                    self.write_segment(
                        vec![(slot, dels)],
                        |_| false,
                        &mark,
                        Some(&mut track),
                        &mut out,
                    )
                    .await?;
                }
                let last = |slot| last_part && last(slot);
                self.write_segment(parts, last, &mark, Some(&mut track), &mut out)
                    .await?;
            }
        }
        // A slot written before a key-space segment that did not reach it (or written in
        // parts) has not had its last write yet: its position and fields alone, now that
        // the batch's last write is done.
        if position.is_some() || !slot_fields.is_empty() {
            let lagging: Vec<(u16, Vec<Op>, Option<Lsn>)> = track
                .written
                .difference(&track.finished)
                .map(|&slot| (slot, Vec::new(), position))
                .collect();
            if !lagging.is_empty() {
                self.write_parts(lagging, &slot_fields, now_ms, &mut out)
                    .await?;
            }
        }
        self.remove_repairs(fields, now_ms, &mut out).await?;
        Ok(out)
    }

    /// Writes a segment's parts: a slot whose write is its `last` of the batch with the
    /// batch's position and slot fields, the others without; `track` (if any) records
    /// which.
    async fn write_segment(
        &mut self,
        parts: Vec<(u16, Vec<Op>)>,
        last: impl Fn(u16) -> bool,
        mark: &Mark<'_>,
        track: Option<&mut Track>,
        out: &mut ClusterApplied,
    ) -> Result<(), RunError> {
        let (ends, goes_on): (Vec<_>, Vec<_>) =
            parts.into_iter().partition(|(slot, _)| last(*slot));
        if let Some(track) = track {
            track.written.extend(goes_on.iter().map(|(slot, _)| *slot));
            track.written.extend(ends.iter().map(|(slot, _)| *slot));
            track.finished.extend(ends.iter().map(|(slot, _)| *slot));
        }
        if !goes_on.is_empty() {
            let parts = goes_on
                .into_iter()
                .map(|(slot, ops)| (slot, ops, None))
                .collect();
            self.write_parts(parts, &[], mark.now_ms, out).await?;
        }
        if !ends.is_empty() {
            let parts = ends
                .into_iter()
                .map(|(slot, ops)| (slot, ops, mark.position))
                .collect();
            self.write_parts(parts, mark.fields, mark.now_ms, out)
                .await?;
        }
        Ok(())
    }

    /// Writes slots' parts (each with where its position moves, if it does): the plain ones
    /// with one script per master, the rest, and what the scripts left out, as a guarded
    /// transaction per slot.
    ///
    /// # Errors
    /// A slot refused the write, or Redis failed.
    async fn write_parts(
        &mut self,
        parts: Vec<(u16, Vec<Op>, Option<Lsn>)>,
        fields: &[(&str, &str)],
        now_ms: u64,
        out: &mut ClusterApplied,
    ) -> Result<(), RunError> {
        let (fast, slow): (Vec<_>, Vec<_>) = parts
            .into_iter()
            .partition(|(_, ops, _)| node_write::plain(ops));
        let left_out = self.send_nodes(fast, fields, now_ms, out).await?;
        let writes = slow
            .into_iter()
            .chain(left_out)
            .map(|(slot, ops, moves)| {
                let write =
                    SlotWrite::with_fields(&self.owner_of(slot), &ops, moves, fields, now_ms);
                (slot, write, moves)
            })
            .collect();
        self.send(writes, out).await
    }

    /// Removes the `repair:<key>` records of keys read again from their slots' checkpoints
    /// (where a merge without a base recorded them), after the batch that wrote the keys: a
    /// crash before this reads them again, which is safe.
    async fn remove_repairs(
        &mut self,
        fields: &[(String, String)],
        now_ms: u64,
        out: &mut ClusterApplied,
    ) -> Result<(), RunError> {
        let mut by_slot: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
        for (field, value) in fields {
            if let (Some(key), true) = (field.strip_prefix(FIELD_REPAIR_PREFIX), value.is_empty()) {
                by_slot
                    .entry(key_slot(key.as_bytes()))
                    .or_default()
                    .push(field);
            }
        }
        if by_slot.is_empty() {
            return Ok(());
        }
        let writes = by_slot
            .into_iter()
            .map(|(slot, removed)| {
                let fields: Vec<(&str, &str)> = removed.into_iter().map(|f| (f, "")).collect();
                let write =
                    SlotWrite::with_fields(&self.owner_of(slot), &[], None, &fields, now_ms);
                (slot, write, None)
            })
            .collect();
        self.send(writes, out).await
    }

    /// Writes slots' parts with one script per master (and per [`node_write::MAX_COMMANDS`]),
    /// the masters at once. Returns the parts the scripts left out (their keys were not all
    /// on the master the map names), which nothing was written of: they go as transactions
    /// of their own, which follow redirections.
    ///
    /// # Errors
    /// A slot refused the write, or Redis failed.
    async fn send_nodes(
        &mut self,
        parts: Vec<(u16, Vec<Op>, Option<Lsn>)>,
        fields: &[(&str, &str)],
        now_ms: u64,
        out: &mut ClusterApplied,
    ) -> Result<Vec<(u16, Vec<Op>, Option<Lsn>)>, RunError> {
        let mut left: Vec<usize> = Vec::new();
        let mut by_node: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, (slot, ..)) in parts.iter().enumerate() {
            match self.router.owner(*slot) {
                Some(addr) => by_node.entry(addr.to_string()).or_default().push(i),
                None => left.push(i),
            }
        }
        // Per master, its parts cut into scripts.
        let mut sends: Vec<(String, Vec<Vec<usize>>, _)> = Vec::new();
        for (addr, indexes) in by_node {
            let conn = self.router.node(&addr).await?;
            let mut chunks = Vec::new();
            let mut chunk: Vec<usize> = Vec::new();
            let (mut size, mut bytes) = (0, 0);
            for i in indexes {
                let cost = 2 * parts[i].1.len() + 2;
                let weight = node_write::value_bytes(&parts[i].1);
                if !chunk.is_empty()
                    && (size + cost > node_write::MAX_COMMANDS
                        || bytes + weight > node_write::MAX_BYTES)
                {
                    chunks.push(std::mem::take(&mut chunk));
                    (size, bytes) = (0, 0);
                }
                chunk.push(i);
                size += cost;
                bytes += weight;
            }
            if !chunk.is_empty() {
                chunks.push(chunk);
            }
            sends.push((addr, chunks, conn));
        }
        // Each master's scripts go a few at a time, the masters at once: at most
        // `SCRIPTS_IN_FLIGHT` are alive per master (with their encoded copies), not a whole
        // batch's worth, which keeps a big batch's memory close to its changes' (G8), while
        // the master always has the next script queued (each is sent as soon as it is
        // built, and the next is built while it runs). A master's scripts hold distinct
        // slots, so their order does not matter.
        let build = |chunk: &[usize]| {
            let node_parts: Vec<NodePart<'_>> = chunk
                .iter()
                .map(|&i| NodePart {
                    owner: self.owner_of(parts[i].0),
                    ops: &parts[i].1,
                    position: parts[i].2,
                    fields,
                })
                .collect();
            NodeWrite::new(&self.token, &node_parts, now_ms)
        };
        let per_master = futures_util::future::join_all(sends.iter().map(|(_, chunks, conn)| {
            let build = &build;
            async move {
                let mut sent: Vec<(usize, Sent)> = Vec::new();
                let mut in_flight = futures_util::stream::FuturesUnordered::new();
                let mut next = chunks.iter().enumerate();
                let mut stop = false;
                loop {
                    while !stop && in_flight.len() < SCRIPTS_IN_FLIGHT {
                        let Some((at, chunk)) = next.next() else {
                            break;
                        };
                        let write = build(chunk);
                        let mut conn = conn.clone();
                        in_flight.push(async move {
                            let reply = write.cmd.query_async::<redis::Value>(&mut conn).await;
                            (at, Sent::of(&write, reply))
                        });
                        // Polled once now, so that it is sent before the next is built (a
                        // pushed future is polled only when the set is).
                        if let Some(Some((at, outcome))) = in_flight.next().now_or_never() {
                            stop |= outcome.ends_session();
                            sent.push((at, outcome));
                        }
                    }
                    let Some((at, outcome)) = in_flight.next().await else {
                        break;
                    };
                    // A refusal or a failure ends the session: nothing more goes to this
                    // master (what is in flight is still read).
                    stop |= outcome.ends_session();
                    sent.push((at, outcome));
                }
                sent
            }
        }))
        .await;
        let mut refused = None;
        let mut failed = None;
        for ((addr, chunks, _), sent) in sends.iter().zip(per_master) {
            for (at, outcome) in sent {
                let chunk = &chunks[at];
                match outcome {
                    Sent::Applied(left_out) => {
                        self.written.insert(addr.clone());
                        let left_out: BTreeSet<usize> = left_out.into_iter().collect();
                        for (n, &i) in chunk.iter().enumerate() {
                            if left_out.contains(&n) {
                                left.push(i);
                                continue;
                            }
                            let (slot, _, moves) = &parts[i];
                            if let Some(lsn) = moves {
                                self.marks[usize::from(*slot)].position = Some(*lsn);
                                out.moved.push((*slot, *lsn));
                            }
                        }
                    }
                    Sent::NotServing(e) => {
                        debug!(%addr, error = %e, "a node write was refused whole: sending its slots on their own");
                        left.extend(chunk);
                    }
                    Sent::Refused((n, e)) => {
                        refused.get_or_insert((parts[chunk[n]].0, e));
                    }
                    Sent::Failed(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        if let Some(e) = failed {
            return Err(e.into());
        }
        if let Some((slot, e)) = refused {
            return Err(slot_error(slot, e));
        }
        let mut again = Vec::new();
        left.sort_unstable();
        let mut left = left.into_iter().peekable();
        for (i, part) in parts.into_iter().enumerate() {
            if left.peek() == Some(&i) {
                left.next();
                again.push(part);
            }
        }
        Ok(again)
    }

    /// Sends slot writes until each is applied (a `Retry` is sent again).
    async fn send(
        &mut self,
        mut writes: Vec<(u16, SlotWrite, Option<Lsn>)>,
        out: &mut ClusterApplied,
    ) -> Result<(), RunError> {
        for _ in 0..RETRIES {
            if writes.is_empty() {
                return Ok(());
            }
            let txs: Vec<(u16, &SlotTransaction)> =
                writes.iter().map(|(slot, w, _)| (*slot, &w.tx)).collect();
            let replies = self.router.send_many(&txs).await.map_err(route_error)?;
            let mut again = Vec::new();
            for ((slot, write, moves), reply) in writes.into_iter().zip(replies) {
                match write.outcome(&reply).map_err(|e| slot_error(slot, e))? {
                    SlotOutcome::Applied { repairs } => {
                        out.repairs.extend(repairs);
                        // The node that ran it (after an ASK, the migration's target):
                        // the one whose replicas `WAIT` must ask.
                        if !reply.node.is_empty() {
                            self.written.insert(reply.node.clone());
                        }
                        if let Some(lsn) = moves {
                            self.marks[usize::from(slot)].position = Some(lsn);
                            out.moved.push((slot, lsn));
                        }
                    }
                    SlotOutcome::Retry => {
                        debug!(
                            slot,
                            "a slot checkpoint changed under its write: sending again"
                        );
                        again.push((slot, write, moves));
                    }
                }
            }
            writes = again;
        }
        Err(RunError::transient(
            "redis",
            format!(
                "redis cluster: a write to hash slot {} kept finding its checkpoint changed",
                writes.first().map_or(0, |w| w.0)
            ),
        ))
    }

    /// The keys (and leases) a key-space operation deletes in the slots `range` but those
    /// to `skip`, by slot, from every master; [`Listing::TooMany`] with every slot's count instead, once more
    /// than `budget` keys are listed (their names are not kept: memory stays bounded by the
    /// budget, G8). A scan during which a slot moved, or that ends while one is migrating (a
    /// key may have been on neither node when each was scanned), is done again. With
    /// `revoke`, the leases that match go first.
    async fn keys_of(
        &mut self,
        op: &Op,
        range: (u16, u16),
        budget: usize,
        skip: &[bool],
        revoke: bool,
    ) -> Result<Listing, RunError> {
        let patterns: Vec<String> = match op {
            Op::DropKeySpace { key_space } => {
                let escaped = glob_escape(key_space);
                vec![
                    format!("{escaped}*"),
                    format!("{{{escaped}*}}{LEASE_SUFFIX}"),
                ]
            }
            Op::DropMatching { patterns } => patterns.clone(),
            _ => return Ok(Listing::Keys(BTreeMap::new())),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            let before = self.router.masters_of_slots();
            let conns = self.master_connections().await?;
            // The leases go first, in a pass of their own. The keys are listed outside the
            // slots' transactions: a fill whose lease predates the change, landing between
            // the listing and the delete, would write a key the delete does not name, read
            // before the change, to stay. With its lease gone first, such a fill either
            // landed before the listing (its key is listed) or is refused. (A lease taken
            // since reads after the change, which is visible before it is applied: a later
            // pass over other slots need not revoke again.)
            if revoke && !revoke_leases(&conns, &patterns).await? {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
            // Every master and pattern at once: one after another, a first start or a
            // rebuild waited a round trip per thousand keys of every master in turn. Each
            // page is sorted into the listing as it comes.
            let listing = std::sync::Mutex::new(Collect::new(range, budget, skip));
            let scans = conns.iter().flat_map(|conn| {
                let listing = &listing;
                patterns.iter().map(move |pattern| {
                    scan_pages(conn.clone(), pattern, move |keys| {
                        listing.lock().expect("listing").page(keys);
                    })
                })
            });
            futures_util::future::try_join_all(scans).await?;
            self.router.refresh().await.map_err(route_error)?;
            if self.router.masters_of_slots() == before && !self.migrating().await? {
                return Ok(listing.into_inner().expect("listing").finish());
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Err(RunError::transient(
            "redis",
            "redis cluster: slots kept migrating while keys were being dropped; trying again",
        ))
    }

    /// Whether a slot is being migrated now (a key may be on either node).
    async fn migrating(&mut self) -> Result<bool, RunError> {
        // A node shows the migrating and importing marks of its own slots only: ask every
        // master, all at once.
        let conns = self.master_connections().await?;
        let nodes =
            futures_util::future::try_join_all(conns.into_iter().map(|mut conn| async move {
                redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async::<String>(&mut conn)
                    .await
            }))
            .await?;
        Ok(nodes
            .iter()
            .any(|text| text.contains("->-") || text.contains("-<-")))
    }

    /// Writes `stopped` into every slot checkpoint this session owns.
    async fn write_stopped(&mut self, stopped: &str) -> Result<(), RunError> {
        let keys: Vec<(u16, String)> = (0..CLUSTER_SLOTS)
            .map(|slot| (slot, self.checkpoint_keys[usize::from(slot)].clone()))
            .collect();
        let mut replies = per_master(
            &mut self.router,
            SET_STOPPED_MANY,
            &[&self.token, stopped],
            &keys,
        )
        .await
        .map_err(route_error)?;
        // What the masters' scripts left out, one slot at a time.
        let left: Vec<(u16, redis::Cmd)> = keys
            .iter()
            .filter(|(slot, _)| replies[usize::from(*slot)].is_none())
            .map(|(slot, ck)| {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(SET_STOPPED)
                    .arg(1)
                    .arg(ck)
                    .arg(&self.token)
                    .arg(stopped);
                (*slot, cmd)
            })
            .collect();
        if !left.is_empty() {
            let sent = self.router.send_each(&left).await.map_err(route_error)?;
            for ((slot, _), reply) in left.iter().zip(sent) {
                replies[usize::from(*slot)] = Some(reply);
            }
        }
        let replies: Vec<redis::Value> = replies
            .into_iter()
            .map(|reply| reply.unwrap_or(redis::Value::Nil))
            .collect();
        for (slot, reply) in replies.iter().enumerate() {
            match reply {
                redis::Value::Int(1) => {}
                redis::Value::Int(_) => {
                    return Err(slot_error(
                        slot as u16,
                        SlotWriteError::Refused(Refused::Fenced(
                            "(another owner in the slot checkpoint)".into(),
                        )),
                    ))
                }
                other => {
                    return Err(RunError::transient(
                        "redis",
                        format!("redis cluster hash slot {slot}: writing `stopped`: {other:?}"),
                    ))
                }
            }
        }
        for addr in self.router.masters() {
            self.written.insert(addr);
        }
        Ok(())
    }

    /// `WAIT replicas` on every master written since the last call (see
    /// `stream::wait_for_replicas`).
    ///
    /// # Errors
    /// A master cannot be reached.
    pub(crate) async fn wait_replicas(&mut self, replicas: usize) -> Result<(), RunError> {
        let written = std::mem::take(&mut self.written);
        for addr in written {
            let mut conn = self.router.node(&addr).await?;
            super::stream::wait_for_replicas(&mut conn, replicas).await?;
        }
        Ok(())
    }

    /// Reads every slot checkpoint back and compares it with what this session wrote: a
    /// slot whose epoch, owner or position changed lost data or was taken over. Run with
    /// the heartbeat, so that a loss is noticed even in a slot no change reaches.
    ///
    /// A slot that lost its `stopped` mark (a failover to a replica without it, which moves
    /// no position) lets readers fill keys of a stopped table, which the daemon no longer
    /// keeps fresh: the session starts over, and the next one marks every slot again. A
    /// table still stopped then has its keys dropped (what readers filled meanwhile); one
    /// set up right in between is backfilled, which writes its keys anew.
    ///
    /// # Errors
    /// The first slot found changed, as the refusal its next write would get; slots without
    /// the `stopped` mark this session wrote, as a transient error.
    pub(crate) async fn check_slots(&mut self) -> Result<(), RunError> {
        let cmds: Vec<(u16, redis::Cmd)> = (0..CLUSTER_SLOTS)
            .map(|slot| {
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(&self.checkpoint_keys[usize::from(slot)])
                    .arg("epoch")
                    .arg("owner")
                    .arg("lsn")
                    .arg(FIELD_STOPPED);
                (slot, cmd)
            })
            .collect();
        let replies = self.router.send_each(&cmds).await.map_err(route_error)?;
        let mut unmarked: Vec<u16> = Vec::new();
        for (slot, reply) in replies.into_iter().enumerate() {
            let (epoch, owner, lsn, stopped): (
                Option<String>,
                Option<String>,
                Option<String>,
                Option<String>,
            ) = redis::from_redis_value(reply)
                .map_err(|e| RunError::from(redis::RedisError::from(e)))?;
            if self
                .stopped
                .as_deref()
                .is_some_and(|want| stopped.as_deref().unwrap_or_default() != want)
            {
                unmarked.push(slot as u16);
            }
            let mark = &self.marks[slot];
            let refused = if epoch.as_deref() != Some(mark.epoch.as_str()) {
                Some(Refused::EpochGone)
            } else if owner.as_deref() != Some(self.token.as_str()) {
                Some(Refused::Fenced(owner.unwrap_or_default()))
            } else if lsn.as_deref().unwrap_or("-") != checkpoint::position_text(mark.position) {
                Some(Refused::Moved {
                    found: lsn.unwrap_or_default(),
                    expected: checkpoint::position_text(mark.position),
                })
            } else {
                None
            };
            if let Some(refused) = refused {
                warn!(slot, error = %refused, "a slot checkpoint is not as this daemon left it");
                return Err(slot_error(slot as u16, SlotWriteError::Refused(refused)));
            }
        }
        if !unmarked.is_empty() {
            let slots = crate::cluster::ranges_text(&crate::cluster::ranges(unmarked));
            warn!(%slots, "slot checkpoints do not hold the stopped mark this session knows (a master failed over to a replica without its last write of it, or was restored): starting over, to mark every slot again");
            return Err(RunError::transient(
                "redis",
                format!("redis cluster: the slot checkpoints of hash slots {slots} do not hold the stopped mark"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_is_cut_into_ranges_of_at_most_the_budget() {
        let mut counts = vec![0u32; usize::from(CLUSTER_SLOTS)];
        counts[3] = 4;
        counts[7] = 5;
        counts[8] = 2;
        counts[100] = 30; // over the budget alone: a range of its own
        counts[16383] = 1;
        assert_eq!(
            drop_ranges(&counts, 10),
            vec![(3, 7), (8, 8), (100, 100), (16383, 16383)]
        );
        assert_eq!(drop_ranges(&counts, 100), vec![(3, 16383)]);
        assert_eq!(drop_ranges(&vec![0; 16384], 10), vec![]);
    }

    #[test]
    fn a_listing_over_its_budget_keeps_only_the_counts() {
        let keys = |ids: std::ops::Range<u32>| ids.map(|i| format!("k:{i}")).collect::<Vec<_>>();
        let mut fits = Collect::new((0, CLUSTER_SLOTS - 1), 12, &[]);
        fits.page(keys(0..6));
        fits.page(keys(4..10)); // a key listed twice (a rehashing SCAN) is deleted once
        let Listing::Keys(by_slot) = fits.finish() else {
            panic!("12 keys fit a budget of 12");
        };
        assert_eq!(by_slot.values().map(Vec::len).sum::<usize>(), 10);
        let mut over = Collect::new((0, CLUSTER_SLOTS - 1), 10, &[]);
        over.page(keys(0..25));
        assert!(
            over.keys.is_empty(),
            "the names are let go once over the budget"
        );
        let Listing::TooMany(counts) = over.finish() else {
            panic!("25 keys do not fit a budget of 10");
        };
        assert_eq!(counts.iter().sum::<u32>(), 25);
        // Only the range's slots are listed.
        let slot = key_slot(b"k:1");
        let mut one = Collect::new((slot, slot), 10, &[]);
        one.page(keys(0..25));
        let Listing::Keys(by_slot) = one.finish() else {
            panic!("one slot's keys fit");
        };
        assert_eq!(by_slot.keys().copied().collect::<Vec<_>>(), vec![slot]);
        // One slot with more than the budget: the budget's worth, the rest left for later.
        let tagged: Vec<String> = (0..25).map(|i| format!("t:{{42}}:{i}")).collect();
        let slot = key_slot(b"42");
        let mut big = Collect::new((slot, slot), 10, &[]);
        big.page(tagged);
        let Listing::Part(by_slot) = big.finish() else {
            panic!("25 keys of one slot do not fit a budget of 10");
        };
        assert_eq!(by_slot[&slot].len(), 10);
        // A slot the drop leaves out (it covers the drop) is neither listed nor counted,
        // however many keys it has.
        let mut skip = vec![false; usize::from(CLUSTER_SLOTS)];
        skip[usize::from(slot)] = true;
        let tagged: Vec<String> = (0..25).map(|i| format!("t:{{42}}:{i}")).collect();
        let mut covered = Collect::new((slot, slot), 10, &skip);
        covered.page(tagged);
        let Listing::Keys(by_slot) = covered.finish() else {
            panic!("a covered slot is not listed");
        };
        assert!(by_slot.is_empty());
    }
}
