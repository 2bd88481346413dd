//! SQL text and the catalog queries every part of pgcache shares: identifiers, literals, and
//! a table's columns as logical replication sends them.

use tokio_postgres::Client;

/// The server's code and message when there is one (`42501: permission denied for table
/// items`); tokio-postgres' own text says only "db error".
pub fn describe_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// `"name"` with inner quotes doubled.
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `"schema"."name"`.
pub fn quote_qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// `'text'` with inner quotes doubled: a standard-conforming string literal, as the
/// replication command grammar and `psql` scripts take them.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Appends `text` as an `E'...'` literal, which means the same whatever
/// `standard_conforming_strings` says.
///
/// # Errors
/// `text` holds a NUL, which Postgres text cannot.
pub fn push_literal(out: &mut String, text: &str) -> Result<(), String> {
    if text.contains('\0') {
        return Err("contains a NUL character, which Postgres text cannot hold".to_string());
    }
    out.reserve(text.len() + 3);
    out.push_str("E'");
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("''"),
            c => out.push(c),
        }
    }
    out.push('\'');
    Ok(())
}

/// `text` as an `E'...'` literal. For text that came from Postgres (which cannot hold NUL);
/// a NUL is dropped.
pub fn literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 3);
    if push_literal(&mut out, text).is_err() {
        out.clear();
        let _ = push_literal(&mut out, &text.replace('\0', ""));
    }
    out
}

/// One column of a table, from `pg_attribute`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// `format_type(atttypid, atttypmod)`: the type as SQL spells it, for casts.
    pub sql_type: String,
    /// Generated columns are not sent by logical replication.
    pub generated: bool,
}

/// A table's OID and its columns in `attnum` order, dropped ones left out; `None` when the
/// table does not exist. Logical replication sends exactly the columns that are not
/// generated, in this order.
pub async fn table_columns(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<Option<(u32, Vec<Attribute>)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.oid, a.attname::text, a.atttypid, a.atttypmod, \
                    format_type(a.atttypid, a.atttypmod), a.attgenerated <> '' \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_catalog.pg_attribute a \
                    ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             WHERE n.nspname = $1 AND c.relname = $2 ORDER BY a.attnum",
            &[&schema, &name],
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let oid: u32 = first.get(0);
    let columns = rows
        .iter()
        .filter(|row| row.get::<_, Option<String>>(1).is_some())
        .map(|row| Attribute {
            name: row.get(1),
            type_oid: row.get(2),
            type_modifier: row.get(3),
            sql_type: row.get(4),
            generated: row.get(5),
        })
        .collect();
    Ok(Some((oid, columns)))
}

/// Whether the publication publishes inserts, updates, deletes and truncates (`None`: there
/// is no such publication).
pub async fn publication_publishes_all(
    client: &Client,
    publication: &str,
) -> Result<Option<bool>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate \
             FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .map(|row| row.get(0)))
}

/// The table `schema.name` as the catalog has it now (`None`: no such table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableIdentity {
    pub oid: u32,
    /// The publication carries it (itself, or as the root its partitions publish through).
    pub published: bool,
    /// The publication's row filter for it, if it has one (Postgres 15+).
    pub row_filter: Option<String>,
}

/// See [`TableIdentity`].
pub async fn table_identity(
    client: &Client,
    schema: &str,
    name: &str,
    publication: &str,
) -> Result<Option<TableIdentity>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT c.oid, t.tablename IS NOT NULL, t.rowfilter \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_catalog.pg_publication_tables t \
                    ON t.pubname = $3 AND t.schemaname = $1 AND t.tablename = $2 \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &name, &publication],
        )
        .await?;
    Ok(row.map(|row| TableIdentity {
        oid: row.get(0),
        published: row.get(1),
        row_filter: row.get(2),
    }))
}

/// The top of the partition tree `oid` belongs to, as (schema, name), when `oid` is a
/// partition (not the root itself).
pub async fn partition_root(
    client: &Client,
    oid: u32,
) -> Result<Option<(String, String)>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = pg_catalog.pg_partition_root($1::pg_catalog.oid) \
               AND c.oid <> $1::pg_catalog.oid",
            &[&oid],
        )
        .await?;
    Ok(row.map(|row| (row.get(0), row.get(1))))
}

/// The primary key columns of a table (by OID), in key order; empty when it has none.
pub async fn primary_key_columns(
    client: &Client,
    table_oid: u32,
) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.n",
            &[&table_oid],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Whether `synchronous_standby_names` (its text) lists a walsender with this
/// `application_name`: by name (compared as Postgres does, ignoring case) or as `*`, in any
/// of the setting's forms (`a, b`, `FIRST 2 (a, b)`, `ANY 1 (a, "b")`, `2 (a, b)`).
pub fn lists_standby(setting: &str, application_name: &str) -> bool {
    let setting = setting.trim();
    let list = match (setting.find('('), setting.rfind(')')) {
        (Some(open), Some(close)) if open < close => &setting[open + 1..close],
        _ => setting,
    };
    list.split(',').map(str::trim).any(|item| {
        let name = match item.strip_prefix('"').and_then(|i| i.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\""),
            None => item.to_string(),
        };
        name == "*" || name.eq_ignore_ascii_case(application_name)
    })
}

/// The error to stop with when `synchronous_standby_names` lists pgcache's replication
/// connection: commits would wait for pgcache to confirm them, while pgcache applies a
/// commit only once other sessions can see it, so, with no other standby answering first,
/// every commit on the server would wait for good. `None` when it does not.
pub async fn synchronous_standby_problem(
    client: &Client,
    application_name: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    let setting: String = client
        .query_one("SELECT current_setting('synchronous_standby_names')", &[])
        .await?
        .get(0);
    Ok(lists_standby(&setting, application_name).then(|| {
        format!(
            "synchronous_standby_names = '{setting}' makes pgcache's replication connection \
             (application_name {application_name:?}) a synchronous standby: commits would \
             wait for pgcache to confirm them, while pgcache applies a commit only once other \
             sessions can see it, so commits could wait for good. List the standbys by name \
             in synchronous_standby_names (not '*'), or give pgcache an application_name it \
             does not list (postgres.url ...?application_name=...), then restart"
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synchronous_standby_names_are_read_in_every_form() {
        for (setting, listed) in [
            ("", false),
            ("*", true),
            ("s1, s2", false),
            ("s1, PgCache", true),
            ("FIRST 1 (s1, *)", true),
            ("ANY 2 (s1, \"pgcache\")", true),
            ("2 (s1, s2)", false),
            ("first 1 (\"pg cache\")", false),
            ("nobody", false),
        ] {
            assert_eq!(lists_standby(setting, "pgcache"), listed, "{setting:?}");
        }
        assert!(lists_standby("FIRST 1 (\"pg cache\")", "pg cache"));
    }

    #[test]
    fn identifiers_double_their_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_qualified("s", "t"), "\"s\".\"t\"");
    }

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(literal("o'k\\"), "E'o''k\\\\'");
        let mut out = String::new();
        assert!(push_literal(&mut out, "a\0b").is_err());
        assert_eq!(literal("a\0b"), "E'ab'");
    }
}
