//! Control events: backfill watermarks, `pgcache resync` requests and partition events,
//! as rows of `pgcache.events` (made by `sql/events.sql`).
//!
//! They travel in the replication stream as inserts, in commit order, which is what the
//! watermark protocol needs. Only the daemon's role and pgcache's SECURITY DEFINER functions
//! may insert into the table, so Postgres's own privileges authenticate every event. The
//! daemon does not read logical messages at all (`messages 'false'`): any role can call
//! `pg_logical_emit_message`, and a message Postgres cannot even send (a prefix that is not
//! valid in the database's encoding) would otherwise end every session.

use tokio_postgres::Client;

use crate::sql::{literal, quote_qualified};
use crate::Lsn;

/// The control table's schema and name.
pub const SCHEMA: &str = "pgcache";
pub const TABLE: &str = "events";

/// One control event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// A backfill chunk's low and high watermarks.
    Low(String),
    High(String),
    /// `pgcache resync`, or an attached partition: backfill this table again (`None`: every
    /// mirror table).
    Resync(Option<String>),
    /// Rows of this table vanished without row changes in the WAL (a partition truncated,
    /// detached or dropped): delete the keys whose rows are gone.
    Reconcile(String),
    /// A table was renamed, moved to another schema or dropped (`sql/events.sql`): check
    /// that the configured table of this name (`*`: every one) is still the table the
    /// daemon follows, as no row change may ever tell.
    Check(String),
}

/// An event row that is not a control event this version knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown control event {kind:?} ({arg:?}) in {SCHEMA}.{TABLE}: ignored (written by a newer pgcache, or by hand?)")]
pub struct UnknownEvent {
    pub kind: String,
    pub arg: String,
}

impl Control {
    /// Reads an event row's `kind` and `arg` columns.
    ///
    /// # Errors
    /// An unknown kind, or an argument that does not fit it.
    pub fn from_row(kind: &[u8], arg: &[u8]) -> Result<Control, UnknownEvent> {
        let unknown = || UnknownEvent {
            kind: String::from_utf8_lossy(kind).into_owned(),
            arg: String::from_utf8_lossy(arg).into_owned(),
        };
        let arg = std::str::from_utf8(arg).map_err(|_| unknown())?;
        match kind {
            b"low" if !arg.is_empty() => Ok(Control::Low(arg.to_string())),
            b"high" if !arg.is_empty() => Ok(Control::High(arg.to_string())),
            b"resync" if arg == "*" => Ok(Control::Resync(None)),
            b"resync" if !arg.is_empty() => Ok(Control::Resync(Some(arg.to_string()))),
            b"reconcile" if !arg.is_empty() => Ok(Control::Reconcile(arg.to_string())),
            b"check" if !arg.is_empty() => Ok(Control::Check(arg.to_string())),
            _ => Err(unknown()),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Control::Low(_) => "low",
            Control::High(_) => "high",
            Control::Resync(_) => "resync",
            Control::Reconcile(_) => "reconcile",
            Control::Check(_) => "check",
        }
    }

    pub fn arg(&self) -> &str {
        match self {
            Control::Low(id) | Control::High(id) | Control::Reconcile(id) | Control::Check(id) => {
                id
            }
            Control::Resync(None) => "*",
            Control::Resync(Some(table)) => table,
        }
    }
}

fn insert_sql() -> String {
    format!(
        "INSERT INTO {} (kind, arg) VALUES ($1, $2)",
        quote_qualified(SCHEMA, TABLE)
    )
}

/// Records a control event (`pgcache resync`) and returns the WAL position after it.
///
/// # Errors
/// The insert failed: no control table (run `sql/events.sql`), or no privilege on it.
pub async fn emit(client: &Client, control: &Control) -> Result<Lsn, tokio_postgres::Error> {
    client
        .execute(&insert_sql(), &[&control.kind(), &control.arg()])
        .await?;
    let lsn: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    Ok(lsn.parse().unwrap_or_default())
}

/// Records a watermark in a transaction of its own, committed with `synchronous_commit = local`
/// (flushed at once, but not waiting for synchronous standbys, which a watermark does not
/// need: the walsender sends what is flushed locally).
///
/// The walsender only sends WAL that is flushed, and every chunk waits for its high
/// watermark: under `synchronous_commit = off` the commit would be flushed only when the WAL
/// writer gets to it (up to `wal_writer_delay`), which alone held backfills to ~25,000
/// rows/s. With it on, the commit flushes at once.
pub async fn emit_watermark(
    client: &Client,
    control: &Control,
) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL synchronous_commit = local; INSERT INTO {} (kind, arg) VALUES ({}, {}); COMMIT;",
            quote_qualified(SCHEMA, TABLE),
            literal(control.kind()),
            literal(control.arg()),
        ))
        .await
}

/// Deletes events older than an hour (the daemon does this now and then; nothing reads old
/// events, the stream already carried them). Committed with `synchronous_commit = local`, as
/// a watermark is: a synchronous standby that does not answer must not hold the chunk
/// read that runs it.
///
/// One statement (a `DO` block in its own implicit transaction), so that a failure leaves
/// no transaction block open on the connection the chunk reads share.
pub async fn prune(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "DO $prune$ BEGIN PERFORM pg_catalog.set_config('synchronous_commit', 'local', true); \
             DELETE FROM {} WHERE at < now() - interval '1 hour'; END $prune$",
            quote_qualified(SCHEMA, TABLE)
        ))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_their_columns() {
        for control in [
            Control::Low("a1:3".into()),
            Control::High("x".into()),
            Control::Resync(None),
            Control::Resync(Some("public.users".into())),
            Control::Reconcile("public.events".into()),
        ] {
            assert_eq!(
                Control::from_row(control.kind().as_bytes(), control.arg().as_bytes()),
                Ok(control)
            );
        }
    }

    #[test]
    fn unknown_or_malformed_events_are_named() {
        let err = Control::from_row(b"bogus", b"1").unwrap_err();
        assert!(err.to_string().contains("\"bogus\""), "{err}");
        assert!(Control::from_row(b"low", b"").is_err());
        assert!(Control::from_row(b"resync", &[0xff]).is_err());
    }
}
