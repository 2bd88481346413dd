//! `pgcache check`: the config, then the servers, each finding with its fix.

use std::path::Path;
use std::process::ExitCode;

use super::load;
use crate::config::Config;
use crate::pgconn::{self, PgTarget};
use crate::preflight::{self, Level};

pub(crate) async fn check(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    println!(
        "OK   config {} ({} tables)",
        path.display(),
        config.tables.len()
    );
    let mut worst = Level::Ok;
    match postgres_findings(&config).await {
        Ok(findings) => {
            for finding in findings {
                worst = worst.max(finding.level);
                println!("{finding}");
            }
        }
        Err(message) => {
            worst = Level::Fail;
            println!("FAIL {message}");
        }
    }
    match redis_ping(&config).await {
        Ok(()) => println!("OK   redis reachable"),
        Err(message) => {
            worst = Level::Fail;
            println!("FAIL redis: {message}\n     fix: check redis.url and that Redis is running");
        }
    }
    if worst == Level::Fail {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn postgres_findings(config: &Config) -> Result<Vec<preflight::Finding>, String> {
    let target =
        PgTarget::parse(config.postgres.url.expose()).map_err(|e| format!("postgres.url: {e}"))?;
    let client = pgconn::connect(&target)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", target.redacted()))?;
    preflight::postgres_findings(&client, config)
        .await
        .map_err(|e| format!("catalog query failed: {e}"))
}

async fn redis_ping(config: &Config) -> Result<(), String> {
    let client = redis::Client::open(config.redis.url.expose()).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
