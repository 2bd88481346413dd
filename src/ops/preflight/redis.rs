//! The Redis side: reachable, recent enough, not evicting what must stay, and persistent
//! enough that what the daemon confirmed to Postgres survives a Redis restart.

use std::collections::HashMap;
use std::time::Duration;

use super::Finding;
use crate::config::{redact, Config, Mode, RedisTopology, SentinelConfig};

mod cluster;

/// How long `check` waits for Redis to answer before calling it unreachable.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Checks Redis. Never fails: an unreachable server is a FAIL finding.
pub async fn redis_findings(config: &Config) -> Vec<Finding> {
    match &config.redis.topology {
        RedisTopology::Single => {}
        RedisTopology::Cluster { seeds } => return cluster::cluster_findings(config, seeds).await,
        RedisTopology::Sentinel(sentinel) => {
            return sentinel_findings(config, sentinel).await;
        }
    }
    let mut conn = match connect(config).await {
        Ok(conn) => conn,
        Err(message) => {
            return vec![Finding::fail(
                format!("redis {} is not reachable: {message}", config.redis.url),
                "check redis.url and that Redis is running",
            )]
        }
    };
    let mut findings = vec![Finding::ok(format!("redis {} reachable", config.redis.url))];
    server_findings(config, &mut conn, &mut findings).await;
    findings
}

/// With sentinels: which master they name, and the same checks of it as of one server.
async fn sentinel_findings(config: &Config, sentinel: &SentinelConfig) -> Vec<Finding> {
    let client = match config.redis.resolve().await {
        Ok(client) => client,
        Err(e) => {
            return vec![Finding::fail(
                redact(&e.to_string()),
                "check redis.sentinel.urls and master (the name in SENTINEL MONITOR), and that \
                 the sentinels and the master run",
            )]
        }
    };
    let mut conn = match connect_client(&client).await {
        Ok(conn) => conn,
        Err(message) => {
            return vec![Finding::fail(
                format!("the master the sentinels name is not reachable: {message}"),
                "check that the master runs and the sentinels see it",
            )]
        }
    };
    let info = client.get_connection_info();
    let mut findings = vec![Finding::ok(format!(
        "the sentinels name {} as master {:?}",
        info.addr(),
        sentinel.master
    ))];
    server_findings(config, &mut conn, &mut findings).await;
    findings
}

/// The checks of one server (the one `redis.url` names, or the master the sentinels name):
/// its version, eviction policy and persistence.
async fn server_findings(
    config: &Config,
    conn: &mut redis::aio::MultiplexedConnection,
    findings: &mut Vec<Finding>,
) {
    findings.push(version_finding(conn).await);
    match config_get(conn, &["maxmemory-policy", "maxmemory"]).await {
        Ok(settings) => findings.push(eviction_finding(config, &settings)),
        Err(e) => findings.push(unreadable("maxmemory-policy", &e)),
    }
    match config_get(conn, &["appendonly", "appendfsync", "save"]).await {
        Ok(settings) => findings.push(persistence_finding(config, &settings)),
        Err(e) => findings.push(unreadable("persistence (appendonly, save)", &e)),
    }
}

async fn connect(config: &Config) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = config.redis.client().map_err(|e| redact(&e.to_string()))?;
    connect_client(&client).await
}

async fn connect_client(
    client: &redis::Client,
) -> Result<redis::aio::MultiplexedConnection, String> {
    let mut conn = tokio::time::timeout(TIMEOUT, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| format!("no answer within {TIMEOUT:?}"))?
        .map_err(|e| redact(&e.to_string()))?;
    tokio::time::timeout(TIMEOUT, redis::cmd("PING").query_async::<String>(&mut conn))
        .await
        .map_err(|_| format!("no answer to PING within {TIMEOUT:?}"))?
        .map_err(|e| redact(&e.to_string()))?;
    Ok(conn)
}

async fn config_get(
    conn: &mut redis::aio::MultiplexedConnection,
    names: &[&str],
) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for name in names {
        let reply: HashMap<String, String> = tokio::time::timeout(
            TIMEOUT,
            redis::cmd("CONFIG").arg("GET").arg(*name).query_async(conn),
        )
        .await
        .map_err(|_| format!("no answer to CONFIG GET within {TIMEOUT:?}"))?
        .map_err(|e| redact(&e.to_string()))?;
        out.extend(reply);
    }
    Ok(out)
}

/// Managed Redis services often disable CONFIG; the operator then checks by hand.
fn unreadable(what: &str, error: &str) -> Finding {
    Finding::warn(
        format!("cannot read Redis {what} with CONFIG GET: {error}"),
        "check by hand: maxmemory-policy noeviction (for mirror tables), appendonly yes with appendfsync always (or [apply] confirm_delay = \"1s\" with everysec)",
    )
}

async fn version_finding(conn: &mut redis::aio::MultiplexedConnection) -> Finding {
    let info: Result<String, _> = redis::cmd("INFO").arg("server").query_async(conn).await;
    let version = info.ok().and_then(|info| {
        info.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(|v| v.trim().to_string())
    });
    let Some(version) = version else {
        return Finding::warn(
            "cannot read the Redis version (INFO server)",
            "make sure Redis is 6.0 or newer (SET ... KEEPTTL)",
        );
    };
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major >= 6 {
        Finding::ok(format!("redis version {version}"))
    } else {
        Finding::fail(
            format!(
                "redis version {version} is too old: pgcache needs 6.0 or newer (SET ... KEEPTTL)"
            ),
            "upgrade Redis to 6.0 or newer",
        )
    }
}

/// An evicted mirror key stays missing until its row changes: mirror readers that only read
/// Redis would see the row as gone. The read helper falls back to Postgres on a miss, so
/// eviction is safe only if every application reads through it.
fn eviction_finding(config: &Config, settings: &HashMap<String, String>) -> Finding {
    let policy = settings
        .get("maxmemory-policy")
        .map(String::as_str)
        .unwrap_or("noeviction");
    let maxmemory: u64 = settings
        .get("maxmemory")
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let limit = if maxmemory == 0 {
        "no maxmemory limit yet".to_string()
    } else {
        format!("maxmemory {maxmemory} bytes")
    };
    let evictable: Vec<String> = config
        .tables
        .iter()
        .filter(|t| t.mode == Mode::Mirror)
        .filter(|t| {
            policy.starts_with("allkeys-") || (policy.starts_with("volatile-") && t.ttl.is_some())
        })
        .map(|t| t.qualified_name())
        .collect();
    if evictable.is_empty() {
        return Finding::ok(format!(
            "redis maxmemory-policy {policy} ({limit}) evicts no mirror table"
        ));
    }
    Finding::warn(
        format!(
            "redis maxmemory-policy {policy} ({limit}) may evict keys of mirror tables ({}){}: an evicted key stays missing until its row changes, which is safe only if every application reads through the fallback reader (pgcache::Reader reads Postgres on a miss)",
            evictable.join(", "),
            if policy.starts_with("allkeys-") {
                " and the checkpoint"
            } else {
                ""
            }
        ),
        "CONFIG SET maxmemory-policy noeviction (and maxmemory-policy noeviction in redis.conf); or read those tables only through pgcache::Reader; or use mode = \"refresh\" for tables that may be evicted",
    )
}

/// The slot forgets what the daemon confirmed. A Redis that loses acknowledged writes after
/// that loses them for good (or, without any persistence, makes the daemon backfill).
fn persistence_finding(config: &Config, settings: &HashMap<String, String>) -> Finding {
    let get = |name: &str| settings.get(name).map(String::as_str).unwrap_or("");
    let aof = get("appendonly") == "yes";
    let fsync = get("appendfsync");
    let save = get("save").trim();
    let delay = config.apply.confirm_delay;
    let aof_fix = "CONFIG SET appendonly yes; CONFIG SET appendfsync always; CONFIG REWRITE (or appendonly yes, appendfsync always in redis.conf)";
    if aof {
        return match fsync {
            "always" => Finding::ok("redis persistence: appendonly yes, appendfsync always"),
            "everysec" if delay >= Duration::from_secs(1) => Finding::ok(format!(
                "redis persistence: appendonly yes, appendfsync everysec, with [apply] confirm_delay {}",
                humantime::format_duration(delay)
            )),
            "everysec" => Finding::warn(
                "redis persistence: appendfsync everysec can lose the last second of writes in a crash, after the daemon confirmed them to Postgres, so they would not be replayed",
                "[apply] confirm_delay = \"1s\" in the pgcache config, or CONFIG SET appendfsync always",
            ),
            other => Finding::warn(
                format!("redis persistence: appendfsync {other} leaves flushing to the OS, so a crash can lose writes the daemon confirmed to Postgres"),
                "CONFIG SET appendfsync always (or everysec with [apply] confirm_delay = \"1s\")",
            ),
        };
    }
    if save.is_empty() {
        Finding::warn(
            "redis persistence is off (no appendonly, no save): a Redis restart empties the cache, and pgcache then backfills every mirror table from Postgres",
            aof_fix,
        )
    } else {
        Finding::warn(
            format!("redis persists only snapshots (save {save:?}): a restart loses the writes since the last snapshot, which the slot no longer holds, so they are lost from the cache"),
            aof_fix,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::preflight::Level;

    fn config(extra: &str) -> Config {
        Config::from_toml_str(&format!(
            "[postgres]\nurl = \"postgres://u@h/db\"\n[redis]\nurl = \"redis://h\"\n{extra}\n\
             [[tables]]\ntable = \"public.t\"\nkey = \"t:{{id}}\"\n\
             [[tables]]\ntable = \"public.r\"\nkey = \"r:{{id}}\"\nmode = \"refresh\"\nttl = \"1h\"\n"
        ))
        .unwrap()
    }

    fn settings(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn evicting_policies_warn_for_mirror_tables() {
        let c = config("");
        let f = eviction_finding(&c, &settings(&[("maxmemory-policy", "allkeys-lru")]));
        assert_eq!(f.level, Level::Warn, "{f}");
        assert!(
            f.what.contains("public.t") && !f.what.contains("public.r"),
            "{f}"
        );
        assert!(f.fix.unwrap().contains("noeviction"));
        // volatile-* only evicts keys with a TTL; the mirror table has none.
        let f = eviction_finding(&c, &settings(&[("maxmemory-policy", "volatile-lru")]));
        assert_eq!(f.level, Level::Ok, "{f}");
        let f = eviction_finding(&c, &settings(&[("maxmemory-policy", "noeviction")]));
        assert_eq!(f.level, Level::Ok, "{f}");
    }

    #[test]
    fn persistence_levels() {
        let c = config("");
        let warn = |s: &[(&str, &str)]| persistence_finding(&c, &settings(s)).level;
        assert_eq!(warn(&[("appendonly", "no"), ("save", "")]), Level::Warn);
        assert_eq!(
            warn(&[("appendonly", "no"), ("save", "3600 1")]),
            Level::Warn
        );
        assert_eq!(
            warn(&[("appendonly", "yes"), ("appendfsync", "always")]),
            Level::Ok
        );
        assert_eq!(
            warn(&[("appendonly", "yes"), ("appendfsync", "everysec")]),
            Level::Warn
        );
        let delayed = config("[apply]\nconfirm_delay = \"1s\"");
        let f = persistence_finding(
            &delayed,
            &settings(&[("appendonly", "yes"), ("appendfsync", "everysec")]),
        );
        assert_eq!(f.level, Level::Ok, "{f}");
    }
}
