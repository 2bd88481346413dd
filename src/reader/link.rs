//! The reader's Redis connection: one server, or the master that Redis Sentinel names.
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
    current: RwLock<Option<(String, ConnectionManager)>>,
    sentinel: Option<Sentinel>,
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
            current: RwLock::new(Some((String::new(), connection))),
            sentinel: None,
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
        }
    }

    /// The connection to use now.
    ///
    /// # Errors
    /// With sentinels, no master is known yet (the question is under way).
    pub(crate) fn get(self: &Arc<Self>) -> RedisResult<ConnectionManager> {
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
                    "the sentinels are being asked which server is the master".to_string(),
                )))
            }
        }
    }

    /// Redis failed: with sentinels, ask them again (in the background) which server is the
    /// master.
    pub(crate) fn failed(self: &Arc<Self>) {
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
                    Some((address, connection));
            }
            Err(error) => {
                tracing::warn!(%error, master = %address, "cannot connect to the master the sentinels name");
            }
        }
    }
}
