//! High availability: failover slots (Postgres 17+) on the primary, and what a physical
//! standby needs to keep a usable copy of the slot (`sync_replication_slots`,
//! `hot_standby_feedback`, `primary_slot_name`, `dbname` in `primary_conninfo`).
//!
//! Nothing here FAILs on a primary: a server without standbys needs none of it, and the
//! daemon runs without it (a promotion then loses the slot, which `recreate_lost_slot`
//! handles). Pointed at a standby, the daemon cannot stream at all: that FAILs.

use super::{quote_ident, Finding};
use crate::config::Config;
use crate::sql::quote_literal;

/// Postgres 17 brought failover slots.
const FAILOVER_SLOTS: i32 = 170_000;

/// The findings for the server `client` is connected to: a primary's failover settings,
/// or, on a standby, a FAIL (the daemon streams from the primary) and the standby's
/// findings.
pub(super) async fn failover_findings(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, pg_is_in_recovery()",
            &[],
        )
        .await?;
    let (version, in_recovery): (i32, bool) = (row.get(0), row.get(1));
    if in_recovery {
        let mut findings = vec![Finding::fail(
            "this server is a standby (in recovery): pgcache streams from the primary",
            "point postgres.url at the primary, or list every server with \
             target_session_attrs=read-write (postgres://primary,standby/db?target_session_attrs=read-write, \
             or host=primary,standby ... target_session_attrs=read-write)",
        )];
        findings.extend(standby_findings(client, config, "").await?);
        return Ok(findings);
    }
    let slot = &config.postgres.slot;
    let physical: Vec<(String, bool)> = client
        .query(
            "SELECT slot_name::text, active FROM pg_replication_slots \
             WHERE slot_type = 'physical' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let names: Vec<&str> = physical.iter().map(|(n, _)| n.as_str()).collect();
    let mut findings = Vec::new();
    if version < FAILOVER_SLOTS {
        if !physical.is_empty() {
            findings.push(no_failover_slots(
                version,
                config,
                &format!(
                "physical replication slot(s) {} (a standby's) exist here, but Postgres {} has \
                 no failover slots: a standby never gets a copy of slot {slot:?}, so \
                 promoting it loses the slot",
                names.join(", "),
                major(version)
            ),
            ));
        }
        return Ok(findings);
    }
    let failover: Option<Option<bool>> = client
        .query_opt(
            "SELECT (to_jsonb(s) ->> 'failover')::bool FROM pg_replication_slots s \
             WHERE slot_name = $1",
            &[slot],
        )
        .await?
        .map(|r| r.get(0));
    let Some(failover) = failover else {
        // No slot: the slot findings say so.
        return Ok(findings);
    };
    if failover == Some(true) {
        findings.push(Finding::ok(format!(
            "slot {slot:?} is a failover slot (standbys with sync_replication_slots = on keep \
             a copy of it)"
        )));
    } else if physical.is_empty() {
        findings.push(Finding::ok(format!(
            "slot {slot:?} is not a failover slot (no standby has a physical slot here, so \
             none would copy it)"
        )));
    } else {
        findings.push(Finding::warn(
            format!(
                "slot {slot:?} is not a failover slot: the standbys ({}) do not get a copy of \
                 it, so promoting one loses it",
                names.join(", ")
            ),
            format!(
                "with pgcache stopped: psql \"dbname={} replication=database\" -c \
                 'ALTER_REPLICATION_SLOT {} (FAILOVER true)'",
                current_database(client).await?,
                quote_ident(slot)
            ),
        ));
    }
    let listed: String = client
        .query_one("SELECT current_setting('synchronized_standby_slots')", &[])
        .await?
        .get(0);
    let listed: Vec<String> = listed
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if listed.is_empty() {
        if failover == Some(true) && !physical.is_empty() {
            findings.push(Finding::warn(
                format!(
                    "synchronized_standby_slots is empty: pgcache may receive (and put in Redis) \
                     changes that the standbys ({}) have not received yet; after promoting one, \
                     Redis would hold changes its Postgres never had",
                    names.join(", ")
                ),
                format!(
                    "ALTER SYSTEM SET synchronized_standby_slots = {}; SELECT pg_reload_conf();  \
                     -- the physical slots of the standbys that may be promoted",
                    quote_literal(&names.join(","))
                ),
            ));
        }
        return Ok(findings);
    }
    for name in &listed {
        match physical.iter().find(|(n, _)| n == name) {
            Some((_, active)) => findings.push(Finding::ok(format!(
                "synchronized_standby_slots lists {name:?} (a physical slot, {})",
                if *active {
                    "its standby streams now"
                } else {
                    "no standby streams from it now: logical walsenders wait for it"
                }
            ))),
            None => findings.push(Finding::warn(
                format!(
                    "synchronized_standby_slots lists {name:?}, which is no physical slot here: \
                     logical walsenders, pgcache's too, send nothing until it exists and its \
                     standby confirms"
                ),
                format!(
                    "SELECT pg_create_physical_replication_slot({}); and make it the standby's \
                     primary_slot_name; or drop it from synchronized_standby_slots (ALTER SYSTEM \
                     SET synchronized_standby_slots = '...'; SELECT pg_reload_conf();)",
                    quote_literal(name)
                ),
            )),
        }
    }
    Ok(findings)
}

/// What a physical standby needs to keep a usable copy of the slot, each finding's text
/// starting with `prefix` (e.g. `standby db2:5432: `).
///
/// # Errors
/// Only when a catalog query fails.
pub async fn standby_findings(
    client: &tokio_postgres::Client,
    config: &Config,
    prefix: &str,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let slot = &config.postgres.slot;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    let on_standby = |fix: &str| format!("on this standby: {fix}");
    if version < FAILOVER_SLOTS {
        return Ok(vec![no_failover_slots(
            version,
            config,
            &format!(
                "{prefix}Postgres {} has no failover slots: this standby has no copy of slot \
                 {slot:?}, so promoting it loses the slot",
                major(version)
            ),
        )]);
    }
    let mut findings = Vec::new();
    let setting = |name: &'static str| async move {
        client
            .query_one(
                "SELECT (SELECT setting FROM pg_settings WHERE name = $1)",
                &[&name],
            )
            .await
            .map(|r| r.get::<_, Option<String>>(0))
    };
    for name in ["sync_replication_slots", "hot_standby_feedback"] {
        let value = setting(name).await?;
        findings.push(if value.as_deref() == Some("on") {
            Finding::ok(format!("{prefix}{name} is on"))
        } else {
            Finding::warn(
                format!(
                    "{prefix}{name} is {}: {}",
                    value.as_deref().unwrap_or("unknown"),
                    if name == "sync_replication_slots" {
                        "this standby does not copy failover slots, so promoting it loses slot"
                    } else {
                        "the primary may remove catalog rows that the copy of the slot still \
                         needs, which invalidates it here"
                    }
                ),
                on_standby(&format!(
                    "ALTER SYSTEM SET {name} = on; SELECT pg_reload_conf();"
                )),
            )
        });
    }
    let primary_slot = setting("primary_slot_name").await?.unwrap_or_default();
    findings.push(if primary_slot.is_empty() {
        Finding::warn(
            format!(
                "{prefix}primary_slot_name is not set: slots are synchronized only to a \
                 standby that streams through a physical slot"
            ),
            on_standby(
                "ALTER SYSTEM SET primary_slot_name = 'standby1'; SELECT pg_reload_conf();  \
                 -- after SELECT pg_create_physical_replication_slot('standby1'); on the \
                 primary, which also lists it in synchronized_standby_slots",
            ),
        )
    } else {
        Finding::ok(format!("{prefix}primary_slot_name is {primary_slot:?}"))
    });
    // Superuser-only (it may hold a password): pg_settings hides it from roles without
    // pg_read_all_settings.
    let conninfo = setting("primary_conninfo").await?;
    findings.push(match conninfo {
        None => Finding::warn(
            format!(
                "{prefix}primary_conninfo cannot be read by this role, so whether it names \
                 dbname (which slot synchronization needs) was not checked"
            ),
            format!(
                "check it by hand (SHOW primary_conninfo; as a superuser), or GRANT \
                 pg_read_all_settings TO {};",
                quote_ident(&current_user(client).await?)
            ),
        ),
        Some(text) if has_dbname(&text) => {
            Finding::ok(format!("{prefix}primary_conninfo names dbname"))
        }
        Some(_) => Finding::warn(
            format!(
                "{prefix}primary_conninfo has no dbname: the slot synchronization worker cannot \
                 connect to the primary's database"
            ),
            on_standby(
                "ALTER SYSTEM SET primary_conninfo = '<as now> dbname=<the database>'; SELECT \
                 pg_reload_conf();",
            ),
        ),
    });
    let copy = client
        .query_opt(
            "SELECT (to_jsonb(s) ->> 'synced')::bool, temporary, wal_status \
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[slot],
        )
        .await?;
    findings.push(match copy {
        Some(row)
            if row.get::<_, Option<bool>>(0) == Some(true)
                && !row.get::<_, bool>(1)
                && row.get::<_, Option<String>>(2).as_deref() != Some("lost") =>
        {
            Finding::ok(format!(
                "{prefix}slot {slot:?} is synchronized (a promotion keeps it)"
            ))
        }
        _ => Finding::warn(
            format!(
                "{prefix}slot {slot:?} is not synchronized here (yet): promoting this standby \
                 now would lose it"
            ),
            "on the primary, make it a failover slot (sql/slot.sql does on Postgres 17+) and \
             list this standby's primary_slot_name in synchronized_standby_slots; here, \
             sync_replication_slots = on. The copy appears (synced, not temporary) once the \
             standby has caught up with the slot"
                .to_string(),
        ),
    });
    Ok(findings)
}

/// No failover slots on this version: OK when `recreate_lost_slot` is on (a promotion then
/// rebuilds the cache), else a WARN saying how to live with it.
fn no_failover_slots(_version: i32, config: &Config, what: &str) -> Finding {
    if config.postgres.recreate_lost_slot {
        Finding::ok(format!(
            "{what}; recreate_lost_slot is on, so pgcache then creates the slot again and \
             rebuilds the cache"
        ))
    } else {
        Finding::warn(
            what,
            "upgrade to Postgres 17+ for failover slots; until then set [postgres] \
             recreate_lost_slot = true, so that after a promotion pgcache creates the slot \
             again and rebuilds the cache instead of stopping",
        )
    }
}

fn major(version: i32) -> i32 {
    version / 10_000
}

/// Whether a libpq connection string names a database (`dbname=...`, as the slot
/// synchronization worker needs; a URL's path counts too).
fn has_dbname(conninfo: &str) -> bool {
    let text = conninfo.trim();
    if let Some(rest) = text
        .strip_prefix("postgres://")
        .or_else(|| text.strip_prefix("postgresql://"))
    {
        let path = rest.split(['?', '#']).next().unwrap_or("");
        return path.split_once('/').is_some_and(|(_, db)| !db.is_empty())
            || rest.contains("dbname=");
    }
    text.split_whitespace().any(|word| {
        word.split_once('=')
            .is_some_and(|(k, v)| k.trim() == "dbname" && !v.trim_matches('\'').is_empty())
    }) || text.contains("dbname =")
}

async fn current_database(
    client: &tokio_postgres::Client,
) -> Result<String, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0))
}

async fn current_user(client: &tokio_postgres::Client) -> Result<String, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT current_user::text", &[])
        .await?
        .get(0))
}

#[cfg(test)]
mod tests {
    use super::has_dbname;

    #[test]
    fn dbname_in_primary_conninfo() {
        assert!(has_dbname("host=a port=5432 user=rep dbname=app"));
        assert!(has_dbname("host=a dbname='app'"));
        assert!(has_dbname("postgres://rep@a:5432/app"));
        assert!(!has_dbname("host=a port=5432 user=rep"));
        assert!(!has_dbname("postgres://rep@a:5432"));
        assert!(!has_dbname(""));
    }
}
