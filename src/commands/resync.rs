//! `pgcache resync`: asks the running daemon to backfill again. The request is a row of the
//! control table, so it travels through the replication stream itself: it needs no side
//! channel to the daemon, is handled in stream order by whichever daemon holds the slot, and
//! only roles allowed to write the control table can make it.

use std::path::Path;
use std::process::ExitCode;

use super::load;
use crate::config::Mode;
use crate::daemon::backfill::control::{self, Control};
use crate::pgconn::{self, PgTarget};

pub(crate) async fn resync(path: &Path, table: Option<&str>) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let table = match table {
        None => None,
        Some(name) => {
            let (schema, name) = name.split_once('.').unwrap_or(("public", name));
            match config.table(schema, name) {
                Some(rule) if rule.mode == Mode::Mirror => Some(rule.qualified_name()),
                Some(rule) => {
                    eprintln!(
                        "error: {} is in mode {}; only mirror tables are backfilled (the others \
                         are filled by readers)",
                        rule.qualified_name(),
                        rule.mode
                    );
                    return ExitCode::from(2);
                }
                None => {
                    eprintln!(
                        "error: {schema}.{name} is not a table in {}",
                        path.display()
                    );
                    return ExitCode::from(2);
                }
            }
        }
    };
    let target = match PgTarget::parse(config.postgres.url.expose()) {
        Ok(target) => target,
        Err(e) => {
            eprintln!("error: postgres.url: {e}");
            return ExitCode::from(2);
        }
    };
    let client = match pgconn::connect(&target).await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("error: cannot connect to {}: {e}", target.redacted());
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = control::emit(&client, &Control::Resync(table.clone())).await {
        eprintln!(
            "error: could not record the request in {}.{}: {e} (run sql/events.sql, and run \
             resync as the daemon's role)",
            control::SCHEMA,
            control::TABLE
        );
        return ExitCode::FAILURE;
    }
    match table {
        Some(table) => {
            println!("asked the daemon to backfill {table}; `pgcache status` shows its progress")
        }
        None => println!(
            "asked the daemon to backfill every mirror table; `pgcache status` shows the progress"
        ),
    }
    ExitCode::SUCCESS
}
