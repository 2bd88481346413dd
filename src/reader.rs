//! The read helper: cache-aside reads that cooperate with the daemon.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! # #[derive(serde::Deserialize)] struct User { id: i64, email: String }
//! let reader = pgcache::Reader::builder("postgres://app@db/shop", "redis://cache:6379")
//!     .table("public.users", "user:{id}")
//!     .build()?;
//! let user: Option<User> = reader.get("public.users", 42).await?;
//! # Ok(()) }
//! ```
//!
//! With the `config-file` feature, `Reader::from_config(&Config::load(path)?)` takes the
//! tables from the daemon's config file instead.
//!
//! The reader runs on Tokio: build it and call it inside a Tokio runtime, multi-thread or
//! current-thread, with I/O and time enabled (see [`ReaderBuilder::build`]).
//!
//! A lookup reads Redis (one `GET`). On a miss it follows the lease protocol ([`lease`]):
//! take the key's lease, read the row from Postgres encoded exactly as the daemon encodes
//! it, and fill only if no change revoked the lease meanwhile, so a fill never puts an older
//! row over a newer one. Callers that find the lease taken wait for the fill (short polling
//! with backoff, bounded by the lease TTL), and callers in one process share one wait and
//! one read per key. When Redis fails, lookups read Postgres, and after a timeout or a
//! connection error a circuit breaker skips Redis for a cool-down; when Postgres fails, hits
//! are still served. [`Table::lookup`] says per call how the value was served ([`Served`]).
//!
//! # Layout
//! - `builder`: [`ReaderOptions`] and [`ReaderBuilder`]: the pool and the Redis connection.
//! - `breaker`: the circuit breaker that skips a Redis that times out.
//! - `lookup`: the hit path, and what a miss does, for one key and for many.
//! - [`key`]: key values as callers pass them (`42`, `("acme", 42)`).
//! - `source`: the Postgres side: a table's columns and the read that matches the stream.
//! - [`lease`]: the lease protocol and its Lua scripts; the lower-level [`Table::lease`] API.
//! - `flight`: single flight: overlapping lookups of a key share one `GET` and one
//!   resolution per process.
//! - `refresh`: probabilistic early refresh (XFetch) of keys with a TTL.
//! - [`stats`]: counters, in process and through the `metrics` facade.
//! - [`error`]: what can go wrong, [`ReaderError`].

mod breaker;
mod builder;
mod computed;
pub mod error;
mod flight;
mod hash;
pub mod key;
pub mod lease;
pub(crate) mod link;
mod lookup;
mod refresh;
pub(crate) mod source;
pub mod stats;
#[cfg(test)]
mod tests;
mod written;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use deadpool_postgres::Pool;
use futures_util::future::join_all;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use self::builder::{ReaderBuilder, ReaderOptions};
pub use self::computed::LoaderError;
pub use self::error::ReaderError;
pub use self::key::{Key, KeyText, KeyValue};
pub use self::lease::{FillOutcome, Lease, LeaseOutcome};
pub use self::lookup::{Lookup, Served};
pub use self::stats::Stats;

use self::breaker::{Breaker, Change, Permit};
use self::flight::Flights;
use self::lookup::{fetch, get, get_many, lookup, Fetched, Looked};
use self::refresh::FillTimer;
use self::source::{KeyTexts, RowSource};
use self::stats::Counters;
use crate::config::{Config, Format, TableRule};
use crate::Lsn;

/// Reads rows through Redis with Postgres behind it. Cheap to clone; clones share the
/// connections, the single-flight map and the counters.
#[derive(Clone)]
pub struct Reader {
    inner: Arc<Inner>,
}

/// One configured table of a [`Reader`], looked up once. Cheap to clone.
#[derive(Clone)]
pub struct Table {
    inner: Arc<Inner>,
    entry: Arc<TableEntry>,
}

pub(crate) struct Inner {
    redis: Arc<link::RedisLink>,
    pool: Pool,
    key_prefix: String,
    /// The daemon's checkpoint: how far it has applied the stream.
    checkpoint_key: String,
    /// The daemon's replication slot (on a cluster, it names each hash slot's checkpoint).
    slot: String,
    options: ReaderOptions,
    tables: Vec<Arc<TableEntry>>,
    /// Qualified (`public.users`) and bare (`users`) names to indexes into `tables`; a bare
    /// name two schemas share maps to both, and using it is an error.
    names: HashMap<String, Vec<usize>>,
    /// Misses being resolved (lease, wait, database read), shared by single and batch
    /// lookups and early refreshes.
    flights: Flights,
    /// Whole lookups in progress: overlapping lookups of a key share one `GET` and, on a
    /// miss, its resolution.
    lookups: Flights<Looked>,
    /// Whether the last Redis command worked, so that an outage is logged once, not per call.
    redis_ok: AtomicBool,
    /// The daemon's applied position, polled once for all read-your-writes waiters.
    applied_watch: written::AppliedWatch,
    /// Set once the pool's session settings are known to be the daemon's: at once for the
    /// reader's own pool, on the first read for one the application gave.
    settings_checked: tokio::sync::OnceCell<()>,
    /// Skips Redis for a cool-down after it timed out or refused.
    breaker: Breaker,
    /// Computed keys (`get_with`) being resolved: one loader run per key per process.
    computed_flights: Flights<computed::Outcome>,
    /// What computed-key calls did ([`Reader::computed_stats`]).
    computed_counters: Counters,
}

pub(crate) struct TableEntry {
    rule: Arc<TableRule>,
    name: String,
    source: RowSource,
    counters: Counters,
    fill_time: FillTimer,
}

impl Reader {
    /// A reader for the tables of the daemon's config file, with default options. Must be
    /// called inside a Tokio runtime (see [`ReaderBuilder::build`]).
    ///
    /// # Errors
    /// As [`ReaderBuilder::build`].
    pub fn from_config(config: &Config) -> Result<Reader, ReaderError> {
        Self::from_config_with(config, ReaderOptions::default())
    }

    /// A reader for the tables of the daemon's config file. It connects to Postgres with
    /// `[reader] url` when the file has one (a role that may only read the cached tables),
    /// else with `postgres.url`.
    ///
    /// # Errors
    /// As [`ReaderBuilder::build`].
    pub fn from_config_with(
        config: &Config,
        options: ReaderOptions,
    ) -> Result<Reader, ReaderError> {
        let postgres_url = config.reader.url.as_ref().unwrap_or(&config.postgres.url);
        let mut builder = Self::builder(postgres_url.expose(), config.redis.url.expose())
            .key_prefix(config.redis.key_prefix.clone())
            .slot(config.postgres.slot.clone())
            .options(options);
        if let Some(roots) = &config.redis.tls_ca_file {
            builder = builder.redis_tls_roots(roots.clone());
        }
        match &config.redis.topology {
            crate::config::RedisTopology::Sentinel(sentinel) => {
                builder = builder.sentinel(sentinel.clone());
            }
            crate::config::RedisTopology::Cluster { seeds } => {
                builder =
                    builder.redis_cluster(seeds.iter().map(|s| s.expose().to_string()).collect());
            }
            crate::config::RedisTopology::Single => {}
        }
        for rule in &config.tables {
            builder = builder.rule(rule.clone());
        }
        builder.build()
    }

    /// A reader configured in code: `postgres://...` (or libpq key-value) and `redis://...`.
    pub fn builder(postgres_url: &str, redis_url: &str) -> ReaderBuilder {
        ReaderBuilder::new(postgres_url, redis_url)
    }

    /// The table called `name` (`public.users`, or `users` when no other schema has one).
    ///
    /// # Errors
    /// [`ReaderError::UnknownTable`] or [`ReaderError::AmbiguousTable`].
    pub fn table(&self, name: &str) -> Result<Table, ReaderError> {
        Ok(Table {
            inner: self.inner.clone(),
            entry: self.inner.entry(name)?.clone(),
        })
    }

    /// The row with `key` in `table`, deserialized (`serde_json::Value` for plain JSON);
    /// `None` when no row has the key.
    ///
    /// # Errors
    /// See [`ReaderError`]. Redis failures are not errors: the row is read from Postgres.
    pub async fn get<T: DeserializeOwned>(
        &self,
        table: &str,
        key: impl Key,
    ) -> Result<Option<T>, ReaderError> {
        let entry = self.inner.entry(table)?;
        get(&self.inner, entry, key).await
    }

    /// [`get`](Self::get) as a `serde_json::Value`.
    ///
    /// # Errors
    /// As [`get`](Self::get).
    pub async fn get_json(
        &self,
        table: &str,
        key: impl Key,
    ) -> Result<Option<serde_json::Value>, ReaderError> {
        self.get(table, key).await
    }

    /// The row's JSON bytes, exactly as cached.
    ///
    /// # Errors
    /// As [`get`](Self::get).
    pub async fn get_raw(&self, table: &str, key: impl Key) -> Result<Option<Bytes>, ReaderError> {
        let entry = self.inner.entry(table)?;
        let found = fetch(&self.inner, entry, key).await?;
        Ok(found.value.map(Fetched::into_bytes))
    }

    /// [`get`](Self::get) that also says how the value was served (a hit, a fill, a wait
    /// for another process, a fallback to Postgres...), for per-call monitoring. The
    /// counters of [`stats`](Self::stats) count the same events, summed over all calls.
    ///
    /// # Errors
    /// As [`get`](Self::get).
    pub async fn lookup<T: DeserializeOwned>(
        &self,
        table: &str,
        key: impl Key,
    ) -> Result<Lookup<T>, ReaderError> {
        let entry = self.inner.entry(table)?;
        lookup(&self.inner, entry, key).await
    }

    /// The rows with these keys, in order: one `MGET`, then the misses together (one lease
    /// round trip, one Postgres read, the fills).
    ///
    /// # Errors
    /// As [`get`](Self::get); an error for any key fails the whole call.
    pub async fn get_many<T: DeserializeOwned, K: Key>(
        &self,
        table: &str,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<Option<T>>, ReaderError> {
        let entry = self.inner.entry(table)?;
        get_many(&self.inner, entry, keys).await
    }

    /// The value cached under `key` (the Redis key without `redis.key_prefix`), or, on a
    /// miss, what `loader` returns, cached as JSON under the same lease protocol as table
    /// rows. The key is meant to be named by a table's `[[tables.invalidate]]` rule
    /// (`user:{user_id}:orders`; [`Reader::key`] renders it with the daemon's escaping), so
    /// that every change to that table deletes it and revokes its lease: a load that began
    /// before a change is returned to its caller but not cached (the next call loads
    /// again). The fill also waits until the daemon has applied the WAL up to where it was
    /// before the loader ran (at most `max_lag_wait`). Callers in this process that miss
    /// the key together share one load; callers elsewhere wait for the fill. When Redis is
    /// unreachable the loader runs and nothing is cached. No TTL: see
    /// [`get_with_ttl`](Self::get_with_ttl).
    ///
    /// ```no_run
    /// # async fn demo(reader: pgcache::Reader, db: tokio_postgres::Client) -> Result<(), pgcache::reader::ReaderError> {
    /// let user_id = 42;
    /// let key = reader.key("user:{user_id}:orders", user_id)?;
    /// let orders: Vec<i64> = reader
    ///     .get_with(&key, || async {
    ///         let rows = db.query("SELECT id FROM orders WHERE user_id = $1 ORDER BY id", &[&user_id]).await?;
    ///         Ok::<_, tokio_postgres::Error>(rows.iter().map(|r| r.get(0)).collect())
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ReaderError::Loader`] when the loader fails, [`ReaderError::Decode`] when a cached
    /// value does not fit `T`.
    pub async fn get_with<T, F, Fut, E>(&self, key: &str, loader: F) -> Result<T, ReaderError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
        E: Into<LoaderError>,
    {
        self.get_with_ttl(key, None, loader).await
    }

    /// [`get_with`](Self::get_with), the value expiring `ttl` after its fill.
    ///
    /// # Errors
    /// As [`get_with`](Self::get_with).
    pub async fn get_with_ttl<T, F, Fut, E>(
        &self,
        key: &str,
        ttl: Option<std::time::Duration>,
        loader: F,
    ) -> Result<T, ReaderError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
        E: Into<LoaderError>,
    {
        let found = self.lookup_with(key, ttl, loader).await?;
        // A computed lookup always has a value.
        found
            .value
            .ok_or_else(|| ReaderError::Options(format!("{key}: no value")))
    }

    /// [`get_with_ttl`](Self::get_with_ttl) that also says how the value was served, as
    /// [`lookup`](Self::lookup) does for rows: [`Served::Hit`] (cached), [`Served::Filled`]
    /// (loaded under this process's lease and cached), [`Served::Waited`] (another process
    /// filled it), [`Served::Fallback`] or [`Served::BreakerOpen`] (Redis failed or was
    /// skipped: loaded, not cached), [`Served::Uncached`] (loaded, not cached: a change
    /// invalidated the key meanwhile, the daemon lagged, or the wait for another process
    /// reached the lease TTL). `value` is always `Some`. The same events are counted in
    /// [`computed_stats`](Self::computed_stats), a loader run as a `db_read`.
    ///
    /// # Errors
    /// As [`get_with`](Self::get_with).
    pub async fn lookup_with<T, F, Fut, E>(
        &self,
        key: &str,
        ttl: Option<std::time::Duration>,
        loader: F,
    ) -> Result<Lookup<T>, ReaderError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
        E: Into<LoaderError>,
    {
        let found = self
            .computed(key, ttl, move || async move {
                let value = loader().await.map_err(Into::<LoaderError>::into)?;
                serde_json::to_vec(&value).map_err(LoaderError::from)
            })
            .await?;
        let value = serde_json::from_slice(&found.value).map_err(|e| ReaderError::Decode {
            table: computed::COUNTERS_LABEL.to_string(),
            key: key.to_string(),
            source: Arc::new(e),
        })?;
        Ok(Lookup {
            value: Some(value),
            served: found.served,
            coalesced: found.coalesced,
        })
    }

    /// [`get_with_ttl`](Self::get_with_ttl) for values the caller encodes itself: the
    /// loader's bytes are cached as they are.
    ///
    /// # Errors
    /// As [`get_with`](Self::get_with).
    pub async fn get_with_bytes<F, Fut, E>(
        &self,
        key: &str,
        ttl: Option<std::time::Duration>,
        loader: F,
    ) -> Result<Bytes, ReaderError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<u8>, E>>,
        E: Into<LoaderError>,
    {
        let found = self
            .computed(key, ttl, move || async move {
                loader().await.map_err(Into::<LoaderError>::into)
            })
            .await?;
        Ok(found.value)
    }

    async fn computed<F, Fut>(
        &self,
        key: &str,
        ttl: Option<std::time::Duration>,
        loader: F,
    ) -> Result<computed::Computed, ReaderError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<u8>, LoaderError>>,
    {
        let redis_key = format!("{}{key}", self.inner.key_prefix);
        let ttl_ms = ttl.map_or(0, lease::millis);
        let found = computed::get_with(&self.inner, &redis_key, ttl_ms, loader).await?;
        Ok(found.unwrap_or_else(|| {
            let mut computed = computed::Computed::new(Bytes::new(), Served::Uncached);
            computed.coalesced = true;
            computed
        }))
    }

    /// Renders a key template (`user:{user_id}:orders`) with `key`'s values escaped as the
    /// daemon escapes them, without `redis.key_prefix`: the key a `[[tables.invalidate]]`
    /// rule with this template deletes, for [`get_with`](Self::get_with).
    ///
    /// # Errors
    /// [`ReaderError::Options`] when the template does not parse,
    /// [`ReaderError::KeyArity`] when `key` has the wrong number of values.
    pub fn key(&self, template: &str, key: impl Key) -> Result<String, ReaderError> {
        let parsed = crate::template::KeyTemplate::parse(template)
            .map_err(|e| ReaderError::Options(format!("key template {template:?}: {e}")))?;
        if parsed.columns().len() != key.len() {
            return Err(ReaderError::KeyArity {
                table: "(computed)".to_string(),
                template: template.to_string(),
                columns: parsed.columns().join(", "),
                expected: parsed.columns().len(),
                got: key.len(),
            });
        }
        Ok(key.with_texts(|texts| parsed.render("", texts)))
    }

    /// The end of the WAL now: every transaction committed before this call, by any session,
    /// ends at or before it. Pass it to [`wait_applied`](Self::wait_applied) or
    /// [`Table::get_after`] to read your own writes. One Postgres round trip (two when WAL
    /// written under `synchronous_commit = off` is waiting to be flushed: it is flushed, so
    /// that the daemon can see it).
    ///
    /// A position taken by the application itself (`SELECT pg_current_wal_insert_lsn()`
    /// after its commit, parsed with `str::parse::<Lsn>`) works too, with one difference:
    /// after commits under `synchronous_commit = off` the wait can last until the WAL
    /// writer flushes them (`wal_writer_delay`, 200 ms by default).
    ///
    /// # Errors
    /// [`ReaderError::PostgresUnavailable`] or [`ReaderError::Postgres`].
    pub async fn write_position(&self) -> Result<Lsn, ReaderError> {
        written::write_position(&self.inner).await
    }

    /// Returns once the daemon has applied the stream up to `position`: from then on every
    /// lookup sees every change committed before it (read-your-writes). Polls the daemon's
    /// checkpoint in Redis, every 0.2 ms at first and at most every 2 ms. The daemon also
    /// moves its position past commits of tables it does not cache, so any position is
    /// reached while it runs.
    ///
    /// # Errors
    /// [`ReaderError::NotApplied`] past [`ReaderOptions::max_write_wait`] (the daemon is
    /// stopped or far behind), or [`ReaderError::Redis`]: unlike lookups, this call has no
    /// fallback, since only Redis can say what the daemon has applied.
    pub async fn wait_applied(&self, position: Lsn) -> Result<(), ReaderError> {
        written::wait_applied(&self.inner, position, self.inner.options.max_write_wait).await
    }

    /// [`write_position`](Self::write_position) then [`wait_applied`](Self::wait_applied):
    /// call it after committing, before reading through the cache.
    ///
    /// # Errors
    /// As the two calls.
    pub async fn wait_for_writes(&self) -> Result<(), ReaderError> {
        let position = self.write_position().await?;
        self.wait_applied(position).await
    }

    /// Counts over all tables and computed keys since the reader was built.
    pub fn stats(&self) -> Stats {
        self.inner
            .tables
            .iter()
            .fold(self.computed_stats(), |sum, t| {
                sum.merge(t.counters.snapshot())
            })
    }

    /// Counts of computed keys ([`get_with`](Self::get_with) and its variants) since the
    /// reader was built: the same events as a table's, with each loader run counted in
    /// `db_reads`. Exported with the label `table="(computed)"`.
    pub fn computed_stats(&self) -> Stats {
        self.inner.computed_counters.snapshot()
    }
}

/// Names the tables, the key prefix and the options; never the connection strings, whose
/// passwords it does not keep anyway.
impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = &self.inner;
        let tables: Vec<&str> = inner.tables.iter().map(|t| t.name.as_str()).collect();
        let pool = inner.pool.status();
        f.debug_struct("Reader")
            .field("tables", &tables)
            .field("key_prefix", &inner.key_prefix)
            .field("checkpoint_key", &inner.checkpoint_key)
            .field("options", &inner.options)
            .field("pool_connections", &pool.size)
            .field("pool_idle", &pool.available)
            .field("breaker_open", &inner.breaker.is_open())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("name", &self.entry.name)
            .field("key", &self.entry.rule.key.as_str())
            .field("key_prefix", &self.inner.key_prefix)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn entry(&self, name: &str) -> Result<&Arc<TableEntry>, ReaderError> {
        let indexes = self.names.get(name).map(Vec::as_slice).unwrap_or_default();
        let entry = match indexes {
            [i] => &self.tables[*i],
            [] => {
                let known: Vec<&str> = self.tables.iter().map(|t| t.name.as_str()).collect();
                return Err(ReaderError::UnknownTable {
                    name: name.to_string(),
                    known: if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    },
                });
            }
            many => {
                let candidates: Vec<&str> =
                    many.iter().map(|&i| self.tables[i].name.as_str()).collect();
                return Err(ReaderError::AmbiguousTable {
                    name: name.to_string(),
                    candidates: candidates.join(", "),
                });
            }
        };
        Ok(entry)
    }

    fn redis_worked(&self) {
        if self.breaker.succeeded() == Change::Closed {
            tracing::info!("Redis answers again; the circuit breaker is closed");
        }
        if !self.redis_ok.load(Ordering::Relaxed) && !self.redis_ok.swap(true, Ordering::Relaxed) {
            tracing::info!("Redis answers again; lookups use the cache");
        }
    }

    /// Whether a lookup should ask Redis now: not while the circuit breaker is open. When its
    /// cool-down is over, the first caller to ask starts the probe that may close it, and
    /// reads Postgres meanwhile like the others.
    fn use_redis(self: &Arc<Self>) -> bool {
        match self.breaker.permit() {
            Permit::Redis => true,
            Permit::Skip => false,
            Permit::SkipAndProbe => {
                let inner = self.clone();
                tokio::spawn(async move { inner.probe().await });
                false
            }
        }
    }

    /// The half-open breaker's probe: one `PING`, within `redis_timeout`.
    async fn probe(&self) {
        let reply = match self.redis.get() {
            Ok(mut conn) => redis::cmd("PING").query_async::<()>(&mut conn).await,
            Err(error) => Err(error),
        };
        match reply {
            Ok(()) => self.redis_worked(),
            Err(error) => {
                tracing::debug!(%error, "Redis probe failed; the circuit breaker stays open");
                self.breaker.probe_failed();
            }
        }
    }

    /// Opens `warm_connections` Postgres connections (together, so that the pool keeps that
    /// many), prepares each table's statements on each and loads its column list, and loads
    /// the lease scripts, so that the first misses do not pay for them. Best effort.
    async fn warm_up(&self) {
        let wanted = self.options.warm_connections.min(self.options.pool_size);
        let scripts = async {
            if let Ok(mut redis) = self.redis.get() {
                lease::load_scripts(&mut redis).await;
            }
        };
        let (_, clients) = tokio::join!(scripts, join_all((0..wanted).map(|_| self.pool.get())));
        let clients: Vec<_> = clients.into_iter().flatten().collect();
        join_all(clients.iter().map(|client| async move {
            for table in &self.tables {
                let _ = table.source.prepare(client).await;
            }
        }))
        .await;
    }

    fn redis_failed(&self, error: &redis::RedisError) {
        // With sentinels: is another server the master now?
        self.redis.failed();
        if self.breaker.failed(error) == Change::Opened {
            tracing::warn!(
                %error,
                cooldown = ?self.options.breaker_cooldown,
                "Redis did not answer; the circuit breaker is open: lookups read Postgres \
                 without asking Redis until a probe gets an answer"
            );
        }
        if self.redis_ok.swap(false, Ordering::Relaxed) {
            tracing::warn!(%error, "Redis failed; lookups read Postgres until it answers again");
        } else {
            tracing::debug!(%error, "Redis still failing");
        }
    }
}

impl Table {
    /// `schema.name`.
    pub fn name(&self) -> &str {
        &self.entry.name
    }

    /// The Redis key for `key`.
    ///
    /// # Errors
    /// [`ReaderError::KeyArity`] when the key has the wrong number of values.
    pub fn key(&self, key: impl Key) -> Result<String, ReaderError> {
        self.entry.render(&self.inner.key_prefix, &key)
    }

    /// As [`Reader::get`].
    ///
    /// # Errors
    /// As [`Reader::get`].
    pub async fn get<T: DeserializeOwned>(&self, key: impl Key) -> Result<Option<T>, ReaderError> {
        get(&self.inner, &self.entry, key).await
    }

    /// [`get`](Self::get) once the daemon has applied the stream up to `position` (see
    /// [`Reader::wait_applied`]): the row as of that position or newer.
    ///
    /// # Errors
    /// As [`Reader::wait_applied`] and [`Reader::get`].
    pub async fn get_after<T: DeserializeOwned>(
        &self,
        key: impl Key,
        position: Lsn,
    ) -> Result<Option<T>, ReaderError> {
        written::wait_applied(&self.inner, position, self.inner.options.max_write_wait).await?;
        self.get(key).await
    }

    /// As [`Reader::get_json`].
    ///
    /// # Errors
    /// As [`Reader::get`].
    pub async fn get_json(&self, key: impl Key) -> Result<Option<serde_json::Value>, ReaderError> {
        self.get(key).await
    }

    /// As [`Reader::get_raw`].
    ///
    /// # Errors
    /// As [`Reader::get`].
    pub async fn get_raw(&self, key: impl Key) -> Result<Option<Bytes>, ReaderError> {
        let found = fetch(&self.inner, &self.entry, key).await?;
        Ok(found.value.map(Fetched::into_bytes))
    }

    /// As [`Reader::lookup`]: the row with how it was served.
    ///
    /// ```no_run
    /// # async fn demo(users: pgcache::reader::Table) -> Result<(), pgcache::reader::ReaderError> {
    /// use pgcache::reader::Served;
    /// let found = users.lookup::<serde_json::Value>(42).await?;
    /// if found.served != Served::Hit {
    ///     tracing::info!(served = ?found.served, coalesced = found.coalesced, "cache miss");
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Reader::get`].
    pub async fn lookup<T: DeserializeOwned>(
        &self,
        key: impl Key,
    ) -> Result<Lookup<T>, ReaderError> {
        lookup(&self.inner, &self.entry, key).await
    }

    /// As [`Reader::get_many`].
    ///
    /// # Errors
    /// As [`Reader::get_many`].
    pub async fn get_many<T: DeserializeOwned, K: Key>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<Option<T>>, ReaderError> {
        get_many(&self.inner, &self.entry, keys).await
    }

    /// The lower-level protocol, for callers that manage fills themselves: checks the key
    /// and, if it is absent and its lease free, takes the lease. [`get`](Self::get) is this
    /// plus waiting, single flight and fallbacks. For a table stored as hashes, values
    /// (a hit's, [`Lease::read_row`]'s, [`Lease::fill`]'s) are the row as a JSON object of
    /// the fields' text, as [`get_raw`](Self::get_raw) gives it.
    ///
    /// # Errors
    /// [`ReaderError::KeyArity`], or [`ReaderError::Redis`] (no fallback here).
    pub async fn lease(&self, key: impl Key) -> Result<LeaseOutcome, ReaderError> {
        let texts = self.entry.key_texts(&self.inner.key_prefix, &key)?;
        lease::acquire(&self.inner, &self.entry, &texts)
            .await
            .map_err(|source| ReaderError::Redis {
                key: texts.redis_key.clone(),
                source,
            })
    }

    /// This table's counts.
    pub fn stats(&self) -> Stats {
        self.entry.counters.snapshot()
    }
}

impl TableEntry {
    fn check_arity(&self, got: usize) -> Result<(), ReaderError> {
        let columns = self.rule.key.columns();
        if got == columns.len() {
            return Ok(());
        }
        Err(ReaderError::KeyArity {
            table: self.name.clone(),
            template: self.rule.key.as_str().to_string(),
            columns: columns.join(", "),
            expected: columns.len(),
            got,
        })
    }

    fn render(&self, prefix: &str, key: &impl Key) -> Result<String, ReaderError> {
        self.check_arity(key.len())?;
        Ok(key.with_texts(|texts| {
            let mut out = String::new();
            self.rule.key.render_into(&mut out, prefix, texts);
            out
        }))
    }

    /// The key and its values as owned text, for the miss path.
    fn key_texts(&self, prefix: &str, key: &impl Key) -> Result<KeyTexts, ReaderError> {
        let redis_key = self.render(prefix, key)?;
        self.with_key(redis_key, key)
    }

    fn with_key(&self, redis_key: String, key: &impl Key) -> Result<KeyTexts, ReaderError> {
        let texts = key.with_texts(|texts| {
            texts
                .iter()
                .zip(self.rule.key.columns())
                .map(|(text, column)| {
                    String::from_utf8(text.to_vec()).map_err(|_| ReaderError::BadKeyValue {
                        table: self.name.clone(),
                        column: column.clone(),
                        value: String::from_utf8_lossy(text).into_owned(),
                        problem: "not valid UTF-8".to_string(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })?;
        Ok(KeyTexts { redis_key, texts })
    }

    /// XFetch's beta when this table's keys have a TTL and early refresh is on.
    fn early_refresh_beta(&self, options: &ReaderOptions) -> Option<f64> {
        self.rule.ttl.and(options.early_refresh_beta)
    }

    /// A value as the caller's type: JSON, or a hash's fields (see `hash::decode`).
    fn decode<T: DeserializeOwned>(&self, key: &str, value: &[u8]) -> Result<T, ReaderError> {
        if self.rule.format == Format::Hash {
            return hash::decode(&self.name, key, value);
        }
        serde_json::from_slice(value).map_err(|e| ReaderError::Decode {
            table: self.name.clone(),
            key: key.to_string(),
            source: Arc::new(e),
        })
    }
}
