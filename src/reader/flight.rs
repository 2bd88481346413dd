//! Single flight: callers in one process that ask for the same key meanwhile share one
//! piece of work and its outcome.
//!
//! Two maps use it: every lookup shares its `GET` and, on a miss, everything after it
//! (lease, wait, database read), so a herd of callers of a cold key is woken once, with
//! the answer; and the miss resolution itself is shared with batch lookups and early
//! refreshes of the same key.
//!
//! The first caller for a key becomes the *leader* and does the work; later callers get a
//! receiver for its outcome. The map is locked only to look up, insert or remove an entry,
//! never across an await. If the leader is cancelled before it finishes, its entry goes away
//! with it and the followers, seeing the channel closed, start over (one becomes leader).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;

use super::lookup::Resolved;
use super::ReaderError;

/// What a lookup ends with: the value (`None` for no row) and how it was served, or the
/// error every sharer gets.
pub(crate) type Outcome = Result<Resolved, ReaderError>;

type Slot<T> = watch::Receiver<Option<T>>;

pub(crate) struct Flights<T = Outcome> {
    in_flight: Mutex<HashMap<String, Slot<T>>>,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Flights {
            in_flight: Mutex::new(HashMap::new()),
        }
    }
}

pub(crate) enum Joined<'a, T = Outcome> {
    /// This caller does the work and must hand its outcome to [`Leader::finish`].
    Leader(Leader<'a, T>),
    /// Another caller does the work: wait for it with [`follow`].
    Follower(Slot<T>),
}

/// The duty to resolve one key for everyone who asks meanwhile.
pub(crate) struct Leader<'a, T = Outcome> {
    flights: &'a Flights<T>,
    key: String,
    sender: watch::Sender<Option<T>>,
}

impl<T> Flights<T> {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Slot<T>>> {
        // Entries are inserted and removed whole; a poisoned map is still consistent.
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins the flight for `key`, or starts one.
    pub(crate) fn join(&self, key: &str) -> Joined<'_, T> {
        let mut map = self.lock();
        if let Some(slot) = map.get(key) {
            return Joined::Follower(slot.clone());
        }
        let (sender, receiver) = watch::channel(None);
        map.insert(key.to_string(), receiver);
        Joined::Leader(Leader {
            flights: self,
            key: key.to_string(),
            sender,
        })
    }

    /// Runs `work` for `key` once for every caller that asks meanwhile, and returns its
    /// outcome, with `true` when this caller shared another caller's work. `work` may hand
    /// the outcome to the others early, through its [`Early`], and go on (to fill the cache,
    /// say); the flight lasts until it returns, so callers who join meanwhile get that
    /// outcome too.
    pub(crate) async fn share<F, Fut>(&self, key: &str, work: F) -> (T, bool)
    where
        T: Clone,
        F: Fn(Early<T>) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let mut followed = false;
        loop {
            match self.join(key) {
                Joined::Leader(leader) => {
                    let outcome = work(leader.early()).await;
                    leader.finish(outcome.clone());
                    return (outcome, followed);
                }
                Joined::Follower(slot) => {
                    followed = true;
                    if let Some(outcome) = follow(slot).await {
                        return (outcome, true);
                    }
                    // The leader was cancelled: start over, perhaps as the leader.
                }
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// A leader's way to hand its outcome to the followers before it has finished.
pub(crate) struct Early<T> {
    sender: watch::Sender<Option<T>>,
}

impl<T> Early<T> {
    pub(crate) fn publish(&self, outcome: T) {
        self.sender.send_replace(Some(outcome));
    }
}

impl<T> Leader<'_, T> {
    pub(crate) fn early(&self) -> Early<T> {
        Early {
            sender: self.sender.clone(),
        }
    }

    /// Hands the outcome to every follower and ends the flight.
    pub(crate) fn finish(self, outcome: T) {
        // Publish before removing the entry, so a caller that joins in between still gets
        // this outcome rather than starting a flight of its own.
        self.sender.send_replace(Some(outcome));
    }
}

impl<T> Drop for Leader<'_, T> {
    fn drop(&mut self) {
        self.flights.lock().remove(&self.key);
    }
}

/// Waits for the leader's outcome; `None` when the leader went away without one.
pub(crate) async fn follow<T: Clone>(mut slot: Slot<T>) -> Option<T> {
    match slot.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone(),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::reader::Served;

    #[tokio::test]
    async fn followers_get_the_leaders_outcome() {
        let flights: Flights = Flights::default();
        let Joined::Leader(leader) = flights.join("k") else {
            panic!("first caller must lead");
        };
        let Joined::Follower(slot) = flights.join("k") else {
            panic!("second caller must follow");
        };
        let waiting = tokio::spawn(follow(slot));
        leader.finish(Ok(Resolved {
            value: Some(Bytes::from_static(b"v")),
            served: Served::Filled,
            coalesced: false,
        }));
        let outcome = waiting.await.unwrap().unwrap().unwrap();
        assert_eq!(outcome.value.as_deref(), Some(&b"v"[..]));
        assert_eq!(outcome.served, Served::Filled);
        assert_eq!(flights.len(), 0);
        assert!(matches!(flights.join("k"), Joined::Leader(_)));
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_its_followers() {
        let flights: Flights = Flights::default();
        let leader = flights.join("k");
        let Joined::Follower(slot) = flights.join("k") else {
            panic!("second caller must follow");
        };
        drop(leader);
        assert!(follow(slot).await.is_none());
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn an_early_outcome_reaches_followers_and_later_joiners_before_the_leader_ends() {
        let flights: Flights<u32> = Flights::default();
        let (published_tx, published_rx) = tokio::sync::oneshot::channel::<()>();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let cell = Mutex::new(Some((published_tx, release_rx)));
        let leader = flights.share("k", |early| {
            let (published, release) = cell.lock().unwrap().take().unwrap();
            async move {
                early.publish(7);
                let _ = published.send(());
                // Still filling: the flight must stay open until this returns.
                let _ = release.await;
                7
            }
        });
        let joiner = async {
            published_rx.await.unwrap();
            let Joined::Follower(slot) = flights.join("k") else {
                panic!("the flight ended before its leader did");
            };
            let got = follow(slot).await;
            let _ = release_tx.send(());
            got
        };
        let ((led, followed), got) = tokio::join!(leader, joiner);
        assert_eq!((led, followed, got), (7, false, Some(7)));
        assert_eq!(flights.len(), 0);
    }

    #[test]
    fn keys_are_independent() {
        let flights: Flights = Flights::default();
        let _a = flights.join("a");
        assert!(matches!(flights.join("b"), Joined::Leader(_)));
        assert!(matches!(flights.join("a"), Joined::Follower(_)));
    }
}
