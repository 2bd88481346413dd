//! `pgcache check`: the config, then the servers, each finding with its fix.
//!
//! Exit codes: 0 when nothing FAILs (WARNs allowed), 1 on any FAIL, 2 when the config is
//! invalid (nothing connects then).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::load;
use crate::config::{redact, Config};
use crate::ops::preflight::{self, quote_qualified, Finding, Level};
use crate::pgconn::{self, PgTarget};

/// How long `check` waits for Postgres before calling it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn check(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let mut findings = vec![Finding::ok(format!(
        "config {} ({} tables)",
        path.display(),
        config.tables.len()
    ))];
    findings.extend(postgres_findings(&config).await);
    findings.extend(reader_findings(&config).await);
    findings.extend(preflight::redis_findings(&config).await);
    let mut worst = Level::Ok;
    for finding in &findings {
        worst = worst.max(finding.level);
        println!("{finding}");
    }
    let count = |level| findings.iter().filter(|f| f.level == level).count();
    println!(
        "\n{} OK, {} WARN, {} FAIL",
        count(Level::Ok),
        count(Level::Warn),
        count(Level::Fail)
    );
    if worst == Level::Fail {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn postgres_findings(config: &Config) -> Vec<Finding> {
    let target = match PgTarget::parse(config.postgres.url.expose()) {
        Ok(target) => target,
        Err(e) => {
            return vec![Finding::fail(
            redact(&format!("postgres.url: {e}")),
            "fix postgres.url (examples: postgres://user@host/db, host=/run/postgresql dbname=app)",
        )]
        }
    };
    let unreachable = |problem: String| {
        vec![Finding::fail(
            redact(&format!(
                "postgres {} is not reachable: {problem}",
                target.redacted()
            )),
            "check postgres.url, that Postgres is running, and pg_hba.conf for this role",
        )]
    };
    let client = match tokio::time::timeout(CONNECT_TIMEOUT, pgconn::connect(&target)).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => return unreachable(e.to_string()),
        Err(_) => return unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")),
    };
    let mut findings = vec![Finding::ok(format!(
        "postgres {} reachable",
        target.redacted()
    ))];
    match preflight::postgres_findings(&client, config).await {
        Ok(more) => findings.extend(more),
        Err(e) => findings.push(Finding::fail(
            redact(&format!(
                "a catalog query failed: {}",
                crate::sql::describe_error(&e)
            )),
            "check that the role may read the catalogs (pg_replication_slots, pg_publication)",
        )),
    }
    if target.endpoints().len() > 1 {
        findings.extend(standby_hosts_findings(config, &target).await);
    }
    findings
}

/// With several hosts in postgres.url, each one that is a standby: whether it keeps a
/// usable copy of the slot for when it is promoted. A host that does not answer is a WARN
/// (it may be a failed primary); one that accepts writes was checked above.
async fn standby_hosts_findings(config: &Config, target: &PgTarget) -> Vec<Finding> {
    let mut findings = Vec::new();
    for endpoint in target.endpoints() {
        let host = target.at(endpoint);
        let client =
            match tokio::time::timeout(CONNECT_TIMEOUT, pgconn::connect(&host)).await {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => {
                    findings.push(Finding::warn(
                    redact(&format!("host {endpoint} of postgres.url is not reachable: {e}")),
                    "if it is a standby, check that it runs and pg_hba.conf admits this role; a \
                     failed primary can be left in the list",
                ));
                    continue;
                }
                Err(_) => {
                    findings.push(Finding::warn(
                        format!(
                        "host {endpoint} of postgres.url gave no answer within {CONNECT_TIMEOUT:?}"
                    ),
                        "if it is a standby, check that it runs; a failed primary can be left in \
                     the list",
                    ));
                    continue;
                }
            };
        let in_recovery = match client.query_one("SELECT pg_is_in_recovery()", &[]).await {
            Ok(row) => row.get::<_, bool>(0),
            Err(e) => {
                findings.push(Finding::warn(
                    format!("host {endpoint}: {}", crate::sql::describe_error(&e)),
                    "check that the role may connect to it",
                ));
                continue;
            }
        };
        if !in_recovery {
            continue;
        }
        match preflight::standby_findings(&client, config, &format!("standby {endpoint}: ")).await {
            Ok(more) => findings.extend(more),
            Err(e) => findings.push(Finding::warn(
                format!(
                    "standby {endpoint}: a catalog query failed: {}",
                    crate::sql::describe_error(&e)
                ),
                "check that the role may read pg_settings and pg_replication_slots there",
            )),
        }
    }
    findings
}

/// The read helper's role (`[reader] url`), when the config names one: it should read the
/// cached tables and nothing else, since every application process holds its password.
/// Nothing here FAILs: the daemon does not use this role.
async fn reader_findings(config: &Config) -> Vec<Finding> {
    let Some(url) = &config.reader.url else {
        return Vec::new();
    };
    let target = match PgTarget::parse(url.expose()) {
        Ok(target) => target,
        Err(e) => {
            return vec![Finding::warn(
                redact(&format!("reader.url: {e}")),
                "fix reader.url (examples: postgres://app_reader@host/db)",
            )]
        }
    };
    let unchecked = |problem: String| {
        vec![Finding::warn(
            redact(&format!(
                "reader {} is not reachable, so its privileges were not checked: {problem}",
                target.redacted()
            )),
            "check reader.url, and pg_hba.conf for this role",
        )]
    };
    let client = match tokio::time::timeout(CONNECT_TIMEOUT, pgconn::connect(&target)).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => return unchecked(e.to_string()),
        Err(_) => return unchecked(format!("no answer within {CONNECT_TIMEOUT:?}")),
    };
    match reader_role_findings(&client, config).await {
        Ok(findings) => findings,
        Err(e) => unchecked(crate::sql::describe_error(&e)),
    }
}

async fn reader_role_findings(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_user::text, rolsuper, rolreplication \
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (role, superuser, replication): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
    let mut findings = Vec::new();
    let powers: Vec<&str> = [
        (superuser, "is a superuser"),
        (replication, "has REPLICATION"),
    ]
    .into_iter()
    .filter_map(|(has, what)| has.then_some(what))
    .collect();
    findings.push(if powers.is_empty() {
        Finding::ok(format!(
            "reader role {role:?} is neither a superuser nor REPLICATION"
        ))
    } else {
        Finding::warn(
            format!(
                "reader role {role:?} (reader.url) {}: every application that uses the read \
                 helper holds this password, and with it can {}",
                powers.join(" and "),
                if superuser {
                    "do anything on the server"
                } else {
                    "read every change to every table through a replication slot"
                }
            ),
            format!(
                "psql -v role=pgcache_reader -v password=... -v tables='{}' -f sql/reader_role.sql, \
                 then use that role in reader.url; or ALTER ROLE {} NOSUPERUSER NOREPLICATION;",
                config
                    .tables
                    .iter()
                    .map(|t| t.qualified_name())
                    .collect::<Vec<_>>()
                    .join(","),
                preflight::quote_ident(&role)
            ),
        )
    });
    for rule in &config.tables {
        let relation = quote_qualified(&rule.schema, &rule.name);
        let row = client
            .query_one(
                "SELECT has_table_privilege(to_regclass($1), 'SELECT')",
                &[&relation],
            )
            .await?;
        // NULL: no such table, which the daemon's checks report.
        if row.get::<_, Option<bool>>(0) == Some(false) {
            findings.push(Finding::warn(
                format!(
                    "reader role {role:?} cannot SELECT {}: its cache misses will fail",
                    rule.qualified_name()
                ),
                format!(
                    "GRANT SELECT ON {relation} TO {};",
                    preflight::quote_ident(&role)
                ),
            ));
        }
    }
    Ok(findings)
}
