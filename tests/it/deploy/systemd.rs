//! The systemd unit: its hardening directives, and `systemd-analyze verify` where it exists.

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use super::{deploy, read};

/// `[Section]` to its `Key=value` lines, in order, as systemd reads a unit (comments and blank
/// lines skipped). Repeated keys keep every value.
fn parse_unit(text: &str) -> Result<BTreeMap<String, Vec<(String, String)>>> {
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        ensure!(
            !line.ends_with('\\'),
            "line {}: continuation lines are not expected",
            number + 1
        );
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            sections.entry(name.to_string()).or_default();
            current = Some(name.to_string());
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("line {}: not `Key=value`: {line}", number + 1);
        };
        let section = current
            .as_ref()
            .with_context(|| format!("line {}: outside a section", number + 1))?;
        let key = key.trim();
        ensure!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric()),
            "line {}: odd key {key:?}",
            number + 1
        );
        sections
            .entry(section.clone())
            .or_default()
            .push((key.to_string(), value.trim().to_string()));
    }
    Ok(sections)
}

#[test]
fn systemd_unit_is_hardened() -> Result<()> {
    let path = deploy().join("systemd/pgcache.service");
    let sections = parse_unit(&read(&path)?)?;
    for name in ["Unit", "Service", "Install"] {
        ensure!(sections.contains_key(name), "no [{name}] section");
    }
    let values = |section: &str, key: &str| -> Vec<String> {
        sections[section]
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let has =
        |section: &str, key: &str, value: &str| values(section, key).iter().any(|v| v == value);
    let expected = [
        (
            "ExecStart",
            "/usr/local/bin/pgcache run --config /etc/pgcache/pgcache.toml",
        ),
        ("User", "pgcache"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "2"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("KillSignal", "SIGTERM"),
        ("TimeoutStopSec", "30"),
        ("EnvironmentFile", "-/etc/pgcache/env"),
    ];
    for (key, value) in expected {
        ensure!(
            has("Service", key, value),
            "[Service] lacks {key}={value}; has {:?}",
            values("Service", key)
        );
    }
    ensure!(
        !values("Service", "RestartSec").is_empty(),
        "[Service] lacks RestartSec"
    );
    let after = values("Unit", "After").join(" ");
    for unit in ["network-online.target", "postgresql.service"] {
        ensure!(
            after.split_whitespace().any(|u| u == unit),
            "After= lacks {unit}: {after}"
        );
    }
    ensure!(
        has("Install", "WantedBy", "multi-user.target"),
        "WantedBy=multi-user.target"
    );
    Ok(())
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() -> Result<()> {
    let available = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        println!("systemd-analyze was not found: only the unit's own structure is checked (systemd_unit_is_hardened)");
        return Ok(());
    }
    // verify checks that ExecStart's binary exists; /usr/local/bin/pgcache is not installed
    // here, so a copy runs this test binary instead (it only has to exist and be executable).
    let unit = read(&deploy().join("systemd/pgcache.service"))?;
    let exe = std::env::current_exe().context("locating the test binary")?;
    let copy = unit.replace("/usr/local/bin/pgcache", &exe.display().to_string());
    ensure!(
        copy != unit,
        "ExecStart does not run /usr/local/bin/pgcache"
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("pgcache.service");
    fs::write(&path, copy)?;

    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .context("running systemd-analyze verify")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Warnings about our unit name its file ("…/pgcache.service:37: Unknown key …") or the
    // unit ("pgcache.service: …"); other lines are about the machine's own units and setup.
    let about_us: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("pgcache.service"))
        .collect();
    ensure!(
        about_us.is_empty(),
        "systemd-analyze verify complains about the unit:\n{}",
        about_us.join("\n")
    );
    if !output.status.success() {
        println!(
            "systemd-analyze verify exited {} without naming the unit:\n{text}",
            output.status
        );
    }
    Ok(())
}
