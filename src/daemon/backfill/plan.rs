//! How to read one table's rows the way the stream sees them: the select list, the key and
//! primary key columns, and each cached column's encoder, looked up in the catalog once per
//! backfill of the table.

use std::sync::Arc;

use tokio_postgres::Client;

use super::copy_text;
use super::BackfillError;
use crate::config::{Format, TableRule};
use crate::encoder::{self, PgType};
use crate::sql::{self, quote_ident, quote_qualified};

/// How to read one table's rows.
pub struct TablePlan {
    pub rule: Arc<TableRule>,
    pub(super) key_prefix: String,
    /// `<key prefix><literal prefix of the template>`: every key of the table starts so.
    pub key_space: String,
    /// Cached columns, in the daemon's output order, with the select-list index of each.
    columns: Vec<(String, PgType)>,
    column_at: Vec<usize>,
    /// Select-list index of each key template column, in template order.
    pub(super) key_at: Vec<usize>,
    /// The key template's columns, quoted, and their SQL types (for casting key values).
    pub(super) key_columns: Vec<(String, String)>,
    /// Primary key columns: select-list index and SQL type (for casting the cursor).
    pub(super) pk: Vec<(usize, String)>,
    /// `SELECT ... FROM t` (no WHERE / ORDER BY / LIMIT).
    pub(super) select: String,
    /// `"schema"."table"`.
    pub(super) relation: String,
    /// Columns in the select list.
    pub(super) width: usize,
    pub(super) order_by: String,
    pub(super) pk_tuple: String,
    /// Rows estimated from `pg_class.reltuples`.
    pub estimate: u64,
}

/// A row's value in the table's format.
#[derive(Debug, Clone, PartialEq)]
pub enum RowValue {
    Json(Vec<u8>),
    Hash(Vec<(String, Vec<u8>)>),
}

impl RowValue {
    pub fn size(&self) -> usize {
        match self {
            RowValue::Json(v) => v.len(),
            RowValue::Hash(fields) => fields.iter().map(|(f, v)| f.len() + v.len()).sum(),
        }
    }
}

/// The columns a backfill query selects, each once whatever roles it plays (cached, key,
/// primary key).
struct SelectList<'a> {
    /// The table's columns as pgoutput sends them (generated ones left out).
    all: Vec<&'a sql::Attribute>,
    names: Vec<String>,
}

impl<'a> SelectList<'a> {
    fn attribute(&self, name: &str) -> Result<&'a sql::Attribute, String> {
        self.all
            .iter()
            .copied()
            .find(|a| a.name == name)
            .ok_or_else(|| format!("the table has no column {name:?}"))
    }

    /// The column's index in the select list, adding it on first use.
    fn at(&mut self, name: &str) -> Result<usize, String> {
        self.attribute(name)?;
        if let Some(at) = self.names.iter().position(|n| n == name) {
            return Ok(at);
        }
        self.names.push(name.to_string());
        Ok(self.names.len() - 1)
    }

    fn at_all(&mut self, names: &[String]) -> Result<Vec<usize>, String> {
        names.iter().map(|n| self.at(n)).collect()
    }
}

impl TablePlan {
    /// Looks the table up in the catalog.
    ///
    /// # Errors
    /// A missing table or column, a table without a primary key, a failed query.
    pub async fn new(
        client: &Client,
        rule: Arc<TableRule>,
        key_prefix: &str,
    ) -> Result<TablePlan, BackfillError> {
        let table = rule.qualified_name();
        let pg = |source| BackfillError::Postgres {
            table: table.clone(),
            source,
        };
        let fail = |message: String| BackfillError::Table {
            table: table.clone(),
            message,
        };
        let Some((oid, attributes)) = sql::table_columns(client, &rule.schema, &rule.name)
            .await
            .map_err(pg)?
        else {
            return Err(fail("the table does not exist".into()));
        };
        let estimate = row_estimate(client, oid).await.map_err(pg)?;
        let pk_names = sql::primary_key_columns(client, oid).await.map_err(pg)?;
        if pk_names.is_empty() {
            return Err(fail(
                "the table has no primary key, which backfill pages by; add one".into(),
            ));
        }
        let mut list = SelectList {
            all: attributes.iter().filter(|a| !a.generated).collect(),
            names: Vec::new(),
        };
        let names: Vec<String> = match &rule.columns {
            Some(columns) => columns.clone(),
            None => list.all.iter().map(|a| a.name.clone()).collect(),
        };
        let column_at = list.at_all(&names).map_err(&fail)?;
        let key_at = list.at_all(rule.key.columns()).map_err(&fail)?;
        let pk = pk_names
            .iter()
            .map(|n| Ok((list.at(n)?, list.attribute(n)?.sql_type.clone())))
            .collect::<Result<Vec<_>, String>>()
            .map_err(&fail)?;
        let key_columns = rule
            .key
            .columns()
            .iter()
            .map(|n| Ok((quote_ident(n), list.attribute(n)?.sql_type.clone())))
            .collect::<Result<Vec<_>, String>>()
            .map_err(&fail)?;
        let mut columns = Vec::with_capacity(names.len());
        for name in &names {
            let oid = list.attribute(name).map_err(&fail)?.type_oid;
            let ty = match PgType::from_oid(oid) {
                Some(ty) => ty,
                None => PgType::resolve(client, oid).await.map_err(pg)?,
            };
            columns.push((name.clone(), ty));
        }
        let relation = quote_qualified(&rule.schema, &rule.name);
        let select = format!(
            "SELECT {} FROM {relation}",
            list.names
                .iter()
                .map(|n| quote_ident(n))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let pk_cols: Vec<String> = pk_names.iter().map(|n| quote_ident(n)).collect();
        Ok(TablePlan {
            key_space: rule.key_space(key_prefix),
            rule,
            key_prefix: key_prefix.to_string(),
            columns,
            column_at,
            key_at,
            key_columns,
            pk,
            select,
            relation,
            width: list.names.len(),
            order_by: pk_cols.join(", "),
            pk_tuple: format!("({})", pk_cols.join(", ")),
            estimate,
        })
    }

    /// Encodes one row read by COPY as the stream would.
    pub(super) fn encode(
        &self,
        row: &copy_text::Fields<'_>,
    ) -> Result<RowValue, encoder::EncodeError> {
        match self.rule.format {
            Format::Json => {
                let mut value = Vec::with_capacity(128);
                encoder::encode_row(
                    &mut value,
                    &self.columns,
                    self.column_at.iter().map(|&at| row.get(at)),
                    self.rule.encode,
                )?;
                Ok(RowValue::Json(value))
            }
            Format::Hash => {
                let mut fields = Vec::with_capacity(self.columns.len());
                for ((name, ty), &at) in self.columns.iter().zip(&self.column_at) {
                    if let Some(text) = row.get(at) {
                        let mut field = Vec::with_capacity(text.len());
                        encoder::encode_field(&mut field, ty, text, self.rule.encode)?;
                        fields.push((name.to_string(), field));
                    }
                }
                Ok(RowValue::Hash(fields))
            }
        }
    }
}

/// Rows estimated from `pg_class.reltuples` (partitioned roots have none of their own: the
/// partitions are summed).
async fn row_estimate(client: &Client, oid: u32) -> Result<u64, tokio_postgres::Error> {
    let estimate: i64 = client
        .query_one(
            "SELECT greatest(c.reltuples, 0)::int8 + coalesce((SELECT sum(greatest(p.reltuples, 0)) \
             FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid WHERE i.inhparent = c.oid), 0)::int8 \
             FROM pg_class c WHERE c.oid = $1",
            &[&oid],
        )
        .await?
        .get(0);
    Ok(estimate.max(0) as u64)
}
