//! The circuit breaker in front of Redis: after Redis times out or drops the connection,
//! lookups stop asking it for a cool-down and read Postgres at once.
//!
//! A Redis that hangs (stopped by `SIGSTOP`, swapping, a full network buffer) answers
//! nothing until `redis_timeout` passes, so without a breaker every lookup would wait that
//! long before its fallback. With it, only the calls already in flight when Redis hung pay
//! the timeout; calls after them read Postgres straight away.
//!
//! States:
//! - *closed*: lookups use Redis. `failures` consecutive timeouts or connection errors open
//!   the breaker. Other Redis errors (a script error, `WRONGTYPE`) mean Redis answered, so
//!   they do not count.
//! - *open* until the cool-down ends: lookups skip Redis (`breaker_fallbacks`).
//! - *half-open* after it: the first lookup that sees the cool-down over starts one probe, a
//!   `PING` in a task of its own, and reads Postgres like the others; no caller waits for the
//!   probe. An answer closes the breaker, a failure opens it for another cool-down. Any Redis
//!   command that succeeds meanwhile closes it too.
//!
//! The closed state costs a lookup one atomic load.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What a lookup may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permit {
    /// Use Redis.
    Redis,
    /// Skip Redis; read Postgres.
    Skip,
    /// Skip Redis, and send the probe that decides whether the breaker closes.
    SkipAndProbe,
}

/// The breaker's state, shared by every clone of a reader.
pub(crate) struct Breaker {
    /// Consecutive failures that open the breaker; 0: never open.
    threshold: u32,
    cooldown: Duration,
    /// Start of the clock that `open_until` counts from.
    epoch: Instant,
    /// 0 while closed; else the end of the cool-down, in nanoseconds since `epoch` (at
    /// least 1).
    open_until: AtomicU64,
    /// Consecutive failures while closed.
    failures: AtomicU32,
    /// A probe is in flight: others skip Redis without probing.
    probing: AtomicBool,
}

/// What a change of state means for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    None,
    Opened,
    Closed,
}

impl Breaker {
    /// A breaker that opens after `threshold` consecutive failures (0: never) for
    /// `cooldown`.
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold,
            cooldown,
            epoch: Instant::now(),
            open_until: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            probing: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Whether a lookup should ask Redis now.
    pub(crate) fn permit(&self) -> Permit {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Permit::Redis;
        }
        if self.now() < until {
            return Permit::Skip;
        }
        match self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
        {
            Ok(_) => Permit::SkipAndProbe,
            Err(_) => Permit::Skip,
        }
    }

    /// Whether lookups skip Redis now (open, or half-open with a probe in flight).
    pub(crate) fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }

    /// A Redis command answered.
    pub(crate) fn succeeded(&self) -> Change {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.open_until.load(Ordering::Acquire) == 0 {
            return Change::None;
        }
        self.probing.store(false, Ordering::Release);
        if self.open_until.swap(0, Ordering::AcqRel) != 0 {
            Change::Closed
        } else {
            Change::None
        }
    }

    /// A Redis command failed with `error`; only timeouts and connection errors count.
    pub(crate) fn failed(&self, error: &redis::RedisError) -> Change {
        if trips(error) {
            self.record_failure()
        } else {
            Change::None
        }
    }

    /// The probe found Redis still failing, whatever the error: open for another cool-down.
    pub(crate) fn probe_failed(&self) {
        if self.threshold > 0 {
            self.open();
        }
        self.probing.store(false, Ordering::Release);
    }

    fn record_failure(&self) -> Change {
        if self.threshold == 0 {
            return Change::None;
        }
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures < self.threshold {
            return Change::None;
        }
        if self.open() {
            Change::Opened
        } else {
            Change::None
        }
    }

    /// Starts a cool-down from now; `true` when the breaker was closed.
    fn open(&self) -> bool {
        let until = self
            .now()
            .saturating_add(u64::try_from(self.cooldown.as_nanos()).unwrap_or(u64::MAX));
        self.open_until.swap(until, Ordering::AcqRel) == 0
    }
}

/// Whether `error` says that Redis did not answer (timeout, refused, dropped connection),
/// as opposed to an answer that was an error.
pub(crate) fn trips(error: &redis::RedisError) -> bool {
    error.is_timeout()
        || error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout() -> redis::RedisError {
        redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
    }

    fn script_error() -> redis::RedisError {
        redis::RedisError::from((redis::ErrorKind::Parse, "unexpected reply"))
    }

    #[test]
    fn opens_after_the_threshold_and_skips_redis_for_the_cooldown() {
        let b = Breaker::new(2, Duration::from_secs(60));
        assert_eq!(b.permit(), Permit::Redis);
        assert_eq!(b.failed(&script_error()), Change::None);
        assert_eq!(b.failed(&timeout()), Change::None);
        assert_eq!(b.permit(), Permit::Redis);
        // A success in between starts the count again.
        assert_eq!(b.succeeded(), Change::None);
        assert_eq!(b.failed(&timeout()), Change::None);
        assert_eq!(b.failed(&timeout()), Change::Opened);
        assert!(b.is_open());
        assert_eq!(b.permit(), Permit::Skip);
        assert_eq!(b.failed(&timeout()), Change::None, "already open");
        assert_eq!(b.succeeded(), Change::Closed);
        assert_eq!(b.permit(), Permit::Redis);
    }

    #[test]
    fn one_probe_after_the_cooldown_closes_or_reopens() {
        let b = Breaker::new(1, Duration::ZERO);
        assert_eq!(b.failed(&timeout()), Change::Opened);
        std::thread::sleep(Duration::from_millis(1));
        assert_eq!(b.permit(), Permit::SkipAndProbe);
        assert_eq!(b.permit(), Permit::Skip, "one probe at a time");
        b.probe_failed();
        std::thread::sleep(Duration::from_millis(1));
        assert_eq!(
            b.permit(),
            Permit::SkipAndProbe,
            "reopened, then half-open again"
        );
        assert_eq!(b.succeeded(), Change::Closed);
        assert_eq!(b.permit(), Permit::Redis);
    }

    #[test]
    fn a_zero_threshold_never_opens() {
        let b = Breaker::new(0, Duration::from_secs(1));
        for _ in 0..10 {
            assert_eq!(b.failed(&timeout()), Change::None);
        }
        b.probe_failed();
        assert_eq!(b.permit(), Permit::Redis);
    }

    #[test]
    fn only_timeouts_and_connection_errors_trip() {
        assert!(trips(&timeout()));
        assert!(trips(&redis::RedisError::from(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused
        ))));
        assert!(!trips(&script_error()));
        assert!(!trips(&redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "WRONGTYPE"
        ))));
    }
}
