//! `[redis]` beyond one server: `cluster = true` with its seeds, and `[redis.sentinel]`.
//!
//! ```toml
//! [redis]
//! url = "redis://10.0.0.1:6379"   # any node of the cluster (a seed)
//! cluster = true                  # discover slots and nodes from the seed
//! # urls = ["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]   # several seeds
//! ```
//!
//! ```toml
//! [redis.sentinel]
//! master = "mymaster"             # the name the sentinels monitor
//! urls = ["redis://10.0.0.5:26379", "redis://10.0.0.6:26379", "redis://10.0.0.7:26379"]
//! # username = "pgcache"          # the master's login, when it needs one
//! # password = "..."              # or password_file = "/run/secrets/redis"
//! # db = 0
//! ```

use std::path::{Path, PathBuf};

use config::ValueKind;

use super::file::{read_url, redis_url_problem};
use super::redis_tls::{self, RedisRoots};
use super::tree::{Field, Section};
use super::{redact, RedisTopology, Secret, SentinelConfig};

/// Reads the seeds of a cluster (`cluster = true`) or `[redis.sentinel]`, with their checks;
/// returns the URL to show first (the first seed or sentinel) and the topology.
pub(super) fn read_topology(
    sec: &mut Section,
    cluster: bool,
    roots: Option<&RedisRoots>,
    base_dir: Option<&Path>,
    errors: &mut Vec<String>,
) -> Option<(Secret, RedisTopology)> {
    let has_url = sec.map.contains_key("url") || sec.map.contains_key("url_file");
    if let Some(value) = sec.map.remove("sentinel") {
        let mut clash = false;
        if cluster {
            errors.push(format!(
                "{} and {}: a Redis Cluster has no sentinels; set one of them",
                sec.path_of("cluster"),
                sec.path_of("sentinel")
            ));
            clash = true;
        }
        for key in ["url", "url_file", "urls"] {
            if sec.take(key).is_some() {
                errors.push(format!(
                    "{}: with [redis.sentinel] the sentinels name the master; remove {0} \
                     (the sentinels go in redis.sentinel.urls, the master's login in \
                     redis.sentinel.username and password)",
                    sec.path_of(key)
                ));
                clash = true;
            }
        }
        let sentinel = read_sentinel(
            Section::new(&sec.path_of("sentinel"), Some(value), errors),
            roots,
            base_dir,
            errors,
        )?;
        if clash {
            return None;
        }
        let first = sentinel.urls[0].clone();
        return Some((first, RedisTopology::Sentinel(sentinel)));
    }
    if !cluster {
        errors.push(format!(
            "{}: lists the seeds of a Redis Cluster, but {} is not true (set {1} = true, or \
             use {} for one server)",
            sec.path_of("urls"),
            sec.path_of("cluster"),
            sec.path_of("url")
        ));
        sec.take("urls");
        return None;
    }
    let seeds = if sec.map.contains_key("urls") {
        if has_url {
            let url = sec.take("url").or_else(|| sec.take("url_file"));
            let urls = sec.take("urls");
            errors.push(format!(
                "{} and {}: set one of them, not both (urls lists several seeds)",
                url.map_or_else(|| sec.path_of("url"), |(label, _)| label),
                urls.map_or_else(|| sec.path_of("urls"), |(label, _)| label),
            ));
            return None;
        }
        url_list(sec, "urls", errors)?
    } else {
        let url = read_url(sec, base_dir, errors)?;
        vec![url]
    };
    let seeds = check_nodes(&seeds, roots, Role::Seed, errors)?;
    let first = seeds[0].clone();
    Some((first, RedisTopology::Cluster { seeds }))
}

fn read_sentinel(
    mut sec: Section,
    roots: Option<&RedisRoots>,
    base_dir: Option<&Path>,
    errors: &mut Vec<String>,
) -> Option<SentinelConfig> {
    let master = match sec.string("master", errors) {
        Some(m)
            if m.value.is_empty()
                || m.value
                    .contains(|c: char| c.is_whitespace() || c.is_control()) =>
        {
            errors.push(format!(
                "{}: {:?} is not a master name (the name in the sentinels' SENTINEL MONITOR, \
                 without spaces)",
                m.label, m.value
            ));
            None
        }
        Some(m) => Some(m.value),
        None => {
            errors.push(format!(
                "{}: missing (the name the sentinels monitor the master under, e.g. \"mymaster\")",
                sec.path_of("master")
            ));
            None
        }
    };
    let urls = if sec.map.contains_key("urls") {
        url_list(&mut sec, "urls", errors)
            .and_then(|urls| check_nodes(&urls, roots, Role::Sentinel, errors))
    } else {
        errors.push(format!(
            "{}: missing (the sentinels, e.g. [\"redis://10.0.0.5:26379\", \"redis://10.0.0.6:26379\"])",
            sec.path_of("urls")
        ));
        None
    };
    let username = sec.string("username", errors).map(|u| u.value);
    let password = sec.string("password", errors);
    let password_file = sec.string("password_file", errors);
    let password = match (password, password_file) {
        (Some(p), Some(f)) => {
            errors.push(format!(
                "{} and {}: set one of them, not both",
                p.label, f.label
            ));
            None
        }
        (Some(p), None) => Some(Some(Secret::new(p.value))),
        (None, Some(f)) => {
            let path = match base_dir {
                Some(dir) => dir.join(&f.value),
                None => PathBuf::from(&f.value),
            };
            match std::fs::read_to_string(&path) {
                Ok(text) => Some(Some(Secret::new(text.trim().to_string()))),
                Err(e) => {
                    errors.push(format!("{}: cannot read {}: {e}", f.label, path.display()));
                    None
                }
            }
        }
        (None, None) => Some(None),
    };
    let db = match sec.take("db") {
        None => Some(0),
        Some((label, value)) => {
            let n = match &value.kind {
                ValueKind::I64(n) => u32::try_from(*n).ok(),
                ValueKind::U64(n) => u32::try_from(*n).ok(),
                ValueKind::String(s) => s.trim().parse().ok(),
                _ => None,
            };
            if n.is_none() {
                errors.push(format!(
                    "{label}: expected a database number (0, 1, ...), found {}",
                    value.kind
                ));
            }
            n
        }
    };
    sec.finish(errors);
    Some(SentinelConfig {
        master: master?,
        urls: urls?,
        username,
        password: password?,
        db: db?,
    })
}

/// A list of URLs; from the environment (always a string), comma-separated.
fn url_list(sec: &mut Section, key: &str, errors: &mut Vec<String>) -> Option<Vec<Field<String>>> {
    let from_env = matches!(
        sec.map.get(key).map(|v| &v.kind),
        Some(ValueKind::String(_))
    );
    let list = if from_env {
        let field = sec.string(key, errors)?;
        Field {
            value: field
                .value
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            label: field.label,
        }
    } else {
        sec.strings(key, errors)?
    };
    if list.value.is_empty() {
        errors.push(format!(
            "{}: empty; list at least one URL (e.g. [\"redis://10.0.0.1:6379\"])",
            list.label
        ));
        return None;
    }
    let several = list.value.len() > 1;
    Some(
        list.value
            .into_iter()
            .enumerate()
            .map(|(i, value)| Field {
                value,
                label: if several || !from_env {
                    format!("{}[{i}]", list.label)
                } else {
                    list.label.clone()
                },
            })
            .collect(),
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Seed,
    Sentinel,
}

/// Checks each URL on its own, then that they agree: one scheme (TLS or not) and, for
/// seeds, one login (a cluster's nodes share it) and database 0.
fn check_nodes(
    urls: &[Field<String>],
    roots: Option<&RedisRoots>,
    role: Role,
    errors: &mut Vec<String>,
) -> Option<Vec<Secret>> {
    let before = errors.len();
    for url in urls {
        if let Some(problem) = redis_url_problem(&url.value) {
            errors.push(format!("{}: {:?} {problem}", url.label, redact(&url.value)));
            continue;
        }
        let parts = UrlParts::of(&url.value);
        if parts.scheme.contains("unix") {
            errors.push(format!(
                "{}: {:?} is a Unix socket, but {} is reached over TCP (redis://host:port)",
                url.label,
                redact(&url.value),
                match role {
                    Role::Seed => "a Redis Cluster",
                    Role::Sentinel => "a sentinel",
                }
            ));
            continue;
        }
        if role == Role::Seed && parts.db.is_some_and(|db| db != 0) {
            errors.push(format!(
                "{}: {:?} names database {}, but a Redis Cluster has only database 0",
                url.label,
                redact(&url.value),
                parts.db.unwrap_or_default()
            ));
        }
        if let Some(problem) = redis_tls::tls_problem(&url.value, roots) {
            errors.push(format!("{}: {problem}", url.label));
        }
    }
    if errors.len() > before {
        return None;
    }
    let first = UrlParts::of(&urls[0].value);
    for url in &urls[1..] {
        let parts = UrlParts::of(&url.value);
        if parts.scheme != first.scheme {
            errors.push(format!(
                "{}: is {}://, but {} is {}://; every {} must use the same scheme (all TLS or none)",
                url.label,
                parts.scheme,
                urls[0].label,
                first.scheme,
                match role {
                    Role::Seed => "seed",
                    Role::Sentinel => "sentinel",
                }
            ));
        } else if role == Role::Seed && parts.login != first.login {
            errors.push(format!(
                "{}: has another user or password than {}; the nodes of a Redis Cluster share \
                 one login, so every seed must carry the same",
                url.label, urls[0].label
            ));
        }
    }
    (errors.len() == before).then(|| {
        urls.iter()
            .map(|url| Secret::new(url.value.clone()))
            .collect()
    })
}

/// The pieces of a Redis URL that seeds must agree on (parsed as `redis_url_problem` does).
struct UrlParts<'a> {
    scheme: &'a str,
    login: Option<&'a str>,
    db: Option<u32>,
}

impl<'a> UrlParts<'a> {
    fn of(url: &'a str) -> UrlParts<'a> {
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        let login = authority.rsplit_once('@').map(|(login, _)| login);
        let db = path
            .strip_prefix('/')
            .unwrap_or(path)
            .split(['?', '#'])
            .next()
            .filter(|db| !db.is_empty())
            .and_then(|db| db.parse().ok());
        UrlParts { scheme, login, db }
    }
}
