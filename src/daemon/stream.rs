//! One session's stream: a handler per pgoutput message kind, the batch, the write in
//! flight, and the positions confirmed to Postgres.
//!
//! Flow control: one write is in flight at a time, so writes reach Redis in order, while the
//! next batch is decoded. When the batch is full (by changes or bytes) and a write is still
//! in flight, the loop stops reading the stream until it lands: Redis's pace slows the
//! replication read instead of filling memory (G8).
//!
//! Streamed transactions (protocol version 2): the blocks between Stream Start and Stop go
//! to the spool unread, Relation messages included (they describe the schema as of that
//! transaction, which a transaction committing before it must not see). At Stream Commit
//! the spool is read back a message at a time through the same handlers as a transaction
//! sent whole, as `Begin(xid) ... Commit`, so the checkpoint, visibility, backfill, muting
//! and split rules apply to it unchanged; while it is read back, the stream is not. Stream
//! Abort deletes the file, or marks a subtransaction whose changes are skipped. Nothing
//! about an open streamed transaction moves the checkpoint or the confirmed position.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::{stopped, RunError, WalLayout};
use crate::checkpoint::{
    self, Partial, FIELD_BACKFILL_PREFIX, FIELD_HEARTBEAT_MS, FIELD_OID_PREFIX, FIELD_PARTIAL,
    FIELD_SHAPE_PREFIX,
};
use crate::clock::{now_ms, pg_now_micros};
use crate::config::{Config, Mode, TableRule};
use crate::daemon::apply::script::{self, Owner};
use crate::daemon::apply::ChangeTag;
use crate::daemon::apply::{Batch, ChangeError, Prepared, Repair};
use crate::daemon::backfill::{self, Backfills, Control};
use crate::daemon::cluster_apply::ClusterApply;
use crate::daemon::pgoutput::{
    self, Begin, Commit, Delete, Insert, Message, Relation, Truncate, Update,
};
use crate::daemon::relations::{self, RelationCache, RelationState, TableState, TypeResolver};
use crate::daemon::replication::{ReplicationEvent, ReplicationStream};
use crate::daemon::spool::Spool;
use crate::daemon::visibility::{Snapshot, Visibility};
use crate::metrics as m;
use crate::ops::health::Health;
use crate::sql::TableIdentity;
use crate::Lsn;

mod streamed;
use streamed::{spool_error, Replaying};

/// How often the daemon records its heartbeat in the checkpoint (for `status`); the write
/// also checks that this daemon still owns the checkpoint and that Redis kept its data.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// A write Redis acknowledged.
struct Done {
    visibility: Visibility,
    position: Option<Lsn>,
    transactions: usize,
    commit_times: Vec<i64>,
    ops: usize,
    started: Instant,
    repairs: Vec<Repair>,
}

type InFlight = tokio::task::JoinHandle<Result<Done, RunError>>;

/// How long a control event waits for its own transaction to be visible before the session
/// starts over (well inside any `wal_sender_timeout` worth running with).
const VISIBLE_WAIT: Duration = Duration::from_secs(5);

/// The transaction being decoded.
struct Tx {
    xid: u32,
    /// Its commit LSN (pgoutput's `Begin::final_lsn`).
    final_lsn: Lsn,
    commit_time: i64,
    /// The checkpoint covers it: it was applied before.
    skipping: bool,
    /// Data changes seen so far, and how many of them a partial write already applied.
    changes: u64,
    skip_changes: u64,
    /// High watermarks of backfill chunks inside it, handled at its commit.
    highs: Vec<String>,
}

pub(super) struct Stream<'a> {
    pub(super) config: &'a Config,
    redis: redis::aio::MultiplexedConnection,
    owner: Owner,
    pub(super) backfills: Backfills,
    pub(super) relations: RelationCache,
    types: TypeResolver,
    pub(super) batch: Batch,
    /// Taken by the write in flight, given back when it lands.
    visibility: Option<Visibility>,
    health: Arc<Health>,
    in_flight: Option<InFlight>,
    /// Transactions in the write in flight (not yet known visible).
    in_flight_xids: Vec<u32>,
    /// Transactions that end at or below this were applied before (G3).
    pub(super) applied_upto: Option<Lsn>,
    /// A transaction applied in part by an earlier session, to resume after its applied part.
    pub(super) resume_partial: Option<Partial>,
    /// The commit LSN of the open transaction, if part of it was written.
    partial_written: Option<Lsn>,
    /// After Redis lost data: transactions up to here are written as deletes only.
    muted_until: Option<Lsn>,
    /// The shape each table's values are in, as recorded in the checkpoint.
    shapes: HashMap<String, String>,
    /// Tables stopped in this session, with the Lua patterns of the keys readers may not
    /// fill while they are (the checkpoint's `stopped` field).
    stopped: BTreeMap<String, Vec<String>>,
    /// Partitions of cached tables (by relation id), with their root and own names.
    partitions: HashMap<u32, (String, String)>,
    /// Relations seen first in a transaction not yet visible, whose partition check (see
    /// [`Stream::check_partition_of_cached`]) waits for a later transaction's change under
    /// them: by relation id, the relation and the xid of the transaction that announced it.
    unchecked: HashMap<u32, (Relation, u32)>,
    tx: Option<Tx>,
    /// On a Redis Cluster: the slot-by-slot apply (the root checkpoint is `redis`'s).
    cluster: Option<Arc<tokio::sync::Mutex<ClusterApply>>>,
    /// On a Redis Cluster after a restart: the furthest slot checkpoint, until the stream is
    /// past it (see [`Stream::set_cluster`]).
    catch_up: Option<Lsn>,
    /// Where streamed transactions wait for their end (`None`: streaming is off).
    spool: Option<Spool>,
    replaying: Option<Replaying>,
    /// Highest position Postgres may forget, and positions waiting out `confirm_delay`.
    confirmed: Lsn,
    confirm_queue: VecDeque<(Instant, Lsn)>,
    /// Last position sent to Postgres.
    sent: Lsn,
    last_status: Instant,
    /// How often a status update goes out even when nothing moved: often enough for the
    /// server's `wal_sender_timeout` while the stream is not read (a write in flight with
    /// the batch full), see [`status_interval`].
    status_every: Duration,
    last_heartbeat: Instant,
    wal_end: Lsn,
    layout: WalLayout,
}

impl<'a> Stream<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        config: &'a Config,
        redis: redis::aio::MultiplexedConnection,
        owner: Owner,
        backfills: Backfills,
        relations: RelationCache,
        types: TypeResolver,
        batch: Batch,
        visibility: Visibility,
        health: Arc<Health>,
        layout: WalLayout,
    ) -> Stream<'a> {
        let start = owner.position.unwrap_or(Lsn::ZERO);
        Stream {
            config,
            redis,
            owner,
            backfills,
            relations,
            types,
            batch,
            visibility: Some(visibility),
            health,
            in_flight: None,
            in_flight_xids: Vec::new(),
            applied_upto: None,
            resume_partial: None,
            partial_written: None,
            muted_until: None,
            shapes: HashMap::new(),
            stopped: BTreeMap::new(),
            partitions: HashMap::new(),
            unchecked: HashMap::new(),
            tx: None,
            cluster: None,
            catch_up: None,
            spool: None,
            replaying: None,
            confirmed: start,
            confirm_queue: VecDeque::new(),
            sent: start,
            last_status: Instant::now(),
            status_every: STATUS_EVERY,
            last_heartbeat: Instant::now(),
            wal_end: start,
            layout,
        }
    }

    /// Streams large transactions through `spool` (the server was asked to stream them).
    /// Applies on a Redis Cluster through `cluster` (see [`ClusterApply`]).
    ///
    /// Until the stream is past every slot checkpoint, no backfill chunk starts: a chunk
    /// leaves out the keys the stream changes meanwhile, and a slot that skips such a change
    /// (it holds it) would keep the key as it was, in an older shape or absent after a drop.
    pub(super) fn set_cluster(&mut self, cluster: ClusterApply) {
        self.catch_up = cluster
            .ahead()
            .filter(|&ahead| Some(ahead) > self.owner.position);
        self.batch.tag_changes();
        self.cluster = Some(Arc::new(tokio::sync::Mutex::new(cluster)));
    }

    pub(super) fn set_spool(&mut self, spool: Spool) {
        self.spool = Some(spool);
    }

    /// The server's `wal_sender_timeout` (`None`: disabled, or not readable).
    async fn sender_timeout(&self) -> Option<Duration> {
        let row = self
            .types
            .client()
            .query_one("SHOW wal_sender_timeout", &[])
            .await
            .ok()?;
        parse_pg_duration(row.get::<_, &str>(0)).filter(|d| !d.is_zero())
    }

    /// The position Redis acknowledged last.
    pub(super) fn position(&self) -> Option<Lsn> {
        self.owner.position
    }

    /// Marks a table stopped (its changes skipped, its keys dropped) or running again, and
    /// writes the checkpoint's `stopped` field with the next write: the same `EXEC` as the
    /// drop of its keys (a field pushed while a transaction is open goes with its
    /// operations), so no reader fill lands in between and stays, stale, for good.
    pub(super) fn set_stopped(&mut self, table: &str, stopped: bool) {
        let changed = if stopped {
            let Some(rule) = self.config.table_named(table) else {
                return;
            };
            let patterns = rule.fill_patterns(&self.config.redis.key_prefix);
            self.stopped.insert(table.to_string(), patterns).is_none()
        } else {
            self.stopped.remove(table).is_some()
        };
        if changed {
            self.write_stopped();
        }
    }

    /// Writes the checkpoint's `stopped` field as this session knows it (removed when no
    /// table is stopped): at start, it replaces what an earlier session left.
    pub(super) fn write_stopped(&mut self) {
        let patterns: Vec<&str> = self
            .stopped
            .values()
            .flatten()
            .map(String::as_str)
            .collect();
        self.batch
            .push_field(checkpoint::FIELD_STOPPED.to_string(), patterns.join("\n"));
    }

    /// Recovery: transactions up to `horizon` may have been in Redis before it lost them,
    /// and could be older than what readers saw: they are written as deletes only, and no
    /// backfill chunk starts before the stream is past them.
    pub(super) fn mute_until(&mut self, horizon: Lsn) {
        self.muted_until = Some(horizon);
    }

    /// The shape of a table's cached columns in the catalog now (`None`: no such table).
    /// Records the table's OID, so that a rename or a drop and create is noticed.
    pub(super) async fn catalog_shape(
        &mut self,
        rule: &TableRule,
    ) -> Result<Option<String>, RunError> {
        let Some((oid, attributes)) =
            crate::sql::table_columns(self.types.client(), &rule.schema, &rule.name).await?
        else {
            return Ok(None);
        };
        self.relations.know_oid(oid, &rule.qualified_name());
        let sent: Vec<&crate::sql::Attribute> =
            attributes.iter().filter(|a| !a.generated).collect();
        let cached: Option<Vec<&crate::sql::Attribute>> = match &rule.columns {
            Some(columns) => columns
                .iter()
                .map(|c| sent.iter().copied().find(|a| a.name == *c))
                .collect(),
            None => Some(sent),
        };
        Ok(cached.map(|columns| {
            relations::shape(
                columns
                    .iter()
                    .map(|a| (a.name.as_str(), a.type_oid, a.type_modifier)),
            )
        }))
    }

    /// The table's cached columns changed: its values are in the old shape. Mirror tables
    /// are written again (backfill); refresh tables forget their keys (absence is safe).
    pub(super) fn reshape(&mut self, mode: Mode, table: &str) {
        match mode {
            Mode::Mirror => {
                info!(%table, "cached columns changed: backfilling the table in its new shape");
                self.backfills.schedule(table, None);
            }
            Mode::Refresh => {
                info!(%table, "cached columns changed: dropping the table's cached keys");
                if let Some(key_space) = self.key_space(table) {
                    self.batch.drop_key_space(key_space);
                }
            }
            Mode::Invalidate => {}
        }
    }

    pub(super) fn record_shape(&mut self, table: &str, shape: String) {
        if self.shapes.get(table) != Some(&shape) {
            self.batch
                .push_field(format!("{FIELD_SHAPE_PREFIX}{table}"), shape.clone());
            self.shapes.insert(table.to_string(), shape);
        }
    }

    /// Another table has the rule's name now (dropped and created again, or swapped): the
    /// keys of rows that are gone must go, and the rows there are written again (a mirror
    /// table), or its keys are forgotten (refresh, invalidate). A fill that read the old
    /// table must not land after.
    pub(super) fn rewrite_swapped(&mut self, rule: &TableRule) {
        let name = rule.qualified_name();
        match rule.mode {
            Mode::Mirror => {
                self.batch
                    .revoke_leases(rule.lease_patterns(&self.config.redis.key_prefix));
                self.backfills.reconcile(&name, None);
                self.backfills.schedule(&name, None);
            }
            Mode::Refresh | Mode::Invalidate => self
                .batch
                .drop_key_space(rule.key_space(&self.config.redis.key_prefix)),
        }
        self.drop_invalidation_keys(&name);
    }

    /// Records the OID the table's values are written from (see [`FIELD_OID_PREFIX`]).
    pub(super) fn record_oid(&mut self, table: &str, oid: u32) {
        self.batch
            .push_field(format!("{FIELD_OID_PREFIX}{table}"), oid.to_string());
    }

    /// Deletes every key the table's invalidation rules name, and their leases.
    fn drop_invalidation_keys(&mut self, table: &str) {
        let Some(rule) = self.config.table_named(table) else {
            return;
        };
        let patterns = rule.invalidation_patterns(&self.config.redis.key_prefix);
        if !patterns.is_empty() {
            self.batch.revoke_leases(patterns);
        }
    }

    fn key_space(&self, table: &str) -> Option<String> {
        self.config
            .table_named(table)
            .map(|r| r.key_space(&self.config.redis.key_prefix))
    }

    pub(super) async fn pump(
        &mut self,
        stream: &mut ReplicationStream,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), RunError> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.status_every = self
            .sender_timeout()
            .await
            .map_or(STATUS_EVERY, status_interval);
        loop {
            self.take_backfill_fields();
            if self.backfills.reading() {
                // The chunk's read is a task on this thread. A busy stream keeps this loop
                // from ever waiting (its messages are already buffered), so without a yield
                // the read would starve: let it, and its connection, run once per round.
                tokio::task::yield_now().await;
            }
            if self.backfills.can_start()
                && self.tx.is_none()
                && self.muted_until.is_none()
                && self.catch_up.is_none()
            {
                let mut pending = self.batch.xids().to_vec();
                pending.extend_from_slice(&self.in_flight_xids);
                self.backfills.start_next(pending).await?;
            }
            let readable = self.can_read();
            tokio::select! {
                biased;
                _ = stopped(shutdown) => return self.stop(stream).await,
                _ = tick.tick() => {
                    self.health.beat();
                    if !self.unchecked.is_empty() {
                        self.check_deferred_partitions().await?;
                    }
                    if self.last_heartbeat.elapsed() >= HEARTBEAT_EVERY {
                        self.last_heartbeat = Instant::now();
                        self.check_not_a_synchronous_standby().await?;
                        self.batch.push_field(FIELD_HEARTBEAT_MS.to_string(), now_ms().to_string());
                    }
                    self.release_confirmations();
                    if self.muted_until.is_some() {
                        // Ask for a keepalive: an idle stream would not say for half a
                        // wal_sender_timeout that it is past the horizon.
                        self.send_status_with(stream, true).await?;
                    } else if self.last_status.elapsed() >= self.status_every || self.confirm_moved() {
                        self.send_status(stream).await?;
                    }
                }
                read = self.backfills.read_finished() => {
                    self.backfills
                        .on_read(read)
                        ?;
                }
                done = in_flight_done(&mut self.in_flight) => {
                    self.in_flight = None;
                    self.applied(done?);
                    if self.confirm_due() {
                        self.send_status(stream).await?;
                    }
                }
                () = std::future::ready(()), if readable && self.replaying.is_some() => {
                    self.replay_step().await?;
                }
                event = stream.next(), if readable && self.replaying.is_none() => {
                    self.handle(event?, stream).await?;
                    // Natural batching: take whatever else has already arrived, then write.
                    while self.can_take_more() && self.replaying.is_none() {
                        match stream.next_ready()? {
                            Some(event) => self.handle(event, stream).await?,
                            None => break,
                        }
                    }
                }
            }
            self.write_if_ready()?;
        }
    }

    /// Whether the loop may read the stream now: always while no write is in flight (the
    /// next one can start at once), else only while the batch has room.
    fn can_read(&self) -> bool {
        self.in_flight.is_none() || self.can_take_more()
    }

    fn can_take_more(&self) -> bool {
        let apply = &self.config.apply;
        if self.replaying_atomic() {
            // Bounded by apply.max_spool_bytes instead.
            true
        } else if self.tx.is_some() {
            self.batch.open_len() < apply.max_transaction_changes
                && self.batch.open_bytes() < apply.max_transaction_bytes
        } else {
            self.batch.len() < apply.max_batch_changes && self.batch.bytes() < apply.max_batch_bytes
        }
    }

    /// Starts the next write if none is in flight: the committed part of the batch, or,
    /// when the open transaction is too large to hold, a part of it.
    fn write_if_ready(&mut self) -> Result<(), RunError> {
        if self.in_flight.is_some() {
            return Ok(());
        }
        let apply = &self.config.apply;
        let too_large = self.tx.is_some()
            && !self.replaying_atomic()
            && (self.batch.open_len() >= apply.max_transaction_changes
                || self.batch.open_bytes() >= apply.max_transaction_bytes);
        let committed_ops = self.batch.len() > self.batch.open_len();
        if too_large && !committed_ops {
            // Atomicity is capped here (documented). The checkpoint records how much of the
            // transaction is in Redis, so a restart resumes after it instead of replaying
            // its start where readers would see keys go back.
            if let Some(tx) = &self.tx {
                let partial = Partial {
                    commit_lsn: tx.final_lsn,
                    changes: tx.changes,
                };
                self.batch
                    .push_field(FIELD_PARTIAL.to_string(), partial.encode());
                self.partial_written = Some(tx.final_lsn);
            }
            return self.write(true);
        }
        if self.batch.has_committed() {
            return self.write(false);
        }
        Ok(())
    }

    fn replaying_atomic(&self) -> bool {
        self.replaying.as_ref().is_some_and(|r| r.atomic)
    }

    async fn handle(
        &mut self,
        event: ReplicationEvent,
        stream: &mut ReplicationStream,
    ) -> Result<(), RunError> {
        match event {
            ReplicationEvent::XLogData { wal_end, data, .. } => {
                self.wal_end = self.wal_end.max(wal_end);
                if let Some(spool) = self.spool.as_mut().filter(|s| s.in_block()) {
                    // Decoded only to check it and to see the block's end: it is applied
                    // when (and if) its transaction commits.
                    let streamed = pgoutput::decode_streamed(data.clone()).map_err(decode_error)?;
                    return match streamed.message {
                        Message::StreamStop => spool.stop().map_err(spool_error),
                        _ => spool.append(&data).map_err(spool_error),
                    };
                }
                let message = pgoutput::decode(data).map_err(decode_error)?;
                self.on_message(message).await
            }
            ReplicationEvent::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.wal_end = self.wal_end.max(wal_end);
                if self.tx.is_none() {
                    if self.muted_until.is_some_and(|horizon| wal_end > horizon) {
                        self.muted_until = None;
                    }
                    if self.catch_up.is_some_and(|ahead| wal_end > ahead) {
                        self.catch_up = None;
                    }
                    let known = self.owner.position.unwrap_or(Lsn::ZERO);
                    let wal_end = self.layout.past_page_header(wal_end);
                    if self.batch.is_idle() && self.in_flight.is_none() && wal_end > known {
                        // Nothing of ours is pending below wal_end: move the checkpoint (and
                        // with it the slot) there, so traffic on unpublished tables neither
                        // pins WAL nor holds back readers waiting for this position.
                        self.batch.advance(wal_end);
                    }
                }
                metrics::gauge!(m::LAG_BYTES)
                    .set(self.wal_end.0.saturating_sub(self.confirmed.0) as f64);
                if reply_requested {
                    self.release_confirmations();
                    self.send_status(stream).await?;
                }
                Ok(())
            }
        }
    }

    async fn on_message(&mut self, message: Message) -> Result<(), RunError> {
        let before = self.batch.len();
        if let Some(outcome) = self.on_stream_message(&message) {
            return outcome;
        }
        if !self.unchecked.is_empty() {
            if let Message::Insert(Insert { relation_id, .. })
            | Message::Update(Update { relation_id, .. })
            | Message::Delete(Delete { relation_id, .. }) = &message
            {
                self.check_deferred_partition(*relation_id).await?;
            }
        }
        if !self.partitions.is_empty() {
            match &message {
                Message::Insert(Insert { relation_id, .. })
                | Message::Update(Update { relation_id, .. })
                | Message::Delete(Delete { relation_id, .. }) => {
                    self.on_partition_change(*relation_id);
                }
                _ => {}
            }
        }
        match message {
            Message::Begin(begin) => self.on_begin(&begin),
            Message::Commit(commit) => self.on_commit(&commit).await?,
            Message::Relation(relation) => self.on_relation(&relation).await?,
            Message::Insert(insert) => {
                if let Some(control) = self.on_insert(&insert) {
                    self.on_control(control).await?;
                }
            }
            Message::Update(update) => self.on_update(&update),
            Message::Delete(delete) => self.on_delete(&delete),
            Message::Truncate(truncate) => self.on_truncate(&truncate),
            // Messages are not asked for (`messages 'false'`); types come with Relation.
            Message::Type(_) | Message::Origin(_) | Message::Message(_) => {}
            Message::StreamStart(_)
            | Message::StreamStop
            | Message::StreamCommit(_)
            | Message::StreamAbort(_) => {}
        }
        let (keys, dropped) = (
            self.batch.keys_since(before),
            self.batch.dropped_since(before),
        );
        self.backfills.touched(keys, dropped);
        self.take_backfill_fields();
        Ok(())
    }

    /// Moves the backfills' checkpoint fields into the batch, to be written with its ops.
    pub(super) fn take_backfill_fields(&mut self) {
        for (field, value) in self.backfills.take_fields() {
            self.batch.push_field(field, value);
        }
    }

    fn on_begin(&mut self, begin: &Begin) {
        let skipping = self.applied_upto.is_some_and(|done| begin.final_lsn < done);
        if skipping {
            debug!(commit = %begin.final_lsn, "skipping a transaction the checkpoint covers");
        }
        if self
            .muted_until
            .is_some_and(|horizon| begin.final_lsn > horizon)
        {
            self.muted_until = None;
        }
        if self.catch_up.is_some_and(|ahead| begin.final_lsn >= ahead) {
            self.catch_up = None;
        }
        self.batch.set_muted(self.muted_until.is_some());
        let skip_changes = self
            .resume_partial
            .filter(|p| p.commit_lsn == begin.final_lsn)
            .map_or(0, |p| p.changes);
        if skip_changes > 0 {
            info!(commit = %begin.final_lsn, changes = skip_changes, "resuming a large transaction after the part already in Redis");
            self.partial_written = Some(begin.final_lsn);
        }
        self.tx = Some(Tx {
            xid: begin.xid,
            final_lsn: begin.final_lsn,
            commit_time: begin.commit_time,
            skipping,
            changes: 0,
            skip_changes,
            highs: Vec::new(),
        });
        self.batch.set_tag(None);
        self.batch.begin(begin.xid);
    }

    async fn on_commit(&mut self, commit: &Commit) -> Result<(), RunError> {
        let Some(tx) = self.tx.take() else {
            return Ok(());
        };
        if tx.skipping {
            if self.batch.is_idle() && self.in_flight.is_none() {
                self.queue_confirmation(commit.end_lsn);
            }
            self.batch.commit_skipped();
            return Ok(());
        }
        // A chunk's rows are this session's reads: no slot holds them yet.
        self.batch.set_tag(None);
        for id in tx.highs {
            let chunk = self.backfills.on_high(&id).await?;
            if let Some((ops, fields)) = chunk {
                self.batch.push_chunk(ops, fields);
            }
        }
        if self.partial_written == Some(tx.final_lsn) {
            self.batch
                .push_field(FIELD_PARTIAL.to_string(), String::new());
            self.partial_written = None;
            self.resume_partial = None;
        }
        self.batch.commit(commit.end_lsn, tx.commit_time);
        metrics::counter!(m::TRANSACTIONS).increment(1);
        Ok(())
    }

    /// Counts a data change of the open transaction; `false` when it is not to be applied
    /// (the transaction, or this part of it, is in Redis already).
    fn take_change(&mut self) -> bool {
        match &mut self.tx {
            Some(tx) => {
                tx.changes += 1;
                self.batch.set_tag(Some(ChangeTag {
                    commit_lsn: tx.final_lsn,
                    change: tx.changes,
                }));
                !tx.skipping && tx.changes > tx.skip_changes
            }
            None => true,
        }
    }

    /// Applies an insert; a row of the control table is returned, for the caller to act on.
    fn on_insert(&mut self, insert: &Insert) -> Option<Control> {
        if !self.take_change() {
            return None;
        }
        match self.relations.get(insert.relation_id) {
            Some(RelationState::Active(table)) => {
                let table = table.clone();
                let result = self.batch.insert(&table, &insert.new);
                count(&table.counters.insert, result);
            }
            Some(&RelationState::Control { kind_at, arg_at }) => {
                let column = |at: usize| match insert.new.0.get(at) {
                    Some(pgoutput::TupleData::Text(v)) => &v[..],
                    _ => &[],
                };
                match Control::from_row(column(kind_at), column(arg_at)) {
                    Ok(control) => return Some(control),
                    Err(e) => {
                        warn!(error = %e, "control event ignored");
                        metrics::counter!(m::ERRORS, "kind" => "control").increment(1);
                    }
                }
            }
            _ => {}
        }
        None
    }

    async fn on_control(&mut self, control: Control) -> Result<(), RunError> {
        // The read of whatever this event starts must see this transaction: the
        // visibility check covers transactions with operations, so count it as one.
        self.batch.mark_transaction();
        match control {
            Control::High(id) => {
                if let Some(tx) = &mut self.tx {
                    tx.highs.push(id);
                }
            }
            Control::Low(_) => {}
            Control::Resync(table) => {
                // A table's rows came or went wholesale (a partition attached): the keys its
                // invalidation rules name may be stale.
                if let Some(table) = &table {
                    self.drop_invalidation_keys(table);
                }
                // Tables that are not backfilled (refresh, invalidate) forget their keys and
                // leases instead: a cached value, or a cached "no such row", may be wrong
                // now, and a fill that read before this event must not land after it.
                let forget: Vec<String> = self
                    .config
                    .tables
                    .iter()
                    .filter(|r| r.mode != Mode::Mirror)
                    .filter(|r| {
                        table
                            .as_deref()
                            .is_none_or(|t| backfill::qualified(t) == r.qualified_name())
                    })
                    .map(|r| r.key_space(&self.config.redis.key_prefix))
                    .collect();
                for key_space in forget {
                    self.batch.drop_key_space(key_space);
                }
                self.backfills.resync(table.as_deref());
            }
            Control::Reconcile(table) => {
                // Rows went without a change of their own (a partition detached, dropped or
                // truncated): a fill that read one of them before may not land after, so
                // every lease of the table is revoked with this transaction, and the keys
                // its invalidation rules name go (no row is at hand to render them from).
                if let Some(rule) = self.config.table_named(&table) {
                    let patterns = rule.lease_patterns(&self.config.redis.key_prefix);
                    self.batch.revoke_leases(patterns);
                }
                self.drop_invalidation_keys(&table);
                self.backfills.reconcile(&table, None);
            }
            Control::Check(table) => {
                // The catalog as this transaction left it, not as it was before.
                self.wait_own_commit_visible().await?;
                let publication = &self.config.postgres.publication;
                if crate::sql::publication_publishes_all(self.types.client(), publication).await?
                    != Some(true)
                {
                    // Deletes (or updates, inserts, truncates) no longer reach pgcache: no
                    // table's keys can be kept current.
                    let error = format!(
                        "the publication {publication} no longer publishes inserts, updates, \
                         deletes and truncates (or is gone): no table's keys can be kept current, \
                         so they are dropped; ALTER PUBLICATION {publication} SET (publish = \
                         'insert, update, delete, truncate') and restart"
                    );
                    let names: Vec<String> = self
                        .config
                        .tables
                        .iter()
                        .map(TableRule::qualified_name)
                        .collect();
                    for name in names {
                        if self.relations.is_stopped(&name) {
                            continue;
                        }
                        self.stop_configured(&name, &error);
                    }
                    return Ok(());
                }
                let tables: Vec<String> = self
                    .config
                    .tables
                    .iter()
                    .map(TableRule::qualified_name)
                    .filter(|name| table == "*" || backfill::qualified(&table) == *name)
                    .collect();
                for name in tables {
                    self.check_identity(&name).await?;
                }
            }
        }
        Ok(())
    }

    /// Waits until the transaction being read is visible to other sessions, so that a
    /// catalog read it calls for sees what it did: a commit is streamed as soon as its WAL
    /// is flushed, before other sessions see it, and a `DROP TABLE` read as not yet done
    /// would leave the table's keys for good. After a few seconds (a synchronous standby
    /// that does not answer) the session ends with a transient error: the next one reads
    /// the transaction again and waits again, and the stream is not left without status
    /// updates meanwhile.
    async fn wait_own_commit_visible(&self) -> Result<(), RunError> {
        match self.tx.as_ref().map(|tx| tx.xid) {
            Some(xid) => self.wait_visible(xid).await,
            None => Ok(()),
        }
    }

    /// Ends the daemon when `synchronous_standby_names` lists its replication connection
    /// (see [`crate::sql::synchronous_standby_problem`]); read again with every heartbeat,
    /// since a reload can change it, and when a transaction stays invisible.
    async fn check_not_a_synchronous_standby(&self) -> Result<(), RunError> {
        let name = crate::pgconn::PgTarget::parse(self.config.postgres.url.expose())
            .map(|t| t.application_name().to_string())
            .unwrap_or_else(|_| "pgcache".to_string());
        match crate::sql::synchronous_standby_problem(self.types.client(), &name).await? {
            Some(problem) => Err(RunError::fatal("postgres", problem)),
            None => Ok(()),
        }
    }

    /// Whether transaction `xid` is visible to other sessions now.
    async fn visible_now(&self, xid: u32) -> Result<bool, RunError> {
        Ok(Snapshot::current(self.types.client())
            .await?
            .is_some_and(|s| s.shows(xid)))
    }

    /// As [`wait_own_commit_visible`](Self::wait_own_commit_visible), for transaction `xid`.
    async fn wait_visible(&self, xid: u32) -> Result<(), RunError> {
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            if self.visible_now(xid).await? {
                return Ok(());
            }
            if started.elapsed() > VISIBLE_WAIT {
                // The commit may be waiting for pgcache itself as its standby.
                self.check_not_a_synchronous_standby().await?;
                return Err(RunError::transient(
                    "postgres",
                    format!(
                        "transaction {xid} changed a table or the publication but is not yet \
                         visible to other sessions (a synchronous standby that does not \
                         answer?): reading it again once it is"
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// After a rename or a drop somewhere (`sql/events.sql`): is the table of this name still
    /// the one the daemon follows? A table swapped for one outside the publication, or gone,
    /// sends no row change that would say so, and its keys would stay for good.
    async fn check_identity(&mut self, name: &str) -> Result<(), RunError> {
        let Some(rule) = self.config.table_named(name).cloned() else {
            return Ok(());
        };
        if self.relations.is_stopped(name) {
            return Ok(());
        }
        let known = self.relations.oid_of(name);
        let now = crate::sql::table_identity(
            self.types.client(),
            &rule.schema,
            &rule.name,
            &self.config.postgres.publication,
        )
        .await?;
        let publication = &self.config.postgres.publication;
        match now {
            None => {
                let error = format!(
                    "{name} was dropped, renamed or moved to another schema: its keys are \
                     dropped; a table created under the name and published is followed again, \
                     otherwise point the rule at the table's name and restart"
                );
                if let Some(key_space) = self.relations.stop_gone(name, &error) {
                    self.stop_table_now(name, &error, key_space);
                }
            }
            Some(now) if !now.published => {
                let error = if Some(now.oid) == known {
                    format!(
                        "{name} was taken out of the publication {publication}: its changes no \
                         longer reach pgcache, so its keys are dropped; ALTER PUBLICATION \
                         {publication} ADD TABLE {name} and restart"
                    )
                } else {
                    format!(
                        "{name} is now a table outside the publication (swapped by a rename, \
                         or dropped and created again): its changes cannot reach pgcache, so \
                         its keys are dropped; ALTER PUBLICATION {publication} ADD TABLE {name} \
                         and restart"
                    )
                };
                self.stop_configured(name, &error);
            }
            Some(TableIdentity {
                row_filter: Some(filter),
                ..
            }) => {
                let error = format!(
                    "{name} is published with a row filter (WHERE {filter}): changes to rows \
                     outside it never reach pgcache, so its keys are dropped; ALTER PUBLICATION \
                     {publication} SET TABLE ... without the WHERE for {name}, and restart"
                );
                self.stop_configured(name, &error);
            }
            Some(now) if Some(now.oid) == known => {}
            Some(now) => {
                info!(table = %name, "another table now has the name (dropped and created again, or swapped): deleting the keys of rows that are gone, and writing it again");
                self.relations.know_oid(now.oid, name);
                self.record_oid(name, now.oid);
                self.rewrite_swapped(&rule);
            }
        }
        Ok(())
    }

    /// Notes a partition of a cached table. pgoutput announces a partition's relation even
    /// when its changes are published under the root's; a change under the partition's own
    /// relation means `publish_via_partition_root` is off (turned off while the daemon
    /// runs), and [`Stream::on_partition_change`] stops the root.
    async fn check_partition_of_cached(&mut self, relation: &Relation) -> Result<(), RunError> {
        let Some((schema, root)) =
            crate::sql::partition_root(self.types.client(), relation.id).await?
        else {
            return Ok(());
        };
        let name = format!("{schema}.{root}");
        if self
            .config
            .tables
            .iter()
            .any(|r| r.qualified_name() == name)
        {
            let partition = format!("{}.{}", relation.namespace, relation.name);
            self.partitions.insert(relation.id, (name, partition));
        }
        Ok(())
    }

    /// A change under a relation whose partition check was put off (see `unchecked`): in a
    /// later transaction than the one that announced it, the check runs before the change
    /// is handled if that one is visible now. It does not wait for it (a commit held by a
    /// synchronous standby would hold every cached table back): another session can write
    /// to a table an earlier transaction created or attached only once that one has
    /// released its locks, so it normally is; otherwise the tick's check catches up.
    async fn check_deferred_partition(&mut self, relation_id: u32) -> Result<(), RunError> {
        let current = self.tx.as_ref().map(|tx| tx.xid);
        let Some((relation, announced)) = self
            .unchecked
            .get(&relation_id)
            .filter(|(_, xid)| Some(*xid) != current)
            .cloned()
        else {
            return Ok(());
        };
        if !self.visible_now(announced).await? {
            return Ok(());
        }
        self.unchecked.remove(&relation_id);
        self.check_partition_of_cached(&relation).await
    }

    /// The put-off partition checks whose announcing transaction is visible now (at every
    /// tick): a partition of a cached table found so stops the root at once, since the
    /// transaction that announced it changed rows under it that the root's rule did not see,
    /// rather than waiting for another change there that may never come.
    async fn check_deferred_partitions(&mut self) -> Result<(), RunError> {
        let Some(now) = Snapshot::current(self.types.client()).await? else {
            return Ok(());
        };
        let ready: Vec<u32> = self
            .unchecked
            .iter()
            .filter(|(_, (_, xid))| now.shows(*xid))
            .map(|(&id, _)| id)
            .collect();
        for id in ready {
            if let Some((relation, _)) = self.unchecked.remove(&id) {
                self.check_partition_of_cached(&relation).await?;
                self.on_partition_change(id);
            }
        }
        Ok(())
    }

    /// A row change under a partition of a cached table (see
    /// [`Stream::check_partition_of_cached`]): the root's changes no longer reach its rule,
    /// so it stops, as it would at start.
    fn on_partition_change(&mut self, relation_id: u32) {
        let Some((root, partition)) = self.partitions.get(&relation_id).cloned() else {
            return;
        };
        if self.relations.is_stopped(&root) {
            return;
        }
        let error = format!(
            "the partitions of {root} are published under their own names ({partition} among \
             them), so its changes no longer reach its rule and its keys are dropped: \
             ALTER PUBLICATION {} SET (publish_via_partition_root = true) and restart",
            self.config.postgres.publication
        );
        self.stop_configured(&root, &error);
    }

    /// Stops a configured table for the rest of the session (see
    /// [`stop_table_now`](Self::stop_table_now)).
    fn stop_configured(&mut self, table: &str, error: &str) {
        if let Some(key_space) = self.relations.stop_table(table, error) {
            self.stop_table_now(table, error, key_space);
        }
    }

    /// Stops a table for the rest of the session: its keys and invalidation keys dropped,
    /// its backfill record cleared (a later start backfills it from scratch), and readers'
    /// fills of its keys refused, all in the next write.
    fn stop_table_now(&mut self, table: &str, error: &str, key_space: String) {
        error!(%table, %error, "table stopped: its rule no longer fits the table; its keys are dropped so nothing stale is served");
        metrics::counter!(m::ERRORS, "kind" => "rule").increment(1);
        self.batch.drop_key_space(key_space);
        // Its keys are gone: if it fits again only after a restart, that start must
        // backfill it, not find it done.
        self.batch
            .push_field(format!("{FIELD_BACKFILL_PREFIX}{table}"), String::new());
        // Its changes no longer delete its invalidation keys: they go too.
        if let Some(rule) = self.config.table_named(table) {
            self.batch
                .drop_matching(rule.invalidation_patterns(&self.config.redis.key_prefix));
        }
        self.backfills.remove_table(table);
        self.set_stopped(table, true);
    }

    fn on_update(&mut self, update: &Update) {
        if !self.take_change() {
            return;
        }
        if let Some(RelationState::Active(table)) = self.relations.get(update.relation_id) {
            let table = table.clone();
            // Unchanged TOASTed columns would be merged into the cached value, which a
            // backfill under way (after a column change) may not have rewritten yet.
            let stale = update
                .new
                .0
                .iter()
                .any(|c| matches!(c, pgoutput::TupleData::Unchanged))
                && self.backfills.rows_pending(&table.rule.qualified_name());
            self.batch.set_stale_bases(stale);
            let result = self.batch.update(&table, update.old.as_ref(), &update.new);
            self.batch.set_stale_bases(false);
            count(&table.counters.update, result);
        }
    }

    fn on_delete(&mut self, delete: &Delete) {
        if !self.take_change() {
            return;
        }
        if let Some(RelationState::Active(table)) = self.relations.get(delete.relation_id) {
            let table = table.clone();
            let result = self.batch.delete(&table, &delete.old);
            count(&table.counters.delete, result);
        }
    }

    fn on_truncate(&mut self, truncate: &Truncate) {
        if !self.take_change() {
            return;
        }
        for id in &truncate.relation_ids {
            if let Some(RelationState::Active(table)) = self.relations.get(*id) {
                let table = table.clone();
                self.batch.truncate(&table);
                table.counters.truncate.increment(1);
            }
        }
    }

    async fn on_relation(&mut self, relation: &Relation) -> Result<(), RunError> {
        // What a schema change queues (a key drop) comes from no change a slot could have
        // applied already: every slot applies it.
        self.batch.set_tag(None);
        // A column's type created by this very transaction (a domain, an enum) is not in
        // the catalog before the transaction is visible: read too early, its values would
        // be encoded as strings.
        if self.relations.has_rule_for(relation) {
            let oids: Vec<u32> = relation.columns.iter().map(|c| c.type_oid).collect();
            if !self.types.all_known(&oids).await? {
                self.wait_own_commit_visible().await?;
            }
        }
        let recreated = self.relations.recreated(relation);
        let (state, before) = self
            .relations
            .on_relation(relation, &mut self.types)
            .await?;
        let was_broken = matches!(before, Some(RelationState::Broken { .. }));
        match state.clone() {
            RelationState::Broken {
                table,
                error,
                key_space,
            } => {
                if !was_broken {
                    self.stop_table_now(&table, &error, key_space);
                }
            }
            RelationState::Active(table) if recreated && !was_broken => {
                self.on_recreated(&table, relation.id);
            }
            RelationState::Active(table) => self.on_active(&table, was_broken),
            RelationState::Ignored if before.is_none() => {
                // A partition created or attached by this transaction is not one in the
                // catalog until the transaction is visible. Waiting here would hold every
                // cached table back behind a commit that may take long to show (a
                // synchronous standby), for a table no rule names: the check is put off
                // until the transaction is visible (the next tick that sees it, or a change
                // under the relation in a later transaction, whichever comes first).
                match self.tx.as_ref().map(|tx| tx.xid) {
                    Some(xid) if !self.visible_now(xid).await? => {
                        self.unchecked.insert(relation.id, (relation.clone(), xid));
                    }
                    _ => self.check_partition_of_cached(relation).await?,
                }
            }
            RelationState::Ignored | RelationState::Control { .. } => {}
        }
        Ok(())
    }

    /// The table was dropped and created again (a reload, a swap): the keys of rows that
    /// are gone must go, and the rows there are written again.
    fn on_recreated(&mut self, table: &TableState, oid: u32) {
        let name = table.rule.qualified_name();
        info!(table = %name, "the table was dropped and created again: deleting the keys of rows that are gone, and writing it again");
        // Stopped when it was found gone: it runs again.
        self.set_stopped(&name, false);
        self.backfills.restore_table(table.rule.clone());
        self.rewrite_swapped(&table.rule);
        self.record_shape(&name, table.shape.clone());
        self.record_oid(&name, oid);
    }

    fn on_active(&mut self, table: &TableState, was_broken: bool) {
        let name = table.rule.qualified_name();
        if was_broken {
            info!(table = %name, "the table fits its rule again: backfilling it");
            self.set_stopped(&name, false);
            // Stopping it took it out of the backfills: without its rule back, the schedule
            // would find no mirror table and do nothing.
            self.backfills.restore_table(table.rule.clone());
            self.backfills.schedule(&name, None);
        } else if self
            .shapes
            .get(&name)
            .is_some_and(|shape| *shape != table.shape)
        {
            // A column added, dropped, renamed or retyped leaves untouched rows in the old
            // shape.
            self.reshape(table.rule.mode, &name);
        }
        self.record_shape(&name, table.shape.clone());
    }

    /// Starts writing the committed part of the batch (all of it with `include_open`).
    /// The task waits until Postgres readers can see the batch's transactions, then runs
    /// the apply script.
    #[tracing::instrument(name = "batch", level = "debug", skip_all, fields(ops = self.batch.len()))]
    fn write(&mut self, include_open: bool) -> Result<(), RunError> {
        let Some(prepared) = self.batch.prepare(include_open) else {
            return Ok(());
        };
        let Some(mut visibility) = self.visibility.take() else {
            return Err(RunError::transient(
                "internal",
                "the visibility check is busy",
            ));
        };
        debug!(
            ops = prepared.ops.len(),
            transactions = prepared.transactions,
            "batch sent"
        );
        self.in_flight_xids.clone_from(&prepared.xids);
        let mut conn = self.redis.clone();
        if let Some(cluster) = self.cluster.clone() {
            self.write_cluster(cluster, conn, prepared, visibility);
            return Ok(());
        }
        let write = script::Write::new(&self.owner, &prepared, now_ms());
        let Prepared {
            ops,
            position,
            transactions,
            commit_times,
            xids,
            ..
        } = prepared;
        let ops = ops.len();
        let wait_replicas = self.config.redis.wait_replicas;
        self.in_flight = Some(tokio::spawn(async move {
            let started = Instant::now();
            visibility.wait(&xids).await?;
            let applied = write.send(&mut conn).await?;
            if let Some(replicas) = wait_replicas {
                wait_for_replicas(&mut conn, replicas).await?;
            }
            Ok(Done {
                visibility,
                position,
                transactions,
                commit_times,
                ops,
                started,
                repairs: applied.repairs,
            })
        }));
        Ok(())
    }

    /// The write of a batch on a Redis Cluster: slot by slot, then (with
    /// `wait_replicas`, once the masters' replicas hold it) the root checkpoint with the
    /// batch's position, the frontier confirmed to Postgres, and the position each slot
    /// checkpoint moved to.
    fn write_cluster(
        &mut self,
        cluster: Arc<tokio::sync::Mutex<ClusterApply>>,
        mut conn: redis::aio::MultiplexedConnection,
        prepared: Prepared,
        mut visibility: Visibility,
    ) {
        let owner = self.owner.clone();
        let wait_replicas = self.config.redis.wait_replicas;
        let Prepared {
            ops,
            position,
            fields,
            transactions,
            commit_times,
            xids,
            tags,
        } = prepared;
        let heartbeat = fields.iter().any(|(f, _)| f == FIELD_HEARTBEAT_MS);
        self.in_flight = Some(tokio::spawn(async move {
            let started = Instant::now();
            visibility.wait(&xids).await?;
            let count = ops.len();
            let mut apply = cluster.lock().await;
            if heartbeat {
                apply.check_slots().await?;
            }
            let applied = apply.write(ops, tags, position, &fields, now_ms()).await?;
            if let Some(replicas) = wait_replicas {
                apply.wait_replicas(replicas).await?;
            }
            drop(apply);
            let mut root_fields = fields;
            root_fields.extend(applied.moved.iter().map(|(slot, lsn)| {
                (
                    format!("{}{slot}", checkpoint::FIELD_HASH_SLOT_PREFIX),
                    lsn.to_string(),
                )
            }));
            let root = Prepared {
                position,
                fields: root_fields,
                ..Prepared::default()
            };
            script::Write::new(&owner, &root, now_ms())
                .send(&mut conn)
                .await?;
            if let Some(replicas) = wait_replicas {
                wait_for_replicas(&mut conn, replicas).await?;
            }
            Ok(Done {
                visibility,
                position,
                transactions,
                commit_times,
                ops: count,
                started,
                repairs: applied.repairs,
            })
        }));
    }

    /// A write Redis acknowledged: its position may now be confirmed to Postgres.
    fn applied(&mut self, done: Done) {
        self.visibility = Some(done.visibility);
        self.in_flight_xids.clear();
        metrics::counter!(m::BATCHES).increment(1);
        metrics::histogram!(m::BATCH_OPS).record(done.ops as f64);
        metrics::histogram!(m::EXEC_SECONDS).record(done.started.elapsed().as_secs_f64());
        let now = pg_now_micros();
        for commit_time in &done.commit_times {
            metrics::histogram!(m::APPLY_LATENCY).record((now - commit_time).max(0) as f64 / 1e6);
        }
        for repair in done.repairs {
            warn!(table = %repair.table, key = %repair.key, "an update's unchanged TOASTed columns had no cached value to merge into: the key was deleted and its row is read again");
            self.backfills.repair(repair);
        }
        if let Some(lsn) = done.position {
            self.owner.position = Some(lsn);
            self.applied_upto = Some(lsn);
            self.queue_confirmation(lsn);
            debug!(ops = done.ops, transactions = done.transactions, checkpoint = %lsn, "applied");
        }
    }

    /// Writes what is committed, waits for it, and confirms what `confirm_delay` allows.
    /// Waits for the write in flight, if any, at shutdown. `false` when it still waits for
    /// `redis.wait_replicas` replicas after a few seconds: it is given up, unconfirmed (the
    /// next start applies it again), so that a missing replica cannot block a stop.
    async fn finish_in_flight(&mut self) -> Result<bool, RunError> {
        const PATIENCE: Duration = Duration::from_secs(5);
        let Some(mut done) = self.in_flight.take() else {
            return Ok(true);
        };
        let joined = if self.config.redis.wait_replicas.is_some() {
            match tokio::time::timeout(PATIENCE, &mut done).await {
                Ok(joined) => joined,
                Err(_) => {
                    done.abort();
                    warn!(
                        "stopping with a write that redis.wait_replicas replicas do not hold \
                         yet: it is not confirmed to Postgres, and the next start applies it \
                         again"
                    );
                    return Ok(false);
                }
            }
        } else {
            done.await
        };
        let done = joined
            .map_err(|e| RunError::transient("internal", format!("redis write task: {e}")))??;
        self.applied(done);
        Ok(true)
    }

    async fn stop(&mut self, stream: &mut ReplicationStream) -> Result<(), RunError> {
        if self.finish_in_flight().await? {
            self.write(false)?;
            self.finish_in_flight().await?;
        }
        // Only what has waited out confirm_delay: the rest stays in the slot, so a Redis
        // that loses its last second at the next crash can be refilled from it.
        self.release_confirmations();
        self.send_status(stream).await?;
        info!(confirmed = %self.confirmed, "stopped");
        Ok(())
    }

    fn queue_confirmation(&mut self, lsn: Lsn) {
        if self.config.apply.confirm_delay.is_zero() {
            self.confirmed = self.confirmed.max(lsn);
        } else {
            self.confirm_queue.push_back((Instant::now(), lsn));
        }
    }

    /// Moves `confirmed` past positions whose delay has passed.
    fn release_confirmations(&mut self) {
        let delay = self.config.apply.confirm_delay;
        while let Some(&(at, lsn)) = self.confirm_queue.front() {
            if at.elapsed() < delay {
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

    async fn send_status(&mut self, stream: &mut ReplicationStream) -> Result<(), RunError> {
        self.send_status_with(stream, false).await
    }

    async fn send_status_with(
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

pub(super) fn decode_error(e: pgoutput::DecodeError) -> RunError {
    RunError::fatal(
        "postgres",
        format!("pgoutput: cannot decode a message: {e}"),
    )
}

/// Resolves with the write in flight's result; never, when none is in flight.
async fn in_flight_done(in_flight: &mut Option<InFlight>) -> Result<Done, RunError> {
    match in_flight {
        Some(handle) => handle
            .await
            .map_err(|e| RunError::transient("internal", format!("redis write task: {e}")))?,
        None => std::future::pending().await,
    }
}

/// Counts a change for its table, and logs and counts a change that could not be cached
/// as a value (its key was deleted instead where one could be computed: absence is safe).
fn count(counter: &metrics::Counter, result: Result<(), ChangeError>) {
    counter.increment(1);
    if let Err(e) = result {
        warn!(error = %e, "change could not be cached as a value");
        metrics::counter!(m::ERRORS, "kind" => e.kind()).increment(1);
    }
}

impl std::fmt::Debug for Stream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("position", &checkpoint::position_text(self.owner.position))
            .field("confirmed", &self.confirmed)
            .finish_non_exhaustive()
    }
}

/// `WAIT replicas`: returns once that many replicas hold this connection's writes, so that
/// what is confirmed to Postgres survives a failover to one of them. Waits as long as it
/// takes, saying so every few seconds: confirming earlier could lose the write for good.
pub(super) async fn wait_for_replicas(
    conn: &mut redis::aio::MultiplexedConnection,
    replicas: usize,
) -> Result<(), RunError> {
    const STEP_MS: u64 = 1_000;
    let started = Instant::now();
    let mut warned = Instant::now();
    loop {
        let acked: usize = redis::cmd("WAIT")
            .arg(replicas)
            .arg(STEP_MS)
            .query_async(conn)
            .await?;
        if acked >= replicas {
            metrics::histogram!(m::REPLICA_WAIT_SECONDS).record(started.elapsed().as_secs_f64());
            return Ok(());
        }
        if warned.elapsed() >= Duration::from_secs(5) {
            warned = Instant::now();
            warn!(
                acked,
                wanted = replicas,
                waited_s = started.elapsed().as_secs(),
                "redis.wait_replicas: fewer replicas than configured hold the last write; \
                 nothing is confirmed to Postgres until they do"
            );
        }
    }
}

/// The longest gap between two status updates, when nothing moved.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// The status interval for a server whose `wal_sender_timeout` is `timeout`: a third of it,
/// no longer than [`STATUS_EVERY`], no shorter than the loop's tick (250 ms). The loop
/// checks it on that tick, so an update goes out up to a tick later (with a 2 s timeout,
/// every 750 ms). The server drops a receiver
/// it has not heard from for that long; while a write is in flight with the batch full the
/// stream is not read, so its keepalive requests go unanswered, and only these updates
/// keep the connection (a slow Redis write, an outage).
fn status_interval(timeout: Duration) -> Duration {
    (timeout / 3).clamp(Duration::from_millis(250), STATUS_EVERY)
}

/// A Postgres time setting as `SHOW` prints it: `0` or a bare number (milliseconds), or a
/// number with a unit (`500ms`, `2s`, `1min`, `1h`, `1d`), which `humantime` reads.
fn parse_pg_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    match text.parse::<u64>() {
        Ok(ms) => Some(Duration::from_millis(ms)),
        Err(_) => humantime::parse_duration(text).ok(),
    }
}

#[cfg(test)]
mod status_tests {
    use super::*;

    #[test]
    fn postgres_durations_are_read_as_show_prints_them() {
        assert_eq!(parse_pg_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_pg_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_pg_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_pg_duration("1min"), Some(Duration::from_secs(60)));
        assert_eq!(parse_pg_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_pg_duration("1d"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_pg_duration("250"), Some(Duration::from_millis(250)));
        assert_eq!(parse_pg_duration("soon"), None);
        assert_eq!(parse_pg_duration("5 fortnights"), None);
    }

    #[test]
    fn status_goes_out_three_times_a_timeout_within_bounds() {
        assert_eq!(status_interval(Duration::from_secs(60)), STATUS_EVERY);
        assert_eq!(
            status_interval(Duration::from_secs(3)),
            Duration::from_secs(1)
        );
        assert_eq!(
            status_interval(Duration::from_millis(300)),
            Duration::from_millis(250)
        );
    }
}
