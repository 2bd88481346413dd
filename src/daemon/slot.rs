//! A replication slot that is lost: gone while Redis holds a checkpoint made through it (a
//! failover to a server without failover slots, or someone dropped it), or invalidated by
//! Postgres (`wal_status = lost`: `max_slot_wal_keep_size`, Postgres 18's
//! `idle_replication_slot_timeout`, a conflict on a standby).
//!
//! Either way the changes since its last confirmed position are gone from the WAL, so the
//! cache cannot be brought up to date from it. Without `[postgres] recreate_lost_slot` that
//! is a fatal error saying so and how to fix it; with it, the slot is created again and the
//! cache rebuilt as after Redis lost its data (`Loss::SlotLost`).

use tracing::warn;

use crate::checkpoint::{self, CheckpointState};
use crate::daemon::replication::ReplicationError;
use crate::daemon::RunError;
use crate::sql::quote_literal;
use crate::Lsn;

/// What `pg_replication_slots` says about the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SlotState {
    Missing,
    /// `reason` as `invalidation_reason` gives it (Postgres 17+: `wal_removed`,
    /// `rows_removed`, `wal_level_insufficient`, and on 18 `idle_timeout`); before 17,
    /// derived from `wal_status` and `conflicting`.
    Invalidated {
        reason: String,
        confirmed: Option<Lsn>,
    },
    Usable,
}

/// The slot's state. Reads optional columns through `to_jsonb`, so that it runs on every
/// supported version.
pub(crate) async fn slot_state(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<SlotState, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT wal_status, to_jsonb(s) ->> 'invalidation_reason', \
                    (to_jsonb(s) ->> 'conflicting')::bool, confirmed_flush_lsn::text \
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let Some(row) = row else {
        return Ok(SlotState::Missing);
    };
    let wal_status: Option<String> = row.get(0);
    let reason: Option<String> = row.get(1);
    let conflicting: Option<bool> = row.get(2);
    let confirmed: Option<String> = row.get(3);
    let reason = match reason {
        Some(reason) => reason,
        None if conflicting == Some(true) => "conflict with recovery".to_string(),
        None if wal_status.as_deref() == Some("lost") => "wal_removed".to_string(),
        None => return Ok(SlotState::Usable),
    };
    Ok(SlotState::Invalidated {
        reason,
        confirmed: confirmed.and_then(|t| t.parse().ok()),
    })
}

/// What an invalidation reason means, in words.
pub(crate) fn explain(reason: &str) -> String {
    match reason {
        "wal_removed" => "wal_removed: the WAL it still needed was removed, because it fell \
                          further behind than max_slot_wal_keep_size allows"
            .to_string(),
        "idle_timeout" => "idle_timeout: it was unused for longer than \
                           idle_replication_slot_timeout"
            .to_string(),
        "rows_removed" => "rows_removed: rows it still needed were removed (a conflict with \
                           recovery on a standby)"
            .to_string(),
        "wal_level_insufficient" => "wal_level_insufficient: wal_level on the primary was \
                                     lowered below logical"
            .to_string(),
        other => other.to_string(),
    }
}

/// The SQL that replaces the slot by hand (`drop`: it exists and must go first).
pub(crate) fn recreate_sql(slot: &str, drop: bool) -> String {
    let name = quote_literal(slot);
    let create = format!("SELECT pg_create_logical_replication_slot({name}, 'pgoutput');");
    if drop {
        format!("SELECT pg_drop_replication_slot({name}); {create}")
    } else {
        create
    }
}

/// A lost slot, and what was known about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lost {
    slot: String,
    /// `None`: gone; else why Postgres invalidated it.
    reason: Option<String>,
    /// The last position confirmed through it (the checkpoint's, if the slot is gone).
    confirmed: Option<Lsn>,
}

impl Lost {
    /// Whether the slot is lost: invalidated, or gone while Redis holds a checkpoint made
    /// through it (without one, a missing slot is a setup not done yet, which preflight
    /// reports).
    pub(crate) async fn find(
        client: &tokio_postgres::Client,
        slot: &str,
        checkpoint: &CheckpointState,
    ) -> Result<Option<Lost>, tokio_postgres::Error> {
        let had_checkpoint = checkpoint.lsn.is_some() || checkpoint.epoch.is_some();
        Ok(match slot_state(client, slot).await? {
            SlotState::Usable => None,
            SlotState::Missing if !had_checkpoint => None,
            SlotState::Missing => Some(Lost {
                slot: slot.to_string(),
                reason: None,
                confirmed: checkpoint.lsn,
            }),
            SlotState::Invalidated { reason, confirmed } => Some(Lost {
                slot: slot.to_string(),
                reason: Some(reason),
                confirmed: confirmed.or(checkpoint.lsn),
            }),
        })
    }

    /// The short reason, as recorded in the checkpoint and logs: `missing`, `wal_removed`,
    /// `idle_timeout`, ...
    pub(crate) fn reason(&self) -> &str {
        self.reason.as_deref().unwrap_or("missing")
    }

    fn what(&self) -> String {
        match &self.reason {
            None => format!(
                "replication slot {:?} does not exist, but Redis holds a checkpoint made \
                 through it: the slot was lost (a failover to a server without it, as after \
                 promoting a standby without failover slots, or it was dropped)",
                self.slot
            ),
            Some(reason) => format!(
                "replication slot {:?} was invalidated by Postgres ({})",
                self.slot,
                explain(reason)
            ),
        }
    }

    /// The fatal error when `recreate_lost_slot` is off.
    pub(crate) fn error(&self, checkpoint_key: &str) -> RunError {
        RunError::fatal(
            "slot_lost",
            format!(
                "{}. The changes since its last confirmed position ({}) are gone from the WAL, \
                 so the cache cannot be brought up to date from it. To fix: set [postgres] \
                 recreate_lost_slot = true and start pgcache again (it recreates the slot, \
                 drops the cached keys and backfills every mirror table); or recreate the \
                 slot by hand: {} and delete the checkpoint (redis-cli DEL '{checkpoint_key}'), \
                 so that the next start drops the cached keys and backfills; `pgcache \
                 resync` alone rewrites the rows but keeps the keys of rows deleted meanwhile. \
                 On Postgres 17+ create it with psql -v slot={} -f sql/slot.sql instead, \
                 which makes a failover slot, so that a standby keeps a copy of it",
                self.what(),
                checkpoint::position_text(self.confirmed),
                recreate_sql(&self.slot, self.reason.is_some()),
                self.slot,
            ),
        )
    }

    /// Drops the slot (if it is still there) and creates it again. Before that, marks the
    /// checkpoint (if there is one), so that a daemon that stops before the rebuild
    /// started rebuilds at its next start.
    pub(crate) async fn recreate(
        &self,
        client: &tokio_postgres::Client,
        redis: &mut redis::aio::MultiplexedConnection,
        checkpoint_key: &str,
        before: &CheckpointState,
    ) -> Result<Lsn, RunError> {
        if before.epoch.is_some() {
            let _: () = redis::cmd("HSET")
                .arg(checkpoint_key)
                .arg(checkpoint::FIELD_SLOT_LOST)
                .arg(self.reason())
                .query_async(redis)
                .await?;
        }
        if self.reason.is_some() {
            if let Err(e) = client
                .execute("SELECT pg_drop_replication_slot($1)", &[&self.slot])
                .await
            {
                // Gone meanwhile (another daemon recreating it) is fine; the create says.
                if e.code().map(|c| c.code()) != Some("42704") {
                    return Err(e.into());
                }
            }
        }
        // Where the server has failover slots, the new slot is one, like sql/slot.sql's.
        let failover: bool = client
            .query_one(
                "SELECT current_setting('server_version_num')::int >= 170000 \
                        AND NOT pg_is_in_recovery()",
                &[],
            )
            .await?
            .get(0);
        let sql = if failover {
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', \
             false, false, true)"
        } else {
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
        };
        let created: String = client.query_one(sql, &[&self.slot]).await?.get(0);
        let created: Lsn = created.parse().map_err(|_| {
            RunError::fatal(
                "postgres",
                format!("pg_create_logical_replication_slot returned {created:?}"),
            )
        })?;
        warn!(
            slot = %self.slot,
            reason = %self.reason(),
            lost_at = %checkpoint::position_text(self.confirmed),
            created_at = %created,
            "{}; recreate_lost_slot is on: created the slot again, and the cache is rebuilt \
             (every cached key dropped, every mirror table backfilled)",
            self.what()
        );
        Ok(created)
    }
}

/// START_REPLICATION refused the slot because it is invalidated ("can no longer get changes
/// from replication slot", "cannot read from logical replication slot", "can no longer
/// access replication slot", all 55000) or gone (42704).
pub(crate) fn is_lost_error(e: &ReplicationError) -> bool {
    match e {
        ReplicationError::Server {
            code,
            message,
            detail,
            ..
        } => {
            code == "42704"
                || (code == "55000"
                    && (message.contains("can no longer")
                        || message.starts_with("cannot read from logical replication slot")
                        || detail.as_deref().is_some_and(|d| d.contains("invalidated"))))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_says_what_why_and_how_to_fix() {
        let lost = Lost {
            slot: "pgcache".into(),
            reason: Some("idle_timeout".into()),
            confirmed: Some(Lsn(0x1_0000_0028)),
        };
        let e = lost.error("pgcache:{pgcache}:checkpoint");
        assert!(e.is_fatal());
        assert_eq!(e.kind(), "slot_lost");
        let text = e.to_string();
        for part in [
            "replication slot \"pgcache\" was invalidated by Postgres (idle_timeout:",
            "idle_replication_slot_timeout",
            "since its last confirmed position (1/28) are gone from the WAL",
            "recreate_lost_slot = true",
            "SELECT pg_drop_replication_slot('pgcache'); SELECT pg_create_logical_replication_slot('pgcache', 'pgoutput');",
            "redis-cli DEL 'pgcache:{pgcache}:checkpoint'",
        ] {
            assert!(text.contains(part), "{part:?} not in {text}");
        }
        let gone = Lost {
            slot: "pgcache".into(),
            reason: None,
            confirmed: None,
        };
        let text = gone.error("k").to_string();
        assert!(
            text.contains("does not exist, but Redis holds a checkpoint"),
            "{text}"
        );
        assert!(!text.contains("pg_drop_replication_slot"), "{text}");
        assert_eq!(gone.reason(), "missing");
    }

    #[test]
    fn start_replication_refusals_for_a_lost_slot_are_recognised() {
        let server = |code: &str, message: &str, detail: Option<&str>| ReplicationError::Server {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            detail: detail.map(Into::into),
            hint: None,
        };
        assert!(is_lost_error(&server(
            "55000",
            "can no longer get changes from replication slot \"pgcache\"",
            Some("This slot has been invalidated because it exceeded the maximum reserved size.")
        )));
        assert!(is_lost_error(&server(
            "55000",
            "cannot read from logical replication slot \"pgcache\"",
            None
        )));
        assert!(is_lost_error(&server(
            "55000",
            "can no longer access replication slot \"pgcache\"",
            Some("This replication slot has been invalidated due to \"idle_timeout\".")
        )));
        assert!(is_lost_error(&server(
            "42704",
            "replication slot \"pgcache\" does not exist",
            None
        )));
        assert!(!is_lost_error(&server(
            "55006",
            "replication slot \"pgcache\" is active for PID 7",
            None
        )));
    }
}
