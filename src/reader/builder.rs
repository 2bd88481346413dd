//! Building a [`Reader`]: its options, the Postgres pool and the Redis connection.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Pool, Runtime};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::breaker::Breaker;
use super::flight::Flights;
use super::link::RedisLink;
use super::refresh::FillTimer;
use super::source::RowSource;
use super::stats::Counters;
use super::{Inner, Reader, ReaderError, TableEntry};
use crate::config::{redis_client, Format, Mode, RedisRoots, SentinelConfig, TableRule};
use crate::encoder::EncodeOptions;
use crate::pgconn::{self, PgTarget};
use crate::template::KeyTemplate;

/// Tuning of a [`Reader`]; the defaults suit most applications.
///
/// Start from the defaults and change what you need, with the setters or the fields:
///
/// ```
/// use std::time::Duration;
/// use pgcache::ReaderOptions;
///
/// let options = ReaderOptions::default()
///     .negative_ttl(Some(Duration::from_secs(30)))
///     .redis_timeout(Duration::from_millis(200));
/// assert_eq!(options.breaker_failures, 1);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReaderOptions {
    /// How long a lease lasts: the longest a dead lease holder can keep others waiting, and
    /// how long waiters poll before reading Postgres themselves. Default 2 s.
    pub lease_ttl: Duration,
    /// The longest pause between two polls while another process fills. Default 50 ms.
    pub max_wait_step: Duration,
    /// How long a miss waits for the daemon to apply everything up to the position its row
    /// was read at, before filling or returning the row (monotonic reads, G10). Past it the
    /// row read from Postgres is returned without filling (`lag_fallbacks`). Default 1 s.
    pub max_lag_wait: Duration,
    /// How long [`Reader::wait_applied`](super::Reader::wait_applied) (and the calls built on
    /// it: `wait_for_writes`, `get_after`) waits for the daemon before it returns
    /// [`ReaderError::NotApplied`]. Default 5 s.
    pub max_write_wait: Duration,
    /// Cache the absence of a row for this long (`None`, the default: do not). Safe with the
    /// daemon running: an insert ends a cached absence at once.
    pub negative_ttl: Option<Duration>,
    /// XFetch's beta for keys with a TTL (higher refreshes earlier); `None` turns early
    /// refresh off. Default 1.0.
    pub early_refresh_beta: Option<f64>,
    /// Postgres connections in the pool. Default 16.
    pub pool_size: usize,
    /// Postgres connections opened when the reader is built, in the background, so that the
    /// first misses (often a stampede right after a deploy) do not pay for connecting; at
    /// most `pool_size`. Default 2.
    pub warm_connections: usize,
    /// Connect and response timeout for Redis; past it a lookup reads Postgres. Default 1 s.
    pub redis_timeout: Duration,
    /// Consecutive Redis timeouts or connection errors that open the circuit breaker: while
    /// it is open, lookups read Postgres without asking Redis, so a hung Redis costs one
    /// `redis_timeout` rather than one per call. 0 turns the breaker off. Default 1.
    pub breaker_failures: u32,
    /// How long the breaker stays open before a probe (one `PING`, in the background, that
    /// no caller waits for) checks Redis again: an answer closes the breaker, a failure
    /// opens it for another cool-down. Default 1 s.
    pub breaker_cooldown: Duration,
    /// Connect and pool wait timeout for Postgres. Default 5 s.
    pub postgres_timeout: Duration,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            lease_ttl: Duration::from_secs(2),
            max_wait_step: Duration::from_millis(50),
            max_lag_wait: Duration::from_secs(1),
            max_write_wait: Duration::from_secs(5),
            negative_ttl: None,
            early_refresh_beta: Some(1.0),
            pool_size: 16,
            warm_connections: 2,
            redis_timeout: Duration::from_secs(1),
            breaker_failures: 1,
            breaker_cooldown: Duration::from_secs(1),
            postgres_timeout: Duration::from_secs(5),
        }
    }
}

/// Builder-style setters, one per field: `ReaderOptions::default().lease_ttl(d)`.
impl ReaderOptions {
    /// Sets [`lease_ttl`](Self::lease_ttl).
    pub fn lease_ttl(mut self, lease_ttl: Duration) -> Self {
        self.lease_ttl = lease_ttl;
        self
    }

    /// Sets [`max_wait_step`](Self::max_wait_step).
    pub fn max_wait_step(mut self, max_wait_step: Duration) -> Self {
        self.max_wait_step = max_wait_step;
        self
    }

    /// Sets [`max_lag_wait`](Self::max_lag_wait).
    pub fn max_lag_wait(mut self, max_lag_wait: Duration) -> Self {
        self.max_lag_wait = max_lag_wait;
        self
    }

    /// Sets [`max_write_wait`](Self::max_write_wait).
    pub fn max_write_wait(mut self, max_write_wait: Duration) -> Self {
        self.max_write_wait = max_write_wait;
        self
    }

    /// Sets [`negative_ttl`](Self::negative_ttl).
    pub fn negative_ttl(mut self, negative_ttl: Option<Duration>) -> Self {
        self.negative_ttl = negative_ttl;
        self
    }

    /// Sets [`early_refresh_beta`](Self::early_refresh_beta).
    pub fn early_refresh_beta(mut self, early_refresh_beta: Option<f64>) -> Self {
        self.early_refresh_beta = early_refresh_beta;
        self
    }

    /// Sets [`pool_size`](Self::pool_size).
    pub fn pool_size(mut self, pool_size: usize) -> Self {
        self.pool_size = pool_size;
        self
    }

    /// Sets [`warm_connections`](Self::warm_connections).
    pub fn warm_connections(mut self, warm_connections: usize) -> Self {
        self.warm_connections = warm_connections;
        self
    }

    /// Sets [`redis_timeout`](Self::redis_timeout).
    pub fn redis_timeout(mut self, redis_timeout: Duration) -> Self {
        self.redis_timeout = redis_timeout;
        self
    }

    /// Sets [`breaker_failures`](Self::breaker_failures).
    pub fn breaker_failures(mut self, breaker_failures: u32) -> Self {
        self.breaker_failures = breaker_failures;
        self
    }

    /// Sets [`breaker_cooldown`](Self::breaker_cooldown).
    pub fn breaker_cooldown(mut self, breaker_cooldown: Duration) -> Self {
        self.breaker_cooldown = breaker_cooldown;
        self
    }

    /// Sets [`postgres_timeout`](Self::postgres_timeout).
    pub fn postgres_timeout(mut self, postgres_timeout: Duration) -> Self {
        self.postgres_timeout = postgres_timeout;
        self
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
        if self.breaker_failures > 0 && self.breaker_cooldown < Duration::from_millis(1) {
            return bad("breaker_cooldown must be at least 1 ms (or breaker_failures 0 to turn the breaker off)");
        }
        Ok(())
    }
}

/// Builds a [`Reader`] without a config file.
///
/// [`build`](Self::build) must run inside a Tokio runtime, multi-thread or current-thread,
/// with its I/O and time drivers enabled (`enable_all()`, as `#[tokio::main]` does).
pub struct ReaderBuilder {
    postgres_url: String,
    redis_url: String,
    redis: Option<ConnectionManager>,
    /// `[redis.sentinel]` of a config file: the master is found through the sentinels.
    sentinel: Option<SentinelConfig>,
    /// `cluster = true` of a config file: the seeds of a Redis Cluster.
    cluster: Option<Vec<String>>,
    pool: Option<Pool>,
    redis_roots: Option<RedisRoots>,
    key_prefix: String,
    slot: String,
    rules: Vec<TableRule>,
    problems: Vec<String>,
    options: ReaderOptions,
}

/// Names what the reader will serve; never the connection strings, which may hold
/// passwords.
impl std::fmt::Debug for ReaderBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tables: Vec<String> = self.rules.iter().map(TableRule::qualified_name).collect();
        f.debug_struct("ReaderBuilder")
            .field("tables", &tables)
            .field("key_prefix", &self.key_prefix)
            .field("slot", &self.slot)
            .field("options", &self.options)
            .field("redis_connection_given", &self.redis.is_some())
            .field("redis_tls_roots", &self.redis_roots.is_some())
            .field("problems", &self.problems)
            .finish_non_exhaustive()
    }
}

impl ReaderBuilder {
    pub(super) fn new(postgres_url: &str, redis_url: &str) -> ReaderBuilder {
        ReaderBuilder {
            postgres_url: postgres_url.to_string(),
            redis_url: redis_url.to_string(),
            redis: None,
            sentinel: None,
            cluster: None,
            pool: None,
            redis_roots: None,
            key_prefix: String::new(),
            slot: crate::config::DEFAULT_SLOT.to_string(),
            rules: Vec::new(),
            problems: Vec::new(),
            options: ReaderOptions::default(),
        }
    }

    /// Prepended to every key, as `redis.key_prefix` in the daemon's config. Must match it.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// The daemon's replication slot (`postgres.slot`, default `pgcache`): its checkpoint
    /// says how far the daemon has applied, which fills wait for.
    pub fn slot(mut self, slot: impl Into<String>) -> Self {
        self.slot = slot.into();
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
                invalidate: Vec::new(),
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

    /// Replaces the options (default: [`ReaderOptions::default`]).
    pub fn options(mut self, options: ReaderOptions) -> Self {
        self.options = options;
        self
    }

    /// What vouches for a `rediss://` Redis: a CA file, or the operating system's roots.
    /// Required with `rediss://` (as `[redis] tls_ca_file` is for the daemon).
    pub fn redis_tls_roots(mut self, roots: RedisRoots) -> Self {
        self.redis_roots = Some(roots);
        self
    }

    /// Reads Postgres through this pool (the application's own) instead of opening one from
    /// the URL. Its connections must print values as the daemon's do: build its
    /// `tokio_postgres::Config` with `options(&pgcache::pgconn::session_options())`. The
    /// reader checks the settings on its first read and refuses to read with others
    /// ([`ReaderError::Options`] naming the setting), since a fill in another `DateStyle` or
    /// `TimeZone` would cache text the daemon never writes.
    pub fn postgres_pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Reads from a Redis Cluster found from these seeds (a config file's `cluster = true`):
    /// each key from its slot's master, and each fill checks the daemon's checkpoint of that
    /// hash slot. Needs the `cluster` feature.
    pub fn redis_cluster(mut self, seeds: Vec<String>) -> Self {
        self.cluster = Some(seeds);
        self
    }

    /// Finds the master through these sentinels (a config file's `[redis.sentinel]`).
    pub(crate) fn sentinel(mut self, sentinel: SentinelConfig) -> Self {
        self.sentinel = Some(sentinel);
        self
    }

    /// Uses this Redis connection instead of opening one from the URL.
    pub fn redis_connection(mut self, connection: ConnectionManager) -> Self {
        self.redis = Some(connection);
        self
    }

    /// Builds the reader. It does not wait for either server, so a reader can start while
    /// either is down: a background task opens `warm_connections` Postgres connections,
    /// loads each table's columns and the lease scripts, so that the first misses do not
    /// pay for them.
    ///
    /// Must run inside a Tokio runtime, multi-thread or current-thread, with its I/O and
    /// time drivers enabled (`enable_all()`, as `#[tokio::main]` and `#[tokio::test]` do):
    /// the reader spawns tasks on it, and its timeouts use its timer. Lookups must run on
    /// a runtime too.
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
                "a Reader must be built inside a Tokio runtime (multi-thread or current-thread, \
                 with I/O and time enabled)"
                    .to_string(),
            ));
        }
        let external_pool = self.pool.is_some();
        let pool = match self.pool {
            Some(pool) => pool,
            None => build_pool(&self.postgres_url, &self.options)?,
        };
        let redis = match (self.redis, self.sentinel) {
            (None, _) if self.cluster.is_some() => cluster_link(
                self.cluster.unwrap_or_default(),
                &self.redis_roots,
                &self.options,
            )?,
            (Some(redis), _) => RedisLink::fixed(redis),
            (None, Some(sentinel)) => RedisLink::sentinel(
                sentinel,
                self.redis_roots.clone(),
                manager_config(&self.options),
            ),
            (None, None) => RedisLink::fixed(connect_redis(
                &self.redis_url,
                self.redis_roots.as_ref(),
                &self.options,
            )?),
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
        let breaker = Breaker::new(self.options.breaker_failures, self.options.breaker_cooldown);
        let reader = Reader {
            inner: Arc::new(Inner {
                redis: Arc::new(redis),
                pool,
                checkpoint_key: crate::checkpoint::checkpoint_key(&self.key_prefix, &self.slot),
                slot: self.slot.clone(),
                key_prefix: self.key_prefix,
                options: self.options,
                tables,
                names,
                flights: Flights::default(),
                lookups: Flights::default(),
                redis_ok: AtomicBool::new(true),
                applied_watch: super::written::AppliedWatch::new(),
                settings_checked: tokio::sync::OnceCell::new_with((!external_pool).then_some(())),
                breaker,
                computed_flights: Flights::default(),
                computed_counters: Counters::new(super::computed::COUNTERS_LABEL),
            }),
        };
        // Prepare in the background what the first miss would otherwise pay for (often a
        // stampede right after a deploy): Postgres connections, each table's column list,
        // the lease scripts in Redis. A server that is down is no error here.
        let inner = Arc::downgrade(&reader.inner);
        tokio::spawn(async move {
            if let Some(inner) = inner.upgrade() {
                inner.warm_up().await;
            }
        });
        if reader.inner.redis.is_cluster() {
            // Connect now, in the background: lookups read Postgres until it is done.
            reader.inner.redis.failed();
        }
        Ok(reader)
    }
}

/// A pool whose every connection pins the session settings of the stream, so values read
/// here are byte-identical to the daemon's.
fn build_pool(url: &str, options: &ReaderOptions) -> Result<Pool, ReaderError> {
    let config_err = |e| ReaderError::PostgresConfig(Arc::new(e));
    let target = PgTarget::parse(url).map_err(config_err)?;
    let manager = pgconn::pool_manager(&target).map_err(config_err)?;
    Pool::builder(manager)
        .max_size(options.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(options.postgres_timeout))
        .create_timeout(Some(options.postgres_timeout))
        .recycle_timeout(Some(options.postgres_timeout))
        .build()
        .map_err(|e| ReaderError::Options(format!("cannot build the Postgres pool: {e}")))
}

/// A Redis Cluster: redis-rs's cluster client, connected at the first use.
#[cfg(feature = "cluster")]
fn cluster_link(
    seeds: Vec<String>,
    roots: &Option<RedisRoots>,
    options: &ReaderOptions,
) -> Result<RedisLink, ReaderError> {
    let client = crate::config::redis_cluster_builder(&seeds, roots.as_ref())
        .map_err(ReaderError::RedisConfig)?
        .connection_timeout(options.redis_timeout)
        .response_timeout(options.redis_timeout)
        .build()
        .map_err(ReaderError::RedisConfig)?;
    Ok(RedisLink::cluster(client))
}

#[cfg(not(feature = "cluster"))]
fn cluster_link(
    _seeds: Vec<String>,
    _roots: &Option<RedisRoots>,
    _options: &ReaderOptions,
) -> Result<RedisLink, ReaderError> {
    Err(ReaderError::Options(
        "redis.cluster = true needs pgcache's `cluster` feature, which this build leaves out"
            .to_string(),
    ))
}

/// A connection that reconnects by itself. No retries inside a command: while Redis is
/// down, each lookup fails fast and reads Postgres, and the next command tries again.
fn connect_redis(
    url: &str,
    roots: Option<&RedisRoots>,
    options: &ReaderOptions,
) -> Result<ConnectionManager, ReaderError> {
    let client = redis_client(url, roots).map_err(ReaderError::RedisConfig)?;
    ConnectionManager::new_lazy_with_config(client, manager_config(options))
        .map_err(ReaderError::RedisConfig)
}

fn manager_config(options: &ReaderOptions) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(options.redis_timeout))
        .set_response_timeout(Some(options.redis_timeout))
        .set_number_of_retries(0)
}
