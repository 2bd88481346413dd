//! A throwaway Redis Cluster: masters and replicas, each a [`TestRedis`] cluster node.
//!
//! The nodes are joined by hand rather than by `redis-cli --cluster create`, so that each
//! node's cluster bus can sit on a free port of its own (`cluster-port`) instead of the
//! client port plus 10000, which may be taken or out of range:
//! 1. every master claims an equal range of the 16384 hash slots (`CLUSTER ADDSLOTSRANGE`)
//!    under a distinct config epoch, so no epoch collision has to be resolved later;
//! 2. the first node meets every other (`CLUSTER MEET ip port bus-port`);
//! 3. once every node knows every other, each replica follows its master
//!    (`CLUSTER REPLICATE`);
//! 4. [`TestRedisCluster::wait_ready`] polls every node until the cluster is whole.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::redis_server::redis_major_version;
use super::{RedisOptions, TestRedis};
use crate::cluster::{parse_cluster_nodes, ClusterNode, CLUSTER_SLOTS};

/// How long a new cluster gets to become whole (every node agrees, replicas synced).
const FORM_TIMEOUT: Duration = Duration::from_secs(60);

/// A Redis Cluster of our own: `masters` masters, each with `replicas` replicas.
///
/// The nodes are in [`nodes`](Self::nodes) in start order: the masters first (master `i`
/// serves the `i`-th equal share of the slots), then the replicas, replica `j` following
/// master `j % masters`. Roles may change later (a failover); [`masters`](Self::masters)
/// asks the nodes. `Drop` stops every node and removes its files.
pub struct TestRedisCluster {
    nodes: Vec<TestRedis>,
    masters: usize,
    replicas: usize,
}

impl TestRedisCluster {
    /// Three masters with one replica each, without persistence.
    ///
    /// # Errors
    /// See [`start_with`](Self::start_with).
    pub fn start() -> Result<TestRedisCluster> {
        Self::start_with(3, 1, RedisOptions::default())
    }

    /// Starts `masters` masters and `replicas` replicas per master, all with `opts` (plus
    /// `cluster`), joins them and waits until the cluster is whole.
    ///
    /// # Errors
    /// When a node does not start (the error holds its log), or the cluster does not form
    /// within a minute (the error says what was missing).
    pub fn start_with(
        masters: usize,
        replicas: usize,
        opts: RedisOptions,
    ) -> Result<TestRedisCluster> {
        ensure!(
            (1..=CLUSTER_SLOTS as usize).contains(&masters),
            "a cluster needs 1 to 16384 masters, not {masters}"
        );
        if redis_major_version() < 7 {
            bail!(
                "the test cluster needs redis-server 7 or newer (cluster-port, \
                 CLUSTER ADDSLOTSRANGE); this one is {}",
                redis_major_version()
            );
        }
        let opts = RedisOptions {
            cluster: true,
            ..opts
        };
        let total = masters * (1 + replicas);
        let mut nodes = Vec::with_capacity(total);
        for i in 0..total {
            nodes.push(
                TestRedis::start_with(opts.clone())
                    .with_context(|| format!("starting cluster node {i}"))?,
            );
        }
        let cluster = TestRedisCluster {
            nodes,
            masters,
            replicas,
        };
        cluster.join()?;
        cluster.wait_ready(FORM_TIMEOUT)?;
        Ok(cluster)
    }

    fn join(&self) -> Result<()> {
        let ids = self
            .nodes
            .iter()
            .map(|node| node.cli(&["CLUSTER", "MYID"]))
            .collect::<Result<Vec<_>>>()?;
        for (i, master) in self.nodes[..self.masters].iter().enumerate() {
            let (first, last) = share(i, self.masters);
            let epoch = (i + 1).to_string();
            master.cli(&["CLUSTER", "SET-CONFIG-EPOCH", &epoch])?;
            master.cli(&[
                "CLUSTER",
                "ADDSLOTSRANGE",
                &first.to_string(),
                &last.to_string(),
            ])?;
        }
        let first = &self.nodes[0];
        for other in &self.nodes[1..] {
            first.cli(&[
                "CLUSTER",
                "MEET",
                "127.0.0.1",
                &other.port().to_string(),
                &other.bus_port().to_string(),
            ])?;
        }
        // A replica can follow only a master it knows.
        self.poll(FORM_TIMEOUT, "every node to know every other", |node| {
            let info = cluster_info(node)?;
            let known = info.get("cluster_known_nodes").cloned().unwrap_or_default();
            Ok((known == self.nodes.len().to_string())
                .then_some(())
                .ok_or(format!("knows {known} nodes")))
        })?;
        for (j, replica) in self.nodes[self.masters..].iter().enumerate() {
            let master = &ids[j % self.masters];
            replica
                .cli(&["CLUSTER", "REPLICATE", master])
                .with_context(|| format!("making node {} a replica", self.masters + j))?;
        }
        Ok(())
    }

    /// Waits until every running node reports `cluster_state:ok` with all 16384 slots
    /// served, sees every node connected and without failure flags, the expected numbers of
    /// masters and replicas, and every replica's link to its master is up.
    ///
    /// # Errors
    /// When that does not happen within `timeout`; the error names a node and what it
    /// lacked.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let expected = self.nodes.len();
        let (masters, replicas) = (self.masters, self.masters * self.replicas);
        self.poll(timeout, "the cluster to be whole", |node| {
            let info = cluster_info(node)?;
            let field = |name: &str| info.get(name).map(String::as_str).unwrap_or("?");
            if field("cluster_state") != "ok" || field("cluster_slots_ok") != "16384" {
                return Ok(Err(format!(
                    "cluster_state:{} cluster_slots_ok:{}",
                    field("cluster_state"),
                    field("cluster_slots_ok")
                )));
            }
            let seen = parse_cluster_nodes(&node.cli(&["CLUSTER", "NODES"])?);
            let bad = seen.iter().find(|n| {
                !n.connected
                    || n.flags
                        .iter()
                        .any(|f| matches!(f.as_str(), "fail" | "fail?" | "handshake" | "noaddr"))
            });
            if let Some(bad) = bad {
                return Ok(Err(format!("sees {} as {:?}", bad.addr, bad.flags)));
            }
            let seen_masters = seen.iter().filter(|n| n.is_master()).count();
            if seen.len() != expected
                || seen_masters != masters
                || seen.len() - seen_masters != replicas
            {
                return Ok(Err(format!(
                    "sees {} nodes, {seen_masters} of them masters",
                    seen.len()
                )));
            }
            let replication = node.cli(&["INFO", "replication"])?;
            if replication.contains("role:slave") && !replication.contains("master_link_status:up")
            {
                return Ok(Err("its link to its master is not up".to_string()));
            }
            Ok(Ok(()))
        })
    }

    /// Polls every running node with `check` until all pass or `timeout` passes.
    fn poll(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&TestRedis) -> Result<Result<(), String>>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut lacking = None;
            for node in self.nodes.iter().filter(|n| n.is_running()) {
                let verdict = check(node).unwrap_or_else(|err| Err(format!("{err:#}")));
                if let Err(why) = verdict {
                    lacking = Some(format!("node on port {}: {why}", node.port()));
                    break;
                }
            }
            let Some(lacking) = lacking else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                bail!("waited {timeout:?} for {what}; {lacking}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the node at `index` with `SIGKILL`, as a machine failure would, and waits until
    /// one of its replicas serves its slots and every running node reports
    /// `cluster_state:ok`. Returns the promoted replica's port. [`TestRedis::start_again`]
    /// on the node (through [`node_mut`](Self::node_mut)) brings it back as a replica.
    ///
    /// # Errors
    /// When the node is not a running master with slots, or no replica takes over within
    /// `timeout`.
    pub fn fail_over(&mut self, index: usize, timeout: Duration) -> Result<u16> {
        let port = self.nodes[index].port();
        let view = self.topology()?;
        let slot = view
            .iter()
            .find(|n| n.port() == Some(port) && n.is_master())
            .and_then(|n| n.slots.first().map(|&(first, _)| first))
            .with_context(|| format!("the node on port {port} is not a master with slots"))?;
        self.nodes[index].kill9()?;
        let deadline = Instant::now() + timeout;
        loop {
            let promoted = self.topology().ok().and_then(|view| {
                view.iter()
                    .filter(|n| n.is_master() && !n.is_failing() && n.port() != Some(port))
                    .find(|n| n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
                    .and_then(ClusterNode::port)
            });
            let all_ok = self.nodes.iter().filter(|n| n.is_running()).all(|n| {
                cluster_info(n)
                    .is_ok_and(|info| info.get("cluster_state").map(String::as_str) == Some("ok"))
            });
            if let (Some(promoted), true) = (promoted, all_ok) {
                return Ok(promoted);
            }
            if Instant::now() >= deadline {
                bail!(
                    "no replica took over slot {slot} of the master on port {port} within \
                     {timeout:?}; topology now: {:?}",
                    self.topology().ok()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every node, masters first (as started; see [`masters`](Self::masters) for the
    /// current roles).
    pub fn nodes(&self) -> &[TestRedis] {
        &self.nodes
    }

    /// One node, to stop, kill or restart it.
    pub fn node_mut(&mut self, index: usize) -> &mut TestRedis {
        &mut self.nodes[index]
    }

    /// `redis://127.0.0.1:{port}/` of every node: seeds for a cluster client.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(TestRedis::url).collect()
    }

    /// Every node's `rediss://` URL, with [`RedisOptions::tls`].
    pub fn tls_urls(&self) -> Vec<String> {
        self.nodes.iter().map(TestRedis::tls_url).collect()
    }

    /// The first node's URL: one seed is enough for a cluster client.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// The nodes that are masters now, as the first running node sees the cluster.
    ///
    /// # Errors
    /// When no node runs or answers.
    pub fn masters(&self) -> Result<Vec<&TestRedis>> {
        let view = self.topology()?;
        Ok(self
            .nodes
            .iter()
            .filter(|node| {
                view.iter()
                    .any(|n| n.is_master() && n.port() == Some(node.port()))
            })
            .collect())
    }

    /// `CLUSTER NODES` as the first running node sees it.
    ///
    /// # Errors
    /// When no node runs or answers.
    pub fn topology(&self) -> Result<Vec<ClusterNode>> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.is_running())
            .context("no node of the cluster runs")?;
        Ok(parse_cluster_nodes(&node.cli(&["CLUSTER", "NODES"])?))
    }

    /// The running node that serves hash slot `slot` as its master.
    ///
    /// # Errors
    /// When no node runs or the slot is not served.
    pub fn master_of_slot(&self, slot: u16) -> Result<&TestRedis> {
        let view = self.topology()?;
        let port = view
            .iter()
            .filter(|n| n.is_master())
            .find(|n| n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .and_then(ClusterNode::port)
            .with_context(|| format!("no master serves slot {slot}"))?;
        self.nodes
            .iter()
            .find(|n| n.port() == port)
            .with_context(|| format!("slot {slot} is on port {port}, not one of ours"))
    }
}

/// The inclusive slot range master `i` of `masters` gets.
fn share(i: usize, masters: usize) -> (u16, u16) {
    let total = usize::from(CLUSTER_SLOTS);
    let first = i * total / masters;
    let last = (i + 1) * total / masters - 1;
    // Both are below 16384.
    (first as u16, last as u16)
}

/// `CLUSTER INFO` as a map.
fn cluster_info(node: &TestRedis) -> Result<HashMap<String, String>> {
    Ok(node
        .cli(&["CLUSTER", "INFO"])?
        .lines()
        .filter_map(|line| {
            let (k, v) = line.trim().split_once(':')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_slot_once() {
        for masters in [1, 2, 3, 5, 7] {
            let mut next = 0u32;
            for i in 0..masters {
                let (a, b) = share(i, masters);
                assert_eq!(u32::from(a), next);
                assert!(a <= b);
                next = u32::from(b) + 1;
            }
            assert_eq!(next, u32::from(CLUSTER_SLOTS));
        }
    }
}
