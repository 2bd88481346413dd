//! The run loop: replication stream in, Redis out, progress back to Postgres.
//!
//! One *session* connects Redis, reads the checkpoint, connects Postgres and streams from the
//! checkpoint. Any failure ends the session; the next one starts over from the checkpoint in
//! Redis, so a transaction that was in hand when Redis or Postgres went away is simply sent
//! again (G1). Postgres is told a position only after Redis acknowledged the `EXEC` holding it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::apply::{Batch, Flushed, Merge};
use crate::backfill::{self, Backfills};
use crate::checkpoint;
use crate::config::Config;
use crate::health::Health;
use crate::metrics as m;
use crate::pgconn::{self, PgTarget};
use crate::pgoutput::{self, Message};
use crate::preflight::{self, Level};
use crate::relations::{RelationCache, RelationState, TypeResolver};
use crate::replication::{
    ReplicationConnection, ReplicationError, ReplicationEvent, ReplicationStream,
};
use crate::Lsn;

/// Why the daemon stopped or a session ended.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Retrying will not help: the operator must fix something (the message says what).
    #[error("{0}")]
    Fatal(String),
    /// A server went away or refused for now; the daemon reconnects.
    #[error("{0}")]
    Transient(String),
}

impl From<ReplicationError> for RunError {
    fn from(e: ReplicationError) -> Self {
        metrics::counter!(m::ERRORS, "kind" => "postgres").increment(1);
        if e.is_retryable() {
            RunError::Transient(format!("replication: {e}"))
        } else {
            RunError::Fatal(format!("replication: {e}"))
        }
    }
}

impl From<redis::RedisError> for RunError {
    fn from(e: redis::RedisError) -> Self {
        metrics::counter!(m::ERRORS, "kind" => "redis").increment(1);
        match e.kind() {
            redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::InvalidClientConfig => {
                RunError::Fatal(format!("redis: {e}"))
            }
            _ => RunError::Transient(format!("redis: {e}")),
        }
    }
}

impl From<tokio_postgres::Error> for RunError {
    fn from(e: tokio_postgres::Error) -> Self {
        metrics::counter!(m::ERRORS, "kind" => "postgres").increment(1);
        let fatal = e.code().is_some_and(|c| {
            let c = c.code();
            c.starts_with("28") || c == "3D000" || c == "42501"
        });
        let message = match e.as_db_error() {
            Some(db) => format!("postgres: {}: {}", db.code().code(), db.message()),
            None => format!("postgres: {e}"),
        };
        if fatal {
            RunError::Fatal(message)
        } else {
            RunError::Transient(message)
        }
    }
}

/// Runs the daemon until `shutdown` turns true, reconnecting with capped, jittered backoff.
///
/// # Errors
/// [`RunError::Fatal`] when the servers are not set up for pgcache or refuse our credentials.
pub async fn run(config: Arc<Config>, mut shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
    let target = PgTarget::parse(config.postgres.url.expose())
        .map_err(|e| RunError::Fatal(format!("postgres.url: {e}")))?;
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        match session(&config, &target, &mut shutdown).await {
            Ok(()) => return Ok(()),
            Err(RunError::Fatal(message)) => {
                error!(error = %message, "stopping: this needs an operator");
                return Err(RunError::Fatal(message));
            }
            Err(RunError::Transient(message)) => {
                if started.elapsed() > Duration::from_secs(30) {
                    failures = 0;
                }
                failures += 1;
                metrics::counter!(m::RECONNECTS).increment(1);
                let delay = backoff(failures);
                warn!(error = %message, retry_in = ?delay, "session ended; reconnecting");
                Health::global().set_error(Some(message.clone()));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopped(&mut shutdown) => return Ok(()),
                }
            }
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

/// State of one streaming session.
struct Stream<'a> {
    config: &'a Config,
    redis: redis::aio::MultiplexedConnection,
    checkpoint_key: String,
    /// The checkpoint's epoch; a batch that finds another (or none) means Redis lost data.
    epoch: String,
    backfills: Backfills,
    /// Transactions that end at or below this were applied before (G3).
    applied_upto: Option<Lsn>,
    relations: RelationCache,
    types: TypeResolver,
    batch: Batch,
    /// The `EXEC` Redis is working on, if any.
    in_flight: Option<tokio::task::JoinHandle<Result<Applied, redis::RedisError>>>,
    in_transaction: bool,
    skipping: bool,
    commit_time: i64,
    /// Highest position Postgres may forget, and positions waiting out `confirm_delay`.
    confirmed: Lsn,
    confirm_queue: VecDeque<(Instant, Lsn)>,
    /// Last position sent to Postgres.
    sent: Lsn,
    last_status: Instant,
    last_heartbeat: Instant,
    wal_end: Lsn,
}

/// A batch Redis acknowledged.
struct Applied {
    flushed: Flushed,
    started: Instant,
}

/// Resolves with the in-flight `EXEC`'s result; never, when none is in flight.
async fn in_flight_done(
    in_flight: &mut Option<tokio::task::JoinHandle<Result<Applied, redis::RedisError>>>,
) -> Result<Applied, RunError> {
    match in_flight {
        Some(handle) => handle
            .await
            .map_err(|e| RunError::Transient(format!("redis write task: {e}")))?
            .map_err(RunError::from),
        None => std::future::pending().await,
    }
}

/// How often the daemon writes its heartbeat into the checkpoint hash (for `status`).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// Decides what to backfill from what the checkpoint says.
fn plan_backfills(config: &Config, saved: &checkpoint::CheckpointState, backfills: &mut Backfills) {
    let mut tables: Vec<String> = backfills.tables().map(str::to_string).collect();
    tables.sort();
    if saved.epoch.is_none() {
        if saved.lsn.is_some() || !saved.backfills.is_empty() {
            error!(
                "Redis lost its data: the checkpoint is there but its epoch is gone (FLUSHALL, \
                 or a restart without persistence); backfilling every mirror table"
            );
        } else {
            info!("no checkpoint in Redis: first start (or Redis lost everything); backfilling mirror tables");
        }
        if config.backfill.auto {
            for table in &tables {
                backfills.schedule(table, None);
            }
        }
        return;
    }
    if !config.backfill.auto {
        return;
    }
    for table in &tables {
        match saved.backfills.get(table) {
            None => {
                info!(%table, "table new in the config: backfilling it");
                backfills.schedule(table, None);
            }
            Some(progress) if progress.state != "done" => {
                info!(%table, rows = progress.rows, "resuming backfill");
                backfills.schedule(table, Some(progress));
            }
            Some(_) => {}
        }
    }
}

async fn session(
    config: &Config,
    target: &PgTarget,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RunError> {
    let client = redis::Client::open(config.redis.url.expose())
        .map_err(|e| RunError::Fatal(format!("redis.url: {e}")))?;
    // A large EXEC on a loaded Redis can take well over redis-rs's default 500 ms reply
    // timeout; ending the session for it would only replay the same batch. A dead server
    // is still noticed: the connection drops.
    let redis_config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(60)));
    let mut redis = client
        .get_multiplexed_async_connection_with_config(&redis_config)
        .await?;
    let checkpoint_key =
        checkpoint::checkpoint_key(&config.redis.key_prefix, &config.postgres.slot);
    let saved = checkpoint::read_state(&mut redis, &checkpoint_key)
        .await
        .map_err(|e| match e {
            checkpoint::CheckpointError::Redis(e) => RunError::from(e),
            other => RunError::Fatal(other.to_string()),
        })?;
    let applied_upto = saved.lsn;
    let epoch = match &saved.epoch {
        Some(epoch) => epoch.clone(),
        None => {
            let epoch = format!("{:016x}", rand::random::<u64>());
            let _: () = redis::cmd("HSET")
                .arg(&checkpoint_key)
                .arg(checkpoint::FIELD_EPOCH)
                .arg(&epoch)
                .query_async(&mut redis)
                .await?;
            epoch
        }
    };

    let catalog = pgconn::connect(target)
        .await
        .map_err(|e| RunError::Transient(format!("postgres {}: {e}", target.redacted())))?;
    let findings = preflight::postgres_findings(&catalog, config).await?;
    let failed: Vec<String> = findings
        .iter()
        .filter(|f| f.level == Level::Fail && f.table.is_none())
        .map(|f| f.to_string())
        .collect();
    if !failed.is_empty() {
        return Err(RunError::Fatal(format!(
            "Postgres is not ready for pgcache:\n{}",
            failed.join("\n")
        )));
    }
    // A table that is not set up right stops alone; the others go on.
    let mut stopped_tables: Vec<(String, String)> = Vec::new();
    for finding in findings.iter().filter(|f| f.level == Level::Fail) {
        if let Some(table) = &finding.table {
            error!(%table, problem = %finding, "table stopped: it is not set up for pgcache; its keys are dropped");
            stopped_tables.push((table.clone(), finding.to_string()));
        }
    }

    let backfill_client = pgconn::connect(target)
        .await
        .map_err(|e| RunError::Transient(format!("postgres {}: {e}", target.redacted())))?;
    let mut backfills = Backfills::new(backfill_client, config);
    let mut relations = RelationCache::new(config);
    let mut batch = Batch::default();
    for (table, problem) in &stopped_tables {
        backfills.remove_table(table);
        if let Some(key_space) = relations.stop_table(table, problem) {
            batch.push_committed(crate::apply::Op::DropKeySpace { key_space });
        }
    }
    plan_backfills(config, &saved, &mut backfills);

    let mut replication = ReplicationConnection::connect(target).await?;
    let identity = replication.identify_system().await?;
    let start = applied_upto.unwrap_or(Lsn::ZERO);
    let mut stream = replication
        .start_logical(&config.postgres.slot, start, &config.postgres.publication)
        .await?;
    info!(
        slot = %config.postgres.slot,
        checkpoint = %start,
        server_wal = %identity.xlog_pos,
        postgres = %target.redacted(),
        "streaming"
    );
    let mut state = Stream {
        config,
        redis,
        checkpoint_key,
        epoch,
        applied_upto,
        backfills,
        relations,
        types: TypeResolver::new(catalog),
        batch,
        in_flight: None,
        in_transaction: false,
        skipping: false,
        commit_time: 0,
        confirmed: start,
        confirm_queue: VecDeque::new(),
        sent: start,
        last_status: Instant::now(),
        last_heartbeat: Instant::now() - HEARTBEAT_EVERY,
        wal_end: start,
    };
    Health::global().set_streaming(true);
    Health::global().set_error(None);
    let result = state.pump(&mut stream, shutdown).await;
    Health::global().set_streaming(false);
    if result.is_ok() {
        // Clean stop: everything committed is flushed and confirmed above.
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.finish()).await;
    }
    result
}

impl Stream<'_> {
    async fn pump(
        &mut self,
        stream: &mut ReplicationStream,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), RunError> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.backfills.reading() {
                // The chunk's read is a task on this thread. A busy stream keeps this loop
                // from ever waiting (its messages are already buffered), so without a yield
                // the read would starve: let it, and its connection, run once per batch.
                tokio::task::yield_now().await;
            }
            if self.backfills.can_start() && !self.in_transaction {
                self.backfills
                    .start_next()
                    .await
                    .map_err(|e| RunError::Transient(e.to_string()))?;
            }
            let event = tokio::select! {
                biased;
                _ = stopped(shutdown) => {
                    self.flush(false).await?;
                    self.settle().await?;
                    self.release_confirmations(true);
                    self.send_status(stream, false).await?;
                    info!(confirmed = %self.confirmed, "stopped");
                    return Ok(());
                }
                _ = tick.tick() => {
                    Health::global().beat();
                    if self.last_heartbeat.elapsed() >= HEARTBEAT_EVERY {
                        self.last_heartbeat = Instant::now();
                        let (epoch,): (Option<String>,) = redis::pipe()
                            .cmd("HGET")
                            .arg(&self.checkpoint_key)
                            .arg(checkpoint::FIELD_EPOCH)
                            .cmd("HSET")
                            .arg(&self.checkpoint_key)
                            .arg(checkpoint::FIELD_HEARTBEAT_MS)
                            .arg(crate::apply::now_ms())
                            .ignore()
                            .query_async(&mut self.redis)
                            .await?;
                        self.check_epoch(epoch.as_deref())?;
                    }
                    self.release_confirmations(false);
                    if self.last_status.elapsed() >= Duration::from_secs(10) || self.confirm_moved() {
                        self.send_status(stream, false).await?;
                    }
                    continue;
                }
                read = self.backfills.read_finished() => {
                    self.backfills
                        .on_read(read)
                        .map_err(|e| RunError::Transient(e.to_string()))?;
                    continue;
                }
                applied = in_flight_done(&mut self.in_flight) => {
                    self.in_flight = None;
                    self.applied(applied?)?;
                    if self.confirm_due() {
                        self.send_status(stream, false).await?;
                    }
                    continue;
                }
                event = stream.next() => event?,
            };
            self.handle(event, stream).await?;
            // Natural batching: take whatever else has already arrived, then write.
            while self.batch.len() < self.config.apply.max_batch_changes || self.in_transaction {
                match stream.next_ready()? {
                    Some(event) => self.handle(event, stream).await?,
                    None => break,
                }
            }
            if self.batch.has_committed() {
                self.flush(false).await?;
                if self.confirm_due() {
                    self.send_status(stream, false).await?;
                }
            }
        }
    }

    async fn handle(
        &mut self,
        event: ReplicationEvent,
        stream: &mut ReplicationStream,
    ) -> Result<(), RunError> {
        match event {
            ReplicationEvent::XLogData { wal_end, data, .. } => {
                self.wal_end = self.wal_end.max(wal_end);
                let message = pgoutput::decode(data).map_err(|e| {
                    RunError::Fatal(format!("pgoutput: cannot decode a message: {e}"))
                })?;
                self.on_message(message).await
            }
            ReplicationEvent::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.wal_end = self.wal_end.max(wal_end);
                if !self.in_transaction && self.batch.is_empty() && self.in_flight.is_none() {
                    // Nothing of ours is pending below wal_end: let the slot move on, so
                    // traffic on unpublished tables does not pin WAL.
                    self.queue_confirmation(wal_end);
                }
                metrics::gauge!(m::LAG_BYTES)
                    .set(self.wal_end.0.saturating_sub(self.confirmed.0) as f64);
                if reply_requested {
                    self.release_confirmations(false);
                    self.send_status(stream, false).await?;
                }
                Ok(())
            }
        }
    }

    async fn on_message(&mut self, message: Message) -> Result<(), RunError> {
        let ops_before = self.batch.len();
        match message {
            Message::Begin(begin) => {
                self.in_transaction = true;
                self.commit_time = begin.commit_time;
                self.skipping = self.applied_upto.is_some_and(|done| begin.final_lsn < done);
                if self.skipping {
                    debug!(commit = %begin.final_lsn, "skipping a transaction the checkpoint covers");
                }
            }
            Message::Commit(commit) => {
                self.in_transaction = false;
                if self.skipping {
                    self.skipping = false;
                    if self.batch.is_empty() && self.in_flight.is_none() {
                        self.queue_confirmation(commit.end_lsn);
                    }
                } else {
                    self.batch.commit(commit.end_lsn, commit.commit_time);
                    metrics::counter!(m::TRANSACTIONS).increment(1);
                }
            }
            Message::Relation(relation) => {
                let (state, before) = self
                    .relations
                    .on_relation(&relation, &mut self.types)
                    .await?;
                let was_broken = matches!(before, Some(RelationState::Broken { .. }));
                match state {
                    RelationState::Broken {
                        table,
                        error,
                        key_space,
                    } => {
                        error!(%table, %error, "table stopped: its rule no longer fits the table; its keys are dropped so nothing stale is served");
                        metrics::counter!(m::ERRORS, "kind" => "rule").increment(1);
                        if !was_broken {
                            self.batch.drop_key_space(key_space.clone());
                        }
                    }
                    RelationState::Active(table) if was_broken => {
                        let name = table.rule.qualified_name();
                        info!(table = %name, "the table fits its rule again: backfilling it");
                        self.backfills.schedule(&name, None);
                    }
                    RelationState::Active(table) => {
                        // A schema change that changes the cached shape (a column added,
                        // dropped, renamed or retyped) leaves untouched rows in the old shape:
                        // rewrite them (mirror) or drop them (refresh: absence is safe).
                        let reshaped = matches!(&before, Some(RelationState::Active(old)) if old.columns != table.columns);
                        if reshaped {
                            let name = table.rule.qualified_name();
                            match table.rule.mode {
                                crate::config::Mode::Mirror => {
                                    info!(table = %name, "cached columns changed: backfilling the table in its new shape");
                                    self.backfills.schedule(&name, None);
                                }
                                crate::config::Mode::Refresh => {
                                    info!(table = %name, "cached columns changed: dropping the table's cached keys");
                                    self.batch.drop_key_space(table.key_space.clone());
                                }
                                crate::config::Mode::Invalidate => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
            Message::Message(message) if message.prefix == backfill::MESSAGE_PREFIX => {
                match backfill::Control::parse(&message.content) {
                    Some(backfill::Control::Low(id)) => self.backfills.on_low(&id),
                    Some(backfill::Control::High(id)) => {
                        let chunk = self
                            .backfills
                            .on_high(&id)
                            .await
                            .map_err(|e| RunError::Transient(e.to_string()))?;
                        if let Some((ops, field, value)) = chunk {
                            self.batch.push_backfill(ops, field, value);
                        }
                    }
                    Some(backfill::Control::Resync(table)) => {
                        self.backfills.resync(table.as_deref());
                    }
                    None => debug!("ignoring a pgcache message this version does not know"),
                }
            }
            Message::Insert(insert) if !self.skipping => {
                if let Some(table) = self.active(insert.relation_id) {
                    let result = self.batch.insert(&table, &insert.new);
                    self.count(&table, "insert", result);
                }
            }
            Message::Update(update) if !self.skipping => {
                if let Some(table) = self.active(update.relation_id) {
                    let result = self.batch.update(&table, update.old.as_ref(), &update.new);
                    let result = match result {
                        Ok(Merge::NeedsCached { key }) => {
                            let cached = self.cached_value(&key).await?;
                            self.batch
                                .merge(&table, key, &update.new, cached.as_deref())
                        }
                        Ok(Merge::Done) => Ok(()),
                        Err(e) => Err(e),
                    };
                    self.count(&table, "update", result);
                }
            }
            Message::Delete(delete) if !self.skipping => {
                if let Some(table) = self.active(delete.relation_id) {
                    let result = self.batch.delete(&table, &delete.old);
                    self.count(&table, "delete", result);
                }
            }
            Message::Truncate(truncate) if !self.skipping => {
                for id in truncate.relation_ids {
                    if let Some(table) = self.active(id) {
                        self.batch.truncate(&table);
                        self.count(&table, "truncate", Ok(()));
                    }
                }
            }
            Message::Insert(_) | Message::Update(_) | Message::Delete(_) | Message::Truncate(_) => {
            }
            Message::Type(_) | Message::Origin(_) | Message::Message(_) => {}
        }
        for (field, value) in self.backfills.take_meta() {
            self.batch.push_meta(field, value);
        }
        if let Some(key_space) = self.backfills.window_key_space() {
            // Inside a backfill chunk's window the stream's values win over the chunk's.
            if self.batch.truncated_since(ops_before, &key_space) {
                self.backfills.drop_all();
            } else {
                let keys: Vec<String> = self
                    .batch
                    .keys_since(ops_before)
                    .filter(|key| key.starts_with(key_space.as_str()))
                    .map(str::to_string)
                    .collect();
                self.backfills.drop_keys(keys.iter().map(String::as_str));
            }
        }
        if self.batch.open_len() >= self.config.apply.max_transaction_changes {
            // A transaction too large to hold: write what we have without the checkpoint.
            // Atomicity is capped here (documented); G1 and G3 hold because the checkpoint
            // only moves at the commit.
            self.flush(true).await?;
        }
        Ok(())
    }

    fn active(&self, relation_id: u32) -> Option<Arc<crate::relations::TableState>> {
        match self.relations.get(relation_id) {
            Some(RelationState::Active(table)) => Some(table.clone()),
            _ => None,
        }
    }

    fn count(
        &self,
        table: &crate::relations::TableState,
        op: &'static str,
        result: Result<(), crate::apply::ChangeError>,
    ) {
        let counter = match op {
            "insert" => &table.counters.insert,
            "update" => &table.counters.update,
            "delete" => &table.counters.delete,
            _ => &table.counters.truncate,
        };
        counter.increment(1);
        if let Err(e) = result {
            // The key was deleted instead where one could be computed; absence is safe.
            warn!(error = %e, "change could not be cached as a value");
            metrics::counter!(m::ERRORS, "kind" => "change").increment(1);
        }
    }

    /// The value `key` will hold when this batch is applied, for merging TOASTed columns.
    async fn cached_value(&mut self, key: &str) -> Result<Option<Vec<u8>>, RunError> {
        // The batch in flight may write this key: let it land before reading.
        self.settle().await?;
        match self.batch.pending_value(key) {
            Some(pending) => Ok(pending.map(<[u8]>::to_vec)),
            None => Ok(redis::cmd("GET")
                .arg(key)
                .query_async(&mut self.redis)
                .await?),
        }
    }

    /// Starts writing the committed part of the batch (all of it with `include_open`).
    /// One `EXEC` is in flight at a time: the previous one is settled first, so batches
    /// reach Redis in order, while decoding the next batch overlaps with Redis applying this
    /// one.
    #[tracing::instrument(name = "batch", level = "debug", skip_all, fields(ops = self.batch.len()))]
    async fn flush(&mut self, include_open: bool) -> Result<(), RunError> {
        self.settle().await?;
        let Some((pipe, flushed)) = self.batch.prepare(&self.checkpoint_key, include_open) else {
            return Ok(());
        };
        debug!(
            ops = flushed.ops,
            transactions = flushed.transactions,
            "batch sent"
        );
        let mut conn = self.redis.clone();
        let started = Instant::now();
        self.in_flight = Some(tokio::spawn(async move {
            let (epoch,): (Option<String>,) = pipe.query_async(&mut conn).await?;
            Ok(Applied {
                flushed: Flushed { epoch, ..flushed },
                started,
            })
        }));
        Ok(())
    }

    /// Waits for the `EXEC` in flight, if any, and takes note of it.
    async fn settle(&mut self) -> Result<(), RunError> {
        if let Some(handle) = self.in_flight.take() {
            let applied = handle
                .await
                .map_err(|e| RunError::Transient(format!("redis write task: {e}")))??;
            self.applied(applied)?;
        }
        Ok(())
    }

    /// An `EXEC` was acknowledged: its checkpoint may now be confirmed to Postgres.
    fn applied(&mut self, applied: Applied) -> Result<(), RunError> {
        let Applied { flushed, started } = applied;
        // What this batch wrote is right; if Redis lost what came before, a new session
        // backfills.
        self.check_epoch(flushed.epoch.as_deref())?;
        metrics::counter!(m::BATCHES).increment(1);
        metrics::histogram!(m::BATCH_OPS).record(flushed.ops as f64);
        metrics::histogram!(m::EXEC_SECONDS).record(started.elapsed().as_secs_f64());
        let now = pg_now_micros();
        for commit_time in &flushed.commit_times {
            metrics::histogram!(m::APPLY_LATENCY).record((now - commit_time).max(0) as f64 / 1e6);
        }
        if let Some(lsn) = flushed.checkpoint {
            self.applied_upto = Some(lsn);
            self.queue_confirmation(lsn);
            debug!(ops = flushed.ops, transactions = flushed.transactions, checkpoint = %lsn, "applied");
        }
        Ok(())
    }

    /// The checkpoint's epoch as Redis just reported it must still be ours; otherwise Redis
    /// lost its data (FLUSHALL, or a restart without persistence) and the session restarts
    /// to backfill.
    fn check_epoch(&self, found: Option<&str>) -> Result<(), RunError> {
        if found == Some(self.epoch.as_str()) {
            return Ok(());
        }
        metrics::counter!(m::ERRORS, "kind" => "redis_data_lost").increment(1);
        Err(RunError::Transient(
            "Redis lost its data (the checkpoint's epoch is gone): restarting to backfill".into(),
        ))
    }

    fn queue_confirmation(&mut self, lsn: Lsn) {
        if self.config.apply.confirm_delay.is_zero() {
            self.confirmed = self.confirmed.max(lsn);
        } else {
            self.confirm_queue.push_back((Instant::now(), lsn));
        }
    }

    /// Moves `confirmed` past positions whose delay has passed (all of them when `all`).
    fn release_confirmations(&mut self, all: bool) {
        let delay = self.config.apply.confirm_delay;
        while let Some(&(at, lsn)) = self.confirm_queue.front() {
            if !all && at.elapsed() < delay {
                break;
            }
            self.confirmed = self.confirmed.max(lsn);
            self.confirm_queue.pop_front();
        }
    }

    /// Confirm now, or leave it to the next tick: under load a status message per batch
    /// costs the walsender and us more than it is worth.
    fn confirm_due(&self) -> bool {
        self.confirm_moved() && self.last_status.elapsed() >= Duration::from_millis(20)
    }

    fn confirm_moved(&self) -> bool {
        self.confirmed > self.sent
    }

    async fn send_status(
        &mut self,
        stream: &mut ReplicationStream,
        reply: bool,
    ) -> Result<(), RunError> {
        let lsn = self.confirmed;
        stream.send_status(lsn, lsn, lsn, reply).await?;
        self.sent = lsn;
        self.last_status = Instant::now();
        metrics::gauge!(m::CONFIRMED_LSN).set(lsn.0 as f64);
        Ok(())
    }
}

/// Microseconds since 2000-01-01 UTC, the Postgres epoch used in commit timestamps.
pub fn pg_now_micros() -> i64 {
    const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_micros() as i64 - PG_EPOCH_UNIX_SECS * 1_000_000
}
