//! The config file: TOML plus `PGCACHE__SECTION__KEY` environment overrides, validated
//! into typed structs before anything connects.
//!
//! Validation collects every problem and reports them together, each naming its key
//! (`tables[1].key: ...`) and, for values that came from the environment, the variable.
//! Reading goes key by key over the merged tree rather than through `serde` derives,
//! because a derive stops at the first error. Connection URLs are [`Secret`]s and every
//! message is passed through [`redact`], so passwords never reach a log.
//!
//! Reading the file (`Config::load`, `Config::from_toml_str`) needs the `config-file`
//! feature (on with the default `daemon` feature); the types are always there, so that
//! [`TableRule`]s and a [`Config`] can be built in code.

#[cfg(feature = "config-file")]
mod file;
mod redis_tls;
#[cfg(feature = "config-file")]
mod redis_topology;
mod secret;
#[cfg(feature = "config-file")]
mod tables;
#[cfg(feature = "config-file")]
mod tree;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[cfg(feature = "cluster")]
pub use self::redis_tls::redis_cluster_builder;
pub use self::redis_tls::{redis_client, RedisRoots};
pub use self::secret::{redact, Secret};
use crate::encoder::EncodeOptions;
use crate::template::KeyTemplate;

/// Prefix of the environment variables that override config keys; `__` separates levels.
pub const ENV_PREFIX: &str = "PGCACHE";
#[cfg(feature = "config-file")]
const ENV_SEPARATOR: &str = "__";
/// How the `config` crate marks values that came from the environment.
#[cfg(feature = "config-file")]
const ENV_ORIGIN: &str = "the environment";

/// Key prefix that pgcache keeps for its own keys (the checkpoint), so no table may use it.
pub const RESERVED_KEY_PREFIX: &str = "pgcache:";

pub const DEFAULT_SLOT: &str = "pgcache";
pub const DEFAULT_PUBLICATION: &str = "pgcache";
pub const DEFAULT_MAX_BATCH_CHANGES: usize = 10_000;
/// On a Redis Cluster each batch pays a check and a checkpoint write in every hash slot it
/// touches, and with keys spread over the slots a batch of 10,000 changes touches ~6,850 of
/// them: bigger batches spread that over more changes (`max_batch_bytes` still bounds
/// memory). Batches only grow this large while the daemon catches up.
pub const DEFAULT_CLUSTER_MAX_BATCH_CHANGES: usize = 50_000;
pub const DEFAULT_MAX_TRANSACTION_CHANGES: usize = 20_000;
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9187";
pub const DEFAULT_METRICS_MAX_CONNECTIONS: usize = 64;
pub const DEFAULT_METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_METRICS_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub reader: ReaderConfig,
    pub apply: ApplyConfig,
    pub backfill: BackfillConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    /// In file order; table names and key prefixes are unique.
    pub tables: Vec<TableRule>,
}

#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// A `postgres://` URL or a libpq key-value string.
    pub url: Secret,
    /// Replication slot name: `[a-z0-9_]{1,63}`.
    pub slot: String,
    pub publication: String,
    /// When the slot is gone (a failover to a server without it) or Postgres invalidated it
    /// (`max_slot_wal_keep_size`, `idle_replication_slot_timeout`): create it again and
    /// rebuild the cache (drop the cached keys, backfill every mirror table) instead of
    /// stopping with an error.
    pub recreate_lost_slot: bool,
    /// Ask Postgres to stream large transactions while they are in progress (pgoutput
    /// protocol version 2, `streaming 'on'`, Postgres 14+) instead of holding them, spilled
    /// to its disk, until they commit. The daemon spools the blocks to `apply.spool_dir`
    /// and applies them at commit. Default on.
    pub streaming: bool,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://`, `rediss://` (TLS), or a Unix socket (`redis+unix://`, `unix://`): the
    /// one server. With [`RedisTopology::Cluster`], the first seed; with
    /// [`RedisTopology::Sentinel`], the first sentinel.
    pub url: Secret,
    /// Prepended to every key pgcache writes, including the checkpoint.
    pub key_prefix: String,
    /// What vouches for a `rediss://` server: required with TLS, refused without.
    pub tls_ca_file: Option<RedisRoots>,
    /// One server, a Redis Cluster, or a Sentinel-managed master.
    pub topology: RedisTopology,
    /// `wait_replicas = N`: after each write the daemon runs `WAIT N` and confirms
    /// Postgres only once N replicas hold the write, so a failover to one of them loses
    /// nothing. `None`: no wait.
    pub wait_replicas: Option<usize>,
}

/// What `[redis]` points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTopology {
    /// One server at `url` (the default).
    Single,
    /// `cluster = true`: a Redis Cluster, whose slots and nodes are discovered from the seeds
    /// (`url`, or every entry of `urls`). Every seed has the same scheme and login, and
    /// database 0 (the only one a cluster has).
    Cluster { seeds: Vec<Secret> },
    /// `[redis.sentinel]`: the master that the sentinels name.
    Sentinel(SentinelConfig),
}

/// `[redis.sentinel]`: where the sentinels are and which master they watch. `Debug`
/// hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelConfig {
    /// The name the sentinels monitor the master under (`SENTINEL MONITOR <master> ...`).
    pub master: String,
    /// The sentinels, `redis://host:26379` (with the sentinels' own login if they need
    /// one); `rediss://` makes the master's connection TLS too.
    pub urls: Vec<Secret>,
    /// The master's ACL user, if it has one (the sentinels' is in their URLs).
    pub username: Option<String>,
    /// The master's password, if it needs one (`password`, or `password_file`).
    pub password: Option<Secret>,
    /// The master's database.
    pub db: u32,
}

impl fmt::Debug for SentinelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelConfig")
            .field("master", &self.master)
            .field("urls", &self.urls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .finish()
    }
}

impl RedisConfig {
    /// A redis-rs client for the one server, checking a TLS server against `tls_ca_file`.
    ///
    /// # Errors
    /// The URL is invalid or the CA file cannot be read, or `[redis]` names a cluster or
    /// sentinels (see [`single_only`](Self::single_only)).
    pub fn client(&self) -> redis::RedisResult<redis::Client> {
        if let Err(message) = self.single_only("this command") {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "unsupported Redis topology",
                message,
            )));
        }
        redis_client(self.url.expose(), self.tls_ca_file.as_ref())
    }

    /// A client for the server to write to: the one server, or the master the sentinels
    /// name now (asked again at every call: after a failover, the new one).
    ///
    /// # Errors
    /// As [`client`](Self::client); with sentinels, no sentinel named a working master; a
    /// cluster is refused.
    pub async fn resolve(&self) -> redis::RedisResult<redis::Client> {
        match &self.topology {
            RedisTopology::Sentinel(sentinel) => {
                crate::sentinel::master_client(sentinel, self.tls_ca_file.as_ref()).await
            }
            _ => self.client(),
        }
    }

    /// `Ok` for one server and for a Sentinel-managed master; for a cluster, the message
    /// that `what` does not support it.
    ///
    /// # Errors
    /// The message, for [`RedisTopology::Cluster`].
    pub fn single_or_sentinel(&self, what: &str) -> Result<(), String> {
        match self.topology {
            RedisTopology::Cluster { .. } => self.single_only(what),
            _ => Ok(()),
        }
    }

    /// `Ok` for one server; for a cluster or sentinels, the message that `what` does not
    /// support them yet, naming what does.
    ///
    /// # Errors
    /// The message, for [`RedisTopology::Cluster`] and [`RedisTopology::Sentinel`].
    pub fn single_only(&self, what: &str) -> Result<(), String> {
        match &self.topology {
            RedisTopology::Single => Ok(()),
            RedisTopology::Cluster { .. } => Err(format!(
                "redis.cluster = true (Redis Cluster) is not supported by {what}: it needs \
                 redis.url of one server (the daemon, check, verify, status and the read \
                 helper run on a cluster)"
            )),
            RedisTopology::Sentinel(_) => Err(format!(
                "[redis.sentinel] (Redis Sentinel) is not supported by {what}: it needs \
                 redis.url of one server (the daemon, check, verify, status and the read helper \
                 follow the master the sentinels name)"
            )),
        }
    }
}

/// `[reader]`: what [`Reader::from_config`](crate::Reader::from_config) uses instead of the
/// daemon's settings, so applications need not hold the replication credential.
#[derive(Debug, Clone, Default)]
pub struct ReaderConfig {
    /// The read helper's Postgres connection (a role with SELECT on the cached tables only,
    /// see `sql/reader_role.sql`); `None`: `postgres.url`.
    pub url: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyConfig {
    /// Flush a batch at a transaction boundary once it holds this many changes. Default
    /// [`DEFAULT_MAX_BATCH_CHANGES`], and on a Redis Cluster
    /// [`DEFAULT_CLUSTER_MAX_BATCH_CHANGES`].
    pub max_batch_changes: usize,
    /// A larger transaction is applied in several MULTI/EXECs: this caps atomicity, not
    /// correctness (the checkpoint still moves only after a whole transaction).
    pub max_transaction_changes: usize,
    /// Hold confirmations to Postgres back this long after EXEC, for a Redis that fsyncs
    /// its append-only file only every second.
    pub confirm_delay: Duration,
    /// Write a batch once it holds this many bytes of values, and stop reading the stream
    /// while one this large waits for the write before it: memory is bounded by bytes.
    pub max_batch_bytes: usize,
    /// A transaction holding more bytes than this is written in parts, like one over
    /// `max_transaction_changes`.
    pub max_transaction_bytes: usize,
    /// A streamed transaction whose spooled changes (pgoutput bytes) are at most this large
    /// is applied in one EXEC, whatever `max_transaction_changes` and
    /// `max_transaction_bytes` say: atomic, at the cost of holding its Redis commands in
    /// memory (several times this size at peak: G8 is bounded by this setting for such a
    /// transaction) and Redis busy with that one EXEC. A larger one is applied in parts like
    /// any other large transaction.
    pub max_spool_bytes: usize,
    /// Where streamed transactions are spooled until they commit or abort (one file each);
    /// `None`: `pgcache-spool-<slot>-<hash of the server>` in the system's temporary
    /// directory (see [`ApplyConfig::spool_dir_for`]); a relative path
    /// is taken from the config file's directory. Emptied when a session starts: Postgres sends again, in full, every transaction not confirmed.
    pub spool_dir: Option<PathBuf>,
}

/// `[backfill]`: the initial load and resyncs of `mirror` tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillConfig {
    /// Rows read per chunk (keyset pagination by primary key); bounds the daemon's memory
    /// with `max_chunk_bytes`. Default [`DEFAULT_BACKFILL_CHUNK_ROWS`], and on a Redis
    /// Cluster [`DEFAULT_CLUSTER_BACKFILL_CHUNK_ROWS`].
    pub chunk_rows: usize,
    /// Backfill `mirror` tables automatically: on first start, when Redis lost its data,
    /// and for tables added to the config later. `pgcache resync` works either way.
    pub auto: bool,
    /// A chunk stops taking rows once its values hold this many bytes (wide rows), and the
    /// next chunks are sized from the rows seen.
    pub max_chunk_bytes: usize,
}

pub const DEFAULT_BACKFILL_CHUNK_ROWS: usize = 5_000;
/// On a Redis Cluster a chunk's rows spread over up to 16,384 hash slots, each a command of
/// its own (one `MSET` per slot), so bigger chunks put more rows in each: 50,000 rows of
/// ~150 bytes make ~3 a slot and ~7.5 MB (`max_chunk_bytes` still bounds wide rows).
pub const DEFAULT_CLUSTER_BACKFILL_CHUNK_ROWS: usize = 50_000;
pub const DEFAULT_MAX_BATCH_BYTES: usize = 8 << 20;
pub const DEFAULT_MAX_TRANSACTION_BYTES: usize = 8 << 20;
pub const DEFAULT_MAX_SPOOL_BYTES: usize = 16 << 20;
pub const DEFAULT_MAX_CHUNK_BYTES: usize = 16 << 20;

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            chunk_rows: DEFAULT_BACKFILL_CHUNK_ROWS,
            auto: true,
            max_chunk_bytes: DEFAULT_MAX_CHUNK_BYTES,
        }
    }
}

impl ApplyConfig {
    /// The spool directory for `slot` on the server `source` (a URL without its password):
    /// `spool_dir`, or `pgcache-spool-<slot>-<hash of source>` in the system's temporary
    /// directory, so daemons of different servers on one host never share one (a session
    /// empties its directory when it starts).
    pub fn spool_dir_for(&self, slot: &str, source: &str) -> PathBuf {
        self.spool_dir.clone().unwrap_or_else(|| {
            // FNV-1a: stable across builds, so a new binary still finds the old files.
            let hash = source.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            std::env::temp_dir().join(format!("pgcache-spool-{slot}-{hash:016x}"))
        })
    }
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            max_batch_changes: DEFAULT_MAX_BATCH_CHANGES,
            max_transaction_changes: DEFAULT_MAX_TRANSACTION_CHANGES,
            confirm_delay: Duration::ZERO,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_transaction_bytes: DEFAULT_MAX_TRANSACTION_BYTES,
            max_spool_bytes: DEFAULT_MAX_SPOOL_BYTES,
            spool_dir: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Prometheus endpoint; `None` when disabled with `listen = ""`.
    pub listen: Option<SocketAddr>,
    /// Connections served at once; past it, the oldest connection that has not yet sent
    /// its request is closed to make room.
    pub max_connections: usize,
    /// How long a client gets to send its request head.
    pub header_timeout: Duration,
    /// How long a connection may last in all, the response included.
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter: a level (`info`) or directives (`info,pgcache=debug`).
    pub level: String,
}

/// How a table's changes reach Redis (the README's "Table modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// SET on insert/update, DEL on delete: the whole table is cached.
    Mirror,
    /// SET XX KEEPTTL: update only keys that are already cached.
    Refresh,
    /// DEL on every change: for values the application builds itself.
    Invalidate,
}

/// How a row is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per key.
    Json,
    /// One Redis hash per key, a field per column.
    Hash,
}

/// One `[[tables]]` entry.
#[derive(Debug, Clone)]
pub struct TableRule {
    pub schema: String,
    pub name: String,
    pub key: KeyTemplate,
    /// The columns to store, in this order; `None` for all columns of the table.
    pub columns: Option<Vec<String>>,
    pub mode: Mode,
    /// Set on every write in mirror mode and on fills by the read helper; at least 1ms.
    pub ttl: Option<Duration>,
    pub format: Format,
    pub encode: EncodeOptions,
    /// `[[tables.invalidate]]`: keys of values built elsewhere (a user's order list, a
    /// page) that every change to this table deletes, rendered from the new row and from
    /// the old one. Empty when the table has none.
    pub invalidate: Vec<InvalidateRule>,
}

/// One `[[tables.invalidate]]` entry: a key that a change to the table deletes (with its
/// lease, so a [`Reader::get_with`](crate::Reader::get_with) fill that began before the
/// change loses).
#[derive(Debug, Clone)]
pub struct InvalidateRule {
    /// Rendered from the changed row's columns, as a table key is (the Redis key prefix
    /// first, values escaped).
    pub key: KeyTemplate,
}

impl InvalidateRule {
    /// A rule deleting the keys rendered from `template` (`user:{user_id}:orders`).
    ///
    /// # Errors
    /// The template does not parse.
    pub fn new(template: &str) -> Result<InvalidateRule, crate::template::TemplateError> {
        Ok(InvalidateRule {
            key: KeyTemplate::parse(template)?,
        })
    }

    /// `SCAN MATCH` patterns for every key this rule can render, and their leases: what a
    /// TRUNCATE, or a table whose changes stop reaching the daemon, must drop, since the
    /// rows are not there to render the keys from.
    pub fn patterns(&self, key_prefix: &str) -> Vec<String> {
        let glob = self.key.glob(key_prefix);
        let lease = crate::template::LEASE_SUFFIX;
        vec![
            glob.clone(),
            format!("{{{glob}}}{lease}"),
            format!("{glob}{lease}"),
        ]
    }
}

impl TableRule {
    /// Every `SCAN MATCH` pattern of this table's invalidation keys (see
    /// [`InvalidateRule::patterns`]); empty when it has none.
    pub fn invalidation_patterns(&self, key_prefix: &str) -> Vec<String> {
        self.invalidate
            .iter()
            .flat_map(|rule| rule.patterns(key_prefix))
            .collect()
    }

    /// Lua patterns of every key a reader may fill for this table: its row keys and the
    /// keys of its `[[tables.invalidate]]` rules. While the table is stopped the daemon
    /// lists them in the checkpoint's `stopped` field, and `fill.lua` refuses those fills.
    pub fn fill_patterns(&self, key_prefix: &str) -> Vec<String> {
        std::iter::once(&self.key)
            .chain(self.invalidate.iter().map(|rule| &rule.key))
            .map(|template| template.lua_pattern(key_prefix))
            .collect()
    }

    /// `SCAN MATCH` patterns of the leases of this table's row keys (not the keys).
    pub fn lease_patterns(&self, key_prefix: &str) -> Vec<String> {
        let glob = self.key.glob(key_prefix);
        let lease = crate::template::LEASE_SUFFIX;
        vec![format!("{{{glob}}}{lease}"), format!("{glob}{lease}")]
    }

    /// `schema.name`, e.g. `public.users`.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// `<key_prefix><literal prefix of the template>`: every key of this table starts so.
    pub fn key_space(&self, key_prefix: &str) -> String {
        format!("{key_prefix}{}", self.key.literal_prefix())
    }

    /// The literal start of every key of this table (without the Redis key prefix).
    pub fn key_prefix_literal(&self) -> &str {
        self.key.literal_prefix()
    }
}

/// Everything wrong with a config, one problem per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .errors.join("\n"))]
pub struct ConfigError {
    errors: Vec<String>,
}

impl ConfigError {
    #[cfg(feature = "config-file")]
    fn new(errors: Vec<String>) -> ConfigError {
        ConfigError {
            errors: errors.iter().map(|e| redact(e)).collect(),
        }
    }

    /// Each problem, naming its key.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }
}

impl Config {
    /// The rule for a table, if it is configured.
    pub fn table(&self, schema: &str, name: &str) -> Option<&TableRule> {
        self.tables
            .iter()
            .find(|t| t.schema == schema && t.name == name)
    }

    /// The rule for a table by its qualified name (`public.users`), if it is configured.
    pub fn table_named(&self, qualified: &str) -> Option<&TableRule> {
        self.tables.iter().find(|t| t.qualified_name() == qualified)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Mirror => "mirror",
            Mode::Refresh => "refresh",
            Mode::Invalidate => "invalidate",
        })
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Json => "json",
            Format::Hash => "hash",
        })
    }
}

#[cfg(all(test, feature = "config-file"))]
mod props;
#[cfg(all(test, feature = "config-file"))]
mod tests;
