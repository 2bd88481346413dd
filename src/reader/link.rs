//! The reader's Redis connection: one server, the master that Redis Sentinel names, or a
//! Redis Cluster (redis-rs's cluster client, which routes each command to its slot's
//! master and follows `MOVED` and `ASK`).
//!
//! With sentinels, the link starts without a master and asks the sentinels in the background
//! at the first use (lookups read Postgres meanwhile), and again whenever Redis fails (a
//! failover breaks the old master's connection, or it answers `READONLY` as a replica), at
//! most once a second. A new master gets a new connection; commands already sent finish
//! on the old one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, RedisResult};

use crate::config::{RedisRoots, SentinelConfig};

/// At most one question to the sentinels per this long.
const ASK_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct RedisLink {
    current: RwLock<Option<(String, Conn)>>,
    sentinel: Option<Sentinel>,
    #[cfg(feature = "cluster")]
    cluster: Option<Cluster>,
}

/// A connection to one server, or to a cluster (also what `verify` and `status` read with).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    /// `verify` and `status`, which the reader-only build leaves out.
    #[cfg_attr(not(feature = "daemon"), allow(dead_code))]
    Multiplexed(redis::aio::MultiplexedConnection),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Conn {
    /// Whether commands are routed by hash slot (a pipeline must then stay in one slot).
    #[cfg_attr(not(feature = "daemon"), allow(dead_code))]
    pub(crate) fn is_cluster(&self) -> bool {
        #[cfg(feature = "cluster")]
        {
            matches!(self, Conn::Cluster(_))
        }
        #[cfg(not(feature = "cluster"))]
        {
            false
        }
    }
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Multiplexed(c) => c.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Multiplexed(c) => c.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Multiplexed(c) => c.get_db(),
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A cluster, connected to at the first use (the client finds the nodes from the seeds).
#[cfg(feature = "cluster")]
struct Cluster {
    client: redis::cluster::ClusterClient,
    asking: AtomicBool,
    last_asked: Mutex<Option<Instant>>,
}

struct Sentinel {
    config: SentinelConfig,
    roots: Option<RedisRoots>,
    manager: ConnectionManagerConfig,
    asking: AtomicBool,
    last_asked: Mutex<Option<Instant>>,
}

impl RedisLink {
    /// One server.
    pub(crate) fn fixed(connection: ConnectionManager) -> RedisLink {
        RedisLink {
            current: RwLock::new(Some((String::new(), Conn::Single(connection)))),
            sentinel: None,
            #[cfg(feature = "cluster")]
            cluster: None,
        }
    }

    /// A Redis Cluster, connected to at the first use.
    #[cfg(feature = "cluster")]
    pub(crate) fn cluster(client: redis::cluster::ClusterClient) -> RedisLink {
        RedisLink {
            current: RwLock::new(None),
            sentinel: None,
            cluster: Some(Cluster {
                client,
                asking: AtomicBool::new(false),
                last_asked: Mutex::new(None),
            }),
        }
    }

    /// Whether this is a cluster (fills check their own slot's checkpoint).
    pub(crate) fn is_cluster(&self) -> bool {
        #[cfg(feature = "cluster")]
        {
            self.cluster.is_some()
        }
        #[cfg(not(feature = "cluster"))]
        {
            false
        }
    }

    /// The master the sentinels name, found at the first use.
    pub(crate) fn sentinel(
        config: SentinelConfig,
        roots: Option<RedisRoots>,
        manager: ConnectionManagerConfig,
    ) -> RedisLink {
        RedisLink {
            current: RwLock::new(None),
            sentinel: Some(Sentinel {
                config,
                roots,
                manager,
                asking: AtomicBool::new(false),
                last_asked: Mutex::new(None),
            }),
            #[cfg(feature = "cluster")]
            cluster: None,
        }
    }

    /// The connection to use now.
    ///
    /// # Errors
    /// With sentinels, no master is known yet (the question is under way).
    pub(crate) fn get(self: &Arc<Self>) -> RedisResult<Conn> {
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|(_, connection)| connection.clone());
        match current {
            Some(connection) => Ok(connection),
            None => {
                self.failed();
                Err(RedisError::from((
                    ErrorKind::Io,
                    "no Redis master yet",
                    if self.is_cluster() {
                        "the cluster's nodes are being connected to".to_string()
                    } else {
                        "the sentinels are being asked which server is the master".to_string()
                    },
                )))
            }
        }
    }

    /// Redis failed: with sentinels, ask them again (in the background) which server is the
    /// master.
    pub(crate) fn failed(self: &Arc<Self>) {
        #[cfg(feature = "cluster")]
        if let Some(cluster) = &self.cluster {
            self.connect_cluster(cluster);
            return;
        }
        let Some(sentinel) = &self.sentinel else {
            return;
        };
        {
            let mut last = sentinel
                .last_asked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < ASK_EVERY) {
                return;
            }
            if sentinel.asking.swap(true, Ordering::AcqRel) {
                return;
            }
            *last = Some(Instant::now());
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            sentinel.asking.store(false, Ordering::Release);
            return;
        };
        let link = self.clone();
        runtime.spawn(async move {
            link.ask().await;
            if let Some(sentinel) = &link.sentinel {
                sentinel.asking.store(false, Ordering::Release);
            }
        });
    }

    /// Connects to the cluster in the background, unless connected (the cluster client
    /// reconnects by itself) or already trying, at most once a second.
    #[cfg(feature = "cluster")]
    fn connect_cluster(self: &Arc<Self>, cluster: &Cluster) {
        let connected = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some();
        if connected {
            return;
        }
        {
            let mut last = cluster
                .last_asked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < ASK_EVERY) {
                return;
            }
            if cluster.asking.swap(true, Ordering::AcqRel) {
                return;
            }
            *last = Some(Instant::now());
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            cluster.asking.store(false, Ordering::Release);
            return;
        };
        let link = self.clone();
        runtime.spawn(async move {
            let Some(cluster) = &link.cluster else {
                return;
            };
            match cluster.client.get_async_connection().await {
                Ok(connection) => {
                    tracing::info!("connected to the Redis Cluster; lookups use it");
                    *link
                        .current
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(("cluster".to_string(), Conn::Cluster(connection)));
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot connect to the Redis Cluster; lookups read Postgres");
                }
            }
            cluster.asking.store(false, Ordering::Release);
        });
    }

    async fn ask(&self) {
        let Some(sentinel) = &self.sentinel else {
            return;
        };
        let client = match crate::sentinel::master_client(&sentinel.config, sentinel.roots.as_ref())
            .await
        {
            Ok(client) => client,
            Err(error) => {
                tracing::warn!(%error, "the sentinels named no working master; lookups read Postgres");
                return;
            }
        };
        let address = client.get_connection_info().addr().to_string();
        let known = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|(at, _)| *at == address);
        if known {
            return;
        }
        match ConnectionManager::new_lazy_with_config(client, sentinel.manager.clone()) {
            Ok(connection) => {
                tracing::info!(master = %address, name = %sentinel.config.master, "the sentinels name this master; lookups use it");
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((address, Conn::Single(connection)));
            }
            Err(error) => {
                tracing::warn!(%error, master = %address, "cannot connect to the master the sentinels name");
            }
        }
    }
}
