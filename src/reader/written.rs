//! Read-your-writes: a position in the WAL, and waiting until the daemon has applied
//! everything up to it.
//!
//! A commit is in Redis a little after it returns to the writer: the daemon has to receive,
//! apply and acknowledge it (about a millisecond at rest, more under load). A service that
//! writes and then reads through the cache can read the value from before its write in that
//! gap. [`Reader::write_position`] takes the end of the WAL after the caller's commits, and
//! [`Reader::wait_applied`] returns once the daemon's checkpoint says that Redis holds
//! everything up to it. The daemon moves its checkpoint on every commit it applies and, on
//! the walsender's keepalives, past commits of tables it does not cache, so a position taken
//! after a write to any table is reached.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::lease::{self, Backoff};
use super::{Inner, ReaderError};
use crate::Lsn;

/// What the errors of this module name in place of a table.
const WHAT: &str = "write position";

/// Polling the checkpoint: the first pause after the position moved, and the longest. A
/// waiter usually waits for one batch of the daemon (well under a millisecond at rest); the
/// cap bounds the time a waiter oversleeps a position that arrived mid-pause.
const FIRST_POLL: Duration = Duration::from_micros(200);
const MAX_POLL: Duration = Duration::from_millis(2);

/// The end of the WAL now, flushed: every transaction committed before this call (by any
/// session) ends at or before it.
pub(super) async fn write_position(inner: &Inner) -> Result<Lsn, ReaderError> {
    let client = inner
        .pool
        .get()
        .await
        .map_err(|e| ReaderError::PostgresUnavailable {
            table: WHAT.to_string(),
            source: Arc::new(e),
        })?;
    let pg_error = |e| ReaderError::Postgres {
        table: WHAT.to_string(),
        source: Arc::new(e),
    };
    let row = client
        .query_one(
            "SELECT pg_current_wal_insert_lsn()::text, \
             pg_current_wal_insert_lsn() > pg_current_wal_flush_lsn()",
            &[],
        )
        .await
        .map_err(pg_error)?;
    let text: String = row.try_get(0).map_err(pg_error)?;
    let unflushed: bool = row.try_get(1).map_err(pg_error)?;
    if unflushed {
        // Commits under `synchronous_commit = off` return before their WAL is flushed, and
        // the daemon sees only flushed WAL: flush it rather than wait for the WAL writer.
        super::source::flush_wal(&client).await.map_err(pg_error)?;
    }
    text.parse::<Lsn>().map_err(|e| ReaderError::Schema {
        table: WHAT.to_string(),
        problem: format!("pg_current_wal_insert_lsn() returned {text:?}: {e}"),
    })
}

/// The daemon's applied position as last read, shared by every waiter of a reader: while
/// anyone waits, one task polls the checkpoint and wakes the waiters whose position it
/// reached, so a thousand waiters cost one `HGET` per poll, not a thousand.
pub(crate) struct AppliedWatch {
    state: watch::Sender<Seen>,
    polling: AtomicBool,
}

/// What the poller saw last.
#[derive(Clone, Default)]
struct Seen {
    applied: Option<Lsn>,
    /// The last poll failed (cleared by the next one that works).
    error: Option<redis::RedisError>,
}

impl AppliedWatch {
    pub(crate) fn new() -> AppliedWatch {
        AppliedWatch {
            state: watch::Sender::new(Seen::default()),
            polling: AtomicBool::new(false),
        }
    }
}

/// Waits until the daemon's checkpoint says it has applied `position`, for at most
/// `timeout`.
pub(super) async fn wait_applied(
    inner: &Arc<Inner>,
    position: Lsn,
    timeout: Duration,
) -> Result<(), ReaderError> {
    let reached = |seen: &Seen| seen.applied.is_some_and(|a| a >= position);
    let watch = &inner.applied_watch;
    if reached(&watch.state.borrow()) {
        // Positions only move forward: one seen since is enough.
        return Ok(());
    }
    let started = Instant::now();
    let mut seen = watch.state.subscribe();
    seen.mark_changed(); // the value before our subscription may predate our position
    start_polling(inner);
    let result = tokio::time::timeout(timeout, async {
        loop {
            seen.changed().await.ok();
            if reached(&seen.borrow_and_update()) {
                return;
            }
        }
    })
    .await;
    if result.is_ok() {
        return Ok(());
    }
    let last = seen.borrow().clone();
    match last.error {
        Some(source) => Err(ReaderError::Redis {
            key: inner.checkpoint_key.clone(),
            source,
        }),
        None => Err(ReaderError::NotApplied {
            position,
            applied: last.applied,
            waited: started.elapsed(),
        }),
    }
}

/// Starts the poller unless it runs. It stops once no one waits.
fn start_polling(inner: &Arc<Inner>) {
    if inner.applied_watch.polling.swap(true, Ordering::AcqRel) {
        return;
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        let watch = &inner.applied_watch;
        let mut backoff = Backoff::with_steps(FIRST_POLL, MAX_POLL);
        loop {
            if watch.state.receiver_count() == 0 {
                watch.polling.store(false, Ordering::Release);
                // A waiter that subscribed just before the store saw the flag still set and
                // relies on this task: take the flag back, unless another task already has.
                if watch.state.receiver_count() == 0 || watch.polling.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
            match lease::applied(&inner).await {
                Ok(applied) => {
                    let moved = watch.state.send_if_modified(|seen| {
                        let moved = applied > seen.applied || seen.error.is_some();
                        seen.applied = seen.applied.max(applied);
                        seen.error = None;
                        moved
                    });
                    if moved {
                        backoff = Backoff::with_steps(FIRST_POLL, MAX_POLL);
                    }
                }
                Err(e) => {
                    watch.state.send_modify(|seen| seen.error = Some(e));
                }
            }
            tokio::time::sleep(backoff.step()).await;
        }
    });
}
