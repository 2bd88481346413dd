//! Reading the merged config tree key by key, so that every problem is reported (a serde
//! derive stops at the first) and each names its key and, for overrides, its variable.

use std::time::Duration;

use config::{Map, Value, ValueKind};

use super::{ENV_ORIGIN, ENV_PREFIX, ENV_SEPARATOR};

pub(super) fn is_env_override(name: &str) -> bool {
    name.len() > ENV_PREFIX.len() + ENV_SEPARATOR.len()
        && name[..ENV_PREFIX.len()].eq_ignore_ascii_case(ENV_PREFIX)
        && name[ENV_PREFIX.len()..].starts_with(ENV_SEPARATOR)
}

/// `redis.url`, with `(from PGCACHE__REDIS__URL)` when the environment set it.
pub(super) fn label(path: &str, value: &Value) -> String {
    if value.origin() == Some(ENV_ORIGIN) {
        let var = format!(
            "{ENV_PREFIX}{ENV_SEPARATOR}{}",
            path.replace('.', ENV_SEPARATOR)
        );
        format!("{path} (from {})", var.to_ascii_uppercase())
    } else {
        path.to_string()
    }
}

pub(super) fn kind_name(kind: &ValueKind) -> &'static str {
    match kind {
        ValueKind::Nil => "nothing",
        ValueKind::Boolean(_) => "a boolean",
        ValueKind::I64(_) | ValueKind::I128(_) | ValueKind::U64(_) | ValueKind::U128(_) => {
            "a number"
        }
        ValueKind::Float(_) => "a number",
        ValueKind::String(_) => "a string",
        ValueKind::Table(_) => "a table",
        ValueKind::Array(_) => "a list",
    }
}

/// A value read from the tree, with the name to use for it in messages.
pub(super) struct Field<T> {
    pub(super) value: T,
    pub(super) label: String,
}

/// One table of the merged tree, read key by key; what is left at the end is unknown.
pub(super) struct Section {
    pub(super) path: String,
    pub(super) map: Map<String, Value>,
}

impl Section {
    pub(super) fn new(path: &str, value: Option<Value>, errors: &mut Vec<String>) -> Section {
        let map = match value.map(|v| (label(path, &v), v.kind)) {
            None | Some((_, ValueKind::Nil)) => Map::new(),
            Some((_, ValueKind::Table(map))) => map,
            Some((label, kind)) => {
                errors.push(format!(
                    "{label}: expected a table, found {}",
                    kind_name(&kind)
                ));
                Map::new()
            }
        };
        Section {
            path: path.to_string(),
            map,
        }
    }

    pub(super) fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub(super) fn take(&mut self, key: &str) -> Option<(String, Value)> {
        let value = self.map.remove(key)?;
        if matches!(value.kind, ValueKind::Nil) {
            return None;
        }
        Some((label(&self.path_of(key), &value), value))
    }

    pub(super) fn string(&mut self, key: &str, errors: &mut Vec<String>) -> Option<Field<String>> {
        let (label, value) = self.take(key)?;
        match value.kind {
            ValueKind::String(value) => Some(Field { value, label }),
            kind => {
                errors.push(format!(
                    "{label}: expected a string, found {}",
                    kind_name(&kind)
                ));
                None
            }
        }
    }

    pub(super) fn bool(&mut self, key: &str, errors: &mut Vec<String>) -> Option<bool> {
        let (label, value) = self.take(key)?;
        match &value.kind {
            ValueKind::Boolean(b) => Some(*b),
            // Environment values are always strings.
            ValueKind::String(s) if s.trim() == "true" => Some(true),
            ValueKind::String(s) if s.trim() == "false" => Some(false),
            _ => {
                errors.push(format!(
                    "{label}: expected true or false, found {}",
                    value_text(&value)
                ));
                None
            }
        }
    }

    pub(super) fn count(&mut self, key: &str, errors: &mut Vec<String>) -> Option<Field<usize>> {
        let (label, value) = self.take(key)?;
        let n = match &value.kind {
            ValueKind::I64(n) => usize::try_from(*n).ok(),
            ValueKind::U64(n) => usize::try_from(*n).ok(),
            // Environment values are always strings.
            ValueKind::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        match n {
            Some(n) if n > 0 => Some(Field { value: n, label }),
            _ => {
                errors.push(format!(
                    "{label}: expected a whole number of at least 1, found {}",
                    value_text(&value)
                ));
                None
            }
        }
    }

    /// A size in bytes: a whole number, or a string with a unit as Postgres writes them
    /// (`kB`, `MB`, `GB`, powers of 1024; `B` or none for bytes).
    pub(super) fn bytes(&mut self, key: &str, errors: &mut Vec<String>) -> Option<usize> {
        let (label, value) = self.take(key)?;
        let n = match &value.kind {
            ValueKind::I64(n) => usize::try_from(*n).ok(),
            ValueKind::U64(n) => usize::try_from(*n).ok(),
            ValueKind::String(s) => parse_bytes(s),
            _ => None,
        };
        match n {
            Some(n) if n > 0 => Some(n),
            _ => {
                errors.push(format!(
                    "{label}: expected a size such as 16MB (kB, MB, GB) or a number of bytes, found {}",
                    value_text(&value)
                ));
                None
            }
        }
    }

    pub(super) fn strings(
        &mut self,
        key: &str,
        errors: &mut Vec<String>,
    ) -> Option<Field<Vec<String>>> {
        let (label, value) = self.take(key)?;
        let items = match value.kind {
            ValueKind::Array(items) => items,
            kind => {
                errors.push(format!(
                    "{label}: expected a list of strings, found {}",
                    kind_name(&kind)
                ));
                return None;
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            match item.kind {
                ValueKind::String(s) => out.push(s),
                kind => {
                    errors.push(format!(
                        "{label}[{i}]: expected a string, found {}",
                        kind_name(&kind)
                    ));
                    return None;
                }
            }
        }
        Some(Field { value: out, label })
    }

    /// Reports the keys nobody took.
    pub(super) fn finish(self, errors: &mut Vec<String>) {
        let mut left: Vec<(String, Value)> = self.map.into_iter().collect();
        left.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, value) in left {
            let path = if self.path.is_empty() {
                key
            } else {
                format!("{}.{key}", self.path)
            };
            let what = label(&path, &value);
            let what = what.strip_prefix(path.as_str()).unwrap_or_default();
            errors.push(format!("unknown key {path:?}{what}"));
        }
    }
}

/// A scalar's text for messages about non-secret values.
fn value_text(value: &Value) -> String {
    match &value.kind {
        ValueKind::String(s) => format!("{s:?}"),
        ValueKind::Table(_) | ValueKind::Array(_) | ValueKind::Nil => {
            kind_name(&value.kind).to_string()
        }
        kind => kind.to_string(),
    }
}

/// A humantime duration written compactly (`30s`, `15m`, `1h30m`): whitespace is
/// rejected so every value has one spelling that also survives an environment variable.
pub(super) fn duration(field: &Field<String>, errors: &mut Vec<String>) -> Option<Duration> {
    let parsed = if field.value.contains(char::is_whitespace) {
        None
    } else {
        humantime::parse_duration(&field.value).ok()
    };
    match parsed {
        Some(d) => Some(d),
        None => {
            errors.push(format!(
                "{}: {:?} is not a duration (examples: 30s, 15m, 1h)",
                field.label, field.value
            ));
            None
        }
    }
}

/// `16MB`, `512kB`, `1GB`, `100`, `100B` (units of 1024, as in postgresql.conf).
pub(super) fn parse_bytes(text: &str) -> Option<usize> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: usize = number.parse().ok()?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" | "KiB" => 1 << 10,
        "MB" | "MiB" => 1 << 20,
        "GB" | "GiB" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(scale)
}
