//! Sends one hash slot's transaction to the master that serves the slot, following the
//! cluster through resharding: the first piece of the daemon on Redis Cluster
//! (docs/cluster.md, "Resharding").
//!
//! A [`SlotTransaction`] is the shape of the daemon's guarded write, for one slot:
//! commands before `MULTI` (`WATCH`, the check script), then the commands inside
//! `MULTI … EXEC`. [`SlotRouter::send`] keeps a map of slots to masters and one connection per
//! master, and:
//! - on `MOVED` refreshes the map and sends again to the new owner;
//! - on `ASK` (the slot is migrating and the keys are on the target) sends again to the
//!   target, with `ASKING` before each command up to `MULTI` (inside `MULTI` the flag holds);
//! - on `TRYAGAIN` (the keys are split between source and target mid-migration) and
//!   `CLUSTERDOWN` waits a little and sends again.
//!
//! A transaction refused with any of these ran nothing (Redis discards a `MULTI` with a
//! refused command), so sending again never applies it twice. For that to hold during a
//! migration, the command before `MULTI` that guards the write (the check script) must
//! declare every key of the transaction: a multi-key command is refused unless all its keys
//! are on the node that runs it.
//!
//! The daemon on a cluster (`daemon::cluster_apply`) sends a batch's slot transactions with
//! [`SlotRouter::send_many`]: one pipeline per master, the masters at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{Cmd, ErrorKind, RedisError, ServerErrorKind, Value};

use crate::cluster::{parse_cluster_nodes, CLUSTER_SLOTS};
use crate::config::{redis_client, RedisRoots};

/// How long one transaction may keep being redirected or told to try again.
const PATIENCE: Duration = Duration::from_secs(30);

/// One hash slot's write: `pre` commands, then `ops` inside `MULTI … EXEC`.
#[derive(Debug, Clone, Default)]
pub struct SlotTransaction {
    pub pre: Vec<Cmd>,
    pub ops: Vec<Cmd>,
}

/// What a transaction got back: each `pre` command's reply, and `EXEC`'s (`Nil` when a
/// `WATCH`ed key changed).
#[derive(Debug, Clone)]
pub struct SlotReplies {
    pub pre: Vec<Value>,
    pub exec: Value,
    /// The node that ran the transaction (`ip:port`): after an `ASK`, the migration's
    /// target, not the slot's owner in the map (what `WAIT` must ask).
    pub node: String,
}

/// Why a transaction was not sent.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("redis cluster: {0}")]
    Redis(#[from] RedisError),
    #[error("redis cluster: no node of the cluster answered ({0})")]
    NoNode(String),
    #[error("redis cluster: hash slot {0} is served by no master")]
    Unserved(u16),
    #[error(
        "redis cluster: hash slot {slot} was still being redirected after {PATIENCE:?}: {last}"
    )]
    Unsettled { slot: u16, last: String },
}

/// Slots to masters, and a connection to each node it has talked to.
pub struct SlotRouter {
    /// URLs of the seeds, the first to ask for the map.
    seeds: Vec<String>,
    roots: Option<RedisRoots>,
    /// The seed's URL with `{addr}` in place of host and port: how to reach a node.
    template: String,
    /// Per slot, the `ip:port` of its master (empty: unserved).
    owners: Vec<String>,
    connections: HashMap<String, MultiplexedConnection>,
    /// How many times the map was read (for tests and logs).
    refreshes: u64,
    redirects: Redirects,
}

/// How often [`SlotRouter::send`] was redirected, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Redirects {
    pub moved: u64,
    pub ask: u64,
    /// `TRYAGAIN` or `CLUSTERDOWN`.
    pub wait: u64,
}

impl SlotRouter {
    /// Reads the map of slots from the first seed that answers.
    ///
    /// # Errors
    /// When no seed answers, or a seed is not a cluster node.
    pub async fn connect(
        seeds: &[String],
        roots: Option<RedisRoots>,
    ) -> Result<SlotRouter, RouteError> {
        let template = seeds
            .first()
            .and_then(|seed| address_template(seed))
            .ok_or_else(|| RouteError::NoNode("no usable seed URL".to_string()))?;
        let mut router = SlotRouter {
            seeds: seeds.to_vec(),
            roots,
            template,
            owners: vec![String::new(); usize::from(CLUSTER_SLOTS)],
            connections: HashMap::new(),
            refreshes: 0,
            redirects: Redirects::default(),
        };
        router.refresh().await?;
        Ok(router)
    }

    /// The `ip:port` of the master of `slot`, as last read.
    pub fn owner(&self, slot: u16) -> Option<&str> {
        let owner = self.owners.get(usize::from(slot))?;
        (!owner.is_empty()).then_some(owner.as_str())
    }

    /// How many times the slot map was read.
    pub fn refreshes(&self) -> u64 {
        self.refreshes
    }

    /// How often sends were redirected so far.
    pub fn redirects(&self) -> Redirects {
        self.redirects
    }

    /// Reads the slot map again (`CLUSTER NODES`), from a node it knows or else a seed.
    ///
    /// # Errors
    /// When no node answers.
    pub async fn refresh(&mut self) -> Result<(), RouteError> {
        let mut failures = Vec::new();
        let known: Vec<String> = self.connections.keys().cloned().collect();
        let candidates: Vec<String> = known
            .into_iter()
            .map(|addr| self.url_of(&addr))
            .chain(self.seeds.iter().cloned())
            .collect();
        for url in candidates {
            let text = async {
                let mut conn = self.connection_for_url(&url).await?;
                redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async::<String>(&mut conn)
                    .await
            };
            match text.await {
                Ok(text) => {
                    let mut owners = vec![String::new(); usize::from(CLUSTER_SLOTS)];
                    for node in parse_cluster_nodes(&text) {
                        if !node.is_master() || node.is_failing() {
                            continue;
                        }
                        for &(first, last) in &node.slots {
                            for slot in first..=last.min(CLUSTER_SLOTS - 1) {
                                owners[usize::from(slot)] = node.addr.clone();
                            }
                        }
                    }
                    self.owners = owners;
                    self.refreshes += 1;
                    return Ok(());
                }
                Err(e) => failures.push(crate::config::redact(&format!("{url}: {e}"))),
            }
        }
        Err(RouteError::NoNode(failures.join("; ")))
    }

    /// Runs `tx` on the master of `slot`, following redirections (see the module's doc).
    ///
    /// # Errors
    /// A Redis error other than a redirection, or one that persists for 30 s.
    pub async fn send(
        &mut self,
        slot: u16,
        tx: &SlotTransaction,
    ) -> Result<SlotReplies, RouteError> {
        let deadline = Instant::now() + PATIENCE;
        let mut asking: Option<String> = None;
        let mut pause = Duration::from_millis(5);
        loop {
            let addr = match &asking {
                Some(addr) => addr.clone(),
                None => self
                    .owner(slot)
                    .map(str::to_string)
                    .ok_or(RouteError::Unserved(slot))?,
            };
            let pipe = build(tx, asking.is_some());
            let result = async {
                let mut conn = self.connection(&addr).await?;
                pipe.query_async::<Vec<Value>>(&mut conn).await
            }
            .await;
            let error = match result {
                Ok(replies) => return Ok(split(tx, addr, replies)),
                Err(error) => error,
            };
            let last = error.to_string();
            if Instant::now() >= deadline {
                return Err(RouteError::Unsettled { slot, last });
            }
            match redirection(error)? {
                Redirect::Moved => {
                    self.redirects.moved += 1;
                    asking = None;
                    self.refresh().await?;
                }
                Redirect::Ask(target) => {
                    self.redirects.ask += 1;
                    asking = Some(target);
                }
                Redirect::Wait => {
                    self.redirects.wait += 1;
                    asking = None;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
            }
        }
    }

    /// Sends each command to the master of its slot: one pipeline per master; a command
    /// that is redirected (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`) is sent again on its
    /// own through [`send`](Self::send). Replies come in the order of `cmds`; other error
    /// replies are returned as [`Value::ServerError`].
    ///
    /// # Errors
    /// A connection error, or a redirection that persists for 30 s.
    pub async fn send_each(&mut self, cmds: &[(u16, Cmd)]) -> Result<Vec<Value>, RouteError> {
        let mut replies = vec![Value::Nil; cmds.len()];
        let mut by_node: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
        for (i, (slot, _)) in cmds.iter().enumerate() {
            let owner = self.owner(*slot).ok_or(RouteError::Unserved(*slot))?;
            by_node.entry(owner.to_string()).or_default().push(i);
        }
        let mut again = Vec::new();
        for (addr, indexes) in by_node {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in &indexes {
                pipe.add_command(cmds[i].1.clone());
            }
            let mut conn = self.connection(&addr).await?;
            let values: Vec<Value> = pipe.query_async(&mut conn).await?;
            for (&i, value) in indexes.iter().zip(values) {
                let redirected = matches!(
                    &value,
                    Value::ServerError(e) if matches!(
                        e.kind(),
                        Some(ServerErrorKind::Moved | ServerErrorKind::Ask
                            | ServerErrorKind::TryAgain | ServerErrorKind::ClusterDown)
                    )
                );
                if redirected {
                    again.push(i);
                } else {
                    replies[i] = value;
                }
            }
        }
        for i in again {
            let (slot, cmd) = &cmds[i];
            let tx = SlotTransaction {
                pre: vec![cmd.clone()],
                ops: Vec::new(),
            };
            let mut sent = self.send(*slot, &tx).await?;
            replies[i] = sent.pre.pop().unwrap_or(Value::Nil);
        }
        Ok(replies)
    }

    /// Each slot's master, as last read (empty: unserved).
    pub fn masters_of_slots(&self) -> Vec<String> {
        self.owners.clone()
    }

    /// The masters that serve slots, as last read (`ip:port`, sorted).
    pub fn masters(&self) -> Vec<String> {
        let mut masters: Vec<String> = self
            .owners
            .iter()
            .filter(|o| !o.is_empty())
            .cloned()
            .collect();
        masters.sort();
        masters.dedup();
        masters
    }

    /// A connection to the node at `addr` (`ip:port`), opened once and kept.
    ///
    /// # Errors
    /// When the node cannot be reached.
    pub async fn node(&mut self, addr: &str) -> Result<MultiplexedConnection, RedisError> {
        self.connection(addr).await
    }

    /// Sends many slots' transactions: one pipeline per master, the masters concurrently;
    /// a transaction that is redirected is sent again on its own through
    /// [`send`](Self::send). Replies come in the order of `parts`.
    ///
    /// # Errors
    /// A connection error, or a redirection that persists for 30 s.
    pub async fn send_many(
        &mut self,
        parts: &[(u16, &SlotTransaction)],
    ) -> Result<Vec<SlotReplies>, RouteError> {
        let mut by_node: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
        for (i, (slot, _)) in parts.iter().enumerate() {
            let owner = self.owner(*slot).ok_or(RouteError::Unserved(*slot))?;
            by_node.entry(owner.to_string()).or_default().push(i);
        }
        let mut sends = Vec::new();
        for (addr, indexes) in by_node {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in &indexes {
                append(&mut pipe, parts[i].1);
            }
            let mut conn = self.connection(&addr).await?;
            sends.push(async move {
                let values: Result<Vec<Value>, RedisError> = pipe.query_async(&mut conn).await;
                (addr, indexes, values)
            });
        }
        let mut replies: Vec<Option<SlotReplies>> = vec![None; parts.len()];
        let mut again = Vec::new();
        for (addr, indexes, values) in futures_util::future::join_all(sends).await {
            let mut values = values?.into_iter();
            for i in indexes {
                let tx = parts[i].1;
                let pre: Vec<Value> = values.by_ref().take(tx.pre.len()).collect();
                let exec = values.next().unwrap_or(Value::Nil);
                let redirected = pre.iter().chain(std::iter::once(&exec)).any(|v| {
                    matches!(v, Value::ServerError(e) if matches!(
                        e.kind(),
                        Some(ServerErrorKind::Moved | ServerErrorKind::Ask
                            | ServerErrorKind::TryAgain | ServerErrorKind::ClusterDown
                            | ServerErrorKind::ExecAbort)
                    ))
                });
                if redirected {
                    again.push(i);
                } else {
                    replies[i] = Some(SlotReplies {
                        pre,
                        exec,
                        node: addr.clone(),
                    });
                }
            }
        }
        for i in again {
            let (slot, tx) = parts[i];
            replies[i] = Some(self.send(slot, tx).await?);
        }
        Ok(replies
            .into_iter()
            .map(|r| {
                r.unwrap_or(SlotReplies {
                    pre: Vec::new(),
                    exec: Value::Nil,
                    node: String::new(),
                })
            })
            .collect())
    }

    /// The URL of the node at `addr` (`ip:port`): the seed's scheme, login and database.
    pub fn url_for(&self, addr: &str) -> String {
        self.url_of(addr)
    }

    fn url_of(&self, addr: &str) -> String {
        self.template.replace("{addr}", addr)
    }

    async fn connection(&mut self, addr: &str) -> Result<MultiplexedConnection, RedisError> {
        if let Some(conn) = self.connections.get(addr) {
            return Ok(conn.clone());
        }
        let conn = self.connection_for_url(&self.url_of(addr)).await?;
        self.connections.insert(addr.to_string(), conn.clone());
        Ok(conn)
    }

    async fn connection_for_url(&self, url: &str) -> Result<MultiplexedConnection, RedisError> {
        let client = redis_client(url, self.roots.as_ref())?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(10)))
            .set_response_timeout(Some(Duration::from_secs(60)));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }
}

/// Appends `tx` to a pipeline of several: its `pre` commands and `EXEC` give replies, the
/// rest are ignored.
fn append(pipe: &mut redis::Pipeline, tx: &SlotTransaction) {
    for cmd in &tx.pre {
        pipe.add_command(cmd.clone());
    }
    pipe.cmd("MULTI").ignore();
    for cmd in &tx.ops {
        pipe.add_command(cmd.clone()).ignore();
    }
    pipe.cmd("EXEC");
}

/// The pipeline for `tx`: with `asking`, `ASKING` before each command up to `MULTI`.
fn build(tx: &SlotTransaction, asking: bool) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for cmd in &tx.pre {
        if asking {
            pipe.cmd("ASKING").ignore();
        }
        pipe.add_command(cmd.clone());
    }
    if asking {
        pipe.cmd("ASKING").ignore();
    }
    pipe.cmd("MULTI").ignore();
    for cmd in &tx.ops {
        pipe.add_command(cmd.clone()).ignore();
    }
    pipe.cmd("EXEC");
    pipe
}

fn split(tx: &SlotTransaction, node: String, mut replies: Vec<Value>) -> SlotReplies {
    // Ignored commands (ASKING, MULTI, the queued ops) give no reply: the pre commands'
    // replies, then EXEC's.
    let exec = replies.pop().unwrap_or(Value::Nil);
    replies.truncate(tx.pre.len());
    SlotReplies {
        pre: replies,
        exec,
        node,
    }
}

enum Redirect {
    Moved,
    Ask(String),
    Wait,
}

/// What to do about a failed send: a redirection, or the error itself.
fn redirection(error: RedisError) -> Result<Redirect, RouteError> {
    let kind = |k: ServerErrorKind| ErrorKind::Server(k);
    if error.kind() == kind(ServerErrorKind::Moved) {
        return Ok(Redirect::Moved);
    }
    let Some(errors) = error.clone().into_server_errors() else {
        return Err(error.into());
    };
    let mut wait = false;
    for (_, server_error) in errors.iter() {
        match server_error.kind() {
            Some(ServerErrorKind::Moved) => return Ok(Redirect::Moved),
            Some(ServerErrorKind::Ask) => {
                if let Some(addr) = server_error
                    .details()
                    .and_then(|d| d.split_ascii_whitespace().nth(1))
                {
                    return Ok(Redirect::Ask(addr.to_string()));
                }
            }
            Some(ServerErrorKind::TryAgain | ServerErrorKind::ClusterDown) => wait = true,
            // Follows one of the above inside MULTI.
            Some(ServerErrorKind::ExecAbort) => {}
            _ => return Err(error.into()),
        }
    }
    if wait {
        Ok(Redirect::Wait)
    } else {
        Err(error.into())
    }
}

/// The seed's URL with its host and port replaced by `{addr}`.
fn address_template(seed: &str) -> Option<String> {
    let (scheme, rest) = seed.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    Some(match authority.rsplit_once('@') {
        Some((login, _)) => format!("{scheme}://{login}@{{addr}}{path}"),
        None => format!("{scheme}://{{addr}}{path}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_keep_scheme_login_and_path() {
        assert_eq!(
            address_template("rediss://u:p@seed:7000/0").as_deref(),
            Some("rediss://u:p@{addr}/0")
        );
        assert_eq!(
            address_template("redis://seed:7000").as_deref(),
            Some("redis://{addr}")
        );
    }

    #[test]
    fn asking_goes_before_each_command_up_to_multi() {
        let mut watch = redis::cmd("WATCH");
        watch.arg("k");
        let mut set = redis::cmd("SET");
        set.arg("k").arg("v");
        let tx = SlotTransaction {
            pre: vec![watch],
            ops: vec![set],
        };
        // The command names, in order, from the packed pipeline.
        let names = |pipe: &redis::Pipeline| -> Vec<String> {
            let packed = String::from_utf8_lossy(&pipe.get_packed_pipeline()).into_owned();
            packed
                .split("\r\n")
                .filter(|part| ["ASKING", "WATCH", "MULTI", "SET", "EXEC"].contains(part))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(names(&build(&tx, false)), ["WATCH", "MULTI", "SET", "EXEC"]);
        assert_eq!(
            names(&build(&tx, true)),
            ["ASKING", "WATCH", "ASKING", "MULTI", "SET", "EXEC"]
        );
    }
}
