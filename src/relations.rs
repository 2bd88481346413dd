//! The relation cache: what the stream's relation ids mean under our table rules.
//!
//! pgoutput sends a Relation message before the first change to a table in each session and
//! again after its schema changes; every change names only the relation id. This module turns
//! those messages into a [`TableState`]: which rule applies, where the key columns and the
//! cached columns sit in the tuple, and how each column is encoded.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Config, TableRule};
use crate::encoder::PgType;
use crate::pgoutput::Relation;

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
    /// `pgcache_changes_total` for this table, by operation, registered once (a labelled
    /// lookup per change would cost more than the change).
    pub counters: OpCounters,
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

    pub async fn resolve(&mut self, oid: u32) -> Result<PgType, tokio_postgres::Error> {
        if let Some(ty) = PgType::from_oid(oid) {
            return Ok(ty);
        }
        if let Some(ty) = self.known.get(&oid) {
            return Ok(ty.clone());
        }
        let ty = PgType::resolve(&self.client, oid).await?;
        self.known.insert(oid, ty.clone());
        Ok(ty)
    }
}

pub struct RelationCache {
    rules: HashMap<(String, String), Arc<TableRule>>,
    /// Tables stopped before streaming (not set up right), with the problem.
    stopped: HashMap<String, String>,
    key_prefix: String,
    relations: HashMap<u32, RelationState>,
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
        }
    }

    /// Stops a table for this session: its changes are skipped. Returns its key space, so
    /// the caller can drop its keys.
    pub fn stop_table(&mut self, table: &str, problem: &str) -> Option<String> {
        let rule = self.rules.values().find(|r| r.qualified_name() == table)?;
        let key_space = format!("{}{}", self.key_prefix, rule.key.literal_prefix());
        self.stopped.insert(table.to_string(), problem.to_string());
        Some(key_space)
    }

    pub fn get(&self, relation_id: u32) -> Option<&RelationState> {
        self.relations.get(&relation_id)
    }

    /// Records a Relation message and returns the state it gives the table, and the state
    /// it had before (if the relation was seen before in this session).
    pub async fn on_relation(
        &mut self,
        relation: &Relation,
        types: &mut TypeResolver,
    ) -> Result<(&RelationState, Option<RelationState>), tokio_postgres::Error> {
        let state = match self
            .rules
            .get(&(relation.namespace.clone(), relation.name.clone()))
        {
            None => RelationState::Ignored,
            Some(rule) if self.stopped.contains_key(&rule.qualified_name()) => {
                RelationState::Broken {
                    table: rule.qualified_name(),
                    error: self.stopped[&rule.qualified_name()].clone(),
                    key_space: format!("{}{}", self.key_prefix, rule.key.literal_prefix()),
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
                        key_space: format!("{}{}", self.key_prefix, rule.key.literal_prefix()),
                    },
                }
            }
        };
        let before = self.relations.insert(relation.id, state);
        Ok((&self.relations[&relation.id], before))
    }
}

/// Matches a rule to the columns the stream announced.
fn table_state(
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
        key_positions.push(at);
    }
    Ok(TableState {
        rule: rule.clone(),
        columns,
        positions,
        key_positions,
        key_space: format!("{key_prefix}{}", rule.key.literal_prefix()),
        counters: OpCounters::new(&rule.qualified_name()),
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
