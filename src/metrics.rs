//! Metric names, recorded through the `metrics` facade so any exporter works. The daemon
//! installs a Prometheus exporter; the read helper leaves the choice to the application
//! (with the `metrics` feature; see [`reader::stats`](crate::reader::stats)).

pub const CHANGES: &str = "pgcache_changes_total";
pub const TRANSACTIONS: &str = "pgcache_transactions_total";
pub const STREAMED_TRANSACTIONS: &str = "pgcache_streamed_transactions_total";
pub const BATCHES: &str = "pgcache_batches_total";
pub const BATCH_OPS: &str = "pgcache_batch_operations";
pub const EXEC_SECONDS: &str = "pgcache_redis_exec_seconds";
pub const REPLICA_WAIT_SECONDS: &str = "pgcache_redis_replica_wait_seconds";
pub const APPLY_LATENCY: &str = "pgcache_apply_latency_seconds";
pub const LAG_BYTES: &str = "pgcache_replication_lag_bytes";
pub const CONFIRMED_LSN: &str = "pgcache_confirmed_lsn";
pub const ERRORS: &str = "pgcache_errors_total";
pub const RECONNECTS: &str = "pgcache_reconnects_total";
pub const BACKFILL_ROWS: &str = "pgcache_backfill_rows_total";
pub const VISIBILITY_WAIT: &str = "pgcache_visibility_wait_seconds";
pub const REPAIRS: &str = "pgcache_repairs_total";
pub const FENCED: &str = "pgcache_fenced_total";

/// Registers descriptions, so exporters print help text.
#[cfg(feature = "metrics")]
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        CHANGES,
        "Row changes applied to Redis, by table and operation"
    );
    describe_counter!(TRANSACTIONS, "Postgres transactions applied");
    describe_counter!(
        STREAMED_TRANSACTIONS,
        "Postgres transactions streamed while in progress, spooled and applied at commit"
    );
    describe_counter!(BATCHES, "MULTI/EXEC batches written to Redis");
    describe_histogram!(BATCH_OPS, "Operations per batch");
    describe_histogram!(
        REPLICA_WAIT_SECONDS,
        Unit::Seconds,
        "Time from a write to its acknowledgement by redis.wait_replicas replicas (WAIT)"
    );
    describe_histogram!(
        EXEC_SECONDS,
        Unit::Seconds,
        "Time to write one batch and get its EXEC reply"
    );
    describe_histogram!(
        APPLY_LATENCY,
        Unit::Seconds,
        "Commit in Postgres to EXEC acknowledged by Redis"
    );
    describe_gauge!(
        LAG_BYTES,
        Unit::Bytes,
        "WAL the server has sent past the confirmed position"
    );
    describe_gauge!(
        CONFIRMED_LSN,
        "Last position confirmed to Postgres, as a number"
    );
    describe_counter!(
        ERRORS,
        "Errors by kind (rule, change, too_large, key_too_large, redis, postgres, redis_data_lost, postgres_data_lost, control)"
    );
    describe_histogram!(
        VISIBILITY_WAIT,
        Unit::Seconds,
        "Time a batch waited for its commits to become visible to other sessions"
    );
    describe_counter!(
        REPAIRS,
        "Keys deleted because their new value could not be built and then read again from Postgres, by table"
    );
    describe_counter!(
        FENCED,
        "Batches refused because another daemon took the slot over"
    );
    describe_counter!(BACKFILL_ROWS, "Rows written by backfills, by table");
    describe_counter!(RECONNECTS, "Sessions ended by a failure and restarted");
}
