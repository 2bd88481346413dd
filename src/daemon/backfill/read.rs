//! The reads between a chunk's watermarks: rows by primary key (the backfill), rows by key
//! (repairs), and which cached keys no longer have a row (reconciles). Each read runs in a
//! `REPEATABLE READ` transaction whose snapshot it returns, so the caller can check that the
//! snapshot shows every transaction the stream had brought before the chunk started.

use std::collections::HashMap;

use futures_util::StreamExt;
use tokio_postgres::Client;
use tracing::warn;

use super::copy_text;
use super::plan::{RowValue, TablePlan};
use super::BackfillError;
use crate::daemon::visibility::Snapshot;
use crate::sql::literal;

/// What one read found.
#[derive(Debug, Default)]
pub struct ChunkRead {
    /// Encoded rows by Redis key.
    pub rows: HashMap<String, RowValue>,
    /// Keys whose rows are gone (reconciles).
    pub deletes: Vec<String>,
    /// Primary key of the last row kept (backfills); `None` when no row was read.
    pub cursor: Option<Vec<String>>,
    /// Rows kept, and their encoded bytes.
    pub read: usize,
    pub bytes: usize,
    /// The table is done after this chunk.
    pub last: bool,
    /// Rows read past the byte limit and dropped (read again by the next chunk).
    pub dropped_rows: usize,
    /// Reconciles: where the scan of the table's keys goes on (`None`: it is done).
    pub scan: Option<String>,
    /// The snapshot the read saw.
    pub snapshot: Option<Snapshot>,
}

/// Runs `read` inside a `REPEATABLE READ` transaction and returns its snapshot with it.
async fn in_snapshot<'a, F, Fut>(
    client: &'a Client,
    table: &str,
    read: F,
) -> Result<ChunkRead, BackfillError>
where
    F: FnOnce(&'a Client) -> Fut,
    Fut: std::future::Future<Output = Result<ChunkRead, BackfillError>>,
{
    let pg = |source| BackfillError::Postgres {
        table: table.to_string(),
        source,
    };
    // One round trip: the transaction starts, and its snapshot is taken and returned.
    let opened = client
        .simple_query(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT pg_current_snapshot()::text",
        )
        .await
        .map_err(pg)?;
    let text = opened.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
        _ => None,
    });
    let result = async {
        let mut chunk = read(client).await?;
        chunk.snapshot = text.as_deref().and_then(Snapshot::parse);
        Ok(chunk)
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    client.batch_execute(end).await.map_err(pg)?;
    result
}

impl TablePlan {
    /// Reads the next chunk after `cursor`: at most `limit` rows, and no more rows once
    /// `max_bytes` of values are held (the rest of the chunk is read again next time).
    ///
    /// # Errors
    /// A failed query. Rows that cannot be keyed or encoded are skipped with a warning:
    /// their keys stay absent, which is safe.
    pub async fn read_chunk(
        &self,
        client: &Client,
        cursor: Option<&[String]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<ChunkRead, BackfillError> {
        let mut sql = format!("COPY ({}", self.select);
        if let Some(cursor) = cursor {
            sql.push_str(" WHERE ");
            sql.push_str(&self.pk_tuple);
            sql.push_str(" > (");
            for (i, ((_, sql_type), value)) in self.pk.iter().zip(cursor).enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&literal(value));
                sql.push_str("::");
                sql.push_str(sql_type);
            }
            sql.push(')');
        }
        sql.push_str(&format!(
            " ORDER BY {} LIMIT {limit}) TO STDOUT",
            self.order_by
        ));
        in_snapshot(client, &self.rule.qualified_name(), |client| async move {
            let mut chunk = self.copy_rows(client, &sql, Some(max_bytes), limit).await?;
            chunk.last = chunk.read < limit && chunk.cursor_complete();
            Ok(chunk)
        })
        .await
    }

    /// Reads the rows with these key template values (repairs). Keys without a row are
    /// left out.
    ///
    /// # Errors
    /// A failed query.
    pub async fn read_keys(
        &self,
        client: &Client,
        keys: &[Vec<String>],
    ) -> Result<ChunkRead, BackfillError> {
        let sql = format!(
            "COPY ({} WHERE ({}) IN ({})) TO STDOUT",
            self.select,
            self.key_columns
                .iter()
                .map(|(c, _)| c.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            self.key_tuples(keys)
        );
        in_snapshot(client, &self.rule.qualified_name(), |client| async move {
            let mut chunk = self.copy_rows(client, &sql, None, keys.len()).await?;
            chunk.cursor = None;
            chunk.last = true;
            Ok(chunk)
        })
        .await
    }

    /// Which of these keys (with their template values) have no row (reconciles).
    ///
    /// # Errors
    /// A failed query.
    pub async fn missing_keys(
        &self,
        client: &Client,
        keys: Vec<(String, Vec<String>)>,
    ) -> Result<ChunkRead, BackfillError> {
        let table = self.rule.qualified_name();
        if keys.is_empty() {
            return Ok(ChunkRead::default());
        }
        let mut values = String::new();
        for (i, (_, texts)) in keys.iter().enumerate() {
            if i > 0 {
                values.push_str(", ");
            }
            values.push_str(&format!("({i}"));
            for (text, (_, sql_type)) in texts.iter().zip(&self.key_columns) {
                values.push_str(&format!(", {}::{sql_type}", literal(text)));
            }
            values.push(')');
        }
        let names: Vec<String> = (0..self.key_columns.len())
            .map(|i| format!("k{i}"))
            .collect();
        let matches: Vec<String> = self
            .key_columns
            .iter()
            .zip(&names)
            .map(|((column, _), k)| format!("t.{column} = k.{k}"))
            .collect();
        let sql = format!(
            "SELECT k.o FROM (VALUES {values}) AS k(o, {}) WHERE NOT EXISTS \
             (SELECT 1 FROM {} AS t WHERE {})",
            names.join(", "),
            self.relation,
            matches.join(" AND ")
        );
        in_snapshot(client, &table.clone(), |client| async move {
            let rows = client
                .query(&sql, &[])
                .await
                .map_err(|source| BackfillError::Postgres {
                    table: table.clone(),
                    source,
                })?;
            let mut keys: Vec<Option<String>> = keys.into_iter().map(|(k, _)| Some(k)).collect();
            let deletes = rows
                .iter()
                .filter_map(|row| {
                    let at = usize::try_from(row.get::<_, i32>(0)).ok()?;
                    keys.get_mut(at)?.take()
                })
                .collect();
            Ok(ChunkRead {
                deletes,
                ..ChunkRead::default()
            })
        })
        .await
    }

    /// `(v1::t1, v2::t2), (...)` for an `IN` list of key template values.
    fn key_tuples(&self, keys: &[Vec<String>]) -> String {
        let mut out = String::new();
        for (i, texts) in keys.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push('(');
            for (j, (text, (_, sql_type))) in texts.iter().zip(&self.key_columns).enumerate() {
                if j > 0 {
                    out.push_str(", ");
                }
                out.push_str(&literal(text));
                out.push_str("::");
                out.push_str(sql_type);
            }
            out.push(')');
        }
        out
    }

    /// Runs a `COPY ... TO STDOUT` of the select list and encodes its rows, parsing as the
    /// data arrives. Past `max_bytes` of values, further rows are read off the wire and
    /// dropped; the cursor stays at the last row kept.
    async fn copy_rows(
        &self,
        client: &Client,
        sql: &str,
        max_bytes: Option<usize>,
        reserve: usize,
    ) -> Result<ChunkRead, BackfillError> {
        let table = || self.rule.qualified_name();
        let stream = client
            .copy_out(sql)
            .await
            .map_err(|source| BackfillError::Postgres {
                table: table(),
                source,
            })?;
        let mut stream = std::pin::pin!(stream);
        let mut chunk = ChunkRead::default();
        chunk.rows.reserve(reserve);
        let mut row = copy_text::Row::default();
        // The last kept row's primary key, in buffers reused from row to row.
        let mut cursor: Vec<Vec<u8>> = vec![Vec::new(); self.pk.len()];
        let mut carry: Vec<u8> = Vec::new();
        let mut full = false;
        while let Some(data) = stream.next().await {
            let data = data.map_err(|source| BackfillError::Postgres {
                table: table(),
                source,
            })?;
            if full {
                chunk.dropped_rows += memchr::memchr_iter(b'\n', &data).count();
                continue;
            }
            // Postgres sends a row per message; a row split across messages is joined.
            let text: &[u8] = if carry.is_empty() {
                &data
            } else {
                carry.extend_from_slice(&data);
                &carry
            };
            let mut start = 0;
            while let Some(end) = memchr::memchr(b'\n', &text[start..]) {
                let line = &text[start..start + end];
                start += end + 1;
                if full {
                    chunk.dropped_rows += 1;
                    continue;
                }
                self.keep_row(&mut row, line, &mut chunk, &mut cursor)?;
                full = max_bytes.is_some_and(|max| chunk.bytes >= max);
            }
            let rest = text[start..].to_vec();
            carry = rest;
        }
        if !carry.is_empty() {
            return Err(BackfillError::Table {
                table: table(),
                message: "COPY output does not end with a whole row".into(),
            });
        }
        if chunk.read > 0 {
            chunk.cursor = Some(
                cursor
                    .iter()
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .collect(),
            );
        }
        Ok(chunk)
    }

    fn keep_row(
        &self,
        row: &mut copy_text::Row,
        line: &[u8],
        chunk: &mut ChunkRead,
        cursor: &mut [Vec<u8>],
    ) -> Result<(), BackfillError> {
        let table = || self.rule.qualified_name();
        let fields = row
            .parse(line, self.width)
            .map_err(|e| BackfillError::Table {
                table: table(),
                message: format!("cannot read a row: {e}"),
            })?;
        chunk.read += 1;
        for ((at, _), value) in self.pk.iter().zip(cursor.iter_mut()) {
            value.clear();
            value.extend_from_slice(fields.get(*at).unwrap_or_default());
        }
        let Some(key_values) = self
            .key_at
            .iter()
            .map(|&at| fields.get(at))
            .collect::<Option<Vec<&[u8]>>>()
        else {
            warn!(table = %table(), "row with a NULL key column skipped");
            return Ok(());
        };
        let mut key = String::with_capacity(32);
        self.rule
            .key
            .render_into(&mut key, &self.key_prefix, &key_values);
        match self.encode(&fields) {
            Ok(value) => {
                chunk.bytes += key.len() + value.size();
                chunk.rows.insert(key, value);
            }
            Err(e) => warn!(table = %table(), %key, error = %e, "row not cached"),
        }
        Ok(())
    }
}

impl ChunkRead {
    /// No row was dropped for the byte limit.
    fn cursor_complete(&self) -> bool {
        self.dropped_rows == 0
    }
}
