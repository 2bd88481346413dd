//! `pgcache bench --quick`: every figure is measured and written to the JSON file.
//!
//! The numbers of a debug build's smoke run mean nothing; what is checked is that the
//! bench runs end to end and reports every figure with positive numbers, none failed.

use std::process::Command;

/// Every figure the full bench reports (latency rates as the quick run uses them).
const FIGURES: [&str; 20] = [
    "catchup.updates",
    "catchup.bulk_insert",
    "catchup.mixed",
    "memory.peak_rss",
    "latency.1000.p50",
    "latency.1000.p99",
    "latency.1000.p999",
    "latency.10000.p50",
    "latency.10000.p99",
    "latency.10000.p999",
    "latency.ryw.1000.p50",
    "latency.ryw.1000.p99",
    "backfill.rows",
    "reader.hit",
    "reader.stampede.db_reads",
    "reader.stampede.p99",
    "reader.hung_redis.p99",
    "cluster.catchup_spread",
    "cluster.catchup_tagged",
    "cluster.backfill",
];

#[test]
fn quick_bench_reports_every_figure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json_path = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_pgcache"))
        .args(["bench", "--quick", "--json"])
        .arg(&json_path)
        .current_dir(dir.path())
        .output()
        .expect("run pgcache bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pgcache bench --quick failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let text = std::fs::read_to_string(&json_path).expect("the JSON file");
    let report: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(report["quick"], true);
    let figures = report["figures"].as_array().expect("figures");
    for id in FIGURES {
        let figure = figures
            .iter()
            .find(|f| f["id"] == id)
            .unwrap_or_else(|| panic!("figure {id} missing from {text}"));
        assert!(
            figure["error"].is_null(),
            "{id} failed: {}\n{stderr}",
            figure["error"]
        );
        for field in ["pgcache", "floor", "ratio"] {
            let value = figure[field].as_f64().unwrap_or(-1.0);
            // A latency floor can be 0: the bare consumer often sees a row before the
            // writer's commit returns (`arrived_before_commit_returned`), and those count
            // as 0 ms, so at 1,000/s its p50 is sometimes exactly 0, and the ratio with it.
            let zero_is_a_result = id.starts_with("latency.") && field != "pgcache";
            if zero_is_a_result {
                assert!(value >= 0.0, "{id}.{field} is {}: {figure}", figure[field]);
            } else {
                assert!(value > 0.0, "{id}.{field} is {}: {figure}", figure[field]);
            }
        }
        assert!(
            stdout.contains(id),
            "the table does not list {id}:\n{stdout}"
        );
    }
    assert_eq!(figures.len(), FIGURES.len(), "unexpected figures in {text}");
}

/// `--only cluster`: its three figures, measured, with the
/// masters and every run in the details; nothing else.
#[test]
fn quick_cluster_bench_reports_its_figures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json_path = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_pgcache"))
        .args(["bench", "--quick", "--only", "cluster", "--json"])
        .arg(&json_path)
        .current_dir(dir.path())
        .output()
        .expect("run pgcache bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pgcache bench --quick --only cluster failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let text = std::fs::read_to_string(&json_path).expect("the JSON file");
    let report: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let figures = report["figures"].as_array().expect("figures");
    let ids: Vec<&str> = figures.iter().filter_map(|f| f["id"].as_str()).collect();
    assert_eq!(
        ids,
        [
            "cluster.catchup_spread",
            "cluster.catchup_tagged",
            "cluster.backfill"
        ],
        "{text}"
    );
    for figure in figures {
        assert!(figure["error"].is_null(), "{figure}\n{stderr}");
        for field in ["pgcache", "floor", "ratio"] {
            assert!(figure[field].as_f64().unwrap_or(-1.0) > 0.0, "{figure}");
        }
        assert_eq!(figure["details"]["masters"], 3, "{figure}");
        let runs = figure["details"]["runs"].as_array().expect("runs");
        let sides: Vec<&str> = runs.iter().filter_map(|r| r["side"].as_str()).collect();
        assert_eq!(
            sides,
            ["single", "cluster", "cluster", "single"],
            "{figure}"
        );
        assert!(
            runs.iter().all(|r| r["daemon_reconnects"].is_u64()),
            "{figure}"
        );
    }
}
