//! The relation cache: what the stream's relation ids mean under our table rules.
//!
//! pgoutput sends a Relation message before the first change to a table in each session and
//! again after its schema changes; every change names only the relation id. This module turns
//! those messages into a [`TableState`]: which rule applies, where the key columns and the
//! cached columns sit in the tuple, and how each column is encoded.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::config::{Config, TableRule};
use crate::daemon::pgoutput::Relation;
use crate::encoder::PgType;

/// A published table that one of our rules covers, resolved against its current schema.
#[derive(Debug, Clone)]
pub struct TableState {
    pub rule: Arc<TableRule>,
    /// Cached columns in output order: name and type, for the encoder.
    pub columns: Vec<(String, PgType)>,
    /// Tuple position of each cached column (same order as `columns`).
    pub positions: Vec<usize>,
    /// Tuple position of each key template column, in template order.
    pub key_positions: Vec<usize>,
    /// `<key_prefix><literal prefix of the template>`: every key of this table starts so.
    pub key_space: String,
    /// For each of the rule's invalidation templates, the tuple position of each of its
    /// columns, in template order.
    pub invalidate_positions: Vec<Vec<usize>>,
    /// The Redis key prefix (`redis.key_prefix`), which invalidation keys start with.
    pub key_prefix: String,
    /// `pgcache_changes_total` for this table, by operation, registered once (a labelled
    /// lookup per change would cost more than the change).
    pub counters: OpCounters,
    /// The cached columns as `name:type oid:type modifier`, comma separated: the shape the
    /// table's values are in (see [`shape`]).
    pub shape: String,
}

/// The shape of a table's cached values: each cached column as `name:type oid:modifier`, in
/// output order. The daemon records it in the checkpoint and compares it with the table's
/// at every start and every Relation message, so a column added, dropped, renamed or
/// retyped (also while the daemon was stopped) is noticed.
pub fn shape<'a>(columns: impl IntoIterator<Item = (&'a str, u32, i32)>) -> String {
    let mut out = String::new();
    for (i, (name, oid, modifier)) in columns.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!("{name}:{oid}:{modifier}"));
    }
    out
}

/// Per-table change counters.
#[derive(Clone)]
pub struct OpCounters {
    pub insert: metrics::Counter,
    pub update: metrics::Counter,
    pub delete: metrics::Counter,
    pub truncate: metrics::Counter,
}

impl OpCounters {
    fn new(table: &str) -> OpCounters {
        let counter = |op: &'static str| metrics::counter!(crate::metrics::CHANGES, "table" => table.to_string(), "op" => op);
        OpCounters {
            insert: counter("insert"),
            update: counter("update"),
            delete: counter("delete"),
            truncate: counter("truncate"),
        }
    }
}

impl std::fmt::Debug for OpCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpCounters")
    }
}

/// What a relation id stands for.
#[derive(Debug, Clone)]
pub enum RelationState {
    /// Published but not configured: its changes are skipped.
    Ignored,
    Active(Arc<TableState>),
    /// The control table (`pgcache.events`): where its `kind` and `arg` columns are.
    Control {
        kind_at: usize,
        arg_at: usize,
    },
    /// Configured, but the rule no longer fits the table (a column it names is gone). The
    /// table is stopped with this error; other tables go on.
    Broken {
        table: String,
        error: String,
        /// Where the table's keys live, so the daemon can drop them (absence is safe;
        /// stale values are not).
        key_space: String,
    },
}

/// Looks up types the encoder does not know by OID (enums, domains, citext, their arrays),
/// once per OID.
pub struct TypeResolver {
    client: tokio_postgres::Client,
    known: HashMap<u32, PgType>,
}

impl TypeResolver {
    pub fn new(client: tokio_postgres::Client) -> Self {
        TypeResolver {
            client,
            known: HashMap::new(),
        }
    }

    /// The catalog connection it asks.
    pub fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }

    /// The type of `oid`; [`PgType::Other`] when the catalog has none (not remembered, so
    /// a later call asks again).
    pub async fn resolve(&mut self, oid: u32) -> Result<PgType, tokio_postgres::Error> {
        Ok(self.lookup(oid).await?.unwrap_or(PgType::Other))
    }

    /// Whether the catalog, as this session sees it now, has every one of these types. A
    /// type created by the transaction being read (a domain, an enum for a new column) is
    /// not there until that transaction is visible, and read then it would be taken for an
    /// unknown type and its values encoded as strings.
    pub async fn all_known(&mut self, oids: &[u32]) -> Result<bool, tokio_postgres::Error> {
        for &oid in oids {
            if self.lookup(oid).await?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn lookup(&mut self, oid: u32) -> Result<Option<PgType>, tokio_postgres::Error> {
        if let Some(ty) = PgType::from_oid(oid) {
            return Ok(Some(ty));
        }
        if let Some(ty) = self.known.get(&oid) {
            return Ok(Some(ty.clone()));
        }
        let ty = PgType::lookup(&self.client, oid).await?;
        if let Some(ty) = &ty {
            self.known.insert(oid, ty.clone());
        }
        Ok(ty)
    }
}

pub struct RelationCache {
    rules: HashMap<(String, String), Arc<TableRule>>,
    /// Tables stopped before streaming (not set up right), with the problem.
    stopped: HashMap<String, String>,
    key_prefix: String,
    relations: HashMap<u32, RelationState>,
    /// The OID of each configured table as the catalog showed it at the session's start (or
    /// as its Relation message since): a Relation message under another name for one of
    /// these is a rename, and one under the table's name with another OID is the table
    /// dropped and created again.
    oids: HashMap<u32, Arc<TableRule>>,
    /// Stopped tables whose name no table had when the daemon checked (dropped, renamed
    /// away): one created under the name and published is followed again, from scratch.
    gone: HashSet<String>,
}

impl RelationCache {
    pub fn new(config: &Config) -> Self {
        let rules = config
            .tables
            .iter()
            .map(|rule| {
                (
                    (rule.schema.clone(), rule.name.clone()),
                    Arc::new(rule.clone()),
                )
            })
            .collect();
        RelationCache {
            rules,
            stopped: HashMap::new(),
            key_prefix: config.redis.key_prefix.clone(),
            relations: HashMap::new(),
            oids: HashMap::new(),
            gone: HashSet::new(),
        }
    }

    /// The OID this session follows the table by, if it knows one.
    pub fn oid_of(&self, table: &str) -> Option<u32> {
        self.oids
            .iter()
            .find(|(_, rule)| rule.qualified_name() == table)
            .map(|(&oid, _)| oid)
    }

    pub fn is_stopped(&self, table: &str) -> bool {
        self.stopped.contains_key(table)
    }

    /// Stops a table no table has the name of now; a Relation message for one created under
    /// the name later counts as [`recreated`](Self::recreated). Returns its key space.
    pub fn stop_gone(&mut self, table: &str, problem: &str) -> Option<String> {
        let key_space = self.stop_table(table, problem)?;
        self.oids.retain(|_, rule| rule.qualified_name() != table);
        self.gone.insert(table.to_string());
        Some(key_space)
    }

    /// Records the OID the catalog gives a configured table.
    pub fn know_oid(&mut self, oid: u32, table: &str) {
        if let Some(rule) = self.rules.values().find(|r| r.qualified_name() == table) {
            let rule = rule.clone();
            self.oids.retain(|_, r| r.qualified_name() != table);
            self.oids.insert(oid, rule);
        }
    }

    /// Whether this Relation message names a configured table that was known under another
    /// OID: it was dropped and created again (or swapped for another table). Records the
    /// new OID.
    pub fn recreated(&mut self, relation: &Relation) -> bool {
        let name = format!("{}.{}", relation.namespace, relation.name);
        if self.gone.remove(&name) {
            self.stopped.remove(&name);
            if let Some(rule) = self
                .rules
                .get(&(relation.namespace.clone(), relation.name.clone()))
            {
                self.oids.insert(relation.id, rule.clone());
            }
            return true;
        }
        let known = self
            .oids
            .iter()
            .find(|(_, r)| r.schema == relation.namespace && r.name == relation.name)
            .map(|(&oid, _)| oid);
        match known {
            Some(oid) if oid != relation.id => {
                if let Some(rule) = self.oids.remove(&oid) {
                    self.oids.insert(relation.id, rule);
                }
                true
            }
            Some(_) => false,
            None => {
                let configured = self
                    .rules
                    .get(&(relation.namespace.clone(), relation.name.clone()))
                    .cloned();
                if let Some(rule) = configured {
                    self.oids.insert(relation.id, rule);
                }
                false
            }
        }
    }

    /// Stops a table for this session: its changes are skipped. Returns its key space, so
    /// the caller can drop its keys.
    pub fn stop_table(&mut self, table: &str, problem: &str) -> Option<String> {
        let rule = self.rules.values().find(|r| r.qualified_name() == table)?;
        let key_space = rule.key_space(&self.key_prefix);
        self.stopped.insert(table.to_string(), problem.to_string());
        Some(key_space)
    }

    pub fn get(&self, relation_id: u32) -> Option<&RelationState> {
        self.relations.get(&relation_id)
    }

    /// Whether a rule names this relation's table (its column types are then resolved).
    pub fn has_rule_for(&self, relation: &Relation) -> bool {
        self.rules
            .contains_key(&(relation.namespace.clone(), relation.name.clone()))
    }

    /// Records a Relation message and returns the state it gives the table, and the state
    /// it had before (if the relation was seen before in this session).
    ///
    /// A relation id that stood for a configured table and now comes with another name was
    /// renamed (`ALTER TABLE ... RENAME`): the table stops, and its keys are to be dropped,
    /// because its changes no longer reach the rule.
    pub async fn on_relation(
        &mut self,
        relation: &Relation,
        types: &mut TypeResolver,
    ) -> Result<(&RelationState, Option<RelationState>), tokio_postgres::Error> {
        let renamed_from = match self.relations.get(&relation.id) {
            Some(RelationState::Active(table)) => Some(table.rule.clone()),
            Some(RelationState::Broken { table, .. }) => self
                .rules
                .values()
                .find(|r| r.qualified_name() == *table)
                .cloned(),
            _ => self.oids.get(&relation.id).cloned(),
        }
        .filter(|rule| rule.schema != relation.namespace || rule.name != relation.name);
        let control = relation.namespace == crate::daemon::backfill::control::SCHEMA
            && relation.name == crate::daemon::backfill::control::TABLE;
        let state = if let Some(rule) = renamed_from {
            let table = rule.qualified_name();
            let error = format!(
                "{table} was renamed to {}.{}: its changes no longer match the rule, so its \
                 keys are dropped; point the rule at the new name (or rename it back) and \
                 restart",
                relation.namespace, relation.name
            );
            self.stopped.insert(table.clone(), error.clone());
            RelationState::Broken {
                key_space: rule.key_space(&self.key_prefix),
                table,
                error,
            }
        } else {
            self.configured_state(relation, control, types).await?
        };
        let before = self.relations.insert(relation.id, state);
        Ok((&self.relations[&relation.id], before))
    }

    async fn configured_state(
        &self,
        relation: &Relation,
        control: bool,
        types: &mut TypeResolver,
    ) -> Result<RelationState, tokio_postgres::Error> {
        Ok(
            match self
                .rules
                .get(&(relation.namespace.clone(), relation.name.clone()))
            {
                None if control => {
                    let at = |name: &str| relation.columns.iter().position(|c| c.name == name);
                    match (at("kind"), at("arg")) {
                        (Some(kind_at), Some(arg_at)) => RelationState::Control { kind_at, arg_at },
                        _ => RelationState::Ignored,
                    }
                }
                None => RelationState::Ignored,
                Some(rule) if self.stopped.contains_key(&rule.qualified_name()) => {
                    RelationState::Broken {
                        table: rule.qualified_name(),
                        error: self.stopped[&rule.qualified_name()].clone(),
                        key_space: rule.key_space(&self.key_prefix),
                    }
                }
                Some(rule) => {
                    let mut column_types = Vec::with_capacity(relation.columns.len());
                    for column in &relation.columns {
                        column_types.push(types.resolve(column.type_oid).await?);
                    }
                    match table_state(rule, relation, &column_types, &self.key_prefix) {
                        Ok(state) => RelationState::Active(Arc::new(state)),
                        Err(error) => RelationState::Broken {
                            table: rule.qualified_name(),
                            error,
                            key_space: rule.key_space(&self.key_prefix),
                        },
                    }
                }
            },
        )
    }
}

/// Matches a rule to the columns the stream announced.
pub(crate) fn table_state(
    rule: &Arc<TableRule>,
    relation: &Relation,
    types: &[PgType],
    key_prefix: &str,
) -> Result<TableState, String> {
    let position = |name: &str| relation.columns.iter().position(|c| c.name == name);
    let names: Vec<String> = match &rule.columns {
        Some(columns) => columns.clone(),
        None => relation.columns.iter().map(|c| c.name.clone()).collect(),
    };
    let mut columns = Vec::with_capacity(names.len());
    let mut positions = Vec::with_capacity(names.len());
    for name in names {
        let Some(at) = position(&name) else {
            return Err(format!(
                "column {name:?} named in the rule for {} is not in the table any more \
                 (it has {}); fix the rule's columns and restart",
                rule.qualified_name(),
                column_list(relation)
            ));
        };
        positions.push(at);
        columns.push((name, types[at].clone()));
    }
    let mut key_positions = Vec::new();
    for name in rule.key.columns() {
        let Some(at) = position(name) else {
            return Err(format!(
                "key template {:?} names column {name:?}, which {} no longer has (it has {})",
                rule.key.as_str(),
                rule.qualified_name(),
                column_list(relation)
            ));
        };
        if relation.replica_identity != b'f' && !relation.columns[at].is_key() {
            // Deletes and key changes would come without this column: the old row's key
            // could not be named, and would stay stale (`ALTER TABLE ... REPLICA IDENTITY`
            // made while running).
            return Err(format!(
                "key template {:?} of {} names column {name:?}, which is not in the replica \
                 identity, so deletes and key changes could not name the old row's key: run \
                 ALTER TABLE {} REPLICA IDENTITY FULL (or key the rule by the primary key)",
                rule.key.as_str(),
                rule.qualified_name(),
                rule.qualified_name()
            ));
        }
        key_positions.push(at);
    }
    let mut invalidate_positions = Vec::with_capacity(rule.invalidate.len());
    for inv in &rule.invalidate {
        let mut positions = Vec::with_capacity(inv.key.columns().len());
        for name in inv.key.columns() {
            let Some(at) = position(name) else {
                return Err(format!(
                    "invalidation key {:?} names column {name:?}, which {} does not have \
                     (it has {})",
                    inv.key.as_str(),
                    rule.qualified_name(),
                    column_list(relation)
                ));
            };
            // The old row of an update or delete carries only the replica identity: a
            // column outside it could not name the old row's key, which would stay stale.
            if relation.replica_identity != b'f' && !relation.columns[at].is_key() {
                return Err(format!(
                    "invalidation key {:?} of {} names column {name:?}, which is not in the \
                     replica identity, so deletes and updates could not name the old row's \
                     key: run ALTER TABLE {} REPLICA IDENTITY FULL",
                    inv.key.as_str(),
                    rule.qualified_name(),
                    rule.qualified_name()
                ));
            }
            positions.push(at);
        }
        invalidate_positions.push(positions);
    }
    let shape = shape(positions.iter().map(|&at| {
        let column = &relation.columns[at];
        (column.name.as_str(), column.type_oid, column.type_modifier)
    }));
    Ok(TableState {
        rule: rule.clone(),
        columns,
        positions,
        key_positions,
        key_space: rule.key_space(key_prefix),
        invalidate_positions,
        key_prefix: key_prefix.to_string(),
        counters: OpCounters::new(&rule.qualified_name()),
        shape,
    })
}

fn column_list(relation: &Relation) -> String {
    relation
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
