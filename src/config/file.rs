//! Reading the config file: TOML merged with `PGCACHE__SECTION__KEY` environment variables by
//! the `config` crate, then read key by key into [`Config`]. Behind the `config-file`
//! feature.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use config::{Map, Value};

use super::redis_tls::{self, RedisRoots};
use super::redis_topology::read_topology;
use super::secret::{redact, Secret};
use super::tables::read_tables;
use super::tree::{duration, is_env_override, Field, Section};
use super::*;

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
    let (mut apply, batch_changes_set) = read_apply(section("apply", errors), base_dir, errors);
    let (mut backfill, chunk_rows_set) = read_backfill(section("backfill", errors), errors);
    let cluster = redis
        .as_ref()
        .is_some_and(|r| matches!(r.topology, RedisTopology::Cluster { .. }));
    if cluster && !chunk_rows_set {
        backfill.chunk_rows = DEFAULT_CLUSTER_BACKFILL_CHUNK_ROWS;
    }
    if cluster && !batch_changes_set {
        apply.max_batch_changes = DEFAULT_CLUSTER_MAX_BATCH_CHANGES;
    }
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
pub(super) fn read_url(
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
    let streaming = sec.bool("streaming", errors).unwrap_or(true);
    sec.finish(errors);
    Some(PostgresConfig {
        url: url?,
        slot: slot?,
        publication: publication?,
        recreate_lost_slot,
        streaming,
    })
}

pub(super) fn is_slot_name(s: &str) -> bool {
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
    let wait_replicas = sec.count("wait_replicas", errors).map(|n| n.value);
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
            wait_replicas,
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
        wait_replicas,
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
pub(super) fn redis_url_problem(url: &str) -> Option<&'static str> {
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

/// `[apply]`, and whether it sets `max_batch_changes` (the default depends on the topology).
fn read_apply(
    mut sec: Section,
    base_dir: Option<&Path>,
    errors: &mut Vec<String>,
) -> (ApplyConfig, bool) {
    let mut apply = ApplyConfig::default();
    let batch_changes = sec.count("max_batch_changes", errors);
    if let Some(n) = &batch_changes {
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
    if let Some(n) = sec.bytes("max_spool_bytes", errors) {
        apply.max_spool_bytes = n;
    }
    if let Some(dir) = sec.string("spool_dir", errors) {
        if dir.value.is_empty() {
            errors.push(format!(
                "{}: is empty; leave it out for a directory in the system's temporary directory",
                dir.label
            ));
        } else {
            // Relative to the config file, like url_file.
            apply.spool_dir = Some(match base_dir {
                Some(base) => base.join(&dir.value),
                None => PathBuf::from(&dir.value),
            });
        }
    }
    sec.finish(errors);
    (apply, batch_changes.is_some())
}

/// `[backfill]`, and whether it sets `chunk_rows` (the default depends on the topology).
fn read_backfill(mut sec: Section, errors: &mut Vec<String>) -> (BackfillConfig, bool) {
    let mut backfill = BackfillConfig::default();
    let chunk_rows = sec.count("chunk_rows", errors);
    if let Some(n) = &chunk_rows {
        backfill.chunk_rows = n.value;
    }
    if let Some(auto) = sec.bool("auto", errors) {
        backfill.auto = auto;
    }
    if let Some(n) = sec.bytes("max_chunk_bytes", errors) {
        backfill.max_chunk_bytes = n;
    }
    sec.finish(errors);
    (backfill, chunk_rows.is_some())
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
