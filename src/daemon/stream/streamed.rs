//! Streamed transactions (pgoutput protocol version 2): Stream Start, Stop, Abort and
//! Commit, and the replay of a committed one from the spool through the stream's handlers.

use tracing::{debug, info};

use super::{decode_error, Stream};
use crate::daemon::pgoutput::{self, Begin, Commit, Message, StreamCommit};
use crate::daemon::spool::{Replay, SpoolError};
use crate::daemon::RunError;
use crate::metrics as m;

/// A committed streamed transaction being read back from the spool.
pub(super) struct Replaying {
    replay: Replay,
    /// The Commit that closes it once the spool is read.
    commit: Commit,
    /// Small enough (`apply.max_spool_bytes`) to be applied in one EXEC, whatever the
    /// transaction limits say.
    pub(super) atomic: bool,
}

/// Messages read back from the spool per turn of the loop, so ticks (status updates to
/// Postgres) and finished writes are not starved by a long replay.
const REPLAY_STEP: usize = 4096;

impl Stream<'_> {
    /// Stream Start, Stop, Abort and Commit: `None` for any other message. Commit opens the
    /// transaction (`Begin`) and leaves the rest to [`replay_step`](Self::replay_step).
    pub(super) fn on_stream_message(&mut self, message: &Message) -> Option<Result<(), RunError>> {
        if !matches!(
            message,
            Message::StreamStart(_)
                | Message::StreamStop
                | Message::StreamCommit(_)
                | Message::StreamAbort(_)
        ) {
            return None;
        }
        let Some(spool) = &mut self.spool else {
            return Some(Err(RunError::fatal(
                "postgres",
                format!(
                    "pgoutput sent a {} message, but streaming was not asked for",
                    message.kind()
                ),
            )));
        };
        let outcome = match message {
            Message::StreamStart(start) => spool.start(start.xid, start.first_segment),
            Message::StreamStop => spool.stop(),
            Message::StreamAbort(abort) => {
                if abort.is_top_level() {
                    debug!(xid = abort.xid, "streamed transaction rolled back");
                }
                spool.abort(abort.xid, abort.subxid)
            }
            Message::StreamCommit(commit) => match spool.commit(commit.xid) {
                Ok(replay) => {
                    self.start_replay(commit, replay);
                    Ok(())
                }
                Err(e) => Err(e),
            },
            _ => Ok(()),
        };
        Some(outcome.map_err(spool_error))
    }

    /// A streamed transaction committed: it opens like one sent whole, and its spooled
    /// messages follow.
    fn start_replay(&mut self, commit: &StreamCommit, replay: Replay) {
        let atomic = replay.bytes() <= self.config.apply.max_spool_bytes as u64;
        debug!(xid = commit.xid, commit = %commit.commit_lsn, bytes = replay.bytes(), atomic, "applying a streamed transaction");
        if !atomic {
            info!(xid = commit.xid, commit = %commit.commit_lsn, bytes = replay.bytes(), max_spool_bytes = self.config.apply.max_spool_bytes, "a streamed transaction is larger than apply.max_spool_bytes: it is applied in parts");
        }
        self.on_begin(&Begin {
            final_lsn: commit.commit_lsn,
            commit_time: commit.commit_time,
            xid: commit.xid,
        });
        self.replaying = Some(Replaying {
            replay,
            commit: Commit {
                flags: commit.flags,
                commit_lsn: commit.commit_lsn,
                end_lsn: commit.end_lsn,
                commit_time: commit.commit_time,
            },
            atomic,
        });
        metrics::counter!(m::STREAMED_TRANSACTIONS).increment(1);
    }

    /// Applies the next spooled messages of the committed streamed transaction, as many as
    /// the batch takes (up to [`REPLAY_STEP`]); at the end of the spool, its Commit.
    pub(super) async fn replay_step(&mut self) -> Result<(), RunError> {
        for _ in 0..REPLAY_STEP {
            let Some(replaying) = &mut self.replaying else {
                return Ok(());
            };
            let Some(payload) = replaying.replay.next_payload().map_err(spool_error)? else {
                let Some(replaying) = self.replaying.take() else {
                    return Ok(());
                };
                return self.on_message(Message::Commit(replaying.commit)).await;
            };
            // One the checkpoint covers applies no change, but its Relation messages are
            // read all the same: once it commits, Postgres counts the schema as sent for
            // the rest of the session, and a later change to a table first announced here
            // would reach a daemon that does not know its relation.
            let skipping = self.tx.as_ref().is_some_and(|tx| tx.skipping);
            if skipping && !pgoutput::is_relation(&payload) {
                continue;
            }
            let streamed = pgoutput::decode_streamed(payload).map_err(decode_error)?;
            // What a rolled-back subtransaction sent is skipped, its Relation messages too
            // (a rename undone by the rollback must not stop the table): Postgres sends a
            // subtransaction's abort (Stream Abort) as soon as it decodes it, and then
            // forgets which schemas it sent in the transaction, so the next change to a
            // table comes with its Relation message again.
            let rolled_back = streamed
                .xid
                .is_some_and(|xid| replaying.replay.is_aborted(xid));
            if !rolled_back {
                self.on_message(streamed.message).await?;
            }
            if !self.can_take_more() {
                break;
            }
        }
        Ok(())
    }
}

/// A spool that cannot be written ends the session: the next one empties it and Postgres
/// sends the open transactions again.
pub(super) fn spool_error(e: SpoolError) -> RunError {
    RunError::transient("spool", format!("streamed transactions: {e}"))
}
