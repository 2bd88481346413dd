//! `pgcache verify`: compare Redis with Postgres and report missing, stale and extra keys.
//!
//! Exit codes: 0 when they agree, 1 on drift (or when the comparison could not run), 2 when
//! the config is invalid or `--table` names no configured table.

use std::path::Path;
use std::process::ExitCode;

use super::load;
use crate::config::redact;
use crate::ops::verify::{self, Example, Report, VerifyError, VerifyOptions};

pub(crate) async fn verify(
    path: &Path,
    table: Option<&str>,
    sample: Option<u64>,
    json: bool,
) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let options = VerifyOptions {
        table: table.map(str::to_string),
        sample,
        ..VerifyOptions::default()
    };
    let report = match verify::verify(&config, &options).await {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {}", redact(&e.to_string()));
            return match e {
                VerifyError::UnknownTable { .. } => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            };
        }
    };
    if json {
        let mut value = serde_json::to_value(&report).unwrap_or_default();
        value["drift"] = serde_json::Value::Bool(report.drift());
        println!("{value}");
    } else {
        print!("{}", human(&report));
    }
    if report.drift() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn human(report: &Report) -> String {
    let mut out = String::new();
    for t in &report.tables {
        if !t.checked {
            out.push_str(&format!("{} ({}): not checked\n", t.table, t.mode));
        } else {
            out.push_str(&format!(
                "{} ({}): {} rows and {} keys checked: {} missing, {} stale, {} extra\n",
                t.table, t.mode, t.rows_checked, t.keys_checked, t.missing, t.stale, t.extra
            ));
        }
        for note in &t.notes {
            out.push_str(&format!("  note: {note}\n"));
        }
        for (kind, examples) in [
            ("missing", &t.examples.missing),
            ("stale", &t.examples.stale),
            ("extra", &t.examples.extra),
        ] {
            for e in examples {
                example(&mut out, kind, e);
            }
        }
    }
    if !report.settled {
        out.push_str(
            "note: the daemon did not catch up within the wait (stopped, or far behind): \
             differences may be changes still waiting in the replication slot\n",
        );
    }
    let drifted: Vec<&str> = report
        .tables
        .iter()
        .filter(|t| t.drift())
        .map(|t| t.table.as_str())
        .collect();
    if drifted.is_empty() {
        out.push_str("OK: Redis agrees with Postgres\n");
    } else {
        let keys: u64 = report
            .tables
            .iter()
            .map(|t| t.missing + t.stale + t.extra)
            .sum();
        out.push_str(&format!(
            "DRIFT: {keys} key(s) in {} table(s): {}\n",
            drifted.len(),
            drifted.join(", ")
        ));
    }
    out
}

fn example(out: &mut String, kind: &str, e: &Example) {
    out.push_str(&format!("  {kind:<8} {}\n", e.key));
    if kind == "stale" {
        if let Some(redis) = &e.redis {
            out.push_str(&format!("           redis:    {redis}\n"));
        }
        if let Some(postgres) = &e.postgres {
            out.push_str(&format!("           postgres: {postgres}\n"));
        }
    } else if let Some(redis) = &e.redis {
        out.push_str(&format!("           redis:    {redis}\n"));
    }
}
