//! The checkpoint: how far the daemon has applied the stream, kept in Redis itself, and every
//! read and write of it.
//!
//! Contract:
//! - The position is written in the same atomic script as the data it covers (G2), so after
//!   any crash Redis holds exactly the changes up to it and none after it. On start the daemon
//!   skips every transaction whose commit lies below it, so a restart never rewrites a key
//!   with an older value (G3).
//! - It never moves backwards, and only the daemon that holds the slot writes it: a daemon
//!   takes the checkpoint over ([`takeover`]) once Postgres has given it the slot, and every
//!   later write of any other daemon is refused (fencing).
//! - The slot is confirmed to Postgres only up to a position Redis has acknowledged here, so a
//!   checkpoint *behind* the slot's `confirmed_flush_lsn` means Redis went back in time (a
//!   restore from an older snapshot, an asynchronous replica promoted): the daemon recovers.
//! - `applied` is the same position as fixed-width hex, which Lua compares as a string: the
//!   read helper lets a fill in only once the daemon has applied everything up to the
//!   position its row was read at (G10).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use redis::Script;

use crate::Lsn;

/// Lua patterns (PROTOCOL.md, "fill.lua"), one per line, of the keys of the tables the
/// daemon has stopped (and their invalidation keys): `fill.lua` refuses fills of such keys
/// with reply 3, since no change would ever reach them. Absent when no table is stopped.
pub const FIELD_STOPPED: &str = "stopped";

/// Redis's `proto-max-bulk-len` when the daemon last started: if it is lower now, keys too
/// long to be sent any more are deleted at start (`daemon::long_keys`).
pub const FIELD_MAX_BULK_LEN: &str = "max_bulk_len";

/// Prefix of the fields holding each table's OID when its values were last written
/// (`oid:public.users`), so that a table dropped and created again, or swapped, while the
/// daemon was stopped is noticed when it starts.
pub const FIELD_OID_PREFIX: &str = "oid:";

/// End of the last applied commit (or a later position with nothing to apply), as Postgres
/// prints it.
pub const FIELD_LSN: &str = "lsn";
/// The same position as 16 hex digits, for comparisons in Lua.
pub const FIELD_APPLIED: &str = "applied";
/// Wall clock (ms since the Unix epoch) of the last write, for `status`.
pub const FIELD_UPDATED_MS: &str = "updated_ms";
/// A random id set when the checkpoint is created. Every batch checks it: when it is gone,
/// Redis lost its data (FLUSHALL, a restart without persistence) and the daemon recovers.
pub const FIELD_EPOCH: &str = "epoch";
/// The session that holds the slot; every batch of another session is refused.
pub const FIELD_OWNER: &str = "owner";
/// Refreshed by the running daemon every few seconds (ms since the Unix epoch).
pub const FIELD_HEARTBEAT_MS: &str = "heartbeat_ms";
/// Prefix of the fields holding each table's backfill progress (`backfill:public.users`).
pub const FIELD_BACKFILL_PREFIX: &str = "backfill:";
/// Prefix of the fields holding the shape each table's cached values are in
/// (`shape:public.users`), so that a schema change made while the daemon was stopped is
/// noticed when it starts.
pub const FIELD_SHAPE_PREFIX: &str = "shape:";
/// Prefix of the fields holding the rule each table's keys were written under
/// (`rule:public.users`): key template, mode, format, encoding, TTL and the patterns of its
/// keys, so that a rule changed while the daemon was stopped is noticed when it starts.
pub const FIELD_RULE_PREFIX: &str = "rule:";
/// Prefix of the fields holding keys waiting to be read again (`repair:<key>`): their
/// values could not be built, so they were deleted, and a crash must not forget them.
pub const FIELD_REPAIR_PREFIX: &str = "repair:";
/// Prefix of the fields holding a reconcile's scan cursor (`reconcile:<table>`).
pub const FIELD_RECONCILE_PREFIX: &str = "reconcile:";
/// A transaction too large for one write, applied in part: `<commit LSN> <changes applied>`
/// (empty when none), so that a restart resumes it instead of replaying its start.
pub const FIELD_PARTIAL: &str = "partial";
/// Set (to why) before a daemon recreates a lost replication slot, and cleared by the write
/// that starts the rebuild: a daemon that stops in between rebuilds at its next start,
/// rather than resuming from a checkpoint the new slot does not cover.
pub const FIELD_SLOT_LOST: &str = "slot_lost";
/// On a Redis Cluster, per hash slot (`hs:<slot>`): the position the daemon last wrote into
/// that slot's checkpoint, recorded in the root checkpoint once the batch is in every slot.
/// A slot checkpoint found behind it at start lost writes (a replica promoted without them).
pub const FIELD_HASH_SLOT_PREFIX: &str = "hs:";

/// Where a table's backfill stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackfillState {
    Running,
    Done,
}

/// A table's backfill, as stored (JSON) in the checkpoint hash under
/// `backfill:<schema.table>`, written in the same script as the rows it covers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackfillProgress {
    pub state: BackfillState,
    /// Primary key values (Postgres text) of the last row written; `None` before the first.
    pub cursor: Option<Vec<String>>,
    /// Rows written so far.
    pub rows: u64,
    /// Rows estimated from `pg_class.reltuples` when the backfill started.
    pub estimate: u64,
    pub started_ms: u64,
    pub updated_ms: u64,
}

impl std::fmt::Display for BackfillState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackfillState::Running => "running",
            BackfillState::Done => "done",
        })
    }
}

impl BackfillProgress {
    pub fn is_done(&self) -> bool {
        self.state == BackfillState::Done
    }
}

/// A transaction applied in part (see [`FIELD_PARTIAL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partial {
    /// The transaction's commit LSN (pgoutput's `Begin::final_lsn`).
    pub commit_lsn: Lsn,
    /// Changes of it already in Redis, counted in stream order.
    pub changes: u64,
}

impl Partial {
    pub fn encode(&self) -> String {
        format!("{} {}", self.commit_lsn, self.changes)
    }

    fn parse(text: &str) -> Option<Partial> {
        let (lsn, changes) = text.split_once(' ')?;
        Some(Partial {
            commit_lsn: lsn.parse().ok()?,
            changes: changes.parse().ok()?,
        })
    }
}

/// Everything the checkpoint hash holds.
#[derive(Debug, Clone, Default)]
pub struct CheckpointState {
    pub lsn: Option<Lsn>,
    pub epoch: Option<String>,
    pub owner: Option<String>,
    pub updated_ms: Option<u64>,
    pub heartbeat_ms: Option<u64>,
    /// By qualified table name.
    pub backfills: BTreeMap<String, BackfillProgress>,
    /// By qualified table name: the shape the table's cached values are in.
    pub shapes: BTreeMap<String, String>,
    /// By qualified table name: the rule its keys were written under (JSON).
    pub rules: BTreeMap<String, String>,
    /// By qualified table name: the table's OID when its values were written.
    pub oids: BTreeMap<String, u32>,
    pub partial: Option<Partial>,
    /// Keys waiting to be read again, by key: what to read (see `apply::Repair`).
    pub repairs: BTreeMap<String, String>,
    /// Reconciles under way, by qualified table name: the scan cursor to go on from.
    pub reconciles: BTreeMap<String, String>,
    /// The slot was lost and recreated and the cache not yet rebuilt: why it was lost.
    pub slot_lost: Option<String>,
    /// On a Redis Cluster: the position last written into each hash slot's checkpoint
    /// ([`FIELD_HASH_SLOT_PREFIX`]).
    pub hash_slots: BTreeMap<u16, Lsn>,
    /// The `stopped` field: the key patterns of stopped tables, one a line (empty: none).
    pub stopped: String,
}

/// The stored text of a position, as the apply script compares it (`-` for none).
pub fn position_text(lsn: Option<Lsn>) -> String {
    lsn.map_or_else(|| "-".to_string(), |lsn| lsn.to_string())
}

/// A position as 16 hex digits: string order is position order.
pub fn hex(lsn: Lsn) -> String {
    format!("{:016X}", lsn.0)
}

/// Reads the whole checkpoint hash (for `status`, `verify` and the daemon's start).
///
/// # Errors
/// A Redis error, or a field that does not parse.
pub async fn read_state(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &str,
) -> Result<CheckpointState, CheckpointError> {
    let fields: Vec<(String, String)> = redis::cmd("HGETALL").arg(key).query_async(conn).await?;
    parse_state(key, fields)
}

pub(crate) fn parse_state(
    key: &str,
    fields: impl IntoIterator<Item = (String, String)>,
) -> Result<CheckpointState, CheckpointError> {
    let mut state = CheckpointState::default();
    for (field, value) in fields {
        let corrupt = || CheckpointError::Corrupt {
            key: format!("{key} field {field}"),
            value: value.clone(),
        };
        match field.as_str() {
            FIELD_LSN => state.lsn = Some(value.parse().map_err(|_| corrupt())?),
            FIELD_UPDATED_MS => state.updated_ms = value.parse().ok(),
            FIELD_EPOCH => state.epoch = Some(value),
            FIELD_OWNER => state.owner = Some(value),
            FIELD_HEARTBEAT_MS => state.heartbeat_ms = value.parse().ok(),
            FIELD_STOPPED => state.stopped = value,
            FIELD_PARTIAL | FIELD_SLOT_LOST if value.is_empty() => {}
            FIELD_SLOT_LOST => state.slot_lost = Some(value),
            FIELD_PARTIAL => state.partial = Some(Partial::parse(&value).ok_or_else(corrupt)?),
            // An empty value is a field being removed.
            _ if value.is_empty() => {}
            other => {
                if let Some(table) = other.strip_prefix(FIELD_BACKFILL_PREFIX) {
                    let progress = serde_json::from_str(&value).map_err(|_| corrupt())?;
                    state.backfills.insert(table.to_string(), progress);
                } else if let Some(table) = other.strip_prefix(FIELD_SHAPE_PREFIX) {
                    state.shapes.insert(table.to_string(), value);
                } else if let Some(table) = other.strip_prefix(FIELD_RULE_PREFIX) {
                    state.rules.insert(table.to_string(), value);
                } else if let Some(table) = other.strip_prefix(FIELD_OID_PREFIX) {
                    let oid = value.parse().map_err(|_| corrupt())?;
                    state.oids.insert(table.to_string(), oid);
                } else if let Some(key) = other.strip_prefix(FIELD_REPAIR_PREFIX) {
                    state.repairs.insert(key.to_string(), value);
                } else if let Some(table) = other.strip_prefix(FIELD_RECONCILE_PREFIX) {
                    state.reconciles.insert(table.to_string(), value);
                } else if let Some(slot) = other.strip_prefix(FIELD_HASH_SLOT_PREFIX) {
                    let slot = slot.parse().map_err(|_| corrupt())?;
                    let lsn = value.parse().map_err(|_| corrupt())?;
                    state.hash_slots.insert(slot, lsn);
                }
            }
        }
    }
    Ok(state)
}

/// `<prefix>pgcache:{<slot>}:checkpoint`. The slot name is the hash tag so that, on a
/// cluster, the checkpoint has a stable home; several daemons (one per slot) never share one.
pub fn checkpoint_key(key_prefix: &str, slot: &str) -> String {
    format!("{key_prefix}pgcache:{{{slot}}}:checkpoint")
}

/// `<prefix>pgcache:{<tag>}:<slot>:ck`: the checkpoint of one Redis Cluster hash slot in the
/// planned cluster mode (docs/cluster.md). Its hash tag is [`slot_tag`](crate::cluster::slot_tag)
/// of `hash_slot`, so it lives in that slot: it is written in the same transaction as the
/// slot's keys and moves with them when the slot is resharded. (A `key_prefix` with a hash
/// tag of its own would move it; the config refuses braces in it on a cluster.)
pub fn slot_checkpoint_key(key_prefix: &str, slot: &str, hash_slot: u16) -> String {
    format!(
        "{key_prefix}pgcache:{{{}}}:{slot}:ck",
        crate::cluster::slot_tag(hash_slot)
    )
}

/// The stored position, if any.
///
/// # Errors
/// A Redis error, or a stored value that is not an LSN (someone else wrote the key).
pub async fn read(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &str,
) -> Result<Option<Lsn>, CheckpointError> {
    let value: Option<String> = redis::cmd("HGET")
        .arg(key)
        .arg(FIELD_LSN)
        .query_async(conn)
        .await?;
    match value {
        None => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| CheckpointError::Corrupt {
                key: key.to_string(),
                value: text,
            }),
    }
}

/// The takeover script (`checkpoint/takeover.lua`).
pub(crate) const TAKEOVER_LUA: &str = include_str!("checkpoint/takeover.lua");

static TAKEOVER: LazyLock<Script> = LazyLock::new(|| Script::new(TAKEOVER_LUA));

/// What [`takeover`] found.
#[derive(Debug, Clone)]
pub struct Takeover {
    pub state: CheckpointState,
    /// The hash had no epoch: Redis lost its data, or this is the first start.
    pub fresh: bool,
}

/// Makes the checkpoint this session's: sets the owner token (and an epoch if there is
/// none) and returns the hash as it is now. Call it only once Postgres has given this
/// session the slot.
///
/// # Errors
/// A Redis error, or a field that does not parse.
pub async fn takeover(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &str,
    owner: &str,
    new_epoch: &str,
) -> Result<Takeover, CheckpointError> {
    let (fresh, fields): (i64, Vec<(String, String)>) = TAKEOVER
        .key(key)
        .arg(owner)
        .arg(new_epoch)
        .invoke_async(conn)
        .await?;
    Ok(Takeover {
        state: parse_state(key, fields)?,
        fresh: fresh == 1,
    })
}

/// A random token, for owners and epochs.
pub fn random_token() -> String {
    format!("{:016x}", fastrand::u64(..))
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("reading the checkpoint from Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the checkpoint {key} holds {value:?}, which pgcache cannot read; delete the key to start over (pgcache will backfill)")]
    Corrupt { key: String, value: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_uses_the_slot_as_hash_tag() {
        assert_eq!(
            checkpoint_key("", "pgcache"),
            "pgcache:{pgcache}:checkpoint"
        );
        assert_eq!(checkpoint_key("app:", "s1"), "app:pgcache:{s1}:checkpoint");
    }

    #[test]
    fn slot_checkpoints_live_in_their_slot() {
        for hash_slot in [0, 1, 5460, 5461, 12182, 16383] {
            let key = slot_checkpoint_key("app:", "pgcache", hash_slot);
            assert!(key.starts_with("app:pgcache:{") && key.ends_with("}:pgcache:ck"));
            assert_eq!(crate::cluster::key_slot(key.as_bytes()), hash_slot, "{key}");
        }
    }

    #[test]
    fn hex_positions_sort_as_positions() {
        let positions = [Lsn(0), Lsn(0xff), Lsn(0x1_0000_0000), Lsn(u64::MAX)];
        for pair in positions.windows(2) {
            assert!(hex(pair[0]) < hex(pair[1]));
        }
        assert_eq!(hex(Lsn(0x16_B374_D848)), "00000016B374D848");
    }

    #[test]
    fn state_parses_every_field_and_refuses_corrupt_ones() {
        let progress = r#"{"state":"done","cursor":["7"],"rows":7,"estimate":7,"started_ms":1,"updated_ms":2}"#;
        let fields = [
            ("lsn", "0/16B3"),
            ("epoch", "e1"),
            ("owner", "o1"),
            ("partial", "0/200 17"),
            ("shape:public.t", "id int4"),
            ("backfill:public.t", progress),
        ]
        .map(|(f, v)| (f.to_string(), v.to_string()));
        let state = parse_state("k", fields).unwrap();
        assert_eq!(state.lsn, Some(Lsn(0x16b3)));
        assert_eq!(state.owner.as_deref(), Some("o1"));
        assert_eq!(
            state.partial,
            Some(Partial {
                commit_lsn: Lsn(0x200),
                changes: 17
            })
        );
        assert_eq!(state.shapes["public.t"], "id int4");
        assert!(state.backfills["public.t"].is_done());
        assert!(parse_state("k", [("partial".into(), "".into())])
            .unwrap()
            .partial
            .is_none());
        let err = parse_state("k", [("lsn".into(), "nope".into())]).unwrap_err();
        assert!(err.to_string().contains("k field lsn"), "{err}");
    }
}
