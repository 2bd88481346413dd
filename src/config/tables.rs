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
                } else if q.starts_with(p) {
                    // The other way round: deleting the invalidation keys by pattern (on
                    // TRUNCATE, or when the rows are not at hand) would delete that table's.
                    errors.push(format!(
                        "tables[{i}].invalidate[{k}].key: its key space {p:?} takes in the keys of tables[{j}].key (prefix {q:?}), so deleting its keys by pattern (on TRUNCATE) would delete that table's rows too (give it a prefix of its own, e.g. \"list:{}\")",
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
    let name = read_name(&mut sec, errors);
    let columns = read_columns(&mut sec, errors);
    let key = read_key(&mut sec, columns.as_deref(), errors);
    let mode = read_choice(
        &mut sec,
        "mode",
        Mode::Mirror,
        &[
            ("mirror", Mode::Mirror),
            ("refresh", Mode::Refresh),
            ("invalidate", Mode::Invalidate),
        ],
        "mode",
        errors,
    );
    let ttl = read_ttl(&mut sec, mode, errors);
    let format = read_choice(
        &mut sec,
        "format",
        Format::Json,
        &[("json", Format::Json), ("hash", Format::Hash)],
        "format",
        errors,
    );
    let numeric = read_choice(
        &mut sec,
        "numeric",
        false,
        &[("string", false), ("number", true)],
        "numeric encoding",
        errors,
    );
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

/// `table`: `schema.name` or `name` (in `public`).
fn read_name(sec: &mut Section, errors: &mut Vec<String>) -> Option<(String, String)> {
    let Some(table) = sec.string("table", errors) else {
        errors.push(format!(
            "{}.table: missing (e.g. table = \"public.users\")",
            sec.path
        ));
        return None;
    };
    match split_table_name(&table.value) {
        Some((schema, name)) => Some((schema.to_string(), name.to_string())),
        None => {
            errors.push(format!(
                "{}: {:?} is not a table name (schema.table or table, e.g. public.users)",
                table.label, table.value
            ));
            None
        }
    }
}

/// `columns`: absent for all columns; else not empty, no empty or repeated names.
fn read_columns(sec: &mut Section, errors: &mut Vec<String>) -> Option<Vec<String>> {
    let c = sec.strings("columns", errors)?;
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
}

/// `key`: a template whose columns are stored, outside pgcache's own key space.
fn read_key(
    sec: &mut Section,
    columns: Option<&[String]>,
    errors: &mut Vec<String>,
) -> Option<KeyTemplate> {
    let path = sec.path.clone();
    let Some(text) = sec.string("key", errors) else {
        errors.push(format!(
            "{path}.key: missing (e.g. key = \"user:profile:{{id}}\")"
        ));
        return None;
    };
    let key = match KeyTemplate::parse(&text.value) {
        Ok(key) => key,
        Err(e) => {
            errors.push(format!("{}: {e}", text.label));
            return None;
        }
    };
    if let Some(columns) = columns {
        for col in key.columns() {
            if !columns.contains(col) {
                errors.push(format!(
                    "{path}.key: column {col:?} is not in {path}.columns"
                ));
            }
        }
    }
    let p = key.literal_prefix();
    if p.starts_with(RESERVED_KEY_PREFIX) || RESERVED_KEY_PREFIX.starts_with(p) {
        errors.push(format!(
            "{path}.key: key prefix {p:?} overlaps {RESERVED_KEY_PREFIX:?}, which pgcache keeps for its own keys"
        ));
    }
    Some(key)
}

/// A field with a fixed set of spellings: `default` when absent, `None` (reported) for an
/// unknown one.
fn read_choice<T: Copy>(
    sec: &mut Section,
    field: &str,
    default: T,
    choices: &[(&str, T)],
    what: &str,
    errors: &mut Vec<String>,
) -> Option<T> {
    let Some(given) = sec.string(field, errors) else {
        return Some(default);
    };
    if let Some(&(_, value)) = choices.iter().find(|(name, _)| *name == given.value) {
        return Some(value);
    }
    let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
    let expected = match names.split_last() {
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    errors.push(format!(
        "{}: unknown {what} {:?} (expected {expected})",
        given.label, given.value
    ));
    None
}

/// `ttl`: `Some(None)` when absent; at least 1 ms, and not in invalidate mode.
fn read_ttl(
    sec: &mut Section,
    mode: Option<Mode>,
    errors: &mut Vec<String>,
) -> Option<Option<Duration>> {
    let Some(t) = sec.string("ttl", errors) else {
        return Some(None);
    };
    match duration(&t, errors)? {
        d if d < Duration::from_millis(1) => {
            errors.push(format!(
                "{}: {:?} is shorter than 1ms (Redis expiry is in milliseconds)",
                t.label, t.value
            ));
            None
        }
        _ if mode == Some(Mode::Invalidate) => {
            errors.push(format!(
                "{}: has no effect in invalidate mode, which only deletes keys (remove it, or use mode = \"mirror\")",
                t.label
            ));
            None
        }
        d => Some(Some(d)),
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
