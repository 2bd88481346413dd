//! The demo's proof: once writes stop, Redis holds what Postgres holds.
//!
//! Rows are read on a connection with the pinned session settings and encoded with the
//! daemon's own encoder, so the comparison is byte for byte. Mirrored tables must match
//! row for row; a refresh table holds only what readers cached, and every cached value
//! must be the current row (a cached key whose row is gone is stale).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::ops::verify::Servers;
use tokio_postgres::SimpleQueryMessage;

use super::shop::{TableSpec, TABLES};
use super::DemoError;
use crate::encoder::{self, EncodeOptions, PgType};

/// Keys per query when reading rows or values.
const CHUNK: usize = 500;

/// One table compared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableCheck {
    pub table: &'static str,
    pub mirror: bool,
    /// Rows in Postgres (mirror), or rows behind the cached keys (refresh).
    pub rows: usize,
    /// Keys of the table in Redis.
    pub keys: usize,
    /// Rows without their key (mirror only).
    pub missing: Vec<String>,
    /// Keys without a row.
    pub extra: Vec<String>,
    /// Keys whose value is not the row's encoding.
    pub differ: Vec<String>,
}

impl TableCheck {
    pub fn matches(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.differ.is_empty()
    }
}

impl fmt::Display for TableCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.matches() {
            return if self.mirror {
                write!(
                    f,
                    "{}: {} rows in Postgres = {} keys in Redis, byte for byte",
                    self.table, self.rows, self.keys
                )
            } else {
                write!(
                    f,
                    "{}: {} keys cached on demand, each equal to its current row",
                    self.table, self.keys
                )
            };
        }
        let first = |v: &[String]| v.first().cloned().unwrap_or_default();
        write!(f, "{}: DIFFERS:", self.table)?;
        if !self.missing.is_empty() {
            write!(
                f,
                " {} rows not in Redis (e.g. {})",
                self.missing.len(),
                first(&self.missing)
            )?;
        }
        if !self.extra.is_empty() {
            write!(
                f,
                " {} keys without a row (e.g. {})",
                self.extra.len(),
                first(&self.extra)
            )?;
        }
        if !self.differ.is_empty() {
            write!(
                f,
                " {} keys with another value (e.g. {})",
                self.differ.len(),
                first(&self.differ)
            )?;
        }
        Ok(())
    }
}

/// Compares every cached table.
///
/// # Errors
/// A query or Redis command failed, or a row could not be encoded.
pub async fn check_all(
    pg: &tokio_postgres::Client,
    redis: &mut Servers,
) -> Result<Vec<TableCheck>, DemoError> {
    let mut checks = Vec::with_capacity(TABLES.len());
    for spec in TABLES {
        checks.push(check(pg, redis, spec).await?);
    }
    Ok(checks)
}

async fn check(
    pg: &tokio_postgres::Client,
    redis: &mut Servers,
    spec: &'static TableSpec,
) -> Result<TableCheck, DemoError> {
    let cached: BTreeSet<String> = scan(redis, &format!("{}*", spec.prefix))
        .await?
        .into_iter()
        .collect();
    // Key (`product:7`) to the row's JSON.
    let rows = if spec.mirror {
        read_rows(pg, spec, None).await?
    } else {
        let ids: Vec<i64> = cached
            .iter()
            .filter_map(|key| key.strip_prefix(spec.prefix)?.parse().ok())
            .collect();
        let mut rows = BTreeMap::new();
        for chunk in ids.chunks(CHUNK) {
            rows.extend(read_rows(pg, spec, Some(chunk)).await?);
        }
        rows
    };
    let mut result = TableCheck {
        table: spec.table,
        mirror: spec.mirror,
        rows: rows.len(),
        keys: cached.len(),
        ..TableCheck::default()
    };
    let keys: Vec<&String> = if spec.mirror {
        rows.keys().collect()
    } else {
        cached.iter().collect()
    };
    for chunk in keys.chunks(CHUNK) {
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(chunk)
            .query_async(&mut redis.data)
            .await
            .map_err(DemoError::redis("reading values to compare"))?;
        for (key, value) in chunk.iter().zip(values) {
            match (rows.get(*key), value) {
                (Some(row), Some(value)) if *row == value => {}
                (Some(_), Some(_)) => result.differ.push((*key).clone()),
                (Some(_), None) if spec.mirror => result.missing.push((*key).clone()),
                // Expired or evicted between SCAN and MGET: absence is always safe.
                (_, None) => {}
                (None, Some(_)) => result.extra.push((*key).clone()),
            }
        }
    }
    if spec.mirror {
        result
            .extra
            .extend(cached.iter().filter(|k| !rows.contains_key(*k)).cloned());
    }
    Ok(result)
}

/// The table's rows (all, or those with `ids`), keyed by their Redis key, encoded as the
/// daemon encodes them.
async fn read_rows(
    pg: &tokio_postgres::Client,
    spec: &TableSpec,
    ids: Option<&[i64]>,
) -> Result<BTreeMap<String, Vec<u8>>, DemoError> {
    let columns: Vec<&str> = spec.columns.iter().map(|(c, _)| *c).collect();
    let filter = match ids {
        Some([]) => return Ok(BTreeMap::new()),
        Some(ids) => format!(
            " WHERE id IN ({})",
            ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
        ),
        None => String::new(),
    };
    // The simple protocol returns each value's output-function text, as pgoutput sends it.
    let sql = format!(
        "SELECT {} FROM {}{filter} ORDER BY id",
        columns.join(", "),
        spec.table
    );
    let messages = pg
        .simple_query(&sql)
        .await
        .map_err(DemoError::postgres("reading rows to compare"))?;
    let typed: Vec<(&str, &PgType)> = spec.columns.iter().map(|(c, t)| (*c, t)).collect();
    let mut rows = BTreeMap::new();
    for message in messages {
        let SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        let values: Vec<Option<&[u8]>> = (0..row.len())
            .map(|i| row.get(i).map(str::as_bytes))
            .collect();
        let id = values.first().copied().flatten().unwrap_or_default();
        let key = format!("{}{}", spec.prefix, String::from_utf8_lossy(id));
        let mut json = Vec::new();
        encoder::encode_row(&mut json, &typed, values, EncodeOptions::default())
            .map_err(|e| DemoError::Compare(format!("{key}: {e}")))?;
        rows.insert(key, json);
    }
    Ok(rows)
}

/// Every key matching `pattern` (SCAN, so Redis is never blocked).
///
/// # Errors
/// When a SCAN fails.
pub async fn scan(redis: &mut Servers, pattern: &str) -> Result<Vec<String>, DemoError> {
    let mut keys = Vec::new();
    // Each server that holds keys: the one, or every master of a cluster.
    for server in &redis.scans {
        let mut conn = server.clone();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(DemoError::redis("scanning keys"))?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(keys)
}
