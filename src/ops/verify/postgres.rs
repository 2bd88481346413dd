//! The Postgres side of `verify`: which keys the table's rows have (keyset pagination or a
//! random sample), the value each key should hold (read by the same query and encoder as
//! the read helper, so byte-identical to the stream), and the marker that tells when the
//! daemon has applied everything committed so far.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Pool, Runtime};
use tokio_postgres::{Client, SimpleQueryMessage};

use super::VerifyError;
use crate::checkpoint;
use crate::config::TableRule;
use crate::ops::preflight::{quote_ident, quote_qualified};
use crate::pgconn::{self, PgTarget};
use crate::reader::source::{KeyTexts, RowSource};
use crate::reader::ReaderError;
use crate::Lsn;

/// A small pool: `verify` reads one chunk at a time. Every connection pins the session
/// settings of the stream (`PgTarget::tokio_config`), so values match the daemon's.
pub(super) fn pool(url: &str) -> Result<Pool, VerifyError> {
    let target = PgTarget::parse(url).map_err(|e| VerifyError::Postgres(e.to_string()))?;
    let manager =
        pgconn::pool_manager(&target).map_err(|e| VerifyError::Postgres(e.to_string()))?;
    let timeout = Some(Duration::from_secs(10));
    Pool::builder(manager)
        .max_size(2)
        .runtime(Runtime::Tokio1)
        .wait_timeout(timeout)
        .create_timeout(timeout)
        .recycle_timeout(timeout)
        .build()
        .map_err(|e| VerifyError::Postgres(format!("cannot build the connection pool: {e}")))
}

pub(super) async fn client(pool: &Pool) -> Result<deadpool_postgres::Object, VerifyError> {
    pool.get()
        .await
        .map_err(|e| VerifyError::Postgres(format!("cannot connect: {e}")))
}

fn pg_error(e: tokio_postgres::Error) -> VerifyError {
    VerifyError::Postgres(match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    })
}

/// Lists a table's keys: the key template's column values as Postgres prints them.
pub(super) struct KeyScan {
    /// `SELECT <order columns>, <key columns> FROM t WHERE <key columns are not null>`.
    select: String,
    /// Columns to page by (the primary key, or the key columns without one), quoted, with
    /// their SQL types for casting the cursor back.
    order: Vec<(String, String)>,
    keys: usize,
}

impl KeyScan {
    /// Looks the table up. `Ok(None)` when it does not exist.
    pub(super) async fn new(
        client: &Client,
        rule: &TableRule,
    ) -> Result<Option<KeyScan>, VerifyError> {
        let relation = quote_qualified(&rule.schema, &rule.name);
        let oid: Option<u32> = client
            .query_one("SELECT to_regclass($1::text)::oid", &[&relation])
            .await
            .map_err(pg_error)?
            .get(0);
        let Some(oid) = oid else { return Ok(None) };
        let types: Vec<(String, String)> = client
            .query(
                "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
                &[&oid],
            )
            .await
            .map_err(pg_error)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let type_of = |name: &str| -> Result<String, VerifyError> {
            types
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| VerifyError::Schema {
                    table: rule.qualified_name(),
                    problem: format!("the table has no column {name:?}"),
                })
        };
        let pk = pgconn::primary_key_columns(client, oid)
            .await
            .map_err(pg_error)?;
        let key_columns = rule.key.columns();
        let order_names: &[String] = if pk.is_empty() { key_columns } else { &pk };
        let mut order = Vec::new();
        for name in order_names {
            order.push((quote_ident(name), type_of(name)?));
        }
        for name in key_columns {
            type_of(name)?;
        }
        let list: Vec<String> = order
            .iter()
            .map(|(q, _)| q.clone())
            .chain(key_columns.iter().map(|k| quote_ident(k)))
            .collect();
        let filter: Vec<String> = key_columns
            .iter()
            .map(|k| format!("{} IS NOT NULL", quote_ident(k)))
            .collect();
        Ok(Some(KeyScan {
            select: format!(
                "SELECT {} FROM {relation} WHERE {}",
                list.join(", "),
                filter.join(" AND ")
            ),
            order,
            keys: key_columns.len(),
        }))
    }

    /// The next `limit` rows after `cursor`: their key values, and the cursor after them.
    pub(super) async fn next(
        &self,
        client: &Client,
        cursor: Option<&[String]>,
        limit: usize,
    ) -> Result<(Vec<Vec<String>>, Option<Vec<String>>), VerifyError> {
        let mut sql = self.select.clone();
        let columns: Vec<&str> = self.order.iter().map(|(q, _)| q.as_str()).collect();
        if let Some(cursor) = cursor {
            sql.push_str(&format!(" AND ({}) > (", columns.join(", ")));
            for (i, ((_, sql_type), value)) in self.order.iter().zip(cursor).enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&literal(value));
                sql.push_str("::");
                sql.push_str(sql_type);
            }
            sql.push(')');
        }
        sql.push_str(&format!(" ORDER BY {} LIMIT {limit}", columns.join(", ")));
        let rows = self.rows(client, &sql).await?;
        let n = self.order.len();
        let cursor = rows.last().map(|r| r[..n].to_vec());
        Ok((rows.into_iter().map(|r| r[n..].to_vec()).collect(), cursor))
    }

    /// Key values of `n` random rows.
    pub(super) async fn sample(
        &self,
        client: &Client,
        n: u64,
    ) -> Result<Vec<Vec<String>>, VerifyError> {
        let sql = format!("{} ORDER BY random() LIMIT {n}", self.select);
        let k = self.order.len();
        Ok(self
            .rows(client, &sql)
            .await?
            .into_iter()
            .map(|r| r[k..].to_vec())
            .collect())
    }

    /// Runs `sql` with the simple protocol, whose text results are the columns' output
    /// functions: the same text pgoutput sends and keys are rendered from.
    async fn rows(&self, client: &Client, sql: &str) -> Result<Vec<Vec<String>>, VerifyError> {
        let width = self.order.len() + self.keys;
        let mut out = Vec::new();
        for message in client.simple_query(sql).await.map_err(pg_error)? {
            if let SimpleQueryMessage::Row(row) = message {
                // Key columns are filtered NOT NULL; a primary key cannot be NULL.
                out.push(
                    (0..width)
                        .map(|i| row.get(i).unwrap_or_default().to_string())
                        .collect(),
                );
            }
        }
        Ok(out)
    }
}

/// The value each key should hold: the row encoded as the daemon would (`None`: no row, or
/// a row the daemon would not cache, such as one its encoder rejects).
pub(super) async fn expected(
    source: &RowSource,
    pool: &Pool,
    keys: &[KeyTexts],
) -> Result<Vec<Option<Vec<u8>>>, VerifyError> {
    match source.read(pool, keys).await {
        Ok(read) => Ok(read.rows),
        Err(e) if is_about_one_row(&e) && keys.len() > 1 => {
            // One key spoils the batch: read them one by one to find it.
            let mut rows = Vec::with_capacity(keys.len());
            for key in keys {
                match source.read(pool, std::slice::from_ref(key)).await {
                    Ok(mut one) => rows.push(one.rows.pop().flatten()),
                    Err(e) if is_about_one_row(&e) => rows.push(None),
                    Err(e) => return Err(VerifyError::Read(e)),
                }
            }
            Ok(rows)
        }
        Err(e) if is_about_one_row(&e) => Ok(vec![None]),
        Err(e) => Err(VerifyError::Read(e)),
    }
}

/// Errors about one key or row, not about the table or the server: a key value no row can
/// have (so the key is not the table's), or a row the daemon could not encode (it deletes
/// such keys: absence is expected).
fn is_about_one_row(e: &ReaderError) -> bool {
    matches!(
        e,
        ReaderError::Encode { .. }
            | ReaderError::NonCanonicalKey { .. }
            | ReaderError::BadKeyValue { .. }
            | ReaderError::KeyNotUnique { .. }
    )
}

/// Columns of type json or jsonb, whose hash fields hold their JSON text as is.
pub(super) async fn json_columns(
    client: &Client,
    rule: &TableRule,
) -> Result<Vec<String>, VerifyError> {
    let relation = quote_qualified(&rule.schema, &rule.name);
    Ok(client
        .query(
            "SELECT a.attname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = to_regclass($1::text) AND a.attnum > 0 AND NOT a.attisdropped \
             AND (a.atttypid IN ('json'::regtype, 'jsonb'::regtype) \
                  OR t.typbasetype IN ('json'::regtype, 'jsonb'::regtype))",
            &[&relation],
        )
        .await
        .map_err(pg_error)?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Waits until the daemon has applied everything committed before the call.
///
/// It takes the end of the WAL now and waits for the daemon's checkpoint to pass it: the
/// daemon moves its checkpoint past every position it has streamed, published changes or
/// not, so once it has, every earlier commit is in Redis. When the position cannot be read,
/// it waits for the slot's confirmed position to pass the current WAL position instead.
pub(super) struct Settle {
    slot: String,
    checkpoint_key: String,
    timeout: Duration,
    /// Set after a wait timed out (daemon stopped or far behind): later waits do not wait.
    gave_up: bool,
}

enum Mark {
    Checkpoint(Lsn),
    Slot(String),
}

impl Settle {
    pub(super) fn new(slot: &str, checkpoint_key: String, timeout: Duration) -> Settle {
        Settle {
            slot: slot.to_string(),
            checkpoint_key,
            timeout,
            gave_up: false,
        }
    }

    /// Whether every wait so far saw the daemon catch up.
    pub(super) fn settled(&self) -> bool {
        !self.gave_up
    }

    /// `true` when the daemon applied everything committed before this call.
    pub(super) async fn wait(
        &mut self,
        client: &Client,
        redis: &mut super::redis::Conn,
    ) -> Result<bool, VerifyError> {
        if self.gave_up {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Ok(false);
        }
        // The daemon's checkpoint moves past every position it has streamed, published
        // changes or not, so it reaches the end of the WAL as it is now.
        let emitted = client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await;
        let mark = match emitted {
            Ok(row) => match row.get::<_, String>(0).parse::<Lsn>() {
                Ok(lsn) => Mark::Checkpoint(lsn),
                Err(_) => return self.give_up(),
            },
            Err(_) => match client
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
            {
                Ok(row) => Mark::Slot(row.get(0)),
                Err(_) => return self.give_up(),
            },
        };
        let deadline = Instant::now() + self.timeout;
        loop {
            let reached = match &mark {
                Mark::Checkpoint(lsn) => checkpoint::read(redis, &self.checkpoint_key)
                    .await
                    .map_err(|e| VerifyError::Redis(e.to_string()))?
                    .is_some_and(|done| done >= *lsn),
                Mark::Slot(lsn) => client
                    .query_opt(
                        "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots \
                         WHERE slot_name = $1",
                        &[&self.slot, lsn],
                    )
                    .await
                    .map_err(pg_error)?
                    .and_then(|r| r.get::<_, Option<bool>>(0))
                    .unwrap_or(false),
            };
            if reached {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return self.give_up();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn give_up(&mut self) -> Result<bool, VerifyError> {
        self.gave_up = true;
        Ok(false)
    }
}

use crate::sql::literal;

/// A row source for the rule, as the read helper builds it.
pub(super) fn source(rule: &TableRule) -> RowSource {
    RowSource::new(Arc::new(rule.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_literals_are_escaped() {
        assert_eq!(literal("it's"), "E'it''s'");
        assert_eq!(literal(r"a\b"), r"E'a\\b'");
    }
}
