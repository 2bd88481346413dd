//! `pgcache check`: the config, then the servers, each finding with its fix.
//!
//! Exit codes: 0 when nothing FAILs (WARNs allowed), 1 on any FAIL, 2 when the config is
//! invalid (nothing connects then).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::load;
use crate::config::{redact, Config};
use crate::pgconn::{self, PgTarget};
use crate::preflight::{self, Finding, Level};

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
                describe_pg_error(&e)
            )),
            "check that the role may read the catalogs (pg_replication_slots, pg_publication)",
        )),
    }
    findings
}

/// The server's message when there is one (tokio-postgres' Display says only "db error").
pub(crate) fn describe_pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}
