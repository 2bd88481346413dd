//! Leases: the right to fill one key, and the proof that the fill is not stale.
//!
//! The protocol (PROTOCOL.md, "Leases"): a miss takes the key's lease with a random token
//! (`acquire.lua`, which also re-checks the key, so the miss costs one round trip), reads the
//! row from Postgres, and fills with `fill.lua`, which writes only while the lease still holds
//! the token and the key is still absent. The daemon deletes the lease with every change it
//! applies to the row, so a fill whose read may predate a change finds the lease gone and
//! loses. A lease that is never filled expires after its TTL, so a holder that dies frees the
//! key by itself.
//!
//! Two more rules make reads monotonic (no reader sees a row go back):
//! - The daemon writes a transaction only once other sessions can see it, so a lease taken
//!   after a change was applied reads that change or a newer one.
//! - A fill waits until the daemon has applied the stream up to the WAL position the row was
//!   read at (`applied` in the checkpoint). A fill that ran ahead would be overwritten by the
//!   older changes the daemon had still to apply.
//!
//! Negative caching stores a marker in the lease key rather than in the row key: the daemon
//! already deletes the lease key on every change, so an insert ends the cached absence at
//! once, and the row key never holds anything but a row.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::Script;

use super::hash;
use super::source::{KeyTexts, Read};
use super::stats::Event;
use super::{Inner, ReaderError, TableEntry};
use crate::config::Format;
use crate::Lsn;

pub(crate) static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("acquire.lua")));
pub(crate) static FILL: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("fill.lua")));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("release.lua")));

/// Loads the scripts into Redis ahead of their first use (saves a `NOSCRIPT` round trip).
pub(super) async fn load_scripts(conn: &mut super::link::Conn) {
    for script in [&*ACQUIRE, &*FILL, &*RELEASE] {
        let _ = script.prepare_invoke().load_async(conn).await;
    }
}

/// What a lease key holds while a row is known to be absent. Tokens are hex, so they never
/// look like this.
pub(crate) const ABSENT: &str = "pgcache:absent";

/// What [`Table::lease`](super::Table::lease) found.
#[derive(Debug)]
pub enum LeaseOutcome {
    /// The row is cached: its value.
    Hit(Bytes),
    /// The caller holds the lease and should read the row and fill.
    Acquired(Lease),
    /// Another caller holds the lease: wait for its fill.
    Held,
    /// The row is known to be absent (negative caching).
    Absent,
}

/// How a fill ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FillOutcome {
    /// The value (or the absence) is now in Redis.
    Filled,
    /// The fill was refused: a change revoked the lease (the row read may be stale), the
    /// lease expired, or the key was written meanwhile. Redis keeps what it has.
    Lost,
    /// Nothing was written and the lease was given back ([`Lease::fill_absent`] without
    /// negative caching).
    Released,
    /// The daemon has stopped the key's table (its rule no longer fits the table, or the
    /// table is not set up for pgcache): nothing was written, and the lease was given back.
    /// The row read is current; no change would reach a cached copy.
    NotCached,
    /// The daemon did not apply the stream up to where the row was read within
    /// `max_lag_wait`: nothing was written (a fill then could go back in time), and the
    /// lease was given back.
    Lagging,
}

/// Whether a lease fills an absent key or replaces a cached value (early refresh).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    Fill,
    Refresh,
}

/// The right to fill one key, until its TTL runs out or a change revokes it.
///
/// Dropping a lease without filling gives it back (in a background task), so other callers
/// need not wait for its TTL.
pub struct Lease {
    inner: Arc<Inner>,
    entry: Arc<TableEntry>,
    key: KeyTexts,
    lease_key: String,
    token: String,
    purpose: Purpose,
    /// When the lease was taken: fill time is measured from here, for early refresh.
    taken: Instant,
    /// The WAL position of the last [`Lease::read_row`] (0: none), which a fill waits for.
    read_at: AtomicU64,
    /// Filled, lost or released: nothing left for `Drop` to do.
    settled: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key.redis_key)
            .field("lease_key", &self.lease_key)
            .field("purpose", &self.purpose)
            .finish_non_exhaustive()
    }
}

pub(crate) fn new_token() -> String {
    format!("{:032x}", fastrand::u128(..))
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The miss path's round trip: the value if the key is cached now, else the lease if free.
pub(crate) async fn acquire(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    key: &KeyTexts,
) -> Result<LeaseOutcome, redis::RedisError> {
    let lease_key = crate::template::lease_key(&key.redis_key);
    let token = new_token();
    let mut conn = inner.redis.get()?;
    let hash = entry.rule.format == Format::Hash;
    let mut acquire = ACQUIRE.key(&key.redis_key);
    acquire
        .key(&lease_key)
        .arg(&token)
        .arg(millis(inner.options.lease_ttl))
        .arg(ABSENT);
    if hash {
        acquire.arg("hash");
    }
    let reply: redis::Value = acquire.invoke_async(&mut conn).await?;
    let (code, value) = match reply {
        redis::Value::Array(items) => {
            let mut items = items.into_iter();
            (items.next(), items.next())
        }
        _ => (None, None),
    };
    Ok(match (code, value) {
        (Some(redis::Value::Int(1)), Some(redis::Value::BulkString(v))) if !hash => {
            LeaseOutcome::Hit(Bytes::from(v))
        }
        (Some(redis::Value::Int(1)), Some(redis::Value::Array(flat))) if hash => {
            LeaseOutcome::Hit(hash::fields_to_bytes(&hash::pairs(flat)))
        }
        (Some(redis::Value::Int(2)), _) => LeaseOutcome::Acquired(Lease {
            inner: inner.clone(),
            entry: entry.clone(),
            key: key.clone(),
            lease_key,
            token,
            purpose: Purpose::Fill,
            taken: Instant::now(),
            read_at: AtomicU64::new(0),
            settled: false,
        }),
        (Some(redis::Value::Int(3)), _) => LeaseOutcome::Held,
        (Some(redis::Value::Int(4)), _) => LeaseOutcome::Absent,
        _ => {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "unexpected reply from the pgcache acquire script",
            )))
        }
    })
}

/// Takes the lease of a cached key for an early refresh; `None` when someone holds it.
pub(crate) async fn acquire_for_refresh(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    key: &KeyTexts,
) -> Result<Option<Lease>, redis::RedisError> {
    let lease_key = crate::template::lease_key(&key.redis_key);
    let token = new_token();
    let mut conn = inner.redis.get()?;
    let set: Option<String> = redis::cmd("SET")
        .arg(&lease_key)
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(millis(inner.options.lease_ttl))
        .query_async(&mut conn)
        .await?;
    Ok(set.map(|_| Lease {
        inner: inner.clone(),
        entry: entry.clone(),
        key: key.clone(),
        lease_key,
        token,
        purpose: Purpose::Refresh,
        taken: Instant::now(),
        read_at: AtomicU64::new(0),
        settled: false,
    }))
}

impl Lease {
    /// The row key this lease is for.
    pub fn key(&self) -> &str {
        &self.key.redis_key
    }

    /// The lease's own Redis key.
    pub fn lease_key(&self) -> &str {
        &self.lease_key
    }

    pub(crate) fn key_texts(&self) -> &KeyTexts {
        &self.key
    }

    /// Reads the row from Postgres and encodes it as the daemon would: `None` when no row
    /// has the key.
    ///
    /// # Errors
    /// As [`Table::get_raw`](super::Table::get_raw) for Postgres.
    pub async fn read_row(&self) -> Result<Option<Vec<u8>>, ReaderError> {
        let mut read = read_rows(&self.inner, &self.entry, std::slice::from_ref(&self.key)).await?;
        self.read_at.store(read.at.0, Ordering::Relaxed);
        Ok(read.rows.pop().flatten())
    }

    /// The WAL position the row was read at (see [`Lease::read_row`]).
    pub(crate) fn set_read_at(&self, at: Lsn) {
        self.read_at.store(at.0, Ordering::Relaxed);
    }

    /// Writes `value` to the key if the lease is still ours (and, unless this is an early
    /// refresh, the key still absent), with the table's TTL, once the daemon has applied
    /// the stream up to where the row was read (waiting for it at most `max_lag_wait`).
    /// For a table stored as hashes, `value` is the row as a JSON object of the fields'
    /// text (what [`read_row`](Self::read_row) returns), written as the hash's fields.
    ///
    /// # Errors
    /// [`ReaderError::Redis`] when the script cannot run; the lease then expires by itself.
    /// [`ReaderError::Decode`] when a hash table's `value` is not a JSON object.
    pub async fn fill(mut self, value: &[u8]) -> Result<FillOutcome, ReaderError> {
        let ttl = self.entry.rule.ttl.map_or(0, millis);
        let outcome = match self.entry.rule.format {
            Format::Json => {
                let kind = match self.purpose {
                    Purpose::Fill => "row",
                    Purpose::Refresh => "refresh",
                };
                self.run_fill(kind, value, ttl, &[]).await
            }
            Format::Hash => {
                let kind = match self.purpose {
                    Purpose::Fill => "hash",
                    Purpose::Refresh => "hash-refresh",
                };
                let fields = hash::parse_fields(value).map_err(|e| ReaderError::Decode {
                    table: self.entry.name.clone(),
                    key: self.key.redis_key.clone(),
                    source: Arc::new(e),
                })?;
                self.run_fill(kind, b"", ttl, &fields).await
            }
        };
        self.settled = true;
        if matches!(outcome, Ok(FillOutcome::Filled)) {
            self.entry.fill_time.record(self.taken.elapsed());
        }
        outcome
    }

    /// Records that no row has the key, for the negative-cache TTL, if the lease is still
    /// ours; without negative caching, gives the lease back. Either way only once the daemon
    /// has applied the stream up to where the row was read, as [`Lease::fill`].
    ///
    /// # Errors
    /// [`ReaderError::Redis`] when the script cannot run; the lease then expires by itself.
    pub async fn fill_absent(mut self) -> Result<FillOutcome, ReaderError> {
        let outcome = match (self.inner.options.negative_ttl, self.purpose) {
            (Some(ttl), Purpose::Fill) => {
                self.run_fill("absent", ABSENT.as_bytes(), millis(ttl), &[])
                    .await
            }
            _ => {
                let at = Lsn(self.read_at.load(Ordering::Relaxed));
                let reached = wait_applied(&self.inner, &self.entry, at).await;
                let released = self.release_now().await;
                match reached {
                    Ok(true) => released.map(|()| FillOutcome::Released),
                    Ok(false) => released.map(|()| FillOutcome::Lagging),
                    Err(source) => Err(ReaderError::Redis {
                        key: self.key.redis_key.clone(),
                        source,
                    }),
                }
            }
        };
        self.settled = true;
        outcome
    }

    /// Gives the lease back without filling, if it is still ours.
    ///
    /// # Errors
    /// [`ReaderError::Redis`] when the script cannot run; the lease then expires by itself.
    pub async fn release(mut self) -> Result<(), ReaderError> {
        let result = self.release_now().await;
        self.settled = true;
        result
    }

    /// Runs `fill.lua` until it settles; `fields` are a hash's (kinds `hash`,
    /// `hash-refresh`).
    async fn run_fill(
        &self,
        kind: &str,
        value: &[u8],
        ttl_ms: u64,
        fields: &[(String, String)],
    ) -> Result<FillOutcome, ReaderError> {
        let mut conn = self
            .inner
            .redis
            .get()
            .map_err(|source| ReaderError::Redis {
                key: self.key.redis_key.clone(),
                source,
            })?;
        let at = crate::checkpoint::hex(Lsn(self.read_at.load(Ordering::Relaxed)));
        let deadline = Instant::now() + self.inner.options.max_lag_wait;
        let mut backoff = Backoff::lag(self.inner.options.max_wait_step);
        let mut waited = false;
        loop {
            let (checkpoint, position) = fill_target(&self.inner, &self.key.redis_key, &at)
                .await
                .map_err(|source| ReaderError::Redis {
                key: self.key.redis_key.clone(),
                source,
            })?;
            let mut fill = FILL.key(&self.key.redis_key);
            fill.key(&self.lease_key)
                .key(&checkpoint)
                .arg(&self.token)
                .arg(kind)
                .arg(value)
                .arg(ttl_ms)
                .arg(&position);
            for (name, text) in fields {
                fill.arg(name).arg(text);
            }
            let written: i64 =
                fill.invoke_async(&mut conn)
                    .await
                    .map_err(|source| ReaderError::Redis {
                        key: self.key.redis_key.clone(),
                        source,
                    })?;
            match written {
                1 => {
                    self.entry.counters.record(Event::Fill);
                    return Ok(FillOutcome::Filled);
                }
                2 => {
                    if !waited {
                        waited = true;
                        self.entry.counters.record(Event::LagWait);
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        self.entry.counters.record(Event::LagFallback);
                        self.release_now().await?;
                        return Ok(FillOutcome::Lagging);
                    }
                    tokio::time::sleep(backoff.step().min(deadline - now)).await;
                }
                3 => return Ok(FillOutcome::NotCached),
                _ => {
                    self.entry.counters.record(Event::LostFill);
                    return Ok(FillOutcome::Lost);
                }
            }
        }
    }

    async fn release_now(&self) -> Result<(), ReaderError> {
        release(&self.inner, &self.lease_key, &self.token)
            .await
            .map_err(|source| ReaderError::Redis {
                key: self.lease_key.clone(),
                source,
            })
    }
}

pub(crate) async fn release(
    inner: &Inner,
    lease_key: &str,
    token: &str,
) -> Result<(), redis::RedisError> {
    let mut conn = inner.redis.get()?;
    RELEASE
        .key(lease_key)
        .arg(token)
        .invoke_async::<i64>(&mut conn)
        .await
        .map(drop)
}

/// Gives a lease back from a `Drop` (cancelled or failed before filling), so that waiters
/// need not sit out its TTL. Without a runtime (or if this fails) it simply expires.
pub(crate) fn release_in_background(inner: &Arc<Inner>, lease_key: String, token: String) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let inner = inner.clone();
        runtime.spawn(async move {
            if let Err(e) = release(&inner, &lease_key, &token).await {
                tracing::debug!(lease = %lease_key, error = %e, "could not give a lease back; it will expire");
            }
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Cancelled or failed before filling: give the lease back so that waiters need not
        // sit out its TTL. Without a runtime (or if this fails) it simply expires.
        release_in_background(
            &self.inner,
            std::mem::take(&mut self.lease_key),
            std::mem::take(&mut self.token),
        );
    }
}

/// Reads rows from Postgres for `keys`, counting the read.
pub(crate) async fn read_rows(
    inner: &Inner,
    entry: &TableEntry,
    keys: &[KeyTexts],
) -> Result<Read, ReaderError> {
    inner
        .settings_checked
        .get_or_try_init(|| check_settings(&inner.pool, &entry.name))
        .await?;
    entry.counters.record(Event::DbRead);
    entry.source.read(&inner.pool, keys).await
}

/// Checks that a pool the application gave prints values as the daemon does.
async fn check_settings(pool: &deadpool_postgres::Pool, table: &str) -> Result<(), ReaderError> {
    let client = pool
        .get()
        .await
        .map_err(|e| ReaderError::PostgresUnavailable {
            table: table.to_string(),
            source: Arc::new(e),
        })?;
    let pg_error = |e| ReaderError::Postgres {
        table: table.to_string(),
        source: Arc::new(e),
    };
    for &(name, wanted) in crate::pgconn::SESSION_SETTINGS {
        let row = client
            .query_one("SELECT current_setting($1)", &[&name])
            .await
            .map_err(pg_error)?;
        let actual: String = row.try_get(0).map_err(pg_error)?;
        // DateStyle is "output style, field order"; with ISO output the order is unused.
        let compared = match name {
            "DateStyle" => actual.split(',').next().unwrap_or_default().trim(),
            _ => actual.as_str(),
        };
        if !compared.eq_ignore_ascii_case(wanted) {
            return Err(ReaderError::Options(format!(
                "the Postgres pool given to the reader has {name} = {actual:?}, where the \
                 daemon's values need {wanted:?}: build its config with \
                 options(&pgcache::pgconn::session_options())"
            )));
        }
    }
    Ok(())
}

/// Waits until the daemon has applied the stream up to `at` (its checkpoint's `applied`),
/// polling with backoff for at most `max_lag_wait`: `Ok(false)` past it.
pub(crate) async fn wait_applied(
    inner: &Inner,
    entry: &TableEntry,
    at: Lsn,
) -> Result<bool, redis::RedisError> {
    let deadline = Instant::now() + inner.options.max_lag_wait;
    let mut backoff = Backoff::lag(inner.options.max_wait_step);
    let mut waited = false;
    loop {
        if applied(inner).await?.is_some_and(|applied| applied >= at) {
            return Ok(true);
        }
        if !waited {
            waited = true;
            entry.counters.record(Event::LagWait);
        }
        let now = Instant::now();
        if now >= deadline {
            entry.counters.record(Event::LagFallback);
            return Ok(false);
        }
        tokio::time::sleep(backoff.step().min(deadline - now)).await;
    }
}

/// The checkpoint a fill of `key` checks (KEYS[3] of `fill.lua`), and the position it
/// passes: on one server the daemon's checkpoint and `at`. On a cluster the checkpoint of
/// the key's hash slot, which a script may touch beside the key; since a slot no change
/// reached for a while has an old `applied`, the frontier (the daemon's own checkpoint,
/// which every slot has reached) is read first, and once it is at `at` the position is
/// passed empty: the fill need not wait.
pub(crate) async fn fill_target(
    inner: &Inner,
    key: &str,
    at: &str,
) -> Result<(String, String), redis::RedisError> {
    if !inner.redis.is_cluster() {
        return Ok((inner.checkpoint_key.clone(), at.to_string()));
    }
    let checkpoint = crate::checkpoint::slot_checkpoint_key(
        &inner.key_prefix,
        &inner.slot,
        crate::cluster::key_slot(key.as_bytes()),
    );
    let frontier = applied(inner).await?.map(crate::checkpoint::hex);
    let position = if frontier.is_some_and(|f| f.as_str() >= at) {
        String::new()
    } else {
        at.to_string()
    };
    Ok((checkpoint, position))
}

/// How far the daemon has applied the stream, from its checkpoint.
pub(crate) async fn applied(inner: &Inner) -> Result<Option<Lsn>, redis::RedisError> {
    let mut conn = inner.redis.get()?;
    let hex: Option<String> = redis::cmd("HGET")
        .arg(&inner.checkpoint_key)
        .arg(crate::checkpoint::FIELD_APPLIED)
        .query_async(&mut conn)
        .await?;
    Ok(hex.and_then(|h| u64::from_str_radix(&h, 16).ok()).map(Lsn))
}

/// Polling intervals while another process fills: short at first (most fills take a few
/// milliseconds), doubling up to a cap, with jitter so that waiters in many processes do not
/// poll in step.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(2);

    pub(crate) fn new(max: Duration) -> Backoff {
        Backoff {
            next: Self::FIRST.min(max),
            max,
        }
    }

    /// Polling the daemon's progress: it usually is a fraction of a millisecond behind.
    pub(crate) fn lag(max: Duration) -> Backoff {
        Backoff {
            next: Duration::from_micros(250).min(max),
            max,
        }
    }

    /// Steps from `first`, doubling up to `max`.
    pub(crate) fn with_steps(first: Duration, max: Duration) -> Backoff {
        Backoff {
            next: first.min(max),
            max,
        }
    }

    /// The next pause: between half and all of the current step.
    pub(crate) fn step(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = step / 2;
        half + step.saturating_sub(half).mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let max = Duration::from_millis(50);
        let mut b = Backoff::new(max);
        let first = b.step();
        assert!(first >= Duration::from_millis(1) && first <= Duration::from_millis(2));
        let steps: Vec<Duration> = (0..20).map(|_| b.step()).collect();
        assert!(steps.iter().all(|&s| s <= max));
        assert!(steps[10..].iter().all(|&s| s >= max / 2));
    }

    #[test]
    fn tokens_are_hex_and_never_the_absence_marker() {
        let t = new_token();
        assert_eq!(t.len(), 32);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(t, ABSENT);
        assert_ne!(new_token(), t);
    }

    #[test]
    fn scripts_are_distinct() {
        assert_ne!(ACQUIRE.get_hash(), FILL.get_hash());
        assert_ne!(FILL.get_hash(), RELEASE.get_hash());
    }
}
