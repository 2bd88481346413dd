//! One configured table: it exists, it is published, its columns are there, deletes can
//! find their key (replica identity), and the role may read it (backfill and fills).

use super::{quote_ident, quote_qualified, Finding};
use crate::config::{Config, Mode, TableRule};

pub(super) async fn table_findings(
    client: &tokio_postgres::Client,
    config: &Config,
    rule: &TableRule,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let name = rule.qualified_name();
    let table = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_publication_tables p \
                            WHERE p.pubname = $3 AND p.schemaname = $1 AND p.tablename = $2), \
                    has_table_privilege(c.oid, 'SELECT'), current_user::text, \
                    has_schema_privilege(n.oid, 'USAGE') \
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
    let can_select: bool = table.get(3);
    let role: String = table.get(4);
    let schema_usage: bool = table.get(5);
    let qualified = quote_qualified(&rule.schema, &rule.name);
    let mut findings = Vec::new();
    if !published && publishes_partitions_alone(client, config, oid).await? {
        findings.push(Finding::fail(
            format!(
                "table {name} is partitioned, and publication {:?} publishes its partitions \
                 under their own names (publish_via_partition_root is off), so no change would \
                 arrive under {name}",
                config.postgres.publication
            ),
            format!(
                "ALTER PUBLICATION {} SET (publish_via_partition_root = true);",
                quote_ident(&config.postgres.publication),
            ),
        ));
    } else if !published {
        findings.push(Finding::fail(
            format!(
                "table {name} is not in publication {:?}, so none of its changes would arrive",
                config.postgres.publication
            ),
            format!(
                "ALTER PUBLICATION {} ADD TABLE {qualified};",
                quote_ident(&config.postgres.publication),
            ),
        ));
    }
    if published {
        findings.extend(row_filter_finding(client, config, rule).await?);
    }
    let columns: Vec<(String, bool)> = crate::sql::table_columns(client, &rule.schema, &rule.name)
        .await?
        .map(|(_, attributes)| {
            attributes
                .into_iter()
                .map(|a| (a.name, a.generated))
                .collect()
        })
        .unwrap_or_default();
    let wanted = wanted_columns(rule, &columns);
    let mut missing: Vec<&str> = wanted
        .iter()
        .copied()
        .chain(
            rule.invalidate
                .iter()
                .flat_map(|inv| inv.key.columns().iter().map(String::as_str)),
        )
        .filter(|c| !columns.iter().any(|(have, _)| have == c))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if !missing.is_empty() {
        findings.push(Finding::fail(
            format!("table {name} has no column {}", missing.join(", ")),
            format!(
                "fix tables[].key / tables[].columns for {name} (it has {})",
                columns
                    .iter()
                    .map(|(c, _)| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    findings.push(identity_finding(client, rule, oid, &identity, &columns).await?);
    let access = Access {
        can_select,
        schema_usage,
        role: &role,
    };
    if let Some(finding) = privilege_finding(client, rule, oid, &access, &wanted).await? {
        findings.push(finding);
    }
    Ok(findings)
}

/// The columns the daemon reads: the key's, then the rule's (or every column but the
/// generated ones, which logical replication does not send).
fn wanted_columns<'a>(rule: &'a TableRule, columns: &'a [(String, bool)]) -> Vec<&'a str> {
    let mut wanted: Vec<&str> = rule.key.columns().iter().map(String::as_str).collect();
    match &rule.columns {
        Some(list) => wanted.extend(list.iter().map(String::as_str)),
        None => wanted.extend(
            columns
                .iter()
                .filter(|(_, generated)| !generated)
                .map(|(c, _)| c.as_str()),
        ),
    }
    let mut seen = std::collections::HashSet::new();
    wanted.retain(|c| seen.insert(*c));
    wanted
}

/// A DELETE (or a key-changing UPDATE) carries only the replica identity columns of the old
/// row; the key template must be computable from them, or the old key could not be found.
async fn identity_finding(
    client: &tokio_postgres::Client,
    rule: &TableRule,
    oid: u32,
    identity: &str,
    columns: &[(String, bool)],
) -> Result<Finding, tokio_postgres::Error> {
    let name = rule.qualified_name();
    let identity_columns: Vec<String> = match identity {
        "f" => columns.iter().map(|(c, _)| c.clone()).collect(),
        "d" | "i" => {
            let index_cond = if identity == "d" {
                "i.indisprimary"
            } else {
                "i.indisreplident"
            };
            client
                .query(
                    &format!(
                        "SELECT a.attname::text FROM pg_index i \
                         JOIN pg_attribute a ON a.attrelid = i.indrelid \
                                            AND a.attnum = ANY(i.indkey) \
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
        return Ok(Finding::fail(
            format!(
                "table {name} has no usable replica identity ({}), so Postgres rejects its \
                 UPDATEs and DELETEs once it is published",
                if identity == "n" {
                    "REPLICA IDENTITY NOTHING"
                } else {
                    "no primary key"
                }
            ),
            format!("add a primary key, or {full_fix}"),
        ));
    }
    let outside: Vec<&str> = rule
        .key
        .columns()
        .iter()
        .map(String::as_str)
        .filter(|c| !identity_columns.iter().any(|i| i == c))
        .collect();
    // Invalidation keys are rendered from the old row too (an update that moves an order
    // to another user deletes both users' lists), and the old row carries only the replica
    // identity.
    let mut invalidation_outside: Vec<String> = Vec::new();
    for inv in &rule.invalidate {
        for c in inv.key.columns() {
            if columns.iter().any(|(have, _)| have == c) && !identity_columns.iter().any(|i| i == c)
            {
                invalidation_outside.push(format!(
                    "{c:?} (of invalidation key {:?})",
                    inv.key.as_str()
                ));
            }
        }
    }
    if outside.is_empty() && !invalidation_outside.is_empty() {
        return Ok(Finding::fail(
            format!(
                "table {name}: invalidation key column {} is not in the replica identity ({}), \
                 so updates and deletes could not name the old row's key, which would stay \
                 stale; the rule needs REPLICA IDENTITY FULL",
                invalidation_outside.join(", "),
                identity_columns.join(", ")
            ),
            full_fix,
        ));
    }
    Ok(if outside.is_empty() {
        Finding::ok(format!(
            "table {name}: key columns are in its replica identity ({})",
            match identity {
                "f" => "FULL",
                "i" => "index",
                _ => "primary key",
            }
        ))
    } else {
        Finding::fail(
            format!(
                "table {name}: key column {} is not in the replica identity ({}), so deletes \
                 and key changes could not find the old key; the rule needs REPLICA IDENTITY FULL",
                outside.join(", "),
                identity_columns.join(", ")
            ),
            full_fix,
        )
    })
}

/// What the connected role may do with a table.
struct Access<'a> {
    can_select: bool,
    schema_usage: bool,
    role: &'a str,
}

/// Backfill (mirror tables) and the read helper's fills read rows with ordinary SELECTs. A
/// mirror table the role cannot read cannot be loaded, so that is a FAIL; for the other
/// modes only the read helper needs it, and it may use another role.
async fn privilege_finding(
    client: &tokio_postgres::Client,
    rule: &TableRule,
    oid: u32,
    access: &Access<'_>,
    wanted: &[&str],
) -> Result<Option<Finding>, tokio_postgres::Error> {
    let name = rule.qualified_name();
    let role = access.role;
    let mut fixes = Vec::new();
    let mut problems = Vec::new();
    if !access.schema_usage {
        problems.push(format!("no USAGE on schema {:?}", rule.schema));
        fixes.push(format!(
            "GRANT USAGE ON SCHEMA {} TO {};",
            quote_ident(&rule.schema),
            quote_ident(role)
        ));
    }
    if !access.can_select {
        // Column privileges are enough when they cover every column the daemon reads.
        let mut denied = Vec::new();
        for column in wanted {
            let allowed: Option<bool> = client
                .query_opt(
                    "SELECT has_column_privilege($1::oid, a.attnum, 'SELECT') FROM pg_attribute a \
                     WHERE a.attrelid = $1::oid AND a.attname = $2::text AND NOT a.attisdropped",
                    &[&oid, column],
                )
                .await?
                .and_then(|r| r.get(0));
            if allowed == Some(false) {
                denied.push(*column);
            }
        }
        if !denied.is_empty() {
            problems.push(format!(
                "no SELECT on {name} (columns {})",
                denied.join(", ")
            ));
            fixes.push(format!(
                "GRANT SELECT ON TABLE {} TO {};",
                quote_qualified(&rule.schema, &rule.name),
                quote_ident(role)
            ));
        }
    }
    if problems.is_empty() {
        return Ok(None);
    }
    let fix = fixes.join(" ");
    let what = format!("role {role:?} has {}", problems.join(" and "));
    Ok(Some(if rule.mode == Mode::Mirror {
        Finding::fail(format!("{what}, so the daemon cannot backfill it"), fix)
    } else {
        Finding::warn(
            format!("{what}; the read helper cannot fill misses if it connects as this role"),
            fix,
        )
    }))
}

/// A publication row filter (`ADD TABLE t WHERE (...)`, Postgres 15+): the backfill reads
/// every row but the stream brings only the filtered ones' changes, so the others would
/// stay as first read, for good.
async fn row_filter_finding(
    client: &tokio_postgres::Client,
    config: &Config,
    rule: &TableRule,
) -> Result<Option<Finding>, tokio_postgres::Error> {
    let filter: Option<String> = client
        .query_opt(
            "SELECT rowfilter FROM pg_publication_tables \
             WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&config.postgres.publication, &rule.schema, &rule.name],
        )
        .await?
        .and_then(|row| row.get(0));
    Ok(filter.map(|filter| {
        let qualified = quote_qualified(&rule.schema, &rule.name);
        Finding::fail(
            format!(
                "table {} is published with a row filter (WHERE {filter}): changes to rows \
                 outside it never arrive, so their cached values would go stale",
                rule.qualified_name()
            ),
            format!(
                "ALTER PUBLICATION {pubname} DROP TABLE {qualified}; \
                 ALTER PUBLICATION {pubname} ADD TABLE {qualified};",
                pubname = quote_ident(&config.postgres.publication),
            ),
        )
    }))
}

/// Whether `oid` is a partitioned table whose partitions the publication carries under their
/// own names (`publish_via_partition_root = false`).
async fn publishes_partitions_alone(
    client: &tokio_postgres::Client,
    config: &Config,
    oid: u32,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_publication p ON p.pubname = $1 \
                            WHERE c.oid = $2 AND c.relkind = 'p' AND NOT p.pubviaroot)",
            &[&config.postgres.publication, &oid],
        )
        .await?;
    Ok(row.get(0))
}
