//! Keys Redis can no longer be sent: written while `proto-max-bulk-len` was higher, and
//! longer than it is now.
//!
//! Redis refuses any command with an argument over `proto-max-bulk-len`, so the daemon never
//! names such a key (`Batch` skips it, counted as `key_too_large`). A key written under a
//! higher limit that was lowered later would then stay for good, whatever its row does. At
//! start, when the limit is lower than the one the checkpoint recorded (or unknown and
//! below Redis's default), each table's keys are scanned and the ones too long to name are
//! deleted from inside a script (a script's own commands have no such limit), one `SCAN`
//! step per call so Redis is never blocked for long. Absence is safe: their rows are read
//! from Postgres.

use tracing::{info, warn};

use crate::checkpoint::FIELD_MAX_BULK_LEN;
use crate::config::Config;
use crate::daemon::apply::DEFAULT_MAX_VALUE;
use crate::template::{glob_escape, LEASE_SUFFIX};

/// One `SCAN` step: deletes the keys it returns that are at least `ARGV[2]` bytes long.
/// Returns the next cursor and the number deleted.
const DROP_LONG_KEYS: &str = r"
local reply = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[3], 'COUNT', 1000)
local deleted = 0
for _, key in ipairs(reply[2]) do
  if #key >= tonumber(ARGV[2]) then
    deleted = deleted + redis.call('UNLINK', key)
  end
end
return {reply[1], deleted}
";

/// Deletes the keys of every table (rows, leases, invalidation keys) too long to be sent to
/// Redis under its limit now, `max_value`, when the limit went down since the checkpoint
/// recorded it. Returns the checkpoint field to record the limit with.
///
/// # Errors
/// Redis failed; the session starts over.
pub async fn drop_unreachable(
    redis: &mut redis::aio::MultiplexedConnection,
    scans: &[redis::aio::MultiplexedConnection],
    checkpoint_key: &str,
    config: &Config,
    max_value: usize,
) -> redis::RedisResult<(String, String)> {
    let recorded: Option<usize> = redis::cmd("HGET")
        .arg(checkpoint_key)
        .arg(FIELD_MAX_BULK_LEN)
        .query_async::<Option<String>>(redis)
        .await?
        .and_then(|v| v.parse().ok());
    let field = (FIELD_MAX_BULK_LEN.to_string(), max_value.to_string());
    if max_value >= recorded.unwrap_or(DEFAULT_MAX_VALUE) {
        return Ok(field);
    }
    // A key the daemon would skip: with its lease key, over the limit.
    let too_long = max_value.saturating_sub(LEASE_SUFFIX.len() + 2) + 1;
    let key_prefix = &config.redis.key_prefix;
    let mut patterns = Vec::new();
    for rule in &config.tables {
        let key_space = glob_escape(&rule.key_space(key_prefix));
        patterns.push(format!("{key_space}*"));
        patterns.push(format!("{{{key_space}*}}{LEASE_SUFFIX}"));
        patterns.extend(rule.invalidation_patterns(key_prefix));
    }
    let mut deleted = 0u64;
    // Each server that holds keys: the one, or every master of a cluster.
    for scan in scans {
        let mut conn = scan.clone();
        for pattern in &patterns {
            let mut cursor = "0".to_string();
            loop {
                let (next, gone): (String, u64) = redis::cmd("EVAL")
                    .arg(DROP_LONG_KEYS)
                    .arg(0)
                    .arg(&cursor)
                    .arg(too_long)
                    .arg(pattern)
                    .query_async(&mut conn)
                    .await?;
                deleted += gone;
                if next == "0" {
                    break;
                }
                cursor = next;
            }
        }
    }
    if deleted > 0 {
        warn!(
            deleted,
            limit = max_value,
            "Redis's proto-max-bulk-len is lower than when keys were written: deleted the keys too long to be sent to Redis now (their rows are read from Postgres)"
        );
        metrics::counter!(crate::metrics::ERRORS, "kind" => "key_too_large").increment(deleted);
    } else {
        info!(
            limit = max_value,
            "Redis's proto-max-bulk-len went down; no key is too long for it"
        );
    }
    Ok(field)
}
