//! `pgcache status`: where the daemon stands, from the servers alone (it need not run).
//!
//! - Slot: confirmed and restart positions, lag in bytes
//!   (`pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)`) and the WAL the slot
//!   retains (`... restart_lsn`).
//! - Lag in seconds is *measured*: the WAL position current when `status` starts is
//!   watched until the slot confirms it (at most 2 s). Commit timestamps would need
//!   `track_commit_timestamp`, and the checkpoint's write time only moves when a published
//!   table changes, so neither tells an idle daemon from a stuck one. When the slot is
//!   behind for longer than the wait, the lag is reported as at least 2 s; when no daemon is
//!   connected, as at least the time since its last heartbeat. With `[apply] confirm_delay`
//!   the slot trails Redis by that delay, and so does this measure.
//! - Checkpoint (Redis): the last applied commit, when it was written, each table's
//!   backfill progress, and the daemon's heartbeat (every 5 s while it streams).
//! - Keys per table: a `SCAN` over the table's key space, leases excluded.
//!
//! Exit codes: 0 when everything could be read, 1 when a server could not, 2 on a bad
//! config.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::load;
use crate::checkpoint::{self, BackfillProgress, CheckpointState};
use crate::config::{redact, Config};
use crate::ops::verify::count_keys;
use crate::pgconn::{self, PgTarget};

/// The longest `status` watches the slot to measure lag.
const LAG_WAIT: Duration = Duration::from_secs(2);
/// A heartbeat older than this means no daemon is streaming (it beats every 5 s).
const HEARTBEAT_STALE_MS: u64 = 15_000;
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Serialize)]
struct Status {
    slot: SlotStatus,
    checkpoint: CheckpointStatus,
    daemon: DaemonStatus,
    tables: Vec<TableStatus>,
    /// What could not be read.
    errors: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
struct SlotStatus {
    name: String,
    exists: Option<bool>,
    active: Option<bool>,
    active_pid: Option<i32>,
    wal_status: Option<String>,
    current_wal_lsn: Option<String>,
    confirmed_lsn: Option<String>,
    restart_lsn: Option<String>,
    lag_bytes: Option<i64>,
    lag_seconds: Option<f64>,
    /// `lag_seconds` is a lower bound, not a measurement.
    lag_seconds_at_least: bool,
    retained_wal_bytes: Option<i64>,
}

#[derive(Debug, Default, Serialize)]
struct CheckpointStatus {
    key: String,
    lsn: Option<String>,
    updated_ms: Option<u64>,
    updated_seconds_ago: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
struct DaemonStatus {
    heartbeat_ms: Option<u64>,
    heartbeat_seconds_ago: Option<f64>,
    /// A heartbeat within the last 15 s.
    alive: bool,
}

#[derive(Debug, Serialize)]
struct TableStatus {
    table: String,
    mode: String,
    keys: Option<u64>,
    backfill: Option<BackfillProgress>,
}

pub(crate) async fn status(path: &Path, json: bool) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let status = gather(&config).await;
    if json {
        match serde_json::to_string_pretty(&status) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", human(&status));
    }
    if status.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn gather(config: &Config) -> Status {
    let mut status = Status {
        slot: SlotStatus {
            name: config.postgres.slot.clone(),
            ..SlotStatus::default()
        },
        checkpoint: CheckpointStatus {
            key: checkpoint::checkpoint_key(&config.redis.key_prefix, &config.postgres.slot),
            ..CheckpointStatus::default()
        },
        ..Status::default()
    };
    if let Err(e) = slot(config, &mut status.slot).await {
        status.errors.push(redact(&format!("postgres: {e}")));
    }
    let now = now_ms();
    let mut state = CheckpointState::default();
    let mut keys = vec![None; config.tables.len()];
    match redis_side(config, &status.checkpoint.key, &mut keys).await {
        Ok(read) => state = read,
        Err(e) => status.errors.push(redact(&format!("redis: {e}"))),
    }
    let ago = |ms: u64| now.saturating_sub(ms) as f64 / 1000.0;
    status.checkpoint.lsn = state.lsn.map(|l| l.to_string());
    status.checkpoint.updated_ms = state.updated_ms;
    status.checkpoint.updated_seconds_ago = state.updated_ms.map(ago);
    status.daemon.heartbeat_ms = state.heartbeat_ms;
    status.daemon.heartbeat_seconds_ago = state.heartbeat_ms.map(ago);
    status.daemon.alive = state
        .heartbeat_ms
        .is_some_and(|ms| now.saturating_sub(ms) < HEARTBEAT_STALE_MS);
    if status.slot.active == Some(false) && status.slot.lag_bytes.is_some_and(|b| b > 0) {
        // Nobody consumes the slot: changes have waited at least since the daemon left.
        status.slot.lag_seconds = state.heartbeat_ms.or(state.updated_ms).map(ago);
        status.slot.lag_seconds_at_least = true;
    }
    status.tables = config
        .tables
        .iter()
        .zip(keys)
        .map(|(rule, keys)| TableStatus {
            table: rule.qualified_name(),
            mode: rule.mode.to_string(),
            keys,
            backfill: state.backfills.get(&rule.qualified_name()).cloned(),
        })
        .collect();
    status
}

async fn slot(config: &Config, out: &mut SlotStatus) -> Result<(), String> {
    let target = PgTarget::parse(config.postgres.url.expose()).map_err(|e| e.to_string())?;
    let client = tokio::time::timeout(TIMEOUT, pgconn::connect(&target))
        .await
        .map_err(|_| format!("{} did not answer within {TIMEOUT:?}", target.redacted()))?
        .map_err(|e| e.to_string())?;
    let pg = |e: tokio_postgres::Error| crate::sql::describe_error(&e);
    let row = client
        .query_opt(
            "SELECT active, active_pid, wal_status, pg_current_wal_lsn()::text, \
                    confirmed_flush_lsn::text, restart_lsn::text, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.postgres.slot],
        )
        .await
        .map_err(pg)?;
    let Some(row) = row else {
        out.exists = Some(false);
        return Err(format!(
            "replication slot {:?} does not exist (pgcache check shows how to create it)",
            config.postgres.slot
        ));
    };
    out.exists = Some(true);
    out.active = row.get(0);
    out.active_pid = row.get(1);
    out.wal_status = row.get(2);
    out.current_wal_lsn = row.get(3);
    out.confirmed_lsn = row.get(4);
    out.restart_lsn = row.get(5);
    out.lag_bytes = row.get(6);
    out.retained_wal_bytes = row.get(7);
    let (Some(lag), Some(current)) = (out.lag_bytes, out.current_wal_lsn.clone()) else {
        return Ok(());
    };
    if lag <= 0 {
        out.lag_seconds = Some(0.0);
    } else if out.active == Some(true) {
        // Watch the position current now until the daemon has confirmed it.
        let started = Instant::now();
        loop {
            let confirmed: Option<bool> = client
                .query_one(
                    "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots \
                     WHERE slot_name = $1",
                    &[&config.postgres.slot, &current],
                )
                .await
                .map_err(pg)?
                .get(0);
            if confirmed == Some(true) {
                out.lag_seconds = Some(started.elapsed().as_secs_f64());
                break;
            }
            if started.elapsed() >= LAG_WAIT {
                out.lag_seconds = Some(LAG_WAIT.as_secs_f64());
                out.lag_seconds_at_least = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

async fn redis_side(
    config: &Config,
    checkpoint_key: &str,
    keys: &mut [Option<u64>],
) -> Result<CheckpointState, String> {
    let servers = crate::ops::verify::Servers::connect(config, TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    let mut conn = servers.data.clone();
    let state = checkpoint::read_state(&mut conn, checkpoint_key)
        .await
        .map_err(|e| e.to_string())?;
    for (rule, count) in config.tables.iter().zip(keys.iter_mut()) {
        *count = Some(
            count_keys(&servers.scans, &config.redis.key_prefix, rule)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(state)
}

use crate::clock::now_ms;

fn human(s: &Status) -> String {
    let mut out = String::new();
    let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| "?".into());
    let slot = &s.slot;
    let state = match (slot.exists, slot.active) {
        (Some(false), _) => "does not exist".to_string(),
        (_, Some(true)) => match slot.active_pid {
            Some(pid) => format!("active (walsender pid {pid})"),
            None => "active".to_string(),
        },
        (_, Some(false)) => "inactive: no daemon is connected".to_string(),
        _ => "unknown".to_string(),
    };
    out.push_str(&format!("slot         {}: {state}", slot.name));
    if let Some(wal) = &slot.wal_status {
        out.push_str(&format!(", wal {wal}"));
    }
    out.push('\n');
    if slot.exists == Some(true) {
        let seconds = match slot.lag_seconds {
            Some(s) if slot.lag_seconds_at_least => format!(">= {s:.1} s"),
            Some(s) => format!("{s:.1} s"),
            None => "? s".to_string(),
        };
        out.push_str(&format!(
            "lag          {}, {seconds}\n",
            slot.lag_bytes.map_or("?".to_string(), bytes)
        ));
        out.push_str(&format!(
            "confirmed    {} (server at {})\n",
            or_unknown(&slot.confirmed_lsn),
            or_unknown(&slot.current_wal_lsn)
        ));
        out.push_str(&format!(
            "restart      {} (retains {} of WAL)\n",
            or_unknown(&slot.restart_lsn),
            slot.retained_wal_bytes.map_or("?".to_string(), bytes)
        ));
    }
    let ago = |s: Option<f64>| s.map_or(String::new(), |s| format!(", {s:.1} s ago"));
    out.push_str(&format!(
        "checkpoint   {}{}\n",
        s.checkpoint.lsn.clone().unwrap_or_else(|| "none".into()),
        ago(s.checkpoint.updated_seconds_ago)
    ));
    out.push_str(&format!(
        "daemon       {}\n",
        match s.daemon.heartbeat_seconds_ago {
            None => "no heartbeat recorded".to_string(),
            Some(secs) => format!(
                "last heartbeat {secs:.1} s ago ({})",
                if s.daemon.alive {
                    "alive"
                } else {
                    "not running?"
                }
            ),
        }
    ));
    let width = s
        .tables
        .iter()
        .map(|t| t.table.len())
        .max()
        .unwrap_or(0)
        .max(5);
    out.push_str(&format!(
        "\n{:<width$}  {:<10}  {:>10}  BACKFILL\n",
        "TABLE", "MODE", "KEYS"
    ));
    for t in &s.tables {
        let keys = t.keys.map_or("?".to_string(), |k| k.to_string());
        let backfill = match &t.backfill {
            None => "-".to_string(),
            Some(b) if b.is_done() => format!("done, {} rows", b.rows),
            Some(b) if b.estimate > 0 => format!(
                "{} {}% ({} of ~{} rows)",
                b.state,
                (b.rows * 100 / b.estimate).min(100),
                b.rows,
                b.estimate
            ),
            Some(b) => format!("{}, {} rows", b.state, b.rows),
        };
        out.push_str(&format!(
            "{:<width$}  {:<10}  {keys:>10}  {backfill}\n",
            t.table, t.mode
        ));
    }
    for e in &s.errors {
        out.push_str(&format!("\nerror: {e}\n"));
    }
    out
}

/// Bytes in binary units, as `pg_size_pretty` prints them.
fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_pg_size_pretty() {
        assert_eq!(bytes(0), "0 bytes");
        assert_eq!(bytes(1023), "1023 bytes");
        assert_eq!(bytes(1536), "1.5 kB");
        assert_eq!(bytes(5 * 1024 * 1024), "5.0 MB");
    }

    #[test]
    fn human_output_names_everything() {
        let status = Status {
            slot: SlotStatus {
                name: "pgcache".into(),
                exists: Some(true),
                active: Some(true),
                active_pid: Some(42),
                lag_bytes: Some(2048),
                lag_seconds: Some(0.25),
                confirmed_lsn: Some("0/10".into()),
                ..SlotStatus::default()
            },
            tables: vec![TableStatus {
                table: "public.users".into(),
                mode: "mirror".into(),
                keys: Some(7),
                backfill: None,
            }],
            ..Status::default()
        };
        let text = human(&status);
        assert!(
            text.contains("pgcache: active (walsender pid 42)"),
            "{text}"
        );
        assert!(text.contains("lag          2.0 kB, 0.2 s"), "{text}");
        assert!(text.contains("public.users  mirror"), "{text}");
        assert!(text.contains("no heartbeat recorded"), "{text}");
    }
}
