//! Server prerequisites: what Postgres must look like before the daemon can stream, each
//! finding with the SQL or setting that fixes it. `pgcache run` refuses to start on a FAIL;
//! `pgcache check` prints them all.

use std::fmt;

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
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
}

impl Finding {
    pub fn ok(what: impl Into<String>) -> Self {
        Finding {
            level: Level::Ok,
            what: what.into(),
            fix: None,
        }
    }
    pub fn warn(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            level: Level::Warn,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
    pub fn fail(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            level: Level::Fail,
            what: what.into(),
            fix: Some(fix.into()),
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

/// Checks the Postgres side: wal_level, publication, slot, tables, replica identity.
///
/// # Errors
/// Only when a catalog query itself fails; every finding about the server is a value.
pub async fn postgres_findings(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let mut findings = Vec::new();
    let slot = &config.postgres.slot;
    let publication = &config.postgres.publication;

    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    findings.push(if wal_level == "logical" {
        Finding::ok("wal_level is logical")
    } else {
        Finding::fail(
            format!("wal_level is {wal_level}; logical replication needs logical"),
            "ALTER SYSTEM SET wal_level = logical; then restart Postgres",
        )
    });

    let pub_row = client
        .query_opt(
            "SELECT pubinsert AND pubupdate AND pubdelete, pubtruncate, pubviaroot \
             FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await?;
    let setup_sql = format!(
        "psql -v publication={publication} -v tables='{}' -f sql/publication.sql",
        config
            .tables
            .iter()
            .map(|t| t.qualified_name())
            .collect::<Vec<_>>()
            .join(",")
    );
    match pub_row {
        None => findings.push(Finding::fail(
            format!("publication {publication:?} does not exist"),
            setup_sql.clone(),
        )),
        Some(row) => {
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
        }
    }

    let slot_row = client
        .query_opt(
            "SELECT plugin, database, slot_type, active, \
                    pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)), \
                    wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await?;
    let db: String = client
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);
    match slot_row {
        None => findings.push(Finding::fail(
            format!("replication slot {slot:?} does not exist"),
            format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');  -- or psql -v slot={slot} -f sql/slot.sql"),
        )),
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            let slot_db: Option<String> = row.get(1);
            let wal_status: Option<String> = row.get(5);
            if plugin.as_deref() != Some("pgoutput") {
                findings.push(Finding::fail(
                    format!("slot {slot:?} uses plugin {:?}, not pgoutput", plugin.unwrap_or_default()),
                    format!("SELECT pg_drop_replication_slot('{slot}'); SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');"),
                ));
            } else if slot_db.as_deref() != Some(db.as_str()) {
                findings.push(Finding::fail(
                    format!("slot {slot:?} belongs to database {:?}, not {db:?}", slot_db.unwrap_or_default()),
                    "point postgres.url at the slot's database, or create the slot in this one",
                ));
            } else if wal_status.as_deref() == Some("lost") {
                findings.push(Finding::fail(
                    format!("slot {slot:?} was invalidated (its WAL was removed, max_slot_wal_keep_size)"),
                    format!("SELECT pg_drop_replication_slot('{slot}'); SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput'); then delete the checkpoint key so pgcache backfills"),
                ));
            } else {
                let retained: Option<String> = row.get(4);
                findings.push(Finding::ok(format!(
                    "slot {slot:?} exists (pgoutput, retains {})",
                    retained.unwrap_or_else(|| "no WAL".into())
                )));
            }
        }
    }

    for rule in &config.tables {
        findings.extend(table_findings(client, config, rule).await?);
    }
    Ok(findings)
}

async fn table_findings(
    client: &tokio_postgres::Client,
    config: &Config,
    rule: &crate::config::TableRule,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let name = rule.qualified_name();
    let table = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_publication_tables p \
                            WHERE p.pubname = $3 AND p.schemaname = $1 AND p.tablename = $2) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&rule.schema, &rule.name, &config.postgres.publication],
        )
        .await?;
    let Some(table) = table else {
        return Ok(vec![Finding::fail(
            format!("table {name} does not exist"),
            "create it, or remove its [[tables]] entry",
        )]);
    };
    let oid: u32 = table.get(0);
    let identity: String = table.get(1);
    let published: bool = table.get(2);
    let mut findings = Vec::new();
    if !published {
        findings.push(Finding::fail(
            format!(
                "table {name} is not in publication {:?}",
                config.postgres.publication
            ),
            format!(
                "ALTER PUBLICATION {} ADD TABLE {};",
                quote_ident(&config.postgres.publication),
                quote_qualified(&rule.schema, &rule.name)
            ),
        ));
    }
    let columns: Vec<String> = client
        .query(
            "SELECT attname FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 \
             AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut missing: Vec<&str> = rule
        .key
        .columns()
        .iter()
        .map(String::as_str)
        .chain(rule.columns.iter().flatten().map(String::as_str))
        .filter(|c| !columns.iter().any(|have| have == c))
        .collect();
    missing.dedup();
    if !missing.is_empty() {
        findings.push(Finding::fail(
            format!("table {name} has no column {}", missing.join(", ")),
            format!(
                "fix tables[].key / tables[].columns for {name} (it has {})",
                columns.join(", ")
            ),
        ));
    }
    // Columns Postgres sends in the old image of a DELETE (or a key-changing UPDATE).
    let identity_columns: Vec<String> = match identity.as_str() {
        "f" => columns.clone(),
        "n" => Vec::new(),
        "d" | "i" => {
            let index_cond = if identity == "d" {
                "i.indisprimary"
            } else {
                "i.indisreplident"
            };
            client
                .query(
                    &format!(
                        "SELECT a.attname FROM pg_index i \
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                         WHERE i.indrelid = $1 AND {index_cond}"
                    ),
                    &[&oid],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect()
        }
        _ => Vec::new(),
    };
    let full_fix = format!(
        "ALTER TABLE {} REPLICA IDENTITY FULL;",
        quote_qualified(&rule.schema, &rule.name)
    );
    if identity_columns.is_empty() {
        findings.push(Finding::fail(
            format!(
                "table {name} has no usable replica identity (no primary key), so Postgres \
                 rejects its UPDATEs and DELETEs once it is published"
            ),
            format!("add a primary key, or {full_fix}"),
        ));
    } else {
        let outside: Vec<&str> = rule
            .key
            .columns()
            .iter()
            .map(String::as_str)
            .filter(|c| !identity_columns.iter().any(|i| i == c))
            .collect();
        if outside.is_empty() {
            findings.push(Finding::ok(format!(
                "table {name}: key columns are in its replica identity ({})",
                if identity == "f" { "FULL" } else { "key" }
            )));
        } else {
            findings.push(Finding::fail(
                format!(
                    "table {name}: key column {} is not in the replica identity, so deletes \
                     and key changes could not find the old key",
                    outside.join(", ")
                ),
                full_fix,
            ));
        }
    }
    Ok(findings)
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn quote_qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}
