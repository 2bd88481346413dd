//! The daemon: replication stream in, Redis out, progress back to Postgres.
//!
//! # Layout, in flow order
//! - [`replication`]: the streaming replication protocol client (the WAL in).
//! - [`pgoutput`]: the pgoutput decoder, a pure function over `Bytes`.
//! - `spool`: large transactions streamed while in progress, on disk until they end.
//! - [`relations`]: relation ids resolved against the table rules; table shapes.
//! - `rules`: table rules changed while the daemon was stopped (their old keys dropped).
//! - [`apply`]: row changes to Redis operations (pure, `Batch`), and the guarded write of a
//!   batch with the checkpoint (`apply::script`).
//! - [`visibility`]: a batch waits until Postgres readers can see its commits.
//! - [`backfill`]: loading, repairing and reconciling rows beside the stream.
//! - `stream`: one session's loop, a handler per message kind; this module: the sessions.
//! - `cluster_apply` (with [`slot_router`]): on a Redis Cluster, a batch written slot by
//!   slot, each with its own checkpoint, and the frontier confirmed once every slot has it.
//!
//! One *session* connects Redis and Postgres, takes the checkpoint over once Postgres has
//! given it the slot, and streams from the checkpoint. Any failure ends the session; the
//! next one starts over from the checkpoint in Redis, so a transaction that was in hand when
//! a server went away is simply sent again (G1). Postgres is told a position only after
//! Redis acknowledged the write holding it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::checkpoint::{self, CheckpointState, FIELD_BACKFILL_PREFIX};
use crate::config::{Config, Mode, RedisTopology};
use crate::daemon::apply::script::{Owner, Refused, WriteError};
use crate::daemon::apply::{Batch, Op};
use crate::daemon::backfill::{Backfills, ProgressFn};
use crate::daemon::cluster_apply::ClusterApply;
use crate::daemon::relations::{RelationCache, TypeResolver};
use crate::daemon::replication::{ReplicationConnection, ReplicationError, ReplicationStream};
use crate::daemon::slot_router::SlotRouter;
use crate::daemon::spool::Spool;
use crate::daemon::visibility::Visibility;
use crate::metrics as m;
use crate::ops::health::Health;
use crate::ops::preflight::{self, Level};
use crate::pgconn::{self, PgTarget};
use crate::Lsn;

pub mod apply;
pub mod backfill;
pub(crate) mod cluster_apply;
mod long_keys;
pub mod pgoutput;
pub mod relations;
pub mod replication;
mod rules;
pub(crate) mod slot;
pub mod slot_router;
pub(crate) mod spool;
mod stream;
pub mod visibility;

use stream::Stream;

/// Why the daemon stopped or a session ended.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RunError {
    fatal: bool,
    /// The `kind` label this counts under in `pgcache_errors_total`.
    kind: &'static str,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl RunError {
    /// Retrying will not help: the operator must fix something (the message says what).
    pub fn fatal(kind: &'static str, message: impl Into<String>) -> RunError {
        RunError {
            fatal: true,
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A server went away or refused for now; the daemon reconnects.
    pub fn transient(kind: &'static str, message: impl Into<String>) -> RunError {
        RunError {
            fatal: false,
            kind,
            message: message.into(),
            source: None,
        }
    }

    fn because(mut self, source: impl std::error::Error + Send + Sync + 'static) -> RunError {
        self.source = Some(Box::new(source));
        self
    }

    pub fn is_fatal(&self) -> bool {
        self.fatal
    }

    /// The `kind` label of `pgcache_errors_total` this error counts under.
    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

impl From<ReplicationError> for RunError {
    fn from(e: ReplicationError) -> Self {
        let message = format!("replication: {e}");
        if e.is_retryable() {
            RunError::transient("postgres", message).because(e)
        } else {
            RunError::fatal("postgres", message).because(e)
        }
    }
}

/// A wrong password or a missing permission will not fix itself; anything else (a dropped
/// connection, OOM, a loading or failing-over server) may. redis-rs's own `retry_method`
/// would also give up on replies it cannot parse and on server errors such as `WRONGTYPE`,
/// which here concern one key (handled per key), not the connection.
fn redis_is_fatal(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    matches!(
        e.kind(),
        ErrorKind::AuthenticationFailed
            | ErrorKind::InvalidClientConfig
            | ErrorKind::Server(ServerErrorKind::NoPerm)
    )
}

/// Bad credentials (class 28), a missing database, or a missing privilege.
fn postgres_is_fatal(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        let c = c.code();
        c.starts_with("28") || c == "3D000" || c == "42501"
    })
}

impl From<redis::RedisError> for RunError {
    fn from(e: redis::RedisError) -> Self {
        let message = format!("redis: {e}");
        if redis_is_fatal(&e) {
            RunError::fatal("redis", message).because(e)
        } else {
            RunError::transient("redis", message).because(e)
        }
    }
}

impl From<tokio_postgres::Error> for RunError {
    fn from(e: tokio_postgres::Error) -> Self {
        let message = match e.as_db_error() {
            Some(db) => format!("postgres: {}: {}", db.code().code(), db.message()),
            None => format!("postgres: {e}"),
        };
        if postgres_is_fatal(&e) {
            RunError::fatal("postgres", message).because(e)
        } else {
            RunError::transient("postgres", message).because(e)
        }
    }
}

/// Classified by the server error underneath, which stays the error's source; a table
/// problem or a failed read task is retried with the session.
impl From<backfill::BackfillError> for RunError {
    fn from(e: backfill::BackfillError) -> Self {
        use backfill::BackfillError;
        let (fatal, kind) = match &e {
            BackfillError::Postgres { source, .. } => (postgres_is_fatal(source), "postgres"),
            BackfillError::Redis { source, .. } => (redis_is_fatal(source), "redis"),
            BackfillError::Table { .. } | BackfillError::Task(_) => (false, "backfill"),
        };
        RunError {
            fatal,
            kind,
            message: e.to_string(),
            source: Some(Box::new(e)),
        }
    }
}

impl From<WriteError> for RunError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Redis(e) => e.into(),
            WriteError::Refused(refused) => {
                let kind = match refused {
                    Refused::Fenced(_) => {
                        metrics::counter!(m::FENCED).increment(1);
                        "fenced"
                    }
                    Refused::EpochGone | Refused::Moved { .. } => "redis_data_lost",
                };
                RunError::transient(kind, refused.to_string()).because(refused)
            }
        }
    }
}

impl From<checkpoint::CheckpointError> for RunError {
    fn from(e: checkpoint::CheckpointError) -> Self {
        match e {
            checkpoint::CheckpointError::Redis(e) => e.into(),
            other => RunError::fatal("redis", other.to_string()).because(other),
        }
    }
}

/// What the daemon reports to the process around it.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Liveness and readiness, for `/healthz` and `/readyz`.
    pub health: Arc<Health>,
    /// Backfill progress, for a progress bar.
    pub on_backfill: Option<ProgressFn>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("health", &self.health)
            .field("on_backfill", &self.on_backfill.is_some())
            .finish()
    }
}

/// Runs the daemon until `shutdown` turns true, reconnecting with capped, jittered backoff.
///
/// # Errors
/// A fatal [`RunError`] when the servers are not set up for pgcache or refuse our
/// credentials.
pub async fn run(
    config: Arc<Config>,
    mut shutdown: watch::Receiver<bool>,
    hooks: Hooks,
) -> Result<(), RunError> {
    let target = PgTarget::parse(config.postgres.url.expose())
        .map_err(|e| RunError::fatal("config", format!("postgres.url: {e}")))?;
    let mut failures = 0u32;
    let mut applied = Applied::default();
    loop {
        let started = Instant::now();
        let result = session(&config, &target, &mut shutdown, &hooks, &mut applied).await;
        let error = match result {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        metrics::counter!(m::ERRORS, "kind" => error.kind()).increment(1);
        if error.is_fatal() {
            error!(error = %error, "stopping: this needs an operator");
            return Err(error);
        }
        if started.elapsed() > Duration::from_secs(30) {
            failures = 0;
        }
        failures += 1;
        metrics::counter!(m::RECONNECTS).increment(1);
        let delay = backoff(failures);
        warn!(error = %error, retry_in = ?delay, "session ended; reconnecting");
        hooks.health.set_error(Some(error.to_string()));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut shutdown) => return Ok(()),
        }
    }
}

/// Resolves when the shutdown flag turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: drop it here, not across an await.
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

/// 100 ms doubling to 30 s, each delay drawn from its upper half (jitter keeps a fleet of
/// daemons from reconnecting in step).
fn backoff(failures: u32) -> Duration {
    let cap = Duration::from_millis(100u64.saturating_mul(1 << failures.min(9)))
        .min(Duration::from_secs(30));
    let ms = cap.as_millis() as u64;
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms.max(1)))
}

/// How far this process's sessions applied the stream: if Redis loses its data under a
/// running daemon, the next session knows what readers may have seen, beyond what the slot
/// confirmed.
#[derive(Debug, Default, Clone, Copy)]
struct Applied {
    position: Option<Lsn>,
}

/// Why Redis must be rebuilt at the start of a session, if it must.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Loss {
    /// No checkpoint: the first start, or Redis lost everything.
    NoCheckpoint { had_data: bool },
    /// The checkpoint is behind what the slot confirmed: Redis went back in time.
    Behind { checkpoint: Option<Lsn>, slot: Lsn },
    /// The replication slot was lost (gone or invalidated, `reason`) and created again: the
    /// changes since its last position are gone from the WAL.
    SlotLost { reason: String },
    /// The checkpoint is ahead of the server's WAL: Postgres went back in time (restored
    /// from a copy of its data directory, or a lagging standby promoted), so Redis holds
    /// changes Postgres no longer has.
    PostgresBehind { checkpoint: Lsn, server: Lsn },
    /// On a Redis Cluster: hash slots whose checkpoint is behind what this daemon recorded
    /// writing there, or gone (a master failed over to a replica that did not have its
    /// last writes, or lost its data).
    HashSlotsBehind { slots: Vec<u16> },
}

async fn session(
    config: &Config,
    target: &PgTarget,
    shutdown: &mut watch::Receiver<bool>,
    hooks: &Hooks,
    applied: &mut Applied,
) -> Result<(), RunError> {
    let checkpoint_key =
        checkpoint::checkpoint_key(&config.redis.key_prefix, &config.postgres.slot);
    let RedisSide {
        mut redis,
        scans,
        router,
    } = connect_redis(config, &checkpoint_key).await?;
    let before = checkpoint::read_state(&mut redis, &checkpoint_key).await?;

    let connect = || async {
        pgconn::connect(target).await.map_err(|e| {
            RunError::transient("postgres", format!("postgres {}: {e}", target.redacted()))
        })
    };
    let catalog = connect().await?;
    check_primary(&catalog, target).await?;
    if let Some(lost) = slot::Lost::find(&catalog, &config.postgres.slot, &before).await? {
        if !config.postgres.recreate_lost_slot {
            return Err(lost.error(&checkpoint_key));
        }
        lost.recreate(&catalog, &mut redis, &checkpoint_key, &before)
            .await?;
    }
    let findings = ready_findings(&catalog, config).await?;
    if let Some(problem) =
        crate::sql::synchronous_standby_problem(&catalog, target.application_name()).await?
    {
        return Err(RunError::fatal("postgres", problem));
    }
    let max_value = max_value_bytes(&mut redis).await;
    let layout = WalLayout::read(&catalog).await?;

    let mut replication = ReplicationConnection::connect(target).await?;
    let identity = replication.identify_system().await?;
    // A checkpoint ahead of the server's WAL: Postgres went back in time (restored from a
    // copy, or a lagging standby promoted). Asking to start there would skip every commit
    // the server makes until it gets there again, so the stream starts where the slot is.
    let postgres_behind = before.lsn.is_some_and(|lsn| lsn > identity.xlog_pos);
    let start = match before.lsn {
        Some(lsn) if !postgres_behind => lsn,
        _ => Lsn::ZERO,
    };
    let streaming = streams(config, &replication) && spool_usable(config, target)?;
    let mut stream = start_stream(
        replication,
        config,
        (start, streaming),
        (&catalog, &mut redis),
        &checkpoint_key,
        &before,
    )
    .await?;
    let (owner_token, taken) = take_over(&mut redis, &checkpoint_key, &before).await?;
    let cluster = match router {
        Some(router) => Some(
            ClusterApply::take_over(
                router,
                &config.redis.key_prefix,
                &config.postgres.slot,
                &owner_token,
            )
            .await?,
        ),
        None => None,
    };
    let slot_confirmed = slot_confirmed(&catalog, &config.postgres.slot).await?;
    let mut loss = Loss::detect(&before, &taken, slot_confirmed, identity.xlog_pos);
    if let (None, Some((_, slots))) = (&loss, &cluster) {
        loss = Loss::hash_slots(&taken, slots);
    }
    // The root lost with its master while other slots kept theirs: not a first start.
    if let (Some(Loss::NoCheckpoint { had_data }), Some((_, slots))) = (&mut loss, &cluster) {
        *had_data |= slots.iter().any(|t| !t.fresh && t.state.lsn.is_some());
    }
    // On a cluster, a slot's part of a batch can be in Redis beyond the frontier (the root is
    // written last): readers may have seen up to the furthest slot checkpoint.
    let slots_ahead = cluster
        .as_ref()
        .and_then(|(_, slots)| slots.iter().filter_map(|t| t.state.lsn).max());
    if matches!(loss, Some(Loss::PostgresBehind { .. })) {
        // What this process applied is from the lost future: nothing to mute.
        applied.position = None;
    }
    let mut saved = taken.state;
    // On a cluster, a merge without a base records its repair in its key's slot checkpoint.
    if let Some((_, slots)) = &cluster {
        for slot in slots {
            saved.repairs.extend(
                slot.state
                    .repairs
                    .iter()
                    .map(|(key, text)| (key.clone(), text.clone())),
            );
        }
    }

    let backfills = Backfills::new(
        connect().await?,
        scans.clone(),
        config,
        hooks.on_backfill.clone(),
    );
    let mut relations = RelationCache::new(config);
    let mut batch = Batch::with_max_value(max_value);
    let (field, value) =
        long_keys::drop_unreachable(&mut redis, &scans, &checkpoint_key, config, max_value).await?;
    batch.push_field(field, value);
    let stopped_tables = stop_unready_tables(config, &findings, &mut relations, &mut batch);
    let owner = Owner {
        checkpoint_key,
        token: owner_token,
        epoch: saved.epoch.clone().unwrap_or_default(),
        position: saved.lsn,
    };
    let visibility = Visibility::new(Arc::new(connect().await?));
    let mut state = Stream::new(
        config,
        redis,
        owner,
        backfills,
        relations,
        TypeResolver::new(catalog),
        batch,
        visibility,
        hooks.health.clone(),
        layout,
    );
    if let Some((apply, _)) = cluster {
        state.set_cluster(apply);
    }
    if streaming {
        // Only now: this session owns the slot, so no other daemon is using the directory.
        let dir = config
            .apply
            .spool_dir_for(&config.postgres.slot, &target.redacted());
        let spool = Spool::open(&dir).map_err(|e| {
            RunError::fatal(
                "config",
                format!("apply.spool_dir: {e} (set apply.spool_dir to a writable directory, or postgres.streaming = false)"),
            )
        })?;
        state.set_spool(spool);
    } else {
        // Files a streaming session left (its transactions come again, whole).
        spool::remove_leftovers(
            &config
                .apply
                .spool_dir_for(&config.postgres.slot, &target.redacted()),
        );
    }
    for table in &stopped_tables {
        state.backfills.remove_table(table);
        state.set_stopped(table, true);
    }
    // Also when none is: a table an earlier session stopped may be fixed now.
    state.write_stopped();
    // The stream starts past what the slot confirmed: after a loss, only what this process
    // applied beyond that can come again.
    let replay_horizon = applied
        .position
        .max(slots_ahead)
        .filter(|&p| p > slot_confirmed.max(start));
    begin(&mut state, config, loss.as_ref(), &saved, replay_horizon).await?;
    info!(
        slot = %config.postgres.slot,
        checkpoint = %checkpoint::position_text(saved.lsn),
        server_wal = %identity.xlog_pos,
        postgres = %target.redacted(),
        "streaming"
    );
    hooks.health.set_streaming(true);
    hooks.health.set_error(None);
    let result = state.pump(&mut stream, shutdown).await;
    applied.position = applied.position.max(state.position());
    hooks.health.set_streaming(false);
    if result.is_ok() {
        // Clean stop: everything committed is written and confirmed as far as allowed.
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.finish()).await;
    }
    result
}

/// The Redis side of a session.
struct RedisSide {
    /// Where the checkpoint is: the one server, the master the sentinels name, or on a
    /// cluster the master of the checkpoint's hash slot.
    redis: redis::aio::MultiplexedConnection,
    /// Connections for scans, one per master (the writes' connection carries WATCH state
    /// between a batch's check and its EXEC).
    scans: Vec<redis::aio::MultiplexedConnection>,
    /// On a cluster: the router for the slot-by-slot writes.
    router: Option<SlotRouter>,
}

async fn connect_redis(config: &Config, checkpoint_key: &str) -> Result<RedisSide, RunError> {
    // A large write on a loaded Redis can take well over redis-rs's default 500 ms reply
    // timeout; ending the session for it would only replay the same batch. A dead server
    // is still noticed: the connection drops.
    let redis_config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(60)));
    let client = match &config.redis.topology {
        RedisTopology::Cluster { seeds } => {
            let seeds: Vec<String> = seeds.iter().map(|s| s.expose().to_string()).collect();
            let mut router = SlotRouter::connect(&seeds, config.redis.tls_ca_file.clone())
                .await
                .map_err(|e| RunError::transient("redis", e.to_string()))?;
            let home = crate::cluster::key_slot(checkpoint_key.as_bytes());
            let master = router.owner(home).map(str::to_string).ok_or_else(|| {
                RunError::transient(
                    "redis",
                    format!("redis cluster: hash slot {home} (the checkpoint's) has no master"),
                )
            })?;
            let redis = router.node(&master).await?;
            let mut scans = Vec::new();
            for addr in router.masters() {
                // Of their own: the router's carry the slot writes.
                let url = router.url_for(&addr);
                let client = crate::config::redis_client(&url, config.redis.tls_ca_file.as_ref())?;
                scans.push(
                    client
                        .get_multiplexed_async_connection_with_config(&redis_config)
                        .await?,
                );
            }
            return Ok(RedisSide {
                redis,
                scans,
                router: Some(router),
            });
        }
        // With sentinels, the master they name now (after a failover, the new one).
        RedisTopology::Sentinel(_) => config
            .redis
            .resolve()
            .await
            .map_err(|e| RunError::transient("redis", format!("redis.sentinel: {e}")))?,
        RedisTopology::Single => config
            .redis
            .client()
            .map_err(|e| RunError::fatal("config", format!("redis.url: {e}")))?,
    };
    let redis = client
        .get_multiplexed_async_connection_with_config(&redis_config)
        .await?;
    let scans = client
        .get_multiplexed_async_connection_with_config(&redis_config)
        .await?;
    Ok(RedisSide {
        redis,
        scans: vec![scans],
        router: None,
    })
}

/// Postgres gave this session the slot: from here on, only it may write. Takes the
/// checkpoint over (a new owner token; a new epoch where there was none) and returns the
/// token with what the checkpoint held.
async fn take_over(
    redis: &mut redis::aio::MultiplexedConnection,
    checkpoint_key: &str,
    before: &CheckpointState,
) -> Result<(String, checkpoint::Takeover), RunError> {
    let owner_token = checkpoint::random_token();
    let taken = checkpoint::takeover(
        redis,
        checkpoint_key,
        &owner_token,
        &checkpoint::random_token(),
    )
    .await?;
    if taken.state.lsn < before.lsn && !taken.fresh {
        return Err(RunError::transient(
            "redis_data_lost",
            "Redis went back in time while the session started (a restore, or a replica \
             promoted): starting over",
        ));
    }
    Ok((owner_token, taken))
}

/// A standby is waited for, not streamed from: the daemon streams from the primary.
async fn check_primary(
    catalog: &tokio_postgres::Client,
    target: &PgTarget,
) -> Result<(), RunError> {
    let in_recovery: bool = catalog
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    if in_recovery {
        // Retried, not fatal: behind a name that moves to the new primary, the server may
        // be one whose promotion is under way.
        return Err(RunError::transient(
            "postgres",
            format!(
                "postgres {} is a standby (in recovery), and pgcache streams from the primary: \
                 waiting for it to be promoted. If postgres.url names only standbys, list the \
                 primary too, with target_session_attrs=read-write",
                target.redacted()
            ),
        ));
    }
    Ok(())
}

/// Whether to ask for large transactions streamed: `postgres.streaming`, on a server that
/// can (Postgres 14+, protocol version 2).
fn streams(config: &Config, replication: &ReplicationConnection) -> bool {
    let major = replication
        .parameter("server_version")
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse::<u32>().ok());
    config.postgres.streaming && major.is_some_and(|m| m >= 14)
}

/// Whether the spool directory takes files. One set in `apply.spool_dir` must (the error
/// names it); when the default one (in the system's temporary directory) does not, as in a
/// container with a read-only file system, the daemon warns and asks for whole transactions
/// instead, as it did before it could stream them.
fn spool_usable(config: &Config, target: &PgTarget) -> Result<bool, RunError> {
    let dir = config
        .apply
        .spool_dir_for(&config.postgres.slot, &target.redacted());
    match Spool::check_writable(&dir) {
        Ok(()) => Ok(true),
        Err(e) if config.apply.spool_dir.is_some() => Err(RunError::fatal(
            "config",
            format!("apply.spool_dir: {e} (set apply.spool_dir to a writable directory, or postgres.streaming = false)"),
        )),
        Err(e) => {
            warn!(error = %e, "large transactions are not streamed: the default spool directory cannot be written; set apply.spool_dir to a writable directory (or postgres.streaming = false to silence this)");
            Ok(false)
        }
    }
}

/// Starts the logical stream at `start`. A slot lost since the check before (invalidated,
/// or dropped) ends the same ways: the lost-slot error, or with `recreate_lost_slot` a new
/// slot and a session that starts over (the mark in the checkpoint makes it rebuild).
async fn start_stream(
    replication: ReplicationConnection,
    config: &Config,
    (start, streaming): (Lsn, bool),
    (catalog, redis): (
        &tokio_postgres::Client,
        &mut redis::aio::MultiplexedConnection,
    ),
    checkpoint_key: &str,
    before: &CheckpointState,
) -> Result<ReplicationStream, RunError> {
    let (slot_name, publication) = (&config.postgres.slot, &config.postgres.publication);
    let started = if streaming {
        replication
            .start_logical_streaming(slot_name, start, publication)
            .await
    } else {
        replication
            .start_logical(slot_name, start, publication)
            .await
    };
    match started {
        Ok(stream) => Ok(stream),
        Err(e) if slot::is_lost_error(&e) => {
            // Lost since the check above (invalidated, or dropped): the same outcomes.
            let Some(lost) = slot::Lost::find(catalog, &config.postgres.slot, before).await? else {
                return Err(e.into());
            };
            if !config.postgres.recreate_lost_slot {
                return Err(lost.error(checkpoint_key));
            }
            lost.recreate(catalog, redis, checkpoint_key, before)
                .await?;
            // The mark in the checkpoint makes the next session rebuild the cache.
            Err(RunError::transient(
                "slot_lost",
                format!(
                    "replication slot {:?} was lost ({}) and created again: starting over",
                    config.postgres.slot,
                    lost.reason()
                ),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// Sets the stream up from the checkpoint: resumed as saved, or recovered from a loss.
///
/// What a reader may have seen from Redis before it lost it is at most what this process
/// applied (`replay_horizon`), or what the slot confirmed: an earlier process's writes
/// beyond its last confirmation are the one window a restart cannot know of.
async fn begin(
    state: &mut Stream<'_>,
    config: &Config,
    loss: Option<&Loss>,
    saved: &CheckpointState,
    replay_horizon: Option<Lsn>,
) -> Result<(), RunError> {
    let Some(loss) = loss else {
        return state.resume(saved).await;
    };
    state.recover(loss, replay_horizon);
    state.notice_rule_changes(saved, true);
    // Every value is written anew: record the shapes they are written in.
    for rule in &config.tables {
        let table = rule.qualified_name();
        if let Some(shape) = state.catalog_shape(rule).await? {
            state.record_shape(&table, shape);
        }
        if let Some(oid) = state.relations.oid_of(&table) {
            state.record_oid(&table, oid);
        }
    }
    Ok(())
}

impl Loss {
    /// On a cluster whose root checkpoint is good: the slots that lost writes.
    fn hash_slots(root: &checkpoint::Takeover, slots: &[checkpoint::Takeover]) -> Option<Loss> {
        let lost: Vec<u16> = slots
            .iter()
            .enumerate()
            .filter(|(slot, taken)| {
                let recorded = root.state.hash_slots.get(&(*slot as u16));
                (taken.fresh && !root.fresh)
                    || recorded.is_some_and(|&r| taken.state.lsn.is_none_or(|lsn| lsn < r))
            })
            .map(|(slot, _)| slot as u16)
            .collect();
        (!lost.is_empty()).then_some(Loss::HashSlotsBehind { slots: lost })
    }

    /// What Redis lost, from the checkpoint before and after this session took it over and
    /// the slot's confirmed position.
    fn detect(
        before: &CheckpointState,
        taken: &checkpoint::Takeover,
        slot_confirmed: Lsn,
        server_wal: Lsn,
    ) -> Option<Loss> {
        if taken.fresh {
            Some(Loss::NoCheckpoint {
                had_data: before.lsn.is_some() || !before.backfills.is_empty(),
            })
        } else if let Some(reason) = &taken.state.slot_lost {
            Some(Loss::SlotLost {
                reason: reason.clone(),
            })
        } else if let Some(checkpoint) = taken.state.lsn.filter(|&lsn| lsn > server_wal) {
            Some(Loss::PostgresBehind {
                checkpoint,
                server: server_wal,
            })
        } else if taken.state.lsn.unwrap_or(Lsn::ZERO) < slot_confirmed {
            Some(Loss::Behind {
                checkpoint: taken.state.lsn,
                slot: slot_confirmed,
            })
        } else {
            None
        }
    }
}

/// Preflight's findings, once Postgres as a whole is ready (else a fatal error listing
/// what is not); findings about single tables are left to [`stop_unready_tables`].
async fn ready_findings(
    catalog: &tokio_postgres::Client,
    config: &Config,
) -> Result<Vec<preflight::Finding>, RunError> {
    let findings = preflight::postgres_findings(catalog, config).await?;
    let failed: Vec<String> = findings
        .iter()
        .filter(|f| f.level == Level::Fail && f.table.is_none())
        .map(|f| f.to_string())
        .collect();
    if !failed.is_empty() {
        return Err(RunError::fatal(
            "postgres",
            format!("Postgres is not ready for pgcache:\n{}", failed.join("\n")),
        ));
    }
    Ok(findings)
}

/// A table that is not set up right stops alone, its keys (and its invalidation keys, which
/// its changes would no longer delete) dropped; the others go on. Returns the tables
/// stopped.
fn stop_unready_tables(
    config: &Config,
    findings: &[preflight::Finding],
    relations: &mut RelationCache,
    batch: &mut Batch,
) -> Vec<String> {
    let mut stopped = Vec::new();
    for finding in findings.iter().filter(|f| f.level == Level::Fail) {
        let Some(table) = &finding.table else {
            continue;
        };
        error!(%table, problem = %finding, "table stopped: it is not set up for pgcache; its keys are dropped");
        if let Some(key_space) = relations.stop_table(table, &finding.to_string()) {
            batch.push_committed(Op::DropKeySpace { key_space });
            // Its keys are gone: once it is set up right, the next start backfills it.
            batch.push_field(format!("{FIELD_BACKFILL_PREFIX}{table}"), String::new());
        }
        if let Some(rule) = config.table_named(table) {
            let patterns = rule.invalidation_patterns(&config.redis.key_prefix);
            if !patterns.is_empty() {
                batch.push_committed(Op::DropMatching { patterns });
            }
        }
        stopped.push(table.clone());
    }
    stopped
}

/// The slot's `confirmed_flush_lsn`: Redis holds at least this much, unless it went back.
async fn slot_confirmed(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Lsn, tokio_postgres::Error> {
    let confirmed: Option<String> = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .and_then(|row| row.get(0));
    Ok(confirmed.and_then(|t| t.parse().ok()).unwrap_or(Lsn::ZERO))
}

/// How WAL pages are laid out, to place positions the way Postgres prints them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WalLayout {
    block: u64,
    segment: u64,
}

impl WalLayout {
    async fn read(client: &tokio_postgres::Client) -> Result<WalLayout, tokio_postgres::Error> {
        let row = client
            .query_one(
                "SELECT current_setting('wal_block_size')::int8, \
                        pg_size_bytes(current_setting('wal_segment_size'))",
                &[],
            )
            .await?;
        let (block, segment): (i64, i64) = (row.get(0), row.get(1));
        Ok(WalLayout {
            block: block.max(1) as u64,
            segment: segment.max(1) as u64,
        })
    }

    /// The walsender reports where the last record it read *ends*, which is a page boundary
    /// when the record fills its page; `pg_current_wal_insert_lsn()` reports where the next
    /// record *starts*, past the next page's header. No record ends inside a header, so a
    /// position at a boundary is moved past the header: then a reader that waits for the
    /// position it read sees the daemon reach it at rest.
    pub(crate) fn past_page_header(self, lsn: Lsn) -> Lsn {
        if lsn.0 == 0 || lsn.0 % self.block != 0 {
            return lsn;
        }
        // MAXALIGNed XLogLongPageHeaderData at a segment's start, XLogPageHeaderData else.
        let header = if lsn.0 % self.segment == 0 { 40 } else { 24 };
        Lsn(lsn.0 + header)
    }
}

/// Redis refuses arguments larger than `proto-max-bulk-len`; managed services may hide
/// `CONFIG`, in which case the default is assumed.
async fn max_value_bytes(redis: &mut redis::aio::MultiplexedConnection) -> usize {
    let reply: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("proto-max-bulk-len")
        .query_async(redis)
        .await;
    reply
        .ok()
        .and_then(|pair| pair.get(1).and_then(|v| v.parse().ok()))
        .unwrap_or(apply::DEFAULT_MAX_VALUE)
}

impl Stream<'_> {
    /// Redis lost data or went back in time: forget every table's keys, write nothing old
    /// again, and backfill the mirror tables from the current rows.
    fn recover(&mut self, loss: &Loss, horizon: Option<Lsn>) {
        match loss {
            Loss::NoCheckpoint { had_data: false } => info!(
                "no checkpoint in Redis: first start (or Redis lost everything); backfilling \
                 mirror tables"
            ),
            Loss::NoCheckpoint { had_data: true } => error!(
                "Redis lost its data: the checkpoint is gone (FLUSHALL, or a restart without \
                 persistence); dropping every table's keys and backfilling the mirror tables"
            ),
            Loss::Behind { checkpoint, slot } => error!(
                checkpoint = %checkpoint::position_text(*checkpoint),
                slot = %slot,
                "Redis went back in time: its checkpoint is behind what the slot confirmed \
                 (a restore from an older snapshot, or an asynchronous replica promoted); \
                 changes in between are gone from it, so every table's keys are dropped and \
                 the mirror tables backfilled"
            ),
            Loss::PostgresBehind { checkpoint, server } => error!(
                %checkpoint,
                %server,
                "Postgres went back in time: the checkpoint in Redis is ahead of the server's \
                 WAL (restored from a copy of its data directory, or a lagging standby \
                 promoted); Redis holds changes Postgres no longer has, so every table's keys \
                 are dropped and the mirror tables backfilled"
            ),
            Loss::HashSlotsBehind { slots } => error!(
                slots = %crate::cluster::ranges_text(&crate::cluster::ranges(slots.iter().copied())),
                "Redis Cluster lost writes: these hash slots' checkpoints are behind what the \
                 daemon wrote there, or gone (a master failed over to a replica without its \
                 last writes, or lost its data); every table's keys are dropped and the mirror \
                 tables backfilled (set redis.wait_replicas to make a failover lose nothing)"
            ),
            Loss::SlotLost { reason } => warn!(
                slot = %self.config.postgres.slot,
                %reason,
                "the replication slot was lost and created again: the changes since its \
                 last position are gone from the WAL, so every table's keys are dropped and \
                 the mirror tables backfilled"
            ),
        }
        match loss {
            Loss::NoCheckpoint { had_data: true } | Loss::Behind { .. } => {
                metrics::counter!(m::ERRORS, "kind" => "redis_data_lost").increment(1);
            }
            Loss::HashSlotsBehind { slots } => {
                metrics::counter!(m::ERRORS, "kind" => "redis_data_lost").increment(1);
                // From here on the slots are rebuilt: what they hold now is the baseline.
                for slot in slots {
                    self.batch.push_field(
                        format!("{}{slot}", checkpoint::FIELD_HASH_SLOT_PREFIX),
                        String::new(),
                    );
                }
            }
            Loss::PostgresBehind { .. } => {
                metrics::counter!(m::ERRORS, "kind" => "postgres_data_lost").increment(1);
            }
            Loss::SlotLost { .. } => {
                metrics::counter!(m::ERRORS, "kind" => "slot_lost").increment(1);
                // Written with the drops: from then on the rebuild itself is under way.
                self.batch
                    .push_field(checkpoint::FIELD_SLOT_LOST.to_string(), String::new());
            }
            Loss::NoCheckpoint { had_data: false } => {}
        }
        for rule in &self.config.tables {
            let key_space = rule.key_space(&self.config.redis.key_prefix);
            self.batch.push_committed(Op::DropKeySpace { key_space });
            // Values computed from what Redis lost may be older than Postgres too.
            let patterns = rule.invalidation_patterns(&self.config.redis.key_prefix);
            if !patterns.is_empty() {
                self.batch.push_committed(Op::DropMatching { patterns });
            }
        }
        self.batch
            .push_field(checkpoint::FIELD_PARTIAL.to_string(), String::new());
        if let Some(horizon) = horizon {
            self.mute_until(horizon);
        }
        if self.config.backfill.auto {
            for table in self.backfills.mirror_tables() {
                self.backfills.schedule(&table, None);
            }
        }
    }

    /// The checkpoint is good: resume backfills, repairs and reconciles where they were,
    /// and notice schema changes made while the daemon was stopped.
    async fn resume(&mut self, saved: &CheckpointState) -> Result<(), RunError> {
        self.applied_upto = saved.lsn;
        self.resume_partial = saved.partial;
        for (key, text) in &saved.repairs {
            match apply::Repair::decode(text) {
                Some(repair) => self.backfills.repair(repair),
                None => warn!(%key, "a repair in the checkpoint does not parse; dropping it"),
            }
        }
        for (table, scan) in &saved.reconciles {
            self.backfills.reconcile(table, Some(scan));
        }
        for rule in &self.config.tables {
            let table = rule.qualified_name();
            if rule.mode == Mode::Mirror && self.config.backfill.auto {
                match saved.backfills.get(&table) {
                    None => {
                        info!(%table, "table new in the config: backfilling it");
                        self.backfills.schedule(&table, None);
                    }
                    Some(progress) if !progress.is_done() => {
                        info!(%table, rows = progress.rows, "resuming backfill");
                        self.backfills.schedule(&table, Some(progress));
                    }
                    Some(_) => {}
                }
            }
            let Some(now) = self.catalog_shape(rule).await? else {
                continue;
            };
            if let Some(oid) = self.relations.oid_of(&table) {
                let swapped = saved.oids.get(&table).is_some_and(|&stored| stored != oid);
                if swapped && !self.relations.is_stopped(&table) {
                    info!(%table, "the table was dropped and created again (or swapped) while the daemon was stopped: deleting the keys of rows that are gone, and writing it again");
                    self.rewrite_swapped(rule);
                }
                self.record_oid(&table, oid);
            }
            if saved
                .shapes
                .get(&table)
                .is_some_and(|stored| *stored != now)
            {
                info!(%table, "the table's columns changed while the daemon was stopped");
                self.reshape(rule.mode, &table);
            }
            self.record_shape(&table, now);
        }
        self.notice_rule_changes(saved, false);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn backfill_errors_keep_their_cause_and_class() {
        let redis_down =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let e = RunError::from(backfill::BackfillError::Redis {
            table: "public.t".to_string(),
            source: redis_down,
        });
        assert!(!e.is_fatal());
        assert_eq!(e.kind(), "redis");
        assert!(
            e.to_string().starts_with("backfill of public.t: redis:"),
            "{e}"
        );
        let cause = e
            .source()
            .and_then(|s| s.source())
            .expect("the Redis error");
        assert!(cause.downcast_ref::<redis::RedisError>().is_some());

        let no_perm = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm),
            "NOPERM",
        ));
        let e = RunError::from(backfill::BackfillError::Redis {
            table: "public.t".to_string(),
            source: no_perm,
        });
        assert!(e.is_fatal());

        let e = RunError::from(backfill::BackfillError::Task("panicked".to_string()));
        assert!(!e.is_fatal());
        assert_eq!(e.kind(), "backfill");
    }
}
