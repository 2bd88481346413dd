//! Wall clocks in the units pgcache records: Unix milliseconds for its own fields, and
//! microseconds since the Postgres epoch (2000-01-01 UTC) for commit timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds from the Unix epoch to the Postgres epoch, 2000-01-01 00:00:00 UTC.
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Microseconds since the Postgres epoch, as commit timestamps and status messages count.
pub fn pg_now_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix - PG_EPOCH_UNIX_MICROS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_postgres_epoch_is_2000() {
        // 2000-01-01 is 10,957 days after 1970-01-01.
        assert_eq!(PG_EPOCH_UNIX_MICROS, 10_957 * 86_400 * 1_000_000);
        assert!(pg_now_micros() > 0);
        assert!(now_ms() > 1_600_000_000_000);
    }
}
