//! The checkpoint: how far the daemon has applied the stream, kept in Redis itself.
//!
//! Contract: the checkpoint is written in the same `MULTI … EXEC` as the data it covers (G2),
//! so after any crash Redis holds exactly the changes up to it and none after it. On start the
//! daemon skips every transaction whose commit lies below it, so a restart never rewrites a key
//! with an older value (G3). It only ever moves forward.

use crate::Lsn;

/// Hash field holding the end LSN of the last applied commit.
pub const FIELD_LSN: &str = "lsn";
/// Hash field holding the wall clock (ms since the Unix epoch) of the last write, for `status`.
pub const FIELD_UPDATED_MS: &str = "updated_ms";
/// Hash field holding a random id set when the checkpoint is created. Every batch reads it
/// back inside its `EXEC`: when it is gone, Redis lost its data (FLUSHALL, a restart without
/// persistence) and the daemon backfills.
pub const FIELD_EPOCH: &str = "epoch";
/// Hash field the running daemon refreshes every few seconds (ms since the Unix epoch).
pub const FIELD_HEARTBEAT_MS: &str = "heartbeat_ms";
/// Prefix of the hash fields holding each table's backfill progress (`backfill:public.users`).
pub const FIELD_BACKFILL_PREFIX: &str = "backfill:";

/// A table's backfill, as stored (JSON) in the checkpoint hash under
/// `backfill:<schema.table>`, written in the same `EXEC` as the rows it covers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackfillProgress {
    /// `running` or `done`.
    pub state: String,
    /// Primary key values (Postgres text) of the last row written; `None` before the first.
    pub cursor: Option<Vec<String>>,
    /// Rows written so far.
    pub rows: u64,
    /// Rows estimated from `pg_class.reltuples` when the backfill started.
    pub estimate: u64,
    pub started_ms: u64,
    pub updated_ms: u64,
}

/// Everything the checkpoint hash holds.
#[derive(Debug, Clone, Default)]
pub struct CheckpointState {
    pub lsn: Option<Lsn>,
    pub epoch: Option<String>,
    pub updated_ms: Option<u64>,
    pub heartbeat_ms: Option<u64>,
    /// By qualified table name.
    pub backfills: std::collections::BTreeMap<String, BackfillProgress>,
}

/// Reads the whole checkpoint hash (for `status` and the daemon's start).
///
/// # Errors
/// A Redis error, or a field that does not parse.
pub async fn read_state(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &str,
) -> Result<CheckpointState, CheckpointError> {
    let fields: std::collections::HashMap<String, String> =
        redis::cmd("HGETALL").arg(key).query_async(conn).await?;
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
            FIELD_HEARTBEAT_MS => state.heartbeat_ms = value.parse().ok(),
            other => {
                if let Some(table) = other.strip_prefix(FIELD_BACKFILL_PREFIX) {
                    let progress = serde_json::from_str(&value).map_err(|_| corrupt())?;
                    state.backfills.insert(table.to_string(), progress);
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

/// Appends the checkpoint write to a pipeline (inside its `MULTI`): the commit position when
/// the batch ends at a commit, and any extra fields (backfill progress) written with it.
pub fn write(
    pipe: &mut redis::Pipeline,
    key: &str,
    lsn: Option<Lsn>,
    fields: &[(String, String)],
    now_ms: u64,
) {
    let cmd = pipe.cmd("HSET").arg(key).arg(FIELD_UPDATED_MS).arg(now_ms);
    if let Some(lsn) = lsn {
        cmd.arg(FIELD_LSN).arg(lsn.to_string());
    }
    for (field, value) in fields {
        cmd.arg(field).arg(value);
    }
    cmd.ignore();
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("reading the checkpoint from Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the checkpoint {key} holds {value:?}, which is not an LSN; delete the key to start over (pgcache will backfill)")]
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
}
