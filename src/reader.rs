//! The read helper: cache-aside reads that cooperate with the daemon.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! # #[derive(serde::Deserialize)] struct User { id: i64, email: String }
//! let config = pgcache::config::Config::load("pgcache.toml".as_ref())?;
//! let reader = pgcache::Reader::from_config(&config)?;
//! let user: Option<User> = reader.get("public.users", 42).await?;
//! # Ok(()) }
//! ```
//!
//! A lookup reads Redis (one `GET`). On a miss it follows the lease protocol of DESIGN.md:
//! take the key's lease, read the row from Postgres encoded exactly as the daemon encodes
//! it, and fill only if no change revoked the lease meanwhile, so a fill never puts an older
//! row over a newer one. Callers that find the lease taken wait for the fill (short polling
//! with backoff, bounded by the lease TTL), and callers in one process share one wait and
//! one read per key. When Redis fails, lookups read Postgres; when Postgres fails, hits are
//! still served.
//!
//! # Layout
//! - [`key`]: key values as callers pass them (`42`, `("acme", 42)`).
//! - `source`: the Postgres side: a table's columns and the read that matches the stream.
//! - [`lease`]: the lease protocol and its Lua scripts; the lower-level [`Table::lease`] API.
//! - `flight`: single flight, one resolution per key per process.
//! - `refresh`: probabilistic early refresh (XFetch) of keys with a TTL.
//! - [`stats`]: counters, in process and through the `metrics` facade.
//! - [`error`]: what can go wrong, [`ReaderError`].

pub mod error;
mod flight;
pub mod key;
pub mod lease;
mod refresh;
mod source;
pub mod stats;
#[cfg(test)]
mod tests;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::future::join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::de::DeserializeOwned;

pub use self::error::ReaderError;
pub use self::key::{Key, KeyText, KeyValue};
pub use self::lease::{FillOutcome, Lease, LeaseOutcome};
pub use self::stats::Stats;

use self::flight::{Flights, Joined, Outcome};
use self::lease::Backoff;
use self::refresh::FillTimer;
use self::source::{KeyTexts, RowSource};
use self::stats::{Counters, Event};
use crate::config::{Config, Format, Mode, TableRule};
use crate::encoder::EncodeOptions;
use crate::pgconn::{self, PgTarget, SslMode};
use crate::template::KeyTemplate;

/// Tuning of a [`Reader`]; the defaults suit most applications.
#[derive(Debug, Clone)]
pub struct ReaderOptions {
    /// How long a lease lasts: the longest a dead lease holder can keep others waiting, and
    /// how long waiters poll before reading Postgres themselves. Default 2 s.
    pub lease_ttl: Duration,
    /// The longest pause between two polls while another process fills. Default 50 ms.
    pub max_wait_step: Duration,
    /// Cache the absence of a row for this long (`None`, the default: do not). Safe with the
    /// daemon running: an insert ends a cached absence at once.
    pub negative_ttl: Option<Duration>,
    /// XFetch's beta for keys with a TTL (higher refreshes earlier); `None` turns early
    /// refresh off. Default 1.0.
    pub early_refresh_beta: Option<f64>,
    /// Postgres connections in the pool. Default 16.
    pub pool_size: usize,
    /// Connect and response timeout for Redis; past it a lookup reads Postgres. Default 1 s.
    pub redis_timeout: Duration,
    /// Connect and pool wait timeout for Postgres. Default 5 s.
    pub postgres_timeout: Duration,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            lease_ttl: Duration::from_secs(2),
            max_wait_step: Duration::from_millis(50),
            negative_ttl: None,
            early_refresh_beta: Some(1.0),
            pool_size: 16,
            redis_timeout: Duration::from_secs(1),
            postgres_timeout: Duration::from_secs(5),
        }
    }
}

impl ReaderOptions {
    fn validate(&self) -> Result<(), ReaderError> {
        let bad = |what: &str| Err(ReaderError::Options(what.to_string()));
        if self.lease_ttl < Duration::from_millis(1) {
            return bad("lease_ttl must be at least 1 ms");
        }
        if self.max_wait_step.is_zero() {
            return bad("max_wait_step must be more than zero");
        }
        if self
            .negative_ttl
            .is_some_and(|t| t < Duration::from_millis(1))
        {
            return bad("negative_ttl must be at least 1 ms (or None to turn it off)");
        }
        if self
            .early_refresh_beta
            .is_some_and(|b| !b.is_finite() || b <= 0.0)
        {
            return bad("early_refresh_beta must be a positive number (or None to turn it off)");
        }
        if self.pool_size == 0 {
            return bad("pool_size must be at least 1");
        }
        if self.redis_timeout.is_zero() || self.postgres_timeout.is_zero() {
            return bad("timeouts must be more than zero");
        }
        Ok(())
    }
}

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
    redis: ConnectionManager,
    pool: Pool,
    key_prefix: String,
    options: ReaderOptions,
    tables: Vec<Arc<TableEntry>>,
    /// Qualified (`public.users`) and bare (`users`) names to indexes into `tables`; a bare
    /// name two schemas share maps to both, and using it is an error.
    names: HashMap<String, Vec<usize>>,
    flights: Flights,
    /// Whether the last Redis command worked, so that an outage is logged once, not per call.
    redis_ok: AtomicBool,
}

pub(crate) struct TableEntry {
    rule: Arc<TableRule>,
    name: String,
    source: RowSource,
    counters: Counters,
    fill_time: FillTimer,
}

/// Builds a [`Reader`] without a config file.
pub struct ReaderBuilder {
    postgres_url: String,
    redis_url: String,
    redis: Option<ConnectionManager>,
    key_prefix: String,
    rules: Vec<TableRule>,
    problems: Vec<String>,
    options: ReaderOptions,
}

impl ReaderBuilder {
    /// Prepended to every key, as `redis.key_prefix` in the daemon's config. Must match it.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Adds a table (`schema.name`, or `name` for `public`) whose rows are JSON under keys
    /// rendered from `key_template`, with all columns and no TTL. Problems are reported by
    /// [`build`](Self::build).
    pub fn table(mut self, table: &str, key_template: &str) -> Self {
        let (schema, name) = table.split_once('.').unwrap_or(("public", table));
        match KeyTemplate::parse(key_template) {
            Ok(key) => self.rules.push(TableRule {
                schema: schema.to_string(),
                name: name.to_string(),
                key,
                columns: None,
                mode: Mode::Refresh,
                ttl: None,
                format: Format::Json,
                encode: EncodeOptions::default(),
            }),
            Err(e) => self.problems.push(format!("table {table}: {e}")),
        }
        self
    }

    /// Adds a table with a full rule (columns, TTL, encoding), as in the config file.
    pub fn rule(mut self, rule: TableRule) -> Self {
        self.rules.push(rule);
        self
    }

    pub fn options(mut self, options: ReaderOptions) -> Self {
        self.options = options;
        self
    }

    /// Uses this Redis connection instead of opening one from the URL.
    pub fn redis_connection(mut self, connection: ConnectionManager) -> Self {
        self.redis = Some(connection);
        self
    }

    /// Builds the reader. Nothing connects yet: both servers are reached on first use, so
    /// a reader can start while either is down. Must run inside a Tokio runtime.
    ///
    /// # Errors
    /// An unusable URL or TLS setting, a bad template or option, two rules for one table,
    /// or no Tokio runtime.
    pub fn build(self) -> Result<Reader, ReaderError> {
        if let Some(problem) = self.problems.into_iter().next() {
            return Err(ReaderError::Options(problem));
        }
        self.options.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ReaderError::Options(
                "a Reader must be built inside a Tokio runtime".to_string(),
            ));
        }
        let pool = build_pool(&self.postgres_url, &self.options)?;
        let redis = match self.redis {
            Some(redis) => redis,
            None => connect_redis(&self.redis_url, &self.options)?,
        };
        let mut tables = Vec::with_capacity(self.rules.len());
        let mut names: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, rule) in self.rules.into_iter().enumerate() {
            let name = rule.qualified_name();
            match names.entry(name.clone()) {
                Entry::Occupied(_) => {
                    return Err(ReaderError::Options(format!(
                        "table {name} is configured twice"
                    )))
                }
                Entry::Vacant(slot) => {
                    slot.insert(vec![i]);
                }
            }
            if rule.name != name {
                names.entry(rule.name.clone()).or_default().push(i);
            }
            let rule = Arc::new(rule);
            tables.push(Arc::new(TableEntry {
                source: RowSource::new(rule.clone()),
                counters: Counters::new(&name),
                fill_time: FillTimer::default(),
                name,
                rule,
            }));
        }
        Ok(Reader {
            inner: Arc::new(Inner {
                redis,
                pool,
                key_prefix: self.key_prefix,
                options: self.options,
                tables,
                names,
                flights: Flights::default(),
                redis_ok: AtomicBool::new(true),
            }),
        })
    }
}

/// A pool whose every connection pins the session settings of the stream, so values read
/// here are byte-identical to the daemon's.
fn build_pool(url: &str, options: &ReaderOptions) -> Result<Pool, ReaderError> {
    let config_err = |e| ReaderError::PostgresConfig(Arc::new(e));
    let target = PgTarget::parse(url).map_err(config_err)?;
    let config = target.tokio_config();
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = if target.ssl_mode() == SslMode::Disable || target.is_unix_socket() {
        Manager::from_config(config, tokio_postgres::NoTls, manager_config)
    } else {
        let tls =
            pgconn::tls_config(target.ssl_mode(), target.ssl_root_cert()).map_err(config_err)?;
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
        Manager::from_config(config, tls, manager_config)
    };
    Pool::builder(manager)
        .max_size(options.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(options.postgres_timeout))
        .create_timeout(Some(options.postgres_timeout))
        .recycle_timeout(Some(options.postgres_timeout))
        .build()
        .map_err(|e| ReaderError::Options(format!("cannot build the Postgres pool: {e}")))
}

/// A connection that reconnects by itself. No retries inside a command: while Redis is
/// down, each lookup fails fast and reads Postgres, and the next command tries again.
fn connect_redis(url: &str, options: &ReaderOptions) -> Result<ConnectionManager, ReaderError> {
    let client = redis::Client::open(url).map_err(ReaderError::RedisConfig)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(options.redis_timeout))
        .set_response_timeout(Some(options.redis_timeout))
        .set_number_of_retries(0);
    ConnectionManager::new_lazy_with_config(client, config).map_err(ReaderError::RedisConfig)
}

impl Reader {
    /// A reader for the tables of the daemon's config file, with default options.
    ///
    /// # Errors
    /// As [`ReaderBuilder::build`].
    pub fn from_config(config: &Config) -> Result<Reader, ReaderError> {
        Self::from_config_with(config, ReaderOptions::default())
    }

    /// A reader for the tables of the daemon's config file.
    ///
    /// # Errors
    /// As [`ReaderBuilder::build`].
    pub fn from_config_with(
        config: &Config,
        options: ReaderOptions,
    ) -> Result<Reader, ReaderError> {
        let mut builder = Self::builder(config.postgres.url.expose(), config.redis.url.expose())
            .key_prefix(config.redis.key_prefix.clone())
            .options(options);
        for rule in &config.tables {
            builder = builder.rule(rule.clone());
        }
        builder.build()
    }

    /// A reader configured in code: `postgres://...` (or libpq key-value) and `redis://...`.
    pub fn builder(postgres_url: &str, redis_url: &str) -> ReaderBuilder {
        ReaderBuilder {
            postgres_url: postgres_url.to_string(),
            redis_url: redis_url.to_string(),
            redis: None,
            key_prefix: String::new(),
            rules: Vec::new(),
            problems: Vec::new(),
            options: ReaderOptions::default(),
        }
    }

    /// The table called `name` (`public.users`, or `users` when no other schema has one).
    ///
    /// # Errors
    /// [`ReaderError::UnknownTable`], [`ReaderError::AmbiguousTable`], or
    /// [`ReaderError::Schema`] for a table stored as hashes.
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
        get(&self.inner, self.inner.entry(table)?, key).await
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
        let (_, value) = fetch(&self.inner, self.inner.entry(table)?, key).await?;
        Ok(value.map(Fetched::into_bytes))
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
        get_many(&self.inner, self.inner.entry(table)?, keys).await
    }

    /// Counts over all tables since the reader was built.
    pub fn stats(&self) -> Stats {
        self.inner
            .tables
            .iter()
            .fold(Stats::default(), |sum, t| sum.merge(t.counters.snapshot()))
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
        if entry.rule.format == Format::Hash {
            return Err(ReaderError::Schema {
                table: entry.name.clone(),
                problem: "format = \"hash\" is not supported by the read helper; it reads \
                          tables stored as JSON"
                    .to_string(),
            });
        }
        Ok(entry)
    }

    fn redis_worked(&self) {
        if !self.redis_ok.load(Ordering::Relaxed) && !self.redis_ok.swap(true, Ordering::Relaxed) {
            tracing::info!("Redis answers again; lookups use the cache");
        }
    }

    fn redis_failed(&self, error: &redis::RedisError) {
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
        let (_, value) = fetch(&self.inner, &self.entry, key).await?;
        Ok(value.map(Fetched::into_bytes))
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
    /// plus waiting, single flight and fallbacks.
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

    fn decode<T: DeserializeOwned>(&self, key: &str, value: &[u8]) -> Result<T, ReaderError> {
        serde_json::from_slice(value).map_err(|e| ReaderError::Decode {
            table: self.name.clone(),
            key: key.to_string(),
            source: Arc::new(e),
        })
    }
}

/// A value as found: straight from the `GET` reply, or shared with other callers.
#[derive(Clone)]
enum Fetched {
    Owned(Vec<u8>),
    Shared(Bytes),
}

impl Fetched {
    fn as_slice(&self) -> &[u8] {
        match self {
            Fetched::Owned(v) => v,
            Fetched::Shared(b) => b,
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Fetched::Owned(v) => Bytes::from(v),
            Fetched::Shared(b) => b,
        }
    }
}

async fn get<T: DeserializeOwned>(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    key: impl Key,
) -> Result<Option<T>, ReaderError> {
    match fetch(inner, entry, key).await? {
        (_, None) => Ok(None),
        (redis_key, Some(value)) => entry.decode(&redis_key, value.as_slice()).map(Some),
    }
}

/// One lookup: the hit path is a single `GET` (with `PTTL` in the same round trip when the
/// table has a TTL and early refresh is on); everything else is on the miss path.
async fn fetch(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    key: impl Key,
) -> Result<(String, Option<Fetched>), ReaderError> {
    let redis_key = entry.render(&inner.key_prefix, &key)?;
    let mut conn = inner.redis.clone();
    let beta = entry.early_refresh_beta(&inner.options);
    let first: redis::RedisResult<(Option<Vec<u8>>, i64)> = match beta {
        None => redis::cmd("GET")
            .arg(&redis_key)
            .query_async(&mut conn)
            .await
            .map(|value| (value, -1)),
        Some(_) => {
            redis::pipe()
                .cmd("GET")
                .arg(&redis_key)
                .cmd("PTTL")
                .arg(&redis_key)
                .query_async(&mut conn)
                .await
        }
    };
    match first {
        Ok((Some(value), ttl_ms)) => {
            entry.counters.record(Event::Hit);
            inner.redis_worked();
            if let (Some(beta), Ok(ttl_ms @ 1..)) = (beta, u64::try_from(ttl_ms)) {
                maybe_refresh(
                    inner,
                    entry,
                    &redis_key,
                    &key,
                    Duration::from_millis(ttl_ms),
                    beta,
                );
            }
            Ok((redis_key, Some(Fetched::Owned(value))))
        }
        Ok((None, _)) => {
            entry.counters.record(Event::Miss);
            inner.redis_worked();
            let texts = entry.with_key(redis_key, &key)?;
            // Boxed so that the hit path's future stays small.
            let value = Box::pin(resolve(inner, entry, &texts)).await?;
            Ok((texts.redis_key, value.map(Fetched::Shared)))
        }
        Err(e) => {
            entry.counters.record(Event::Miss);
            entry.counters.record(Event::Fallback);
            inner.redis_failed(&e);
            let texts = entry.with_key(redis_key, &key)?;
            // Shared too, so that an outage does not turn every caller into a query.
            let read = shared(inner, entry, &texts, || read_one(inner, entry, &texts));
            let value = Box::pin(read).await?;
            Ok((texts.redis_key, value.map(Fetched::Shared)))
        }
    }
}

/// Resolves a miss, sharing the work with other callers in this process.
async fn resolve(inner: &Arc<Inner>, entry: &Arc<TableEntry>, key: &KeyTexts) -> Outcome {
    shared(inner, entry, key, || lead(inner, entry, key)).await
}

/// Runs `work` for `key` once for all callers in this process that ask meanwhile.
async fn shared<F, Fut>(inner: &Inner, entry: &TableEntry, key: &KeyTexts, work: F) -> Outcome
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Outcome>,
{
    let mut coalesced = false;
    loop {
        match inner.flights.join(&key.redis_key) {
            Joined::Leader(leader) => {
                let outcome = work().await;
                leader.finish(outcome.clone());
                return outcome;
            }
            Joined::Follower(slot) => {
                if !coalesced {
                    entry.counters.record(Event::Coalesced);
                    coalesced = true;
                }
                if let Some(outcome) = flight::follow(slot).await {
                    return outcome;
                }
                // The leader was cancelled: start over, perhaps as the leader.
            }
        }
    }
}

/// The lease protocol for one key: take the lease and fill, or wait for the holder's fill,
/// or read Postgres past the deadline or when Redis fails.
async fn lead(inner: &Arc<Inner>, entry: &Arc<TableEntry>, key: &KeyTexts) -> Outcome {
    let mut backoff = Backoff::new(inner.options.max_wait_step);
    let mut deadline = None;
    loop {
        match lease::acquire(inner, entry, key).await {
            Ok(LeaseOutcome::Hit(value)) => return Ok(Some(value)),
            Ok(LeaseOutcome::Absent) => {
                entry.counters.record(Event::NegativeHit);
                return Ok(None);
            }
            Ok(LeaseOutcome::Acquired(lease)) => {
                let row = lease.read_row().await?;
                settle(inner, lease, row.as_deref()).await;
                return Ok(row.map(Bytes::from));
            }
            Ok(LeaseOutcome::Held) => {
                let now = Instant::now();
                // A holder that died frees the key when its lease expires, at the latest one
                // lease TTL from now; one more step covers the poll that notices.
                let deadline = *deadline.get_or_insert_with(|| {
                    entry.counters.record(Event::Wait);
                    now + inner.options.lease_ttl + inner.options.max_wait_step
                });
                if now >= deadline {
                    entry.counters.record(Event::WaitTimeout);
                    return read_one(inner, entry, key).await;
                }
                tokio::time::sleep(backoff.step().min(deadline - now)).await;
            }
            Err(e) => {
                inner.redis_failed(&e);
                entry.counters.record(Event::Fallback);
                return read_one(inner, entry, key).await;
            }
        }
    }
}

/// Fills (or records the absence) under a lease. The caller has its value either way, so a
/// Redis failure here is only logged.
async fn settle(inner: &Inner, lease: Lease, row: Option<&[u8]>) {
    let key = lease.key().to_string();
    let result = match row {
        Some(value) => lease.fill(value).await,
        None => lease.fill_absent().await,
    };
    match result {
        Ok(FillOutcome::Lost) => {
            tracing::debug!(%key, "fill lost: the row changed or was filled meanwhile")
        }
        Ok(_) => {}
        Err(ReaderError::Redis { source, .. }) => inner.redis_failed(&source),
        Err(e) => tracing::debug!(%key, error = %e, "fill failed"),
    }
}

/// Reads one row from Postgres without filling.
async fn read_one(inner: &Inner, entry: &TableEntry, key: &KeyTexts) -> Outcome {
    let mut rows = lease::read_rows(inner, entry, std::slice::from_ref(key)).await?;
    Ok(rows.pop().flatten().map(Bytes::from))
}

/// Starts an early refresh of a hit key when XFetch says so.
fn maybe_refresh(
    inner: &Arc<Inner>,
    entry: &Arc<TableEntry>,
    redis_key: &str,
    key: &impl Key,
    remaining: Duration,
    beta: f64,
) {
    let u = 1.0 - rand::random::<f64>();
    if !refresh::should_refresh(entry.fill_time.delta(), beta, remaining, u) {
        return;
    }
    let Ok(texts) = entry.with_key(redis_key.to_string(), key) else {
        return;
    };
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
            Ok(row) => {
                match &row {
                    Some(value) => settle(&inner, lease, Some(value)).await,
                    // A row deleted since would have revoked the lease; give it back.
                    None => drop(lease.release().await),
                }
                Ok(row.map(Bytes::from))
            }
            Err(e) => Err(e),
        };
        leader.finish(outcome);
    });
}

async fn get_many<T: DeserializeOwned, K: Key>(
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
    let mut mget = redis::cmd("MGET");
    for key in keys {
        mget.arg(&key.redis_key);
    }
    let mut conn = inner.redis.clone();
    let values: Vec<Option<Vec<u8>>> = match mget.query_async(&mut conn).await {
        Ok(values) if Vec::len(&values) == keys.len() => {
            inner.redis_worked();
            values
        }
        result => {
            let error = result.err().unwrap_or_else(|| {
                redis::RedisError::from((
                    redis::ErrorKind::Parse,
                    "MGET returned a wrong number of values",
                ))
            });
            inner.redis_failed(&error);
            entry.counters.add(Event::Miss, keys.len() as u64);
            entry.counters.add(Event::Fallback, keys.len() as u64);
            let rows = lease::read_rows(inner, entry, keys).await?;
            return Ok(rows.into_iter().map(|r| r.map(Fetched::Owned)).collect());
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
        out.push(value.map(Fetched::Owned));
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
        out[i] = outcome?.map(Fetched::Shared);
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
            Ok(LeaseOutcome::Hit(value)) => outcomes[*j] = Some(Ok(Some(value))),
            Ok(LeaseOutcome::Absent) => {
                entry.counters.record(Event::NegativeHit);
                outcomes[*j] = Some(Ok(None));
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
            Ok(rows) => {
                let fills = leases
                    .into_iter()
                    .zip(rows)
                    .map(|((j, lease), row)| async move {
                        settle(inner, lease, row.as_deref()).await;
                        (j, row)
                    });
                for (j, row) in join_all(fills).await {
                    outcomes[j] = Some(Ok(row.map(Bytes::from)));
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
            Ok(rows) => {
                for (&j, row) in unfilled.iter().zip(rows) {
                    outcomes[j] = Some(Ok(row.map(Bytes::from)));
                }
            }
            Err(e) => {
                for &j in &unfilled {
                    outcomes[j] = Some(Err(e.clone()));
                }
            }
        }
    }
    let waited = join_all(waiting.iter().map(|&j| lead(inner, entry, keys[j]))).await;
    for (&j, outcome) in waiting.iter().zip(waited) {
        outcomes[j] = Some(outcome);
    }
    for (j, leader) in leaders {
        leader.finish(outcomes[j].clone().unwrap_or(Ok(None)));
    }
    for (j, slot) in followers {
        entry.counters.record(Event::Coalesced);
        outcomes[j] = Some(match flight::follow(slot).await {
            Some(outcome) => outcome,
            None => resolve(inner, entry, keys[j]).await,
        });
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Ok(None)))
        .collect()
}
