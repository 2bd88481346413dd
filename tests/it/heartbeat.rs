//! Retained WAL with an idle published database (issue 16 item 4): with nothing written to
//! the published tables, or nothing at all to this database while another database of the
//! cluster writes WAL, the slot's positions still move, so the WAL it retains stays
//! bounded.
//!
//! The walsender decodes the whole cluster's WAL (and skips what is not this database's or
//! not published); when it has caught up it sends a keepalive with the position it reached.
//! The daemon, with nothing of its own pending, writes that position to the checkpoint and
//! confirms it once Redis holds it (`stream.rs`, the keepalive handler): the keepalive is
//! the heartbeat. `restart_lsn`, which decides what WAL Postgres keeps, follows
//! `confirmed_flush_lsn` at the next `xl_running_xacts` record (every 15 s from the
//! background writer, and at every checkpoint): the tests run `CHECKPOINT` while they load,
//! so that this happens within seconds.

use std::time::{Duration, Instant};

use crate::common::{wait_backfill_done, Daemon, Env};

const SCHEMA: &str = "CREATE TABLE items (id int PRIMARY KEY, name text);
    INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 5) i;
    CREATE TABLE unpublished (id bigserial PRIMARY KEY, v text);";
const RULES: &str = "[[tables]]\ntable = \"public.items\"\nkey = \"item:{id}\"\n";
const MB: i64 = 1024 * 1024;

/// WAL between the server's position and the slot's `confirmed_flush_lsn`, and its
/// `restart_lsn`; and the server's position.
fn slot_lag(env: &Env) -> (i64, i64, i64) {
    let row = env.sql(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 || ' ' || \
                pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 || ' ' || \
                pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8 \
         FROM pg_replication_slots WHERE slot_name = 'pgcache'",
    );
    let mut parts = row
        .split(' ')
        .map(|p| p.parse::<i64>().unwrap_or_else(|_| panic!("{row:?}")));
    let mut next = || parts.next().unwrap_or_else(|| panic!("{row:?}"));
    (next(), next(), next())
}

/// Runs `load` (one statement's worth of WAL, about 0.6 MB) over and over until 96 MB of
/// WAL were written, with a `CHECKPOINT` every 8 MB; then asserts that the slot followed:
/// its confirmed position never fell more than 16 MB behind after the first 8 MB, and its
/// restart position moved past where the load started and ends less than 32 MB behind.
/// Without the daemon confirming, both would stay where the load started (96 MB behind).
fn assert_retention_bounded(env: &Env, what: &str, load: impl Fn()) {
    let (_, _, start) = slot_lag(env);
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut worst_confirmed = 0;
    let mut last_checkpoint = start;
    let mut samples = Vec::new();
    loop {
        load();
        let (confirmed, restart, now) = slot_lag(env);
        samples.push(format!(
            "written {:>4} MB: confirmed {confirmed:>9} B behind, restart {restart:>9} B behind",
            (now - start) / MB
        ));
        if now - start > 8 * MB {
            worst_confirmed = worst_confirmed.max(confirmed);
        }
        if now - last_checkpoint > 8 * MB {
            env.sql("CHECKPOINT");
            last_checkpoint = now;
        }
        if now - start > 96 * MB {
            let restart_at = now - restart;
            assert!(
                worst_confirmed < 16 * MB && restart_at > start && restart < 32 * MB,
                "{what}: the slot did not follow (worst confirmed lag {worst_confirmed} B, \
                 restart lag {restart} B, restart at {restart_at}, load started at {start}):\n{}",
                samples.join("\n")
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the load took too long:\n{}",
            samples.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_published_database_does_not_pin_wal() {
    let env = Env::start(SCHEMA, "public.items");
    env.pg.create_database("busy").unwrap();
    env.pg
        .psql(
            "busy",
            "CREATE TABLE load (id bigserial PRIMARY KEY, v text)",
        )
        .unwrap();
    let config = env.write_config(RULES);
    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::spawn(&config, &log);
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(30)).await;

    // Another database writes; nothing at all is written to this one.
    assert_retention_bounded(&env, "a busy second database", || {
        env.pg
            .psql(
                "busy",
                "INSERT INTO load (v) SELECT repeat('x', 200) FROM generate_series(1, 2000)",
            )
            .unwrap();
    });
    // This database writes, but only to a table outside the publication.
    assert_retention_bounded(&env, "an unpublished table", || {
        env.sql(
            "INSERT INTO unpublished (v) SELECT repeat('x', 200) FROM generate_series(1, 2000)",
        );
    });
    // And the published table still streams.
    env.sql("UPDATE items SET name = 'after' WHERE id = 1");
    crate::common::wait_for_json(
        &mut r,
        "item:1",
        Some(serde_json::json!({"id": 1, "name": "after"})),
    )
    .await;
    assert!(daemon.terminate().success(), "{}", daemon.log());
}

/// A write that Redis holds up longer than the server's `wal_sender_timeout`, while the
/// batch behind it is full (so the stream is not read and the walsender's keepalive
/// requests go unanswered): the daemon's status updates, sent at a third of that timeout,
/// keep the replication connection. Before, they went every 10 s whatever the timeout, and
/// with `wal_sender_timeout = 2s` the server dropped the connection during the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_write_outlasting_wal_sender_timeout_keeps_the_stream() {
    let env = Env::start(SCHEMA, "public.items");
    env.sql("ALTER SYSTEM SET wal_sender_timeout = '2s'");
    env.sql("SELECT pg_reload_conf()");
    // One change a batch: the second transaction fills the batch behind the first's write.
    let config = env.write_config(&format!("[apply]\nmax_batch_changes = 1\n\n{RULES}"));
    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::spawn(&config, &log);
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(30)).await;
    let walsender = || -> String {
        env.sql("SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'pgcache'")
            .trim()
            .to_string()
    };
    let before = walsender();
    assert!(!before.is_empty(), "no walsender");

    // Redis holds every write for 6 s, three times the timeout.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(6000)
        .arg("WRITE")
        .query_async(&mut r)
        .await
        .unwrap();
    for id in 101..=103 {
        env.sql(&format!("INSERT INTO items VALUES ({id}, 'slow {id}')"));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: Option<String> = redis::cmd("GET")
            .arg("item:103")
            .query_async(&mut r)
            .await
            .unwrap();
        if got.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "item:103 never arrived\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = walsender();
    let text = daemon.log();
    daemon.terminate();
    assert_eq!(
        before, after,
        "the replication connection was replaced during the slow write\n{text}"
    );
    let server_log = env.pg.log();
    assert!(
        !server_log.contains("replication timeout"),
        "the server timed the daemon out:\n{server_log}"
    );
}
