//! The control table (`pgcache.events`) and the partition triggers of `sql/events.sql`.

use super::Finding;
use crate::config::Config;
use crate::daemon::backfill::control::{SCHEMA, TABLE};

/// The control table must exist, be in the publication, and be writable by the daemon's
/// role and nobody else (it authenticates every control event); partitioned tables need the
/// triggers that report what the WAL does not show.
pub(super) async fn control_findings(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let publication = &config.postgres.publication;
    let fix = format!(
        "psql -v role=<the daemon's role> -v publication={publication} -f sql/events.sql  \
         (as a superuser)"
    );
    // By OID from the catalog: naming the table would need USAGE on its schema.
    let row = client
        .query_one(
            "SELECT c.oid IS NOT NULL, \
                    EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 \
                            AND schemaname = $2 AND tablename = $3), \
                    coalesce(has_schema_privilege(current_user, n.oid, 'USAGE') \
                             AND has_table_privilege(current_user, c.oid, 'INSERT'), false) \
             FROM (SELECT 1) one \
             LEFT JOIN pg_namespace n ON n.nspname = $2 \
             LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = $3",
            &[publication, &SCHEMA, &TABLE],
        )
        .await?;
    let (exists, published, can_insert): (bool, bool, bool) = (row.get(0), row.get(1), row.get(2));
    let name = format!("{SCHEMA}.{TABLE}");
    if !exists {
        return Ok(vec![Finding::fail(
            format!(
                "control table {name} does not exist: backfills, resync and partition events \
                 travel through it"
            ),
            fix,
        )]);
    }
    let mut findings = Vec::new();
    findings.push(if !published {
        Finding::fail(
            format!("control table {name} is not in publication {publication:?}"),
            format!("ALTER PUBLICATION \"{publication}\" ADD TABLE {SCHEMA}.{TABLE};"),
        )
    } else if !can_insert {
        Finding::fail(
            format!("the daemon's role cannot insert into the control table {name}"),
            fix.clone(),
        )
    } else {
        Finding::ok(format!(
            "control table {name} is published and writable by this role"
        ))
    });
    // Anyone else who can write the table can forge control events.
    let writers: Vec<String> = client
        .query(
            "SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE r.rolname::text END \
             FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a \
             LEFT JOIN pg_roles r ON r.oid = a.grantee \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 \
               AND a.privilege_type IN ('INSERT', 'UPDATE', 'TRUNCATE') \
               AND a.grantee <> c.relowner \
               AND (a.grantee = 0 OR r.rolname <> current_user) \
             ORDER BY 1",
            &[&SCHEMA, &TABLE],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !writers.is_empty() {
        findings.push(Finding::warn(
            format!(
                "roles other than the daemon's can write the control table {name} ({}), so they \
                 can forge backfill and resync requests",
                writers.join(", ")
            ),
            format!(
                "REVOKE INSERT, UPDATE, TRUNCATE ON {SCHEMA}.{TABLE} FROM {};",
                writers.join(", ")
            ),
        ));
    }
    // Partitioned tables: without the triggers, a TRUNCATE, DETACH or DROP of a partition
    // leaves keys whose rows are gone.
    let partitioned: Vec<String> = client
        .query(
            "SELECT format('%s.%s', schemaname, tablename) FROM pg_publication_tables t \
             JOIN pg_namespace n ON n.nspname = t.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename \
             WHERE t.pubname = $1 AND c.relkind = 'p' ORDER BY 1",
            &[publication],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !partitioned.is_empty() {
        let triggers: bool = client
            .query_one(
                "SELECT count(*) = 2 FROM pg_event_trigger \
                 WHERE evtname IN ('pgcache_ddl', 'pgcache_drop') AND evtenabled <> 'D'",
                &[],
            )
            .await?
            .get(0);
        findings.push(if triggers {
            Finding::ok(format!(
                "partition events are reported for {}",
                partitioned.join(", ")
            ))
        } else {
            Finding::warn(
                format!(
                    "partitioned tables {} are published but pgcache's event triggers are \
                     missing: a TRUNCATE, DETACH or DROP of one partition would leave keys \
                     whose rows are gone",
                    partitioned.join(", ")
                ),
                fix,
            )
        });
    }
    Ok(findings)
}
