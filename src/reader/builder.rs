//! Building a [`Reader`]: its options, the Postgres pool and the Redis connection.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Pool, Runtime};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::flight::Flights;
use super::refresh::FillTimer;
use super::source::RowSource;
use super::stats::Counters;
use super::{Inner, Reader, ReaderError, TableEntry};
use crate::config::{redis_client, Format, Mode, RedisRoots, TableRule};
use crate::encoder::EncodeOptions;
use crate::pgconn::{self, PgTarget};
use crate::template::KeyTemplate;

/// Tuning of a [`Reader`]; the defaults suit most applications.
#[derive(Debug, Clone)]
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
            max_lag_wait: Duration::from_secs(1),
            max_write_wait: Duration::from_secs(5),
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

/// Builds a [`Reader`] without a config file.
pub struct ReaderBuilder {
    postgres_url: String,
    redis_url: String,
    redis: Option<ConnectionManager>,
    pool: Option<Pool>,
    redis_roots: Option<RedisRoots>,
    key_prefix: String,
    slot: String,
    rules: Vec<TableRule>,
    problems: Vec<String>,
    options: ReaderOptions,
}

impl ReaderBuilder {
    pub(super) fn new(postgres_url: &str, redis_url: &str) -> ReaderBuilder {
        ReaderBuilder {
            postgres_url: postgres_url.to_string(),
            redis_url: redis_url.to_string(),
            redis: None,
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
        let external_pool = self.pool.is_some();
        let pool = match self.pool {
            Some(pool) => pool,
            None => build_pool(&self.postgres_url, &self.options)?,
        };
        let redis = match self.redis {
            Some(redis) => redis,
            None => connect_redis(&self.redis_url, self.redis_roots.as_ref(), &self.options)?,
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
        let reader = Reader {
            inner: Arc::new(Inner {
                redis,
                pool,
                checkpoint_key: crate::checkpoint::checkpoint_key(&self.key_prefix, &self.slot),
                key_prefix: self.key_prefix,
                options: self.options,
                tables,
                names,
                flights: Flights::default(),
                lookups: Flights::default(),
                redis_ok: AtomicBool::new(true),
                applied_watch: super::written::AppliedWatch::new(),
                settings_checked: tokio::sync::OnceCell::new_with((!external_pool).then_some(())),
            }),
        };
        // Prepare in the background what the first miss would otherwise pay for (often a
        // stampede right after a deploy): a Postgres connection, each table's column list,
        // the lease scripts in Redis. A server that is down is no error here.
        let inner = Arc::downgrade(&reader.inner);
        tokio::spawn(async move {
            if let Some(inner) = inner.upgrade() {
                inner.warm_up().await;
            }
        });
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

/// A connection that reconnects by itself. No retries inside a command: while Redis is
/// down, each lookup fails fast and reads Postgres, and the next command tries again.
fn connect_redis(
    url: &str,
    roots: Option<&RedisRoots>,
    options: &ReaderOptions,
) -> Result<ConnectionManager, ReaderError> {
    let client = redis_client(url, roots).map_err(ReaderError::RedisConfig)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(options.redis_timeout))
        .set_response_timeout(Some(options.redis_timeout))
        .set_number_of_retries(0);
    ConnectionManager::new_lazy_with_config(client, config).map_err(ReaderError::RedisConfig)
}
