//! Lookups: the hit path, and what a miss does (single flight, the lease protocol, waiting,
//! fallbacks, early refresh), for one key and for many, for tables stored as JSON and as
//! hashes alike (the Redis commands that differ are in `read_cached`, `read_cached_many`
//! and the lease's acquire and fill).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use serde::de::DeserializeOwned;

use super::flight::{self, Early, Joined, Outcome};
use super::hash;
use super::lease::{self, Backoff, FillOutcome, Lease, LeaseOutcome};
use super::refresh;
use super::source::KeyTexts;
use super::stats::Event;
use super::{Inner, Key, ReaderError, TableEntry};
use crate::config::Format;

/// How one call got its value, as [`Table::lookup`](super::Table::lookup) reports it: per
/// call, so that monitoring need not diff the shared counters under concurrency. For
/// computed keys ([`Reader::lookup_with`](super::Reader::lookup_with)), read "the loader
/// ran" where this says "read from Postgres".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Served {
    /// Redis had the value (the first `GET`, or the lease script's check right after it).
    Hit,
    /// Redis had the row's absence (negative caching): no row, and no database read.
    NegativeHit,
    /// A miss: the row was read from Postgres under this process's lease and written to
    /// Redis (with no row and no negative caching, nothing is written).
    Filled,
    /// A miss that another process was filling: the call waited for that fill and took the
    /// value from Redis.
    Waited,
    /// Redis failed during the call: the row was read from Postgres and not cached.
    Fallback,
    /// The circuit breaker was open (Redis timed out or refused recently): Redis was not
    /// asked, and the row was read from Postgres and not cached.
    BreakerOpen,
    /// A miss answered from Postgres without filling: the wait for another process reached
    /// the lease TTL, changes kept revoking the lease, or the daemon lagged past
    /// `max_lag_wait`.
    Uncached,
}

impl Served {
    /// Whether the value came from Redis without a database read by this process.
    pub fn from_cache(self) -> bool {
        matches!(self, Served::Hit | Served::NegativeHit | Served::Waited)
    }
}

/// A value with how it was served, from [`Table::lookup`](super::Table::lookup).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Lookup<T> {
    /// The row, `None` when no row has the key.
    pub value: Option<T>,
    pub served: Served,
    /// The call shared the work of another caller in this process (single flight): its
    /// `GET`, or the resolution of its miss.
    pub coalesced: bool,
}

/// A miss resolved: the value, and how, as every caller that shared it sees it.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub(crate) value: Option<Bytes>,
    pub(crate) served: Served,
    /// Set on the copies that callers other than the one who did the work get.
    pub(crate) coalesced: bool,
}

impl Resolved {
    fn new(value: Option<Bytes>, served: Served) -> Resolved {
        Resolved {
            value,
            served,
            coalesced: false,
        }
    }
}

/// What [`fetch`] found for one call.
pub(super) struct Found {
    pub(super) redis_key: String,
    pub(super) value: Option<Fetched>,
    pub(super) served: Served,
    pub(super) coalesced: bool,
}

/// A value as found: straight from the `GET` reply, or shared with other callers.
#[derive(Clone)]
pub(super) enum Fetched {
    Owned(Vec<u8>),
    Shared(Bytes),
}

impl Fetched {
    pub(super) fn as_slice(&self) -> &[u8] {
        match self {
            Fetched::Owned(v) => v,
            Fetched::Shared(b) => b,
        }
    }

    pub(super) fn into_bytes(self) -> Bytes {
        match self {
            Fetched::Owned(v) => Bytes::from(v),
            Fetched::Shared(b) => b,
        }
    }
}

pub(super) async fn get<T: DeserializeOwned>(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    key: impl Key,
) -> Result<Option<T>, ReaderError> {
    lookup(inner, entry, key).await.map(|found| found.value)
}

pub(super) async fn lookup<T: DeserializeOwned>(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    key: impl Key,
) -> Result<Lookup<T>, ReaderError> {
    let found = fetch(inner, entry, key).await?;
    let value = match &found.value {
        None => None,
        Some(value) => Some(entry.decode(&found.redis_key, value.as_slice())?),
    };
    Ok(Lookup {
        value,
        served: found.served,
        coalesced: found.coalesced,
    })
}

/// What one lookup found, as every caller that shared it sees it.
#[derive(Clone)]
pub(crate) enum Looked {
    /// The `GET` found the value; the key's remaining TTL in ms (-1 for none).
    Hit(Bytes, i64),
    /// The `GET` missed and the miss was resolved (lease, wait or database read).
    Miss(Outcome),
    /// The `GET` failed; the row was read from Postgres.
    Fallback(Outcome),
    /// The breaker was open: no `GET`; the row was read from Postgres.
    Skipped(Outcome),
}

/// One lookup: the hit path is a single `GET` (with `PTTL` in the same round trip when the
/// table has a TTL and early refresh is on); everything else is on the miss path.
///
/// Lookups of one key that overlap share all of it: one caller sends the `GET` and, on a
/// miss, resolves it; the others are woken once, with the answer. A thousand callers of a
/// cold key would otherwise send a thousand `GET`s before the first reply says "miss", and
/// then each be woken twice more (for the reply, and for the fill). A caller that joins
/// while the `GET` is in flight can get a value read a round trip before it asked: the same
/// a caller whose own `GET` was queued behind a write would see.
///
/// Only this entry point is generic over the key's type: it turns the key into text, and
/// the rest ([`fetch_texts`]) is compiled once, in this crate, rather than in every
/// application for every key type it uses.
pub(super) async fn fetch(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    key: impl Key,
) -> Result<Found, ReaderError> {
    let texts = entry.key_texts(&inner.key_prefix, &key)?;
    fetch_texts(inner, entry, texts).await
}

/// Keys longer than this are not sent to Redis: 1 MB is the least `proto-max-bulk-len` Redis
/// accepts, and a longer key (with its lease key) may make it drop the connection, which
/// would open the breaker for every caller. Such a key is read from Postgres, uncached.
pub(super) const MAX_KEY_BYTES: usize = 1024 * 1024 - 64;

/// Whether a key is too long to send to Redis safely (see [`MAX_KEY_BYTES`]).
pub(super) fn too_long(redis_key: &str) -> bool {
    redis_key.len() > MAX_KEY_BYTES
}

/// [`fetch`] of a key as text.
async fn fetch_texts(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    texts: KeyTexts,
) -> Result<Found, ReaderError> {
    if too_long(&texts.redis_key) {
        entry.counters.record(Event::Miss);
        entry.counters.record(Event::Fallback);
        let resolved = read_one(inner, entry, &texts, Served::Uncached).await?;
        return Ok(Found {
            redis_key: texts.redis_key,
            value: resolved.value.map(Fetched::Shared),
            served: resolved.served,
            coalesced: false,
        });
    }
    let beta = entry.early_refresh_beta(&inner.options);
    let (looked, followed) = inner
        .lookups
        .share(&texts.redis_key, |early| {
            look_up(inner, entry, &texts, beta, early)
        })
        .await;
    let outcome = match looked {
        Looked::Hit(value, ttl_ms) => {
            entry.counters.record(Event::Hit);
            if let (Some(beta), Ok(ttl_ms @ 1..)) = (beta, u64::try_from(ttl_ms)) {
                maybe_refresh(inner, entry, &texts, Duration::from_millis(ttl_ms), beta);
            }
            return Ok(Found {
                redis_key: texts.redis_key,
                value: Some(Fetched::Shared(value)),
                served: Served::Hit,
                coalesced: followed,
            });
        }
        Looked::Miss(outcome) => {
            entry.counters.record(Event::Miss);
            outcome
        }
        Looked::Fallback(outcome) => {
            entry.counters.record(Event::Miss);
            entry.counters.record(Event::Fallback);
            outcome
        }
        Looked::Skipped(outcome) => {
            entry.counters.record(Event::Miss);
            entry.counters.record(Event::Fallback);
            entry.counters.record(Event::BreakerFallback);
            outcome
        }
    };
    if followed {
        entry.counters.record(Event::Coalesced);
    }
    let resolved = outcome?;
    Ok(Found {
        redis_key: texts.redis_key,
        value: resolved.value.map(Fetched::Shared),
        served: resolved.served,
        coalesced: followed || resolved.coalesced,
    })
}

/// The work of one shared lookup, done by the first caller.
async fn look_up(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    texts: &KeyTexts,
    beta: Option<f64>,
    early: Early<Looked>,
) -> Looked {
    if !inner.use_redis() {
        let read = shared(inner, entry, texts, |_| {
            read_one(inner, entry, texts, Served::BreakerOpen)
        });
        return Looked::Skipped(Box::pin(read).await);
    }
    match read_cached(inner, entry, &texts.redis_key, beta.is_some()).await {
        Ok((Some(value), ttl_ms)) => {
            inner.redis_worked();
            Looked::Hit(value, ttl_ms)
        }
        Ok((None, _)) => {
            inner.redis_worked();
            let early = |outcome: &Outcome| early.publish(Looked::Miss(outcome.clone()));
            // Boxed so that the hit path's future stays small.
            Looked::Miss(Box::pin(resolve(inner, entry, texts, &early)).await)
        }
        Err(e) => {
            inner.redis_failed(&e);
            // Shared with batch lookups too, so that an outage does not turn every caller
            // into a query.
            let read = shared(inner, entry, texts, |_| {
                read_one(inner, entry, texts, Served::Fallback)
            });
            Looked::Fallback(Box::pin(read).await)
        }
    }
}

/// The cached value of one key: `GET`, or for a table stored as hashes `HGETALL` (no fields:
/// a miss), with the key's `PTTL` in the same round trip when `with_ttl` (else -1).
async fn read_cached(
    inner: &Inner,
    entry: &TableEntry,
    redis_key: &str,
    with_ttl: bool,
) -> redis::RedisResult<(Option<Bytes>, i64)> {
    let mut conn = inner.redis.get()?;
    match (entry.rule.format, with_ttl) {
        (Format::Json, false) => redis::cmd("GET")
            .arg(redis_key)
            .query_async::<Option<Vec<u8>>>(&mut conn)
            .await
            .map(|value| (value.map(Bytes::from), -1)),
        (Format::Json, true) => redis::pipe()
            .cmd("GET")
            .arg(redis_key)
            .cmd("PTTL")
            .arg(redis_key)
            .query_async::<(Option<Vec<u8>>, i64)>(&mut conn)
            .await
            .map(|(value, ttl)| (value.map(Bytes::from), ttl)),
        (Format::Hash, false) => redis::cmd("HGETALL")
            .arg(redis_key)
            .query_async::<Vec<(String, String)>>(&mut conn)
            .await
            .map(|fields| (hash_value(&fields), -1)),
        (Format::Hash, true) => redis::pipe()
            .cmd("HGETALL")
            .arg(redis_key)
            .cmd("PTTL")
            .arg(redis_key)
            .query_async::<(Vec<(String, String)>, i64)>(&mut conn)
            .await
            .map(|(fields, ttl)| (hash_value(&fields), ttl)),
    }
}

/// A hash's fields as the row's value in process; `None` for no fields (no such key).
fn hash_value(fields: &[(String, String)]) -> Option<Bytes> {
    (!fields.is_empty()).then(|| hash::fields_to_bytes(fields))
}

/// The cached values of many keys in one round trip: `MGET`, or for a table stored as
/// hashes a pipeline of `HGETALL`s.
async fn read_cached_many(
    inner: &Inner,
    entry: &TableEntry,
    keys: &[KeyTexts],
) -> redis::RedisResult<Vec<Option<Fetched>>> {
    let mut conn = inner.redis.get()?;
    let values = match entry.rule.format {
        Format::Json => {
            let mut mget = redis::cmd("MGET");
            for key in keys {
                mget.arg(&key.redis_key);
            }
            let values: Vec<Option<Vec<u8>>> = mget.query_async(&mut conn).await?;
            values
                .into_iter()
                .map(|v| v.map(Fetched::Owned))
                .collect::<Vec<_>>()
        }
        Format::Hash => {
            let values: Vec<Vec<(String, String)>> = if inner.redis.is_cluster() {
                // A pipeline on a cluster must stay in one slot: the commands go at once
                // instead, each to its slot's master.
                let reads = keys.iter().map(|key| {
                    let mut conn = conn.clone();
                    async move {
                        redis::cmd("HGETALL")
                            .arg(&key.redis_key)
                            .query_async::<Vec<(String, String)>>(&mut conn)
                            .await
                    }
                });
                join_all(reads)
                    .await
                    .into_iter()
                    .collect::<redis::RedisResult<_>>()?
            } else {
                let mut pipe = redis::pipe();
                for key in keys {
                    pipe.cmd("HGETALL").arg(&key.redis_key);
                }
                pipe.query_async(&mut conn).await?
            };
            values
                .iter()
                .map(|fields| hash_value(fields).map(Fetched::Shared))
                .collect()
        }
    };
    if values.len() != keys.len() {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Parse,
            "Redis returned a wrong number of values",
        )));
    }
    Ok(values)
}

/// Resolves a miss, sharing the work with other callers in this process. `early` gets the
/// row as soon as it is read, before the fill.
async fn resolve(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    key: &KeyTexts,
    early: &(dyn Fn(&Outcome) + Sync),
) -> Outcome {
    shared(inner, entry, key, |shared_early| {
        lead(inner, entry, key, move |outcome: &Outcome| {
            shared_early.publish(outcome.clone());
            early(outcome);
        })
    })
    .await
}

/// Runs `work` for `key` once for all callers in this process that ask meanwhile.
async fn shared<F, Fut>(inner: &Inner, entry: &TableEntry, key: &KeyTexts, work: F) -> Outcome
where
    F: Fn(Early<Outcome>) -> Fut,
    Fut: std::future::Future<Output = Outcome>,
{
    let (mut outcome, followed) = inner.flights.share(&key.redis_key, work).await;
    if followed {
        entry.counters.record(Event::Coalesced);
        if let Ok(resolved) = &mut outcome {
            resolved.coalesced = true;
        }
    }
    outcome
}

/// The lease protocol for one key: take the lease and fill, or wait for the holder's fill,
/// or read Postgres past the deadline or when Redis fails.
///
/// A row read under the lease goes to `early` once its fill is settled, that is once the
/// daemon has applied up to where it was read: before that, a caller could see the row and
/// then the older value the daemon was still to write. A fill that lost (a change revoked
/// the lease) starts over: the row it read may be older than the change.
async fn lead(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    key: &KeyTexts,
    early: impl Fn(&Outcome),
) -> Outcome {
    let mut backoff = Backoff::new(inner.options.max_wait_step);
    let mut deadline = None;
    let mut waited = false;
    loop {
        if !inner.use_redis() {
            entry.counters.record(Event::Fallback);
            entry.counters.record(Event::BreakerFallback);
            return read_one(inner, entry, key, Served::BreakerOpen).await;
        }
        match lease::acquire(inner, entry, key).await {
            Ok(LeaseOutcome::Hit(value)) => {
                let served = if waited { Served::Waited } else { Served::Hit };
                return Ok(Resolved::new(Some(value), served));
            }
            Ok(LeaseOutcome::Absent) => {
                entry.counters.record(Event::NegativeHit);
                return Ok(Resolved::new(None, Served::NegativeHit));
            }
            Ok(LeaseOutcome::Acquired(lease)) => {
                let row = lease.read_row().await?.map(Bytes::from);
                let served = match settle(inner, lease, row.as_deref()).await {
                    Some(FillOutcome::Lost) => {
                        let now = Instant::now();
                        let deadline = *deadline.get_or_insert(
                            now + inner.options.lease_ttl + inner.options.max_wait_step,
                        );
                        if now < deadline {
                            continue;
                        }
                        return read_settled(inner, entry, key).await;
                    }
                    settled => served_by(settled),
                };
                let outcome = Ok(Resolved::new(row, served));
                early(&outcome);
                return outcome;
            }
            Ok(LeaseOutcome::Held) => {
                waited = true;
                let now = Instant::now();
                // A holder that died frees the key when its lease expires, at the latest one
                // lease TTL from now; one more step covers the poll that notices.
                let deadline = *deadline.get_or_insert_with(|| {
                    entry.counters.record(Event::Wait);
                    now + inner.options.lease_ttl + inner.options.max_wait_step
                });
                if now >= deadline {
                    entry.counters.record(Event::WaitTimeout);
                    return read_settled(inner, entry, key).await;
                }
                tokio::time::sleep(backoff.step().min(deadline - now)).await;
            }
            Err(e) => {
                inner.redis_failed(&e);
                entry.counters.record(Event::Fallback);
                return read_one(inner, entry, key, Served::Fallback).await;
            }
        }
    }
}

/// Fills (or records the absence) under a lease, waiting for the daemon as the fill does.
/// `None` when Redis failed (logged; the caller has its row either way).
async fn settle(inner: &Inner, lease: Lease, row: Option<&[u8]>) -> Option<FillOutcome> {
    let key = lease.key().to_string();
    let result = match row {
        Some(value) => lease.fill(value).await,
        None => lease.fill_absent().await,
    };
    match result {
        Ok(FillOutcome::Lost) => {
            tracing::debug!(%key, "fill lost: the row changed or was filled meanwhile");
            Some(FillOutcome::Lost)
        }
        Ok(outcome) => Some(outcome),
        Err(ReaderError::Redis { source, .. }) => {
            inner.redis_failed(&source);
            None
        }
        Err(e) => {
            tracing::debug!(%key, error = %e, "fill failed");
            None
        }
    }
}

/// How a row read under a lease was served, from how its fill settled (not lost).
fn served_by(settled: Option<FillOutcome>) -> Served {
    match settled {
        Some(FillOutcome::Lagging | FillOutcome::NotCached) => Served::Uncached,
        Some(_) => Served::Filled,
        None => Served::Fallback,
    }
}

/// Reads one row from Postgres without filling (Redis failed or is skipped: nothing to wait
/// for).
async fn read_one(inner: &Inner, entry: &TableEntry, key: &KeyTexts, served: Served) -> Outcome {
    let mut read = lease::read_rows(inner, entry, std::slice::from_ref(key)).await?;
    Ok(Resolved::new(
        read.rows.pop().flatten().map(Bytes::from),
        served,
    ))
}

/// Reads one row from Postgres without filling, and returns it once the daemon has applied
/// up to where it was read (or `max_lag_wait` passed), so that no reader sees the row go
/// back afterwards.
async fn read_settled(inner: &Inner, entry: &TableEntry, key: &KeyTexts) -> Outcome {
    let mut read = lease::read_rows(inner, entry, std::slice::from_ref(key)).await?;
    if let Err(e) = lease::wait_applied(inner, entry, read.at).await {
        inner.redis_failed(&e);
    }
    Ok(Resolved::new(
        read.rows.pop().flatten().map(Bytes::from),
        Served::Uncached,
    ))
}

/// Starts an early refresh of a hit key when XFetch says so.
fn maybe_refresh(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    texts: &KeyTexts,
    remaining: Duration,
    beta: f64,
) {
    let u = 1.0 - fastrand::f64();
    if !refresh::should_refresh(entry.fill_time.delta(), beta, remaining, u) {
        return;
    }
    let texts = texts.clone();
    let inner = inner.clone();
    let entry = entry.clone();
    tokio::spawn(async move {
        // Lead the key's flight so that misses in this process meanwhile share the result.
        let Joined::Leader(leader) = inner.flights.join(&texts.redis_key) else {
            return;
        };
        let lease = match lease::acquire_for_refresh(&inner, &entry, &texts).await {
            Ok(Some(lease)) => lease,
            Ok(None) => return,
            Err(e) => return inner.redis_failed(&e),
        };
        entry.counters.record(Event::EarlyRefresh);
        let outcome = match lease.read_row().await {
            Ok(Some(value)) => match settle(&inner, lease, Some(&value)).await {
                // A change revoked the lease: the row read may be older than it, and callers
                // that joined meanwhile may have waited for that change (read-your-writes).
                // They get the miss path's answer instead.
                Some(FillOutcome::Lost) => lead(&inner, &entry, &texts, |_| {}).await,
                _ => Ok(Resolved::new(Some(Bytes::from(value)), Served::Filled)),
            },
            // A row deleted since would have revoked the lease; give it back.
            Ok(None) => {
                drop(lease.release().await);
                Ok(Resolved::new(None, Served::Filled))
            }
            Err(e) => Err(e),
        };
        leader.finish(outcome);
    });
}

pub(super) async fn get_many<T: DeserializeOwned, K: Key>(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    keys: impl IntoIterator<Item = K>,
) -> Result<Vec<Option<T>>, ReaderError> {
    let keys = keys
        .into_iter()
        .map(|key| entry.key_texts(&inner.key_prefix, &key))
        .collect::<Result<Vec<_>, _>>()?;
    let values = fetch_many(inner, entry, &keys).await?;
    keys.iter()
        .zip(values)
        .map(|(key, value)| match value {
            None => Ok(None),
            Some(value) => entry.decode(&key.redis_key, value.as_slice()).map(Some),
        })
        .collect()
}

async fn fetch_many(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    keys: &[KeyTexts],
) -> Result<Vec<Option<Fetched>>, ReaderError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let n = keys.len() as u64;
    let skipped = || async move {
        entry.counters.add(Event::Miss, n);
        entry.counters.add(Event::Fallback, n);
        let read = lease::read_rows(inner, entry, keys).await?;
        Ok::<_, ReaderError>(
            read.rows
                .into_iter()
                .map(|r| r.map(Fetched::Owned))
                .collect(),
        )
    };
    if !inner.use_redis() {
        entry.counters.add(Event::BreakerFallback, n);
        return skipped().await;
    }
    if keys.iter().any(|k| too_long(&k.redis_key)) {
        return skipped().await;
    }
    let values = match read_cached_many(inner, entry, keys).await {
        Ok(values) => {
            inner.redis_worked();
            values
        }
        Err(error) => {
            inner.redis_failed(&error);
            return skipped().await;
        }
    };
    let mut out = Vec::with_capacity(keys.len());
    // Each distinct missing key once; repeats copy the first one's value.
    let mut first_index: HashMap<&str, usize> = HashMap::new();
    let mut unique = Vec::new();
    let mut repeats = Vec::new();
    for (i, value) in values.into_iter().enumerate() {
        if value.is_none() {
            match first_index.entry(keys[i].redis_key.as_str()) {
                Entry::Occupied(first) => repeats.push((i, *first.get())),
                Entry::Vacant(slot) => {
                    slot.insert(i);
                    unique.push(i);
                }
            }
        }
        out.push(value);
    }
    let misses = unique.len() + repeats.len();
    entry.counters.add(Event::Hit, (keys.len() - misses) as u64);
    entry.counters.add(Event::Miss, misses as u64);
    if unique.is_empty() {
        return Ok(out);
    }
    let missing: Vec<&KeyTexts> = unique.iter().map(|&i| &keys[i]).collect();
    let outcomes = resolve_many(inner, entry, &missing).await;
    for (&i, outcome) in unique.iter().zip(outcomes) {
        out[i] = outcome?.value.map(Fetched::Shared);
    }
    for (i, first) in repeats {
        out[i] = out[first].clone();
    }
    Ok(out)
}

/// [`resolve`] for distinct keys at once: the lease attempts go out together (the
/// multiplexed connection pipelines them), the rows whose leases we won are read with one
/// query, and only keys that another process is filling are waited for one by one.
async fn resolve_many(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    keys: &[&KeyTexts],
) -> Vec<Outcome> {
    let mut outcomes: Vec<Option<Outcome>> = vec![None; keys.len()];
    let mut leaders = Vec::new();
    let mut followers = Vec::new();
    for (j, key) in keys.iter().enumerate() {
        match inner.flights.join(&key.redis_key) {
            Joined::Leader(leader) => leaders.push((j, leader)),
            Joined::Follower(slot) => followers.push((j, slot)),
        }
    }
    let attempts = join_all(
        leaders
            .iter()
            .map(|(j, _)| lease::acquire(inner, entry, keys[*j])),
    )
    .await;
    let mut leases = Vec::new();
    let mut unfilled = Vec::new();
    let mut waiting = Vec::new();
    for ((j, _), attempt) in leaders.iter().zip(attempts) {
        match attempt {
            Ok(LeaseOutcome::Hit(value)) => {
                outcomes[*j] = Some(Ok(Resolved::new(Some(value), Served::Hit)));
            }
            Ok(LeaseOutcome::Absent) => {
                entry.counters.record(Event::NegativeHit);
                outcomes[*j] = Some(Ok(Resolved::new(None, Served::NegativeHit)));
            }
            Ok(LeaseOutcome::Acquired(lease)) => leases.push((*j, lease)),
            Ok(LeaseOutcome::Held) => waiting.push(*j),
            Err(e) => {
                inner.redis_failed(&e);
                entry.counters.record(Event::Fallback);
                unfilled.push(*j);
            }
        }
    }
    if !leases.is_empty() {
        let texts: Vec<KeyTexts> = leases.iter().map(|(_, l)| l.key_texts().clone()).collect();
        match lease::read_rows(inner, entry, &texts).await {
            Ok(read) => {
                let fills = leases
                    .into_iter()
                    .zip(read.rows)
                    .map(|((j, lease), row)| async move {
                        lease.set_read_at(read.at);
                        let outcome = settle(inner, lease, row.as_deref()).await;
                        (j, row, outcome)
                    });
                for (j, row, outcome) in join_all(fills).await {
                    if outcome == Some(FillOutcome::Lost) {
                        // The row read may be older than the change that revoked the lease.
                        waiting.push(j);
                    } else {
                        let served = served_by(outcome);
                        outcomes[j] = Some(Ok(Resolved::new(row.map(Bytes::from), served)));
                    }
                }
            }
            // The leases go back as they drop.
            Err(e) => {
                for (j, _) in leases {
                    outcomes[j] = Some(Err(e.clone()));
                }
            }
        }
    }
    if !unfilled.is_empty() {
        let texts: Vec<KeyTexts> = unfilled.iter().map(|&j| keys[j].clone()).collect();
        match lease::read_rows(inner, entry, &texts).await {
            Ok(read) => {
                for (&j, row) in unfilled.iter().zip(read.rows) {
                    outcomes[j] = Some(Ok(Resolved::new(row.map(Bytes::from), Served::Fallback)));
                }
            }
            Err(e) => {
                for &j in &unfilled {
                    outcomes[j] = Some(Err(e.clone()));
                }
            }
        }
    }
    let waited = join_all(waiting.iter().map(|&j| lead(inner, entry, keys[j], |_| {}))).await;
    for (&j, outcome) in waiting.iter().zip(waited) {
        outcomes[j] = Some(outcome);
    }
    for (j, leader) in leaders {
        leader.finish(
            outcomes[j]
                .clone()
                .unwrap_or(Ok(Resolved::new(None, Served::Uncached))),
        );
    }
    for (j, slot) in followers {
        entry.counters.record(Event::Coalesced);
        outcomes[j] = Some(match flight::follow(slot).await {
            Some(outcome) => outcome,
            None => resolve(inner, entry, keys[j], &|_| {}).await,
        });
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Ok(Resolved::new(None, Served::Uncached))))
        .collect()
}
