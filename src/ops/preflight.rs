//! Server prerequisites: what Postgres and Redis must look like before the daemon can stream,
//! each finding with the SQL or setting that fixes it.
//!
//! [`postgres_findings`] is what `pgcache run` checks at start: it refuses on any FAIL, so a
//! FAIL there means streaming is impossible or would silently lose changes (no slot, no
//! publication, a table whose deletes could not find their key). Everything that only costs
//! performance or safety margin is a WARN. `pgcache check` prints those findings and
//! [`redis_findings`] too.
//!
//! # Layout
//! - this file: the finding type, and the server-wide Postgres checks (settings, role,
//!   publication, slot);
//! - `failover`: failover slots on a primary, and what a standby needs to keep a copy of
//!   the slot;
//! - `tables`: one table's checks (publication membership, columns, replica identity,
//!   privileges);
//! - `redis`: reachability, version, eviction policy and persistence.

mod control;
mod failover;
mod redis;
mod tables;

use std::fmt;

pub use self::failover::standby_findings;
pub use self::redis::redis_findings;
use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // pad, not write_str, so that `{:<4}` lines the findings up.
        f.pad(match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        })
    }
}

/// One checked fact about the servers.
#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    /// What was checked and what was found.
    pub what: String,
    /// The SQL or setting that fixes it, for WARN and FAIL.
    pub fix: Option<String>,
    /// The configured table it is about, if any. A FAIL about one table stops only that
    /// table in `pgcache run`; the others go on.
    pub table: Option<String>,
}

impl Finding {
    pub fn ok(what: impl Into<String>) -> Self {
        Finding {
            level: Level::Ok,
            what: what.into(),
            fix: None,
            table: None,
        }
    }
    pub fn warn(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            level: Level::Warn,
            what: what.into(),
            fix: Some(fix.into()),
            table: None,
        }
    }
    pub fn fail(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            level: Level::Fail,
            what: what.into(),
            fix: Some(fix.into()),
            table: None,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<4} {}", self.level, self.what)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n     fix: {}", fix.replace('\n', "\n          "))?;
        }
        Ok(())
    }
}

/// Checks the Postgres side: settings, the role, the publication, the slot, and every
/// configured table.
///
/// # Errors
/// Only when a catalog query itself fails; every finding about the server is a value.
pub async fn postgres_findings(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let mut findings = Vec::new();
    findings.extend(settings_findings(client, config).await?);
    findings.extend(role_findings(client).await?);
    findings.extend(publication_findings(client, config).await?);
    findings.extend(slot_findings(client, config).await?);
    findings.extend(failover::failover_findings(client, config).await?);
    findings.extend(control::control_findings(client, config).await?);
    for rule in &config.tables {
        let table = rule.qualified_name();
        findings.extend(
            tables::table_findings(client, config, rule)
                .await?
                .into_iter()
                .map(|finding| Finding {
                    table: Some(table.clone()),
                    ..finding
                }),
        );
    }
    Ok(findings)
}

/// The restart-only settings logical replication needs.
async fn settings_findings(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let mut findings = Vec::new();
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), \
                    current_setting('max_replication_slots')::int, \
                    current_setting('max_wal_senders')::int, \
                    (SELECT count(*)::int FROM pg_replication_slots), \
                    (SELECT count(*)::int FROM pg_stat_replication), \
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active), \
                    current_setting('server_version_num')::int",
            &[&config.postgres.slot],
        )
        .await?;
    let wal_level: String = row.get(0);
    let max_slots: i32 = row.get(1);
    let max_senders: i32 = row.get(2);
    let slots_used: i32 = row.get(3);
    let senders_used: i32 = row.get(4);
    let ours_active: bool = row.get(5);
    let version_num: i32 = row.get(6);

    findings.push(if wal_level == "logical" {
        Finding::ok("wal_level is logical")
    } else {
        Finding::fail(
            format!("wal_level is {wal_level}; logical replication needs logical"),
            "ALTER SYSTEM SET wal_level = logical; then restart Postgres",
        )
    });
    findings.push(if max_slots == 0 {
        Finding::fail(
            "max_replication_slots is 0, so no replication slot can exist",
            "ALTER SYSTEM SET max_replication_slots = 10; then restart Postgres",
        )
    } else {
        Finding::ok(format!(
            "max_replication_slots is {max_slots} ({slots_used} in use)"
        ))
    });
    findings.push(if max_senders == 0 {
        Finding::fail(
            "max_wal_senders is 0, so no replication connection is accepted",
            "ALTER SYSTEM SET max_wal_senders = 10; then restart Postgres",
        )
    } else if senders_used >= max_senders && !ours_active {
        Finding::warn(
            format!(
                "all {max_senders} WAL senders (max_wal_senders) are in use; the daemon cannot \
                 connect until one is free"
            ),
            format!(
                "ALTER SYSTEM SET max_wal_senders = {}; then restart Postgres",
                max_senders.saturating_mul(2).max(10)
            ),
        )
    } else {
        Finding::ok(format!(
            "max_wal_senders is {max_senders} ({senders_used} in use)"
        ))
    });
    findings.push(streaming_finding(config, version_num));
    Ok(findings)
}

/// `postgres.streaming`: whether the server can stream large transactions, and whether the
/// spool directory takes files.
fn streaming_finding(config: &Config, version_num: i32) -> Finding {
    if !config.postgres.streaming {
        return Finding::ok("postgres.streaming is off: large transactions are sent whole");
    }
    if version_num < 140_000 {
        return Finding::warn(
            format!(
                "postgres.streaming is on, but Postgres {} cannot stream transactions in \
                 progress (14 or later can): large transactions are sent whole",
                version_num / 10_000
            ),
            "set postgres.streaming = false to say so, or upgrade Postgres",
        );
    }
    let source = crate::pgconn::PgTarget::parse(config.postgres.url.expose())
        .map(|t| t.redacted())
        .unwrap_or_default();
    let dir = config.apply.spool_dir_for(&config.postgres.slot, &source);
    match crate::daemon::spool::Spool::check_writable(&dir) {
        Ok(()) => Finding::ok(format!(
            "large transactions are streamed, spooled in {}",
            dir.display()
        )),
        Err(e) if config.apply.spool_dir.is_some() => Finding::fail(
            format!("apply.spool_dir: {e}"),
            "set apply.spool_dir to a directory the daemon can write, or postgres.streaming = false",
        ),
        Err(e) => Finding::warn(
            format!(
                "large transactions will not be streamed: the default spool directory cannot \
                 be written ({e}); Postgres will hold them until they commit"
            ),
            "set apply.spool_dir to a directory the daemon can write, or postgres.streaming = false",
        ),
    }
}

/// The role must be allowed to open a replication connection.
async fn role_findings(
    client: &tokio_postgres::Client,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_user::text, rolreplication, rolsuper \
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let role: String = row.get(0);
    let replication: bool = row.get(1);
    let superuser: bool = row.get(2);
    let mut findings = Vec::new();
    if superuser {
        findings.push(Finding::warn(
            format!(
                "role {role:?} is a superuser: the daemon needs only REPLICATION and SELECT on \
                 the cached tables, and whoever gets its password owns the whole server"
            ),
            format!(
                "connect as a role made by sql/role.sql (psql -v role=pgcache -v password=... \
                 -v tables=... -f sql/role.sql), or ALTER ROLE {} NOSUPERUSER REPLICATION;",
                quote_ident(&role)
            ),
        ));
    }
    findings.insert(
        0,
        if replication || superuser {
            Finding::ok(format!(
                "role {role:?} may stream ({})",
                if superuser {
                    "superuser"
                } else {
                    "REPLICATION"
                }
            ))
        } else {
            Finding::fail(
                format!("role {role:?} lacks the REPLICATION attribute, so it cannot stream"),
                format!("ALTER ROLE {} REPLICATION;", quote_ident(&role)),
            )
        },
    );
    Ok(findings)
}

async fn publication_findings(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let publication = &config.postgres.publication;
    let mut findings = Vec::new();
    let row = client
        .query_opt(
            "SELECT pubinsert AND pubupdate AND pubdelete, pubtruncate \
             FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await?;
    let Some(row) = row else {
        findings.push(Finding::fail(
            format!("publication {publication:?} does not exist"),
            format!(
                "psql -v publication={publication} -v tables='{}' -f sql/publication.sql",
                config
                    .tables
                    .iter()
                    .map(|t| t.qualified_name())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        ));
        return Ok(findings);
    };
    let (dml, truncate): (bool, bool) = (row.get(0), row.get(1));
    findings.push(if dml && truncate {
        Finding::ok(format!("publication {publication:?} exists"))
    } else {
        Finding::fail(
            format!("publication {publication:?} does not publish every operation"),
            format!(
                "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate');",
                quote_ident(publication)
            ),
        )
    });
    // Postgres 18 can publish stored generated columns (`publish_generated_columns =
    // stored`); the backfill and the reader leave them out, so streamed values would differ
    // from theirs. Read through to_jsonb so the query also runs on versions without the
    // column.
    let with_generated: Vec<String> = client
        .query(
            "SELECT DISTINCT pt.schemaname::text || '.' || pt.tablename::text \
             FROM pg_publication p \
             JOIN pg_publication_tables pt ON pt.pubname = p.pubname \
             JOIN pg_namespace n ON n.nspname = pt.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 \
               AND NOT a.attisdropped AND a.attgenerated = 's' \
             WHERE p.pubname = $1 AND to_jsonb(p) ->> 'pubgencols' = 's' ORDER BY 1",
            &[publication],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !with_generated.is_empty() {
        findings.push(Finding::fail(
            format!(
                "publication {publication:?} publishes stored generated columns \
                 (publish_generated_columns = stored) of {}: streamed values would hold \
                 columns that backfills and readers leave out",
                abbreviate(&with_generated, 5)
            ),
            format!(
                "ALTER PUBLICATION {} SET (publish_generated_columns = none);",
                quote_ident(publication)
            ),
        ));
    }
    // Tables published without a rule cost decoding and bandwidth for nothing.
    let published = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables \
             WHERE pubname = $1 ORDER BY 1, 2",
            &[publication],
        )
        .await?;
    let unruled: Vec<(String, String)> = published
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .filter(|(schema, name)| config.table(schema, name).is_none())
        .filter(|(schema, name)| {
            (schema.as_str(), name.as_str())
                != (
                    crate::daemon::backfill::control::SCHEMA,
                    crate::daemon::backfill::control::TABLE,
                )
        })
        .collect();
    if !unruled.is_empty() {
        let names: Vec<String> = unruled.iter().map(|(s, n)| format!("{s}.{n}")).collect();
        let fix = if unruled.len() <= 10 {
            format!(
                "ALTER PUBLICATION {} DROP TABLE {};  -- or add [[tables]] entries for them",
                quote_ident(publication),
                unruled
                    .iter()
                    .map(|(s, n)| quote_qualified(s, n))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            format!(
                "psql -v publication={publication} -v tables='<the configured tables>' -f sql/publication.sql"
            )
        };
        findings.push(Finding::warn(
            format!(
                "publication {publication:?} also publishes {} table(s) without a [[tables]] \
                 rule ({}): their changes are decoded and dropped",
                unruled.len(),
                abbreviate(&names, 5)
            ),
            fix,
        ));
    }
    Ok(findings)
}

async fn slot_findings(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    use crate::daemon::slot::{self, SlotState};
    let slot = &config.postgres.slot;
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active, \
                    pg_size_pretty(pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() \
                        THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, restart_lsn)), \
                    current_database()::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await?;
    let create = slot::recreate_sql(slot, false);
    let Some(row) = row else {
        return Ok(vec![Finding::fail(
            format!("replication slot {slot:?} does not exist"),
            format!("{create}  -- or psql -v slot={slot} -f sql/slot.sql"),
        )]);
    };
    let plugin: Option<String> = row.get(0);
    let slot_db: Option<String> = row.get(1);
    let active: bool = row.get(2);
    let retained: Option<String> = row.get(3);
    let db: String = row.get(4);
    let recreate = slot::recreate_sql(slot, true);
    let invalidated = match slot::slot_state(client, slot).await? {
        SlotState::Invalidated { reason, .. } => Some(reason),
        SlotState::Missing | SlotState::Usable => None,
    };
    Ok(vec![if plugin.as_deref() != Some("pgoutput") {
        Finding::fail(
            format!(
                "slot {slot:?} uses plugin {:?}, not pgoutput",
                plugin.unwrap_or_default()
            ),
            recreate,
        )
    } else if slot_db.as_deref() != Some(db.as_str()) {
        Finding::fail(
            format!(
                "slot {slot:?} belongs to database {:?}, not {db:?}",
                slot_db.unwrap_or_default()
            ),
            "point postgres.url at the slot's database, or create the slot in this one",
        )
    } else if let Some(reason) = invalidated {
        Finding::fail(
            format!(
                "slot {slot:?} was invalidated by Postgres ({}): the changes since its last \
                 confirmed position are gone from the WAL, so the cache cannot be brought up \
                 to date from it",
                slot::explain(&reason)
            ),
            format!(
                "set [postgres] recreate_lost_slot = true and start pgcache (it recreates the \
                 slot, drops the cached keys and backfills every mirror table); or by hand: \
                 {recreate} then redis-cli DEL '{}' so that the daemon rebuilds the cache",
                crate::checkpoint::checkpoint_key(&config.redis.key_prefix, slot)
            ),
        )
    } else {
        Finding::ok(format!(
            "slot {slot:?} exists (pgoutput, retains {}{})",
            retained.unwrap_or_else(|| "no WAL".into()),
            if active {
                ", in use by a consumer now"
            } else {
                ""
            }
        ))
    }])
}

/// `a, b, c and 4 more`.
fn abbreviate(items: &[String], max: usize) -> String {
    if items.len() <= max {
        items.join(", ")
    } else {
        format!("{} and {} more", items[..max].join(", "), items.len() - max)
    }
}

pub use crate::sql::{quote_ident, quote_qualified};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_print_level_and_fix() {
        let f = Finding::fail("slot missing", "SELECT 1;\nSELECT 2;");
        assert_eq!(
            f.to_string(),
            "FAIL slot missing\n     fix: SELECT 1;\n          SELECT 2;"
        );
        assert_eq!(Finding::ok("fine").to_string(), "OK   fine");
        assert!(Level::Fail > Level::Warn && Level::Warn > Level::Ok);
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(
            quote_qualified("public", "we\"ird"),
            "\"public\".\"we\"\"ird\""
        );
    }

    #[test]
    fn long_lists_are_abbreviated() {
        let items: Vec<String> = (1..=7).map(|i| format!("t{i}")).collect();
        assert_eq!(abbreviate(&items[..2], 5), "t1, t2");
        assert_eq!(abbreviate(&items, 5), "t1, t2, t3, t4, t5 and 2 more");
    }
}
