//! Table rules changed while the daemon was stopped.
//!
//! A value's key and bytes come from the table's rule as much as from its row: the key
//! template, the mode, the format, the numeric encoding, the TTL. The checkpoint records each
//! table's rule (`rule:<table>`) next to the shape of its columns; at start the daemon
//! compares the rules in the config with the recorded ones. Where they differ, the keys the
//! old rule wrote would otherwise stay for good (nothing renders them any more), so they are
//! dropped and the table is written again in its new form (mirror) or left to fill (refresh).
//! A table taken out of the config has its keys dropped the same way.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::checkpoint::{
    CheckpointState, FIELD_BACKFILL_PREFIX, FIELD_OID_PREFIX, FIELD_REPAIR_PREFIX,
    FIELD_RULE_PREFIX, FIELD_SHAPE_PREFIX,
};
use crate::config::TableRule;
use crate::daemon::apply::{Op, Repair};
use crate::daemon::stream::Stream;

/// What a table's rule made of its keys, as recorded in the checkpoint (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRecord {
    /// Everything besides the columns that decides a value's key and bytes. Any change
    /// leaves every value in the old form.
    pub values: String,
    /// `SCAN MATCH` patterns of the table's keys and their leases.
    pub keys: Vec<String>,
    /// `SCAN MATCH` patterns of its `[[tables.invalidate]]` keys and their leases.
    pub invalidates: Vec<String>,
    /// The `[[tables.invalidate]]` templates as written: a column changed under the same
    /// pattern (`user-orders:{user_id}` to `user-orders:{buyer_id}`) is a change too.
    #[serde(default)]
    pub invalidate_templates: Vec<String>,
}

impl RuleRecord {
    pub fn of(rule: &TableRule, key_prefix: &str) -> RuleRecord {
        let values = format!(
            "key={:?} mode={:?} format={:?} numeric_as_number={} ttl_ms={:?}",
            rule.key.as_str(),
            rule.mode,
            rule.format,
            rule.encode.numeric_as_number,
            rule.ttl.map(|ttl| ttl.as_millis()),
        );
        let mut keys = vec![rule.key.glob(key_prefix)];
        keys.extend(rule.lease_patterns(key_prefix));
        RuleRecord {
            values,
            keys,
            invalidates: rule.invalidation_patterns(key_prefix),
            invalidate_templates: rule
                .invalidate
                .iter()
                .map(|inv| inv.key.as_str().to_string())
                .collect(),
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    fn decode(text: &str) -> Option<RuleRecord> {
        serde_json::from_str(text).ok()
    }

    fn all_patterns(&self) -> Vec<String> {
        self.keys.iter().chain(&self.invalidates).cloned().collect()
    }
}

/// What changed in one table's rule since the checkpoint recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleChange {
    /// The table is no longer in the config.
    Removed,
    /// Its values or keys are built differently: every key it wrote is in the old form.
    Values,
    /// Only its invalidation rules: the keys the old ones named are no longer deleted.
    Invalidates,
}

/// The changes between the recorded rules and the config's, by table, with the patterns of
/// the keys each change leaves behind. A record that does not parse counts as changed.
pub fn changes(
    saved: &BTreeMap<String, String>,
    now: &BTreeMap<String, RuleRecord>,
) -> Vec<(String, RuleChange, Vec<String>)> {
    let mut out = Vec::new();
    for (table, text) in saved {
        let Some(old) = RuleRecord::decode(text) else {
            warn!(%table, "the rule recorded in the checkpoint does not parse: treating the table's rule as changed");
            if let Some(now) = now.get(table) {
                out.push((table.clone(), RuleChange::Values, now.all_patterns()));
            }
            continue;
        };
        match now.get(table) {
            None => out.push((table.clone(), RuleChange::Removed, old.all_patterns())),
            Some(now) if now.values != old.values || now.keys != old.keys => {
                out.push((table.clone(), RuleChange::Values, old.all_patterns()));
            }
            Some(now)
                if now.invalidates != old.invalidates
                    || now.invalidate_templates != old.invalidate_templates =>
            {
                out.push((table.clone(), RuleChange::Invalidates, old.invalidates));
            }
            Some(_) => {}
        }
    }
    out
}

/// The literal start of a `SCAN MATCH` pattern: every key it matches starts with it.
fn literal_start(pattern: &str) -> String {
    let mut out = String::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(next) => out.push(next),
                None => break,
            },
            '*' | '?' | '[' => break,
            c => out.push(c),
        }
    }
    out
}

/// Whether a key matching `dropped` could be a key matching `kept` (conservative: it
/// compares the patterns' literal starts).
fn may_overlap(dropped: &str, kept: &str) -> bool {
    let (a, b) = (literal_start(dropped), literal_start(kept));
    a.starts_with(&b) || b.starts_with(&a)
}

impl Stream<'_> {
    /// Compares the config's rules with the ones recorded in the checkpoint, drops the keys
    /// the old rules wrote where they differ, and records the config's. With `rebuilding`
    /// (Redis lost its data) every table is written anew anyway, so only the drops are added.
    pub(super) fn notice_rule_changes(&mut self, checkpoint: &CheckpointState, rebuilding: bool) {
        let saved = &checkpoint.rules;
        let key_prefix = self.config.redis.key_prefix.clone();
        let now: BTreeMap<String, RuleRecord> = self
            .config
            .tables
            .iter()
            .map(|rule| (rule.qualified_name(), RuleRecord::of(rule, &key_prefix)))
            .collect();
        let mut rewrite = BTreeSet::new();
        for (table, change, patterns) in changes(saved, &now) {
            match change {
                RuleChange::Removed => {
                    info!(%table, "table taken out of the config while the daemon was stopped: dropping the keys it wrote");
                    for prefix in [
                        FIELD_RULE_PREFIX,
                        FIELD_SHAPE_PREFIX,
                        FIELD_BACKFILL_PREFIX,
                        FIELD_OID_PREFIX,
                    ] {
                        // An empty value removes the field.
                        self.batch
                            .push_field(format!("{prefix}{table}"), String::new());
                    }
                }
                RuleChange::Values => {
                    info!(%table, "the table's rule (key, mode, format, encoding or TTL) changed while the daemon was stopped: dropping the keys it wrote and writing it again");
                    rewrite.insert(table.clone());
                }
                RuleChange::Invalidates => {
                    info!(%table, "the table's invalidation rules changed while the daemon was stopped: dropping the keys the old ones named");
                }
            }
            if change != RuleChange::Invalidates {
                // Keys waiting to be read again are in the old form, and the table is
                // written again (or gone).
                self.backfills.drop_repairs(&table);
                for (key, text) in &checkpoint.repairs {
                    if Repair::decode(text).is_some_and(|r| r.table == table) {
                        self.batch
                            .push_field(format!("{FIELD_REPAIR_PREFIX}{key}"), String::new());
                    }
                }
            }
            // Another table's keys under the dropped patterns go too: write that one again.
            for (other, record) in &now {
                if *other != table
                    && patterns
                        .iter()
                        .any(|p| record.keys.iter().any(|k| may_overlap(p, k)))
                {
                    info!(table = %other, dropped_with = %table, "the dropped keys may include this table's: writing it again");
                    rewrite.insert(other.clone());
                }
            }
            self.batch.push_committed(Op::DropMatching { patterns });
        }
        if !rebuilding {
            for table in rewrite {
                let Some(mode) = self
                    .config
                    .tables
                    .iter()
                    .find(|r| r.qualified_name() == table)
                    .map(|r| r.mode)
                else {
                    continue;
                };
                self.reshape(mode, &table);
            }
        }
        for (table, record) in now {
            let text = record.encode();
            if saved.get(&table) != Some(&text) {
                self.batch
                    .push_field(format!("{FIELD_RULE_PREFIX}{table}"), text);
            }
        }
        // The backfills' restarts go in the same write as the drops and the new records: a
        // crash after it must not find the new rule recorded and the old backfill done.
        self.take_backfill_fields();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(values: &str, keys: &[&str], invalidates: &[&str]) -> RuleRecord {
        RuleRecord {
            values: values.to_string(),
            keys: keys.iter().map(|s| s.to_string()).collect(),
            invalidates: invalidates.iter().map(|s| s.to_string()).collect(),
            invalidate_templates: Vec::new(),
        }
    }

    #[test]
    fn changes_are_told_apart() {
        let a = record("key=a", &["a:*"], &["u:*:orders"]);
        let saved: BTreeMap<String, String> = [
            ("public.same".to_string(), a.encode()),
            ("public.values".to_string(), a.encode()),
            ("public.inv".to_string(), a.encode()),
            ("public.gone".to_string(), a.encode()),
            ("public.junk".to_string(), "{not json".to_string()),
        ]
        .into();
        let now: BTreeMap<String, RuleRecord> = [
            ("public.same".to_string(), a.clone()),
            (
                "public.values".to_string(),
                record("key=b", &["a:*"], &["u:*:orders"]),
            ),
            ("public.inv".to_string(), record("key=a", &["a:*"], &[])),
            ("public.junk".to_string(), record("key=j", &["j:*"], &[])),
            ("public.new".to_string(), a.clone()),
        ]
        .into();
        let found = changes(&saved, &now);
        assert_eq!(
            found,
            vec![
                (
                    "public.gone".to_string(),
                    RuleChange::Removed,
                    vec!["a:*".to_string(), "u:*:orders".to_string()]
                ),
                (
                    "public.inv".to_string(),
                    RuleChange::Invalidates,
                    vec!["u:*:orders".to_string()]
                ),
                (
                    "public.junk".to_string(),
                    RuleChange::Values,
                    vec!["j:*".to_string()]
                ),
                (
                    "public.values".to_string(),
                    RuleChange::Values,
                    vec!["a:*".to_string(), "u:*:orders".to_string()]
                ),
            ]
        );
    }

    #[test]
    fn an_invalidation_column_changed_under_the_same_pattern_is_a_change() {
        let mut old = record("key=a", &["a:*"], &["u:*:orders"]);
        old.invalidate_templates = vec!["u:{user_id}:orders".to_string()];
        let mut now = old.clone();
        now.invalidate_templates = vec!["u:{buyer_id}:orders".to_string()];
        let saved = [("public.t".to_string(), old.encode())].into();
        let now = [("public.t".to_string(), now)].into();
        assert_eq!(
            changes(&saved, &now),
            vec![(
                "public.t".to_string(),
                RuleChange::Invalidates,
                vec!["u:*:orders".to_string()]
            )]
        );
    }

    #[test]
    fn overlap_compares_literal_starts() {
        assert_eq!(literal_start(r"app\*x:user:*:lease"), "app*x:user:");
        assert!(may_overlap("user:*", "user:*:profile"));
        assert!(may_overlap("user:profile:*", "user:*"));
        assert!(!may_overlap("user:*", "order:*"));
        assert!(!may_overlap("{user:*}:lease", "order:*"));
    }
}
