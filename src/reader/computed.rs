//! Computed values: [`Reader::get_with`](super::Reader::get_with) caches what a loader
//! builds (a user's order list, a page) under the same lease protocol as table rows.
//!
//! The key is not a table's: nothing in the daemon writes it. A table's
//! `[[tables.invalidate]]` rules name it, and every change to that table deletes it with its
//! lease, in the same `MULTI … EXEC` as the change's other writes. So:
//! 1. `GET key`; a hit is returned.
//! 2. On a miss, `acquire.lua` takes the lease (or finds the value, or another holder).
//! 3. The holder takes the WAL position (`pg_current_wal_insert_lsn()`) *before* calling
//!    the loader: every change committed before the loader's reads began ends at or before
//!    it.
//! 4. The loader runs; its value is serialized (JSON, or the caller's bytes).
//! 5. `fill.lua` writes it only while the lease still holds our token, the key is absent,
//!    and the daemon has applied the stream up to the position of step 3 (waiting for it at
//!    most `max_lag_wait`). A change applied since step 2 deleted the lease: the fill loses,
//!    and the caller gets the value it loaded, not cached (the next call loads again).
//!
//! Callers in one process that miss the same key together share one load. Others wait for
//! the holder's fill (polling with backoff, up to the lease TTL), then load without filling.
//! When Redis fails, or the circuit breaker is open, the loader runs and nothing is cached.
//!
//! Every call is counted as a table lookup is ([`Event`]), in the reader's counters for
//! computed keys (label `table="(computed)"`), with a loader run counted as a database
//! read; and each call says how it was served ([`Served`]).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;

use super::lease::{self, Backoff, ABSENT};
use super::stats::{Counters, Event};
use super::{source, Inner, ReaderError, Served};
use crate::Lsn;

/// The label of computed keys' counters, in place of a table name.
pub(crate) const COUNTERS_LABEL: &str = "(computed)";

/// A computed key's value and how it was served.
#[derive(Debug, Clone)]
pub(crate) struct Computed {
    pub(crate) value: Bytes,
    pub(crate) served: Served,
    /// The caller shared another caller's miss in this process.
    pub(crate) coalesced: bool,
    /// The leader's fill lost: a change invalidated the key while its loader ran, so the
    /// value may predate that change.
    lost_fill: bool,
}

impl Computed {
    pub(crate) fn new(value: Bytes, served: Served) -> Computed {
        Computed {
            value,
            served,
            coalesced: false,
            lost_fill: false,
        }
    }
}

/// What the leader of a computed key's flight ends with, as every sharer sees it (`None`
/// only when this caller's loader was already taken), or the error every sharer gets.
pub(crate) type Outcome = Result<Option<Computed>, ReaderError>;

/// The boxed error a loader may return.
pub type LoaderError = Box<dyn std::error::Error + Send + Sync>;

/// What the acquire script found for a computed key.
enum Found {
    Hit(Bytes),
    Acquired(String),
    Held,
}

/// A held lease on a computed key; given back when dropped unsettled (a loader that
/// failed, panicked or was cancelled), so that waiters need not sit out its TTL.
struct Held {
    inner: Arc<Inner>,
    lease_key: String,
    token: String,
    settled: bool,
}

impl Held {
    async fn release(mut self) {
        self.settled = true;
        if let Err(e) = lease::release(&self.inner, &self.lease_key, &self.token).await {
            self.inner.redis_failed(&e);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        lease::release_in_background(
            &self.inner,
            std::mem::take(&mut self.lease_key),
            std::mem::take(&mut self.token),
        );
    }
}

/// The value of `redis_key`, from Redis or from `loader` (filled under the lease). The
/// loader gives the bytes to cache; `ttl_ms` 0 caches without expiry.
pub(super) async fn get_with<F, Fut>(
    inner: &Arc<Inner>,
    redis_key: &str,
    ttl_ms: u64,
    loader: F,
) -> Outcome
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Vec<u8>, LoaderError>>,
{
    let counters = &inner.computed_counters;
    if !inner.use_redis() {
        counters.record(Event::Miss);
        counters.record(Event::Fallback);
        counters.record(Event::BreakerFallback);
        let value = load(counters, redis_key, loader).await?;
        return Ok(Some(Computed::new(value, Served::BreakerOpen)));
    }
    if super::lookup::too_long(redis_key) {
        // Not sent to Redis (see `lookup::MAX_KEY_BYTES`): loaded, uncached.
        counters.record(Event::Miss);
        counters.record(Event::Fallback);
        let value = load(counters, redis_key, loader).await?;
        return Ok(Some(Computed::new(value, Served::Uncached)));
    }
    let cached = match inner.redis.get() {
        Ok(mut conn) => {
            redis::cmd("GET")
                .arg(redis_key)
                .query_async::<Option<Vec<u8>>>(&mut conn)
                .await
        }
        Err(error) => Err(error),
    };
    match cached {
        Ok(Some(value)) => {
            inner.redis_worked();
            counters.record(Event::Hit);
            return Ok(Some(Computed::new(Bytes::from(value), Served::Hit)));
        }
        Ok(None) => {
            inner.redis_worked();
            counters.record(Event::Miss);
        }
        Err(e) => {
            inner.redis_failed(&e);
            counters.record(Event::Miss);
            counters.record(Event::Fallback);
            let value = load(counters, redis_key, loader).await?;
            return Ok(Some(Computed::new(value, Served::Fallback)));
        }
    }
    // The loader runs at most once, by whichever caller leads the key's flight.
    let loader = Mutex::new(Some(loader));
    let take = || loader.lock().ok().and_then(|mut l| l.take());
    let (mut outcome, followed) = inner
        .computed_flights
        .share(redis_key, |_| {
            let loader = take();
            async move {
                match loader {
                    Some(loader) => lead(inner, redis_key, ttl_ms, loader).await.map(Some),
                    // `share` runs the work at most once per caller.
                    None => Ok(None),
                }
            }
        })
        .await;
    if followed && matches!(&outcome, Ok(Some(c)) if c.lost_fill) {
        // The leader's value may predate a change this caller waited for (it wrote, then
        // `wait_for_writes`, then asked): it loads for itself, under the lease protocol.
        if let Some(loader) = take() {
            return lead(inner, redis_key, ttl_ms, loader).await.map(Some);
        }
    }
    if followed {
        counters.record(Event::Coalesced);
        if let Ok(Some(computed)) = &mut outcome {
            computed.coalesced = true;
        }
    }
    outcome
}

/// Runs the loader (counted as a database read).
async fn load<F, Fut>(counters: &Counters, redis_key: &str, loader: F) -> Result<Bytes, ReaderError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Vec<u8>, LoaderError>>,
{
    counters.record(Event::DbRead);
    loader()
        .await
        .map(Bytes::from)
        .map_err(|e| ReaderError::Loader {
            key: redis_key.to_string(),
            source: Arc::from(e),
        })
}

async fn acquire(inner: &Arc<Inner>, redis_key: &str) -> Result<Found, redis::RedisError> {
    let lease_key = crate::template::lease_key(redis_key);
    let token = lease::new_token();
    let mut conn = inner.redis.get()?;
    let reply: redis::Value = lease::ACQUIRE
        .key(redis_key)
        .key(&lease_key)
        .arg(&token)
        .arg(lease::millis(inner.options.lease_ttl))
        .arg(ABSENT)
        .invoke_async(&mut conn)
        .await?;
    let mut items = match reply {
        redis::Value::Array(items) => items.into_iter(),
        _ => Vec::new().into_iter(),
    };
    Ok(match (items.next(), items.next()) {
        (Some(redis::Value::Int(1)), Some(redis::Value::BulkString(v))) => {
            Found::Hit(Bytes::from(v))
        }
        (Some(redis::Value::Int(2)), _) => Found::Acquired(token),
        // Nothing caches an absence for a computed key; a marker there is someone else's.
        (Some(redis::Value::Int(3 | 4)), _) => Found::Held,
        _ => {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "unexpected reply from the pgcache acquire script",
            )))
        }
    })
}

/// The lease protocol for one computed key, by the caller that leads its flight.
async fn lead<F, Fut>(
    inner: &Arc<Inner>,
    redis_key: &str,
    ttl_ms: u64,
    loader: F,
) -> Result<Computed, ReaderError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Vec<u8>, LoaderError>>,
{
    let counters = &inner.computed_counters;
    let mut backoff = Backoff::new(inner.options.max_wait_step);
    let deadline = Instant::now() + inner.options.lease_ttl + inner.options.max_wait_step;
    let mut waited = false;
    loop {
        let token = match acquire(inner, redis_key).await {
            Ok(Found::Hit(value)) => {
                let served = if waited { Served::Waited } else { Served::Hit };
                return Ok(Computed::new(value, served));
            }
            Ok(Found::Acquired(token)) => token,
            Ok(Found::Held) => {
                if !waited {
                    waited = true;
                    counters.record(Event::Wait);
                }
                let now = Instant::now();
                if now >= deadline {
                    // The holder is slow or gone: load without filling.
                    counters.record(Event::WaitTimeout);
                    let value = load(counters, redis_key, loader).await?;
                    return Ok(Computed::new(value, Served::Uncached));
                }
                tokio::time::sleep(backoff.step().min(deadline - now)).await;
                continue;
            }
            Err(e) => {
                inner.redis_failed(&e);
                counters.record(Event::Fallback);
                let value = load(counters, redis_key, loader).await?;
                return Ok(Computed::new(value, Served::Fallback));
            }
        };
        let held = Held {
            inner: inner.clone(),
            lease_key: crate::template::lease_key(redis_key),
            token,
            settled: false,
        };
        // Before the loader: every change it could have missed ends at or before `at`.
        let at = match source::read_position(&inner.pool).await {
            Ok(at) => Some(at),
            Err(e) => {
                tracing::debug!(key = %redis_key, error = %e, "no WAL position: the value is loaded but not cached");
                None
            }
        };
        let value = load(counters, redis_key, loader).await?;
        let (served, lost_fill) = match at {
            Some(at) => fill(inner, held, redis_key, &value, ttl_ms, at).await,
            None => {
                held.release().await;
                (Served::Uncached, false)
            }
        };
        let mut computed = Computed::new(value, served);
        computed.lost_fill = lost_fill;
        return Ok(computed);
    }
}

/// Fills under the lease once the daemon has applied up to `at` (at most `max_lag_wait`),
/// and says how the value was served (filled, or not cached) and whether the fill lost to a
/// change.
async fn fill(
    inner: &Arc<Inner>,
    mut held: Held,
    redis_key: &str,
    value: &[u8],
    ttl_ms: u64,
    at: Lsn,
) -> (Served, bool) {
    let counters = &inner.computed_counters;
    let at = crate::checkpoint::hex(at);
    let deadline = Instant::now() + inner.options.max_lag_wait;
    let mut backoff = Backoff::lag(inner.options.max_wait_step);
    let mut conn = match inner.redis.get() {
        Ok(conn) => conn,
        Err(e) => {
            inner.redis_failed(&e);
            held.release().await;
            return (Served::Fallback, false);
        }
    };
    let mut lagged = false;
    loop {
        let written: Result<i64, _> = match lease::fill_target(inner, redis_key, &at).await {
            Ok((checkpoint, position)) => {
                lease::FILL
                    .key(redis_key)
                    .key(&held.lease_key)
                    .key(&checkpoint)
                    .arg(&held.token)
                    .arg("row")
                    .arg(value)
                    .arg(ttl_ms)
                    .arg(&position)
                    .invoke_async(&mut conn)
                    .await
            }
            Err(e) => Err(e),
        };
        match written {
            Ok(2) => {
                if !lagged {
                    lagged = true;
                    counters.record(Event::LagWait);
                }
                let now = Instant::now();
                if now >= deadline {
                    tracing::debug!(key = %redis_key, "the daemon lags: the value is not cached");
                    counters.record(Event::LagFallback);
                    held.release().await;
                    return (Served::Uncached, false);
                }
                tokio::time::sleep(backoff.step().min(deadline - now)).await;
            }
            Ok(1) => {
                held.settled = true;
                counters.record(Event::Fill);
                return (Served::Filled, false);
            }
            Ok(3) => {
                // The table whose changes invalidate the key is stopped: nothing would.
                tracing::debug!(key = %redis_key, "the daemon has stopped the key's table: the value is not cached");
                held.settled = true;
                return (Served::Uncached, false);
            }
            Ok(_) => {
                // A change deleted the key's lease (or the key was written): the value may
                // predate it, so it is not cached.
                tracing::debug!(key = %redis_key, "computed fill lost: a change invalidated the key meanwhile");
                held.settled = true;
                counters.record(Event::LostFill);
                return (Served::Uncached, true);
            }
            Err(e) => {
                inner.redis_failed(&e);
                held.release().await;
                return (Served::Fallback, false);
            }
        }
    }
}
