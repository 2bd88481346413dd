//! `check` on a Redis Cluster (`[redis] cluster = true`): a seed answers, the cluster's
//! state, whether every hash slot is served by a working master, and each master's
//! version, eviction policy, persistence and replicas, each as a finding of its own.
//!
//! The masters are reached at the addresses the cluster announces (`CLUSTER NODES`), with
//! the seed's scheme, login and TLS roots. Then one FAIL says that the daemon does not run
//! on a cluster yet, since `check` answers whether `pgcache run` can start.

use redis::aio::MultiplexedConnection;

use super::{
    config_get, connect_client, eviction_finding, persistence_finding, unreadable, version_finding,
    TIMEOUT,
};
use crate::cluster::{
    parse_cluster_nodes, ranges_text, unserved_slots, ClusterNode, CLUSTER_SLOTS,
};
use crate::config::{redact, redis_client, Config, Secret};
use crate::ops::preflight::Finding;

pub(super) async fn cluster_findings(config: &Config, seeds: &[Secret]) -> Vec<Finding> {
    let mut failures = Vec::new();
    let mut reached = None;
    for seed in seeds {
        match connect(config, seed.expose()).await {
            Ok(conn) => {
                reached = Some((seed, conn));
                break;
            }
            Err(message) => failures.push(format!("{seed}: {message}")),
        }
    }
    let Some((seed, mut conn)) = reached else {
        return vec![Finding::fail(
            format!(
                "redis cluster: no seed is reachable ({})",
                failures.join("; ")
            ),
            "check redis.url (or redis.urls) and that the cluster's nodes are running",
        )];
    };
    let mut findings = vec![Finding::ok(format!("redis cluster seed {seed} reachable"))];
    let info = match query::<String>(&mut conn, redis::cmd("CLUSTER").arg("INFO")).await {
        Ok(info) => info,
        Err(message) if message.contains("cluster support disabled") => {
            findings.push(Finding::fail(
                format!("redis {seed} is not a cluster node (cluster support disabled)"),
                "point redis.url at a node of the cluster, or remove redis.cluster = true to use it as one server",
            ));
            return findings;
        }
        Err(message) => {
            findings.push(Finding::fail(
                format!("redis cluster: CLUSTER INFO failed on {seed}: {message}"),
                "the role in the URL needs CLUSTER INFO and CLUSTER NODES (ACL +cluster|info +cluster|nodes)",
            ));
            return findings;
        }
    };
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or("?")
            .to_string()
    };
    let nodes = match query::<String>(&mut conn, redis::cmd("CLUSTER").arg("NODES")).await {
        Ok(text) => parse_cluster_nodes(&text),
        Err(message) => {
            findings.push(Finding::fail(
                format!("redis cluster: CLUSTER NODES failed on {seed}: {message}"),
                "the role in the URL needs CLUSTER INFO and CLUSTER NODES (ACL +cluster|info +cluster|nodes)",
            ));
            return findings;
        }
    };
    let masters: Vec<&ClusterNode> = nodes.iter().filter(|n| n.is_master()).collect();
    let state = field("cluster_state");
    let failing = nodes.iter().filter(|n| n.is_failing()).count();
    let summary = format!(
        "{} nodes, {} masters, {} replicas{}",
        nodes.len(),
        masters.iter().filter(|n| !n.is_failing()).count(),
        nodes
            .iter()
            .filter(|n| !n.is_master() && !n.is_failing())
            .count(),
        if failing > 0 {
            format!(", {failing} failing")
        } else {
            String::new()
        }
    );
    findings.push(if state == "ok" {
        Finding::ok(format!("redis cluster state ok ({summary})"))
    } else {
        Finding::fail(
            format!(
                "redis cluster state is {state} ({summary}; cluster_slots_ok:{}, cluster_slots_pfail:{}, cluster_slots_fail:{})",
                field("cluster_slots_ok"),
                field("cluster_slots_pfail"),
                field("cluster_slots_fail")
            ),
            format!("see CLUSTER INFO and CLUSTER NODES on {seed}: every hash slot must be served by a reachable master"),
        )
    });
    let serving: Vec<ClusterNode> = masters
        .iter()
        .filter(|n| !n.is_failing())
        .map(|&n| n.clone())
        .collect();
    let unserved = unserved_slots(&serving);
    findings.push(if unserved.is_empty() {
        Finding::ok(format!(
            "redis cluster serves all {CLUSTER_SLOTS} hash slots ({} masters)",
            serving.len()
        ))
    } else {
        let count: u32 = unserved.iter().map(|&(a, b)| u32::from(b - a) + 1).sum();
        Finding::fail(
            format!(
                "redis cluster: {count} of {CLUSTER_SLOTS} hash slots are served by no working master ({})",
                ranges_text(&unserved)
            ),
            "assign them to a master (redis-cli --cluster fix <node>, or CLUSTER ADDSLOTSRANGE on a master), or bring their failed master back",
        )
    });
    for master in &masters {
        if master.is_failing() {
            findings.push(failing_master(master));
        } else {
            findings.extend(master_findings(config, seed, master, &nodes).await);
        }
    }
    findings
}

/// A master the cluster marks as failing: down with its slots (FAIL), or down after its
/// replica took its slots over (WARN: the cluster works, one replica fewer).
fn failing_master(master: &ClusterNode) -> Finding {
    let addr = &master.addr;
    if master.slots.is_empty() {
        Finding::warn(
            format!(
                "redis node {addr} is down ({}); it serves no hash slots (a replica took them over)",
                master.flags.join(",")
            ),
            "restart it (it comes back as a replica), or remove it with CLUSTER FORGET on every node",
        )
    } else {
        Finding::fail(
            format!(
                "redis master {addr} is failing ({}) and still holds hash slots {}",
                master.flags.join(","),
                ranges_text(&master.slots)
            ),
            "bring it back, or promote one of its replicas (CLUSTER FAILOVER on the replica)",
        )
    }
}

/// One master: reachable at its announced address, its version, eviction policy and
/// persistence (as for one server), and whether it has a replica.
async fn master_findings(
    config: &Config,
    seed: &Secret,
    master: &ClusterNode,
    nodes: &[ClusterNode],
) -> Vec<Finding> {
    let addr = master.addr.as_str();
    let on_master = |finding: Finding| Finding {
        what: format!(
            "redis master {addr}: {}",
            finding.what.strip_prefix("redis ").unwrap_or(&finding.what)
        ),
        ..finding
    };
    let mut findings = Vec::new();
    let replicas = nodes
        .iter()
        .filter(|n| n.master_id.as_deref() == Some(master.id.as_str()))
        .filter(|n| !n.is_failing())
        .count();
    findings.push(if replicas > 0 {
        Finding::ok(format!(
            "redis master {addr}: {replicas} working replica(s), serves slots {}",
            ranges_text(&master.slots)
        ))
    } else {
        Finding::warn(
            format!(
                "redis master {addr} has no working replica: if it fails, its hash slots ({}) stay down until it returns",
                ranges_text(&master.slots)
            ),
            format!("add a replica: redis-cli --cluster add-node <new-node> {addr} --cluster-slave"),
        )
    });
    if let Some(wanted) = config.redis.wait_replicas.filter(|&n| replicas < n) {
        findings.push(Finding::fail(
            format!(
                "redis master {addr} has {replicas} working replica(s), fewer than \
                 redis.wait_replicas = {wanted}: the daemon would write to it and then wait, \
                 confirming nothing to Postgres"
            ),
            format!(
                "add replicas (redis-cli --cluster add-node <new-node> {addr} --cluster-slave), \
                 or lower redis.wait_replicas"
            ),
        ));
    }
    let Some(url) = node_url(seed.expose(), addr) else {
        findings.push(Finding::fail(
            format!("redis master {addr}: the cluster announces no usable address for it"),
            "set cluster-announce-ip on that node",
        ));
        return findings;
    };
    let mut conn = match connect(config, &url).await {
        Ok(conn) => conn,
        Err(message) => {
            findings.push(Finding::fail(
                format!("redis master {addr} is not reachable at the address the cluster announces: {message}"),
                "the daemon connects to every master: open the network path to it, or set cluster-announce-ip on it",
            ));
            return findings;
        }
    };
    findings.push(on_master(version_finding(&mut conn).await));
    match config_get(&mut conn, &["maxmemory-policy", "maxmemory"]).await {
        Ok(settings) => findings.push(on_master(eviction_finding(config, &settings))),
        Err(e) => findings.push(on_master(unreadable("maxmemory-policy", &e))),
    }
    match config_get(&mut conn, &["appendonly", "appendfsync", "save"]).await {
        Ok(settings) => findings.push(on_master(persistence_finding(config, &settings))),
        Err(e) => findings.push(on_master(unreadable("persistence (appendonly, save)", &e))),
    }
    findings
}

async fn connect(config: &Config, url: &str) -> Result<MultiplexedConnection, String> {
    let client =
        redis_client(url, config.redis.tls_ca_file.as_ref()).map_err(|e| redact(&e.to_string()))?;
    connect_client(&client).await
}

async fn query<T: redis::FromRedisValue>(
    conn: &mut MultiplexedConnection,
    cmd: &redis::Cmd,
) -> Result<T, String> {
    tokio::time::timeout(TIMEOUT, cmd.query_async(conn))
        .await
        .map_err(|_| format!("no answer within {TIMEOUT:?}"))?
        .map_err(|e| redact(&e.to_string()))
}

/// The seed's URL with its host and port replaced by a node's `ip:port` (scheme, login and
/// path kept). `None` when the address names no port.
fn node_url(seed: &str, addr: &str) -> Option<String> {
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let (scheme, rest) = seed.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let (login, seed_host) = match authority.rsplit_once('@') {
        Some((login, host_port)) => (Some(login), host_port),
        None => (None, authority),
    };
    // A node that has never met another may announce no IP: it is the seed's host.
    let host = if host.is_empty() {
        let seed_host = seed_host.strip_prefix('[').map_or_else(
            || seed_host.rsplit_once(':').map_or(seed_host, |(h, _)| h),
            |rest| rest.split(']').next().unwrap_or(rest),
        );
        seed_host.to_string()
    } else {
        host.to_string()
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    Some(match login {
        Some(login) => format!("{scheme}://{login}@{host}:{port}{path}"),
        None => format!("{scheme}://{host}:{port}{path}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_urls_keep_scheme_login_and_path() {
        assert_eq!(
            node_url("redis://:pw@seed:7000", "10.0.0.2:7001").as_deref(),
            Some("redis://:pw@10.0.0.2:7001")
        );
        assert_eq!(
            node_url("rediss://u:p@seed:7000/0", "10.0.0.2:7001").as_deref(),
            Some("rediss://u:p@10.0.0.2:7001/0")
        );
        assert_eq!(
            node_url("redis://seed:7000", ":7002").as_deref(),
            Some("redis://seed:7002")
        );
        assert_eq!(
            node_url("redis://[::1]:7000", "::1:7003").as_deref(),
            Some("redis://[::1]:7003")
        );
        assert_eq!(node_url("redis://seed:7000", "nowhere"), None);
    }
}
