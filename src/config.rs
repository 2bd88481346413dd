//! The config file: TOML plus `PGCACHE__SECTION__KEY` environment overrides, validated
//! into typed structs before anything connects.
//!
//! Validation collects every problem and reports them together, each naming its key
//! (`tables[1].key: ...`) and, for values that came from the environment, the variable.
//! Reading goes key by key over the merged tree rather than through `serde` derives,
//! because a derive stops at the first error. Connection URLs are [`Secret`]s and every
//! message is passed through [`redact`], so passwords never reach a log.

mod redis_tls;
mod redis_topology;
mod secret;
mod tables;
mod tree;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Map, Value};

pub use self::redis_tls::{redis_client, RedisRoots};
use self::redis_topology::read_topology;
pub use self::secret::{redact, Secret};
use self::tables::read_tables;
use self::tree::{duration, is_env_override, Field, Section};
use crate::encoder::EncodeOptions;
use crate::template::KeyTemplate;

/// Prefix of the environment variables that override config keys; `__` separates levels.
pub const ENV_PREFIX: &str = "PGCACHE";
const ENV_SEPARATOR: &str = "__";
/// How the `config` crate marks values that came from the environment.
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

    /// `Ok` for one server; for a cluster or sentinels, the message that `what` does not
    /// support them yet, naming what does.
    ///
    /// # Errors
    /// The message, for [`RedisTopology::Cluster`] and [`RedisTopology::Sentinel`].
    pub fn single_only(&self, what: &str) -> Result<(), String> {
        let (setting, so_far) = match &self.topology {
            RedisTopology::Single => return Ok(()),
            RedisTopology::Cluster { .. } => (
                "redis.cluster = true (Redis Cluster)",
                "on a cluster only `pgcache check` works so far",
            ),
            RedisTopology::Sentinel(_) => (
                "[redis.sentinel] (Redis Sentinel)",
                "the Sentinel form is only read and validated so far",
            ),
        };
        Err(format!(
            "{setting} is not supported by {what} yet: the daemon, the read helper, verify and \
             status work with one Redis server (redis.url); {so_far} (see docs/cluster.md)"
        ))
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
    /// Reads the file at `path`, applies `PGCACHE__...` variables from the process
    /// environment, and validates. Relative `url_file` paths are relative to the file.
    ///
    /// # Errors
    /// The file cannot be read or is not TOML, or any key is missing, unknown or invalid.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(vec![format!(
                "cannot read config file {}: {e}",
                path.display()
            )])
        })?;
        let mut env = Vec::new();
        let mut errors = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            if !is_env_override(name) {
                continue;
            }
            match value.into_string() {
                Ok(value) => env.push((name.to_string(), value)),
                Err(_) => errors.push(format!("{name}: value is not valid UTF-8")),
            }
        }
        if !errors.is_empty() {
            return Err(ConfigError::new(errors));
        }
        Self::build(
            &text,
            &format!("config file {}", path.display()),
            path.parent(),
            env,
        )
    }

    /// Parses and validates TOML text without looking at the environment (for tests).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn from_toml_str(s: &str) -> Result<Config, ConfigError> {
        Self::build(s, "config", None, Vec::new())
    }

    /// Like [`Config::load`], but with the given variables instead of the process
    /// environment, e.g. `("PGCACHE__REDIS__URL", "redis://...")`.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn from_toml_str_with_env(
        s: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Self::build(s, "config", None, vars.into_iter().collect())
    }

    /// The rule for a table, if it is configured.
    pub fn table(&self, schema: &str, name: &str) -> Option<&TableRule> {
        self.tables
            .iter()
            .find(|t| t.schema == schema && t.name == name)
    }

    fn build(
        text: &str,
        what: &str,
        base_dir: Option<&Path>,
        env: Vec<(String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut errors = Vec::new();
        let mut overrides = HashMap::new();
        for (name, value) in env {
            if !is_env_override(&name) {
                continue;
            }
            if name.to_ascii_uppercase().starts_with("PGCACHE__TABLES") {
                errors.push(format!(
                    "{name}: tables cannot be set from the environment; edit the config file"
                ));
            } else {
                overrides.insert(name, value);
            }
        }
        let merged = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .separator(ENV_SEPARATOR)
                    .source(Some(overrides)),
            )
            .build()
            // collect() keeps each value's origin, which labels environment overrides;
            // deserializing would drop it.
            .and_then(|c| config::Source::collect(&c));
        let root = match merged {
            Ok(root) => root,
            Err(config::ConfigError::FileParse { cause, .. }) => {
                errors.push(format!(
                    "{what} is not valid TOML: {}",
                    cause.to_string().trim_end()
                ));
                return Err(ConfigError::new(errors));
            }
            Err(e) => {
                errors.push(format!("{what}: {e}"));
                return Err(ConfigError::new(errors));
            }
        };
        let config = read_config(root, base_dir, &mut errors);
        match config {
            Some(config) if errors.is_empty() => Ok(config),
            _ => Err(ConfigError::new(errors)),
        }
    }
}

fn read_config(
    mut root: Map<String, Value>,
    base_dir: Option<&Path>,
    errors: &mut Vec<String>,
) -> Option<Config> {
    let mut section =
        |name: &str, errors: &mut Vec<String>| Section::new(name, root.remove(name), errors);
    let postgres = read_postgres(section("postgres", errors), base_dir, errors);
    let redis = read_redis(section("redis", errors), base_dir, errors);
    let reader = read_reader(section("reader", errors), base_dir, errors);
    let apply = read_apply(section("apply", errors), errors);
    let backfill = read_backfill(section("backfill", errors), errors);
    let metrics = read_metrics(section("metrics", errors), errors);
    let log = read_log(section("log", errors), errors);
    let tables = read_tables(root.remove("tables"), errors);
    Section {
        path: String::new(),
        map: root,
    }
    .finish(errors);
    Some(Config {
        postgres: postgres?,
        redis: redis?,
        reader,
        apply,
        backfill,
        metrics,
        log,
        tables,
    })
}

/// `url`, or `url_file` naming a file that holds it (a mounted secret).
fn read_url(
    sec: &mut Section,
    base_dir: Option<&Path>,
    errors: &mut Vec<String>,
) -> Option<Field<String>> {
    let url = sec.string("url", errors);
    let file = sec.string("url_file", errors);
    match (url, file) {
        (Some(url), Some(file)) => {
            errors.push(format!(
                "{} and {}: set one of them, not both",
                url.label, file.label
            ));
            None
        }
        (Some(url), None) => Some(url),
        (None, Some(file)) => {
            let path = match base_dir {
                Some(dir) => dir.join(&file.value),
                None => PathBuf::from(&file.value),
            };
            match std::fs::read_to_string(&path) {
                Ok(text) => Some(Field {
                    value: text.trim().to_string(),
                    label: format!("{} ({})", file.label, path.display()),
                }),
                Err(e) => {
                    errors.push(format!(
                        "{}: cannot read {}: {e}",
                        file.label,
                        path.display()
                    ));
                    None
                }
            }
        }
        (None, None) => {
            let path = sec.path_of("url");
            let var = format!(
                "{ENV_PREFIX}{ENV_SEPARATOR}{}",
                path.replace('.', ENV_SEPARATOR)
            )
            .to_ascii_uppercase();
            errors.push(format!(
                "{path}: missing (set {path}, {path}_file or {var})"
            ));
            None
        }
    }
}

/// A Postgres connection string, checked as the connections will read it.
fn postgres_url(url: Field<String>, errors: &mut Vec<String>) -> Option<Secret> {
    use crate::pgconn::{parse_connection_string, PgTargetError};
    let problem = match parse_connection_string(&url.value) {
        Ok((parsed, _)) if parsed.get_hosts().is_empty() => Some("names no host".to_string()),
        Ok(_) => None,
        Err(PgTargetError::Invalid(cause)) => {
            Some(format!("is not a valid connection string ({cause})"))
        }
        Err(other) => Some(format!("is not usable: {other}")),
    };
    match problem {
        Some(problem) => {
            errors.push(format!(
                "{}: {:?} {problem} (examples: postgres://user@host/db, host=/run/postgresql dbname=app)",
                url.label,
                redact(&url.value)
            ));
            None
        }
        None => Some(Secret::new(url.value)),
    }
}

fn read_postgres(
    mut sec: Section,
    base_dir: Option<&Path>,
    errors: &mut Vec<String>,
) -> Option<PostgresConfig> {
    let url = read_url(&mut sec, base_dir, errors).and_then(|url| postgres_url(url, errors));
    let slot = sec.string("slot", errors);
    let slot = match slot {
        Some(s) if !is_slot_name(&s.value) => {
            errors.push(format!(
                "{}: {:?} is not a replication slot name (1 to 63 of a-z, 0-9 and _)",
                s.label, s.value
            ));
            None
        }
        Some(s) => Some(s.value),
        None => Some(DEFAULT_SLOT.to_string()),
    };
    let publication = match sec.string("publication", errors) {
        Some(p)
            if p.value.is_empty()
                || p.value.len() > 63
                || p.value.chars().any(char::is_control) =>
        {
            errors.push(format!(
                "{}: {:?} is not a publication name (1 to 63 bytes, no control characters)",
                p.label, p.value
            ));
            None
        }
        Some(p) => Some(p.value),
        None => Some(DEFAULT_PUBLICATION.to_string()),
    };
    let recreate_lost_slot = sec.bool("recreate_lost_slot", errors).unwrap_or(false);
    sec.finish(errors);
    Some(PostgresConfig {
        url: url?,
        slot: slot?,
        publication: publication?,
        recreate_lost_slot,
    })
}

fn is_slot_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

fn read_redis(
    mut sec: Section,
    base_dir: Option<&Path>,
    errors: &mut Vec<String>,
) -> Option<RedisConfig> {
    let ca = sec.string("tls_ca_file", errors);
    let tls_ca_file = match &ca {
        Some(f) if f.value.is_empty() => None,
        Some(f) => Some(RedisRoots::from_setting(&f.value, base_dir)),
        None => None,
    };
    if let (Some(ca), Some(RedisRoots::File(path))) = (&ca, &tls_ca_file) {
        if let Err(e) = std::fs::metadata(path) {
            errors.push(format!("{}: cannot read {}: {e}", ca.label, path.display()));
        }
    }
    let cluster = sec.bool("cluster", errors).unwrap_or(false);
    let has_urls = sec.map.contains_key("urls");
    let has_sentinel = sec.map.contains_key("sentinel");
    if cluster || has_urls || has_sentinel {
        let (url, topology) =
            read_topology(&mut sec, cluster, tls_ca_file.as_ref(), base_dir, errors)?;
        let key_prefix = match sec.string("key_prefix", errors) {
            Some(p)
                if matches!(topology, RedisTopology::Cluster { .. })
                    && p.value.contains(['{', '}']) =>
            {
                errors.push(format!(
                    "{}: {:?} holds a brace; on a Redis Cluster a hash tag in the prefix would put \
                     every key, and every slot's checkpoint, in one hash slot (leave braces out)",
                    p.label, p.value
                ));
                String::new()
            }
            Some(p) => p.value,
            None => String::new(),
        };
        sec.finish(errors);
        return Some(RedisConfig {
            url,
            key_prefix,
            tls_ca_file,
            topology,
        });
    }
    let url =
        read_url(&mut sec, base_dir, errors).and_then(|url| match redis_url_problem(&url.value) {
            Some(problem) => {
                errors.push(format!("{}: {:?} {problem}", url.label, redact(&url.value)));
                None
            }
            None => Some(Secret::new(url.value)),
        });
    let key_prefix = sec
        .string("key_prefix", errors)
        .map(|p| p.value)
        .unwrap_or_default();
    let url =
        url.and_then(
            |url| match redis_tls::tls_problem(url.expose(), tls_ca_file.as_ref()) {
                Some(problem) => {
                    errors.push(format!("{}: {problem}", sec.path_of("url")));
                    None
                }
                None => Some(url),
            },
        );
    sec.finish(errors);
    Some(RedisConfig {
        url: url?,
        key_prefix,
        tls_ca_file,
        topology: RedisTopology::Single,
    })
}

/// `[reader]`: all optional.
fn read_reader(
    mut sec: Section,
    base_dir: Option<&Path>,
    errors: &mut Vec<String>,
) -> ReaderConfig {
    let given = sec.map.contains_key("url") || sec.map.contains_key("url_file");
    let url = if given {
        read_url(&mut sec, base_dir, errors).and_then(|url| postgres_url(url, errors))
    } else {
        None
    };
    sec.finish(errors);
    ReaderConfig { url }
}

/// What is wrong with a Redis URL, checked by hand: `redis::IntoConnectionInfo` rejects
/// `rediss://` when the crate is built without TLS, which is a build matter, not a config
/// one.
fn redis_url_problem(url: &str) -> Option<&'static str> {
    const EXAMPLES: &str = "is not a Redis URL (examples: redis://localhost:6379, rediss://host:6380/0, redis+unix:///run/redis.sock)";
    let Some((scheme, rest)) = url.split_once("://") else {
        return Some(EXAMPLES);
    };
    match scheme {
        "redis" | "rediss" => {}
        "redis+unix" | "unix" => {
            return (!rest.starts_with('/'))
                .then_some("is not a Redis socket URL (example: redis+unix:///run/redis.sock)");
        }
        _ => return Some(EXAMPLES),
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        // An IPv6 address: [::1]:6379.
        let Some((host, after)) = bracketed.split_once(']') else {
            return Some("has an unclosed '[' in its host");
        };
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return Some("has text after its IPv6 host"),
        }
    } else {
        match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Some("names no host");
    }
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Some("has a port that is not a number from 0 to 65535");
    }
    let db = path.strip_prefix('/').unwrap_or(path);
    let db = db.split(['?', '#']).next().unwrap_or_default();
    if !db.is_empty() && db.parse::<u32>().is_err() {
        return Some("has a database that is not a number (redis://host:6379/0)");
    }
    None
}

fn read_apply(mut sec: Section, errors: &mut Vec<String>) -> ApplyConfig {
    let mut apply = ApplyConfig::default();
    if let Some(n) = sec.count("max_batch_changes", errors) {
        apply.max_batch_changes = n.value;
    }
    if let Some(n) = sec.count("max_transaction_changes", errors) {
        apply.max_transaction_changes = n.value;
    }
    if let Some(d) = sec.string("confirm_delay", errors) {
        if let Some(d) = duration(&d, errors) {
            apply.confirm_delay = d;
        }
    }
    if let Some(n) = sec.bytes("max_batch_bytes", errors) {
        apply.max_batch_bytes = n;
    }
    if let Some(n) = sec.bytes("max_transaction_bytes", errors) {
        apply.max_transaction_bytes = n;
    }
    sec.finish(errors);
    apply
}

fn read_backfill(mut sec: Section, errors: &mut Vec<String>) -> BackfillConfig {
    let mut backfill = BackfillConfig::default();
    if let Some(n) = sec.count("chunk_rows", errors) {
        backfill.chunk_rows = n.value;
    }
    if let Some(auto) = sec.bool("auto", errors) {
        backfill.auto = auto;
    }
    if let Some(n) = sec.bytes("max_chunk_bytes", errors) {
        backfill.max_chunk_bytes = n;
    }
    sec.finish(errors);
    backfill
}

fn read_metrics(mut sec: Section, errors: &mut Vec<String>) -> MetricsConfig {
    let listen = sec.string("listen", errors).unwrap_or_else(|| Field {
        value: DEFAULT_METRICS_LISTEN.to_string(),
        label: String::new(),
    });
    let listen = if listen.value.is_empty() {
        None
    } else {
        match listen.value.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                errors.push(format!(
                    "{}: {:?} is not an IP address and port (examples: 127.0.0.1:9187, [::]:9187; \"\" disables metrics)",
                    listen.label, listen.value
                ));
                None
            }
        }
    };
    let max_connections = sec
        .count("max_connections", errors)
        .map_or(DEFAULT_METRICS_MAX_CONNECTIONS, |n| n.value);
    let mut timeout = |key: &str, default: Duration| match sec.string(key, errors) {
        Some(d) => match duration(&d, errors) {
            Some(t) if t.is_zero() => {
                errors.push(format!("{}: must be more than 0s", d.label));
                default
            }
            Some(t) => t,
            None => default,
        },
        None => default,
    };
    let header_timeout = timeout("header_timeout", DEFAULT_METRICS_HEADER_TIMEOUT);
    let request_timeout = timeout("request_timeout", DEFAULT_METRICS_REQUEST_TIMEOUT);
    sec.finish(errors);
    MetricsConfig {
        listen,
        max_connections,
        header_timeout,
        request_timeout,
    }
}

fn read_log(mut sec: Section, errors: &mut Vec<String>) -> LogConfig {
    let format = match sec.string("format", errors) {
        None => LogFormat::Human,
        Some(f) => match f.value.as_str() {
            "human" => LogFormat::Human,
            "json" => LogFormat::Json,
            other => {
                errors.push(format!(
                    "{}: unknown format {other:?} (expected human or json)",
                    f.label
                ));
                LogFormat::Human
            }
        },
    };
    let level = match sec.string("level", errors) {
        None => "info".to_string(),
        Some(l) => {
            let simple = !l.value.contains(['=', ',', '[']);
            let known = ["trace", "debug", "info", "warn", "error", "off"];
            if l.value.trim().is_empty()
                || (simple && !known.contains(&l.value.to_ascii_lowercase().as_str()))
            {
                errors.push(format!(
                    "{}: {:?} is not a log level (trace, debug, info, warn, error, off, or directives like info,pgcache=debug)",
                    l.label, l.value
                ));
            }
            l.value
        }
    };
    sec.finish(errors);
    LogConfig { format, level }
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

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
