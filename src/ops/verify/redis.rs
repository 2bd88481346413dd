//! The Redis side of `verify`: a table's keys (SCAN over its key space) and what they hold.

use std::collections::{BTreeMap, HashSet};

use serde_json::value::RawValue;

use crate::config::{Format, TableRule};
use crate::template::LEASE_SUFFIX;

/// Keys per `SCAN` step and per `MGET`.
const BATCH: usize = 500;

/// What a key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Cached {
    Absent,
    String(Vec<u8>),
    Hash(BTreeMap<String, Vec<u8>>),
    /// A key of another type (a list, a set...), by its type name.
    Other(String),
}

/// `<key_prefix><literal prefix>*`, glob-escaped: every key of the table, and the leases of
/// keys that carry a hash tag (see `template::lease_key`), which callers skip.
pub fn key_space_pattern(key_prefix: &str, rule: &TableRule) -> String {
    let mut out = crate::template::glob_escape(&rule.key_space(key_prefix));
    out.push('*');
    out
}

pub(crate) use crate::reader::link::Conn;

/// Where keys are read: `data` for values (one server, or the whole cluster through
/// redis-rs's cluster client), and one connection per server that holds keys, for scans
/// (the one server, or every master of a cluster).
#[derive(Clone)]
pub struct Servers {
    pub(crate) data: Conn,
    pub scans: Vec<redis::aio::MultiplexedConnection>,
}

impl Servers {
    /// Connects to what `config` names: one server, the master the sentinels name, or a
    /// cluster's masters (found with `CLUSTER NODES` from the seeds).
    ///
    /// # Errors
    /// No server answers within `timeout`.
    pub async fn connect(
        config: &crate::config::Config,
        timeout: std::time::Duration,
    ) -> Result<Servers, redis::RedisError> {
        let timed_out = || {
            redis::RedisError::from((
                redis::ErrorKind::Io,
                "no answer",
                format!("Redis did not answer within {timeout:?}"),
            ))
        };
        if let crate::config::RedisTopology::Cluster { seeds } = &config.redis.topology {
            let seeds: Vec<String> = seeds.iter().map(|s| s.expose().to_string()).collect();
            let router = tokio::time::timeout(
                timeout,
                crate::daemon::slot_router::SlotRouter::connect(
                    &seeds,
                    config.redis.tls_ca_file.clone(),
                ),
            )
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::Io, "redis cluster", e.to_string()))
            })?;
            let mut scans = Vec::new();
            for addr in router.masters() {
                let client = crate::config::redis_client(
                    &router.url_for(&addr),
                    config.redis.tls_ca_file.as_ref(),
                )?;
                scans.push(
                    tokio::time::timeout(timeout, client.get_multiplexed_async_connection())
                        .await
                        .map_err(|_| timed_out())??,
                );
            }
            let client =
                crate::config::redis_cluster_builder(&seeds, config.redis.tls_ca_file.as_ref())?
                    .connection_timeout(timeout)
                    .response_timeout(std::time::Duration::from_secs(60))
                    .build()?;
            let data = tokio::time::timeout(timeout, client.get_async_connection())
                .await
                .map_err(|_| timed_out())??;
            return Ok(Servers {
                data: Conn::Cluster(data),
                scans,
            });
        }
        let client = config.redis.resolve().await?;
        let conn = tokio::time::timeout(timeout, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| timed_out())??;
        Ok(Servers {
            data: Conn::Multiplexed(conn.clone()),
            scans: vec![conn],
        })
    }
}

/// Walks a table's key space with `SCAN`, a batch at a time, without the lease keys: on
/// each server in turn.
pub(super) struct KeyWalk {
    pattern: String,
    server: usize,
    cursor: u64,
    done: bool,
}

impl KeyWalk {
    pub(super) fn new(key_prefix: &str, rule: &TableRule) -> KeyWalk {
        KeyWalk {
            pattern: key_space_pattern(key_prefix, rule),
            server: 0,
            cursor: 0,
            done: false,
        }
    }

    /// The next keys; `None` when the walk is over. SCAN may return a key twice; callers
    /// that count tolerate it (a count is an estimate while keys change anyway).
    pub(super) async fn next(
        &mut self,
        servers: &[redis::aio::MultiplexedConnection],
    ) -> Result<Option<Vec<String>>, redis::RedisError> {
        let Some(conn) = servers.get(self.server) else {
            return Ok(None);
        };
        if self.done {
            return Ok(None);
        }
        let mut conn = conn.clone();
        let (cursor, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(self.cursor)
            .arg("MATCH")
            .arg(&self.pattern)
            .arg("COUNT")
            .arg(BATCH)
            .query_async(&mut conn)
            .await?;
        self.cursor = cursor;
        if cursor == 0 {
            self.server += 1;
            self.done = self.server >= servers.len();
        }
        Ok(Some(
            keys.into_iter()
                .filter(|k| !k.ends_with(LEASE_SUFFIX))
                .collect(),
        ))
    }
}

/// Counts a table's keys (leases excluded).
///
/// # Errors
/// A Redis error.
pub async fn count_keys(
    servers: &[redis::aio::MultiplexedConnection],
    key_prefix: &str,
    rule: &TableRule,
) -> Result<u64, redis::RedisError> {
    let mut walk = KeyWalk::new(key_prefix, rule);
    let mut n = 0u64;
    while let Some(keys) = walk.next(servers).await? {
        n += keys.len() as u64;
    }
    Ok(n)
}

/// What each key holds, read as the table's format stores it.
pub(super) async fn read(
    conn: &mut Conn,
    format: Format,
    keys: &[String],
) -> Result<Vec<Cached>, redis::RedisError> {
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(BATCH) {
        match format {
            Format::Json => {
                // MGET answers nil for keys of other types too; those read as absent.
                let values: Vec<Option<Vec<u8>>> =
                    redis::cmd("MGET").arg(chunk).query_async(conn).await?;
                out.extend(values.into_iter().map(|v| match v {
                    Some(v) => Cached::String(v),
                    None => Cached::Absent,
                }));
            }
            Format::Hash if conn.is_cluster() => {
                // A pipeline on a cluster must stay in one slot: key by key, all at once.
                let reads = chunk.iter().map(|key| {
                    let mut conn = conn.clone();
                    async move {
                        let kind: String =
                            redis::cmd("TYPE").arg(key).query_async(&mut conn).await?;
                        Ok::<_, redis::RedisError>(match kind.as_str() {
                            "none" => Cached::Absent,
                            "hash" => Cached::Hash(
                                redis::cmd("HGETALL")
                                    .arg(key)
                                    .query_async(&mut conn)
                                    .await?,
                            ),
                            other => Cached::Other(other.to_string()),
                        })
                    }
                });
                for cached in futures_util::future::join_all(reads).await {
                    out.push(cached?);
                }
            }
            Format::Hash => {
                let mut pipe = redis::pipe();
                for key in chunk {
                    pipe.cmd("TYPE").arg(key).cmd("HGETALL").arg(key);
                }
                // HGETALL on a key of another type is an error reply, which fails the whole
                // pipeline; so TYPE first, and the pipeline goes key by key on failure.
                let replies: Result<Vec<redis::Value>, _> = pipe.query_async(conn).await;
                match replies {
                    Ok(replies) => {
                        for pair in replies.chunks(2) {
                            out.push(hash_reply(&pair[0], pair.get(1)));
                        }
                    }
                    Err(_) => {
                        for key in chunk {
                            let kind: String =
                                redis::cmd("TYPE").arg(key).query_async(conn).await?;
                            out.push(match kind.as_str() {
                                "none" => Cached::Absent,
                                "hash" => {
                                    let map: BTreeMap<String, Vec<u8>> =
                                        redis::cmd("HGETALL").arg(key).query_async(conn).await?;
                                    Cached::Hash(map)
                                }
                                other => Cached::Other(other.to_string()),
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

fn hash_reply(kind: &redis::Value, fields: Option<&redis::Value>) -> Cached {
    let kind: String = redis::from_redis_value_ref(kind).unwrap_or_default();
    match kind.as_str() {
        "none" => Cached::Absent,
        "hash" => match fields.map(redis::from_redis_value_ref::<BTreeMap<String, Vec<u8>>>) {
            Some(Ok(map)) if !map.is_empty() => Cached::Hash(map),
            _ => Cached::Absent,
        },
        other => Cached::Other(other.to_string()),
    }
}

/// The hash fields the daemon writes for a row, from the row's JSON: NULL columns are left
/// out, strings are stored raw, json/jsonb columns and everything else as their JSON text
/// (`encoder::encode_field`).
pub(super) fn hash_fields(
    json: &[u8],
    json_columns: &HashSet<String>,
) -> Option<BTreeMap<String, Vec<u8>>> {
    let object = serde_json::from_slice::<RawObject>(json).ok()?.0;
    let mut fields = BTreeMap::new();
    for (name, raw) in object {
        let text = raw.get();
        if text == "null" {
            continue;
        }
        let value = if text.starts_with('"') && !json_columns.contains(&name) {
            serde_json::from_str::<String>(text).ok()?.into_bytes()
        } else {
            text.as_bytes().to_vec()
        };
        fields.insert(name, value);
    }
    Some(fields)
}

/// A JSON object's members with their raw values, in document order.
struct RawObject(Vec<(String, Box<RawValue>)>);

impl<'de> serde::Deserialize<'de> for RawObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = RawObject;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawObject, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    out.push((k, v));
                }
                Ok(RawObject(out))
            }
        }
        d.deserialize_map(Members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn patterns_escape_glob_characters() {
        let config = Config::from_toml_str(
            "[postgres]\nurl = \"postgres://u@h/db\"\n[redis]\nurl = \"redis://h\"\n\
             [[tables]]\ntable = \"t\"\nkey = \"a*[b]:{id}\"\n",
        )
        .unwrap();
        assert_eq!(
            key_space_pattern("app?", &config.tables[0]),
            "app\\?a\\*\\[b\\]:*"
        );
    }

    #[test]
    fn hash_fields_follow_the_field_encoding() {
        let json = br#"{"id":1,"name":"a \"b\"","note":null,"doc":"x","tags":["a"],"ok":true}"#;
        let json_columns: HashSet<String> = ["doc".to_string()].into();
        let fields = hash_fields(json, &json_columns).unwrap();
        assert_eq!(fields["id"], b"1");
        assert_eq!(fields["name"], b"a \"b\"");
        assert!(!fields.contains_key("note"));
        assert_eq!(fields["doc"], b"\"x\"");
        assert_eq!(fields["tags"], br#"["a"]"#);
        assert_eq!(fields["ok"], b"true");
        assert!(hash_fields(b"[1]", &json_columns).is_none());
    }
}
