//! A bare pgoutput consumer: our replication client and decoder and nothing else. It is
//! the strictest floor for streaming: what the walsender can deliver to a client that
//! does no work, without `pg_recvlogical`'s two `write(2)` calls per message.

use std::time::{Duration, Instant};

use super::lab::{Lab, PUBLICATION};
use super::BenchError;
use crate::daemon::pgoutput::{self, Message};
use crate::daemon::replication::{ReplicationConnection, ReplicationEvent};
use crate::pgconn::PgTarget;
use crate::Lsn;

/// Streams `slot` from its start, decoding every message, until the transaction that
/// inserts into `marker_table` (unqualified name) commits. Returns the time from the
/// start of streaming to that commit.
///
/// # Errors
/// The connection fails, a message does not decode, or the marker does not come within
/// `limit`.
pub async fn stream_to_marker(
    lab: &Lab,
    slot: &str,
    marker_table: &str,
    limit: Duration,
) -> Result<Duration, BenchError> {
    let fail = |e: crate::daemon::replication::ReplicationError| {
        BenchError::Child(format!("the bare pgoutput consumer on {slot}: {e}"))
    };
    let target = PgTarget::parse(&lab.pg_url())
        .map_err(|e| BenchError::Setup(format!("the bench's Postgres URL: {e}")))?;
    let replication = ReplicationConnection::connect(&target)
        .await
        .map_err(fail)?;
    let started = Instant::now();
    let mut stream = replication
        .start_logical(slot, Lsn::ZERO, PUBLICATION)
        .await
        .map_err(fail)?;
    let mut marker_relation = None;
    let mut marker_seen = false;
    let run = async {
        loop {
            match stream.next().await.map_err(fail)? {
                ReplicationEvent::XLogData { data, .. } => {
                    match pgoutput::decode(data)
                        .map_err(|e| BenchError::Check(format!("decoding pgoutput: {e}")))?
                    {
                        Message::Relation(r) if r.name == marker_table => {
                            marker_relation = Some(r.id);
                        }
                        Message::Insert(i) if Some(i.relation_id) == marker_relation => {
                            marker_seen = true;
                        }
                        Message::Commit(_) if marker_seen => return Ok(started.elapsed()),
                        _ => {}
                    }
                }
                ReplicationEvent::Keepalive {
                    wal_end,
                    reply_requested: true,
                    ..
                } => stream
                    .send_status(wal_end, wal_end, wal_end, false)
                    .await
                    .map_err(fail)?,
                ReplicationEvent::Keepalive { .. } => {}
            }
        }
    };
    let elapsed = tokio::time::timeout(limit, run).await.map_err(|_| {
        BenchError::Timeout(format!(
            "the bare pgoutput consumer did not reach the marker within {limit:?}"
        ))
    })??;
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.finish()).await;
    Ok(elapsed)
}
