//! What the read helper did: counters kept per table, readable in process with
//! [`Reader::stats`](super::Reader::stats) and, with the `metrics` feature, exported through
//! the `metrics` facade.
//!
//! Metric handles are registered once per table when the reader is built (label `table`),
//! so recording is an atomic add with no lookup or allocation; install the application's
//! metrics recorder before building the reader, or the handles are no-ops. Without the
//! `metrics` feature only the in-process counts are kept.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lookups answered by the first Redis read.
pub const HITS: &str = "pgcache_reader_hits_total";
/// Lookups the first Redis read did not answer.
pub const MISSES: &str = "pgcache_reader_misses_total";
/// Values written to Redis under a lease.
pub const FILLS: &str = "pgcache_reader_fills_total";
/// Fills that lost: a change revoked the lease, or the key was written meanwhile.
pub const LOST_FILLS: &str = "pgcache_reader_lost_fills_total";
/// Lookups that waited for another process's fill.
pub const WAITS: &str = "pgcache_reader_waits_total";
/// Lookups that shared another caller's wait or fill in the same process.
pub const COALESCED: &str = "pgcache_reader_coalesced_total";
/// Lookups answered from Postgres because Redis failed.
pub const FALLBACKS: &str = "pgcache_reader_fallbacks_total";
/// Waits that reached the lease TTL and read Postgres without filling.
pub const WAIT_TIMEOUTS: &str = "pgcache_reader_wait_timeouts_total";
/// Lookups answered by a cached absence (negative caching).
pub const NEGATIVE_HITS: &str = "pgcache_reader_negative_hits_total";
/// Probabilistic early refreshes started (XFetch).
pub const EARLY_REFRESHES: &str = "pgcache_reader_early_refreshes_total";
/// Row reads sent to Postgres (one per query, however many keys it reads).
pub const DB_READS: &str = "pgcache_reader_db_reads_total";
/// Misses that waited for the daemon to apply up to where their row was read.
pub const LAG_WAITS: &str = "pgcache_reader_lag_waits_total";
/// Misses answered from Postgres without filling because the daemon lagged past
/// `max_lag_wait`.
pub const LAG_FALLBACKS: &str = "pgcache_reader_lag_fallbacks_total";
/// Lookups answered from Postgres without asking Redis, because the circuit breaker was
/// open (a subset of the fallbacks).
pub const BREAKER_FALLBACKS: &str = "pgcache_reader_breaker_fallbacks_total";

/// Everything the reader counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Hit,
    Miss,
    Fill,
    LostFill,
    Wait,
    Coalesced,
    Fallback,
    WaitTimeout,
    NegativeHit,
    EarlyRefresh,
    DbRead,
    LagWait,
    LagFallback,
    BreakerFallback,
}

const EVENTS: [(Event, &str, &str); 14] = [
    (Event::Hit, HITS, "Lookups answered by the first Redis read"),
    (
        Event::Miss,
        MISSES,
        "Lookups the first Redis read did not answer",
    ),
    (Event::Fill, FILLS, "Values written to Redis under a lease"),
    (
        Event::LostFill,
        LOST_FILLS,
        "Fills that lost because a change revoked the lease or the key was written meanwhile",
    ),
    (
        Event::Wait,
        WAITS,
        "Lookups that waited for another process's fill",
    ),
    (
        Event::Coalesced,
        COALESCED,
        "Lookups that shared another caller's wait or fill in the same process",
    ),
    (
        Event::Fallback,
        FALLBACKS,
        "Lookups answered from Postgres because Redis failed",
    ),
    (
        Event::WaitTimeout,
        WAIT_TIMEOUTS,
        "Waits that reached the lease TTL and read Postgres without filling",
    ),
    (
        Event::NegativeHit,
        NEGATIVE_HITS,
        "Lookups answered by a cached absence",
    ),
    (
        Event::EarlyRefresh,
        EARLY_REFRESHES,
        "Probabilistic early refreshes started",
    ),
    (Event::DbRead, DB_READS, "Row reads sent to Postgres"),
    (
        Event::LagWait,
        LAG_WAITS,
        "Misses that waited for the daemon to apply up to where their row was read",
    ),
    (
        Event::LagFallback,
        LAG_FALLBACKS,
        "Misses answered from Postgres without filling because the daemon lagged",
    ),
    (
        Event::BreakerFallback,
        BREAKER_FALLBACKS,
        "Lookups answered from Postgres without asking Redis because the circuit breaker was open",
    ),
];

/// Registers help texts with the installed recorder (nothing without the `metrics` feature).
pub fn describe() {
    #[cfg(feature = "metrics")]
    for (_, name, help) in EVENTS {
        metrics::describe_counter!(name, help);
    }
}

/// One table's counters.
pub(crate) struct Counters {
    counts: [AtomicU64; EVENTS.len()],
    #[cfg(feature = "metrics")]
    exported: [metrics::Counter; EVENTS.len()],
}

impl Counters {
    pub(crate) fn new(#[allow(unused_variables)] table: &str) -> Counters {
        Counters {
            counts: Default::default(),
            #[cfg(feature = "metrics")]
            exported: EVENTS
                .map(|(_, name, _)| metrics::counter!(name, "table" => table.to_string())),
        }
    }

    pub(crate) fn record(&self, event: Event) {
        self.add(event, 1);
    }

    pub(crate) fn add(&self, event: Event, n: u64) {
        if n == 0 {
            return;
        }
        let i = event as usize;
        self.counts[i].fetch_add(n, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.exported[i].increment(n);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let get = |e: Event| self.counts[e as usize].load(Ordering::Relaxed);
        Stats {
            hits: get(Event::Hit),
            misses: get(Event::Miss),
            fills: get(Event::Fill),
            lost_fills: get(Event::LostFill),
            waits: get(Event::Wait),
            coalesced: get(Event::Coalesced),
            fallbacks: get(Event::Fallback),
            wait_timeouts: get(Event::WaitTimeout),
            negative_hits: get(Event::NegativeHit),
            early_refreshes: get(Event::EarlyRefresh),
            db_reads: get(Event::DbRead),
            lag_waits: get(Event::LagWait),
            lag_fallbacks: get(Event::LagFallback),
            breaker_fallbacks: get(Event::BreakerFallback),
        }
    }
}

/// Counts since the reader was built. Every lookup is either a hit or a miss; the other
/// counts say what happened to the misses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Lookups answered by the first Redis read.
    pub hits: u64,
    /// Lookups the first Redis read did not answer (including those Redis failed).
    pub misses: u64,
    /// Values (and, with negative caching, absences) this process wrote under a lease.
    pub fills: u64,
    /// Fills that lost because a change revoked the lease (the value read was stale) or the
    /// key was written meanwhile.
    pub lost_fills: u64,
    /// Lookups that found another process filling the key and waited for it.
    pub waits: u64,
    /// Lookups that shared the wait or fill of another caller in this process.
    pub coalesced: u64,
    /// Lookups answered from Postgres because Redis failed or the circuit breaker was open.
    pub fallbacks: u64,
    /// Waits that reached the lease TTL and read Postgres without filling.
    pub wait_timeouts: u64,
    /// Lookups answered by a cached absence (negative caching).
    pub negative_hits: u64,
    /// Probabilistic early refreshes started.
    pub early_refreshes: u64,
    /// Row reads sent to Postgres (a batch read counts once).
    pub db_reads: u64,
    /// Misses that waited for the daemon to apply up to where their row was read, so that
    /// no reader sees the row go back afterwards (monotonic reads).
    pub lag_waits: u64,
    /// Misses answered from Postgres without filling because the daemon lagged more than
    /// `max_lag_wait`.
    pub lag_fallbacks: u64,
    /// Fallbacks that did not ask Redis at all, because the circuit breaker was open after
    /// Redis timed out or refused (counted in `fallbacks` too).
    pub breaker_fallbacks: u64,
}

impl Stats {
    /// Hits over lookups, from 0 to 1; 0 before the first lookup.
    pub fn hit_rate(&self) -> f64 {
        let lookups = self.hits + self.misses;
        if lookups == 0 {
            0.0
        } else {
            self.hits as f64 / lookups as f64
        }
    }

    pub(crate) fn merge(mut self, other: Stats) -> Stats {
        self.hits += other.hits;
        self.misses += other.misses;
        self.fills += other.fills;
        self.lost_fills += other.lost_fills;
        self.waits += other.waits;
        self.coalesced += other.coalesced;
        self.fallbacks += other.fallbacks;
        self.wait_timeouts += other.wait_timeouts;
        self.negative_hits += other.negative_hits;
        self.early_refreshes += other.early_refreshes;
        self.db_reads += other.db_reads;
        self.lag_waits += other.lag_waits;
        self.lag_fallbacks += other.lag_fallbacks;
        self.breaker_fallbacks += other.breaker_fallbacks;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_indexed_in_order() {
        for (i, (event, _, _)) in EVENTS.iter().enumerate() {
            assert_eq!(*event as usize, i);
        }
    }

    #[test]
    fn counts_and_hit_rate() {
        let c = Counters::new("public.t");
        assert_eq!(c.snapshot().hit_rate(), 0.0);
        c.add(Event::Hit, 3);
        c.record(Event::Miss);
        c.record(Event::Fill);
        c.add(Event::DbRead, 0);
        let s = c.snapshot();
        assert_eq!((s.hits, s.misses, s.fills, s.db_reads), (3, 1, 1, 0));
        assert_eq!(s.hit_rate(), 0.75);
        let both = s.merge(s);
        assert_eq!((both.hits, both.misses), (6, 2));
    }
}
