//! What can go wrong for a caller of the read helper.
//!
//! Redis failures are not here on purpose: a lookup that cannot use Redis reads Postgres
//! instead (G7). Only the lower-level lease API, whose whole point is Redis, reports them.
//! Sources are behind `Arc` so that one error can be handed to every caller that shared a
//! database read (single flight).

use std::sync::Arc;

use crate::encoder::EncodeError;
use crate::pgconn::PgTargetError;

/// An error from [`Reader`](super::Reader).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ReaderError {
    /// The table has no rule in the configuration.
    #[error("no table rule for {name:?}; configured tables: {known}")]
    UnknownTable { name: String, known: String },

    /// An unqualified table name that more than one rule could mean.
    #[error("table name {name:?} is ambiguous ({candidates}); write it schema-qualified")]
    AmbiguousTable { name: String, candidates: String },

    /// The key has a different number of values than the template has columns.
    #[error("{table}: key template {template:?} takes {expected} value(s) ({columns}), got {got}")]
    KeyArity {
        table: String,
        template: String,
        columns: String,
        expected: usize,
        got: usize,
    },

    /// A key value that cannot be a value of its column.
    #[error("{table}: key value {value:?} for column {column:?} is not usable: {problem}")]
    BadKeyValue {
        table: String,
        column: String,
        value: String,
        problem: String,
    },

    /// The key value names a row, but Postgres prints the value differently, so the daemon
    /// would keep that row under another key. Filling this key would leave a copy that no
    /// change ever updates, so the row is not read.
    #[error(
        "{table}: key value {given:?} for column {column:?} is not in its canonical form \
         {canonical:?} (pass key values exactly as Postgres prints them)"
    )]
    NonCanonicalKey {
        table: String,
        column: String,
        given: String,
        canonical: String,
    },

    /// More than one row matches the key: the template does not identify a row.
    #[error("{table}: {rows} rows match key {key:?}; the key template must name a unique key")]
    KeyNotUnique {
        table: String,
        key: String,
        rows: usize,
    },

    /// The table or a column the rule names does not exist (or cannot be cached).
    #[error("{table}: {problem}")]
    Schema { table: String, problem: String },

    /// No Postgres connection could be had (server down, pool exhausted, bad credentials).
    /// The message names the underlying cause ("Connection refused", the server's
    /// authentication error...), not only the pool's summary of it.
    #[error("{table}: cannot get a Postgres connection: {}", pool_error_text(.source))]
    PostgresUnavailable {
        table: String,
        #[source]
        source: Arc<deadpool_postgres::PoolError>,
    },

    /// A query failed.
    #[error("{table}: Postgres query failed: {source}")]
    Postgres {
        table: String,
        #[source]
        source: Arc<tokio_postgres::Error>,
    },

    /// A row value could not be encoded (the stream would have failed the same way).
    #[error("{table}: cannot encode the row for key {key:?}: {source}")]
    Encode {
        table: String,
        key: String,
        #[source]
        source: EncodeError,
    },

    /// The cached or read value does not deserialize into the caller's type.
    #[error("{table}: the value of key {key:?} does not fit the requested type: {source}")]
    Decode {
        table: String,
        key: String,
        #[source]
        source: Arc<serde_json::Error>,
    },

    /// A Redis command of the lease API failed (the high-level calls never return this).
    #[error("Redis command on {key:?} failed: {source}")]
    Redis {
        key: String,
        #[source]
        source: redis::RedisError,
    },

    /// The Postgres connection string or TLS settings are unusable.
    #[error("invalid Postgres settings: {0}")]
    PostgresConfig(Arc<PgTargetError>),

    /// The Redis URL is unusable.
    #[error("invalid Redis settings: {0}")]
    RedisConfig(redis::RedisError),

    /// The daemon did not apply the WAL up to a position within the time allowed
    /// ([`Reader::wait_applied`](super::Reader::wait_applied)): it is stopped, far behind,
    /// or configured with another slot or key prefix than the reader.
    #[error(
        "the daemon has not applied the WAL up to {position} after {waited:?} (its checkpoint \
         is at {}); is it running and caught up, with this reader's slot and key prefix?",
        applied.map_or_else(|| "no position: no checkpoint in Redis".to_string(), |a| a.to_string())
    )]
    NotApplied {
        position: crate::Lsn,
        applied: Option<crate::Lsn>,
        waited: std::time::Duration,
    },

    /// The reader's own options are unusable.
    #[error("invalid reader option: {0}")]
    Options(String),

    /// A computed value ([`Reader::get_with`](super::Reader::get_with)) could not be
    /// loaded: the loader failed (its error is the source), or the WAL position to fill
    /// under could not be read. Nothing was cached.
    #[error("loading {key:?} failed: {source}")]
    Loader {
        key: String,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
}

impl ReaderError {
    /// Whether the error comes from a server being unreachable or failing, so that retrying
    /// later may succeed (as opposed to a mistake in the call or the configuration).
    pub fn is_unavailable(&self) -> bool {
        match self {
            ReaderError::PostgresUnavailable { .. }
            | ReaderError::Redis { .. }
            | ReaderError::NotApplied { .. } => true,
            ReaderError::Postgres { source, .. } => source.as_db_error().is_none(),
            _ => false,
        }
    }
}

/// What went wrong getting a pooled connection, in words that name the cause: the pool's
/// own message for a backend error ("Error occurred while creating a new object") hides
/// it in the source chain.
fn pool_error_text(error: &deadpool_postgres::PoolError) -> String {
    use deadpool_postgres::{PoolError, TimeoutType};
    match error {
        PoolError::Backend(e) => chain(e),
        PoolError::Timeout(TimeoutType::Create) => {
            "connecting timed out (postgres_timeout)".to_string()
        }
        PoolError::Timeout(TimeoutType::Wait) => {
            "no pooled connection became free in time (postgres_timeout; pool_size may be too \
             small)"
                .to_string()
        }
        other => chain(other),
    }
}

/// `error` and each of its sources, joined with ": ", leaving out a source whose text the
/// message already holds.
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_names_every_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let refused = io.to_string();
        #[derive(Debug, thiserror::Error)]
        #[error("error connecting to server")]
        struct Outer(#[source] std::io::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped: {0}")]
        struct Repeats(#[source] std::io::Error);
        assert_eq!(
            chain(&Outer(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused
            ))),
            format!("error connecting to server: {refused}")
        );
        assert_eq!(chain(&Repeats(io)), format!("wrapped: {refused}"));
    }
}
