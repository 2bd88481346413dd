//! Commit visibility: a transaction reaches the replication stream as soon as its commit
//! record is flushed, before other sessions can see it (always briefly, and for as long as a
//! synchronous standby takes to answer). The daemon writes a transaction's changes to Redis
//! only once Postgres readers can see it, so that:
//! - a read helper that takes a lease after the daemon applied a change reads that change
//!   (or a newer one), never the row before it (G4);
//! - Redis never shows what Postgres readers cannot see yet, such as a commit still waiting
//!   for its synchronous standby (and lost if the primary fails meanwhile).
//!
//! The check is one `pg_current_snapshot()`: a committed transaction is visible to new
//! snapshots once its xid is below the snapshot's `xmax` and not in its in-progress list. A
//! snapshot is kept and reused while it covers what is asked, so a backlog streamed long
//! after its commits needs one query, not one per batch.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tracing::warn;

/// A snapshot's horizon, with 64-bit transaction ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    in_progress: HashSet<u64>,
}

impl Snapshot {
    /// A new snapshot's horizon as `client` sees it now (`None`: unreadable text).
    ///
    /// # Errors
    /// The query failed.
    pub async fn current(client: &Client) -> Result<Option<Snapshot>, tokio_postgres::Error> {
        let text: String = client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await?
            .get(0);
        Ok(Snapshot::parse(&text))
    }

    /// Parses `pg_current_snapshot()`'s text: `xmin:xmax:xip,xip,...`.
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let in_progress = match parts.next()? {
            "" => HashSet::new(),
            list => list
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?,
        };
        Some(Snapshot {
            xmin,
            xmax,
            in_progress,
        })
    }

    /// Whether the committed transaction `xid` (32 bits, as pgoutput sends it) is visible in
    /// this snapshot. Live transaction ids lie within 2^31 of each other, so the 32-bit id
    /// is placed below `xmax` by modular distance; one at or past `xmax` is not visible.
    pub fn shows(&self, xid: u32) -> bool {
        let below = (self.xmax as u32).wrapping_sub(xid);
        if below == 0 || below > 1 << 31 || u64::from(below) > self.xmax {
            return false;
        }
        let full = self.xmax - u64::from(below);
        full < self.xmin || !self.in_progress.contains(&full)
    }
}

/// The daemon's view of which of its transactions readers can see.
pub struct Visibility {
    client: Arc<Client>,
    snapshot: Option<Snapshot>,
}

impl Visibility {
    pub fn new(client: Arc<Client>) -> Visibility {
        Visibility {
            client,
            snapshot: None,
        }
    }

    /// Returns once every one of `xids` (committed transactions) is visible to new
    /// snapshots, polling Postgres with backoff while one is not, and saying so in the log
    /// when that lasts.
    ///
    /// # Errors
    /// The snapshot query failed.
    pub async fn wait(&mut self, xids: &[u32]) -> Result<(), tokio_postgres::Error> {
        let covered = |snapshot: &Option<Snapshot>| {
            snapshot
                .as_ref()
                .is_some_and(|s| xids.iter().all(|&xid| s.shows(xid)))
        };
        if covered(&self.snapshot) {
            return Ok(());
        }
        let started = Instant::now();
        let mut pause = Duration::from_micros(200);
        let mut warned = false;
        loop {
            self.snapshot = Snapshot::current(&self.client).await?;
            if covered(&self.snapshot) {
                metrics::histogram!(crate::metrics::VISIBILITY_WAIT)
                    .record(started.elapsed().as_secs_f64());
                return Ok(());
            }
            if !warned && started.elapsed() > Duration::from_secs(1) {
                warned = true;
                let waiting: Vec<u32> = xids
                    .iter()
                    .copied()
                    .filter(|&x| !self.snapshot.as_ref().is_some_and(|s| s.shows(x)))
                    .collect();
                warn!(
                    xids = ?waiting,
                    "committed transactions are not yet visible to other sessions (a \
                     synchronous standby that does not answer?): their changes wait, so that \
                     Redis never shows what Postgres readers cannot see"
                );
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(text: &str) -> Snapshot {
        Snapshot::parse(text).unwrap()
    }

    #[test]
    fn parses_snapshots() {
        assert_eq!(
            snapshot("10:20:12,15"),
            Snapshot {
                xmin: 10,
                xmax: 20,
                in_progress: [12, 15].into()
            }
        );
        assert!(snapshot("10:10:").in_progress.is_empty());
        assert!(Snapshot::parse("10:x:").is_none());
        assert!(Snapshot::parse("10").is_none());
    }

    #[test]
    fn visibility_follows_xmin_xmax_and_the_in_progress_list() {
        let s = snapshot("10:20:12,15");
        assert!(s.shows(5));
        assert!(s.shows(10));
        assert!(s.shows(11));
        assert!(!s.shows(12));
        assert!(!s.shows(15));
        assert!(s.shows(19));
        assert!(!s.shows(20));
        assert!(!s.shows(25));
    }

    #[test]
    fn ids_of_later_epochs_are_placed_by_modular_distance() {
        // xmax is 2^32 + 5: 32-bit id 3 is 2^32 + 3 (visible), 0xFFFF_FFF0 is just below the
        // wrap (visible), 7 is past xmax (not visible).
        let s = snapshot("4294967290:4294967301:");
        assert!(s.shows(3));
        assert!(s.shows(0xFFFF_FFF0));
        assert!(!s.shows(7));
        // In the first epoch nothing lies below 0.
        assert!(!snapshot("3:5:").shows(0xFFFF_FFF0));
    }
}
