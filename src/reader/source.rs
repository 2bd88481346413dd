//! The Postgres side of a miss: a table's columns, and the query that reads rows so that
//! their JSON is byte-identical to what the daemon writes for the same rows.
//!
//! Identity holds because the values take the same path as in the stream: pgoutput sends
//! each column's *output function* text under the pinned session settings, and so does a
//! simple-protocol query (text results) on a connection with the same settings. Casting
//! columns `::text` would not do: `inet::text` adds the netmask (`10.0.0.1/32`) and
//! `char(n)::text` strips the padding, where the output function does neither.
//!
//! The simple protocol has no parameters, so key values travel as escaped `E'...'` literals,
//! cast to the column's exact type. The query also returns each key value as Postgres
//! prints it, so a key the daemon would spell differently (`042` for an integer) is refused
//! instead of filled under a key no change would ever touch.
//!
//! The column list is the daemon's: the rule's columns, or every column in attnum order
//! except dropped and generated ones (pgoutput does not send generated columns). Every read
//! is followed, in the same round trip, by a prepared query for a fingerprint of the table's
//! columns; when it differs from the one the list was built from (ALTER TABLE), the list is
//! rebuilt and the read repeated. Reading the fingerprint after the rows is enough: a change
//! that committed before the rows were read is seen by the later query, and one that
//! commits in between only costs a needless retry. (Inside the row query, as a subquery
//! planned on every read, it cost more than the read itself: 0.32 against 0.10 ms.)

use std::fmt::Write as _;
use std::sync::{Arc, LazyLock, Mutex};

use deadpool_postgres::{ClientWrapper, Pool};
use tokio_postgres::SimpleQueryMessage;

use super::ReaderError;
use crate::config::{Format, TableRule};
use crate::encoder::{self, PgType};
use crate::Lsn;

/// Keys per query in a batch read; keeps statements a reasonable size.
const BATCH: usize = 500;

/// The columns of the table as the daemon sees them, in `attnum` order. The same text is
/// computed when the column list is built and on every read.
fn fingerprint_sql(relation: &str) -> String {
    format!(
        "(SELECT string_agg(a.attname || ':' || a.atttypid || ':' || a.atttypmod, ',' \
         ORDER BY a.attnum) FROM pg_catalog.pg_attribute a WHERE a.attrelid = {relation} \
         AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '')"
    )
}

/// The fingerprint of the table with OID `$1`, and the position the rows were read at, as a
/// prepared statement (built once: every miss looks it up in the connection's statement
/// cache). The position is the end of the WAL *after* the row query's snapshot was taken, so
/// every commit that snapshot saw ends at or before it: once the daemon has applied up to
/// it, Redis holds nothing older than the rows read (see `lease`). The flush position comes
/// with it: see [`flush_wal`].
static FINGERPRINT_BY_OID: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {}, pg_current_wal_insert_lsn()::text, \
         pg_current_wal_insert_lsn() > pg_current_wal_flush_lsn()",
        fingerprint_sql("$1::oid")
    )
});

/// Flushes the WAL up to now. The daemon only sees WAL that is flushed; with writers that
/// commit under `synchronous_commit = off`, rows can be visible (and read) before their
/// commit is flushed, and the WAL writer flushes only every `wal_writer_delay` (200 ms by
/// default), so a miss would wait that long for the daemon to reach its read position, and
/// lose to any change of a busy row meanwhile. A transaction that takes an xid commits with
/// a commit record, and `synchronous_commit = local` flushes everything before it: one
/// round trip, an xid, and a WAL flush, only when WAL is waiting to be flushed.
pub(super) async fn flush_wal(client: &ClientWrapper) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(
            "BEGIN; SET LOCAL synchronous_commit = local; SELECT pg_current_xact_id(); COMMIT",
        )
        .await
}

/// The WAL position now, for a value computed outside the reader
/// ([`Reader::get_with`](super::Reader::get_with)): taken before the loader runs, with the
/// WAL flushed up to it when writers left some unflushed (see [`flush_wal`]), so that once
/// the daemon has applied up to it, every change committed before the loader started has
/// been applied (and has deleted its invalidation keys).
pub(crate) async fn read_position(pool: &Pool) -> Result<Lsn, ReaderError> {
    let unavailable = |e: Arc<dyn std::error::Error + Send + Sync>| ReaderError::Loader {
        key: String::new(),
        source: e,
    };
    let client = pool.get().await.map_err(|e| unavailable(Arc::new(e)))?;
    let row = client
        .query_one(
            "SELECT pg_current_wal_insert_lsn()::text, \
             pg_current_wal_insert_lsn() > pg_current_wal_flush_lsn()",
            &[],
        )
        .await
        .map_err(|e| unavailable(Arc::new(e)))?;
    let at: String = row.get(0);
    if row.get::<_, bool>(1) {
        flush_wal(&client)
            .await
            .map_err(|e| unavailable(Arc::new(e)))?;
    }
    at.parse().map_err(|_| {
        let problem: Box<dyn std::error::Error + Send + Sync> =
            format!("Postgres reported WAL position {at:?}, which is not an LSN").into();
        unavailable(Arc::from(problem))
    })
}

/// One key to read: its Redis key (for messages) and its values' texts, in template order.
#[derive(Debug, Clone)]
pub(crate) struct KeyTexts {
    pub redis_key: String,
    pub texts: Vec<String>,
}

/// What the reader knows about a table's columns.
struct Shape {
    /// Cached columns in output order, with their encoders.
    columns: Vec<(String, PgType)>,
    /// `SELECT ... FROM (VALUES `: everything before the key rows.
    head: String,
    /// `) AS k(...) LEFT JOIN ...`: everything after them.
    tail: String,
    /// SQL type of each key column (with its modifier), for casting the key literals.
    key_types: Vec<String>,
    /// The table's OID and its fingerprint when the shape was built.
    oid: u32,
    fingerprint: Option<String>,
}

/// Reads one table's rows and encodes them like the stream.
pub(crate) struct RowSource {
    rule: Arc<TableRule>,
    table: String,
    /// Built on the first miss and again after the table's columns change. Only copied
    /// out under the lock, never held across an await.
    shape: Mutex<Option<Arc<Shape>>>,
}

/// One row read from Postgres: the encoded JSON, or `None` when no row has the key.
pub(crate) type Row = Option<Vec<u8>>;

/// Rows read, and the WAL position they were read at.
pub(crate) struct Read {
    pub rows: Vec<Row>,
    pub at: Lsn,
}

impl RowSource {
    pub(crate) fn new(rule: Arc<TableRule>) -> RowSource {
        RowSource {
            table: rule.qualified_name(),
            rule,
            shape: Mutex::new(None),
        }
    }

    /// Reads the rows with these keys, in the order given.
    ///
    /// # Errors
    /// No connection, a failed query, a key value Postgres rejects or prints differently,
    /// several rows for one key, a row value the encoder rejects, or a rule that does not
    /// fit the table.
    pub(crate) async fn read(&self, pool: &Pool, keys: &[KeyTexts]) -> Result<Read, ReaderError> {
        let client = pool
            .get()
            .await
            .map_err(|e| ReaderError::PostgresUnavailable {
                table: self.table.clone(),
                source: Arc::new(e),
            })?;
        let mut rows = Vec::with_capacity(keys.len());
        let mut at = Lsn::ZERO;
        for chunk in keys.chunks(BATCH) {
            let (read, read_at) = self.read_chunk(&client, chunk).await?;
            rows.extend(read);
            at = at.max(read_at);
        }
        Ok(Read { rows, at })
    }

    async fn read_chunk(
        &self,
        client: &ClientWrapper,
        keys: &[KeyTexts],
    ) -> Result<(Vec<Row>, Lsn), ReaderError> {
        let mut shape = self.shape(client, false).await?;
        let fingerprint = self.fingerprint_statement(client).await?;
        // Two column changes in a row while we read is not worth chasing further.
        for _ in 0..3 {
            let sql = self.select_sql(&shape, keys)?;
            let oid = shape.oid;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&oid];
            // Both go out before either answer is awaited: one round trip, in this order.
            let (messages, now) = tokio::join!(
                client.simple_query(&sql),
                client.query_one(&fingerprint, &params)
            );
            let messages = messages.map_err(|e| self.query_error(e, keys))?;
            let now = now.map_err(|e| self.pg_error(e))?;
            let fingerprint_now: Option<String> = now.try_get(0).map_err(|e| self.pg_error(e))?;
            let at: String = now.try_get(1).map_err(|e| self.pg_error(e))?;
            let at: Lsn = at.parse().map_err(|_| ReaderError::Schema {
                table: self.table.clone(),
                problem: format!("Postgres reported WAL position {at:?}, which is not an LSN"),
            })?;
            let unflushed: bool = now.try_get(2).map_err(|e| self.pg_error(e))?;
            if unflushed {
                flush_wal(client).await.map_err(|e| self.pg_error(e))?;
            }
            if fingerprint_now != shape.fingerprint {
                shape = self.shape(client, true).await?;
                continue;
            }
            match self.parse(&shape, keys, &messages)? {
                Some(rows) => return Ok((rows, at)),
                None => shape = self.shape(client, true).await?,
            }
        }
        Err(ReaderError::Schema {
            table: self.table.clone(),
            problem: "the table's columns kept changing while its rows were read".to_string(),
        })
    }

    /// The prepared fingerprint query, prepared once per pooled connection.
    async fn fingerprint_statement(
        &self,
        client: &ClientWrapper,
    ) -> Result<tokio_postgres::Statement, ReaderError> {
        client
            .prepare_cached(&FINGERPRINT_BY_OID)
            .await
            .map_err(|e| self.pg_error(e))
    }

    fn pg_error(&self, e: tokio_postgres::Error) -> ReaderError {
        ReaderError::Postgres {
            table: self.table.clone(),
            source: Arc::new(e),
        }
    }

    fn query_error(&self, e: tokio_postgres::Error, keys: &[KeyTexts]) -> ReaderError {
        // Class 22 (data exception): a key value that is not a value of its type. Postgres
        // names the value in its message; for one key we can name it too.
        let rejected = e.code().is_some_and(|c| c.code().starts_with("22"));
        match e.as_db_error() {
            Some(db) if rejected => ReaderError::BadKeyValue {
                table: self.table.clone(),
                column: self.rule.key.columns().join(", "),
                value: match keys {
                    [key] => key.texts.join(", "),
                    _ => format!("one of {} keys", keys.len()),
                },
                problem: db.message().to_string(),
            },
            _ => self.pg_error(e),
        }
    }

    /// Builds the column list and prepares the fingerprint query on this connection now
    /// rather than on the first miss.
    pub(crate) async fn prepare(&self, client: &ClientWrapper) -> Result<(), ReaderError> {
        self.shape(client, false).await?;
        self.fingerprint_statement(client).await.map(|_| ())
    }

    /// The cached shape, or a fresh one when there is none or `reload`.
    async fn shape(
        &self,
        client: &tokio_postgres::Client,
        reload: bool,
    ) -> Result<Arc<Shape>, ReaderError> {
        if !reload {
            if let Some(shape) = self.lock().clone() {
                return Ok(shape);
            }
        }
        let shape = Arc::new(self.load_shape(client).await?);
        *self.lock() = Some(shape.clone());
        Ok(shape)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Shape>>> {
        // The guarded value is replaced whole, so a poisoned lock still holds a valid one.
        self.shape.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn load_shape(&self, client: &tokio_postgres::Client) -> Result<Shape, ReaderError> {
        let pg_err = |e| self.pg_error(e);
        let schema_err = |problem: String| ReaderError::Schema {
            table: self.table.clone(),
            problem,
        };
        let relation = format!(
            "{}.{}",
            quote_ident(&self.rule.schema),
            quote_ident(&self.rule.name)
        );
        let sql = format!(
            "SELECT a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod), \
             a.attgenerated <> '', {}, a.attrelid \
             FROM pg_catalog.pg_attribute a WHERE a.attrelid = to_regclass($1::text) \
             AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            fingerprint_sql("to_regclass($1::text)")
        );
        let rows = client.query(&sql, &[&relation]).await.map_err(pg_err)?;
        if rows.is_empty() {
            return Err(schema_err(format!(
                "table {relation} does not exist or has no columns"
            )));
        }
        struct Attribute {
            name: String,
            oid: u32,
            sql_type: String,
            generated: bool,
        }
        let mut attributes = Vec::with_capacity(rows.len());
        let mut fingerprint = None;
        let mut oid = 0;
        for row in &rows {
            attributes.push(Attribute {
                name: row.try_get(0).map_err(pg_err)?,
                oid: row.try_get(1).map_err(pg_err)?,
                sql_type: row.try_get(2).map_err(pg_err)?,
                generated: row.try_get(3).map_err(pg_err)?,
            });
            fingerprint = row.try_get(4).map_err(pg_err)?;
            oid = row.try_get(5).map_err(pg_err)?;
        }
        let find = |name: &str, role: &str| -> Result<&Attribute, ReaderError> {
            let attribute = attributes.iter().find(|a| a.name == name).ok_or_else(|| {
                let names: Vec<&str> = attributes.iter().map(|a| a.name.as_str()).collect();
                schema_err(format!(
                    "{role} {name:?} is not a column of the table (it has {})",
                    names.join(", ")
                ))
            })?;
            if attribute.generated {
                return Err(schema_err(format!(
                    "{role} {name:?} is a generated column, which logical replication does \
                     not send, so the daemon cannot cache it"
                )));
            }
            Ok(attribute)
        };

        let names: Vec<&str> = match &self.rule.columns {
            Some(columns) => columns.iter().map(String::as_str).collect(),
            None => attributes
                .iter()
                .filter(|a| !a.generated)
                .map(|a| a.name.as_str())
                .collect(),
        };
        let mut columns = Vec::with_capacity(names.len());
        for name in names {
            let attribute = find(name, "column")?;
            let ty = PgType::resolve(client, attribute.oid)
                .await
                .map_err(pg_err)?;
            columns.push((attribute.name.clone(), ty));
        }
        let mut key_types = Vec::new();
        let mut key_columns = Vec::new();
        for name in self.rule.key.columns() {
            let attribute = find(name, "key column")?;
            key_types.push(attribute.sql_type.clone());
            key_columns.push(quote_ident(&attribute.name));
        }

        let mut head = String::from("SELECT k.o");
        for i in 0..key_columns.len() {
            let _ = write!(head, ", k.k{i}");
        }
        head.push_str(", t.ctid IS NOT NULL");
        for column in &key_columns {
            let _ = write!(head, ", t.{column}");
        }
        for (name, _) in &columns {
            let _ = write!(head, ", t.{}", quote_ident(name));
        }
        head.push_str(" FROM (VALUES ");

        let mut tail = String::from(") AS k(o");
        for i in 0..key_columns.len() {
            let _ = write!(tail, ", k{i}");
        }
        let _ = write!(tail, ") LEFT JOIN {relation} AS t ON ");
        for (i, column) in key_columns.iter().enumerate() {
            if i > 0 {
                tail.push_str(" AND ");
            }
            let _ = write!(tail, "t.{column} = k.k{i}");
        }
        Ok(Shape {
            columns,
            head,
            tail,
            key_types,
            oid,
            fingerprint,
        })
    }

    /// The read for `keys`: one row per key (a row of NULLs when the table has none).
    fn select_sql(&self, shape: &Shape, keys: &[KeyTexts]) -> Result<String, ReaderError> {
        let mut sql = String::with_capacity(shape.head.len() + shape.tail.len() + keys.len() * 32);
        sql.push_str(&shape.head);
        for (o, key) in keys.iter().enumerate() {
            if o > 0 {
                sql.push_str(", ");
            }
            let _ = write!(sql, "({o}");
            for ((text, sql_type), column) in key
                .texts
                .iter()
                .zip(&shape.key_types)
                .zip(self.rule.key.columns())
            {
                sql.push_str(", ");
                push_literal(&mut sql, text).map_err(|problem| ReaderError::BadKeyValue {
                    table: self.table.clone(),
                    column: column.clone(),
                    value: text.clone(),
                    problem,
                })?;
                sql.push_str("::");
                sql.push_str(sql_type);
            }
            sql.push(')');
        }
        sql.push_str(&shape.tail);
        Ok(sql)
    }

    /// The rows in key order, or `None` when the table's columns are no longer those of
    /// `shape` (the caller rebuilds it and reads again).
    fn parse(
        &self,
        shape: &Shape,
        keys: &[KeyTexts],
        messages: &[SimpleQueryMessage],
    ) -> Result<Option<Vec<Row>>, ReaderError> {
        let pg_err = |e| self.pg_error(e);
        let nk = shape.key_types.len();
        let nc = shape.columns.len();
        let width = 1 + nk + 1 + nk + nc;
        let rows = messages.iter().filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        });
        if let Some(first) = rows.clone().next() {
            if first.len() != width {
                return Ok(None);
            }
        }
        let columns: Vec<(&str, &PgType)> =
            shape.columns.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut out: Vec<Row> = vec![None; keys.len()];
        let mut matches = vec![0usize; keys.len()];
        for row in rows {
            let o: usize = row
                .try_get(0)
                .map_err(pg_err)?
                .and_then(|o| o.parse().ok())
                .filter(|&o| o < keys.len())
                .ok_or_else(|| ReaderError::Schema {
                    table: self.table.clone(),
                    problem: "the read returned a row for no key asked for".to_string(),
                })?;
            let key = &keys[o];
            let non_canonical = |i: usize, canonical: &str| ReaderError::NonCanonicalKey {
                table: self.table.clone(),
                column: self.rule.key.columns()[i].clone(),
                given: key.texts[i].clone(),
                canonical: canonical.to_string(),
            };
            for i in 0..nk {
                let canonical = row.try_get(1 + i).map_err(pg_err)?.unwrap_or_default();
                if canonical != key.texts[i] {
                    return Err(non_canonical(i, canonical));
                }
            }
            if row.try_get(1 + nk).map_err(pg_err)? != Some("t") {
                continue;
            }
            matches[o] += 1;
            if matches[o] > 1 {
                return Err(ReaderError::KeyNotUnique {
                    table: self.table.clone(),
                    key: key.redis_key.clone(),
                    rows: matches[o],
                });
            }
            // Equal is not always identical: citext, numeric scale, -0 for floats.
            for i in 0..nk {
                let stored = row.try_get(2 + nk + i).map_err(pg_err)?.unwrap_or_default();
                if stored != key.texts[i] {
                    return Err(non_canonical(i, stored));
                }
            }
            let mut values = Vec::with_capacity(nc);
            for j in 0..nc {
                values.push(row.try_get(2 + 2 * nk + j).map_err(pg_err)?);
            }
            let mut json = Vec::with_capacity(
                64 + values.iter().flatten().map(|v| v.len() + 8).sum::<usize>(),
            );
            if self.rule.format == Format::Hash {
                // A hash's fields as the daemon writes them, carried as a JSON object of
                // strings (NULL columns have no field).
                encode_fields(&mut json, &columns, &values, self.rule.encode).map_err(
                    |source| ReaderError::Encode {
                        table: self.table.clone(),
                        key: key.redis_key.clone(),
                        source,
                    },
                )?;
                out[o] = Some(json);
                continue;
            }
            encoder::encode_row(
                &mut json,
                &columns,
                values.iter().map(|v| v.map(str::as_bytes)),
                self.rule.encode,
            )
            .map_err(|source| ReaderError::Encode {
                table: self.table.clone(),
                key: key.redis_key.clone(),
                source,
            })?;
            out[o] = Some(json);
        }
        Ok(Some(out))
    }
}

pub(crate) use crate::sql::{push_literal, quote_ident};

/// A hash row's fields (each column's `encode_field` text, NULLs left out) as a JSON object
/// of strings, in column order: how the reader carries a hash between Postgres, Redis and
/// the caller.
fn encode_fields(
    out: &mut Vec<u8>,
    columns: &[(&str, &PgType)],
    values: &[Option<&str>],
    opts: encoder::EncodeOptions,
) -> Result<(), encoder::EncodeError> {
    let mut map = Vec::with_capacity(columns.len());
    for ((name, ty), value) in columns.iter().zip(values) {
        if let Some(text) = value {
            let mut field = Vec::with_capacity(text.len());
            encoder::encode_field(&mut field, ty, text.as_bytes(), opts)?;
            map.push((*name, String::from_utf8_lossy(&field).into_owned()));
        }
    }
    super::hash::write_fields(out, map.iter().map(|(n, v)| (*n, v.as_str())));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        let lit = |s: &str| {
            let mut out = String::new();
            push_literal(&mut out, s).map(|()| out)
        };
        assert_eq!(lit("42").unwrap(), "E'42'");
        assert_eq!(lit("it's").unwrap(), "E'it''s'");
        assert_eq!(lit(r"a\b").unwrap(), r"E'a\\b'");
        assert_eq!(
            lit(r"\'; DROP TABLE t; --").unwrap(),
            r"E'\\''; DROP TABLE t; --'"
        );
        assert_eq!(lit("é☃").unwrap(), "E'é☃'");
        assert!(lit("a\0b").unwrap_err().contains("NUL"));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("users"), "\"users\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn fingerprint_names_the_relation() {
        let sql = &*FINGERPRINT_BY_OID;
        assert!(sql.starts_with("SELECT (SELECT string_agg("), "{sql}");
        assert!(sql.contains("a.attrelid = $1::oid"), "{sql}");
        assert!(sql.contains("a.attgenerated = ''"), "{sql}");
    }
}
