//! The `[[tables]]` entries: one [`TableRule`] each, and the checks across tables.

use std::time::Duration;

use config::{Value, ValueKind};

use super::tree::{duration, kind_name, Section};
use super::{Format, InvalidateRule, Mode, TableRule, RESERVED_KEY_PREFIX};
use crate::encoder::EncodeOptions;
use crate::template::KeyTemplate;

pub(super) fn read_tables(value: Option<Value>, errors: &mut Vec<String>) -> Vec<TableRule> {
    let entries = match value.map(|v| v.kind) {
        None | Some(ValueKind::Nil) => Vec::new(),
        Some(ValueKind::Array(entries)) => entries,
        Some(kind) => {
            errors.push(format!(
                "tables: expected a list of [[tables]] entries, found {}",
                kind_name(&kind)
            ));
            return Vec::new();
        }
    };
    if entries.is_empty() {
        errors.push(
            "tables: no tables configured (add a [[tables]] entry for each table to cache)"
                .to_string(),
        );
    }
    let entries: Vec<Entry> = entries
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            read_table(
                Section::new(&format!("tables[{i}]"), Some(entry), errors),
                errors,
            )
        })
        .collect();
    // Checked across every entry whose name or key could be read, even if another of its
    // keys is wrong, so one run reports everything.
    for (i, x) in entries.iter().enumerate() {
        for (j, y) in entries.iter().enumerate().skip(i + 1) {
            if let (Some((xs, xn)), Some((ys, yn))) = (&x.name, &y.name) {
                if xs == ys && xn == yn {
                    errors.push(format!(
                        "tables[{i}].table and tables[{j}].table: {xs}.{xn} is configured twice \
                         (one [[tables]] entry per table; for more keys that its changes delete, \
                         add [[tables.invalidate]] entries to it)"
                    ));
                }
            }
            if let (Some(xk), Some(yk)) = (&x.key, &y.key) {
                let (p, q) = (xk.literal_prefix(), yk.literal_prefix());
                if p.starts_with(q) || q.starts_with(p) {
                    errors.push(format!(
                        "tables[{i}].key and tables[{j}].key: key prefixes {p:?} and {q:?} overlap, so TRUNCATE and verify could not tell the tables apart"
                    ));
                }
            }
        }
    }
    // An invalidation key inside a table's key space would be counted as that table's by
    // verify (and dropped by its TRUNCATE).
    for (i, x) in entries.iter().enumerate() {
        for (j, y) in entries.iter().enumerate() {
            let Some(yk) = &y.key else { continue };
            for (k, inv) in &x.invalidate {
                let (p, q) = (inv.key.literal_prefix(), yk.literal_prefix());
                if p.starts_with(q) {
                    errors.push(format!(
                        "tables[{i}].invalidate[{k}].key: key prefix {p:?} is inside the key space {q:?} of tables[{j}].key, so verify and TRUNCATE would take its keys for that table's rows (give it a prefix of its own, e.g. \"list:{}\")",
                        inv.key.as_str()
                    ));
                }
            }
        }
    }
    entries.into_iter().filter_map(|e| e.rule).collect()
}

/// What could be read of one entry: the rule if all of it is valid, and the parts that the
/// checks across tables need.
struct Entry {
    name: Option<(String, String)>,
    key: Option<KeyTemplate>,
    /// The invalidation rules that could be read, with their index in the entry.
    invalidate: Vec<(usize, InvalidateRule)>,
    rule: Option<TableRule>,
}

fn read_table(mut sec: Section, errors: &mut Vec<String>) -> Entry {
    let path = sec.path.clone();
    let table = sec.string("table", errors);
    let name = match &table {
        None => {
            errors.push(format!(
                "{path}.table: missing (e.g. table = \"public.users\")"
            ));
            None
        }
        Some(t) => match split_table_name(&t.value) {
            Some((schema, name)) => Some((schema.to_string(), name.to_string())),
            None => {
                errors.push(format!(
                    "{}: {:?} is not a table name (schema.table or table, e.g. public.users)",
                    t.label, t.value
                ));
                None
            }
        },
    };
    let columns = sec.strings("columns", errors).and_then(|c| {
        let before = errors.len();
        if c.value.is_empty() {
            errors.push(format!(
                "{}: is empty (leave it out to store all columns)",
                c.label
            ));
        }
        for (i, col) in c.value.iter().enumerate() {
            if col.is_empty() {
                errors.push(format!("{}[{i}]: empty column name", c.label));
            } else if c.value[..i].contains(col) {
                errors.push(format!("{}: column {col:?} is listed twice", c.label));
            }
        }
        (errors.len() == before).then_some(c.value)
    });
    let key = match sec.string("key", errors) {
        None => {
            errors.push(format!(
                "{path}.key: missing (e.g. key = \"user:profile:{{id}}\")"
            ));
            None
        }
        Some(k) => match KeyTemplate::parse(&k.value) {
            Ok(key) => Some(key),
            Err(e) => {
                errors.push(format!("{}: {e}", k.label));
                None
            }
        },
    };
    if let (Some(key), Some(columns)) = (&key, &columns) {
        for col in key.columns() {
            if !columns.contains(col) {
                errors.push(format!(
                    "{path}.key: column {col:?} is not in {path}.columns"
                ));
            }
        }
    }
    if let Some(key) = &key {
        let p = key.literal_prefix();
        if p.starts_with(RESERVED_KEY_PREFIX) || RESERVED_KEY_PREFIX.starts_with(p) {
            errors.push(format!(
                "{path}.key: key prefix {p:?} overlaps {RESERVED_KEY_PREFIX:?}, which pgcache keeps for its own keys"
            ));
        }
    }
    let mode = match sec.string("mode", errors) {
        None => Some(Mode::Mirror),
        Some(m) => match m.value.as_str() {
            "mirror" => Some(Mode::Mirror),
            "refresh" => Some(Mode::Refresh),
            "invalidate" => Some(Mode::Invalidate),
            other => {
                errors.push(format!(
                    "{}: unknown mode {other:?} (expected mirror, refresh or invalidate)",
                    m.label
                ));
                None
            }
        },
    };
    let ttl = match sec.string("ttl", errors) {
        None => Some(None),
        Some(t) => match duration(&t, errors) {
            Some(d) if d < Duration::from_millis(1) => {
                errors.push(format!(
                    "{}: {:?} is shorter than 1ms (Redis expiry is in milliseconds)",
                    t.label, t.value
                ));
                None
            }
            Some(_) if mode == Some(Mode::Invalidate) => {
                errors.push(format!(
                    "{}: has no effect in invalidate mode, which only deletes keys (remove it, or use mode = \"mirror\")",
                    t.label
                ));
                None
            }
            Some(d) => Some(Some(d)),
            None => None,
        },
    };
    let format = match sec.string("format", errors) {
        None => Some(Format::Json),
        Some(f) => match f.value.as_str() {
            "json" => Some(Format::Json),
            "hash" => Some(Format::Hash),
            other => {
                errors.push(format!(
                    "{}: unknown format {other:?} (expected json or hash)",
                    f.label
                ));
                None
            }
        },
    };
    let numeric = match sec.string("numeric", errors) {
        None => Some(false),
        Some(n) => match n.value.as_str() {
            "string" => Some(false),
            "number" => Some(true),
            other => {
                errors.push(format!(
                    "{}: unknown numeric encoding {other:?} (expected string or number)",
                    n.label
                ));
                None
            }
        },
    };
    let invalidate = read_invalidate(&mut sec, errors);
    sec.finish(errors);
    let invalid_rules = invalidate.iter().any(Option::is_none);
    let invalidate: Vec<(usize, InvalidateRule)> = invalidate
        .into_iter()
        .enumerate()
        .filter_map(|(k, rule)| Some((k, rule?)))
        .collect();
    let rule = (|| {
        if invalid_rules {
            return None;
        }
        let (schema, name) = name.clone()?;
        Some(TableRule {
            schema,
            name,
            key: key.clone()?,
            columns,
            mode: mode?,
            ttl: ttl?,
            format: format?,
            encode: EncodeOptions {
                numeric_as_number: numeric?,
            },
            invalidate: invalidate.iter().map(|(_, rule)| rule.clone()).collect(),
        })
    })();
    Entry {
        name,
        key,
        invalidate,
        rule,
    }
}

/// `[[tables.invalidate]]`: each entry's rule, `None` for one that is wrong (reported).
fn read_invalidate(sec: &mut Section, errors: &mut Vec<String>) -> Vec<Option<InvalidateRule>> {
    let path = sec.path_of("invalidate");
    let entries = match sec.take("invalidate").map(|(_, v)| v.kind) {
        None => return Vec::new(),
        Some(ValueKind::Array(entries)) => entries,
        Some(kind) => {
            errors.push(format!(
                "{path}: expected a list of [[tables.invalidate]] entries (key = \"user:{{user_id}}:orders\"), found {}",
                kind_name(&kind)
            ));
            return vec![None];
        }
    };
    entries
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            let mut inv = Section::new(&format!("{path}[{i}]"), Some(entry), errors);
            let at = inv.path.clone();
            let key = match inv.string("key", errors) {
                None => {
                    errors.push(format!(
                        "{at}.key: missing (e.g. key = \"user:{{user_id}}:orders\")"
                    ));
                    None
                }
                Some(k) => match KeyTemplate::parse(&k.value) {
                    Ok(key) => {
                        let p = key.literal_prefix();
                        if p.starts_with(RESERVED_KEY_PREFIX) || RESERVED_KEY_PREFIX.starts_with(p) {
                            errors.push(format!(
                                "{}: key prefix {p:?} overlaps {RESERVED_KEY_PREFIX:?}, which pgcache keeps for its own keys",
                                k.label
                            ));
                            None
                        } else {
                            Some(key)
                        }
                    }
                    Err(e) => {
                        errors.push(format!("{}: {e}", k.label));
                        None
                    }
                },
            };
            inv.finish(errors);
            key.map(|key| InvalidateRule { key })
        })
        .collect()
}

/// `schema.table` or `table` (schema `public`). Names are matched exactly as Postgres
/// stores them: lower case unless the table was created with a quoted name.
fn split_table_name(s: &str) -> Option<(&str, &str)> {
    let (schema, name) = s.split_once('.').unwrap_or(("public", s));
    let ok = |part: &str| {
        !part.is_empty()
            && !part.contains(['.', '"'])
            && !part.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    (ok(schema) && ok(name)).then_some((schema, name))
}
