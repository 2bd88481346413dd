//! A throwaway Sentinel-managed Redis: a master, a replica and one sentinel (quorum 1), all
//! `redis-server` children on free ports, for failover tests. The replica replicates through
//! a [`TcpProxy`], so a test can stall replication and then lose what was in flight, as an
//! asynchronous replica does when its master dies.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{wait_for, RedisOptions, TcpProxy, TestRedis};

/// Waits until `done` gives `Some`, polling; an error naming `what` past `timeout`.
fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> Option<()>) -> Result<()> {
    if wait_for(timeout, || done().is_some()) {
        Ok(())
    } else {
        bail!("timed out after {timeout:?} waiting for {what}")
    }
}

/// The name the sentinel monitors the master under.
pub const MASTER_NAME: &str = "mymaster";

/// A master, its replica, and a sentinel watching them.
pub struct TestSentinelGroup {
    /// The servers: index 0 was the master at the start. After a failover the roles swap;
    /// [`master`](Self::master) says which is which.
    servers: [TestRedis; 2],
    sentinel: TestRedis,
    /// The replica's link to the master.
    link: TcpProxy,
}

impl TestSentinelGroup {
    /// Starts the master, its replica (in sync), and the sentinel, and waits until the
    /// sentinel knows both.
    ///
    /// # Errors
    /// A server does not come up, or the replica or the sentinel do not catch on within
    /// 20 s.
    pub fn start() -> Result<TestSentinelGroup> {
        let master = TestRedis::start().context("starting the master")?;
        let link = TcpProxy::start(([127, 0, 0, 1], master.port()).into())
            .context("starting the replication link")?;
        let replica = TestRedis::start_with(RedisOptions {
            extra_args: vec![
                "--replicaof".into(),
                "127.0.0.1".into(),
                link.port().to_string(),
            ],
            ..RedisOptions::default()
        })
        .context("starting the replica")?;
        let sentinel = TestRedis::start_with(RedisOptions {
            sentinel: Some(format!(
                "sentinel monitor {MASTER_NAME} 127.0.0.1 {port} 1\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 10000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                port = master.port()
            )),
            ..RedisOptions::default()
        })
        .context("starting the sentinel")?;
        let group = TestSentinelGroup {
            servers: [master, replica],
            sentinel,
            link,
        };
        group.wait_replica_in_sync(1)?;
        wait_until(
            Duration::from_secs(20),
            "the sentinel to see the replica",
            || {
                let replicas = group
                    .sentinel
                    .cli(&["SENTINEL", "REPLICAS", MASTER_NAME])
                    .ok()?;
                (replicas.contains(&group.servers[1].port().to_string())
                    && !replicas.contains("s_down"))
                .then_some(())
            },
        )?;
        Ok(group)
    }

    /// The sentinel, `redis://127.0.0.1:{port}/`.
    pub fn sentinel_url(&self) -> String {
        self.sentinel.url()
    }

    /// The server that is master now (by its `ROLE`), and the other one.
    ///
    /// # Panics
    /// When neither says it is master.
    pub fn master(&mut self) -> (&mut TestRedis, &mut TestRedis) {
        let first_is_master = self.servers[0].is_running()
            && self.servers[0]
                .cli(&["ROLE"])
                .is_ok_and(|role| role.starts_with("master"));
        let [a, b] = &mut self.servers;
        if first_is_master {
            (a, b)
        } else {
            (b, a)
        }
    }

    /// The master's port as the sentinel names it now.
    ///
    /// # Errors
    /// The sentinel does not answer.
    pub fn named_master_port(&self) -> Result<u16> {
        let reply = self
            .sentinel
            .cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME])?;
        let port = reply
            .split_whitespace()
            .nth(1)
            .context("no master address")?;
        Ok(port.parse()?)
    }

    /// Waits until `count` replicas of the master are connected and hold all its writes.
    ///
    /// # Errors
    /// Not within 20 s.
    pub fn wait_replica_in_sync(&self, count: usize) -> Result<()> {
        let master = self
            .servers
            .iter()
            .find(|s| {
                s.is_running()
                    && s.cli(&["ROLE"])
                        .is_ok_and(|role| role.starts_with("master"))
            })
            .context("no master")?;
        wait_until(Duration::from_secs(20), "the replica to sync", || {
            let acked = master
                .cli(&["WAIT", &count.to_string(), "100"])
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()?;
            (acked >= count).then_some(())
        })
    }

    /// Waits until the sentinel names the server on `port` and that server is master.
    ///
    /// # Errors
    /// Not within 30 s.
    pub fn wait_master_is(&self, port: u16) -> Result<()> {
        let server = self.server(port)?;
        wait_until(Duration::from_secs(30), "the failover", || {
            (self.named_master_port().ok()? == port
                && server
                    .cli(&["ROLE"])
                    .is_ok_and(|role| role.starts_with("master")))
            .then_some(())
        })
    }

    /// Kills the master (SIGKILL). Returns the replica's port: once the sentinel notices
    /// (about a second), it promotes the replica; see [`wait_master_is`](Self::wait_master_is).
    ///
    /// # Errors
    /// No master runs.
    pub fn kill_master(&mut self) -> Result<u16> {
        let (master, replica) = self.master();
        if !master.is_running() {
            bail!("the master is not running");
        }
        let replica_port = replica.port();
        master.kill9()?;
        // What the link still held dies with the master.
        self.link.refuse_new(true);
        self.link.cut();
        self.link.resume();
        Ok(replica_port)
    }

    /// Starts the killed master again (empty: no persistence). The sentinel then makes it
    /// a replica of the new master, within a few seconds.
    ///
    /// # Errors
    /// No server is down, or it does not come up.
    pub fn restart_old_master(&mut self) -> Result<()> {
        let down = self
            .servers
            .iter_mut()
            .find(|s| !s.is_running())
            .context("no server is down")?;
        down.start_again()
    }

    /// Stalls replication: the master's writes from now on stay in the link, and reach the
    /// replica only if [`resume_replication`](Self::resume_replication) comes before
    /// [`kill_master`](Self::kill_master), which discards them.
    pub fn stall_replication(&self) {
        self.link.pause();
    }

    /// Lets the stalled writes through.
    pub fn resume_replication(&self) {
        self.link.resume();
    }

    fn server(&self, port: u16) -> Result<&TestRedis> {
        self.servers
            .iter()
            .find(|s| s.port() == port)
            .context("no server on that port")
    }
}
