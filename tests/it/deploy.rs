//! Checks of `deploy/`: every manifest parses and says what the daemon needs, the configs load,
//! the dashboard only queries metrics the code records, the systemd unit passes
//! `systemd-analyze verify` (where it exists), and the compose init script really prepares a
//! Postgres server.
//!
//! Nothing here needs Docker or Kubernetes: the files are read as data and checked against
//! the code (metric names, config loader, SQL scripts).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, ensure, Context, Result};
use pgcache::config::{Config, LogFormat};
use pgcache::testkit::{TestPostgres, TestRedis};
use serde::Deserialize;
use serde_norway::Value;

mod grafana;
mod systemd;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Every file under `dir` (recursively) whose name ends with one of `exts`, sorted.
fn files_under(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if exts.iter().any(|ext| path.to_string_lossy().ends_with(ext)) {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// All documents of a YAML stream (`---` separated), without empty ones.
fn yaml_documents(path: &Path) -> Result<Vec<Value>> {
    let text = read(path)?;
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let value =
            Value::deserialize(doc).with_context(|| format!("parsing {}", path.display()))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The one document of a YAML file that must hold exactly one.
fn yaml_document(path: &Path) -> Result<Value> {
    let mut docs = yaml_documents(path)?;
    ensure!(
        docs.len() == 1,
        "{}: expected one YAML document, found {}",
        path.display(),
        docs.len()
    );
    Ok(docs.remove(0))
}

/// Follows `path` (mapping keys, or sequence indexes written as numbers) into `value`.
fn at<'a>(value: &'a Value, path: &[&str]) -> Result<&'a Value> {
    let mut here = value;
    for (depth, step) in path.iter().enumerate() {
        let next = match (here, step.parse::<usize>()) {
            (Value::Sequence(items), Ok(index)) => items.get(index),
            _ => here.get(*step),
        };
        here = next.with_context(|| format!("no `{}`", path[..=depth].join(".")))?;
    }
    Ok(here)
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Result<&'a str> {
    at(value, path)?
        .as_str()
        .with_context(|| format!("`{}` is not a string", path.join(".")))
}

fn seq_at<'a>(value: &'a Value, path: &[&str]) -> Result<&'a Vec<Value>> {
    at(value, path)?
        .as_sequence()
        .with_context(|| format!("`{}` is not a list", path.join(".")))
}

/// A compose `command` as one string, whether written as a list or a string.
fn command_line(value: &Value) -> String {
    match value {
        Value::Sequence(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.clone(),
                other => serde_norway::to_string(other)
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            })
            .collect::<Vec<_>>()
            .join(" "),
        Value::String(s) => s.clone(),
        _ => String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// YAML: compose and Kubernetes

#[test]
fn every_yaml_file_under_deploy_parses() -> Result<()> {
    let files = files_under(&deploy(), &[".yaml", ".yml"])?;
    let names: BTreeSet<String> = files
        .iter()
        .filter_map(|p| p.strip_prefix(deploy()).ok())
        .map(|p| p.display().to_string())
        .collect();
    for expected in [
        "compose.yaml",
        "k8s/configmap.yaml",
        "k8s/secret.yaml",
        "k8s/deployment.yaml",
        "k8s/service.yaml",
        "k8s/kustomization.yaml",
    ] {
        ensure!(
            names.contains(expected),
            "deploy/{expected} is missing; found {names:?}"
        );
    }
    for file in &files {
        let docs = yaml_documents(file)?;
        ensure!(
            !docs.is_empty(),
            "{} holds no YAML document",
            file.display()
        );
    }
    Ok(())
}

#[test]
fn compose_runs_postgres_redis_and_pgcache() -> Result<()> {
    let compose = yaml_document(&deploy().join("compose.yaml"))?;
    let services = at(&compose, &["services"])?;
    for name in ["postgres", "redis", "pgcache"] {
        ensure!(
            services.get(name).is_some(),
            "compose has no `{name}` service"
        );
    }

    let postgres = at(services, &["postgres"])?;
    ensure!(
        str_at(postgres, &["image"])?.starts_with("postgres:16"),
        "Postgres 16 image"
    );
    let command = command_line(at(postgres, &["command"])?);
    ensure!(
        command.contains("wal_level=logical"),
        "postgres command lacks wal_level=logical: {command}"
    );
    ensure!(
        command.contains("max_slot_wal_keep_size="),
        "postgres command lacks max_slot_wal_keep_size: {command}"
    );

    let redis = at(services, &["redis"])?;
    ensure!(
        str_at(redis, &["image"])?.starts_with("redis:7"),
        "Redis 7 image"
    );
    let command = command_line(at(redis, &["command"])?);
    ensure!(
        command.contains("--appendonly yes"),
        "redis command lacks --appendonly yes: {command}"
    );
    // An EXEC acknowledged by a Redis that fsyncs only every second can still be lost, so
    // either Redis fsyncs every write or pgcache delays its confirmations to Postgres.
    if !command.contains("--appendfsync always") {
        let toml = read(&deploy().join("compose/pgcache.toml"))?;
        let config =
            Config::from_toml_str(&toml).map_err(|e| anyhow!("compose/pgcache.toml: {e}"))?;
        ensure!(
            config.apply.confirm_delay >= std::time::Duration::from_secs(1),
            "redis runs without --appendfsync always, so apply.confirm_delay must cover the fsync interval"
        );
    }

    for name in ["postgres", "redis", "pgcache"] {
        let test = command_line(at(services, &[name, "healthcheck", "test"])?);
        ensure!(!test.is_empty(), "`{name}` has an empty healthcheck");
    }
    for dependency in ["postgres", "redis"] {
        let condition = str_at(
            services,
            &["pgcache", "depends_on", dependency, "condition"],
        )?;
        ensure!(
            condition == "service_healthy",
            "pgcache waits for {dependency}: {condition}"
        );
    }

    // The build points at our Dockerfile from the repository root.
    let pgcache = at(services, &["pgcache"])?;
    let context = deploy().join(str_at(pgcache, &["build", "context"])?);
    let dockerfile = context.join(str_at(pgcache, &["build", "dockerfile"])?);
    ensure!(
        dockerfile.is_file(),
        "compose builds {} which does not exist",
        dockerfile.display()
    );
    ensure!(
        context.join("Cargo.toml").is_file(),
        "build context {} is not the crate root",
        context.display()
    );

    // Every bind mount's host side exists (a typo would make Docker create an empty dir).
    for (name, service) in services.as_mapping().context("services is not a mapping")? {
        let Ok(volumes) = seq_at(service, &["volumes"]) else {
            continue;
        };
        for volume in volumes {
            let spec = volume.as_str().context("volume entries are strings")?;
            let host = spec.split(':').next().unwrap_or_default();
            if host.starts_with('.') || host.starts_with('/') {
                let path = deploy().join(host);
                ensure!(
                    path.exists(),
                    "{name:?} mounts {host}, which does not exist ({})",
                    path.display()
                );
            }
        }
    }
    let mounts = command_line(at(pgcache, &["volumes"])?);
    ensure!(
        mounts.contains("./compose/pgcache.toml:/etc/pgcache/pgcache.toml"),
        "pgcache's config is mounted where the image's CMD reads it: {mounts}"
    );

    // The daemon's URL names the role, password and database that initdb.sh creates.
    let password = str_at(postgres, &["environment", "PGCACHE_PASSWORD"])?;
    let db = str_at(postgres, &["environment", "POSTGRES_DB"])?;
    let url = str_at(pgcache, &["environment", "PGCACHE__POSTGRES__URL"])?;
    ensure!(
        url == format!("postgres://pgcache:{password}@postgres:5432/{db}"),
        "PGCACHE__POSTGRES__URL {url} does not match the role initdb.sh creates"
    );
    let listen = str_at(pgcache, &["environment", "PGCACHE__METRICS__LISTEN"])?;
    ensure!(
        listen == "0.0.0.0:9187",
        "metrics must listen on all interfaces in a container"
    );
    Ok(())
}

/// The Kubernetes manifests by kind (each file holds one or more documents).
fn k8s_objects() -> Result<BTreeMap<String, Value>> {
    let mut objects = BTreeMap::new();
    for file in files_under(&deploy().join("k8s"), &[".yaml", ".yml"])? {
        for doc in yaml_documents(&file)? {
            let kind = str_at(&doc, &["kind"])
                .with_context(|| file.display().to_string())?
                .to_string();
            str_at(&doc, &["apiVersion"]).with_context(|| file.display().to_string())?;
            if kind != "Kustomization" {
                str_at(&doc, &["metadata", "name"]).with_context(|| file.display().to_string())?;
            }
            ensure!(
                objects.insert(kind.clone(), doc).is_none(),
                "two objects of kind {kind}"
            );
        }
    }
    Ok(objects)
}

#[test]
fn kustomization_lists_every_manifest() -> Result<()> {
    let dir = deploy().join("k8s");
    let kustomization = yaml_document(&dir.join("kustomization.yaml"))?;
    let listed: BTreeSet<String> = seq_at(&kustomization, &["resources"])?
        .iter()
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect();
    let present: BTreeSet<String> = files_under(&dir, &[".yaml", ".yml"])?
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|name| name != "kustomization.yaml")
        .collect();
    ensure!(
        listed == present,
        "kustomization lists {listed:?}, the directory has {present:?}"
    );
    Ok(())
}

#[test]
fn deployment_runs_two_locked_down_replicas_with_probes() -> Result<()> {
    let objects = k8s_objects()?;
    let deployment = objects.get("Deployment").context("no Deployment")?;
    ensure!(
        at(deployment, &["spec", "replicas"])?.as_u64() == Some(2),
        "replicas: 2"
    );

    let pod = at(deployment, &["spec", "template", "spec"])?;
    let containers = seq_at(pod, &["containers"])?;
    ensure!(containers.len() == 1, "one container");
    let container = &containers[0];

    ensure!(
        str_at(container, &["readinessProbe", "httpGet", "path"])? == "/readyz",
        "readiness on /readyz"
    );
    ensure!(
        str_at(container, &["livenessProbe", "httpGet", "path"])? == "/healthz",
        "liveness on /healthz"
    );
    // The probes' named port is the metrics port.
    let ports = seq_at(container, &["ports"])?;
    for probe in ["readinessProbe", "livenessProbe"] {
        let port = at(container, &[probe, "httpGet", "port"])?;
        let number = match port {
            Value::Number(n) => n.as_u64(),
            Value::String(name) => ports
                .iter()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
                .and_then(|p| p.get("containerPort"))
                .and_then(Value::as_u64),
            _ => None,
        };
        ensure!(
            number == Some(9187),
            "{probe} probes port {port:?}, not 9187"
        );
    }

    let non_root = |v: &Value| {
        at(v, &["securityContext", "runAsNonRoot"])
            .ok()
            .and_then(Value::as_bool)
    };
    ensure!(
        non_root(pod) == Some(true) || non_root(container) == Some(true),
        "runAsNonRoot: true"
    );
    ensure!(
        at(container, &["securityContext", "readOnlyRootFilesystem"])?.as_bool() == Some(true),
        "read-only root"
    );
    ensure!(
        at(container, &["securityContext", "allowPrivilegeEscalation"])?.as_bool() == Some(false),
        "no privilege escalation"
    );
    let dropped = command_line(at(container, &["securityContext", "capabilities", "drop"])?);
    ensure!(dropped == "ALL", "drop ALL capabilities, not {dropped}");
    str_at(container, &["resources", "requests", "memory"])?;
    str_at(container, &["resources", "limits", "memory"])?;

    // The container reads the config the ConfigMap provides, and the Secret's variables.
    let args = command_line(at(container, &["args"])?);
    ensure!(
        args == "run --config /etc/pgcache/pgcache.toml",
        "args: {args}"
    );
    let mount = seq_at(container, &["volumeMounts"])?
        .iter()
        .find(|m| m.get("mountPath").and_then(Value::as_str) == Some("/etc/pgcache"))
        .context("nothing mounted at /etc/pgcache")?;
    let volume_name = str_at(mount, &["name"])?;
    let volume = seq_at(pod, &["volumes"])?
        .iter()
        .find(|v| v.get("name").and_then(Value::as_str) == Some(volume_name))
        .context("the mounted volume is not declared")?;
    // The root file system is read-only: the spool of streamed transactions (a directory in
    // /tmp by default) needs a writable volume there.
    let tmp = seq_at(container, &["volumeMounts"])?
        .iter()
        .find(|m| m.get("mountPath").and_then(Value::as_str) == Some("/tmp"))
        .context("nothing writable mounted at /tmp for the spool")?;
    let tmp_name = str_at(tmp, &["name"])?;
    ensure!(
        seq_at(pod, &["volumes"])?
            .iter()
            .any(|v| v.get("name").and_then(Value::as_str) == Some(tmp_name)
                && v.get("emptyDir").is_some()),
        "/tmp is not an emptyDir volume"
    );
    let configmap = objects.get("ConfigMap").context("no ConfigMap")?;
    ensure!(
        str_at(volume, &["configMap", "name"])? == str_at(configmap, &["metadata", "name"])?,
        "the config volume names another ConfigMap"
    );
    let secret = objects.get("Secret").context("no Secret")?;
    let secret_name = str_at(secret, &["metadata", "name"])?;
    ensure!(
        seq_at(container, &["envFrom"])?.iter().any(|e| e
            .get("secretRef")
            .and_then(|r| r.get("name"))
            .and_then(Value::as_str)
            == Some(secret_name)),
        "the container does not take its environment from Secret {secret_name}"
    );
    let listen = seq_at(container, &["env"])?
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some("PGCACHE__METRICS__LISTEN"))
        .and_then(|e| e.get("value"))
        .and_then(Value::as_str);
    ensure!(
        listen == Some("0.0.0.0:9187"),
        "PGCACHE__METRICS__LISTEN is {listen:?}"
    );

    // The selector picks the pod template, and so does the Service's.
    let labels = at(deployment, &["spec", "template", "metadata", "labels"])?
        .as_mapping()
        .context("pod labels")?;
    let service = objects.get("Service").context("no Service")?;
    for selector in [
        at(deployment, &["spec", "selector", "matchLabels"])?,
        at(service, &["spec", "selector"])?,
    ] {
        for (key, value) in selector.as_mapping().context("selector is a mapping")? {
            ensure!(
                labels.get(key) == Some(value),
                "selector {key:?}={value:?} misses the pods"
            );
        }
    }
    let service_port = &seq_at(service, &["spec", "ports"])?[0];
    ensure!(
        at(service_port, &["port"])?.as_u64() == Some(9187),
        "the Service exposes 9187"
    );
    Ok(())
}

#[test]
fn network_policy_admits_only_prometheus_to_the_metrics_port() -> Result<()> {
    let objects = k8s_objects()?;
    let policy = objects.get("NetworkPolicy").context("no NetworkPolicy")?;
    ensure!(
        str_at(policy, &["apiVersion"])? == "networking.k8s.io/v1",
        "NetworkPolicy apiVersion"
    );
    // It selects exactly the daemon's pods (an empty selector would select every pod).
    let deployment = objects.get("Deployment").context("no Deployment")?;
    let pod_labels = at(deployment, &["spec", "template", "metadata", "labels"])?
        .as_mapping()
        .context("pod labels")?;
    let selector = at(policy, &["spec", "podSelector", "matchLabels"])?
        .as_mapping()
        .context("podSelector.matchLabels is a mapping")?;
    ensure!(!selector.is_empty(), "the policy selects every pod");
    for (key, value) in selector {
        ensure!(
            pod_labels.get(key) == Some(value),
            "podSelector {key:?}={value:?} misses the pgcache pods"
        );
    }
    let types = command_line(at(policy, &["spec", "policyTypes"])?);
    ensure!(
        types.split(' ').any(|t| t == "Ingress"),
        "policyTypes: {types}"
    );

    // Each rule admits labelled Prometheus pods of a labelled namespace, on 9187 only.
    let rules = seq_at(policy, &["spec", "ingress"])?;
    ensure!(!rules.is_empty(), "no ingress rule: nothing could scrape");
    for rule in rules {
        let ports = seq_at(rule, &["ports"])?;
        ensure!(!ports.is_empty(), "a rule without ports admits every port");
        for port in ports {
            let number = match at(port, &["port"])? {
                Value::Number(n) => n.as_u64(),
                Value::String(name) if name == "metrics" => Some(9187),
                _ => None,
            };
            ensure!(number == Some(9187), "a rule admits port {port:?}");
            ensure!(str_at(port, &["protocol"])? == "TCP", "protocol TCP");
        }
        let peers = seq_at(rule, &["from"])?;
        ensure!(!peers.is_empty(), "a rule without peers admits everyone");
        for peer in peers {
            ensure!(peer.get("ipBlock").is_none(), "an ipBlock peer: {peer:?}");
            for selector in ["namespaceSelector", "podSelector"] {
                let labels = at(peer, &[selector, "matchLabels"])
                    .ok()
                    .and_then(Value::as_mapping)
                    .with_context(|| format!("peer without {selector}.matchLabels: {peer:?}"))?;
                ensure!(!labels.is_empty(), "an empty {selector} matches everything");
            }
        }
    }
    Ok(())
}

#[test]
fn secret_carries_the_connection_urls() -> Result<()> {
    let objects = k8s_objects()?;
    let secret = objects.get("Secret").context("no Secret")?;
    for key in ["PGCACHE__POSTGRES__URL", "PGCACHE__REDIS__URL"] {
        let value = str_at(secret, &["stringData", key])?;
        ensure!(!value.is_empty(), "{key} is empty");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Configs

/// A config as a deployment runs it: the TOML file and the `PGCACHE__*` variables it sets.
struct Deployed {
    name: &'static str,
    toml: String,
    env: Vec<(String, String)>,
}

/// The Kubernetes one (ConfigMap, Secret, container env) and the compose one.
fn deployed_configs() -> Result<Vec<Deployed>> {
    let objects = k8s_objects()?;
    let configmap = objects.get("ConfigMap").context("no ConfigMap")?;
    let secret = objects.get("Secret").context("no Secret")?;
    let deployment = objects.get("Deployment").context("no Deployment")?;
    let mut k8s_env = Vec::new();
    for (key, value) in at(secret, &["stringData"])?
        .as_mapping()
        .context("stringData")?
    {
        let (Some(key), Some(value)) = (key.as_str(), value.as_str()) else {
            bail!("Secret stringData holds a non-string entry: {key:?}");
        };
        k8s_env.push((key.to_string(), value.to_string()));
    }
    let container = at(deployment, &["spec", "template", "spec", "containers", "0"])?;
    for var in seq_at(container, &["env"])? {
        k8s_env.push((
            str_at(var, &["name"])?.to_string(),
            str_at(var, &["value"])?.to_string(),
        ));
    }

    let compose = yaml_document(&deploy().join("compose.yaml"))?;
    let mut compose_env = Vec::new();
    let environment = at(&compose, &["services", "pgcache", "environment"])?;
    for (key, value) in environment
        .as_mapping()
        .context("pgcache's environment is a mapping")?
    {
        let (Some(key), Some(value)) = (key.as_str(), value.as_str()) else {
            bail!("pgcache's environment holds a non-string entry: {key:?}");
        };
        compose_env.push((key.to_string(), value.to_string()));
    }
    Ok(vec![
        Deployed {
            name: "k8s/configmap.yaml",
            toml: str_at(configmap, &["data", "pgcache.toml"])?.to_string(),
            env: k8s_env,
        },
        Deployed {
            name: "compose/pgcache.toml",
            toml: read(&deploy().join("compose/pgcache.toml"))?,
            env: compose_env,
        },
    ])
}

#[test]
fn deploy_configs_load() -> Result<()> {
    for deployed in deployed_configs()? {
        let name = deployed.name;
        // The file alone is what `pgcache check --config` reads outside the deployment.
        Config::from_toml_str(&deployed.toml).map_err(|e| anyhow!("{name} alone: {e}"))?;
        let config = Config::from_toml_str_with_env(&deployed.toml, deployed.env.clone())
            .map_err(|e| anyhow!("{name} with its deployment's environment: {e}"))?;
        // The deployment's variables reach the keys they are meant for.
        let mut overridden = BTreeSet::new();
        for (var, value) in &deployed.env {
            match var.as_str() {
                "PGCACHE__POSTGRES__URL" => {
                    ensure!(config.postgres.url.expose() == value, "{name}: {var}")
                }
                "PGCACHE__REDIS__URL" => {
                    ensure!(config.redis.url.expose() == value, "{name}: {var}")
                }
                "PGCACHE__METRICS__LISTEN" => {
                    ensure!(
                        config.metrics.listen == Some(value.parse()?),
                        "{name}: {var}"
                    )
                }
                "PGCACHE__LOG__FORMAT" => {
                    let expected = match value.as_str() {
                        "json" => LogFormat::Json,
                        _ => LogFormat::Human,
                    };
                    ensure!(config.log.format == expected, "{name}: {var}")
                }
                _ => bail!("{name}: the deployment sets {var}, which this test does not know"),
            }
            overridden.insert(var.as_str());
        }
        for var in [
            "PGCACHE__POSTGRES__URL",
            "PGCACHE__REDIS__URL",
            "PGCACHE__METRICS__LISTEN",
        ] {
            ensure!(
                overridden.contains(var),
                "{name}: the deployment does not set {var}"
            );
        }
        ensure!(
            config.table("public", "users").is_some(),
            "{name}: no rule for public.users"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Docker

#[test]
fn dockerfile_builds_the_binary_and_runs_it_unprivileged() -> Result<()> {
    let dir = deploy().join("docker");
    let dockerfile = read(&dir.join("Dockerfile"))?;
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).collect();
    let has_line = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
    let froms: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    ensure!(froms.len() >= 2, "a multi-stage build: {froms:?}");
    ensure!(
        dockerfile.contains("cargo build --release --locked --bin pgcache"),
        "the release build"
    );
    ensure!(
        has_line("ENTRYPOINT [\"pgcache\"]"),
        "ENTRYPOINT [\"pgcache\"]"
    );
    ensure!(
        has_line(r#"CMD ["run", "--config", "/etc/pgcache/pgcache.toml"]"#),
        "CMD runs the mounted config"
    );
    ensure!(has_line("EXPOSE 9187"), "EXPOSE 9187");
    let user = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .context("no USER: the image would run as root")?;
    ensure!(
        !user.starts_with("root") && !user.starts_with("0"),
        "USER {user} is root"
    );
    ensure!(has_line("HEALTHCHECK"), "a HEALTHCHECK");

    // BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile.
    let ignore = read(&dir.join("Dockerfile.dockerignore"))?;
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for needed in ["target", ".git"] {
        ensure!(
            patterns.iter().any(|p| p.trim_end_matches('/') == needed),
            "Dockerfile.dockerignore does not exclude {needed}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The compose init script against a real server

#[test]
fn compose_initdb_script_prepares_postgres() -> Result<()> {
    let pg = TestPostgres::start()?;
    pg.create_database("app")?;
    let psql = TestPostgres::bin("psql")?;
    let bin_dir = psql.parent().context("psql has a directory")?;
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    // As the image's entrypoint runs it, with our sql/ where compose mounts it.
    let script = deploy().join("compose/initdb.sh");
    let mut cmd = Command::new("bash");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    let output = cmd
        .arg(&script)
        .env("PATH", path)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port().to_string())
        .env("POSTGRES_USER", "postgres")
        .env("POSTGRES_DB", "app")
        .env("PGCACHE_PASSWORD", "pgcache")
        .env("PGCACHE_SQL_DIR", repo().join("sql"))
        .output()
        .context("running initdb.sh")?;
    ensure!(
        output.status.success(),
        "initdb.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    ensure!(
        pg.psql("app", "SELECT count(*) FROM public.users")? == "3",
        "demo rows"
    );
    ensure!(
        pg.psql(
            "app",
            "SELECT plugin FROM pg_replication_slots WHERE slot_name = 'pgcache'"
        )? == "pgoutput",
        "slot pgcache with pgoutput"
    );
    ensure!(
        pg.psql("app", "SELECT string_agg(schemaname || '.' || tablename, ',' ORDER BY schemaname, tablename) FROM pg_publication_tables WHERE pubname = 'pgcache'")?
            == "pgcache.events,public.users",
        "publication pgcache holds public.users and the control table"
    );
    ensure!(
        pg.psql(
            "app",
            "SELECT rolreplication AND rolcanlogin FROM pg_roles WHERE rolname = 'pgcache'"
        )? == "t",
        "role pgcache may log in and replicate"
    );
    ensure!(
        pg.psql(
            "app",
            "SELECT has_table_privilege('pgcache', 'public.users', 'SELECT')"
        )? == "t",
        "role pgcache may read public.users"
    );

    // compose/pgcache.toml caches columns that the demo table has.
    let toml = read(&deploy().join("compose/pgcache.toml"))?;
    let columns: BTreeSet<String> = pg
        .psql(
            "app",
            "SELECT attname FROM pg_attribute WHERE attrelid = 'public.users'::regclass AND attnum > 0 AND NOT attisdropped",
        )?
        .lines()
        .map(str::to_string)
        .collect();
    let config = Config::from_toml_str(&toml).map_err(|e| anyhow!("compose/pgcache.toml: {e}"))?;
    let rule = config
        .table("public", "users")
        .context("compose/pgcache.toml has no rule for public.users")?;
    for column in rule.columns.iter().flatten() {
        ensure!(
            columns.contains(column),
            "compose/pgcache.toml caches {column}, which public.users lacks"
        );
    }

    // And the daemon's own preflight agrees, connecting as the role the script made, with
    // the compose config and the URLs pointed at our servers the way compose's env does.
    let redis = TestRedis::start()?;
    let mut check = Command::new(env!("CARGO_BIN_EXE_pgcache"));
    for (key, _) in std::env::vars_os() {
        if key
            .to_string_lossy()
            .to_ascii_uppercase()
            .starts_with("PGCACHE")
        {
            check.env_remove(key);
        }
    }
    let output = check
        .args(["check", "--config"])
        .arg(deploy().join("compose/pgcache.toml"))
        .env(
            "PGCACHE__POSTGRES__URL",
            pg.url_as("pgcache", Some("pgcache"), "app"),
        )
        .env("PGCACHE__REDIS__URL", redis.url())
        .output()
        .context("running pgcache check")?;
    ensure!(
        output.status.success(),
        "pgcache check fails on the server compose/initdb.sh prepared:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The primary/standby example (deploy/ha)

#[test]
fn ha_compose_runs_a_primary_a_standby_with_failover_slots_and_pgcache_on_both() -> Result<()> {
    let ha = deploy().join("ha");
    let compose = yaml_document(&ha.join("compose.yaml"))?;
    let services = at(&compose, &["services"])?;
    for name in ["primary", "standby", "redis", "pgcache"] {
        ensure!(
            services.get(name).is_some(),
            "ha/compose.yaml has no `{name}` service"
        );
    }
    for name in ["primary", "standby"] {
        let image = str_at(services, &[name, "image"])?;
        let major: u32 = image
            .strip_prefix("postgres:")
            .and_then(|v| v.split(['.', '-']).next()?.parse().ok())
            .with_context(|| format!("{name} image {image:?}"))?;
        ensure!(
            major >= 17,
            "{name}: failover slots need Postgres 17+, not {image}"
        );
    }
    let command = command_line(at(services, &["primary", "command"])?);
    ensure!(command.contains("wal_level=logical"), "{command}");

    // The primary's init scripts: setup.sql (the failover slot), then the standby's slot.
    let mounts = command_line(at(services, &["primary", "volumes"])?);
    ensure!(
        mounts.contains("../compose/initdb.sh:") && mounts.contains("./primary-init.sh:"),
        "{mounts}"
    );
    let init = read(&ha.join("primary-init.sh"))?;
    for part in [
        "pg_create_physical_replication_slot('standby1')",
        "ALTER SYSTEM SET synchronized_standby_slots = 'standby1'",
        "host replication replicator",
    ] {
        ensure!(init.contains(part), "primary-init.sh lacks {part:?}");
    }
    // The standby: the four settings `pgcache check` looks for.
    let standby = read(&ha.join("standby-entrypoint.sh"))?;
    for part in [
        "pg_basebackup",
        "-S standby1",
        "standby.signal",
        "dbname=app",
        "primary_slot_name = 'standby1'",
        "hot_standby_feedback = on",
        "sync_replication_slots = on",
        // Else, promoted, it would wait for the old primary's standby slot.
        "synchronized_standby_slots = ''",
    ] {
        ensure!(
            standby.contains(part),
            "standby-entrypoint.sh lacks {part:?}"
        );
    }

    // pgcache gets both servers, read-write, in the URL; the file's URL says the same.
    let url = str_at(
        services,
        &["pgcache", "environment", "PGCACHE__POSTGRES__URL"],
    )?;
    let toml = read(&ha.join("pgcache.toml"))?;
    let config = Config::from_toml_str(&toml).map_err(|e| anyhow!("ha/pgcache.toml: {e}"))?;
    for url in [url, config.postgres.url.expose()] {
        let target = pgcache::pgconn::PgTarget::parse(url).map_err(|e| anyhow!("{url}: {e}"))?;
        let hosts: Vec<String> = target.endpoints().iter().map(|e| e.host.clone()).collect();
        ensure!(hosts == ["primary", "standby"], "{url}: hosts {hosts:?}");
        ensure!(
            target.wants_read_write(),
            "{url} lacks target_session_attrs=read-write"
        );
    }
    ensure!(
        config.postgres.recreate_lost_slot,
        "ha/pgcache.toml: recreate_lost_slot"
    );
    Ok(())
}
