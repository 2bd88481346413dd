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
mod secret;
#[cfg(feature = "config-file")]
mod tables;
#[cfg(feature = "config-file")]
mod tree;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

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
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://`, `rediss://` (TLS), or a Unix socket (`redis+unix://`, `unix://`).
    pub url: Secret,
    /// Prepended to every key pgcache writes, including the checkpoint.
    pub key_prefix: String,
    /// What vouches for a `rediss://` server: required with TLS, refused without.
    pub tls_ca_file: Option<RedisRoots>,
}

impl RedisConfig {
    /// A redis-rs client for this server, checking a TLS server against `tls_ca_file`.
    ///
    /// # Errors
    /// The URL is invalid or the CA file cannot be read.
    pub fn client(&self) -> redis::RedisResult<redis::Client> {
        redis_client(self.url.expose(), self.tls_ca_file.as_ref())
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
    /// Flush a batch at a transaction boundary once it holds this many changes.
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
}

/// `[backfill]`: the initial load and resyncs of `mirror` tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillConfig {
    /// Rows read per chunk (keyset pagination by primary key); bounds the daemon's memory.
    pub chunk_rows: usize,
    /// Backfill `mirror` tables automatically: on first start, when Redis lost its data,
    /// and for tables added to the config later. `pgcache resync` works either way.
    pub auto: bool,
    /// A chunk stops taking rows once its values hold this many bytes (wide rows), and the
    /// next chunks are sized from the rows seen.
    pub max_chunk_bytes: usize,
}

pub const DEFAULT_BACKFILL_CHUNK_ROWS: usize = 5_000;
pub const DEFAULT_MAX_BATCH_BYTES: usize = 8 << 20;
pub const DEFAULT_MAX_TRANSACTION_BYTES: usize = 8 << 20;
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

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            max_batch_changes: DEFAULT_MAX_BATCH_CHANGES,
            max_transaction_changes: DEFAULT_MAX_TRANSACTION_CHANGES,
            confirm_delay: Duration::ZERO,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_transaction_bytes: DEFAULT_MAX_TRANSACTION_BYTES,
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
