//! The Grafana dashboard: valid JSON, one datasource input, and only metrics the code records.

use std::collections::BTreeSet;

use anyhow::{ensure, Context, Result};

use super::{deploy, files_under, read, repo};

/// Metric names (`pgcache_...`) in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(offset) = expr[i..].find("pgcache_") {
        let start = i + offset;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .map_or(expr.len(), |len| start + len);
        if boundary {
            names.push(expr[start..end].to_string());
        }
        i = end;
    }
    names
}

/// Whether (), [] and {} nest properly outside string literals: the cheapest PromQL typo check
/// without a Prometheus at hand.
fn brackets_balance(expr: &str) -> bool {
    let mut open = Vec::new();
    let mut quote = None;
    let mut escaped = false;
    for c in expr.chars() {
        if let Some(q) = quote {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                _ if c == q => quote = None,
                _ => {}
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '(' | '[' | '{' => open.push(c),
            ')' | ']' | '}' => {
                let expected = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if open.pop() != Some(expected) {
                    return false;
                }
            }
            _ => {}
        }
    }
    open.is_empty() && quote.is_none()
}

/// Every PromQL expression of the dashboard: panel targets (nested rows too) and variables.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &[serde_json::Value], out: &mut Vec<(String, String)>) {
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("?").to_string();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.clone(), expr.to_string()));
                }
            }
            walk(panel["panels"].as_array().map_or(&[], Vec::as_slice), out);
        }
    }
    let mut out = Vec::new();
    walk(
        dashboard["panels"].as_array().map_or(&[], Vec::as_slice),
        &mut out,
    );
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = variable["query"]["query"]
            .as_str()
            .or_else(|| variable["query"].as_str());
        if let Some(query) = query {
            out.push((format!("variable {}", variable["name"]), query.to_string()));
        }
    }
    out
}

#[test]
fn dashboard_queries_only_metrics_the_code_records() -> Result<()> {
    let path = deploy().join("grafana/pgcache-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&path)?).context("dashboard JSON")?;
    ensure!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    ensure!(
        dashboard["__inputs"]
            .as_array()
            .is_some_and(|inputs| inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS")),
        "the dashboard declares the DS_PROMETHEUS input"
    );
    for panel in dashboard["panels"].as_array().context("panels")? {
        if panel["type"] != "row" {
            ensure!(
                panel["datasource"]["uid"] == "${DS_PROMETHEUS}",
                "panel {} does not use ${{DS_PROMETHEUS}}",
                panel["title"]
            );
        }
    }

    // Names as they occur in the source, quoted: "pgcache_changes_total".
    let mut source = String::new();
    for file in files_under(&repo().join("src"), &[".rs"])? {
        source.push_str(&read(&file)?);
    }
    let recorded = |name: &str| source.contains(&format!("\"{name}\""));

    let mut used = BTreeSet::new();
    let mut unknown = Vec::new();
    for (panel, expr) in dashboard_queries(&dashboard) {
        ensure!(
            brackets_balance(&expr),
            "panel {panel}: unbalanced brackets in {expr}"
        );
        let names = metric_names(&expr);
        ensure!(
            !names.is_empty(),
            "panel {panel} queries no pgcache metric: {expr}"
        );
        for name in names {
            // Histograms are exported as <name>_bucket, _sum and _count.
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|base| recorded(base)))
                .unwrap_or(&name)
                .to_string();
            if recorded(&base) {
                used.insert(base);
            } else {
                unknown.push(format!("{name} (panel {panel})"));
            }
        }
    }
    ensure!(
        unknown.is_empty(),
        "the dashboard queries metrics that no source file under src/ names: {unknown:#?}"
    );

    // And it shows what an operator looks at first.
    for needed in [
        "pgcache_changes_total",
        "pgcache_transactions_total",
        "pgcache_replication_lag_bytes",
        "pgcache_apply_latency_seconds",
        "pgcache_batch_operations",
        "pgcache_errors_total",
        "pgcache_reconnects_total",
        "pgcache_reader_hits_total",
        "pgcache_reader_misses_total",
        "pgcache_reader_fills_total",
        "pgcache_reader_lost_fills_total",
        "pgcache_reader_fallbacks_total",
    ] {
        ensure!(used.contains(needed), "no panel shows {needed}");
    }
    Ok(())
}

#[test]
fn metric_names_are_found_in_expressions() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(pgcache_apply_latency_seconds_bucket{instance=~"$i"}[5m])))"#
        ),
        ["pgcache_apply_latency_seconds_bucket"]
    );
    assert_eq!(
        metric_names(
            "sum(rate(pgcache_reader_hits_total[1m])) / sum(rate(xpgcache_no[1m]))+pgcache_a"
        ),
        ["pgcache_reader_hits_total", "pgcache_a"]
    );
    assert!(metric_names("up").is_empty());
}

#[test]
fn brackets_balance_in_expressions() {
    assert!(brackets_balance(
        r#"sum by (le) (rate(m{a=~"x(", b="}"}[5m]))"#
    ));
    assert!(!brackets_balance("sum(rate(m[5m])"));
    assert!(!brackets_balance("sum(rate(m[5m)])"));
    assert!(!brackets_balance(r#"m{a="x}"#));
}
