//! Finding the master through Redis Sentinel (`[redis.sentinel]`).
//!
//! The daemon, `verify` and `status` ask the sentinels, in the order configured, which server
//! is the master now (`SENTINEL GET-MASTER-ADDR-BY-NAME`), and check with `ROLE` that the
//! server they name agrees, since a sentinel's view lags a failover for a moment. Each
//! session of the daemon asks again, so after a failover (the old master's connection
//! breaks, or it answers `READONLY` as a replica) the next session writes to the new one.

use std::time::Duration;

use redis::{ErrorKind, RedisError, RedisResult};

use crate::config::{redact, redis_client, RedisRoots, SentinelConfig};

/// How long one sentinel, and then the master it names, get to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A client for the master the sentinels name now.
///
/// # Errors
/// No sentinel answered, none knows the master, or the server they name is not a master
/// (a failover under way): the message says which.
pub async fn master_client(
    sentinel: &SentinelConfig,
    roots: Option<&RedisRoots>,
) -> RedisResult<redis::Client> {
    let mut problems = Vec::new();
    for url in &sentinel.urls {
        match master_from(sentinel, url.expose(), roots).await {
            Ok(client) => return Ok(client),
            Err(problem) => problems.push(format!("{}: {problem}", redact(url.expose()))),
        }
    }
    Err(RedisError::from((
        ErrorKind::Io,
        "no sentinel named a working master",
        format!("master {:?}: {}", sentinel.master, problems.join("; ")),
    )))
}

async fn master_from(
    sentinel: &SentinelConfig,
    sentinel_url: &str,
    roots: Option<&RedisRoots>,
) -> Result<redis::Client, String> {
    let client = redis_client(sentinel_url, roots).map_err(|e| e.to_string())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| format!("unreachable ({e})"))?;
    let address: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(&sentinel.master)
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("SENTINEL GET-MASTER-ADDR-BY-NAME failed ({e})"))?;
    let Some((host, port)) = address else {
        return Err("does not monitor a master of that name".to_string());
    };
    let url = master_url(sentinel, sentinel_url, &host, port);
    let master = redis_client(&url, roots).map_err(|e| e.to_string())?;
    let mut conn = master
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| format!("names {host}:{port}, which is unreachable ({e})"))?;
    let role: redis::Value = redis::cmd("ROLE")
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("names {host}:{port}, whose ROLE failed ({e})"))?;
    match role {
        redis::Value::Array(items) if matches!(items.first(), Some(redis::Value::BulkString(r)) if r == b"master") => {
            Ok(master)
        }
        _ => Err(format!(
            "names {host}:{port}, which is not a master now (a failover under way?)"
        )),
    }
}

/// The master's URL: the sentinel's scheme (TLS to both or to neither), the master's own
/// login and database.
fn master_url(sentinel: &SentinelConfig, sentinel_url: &str, host: &str, port: u16) -> String {
    let scheme = if sentinel_url.starts_with("rediss://") {
        "rediss"
    } else {
        "redis"
    };
    let login = match (&sentinel.username, &sentinel.password) {
        (Some(user), Some(password)) => {
            format!("{}:{}@", encode(user), encode(password.expose()))
        }
        (None, Some(password)) => format!(":{}@", encode(password.expose())),
        (Some(user), None) => format!("{}@", encode(user)),
        (None, None) => String::new(),
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    format!("{scheme}://{login}{host}:{port}/{}", sentinel.db)
}

/// Percent-encodes what a URL's user or password part may not hold as is.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn sentinel(username: Option<&str>, password: Option<&str>, db: u32) -> SentinelConfig {
        SentinelConfig {
            master: "mymaster".to_string(),
            urls: vec![Secret::new("redis://s:26379".to_string())],
            username: username.map(str::to_string),
            password: password.map(|p| Secret::new(p.to_string())),
            db,
        }
    }

    #[test]
    fn the_master_url_takes_the_login_the_database_and_the_sentinels_scheme() {
        assert_eq!(
            master_url(
                &sentinel(None, None, 0),
                "redis://s:26379",
                "10.0.0.1",
                6379
            ),
            "redis://10.0.0.1:6379/0"
        );
        assert_eq!(
            master_url(
                &sentinel(Some("app"), Some("p@ss:w/rd"), 3),
                "rediss://s:26379",
                "::1",
                6380
            ),
            "rediss://app:p%40ss%3Aw%2Frd@[::1]:6380/3"
        );
        assert_eq!(
            master_url(&sentinel(None, Some("pw"), 1), "redis://s", "m", 1),
            "redis://:pw@m:1/1"
        );
    }
}
