//! Found by the adversarial review of the release build, where features meet: a computed key
//! under a key prefix is invalidated; a reader whose wait for another holder's fill times
//! out never returns a row the daemon has not reached, for JSON and hash tables (G10); a
//! table stopped at run time is backfilled once it fits its rule again (G6).

use std::sync::Arc;
use std::time::Duration;

use pgcache::reader::ReaderOptions;
use pgcache::Reader;

use crate::reader::computed::order_ids;

use crate::common::{
    eventually, get, keys, pgcache, settled, wait_backfill_done, wait_streaming, Daemon, Env,
    InProcess,
};

const CHECKPOINT: &str = "pgcache:{pgcache}:checkpoint";

/// `get_with` under a `redis.key_prefix`: the daemon's invalidation must delete the
/// prefixed key and revoke the prefixed lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_get_with_under_a_key_prefix_is_invalidated() {
    let env = Env::start(
        "CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL);
         ALTER TABLE orders REPLICA IDENTITY FULL;
         INSERT INTO orders VALUES (1, 7);",
        "public.orders",
    );
    let toml = env
        .config_toml(
            "[[tables]]\ntable = \"public.orders\"\nkey = \"order:{id}\"\n\n[[tables.invalidate]]\nkey = \"user-orders:{user_id}\"\n",
        )
        .replace("[redis]\n", "[redis]\nkey_prefix = \"app:\"\n");
    let config = Arc::new(pgcache::config::Config::from_toml_str(&toml).unwrap());
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;
    eventually(Duration::from_secs(30), "streaming", || {
        let mut r = r.clone();
        async move {
            let a: Option<String> = redis::cmd("HGET")
                .arg("app:pgcache:{pgcache}:checkpoint")
                .arg("applied")
                .query_async(&mut r)
                .await
                .ok()?;
            a.map(drop)
        }
    })
    .await;
    let reader = Reader::from_config_with(&config, ReaderOptions::default()).unwrap();
    let db = Arc::new(env.pg_client().await);
    let key = reader.key("user-orders:{user_id}", 7).unwrap();
    let list: Vec<i32> = reader.get_with(&key, || order_ids(&db, 7)).await.unwrap();
    assert_eq!(list, [1]);
    assert_eq!(
        get(&mut r, "app:user-orders:7").await.as_deref(),
        Some("[1]")
    );
    env.sql("INSERT INTO orders VALUES (2, 7)");
    eventually(Duration::from_secs(20), "app:user-orders:7 deleted", || {
        let mut r = r.clone();
        async move {
            get(&mut r, "app:user-orders:7")
                .await
                .is_none()
                .then_some(())
        }
    })
    .await;
    let list: Vec<i32> = reader.get_with(&key, || order_ids(&db, 7)).await.unwrap();
    assert_eq!(list, [1, 2]);
    daemon.stop().await.unwrap();
    let _ = wait_streaming;
}

const FILL_LUA: &str = include_str!("../../src/reader/fill.lua");

/// A reader that gives up waiting for a lease holder (WaitTimeout) reads Postgres. For JSON
/// tables it then waits until the daemon has applied up to that read (`read_settled`, at most
/// `max_lag_wait`), so that nothing older can show up in Redis after it returned (G10). For
/// `format = "hash"` tables (src/reader/hash.rs, `lead`: `read(...)` on WaitTimeout and on a
/// lost fill past the deadline) it returns at once: the slow holder's fill of the row it read
/// before the update still succeeds (the daemon, a few hundred ms behind, has not revoked
/// the lease yet), and a later reader sees the older value. Holds for both.
async fn wait_timeout_then_slow_holder(format: &str) -> Result<(), String> {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL); INSERT INTO items VALUES (1, 0);",
        "public.items",
    );
    let rules = format!(
        "[[tables]]\ntable = \"public.items\"\nkey = \"item:{{id}}\"\nformat = \"{format}\"\n"
    );
    let path = env.write_config(&rules);
    let config = env.config(&rules);
    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::spawn(&path, &log);
    let mut r = env.redis().await;
    wait_streaming(&mut r).await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    settled(&env, &mut r).await;

    // The key is evicted; a holder H (another process) takes the lease and reads v = 0.
    let _: () = redis::cmd("DEL")
        .arg("item:1")
        .query_async(&mut r)
        .await
        .unwrap();
    let lease = "{item:1}:pgcache-lease";
    let _: () = redis::cmd("SET")
        .arg(lease)
        .arg("holder-H")
        .arg("PX")
        .arg(30_000)
        .query_async(&mut r)
        .await
        .unwrap();
    let db = env.pg_client().await;
    let at_h: String = db
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let at_h = pgcache::checkpoint::hex(at_h.parse().unwrap());
    settled(&env, &mut r).await;

    // The daemon lags (paused for 600 ms, under max_lag_wait = 1 s); the row changes.
    daemon.pause();
    env.sql("UPDATE items SET v = 1 WHERE id = 1");
    let pid = daemon.pid() as i32;
    let resumer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(600)).await;
        unsafe {
            libc::kill(pid, libc::SIGCONT);
        }
    });

    // Reader A gives up on H's lease after 200 ms and reads Postgres: v = 1.
    let a = Reader::from_config_with(
        &config,
        ReaderOptions::default().lease_ttl(Duration::from_millis(200)),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let seen_a = a.get_raw("public.items", 1).await.unwrap().unwrap();
    let seen_a: serde_json::Value = serde_json::from_slice(&seen_a).unwrap();
    let a_took = started.elapsed();

    // H's fill of what it read before the update.
    let mut fill = redis::cmd("EVAL");
    fill.arg(FILL_LUA)
        .arg(3)
        .arg("item:1")
        .arg(lease)
        .arg(CHECKPOINT)
        .arg("holder-H");
    if format == "hash" {
        fill.arg("hash")
            .arg("")
            .arg(0)
            .arg(&at_h)
            .arg("id")
            .arg("1")
            .arg("v")
            .arg("0");
    } else {
        fill.arg("row").arg("{\"id\":1,\"v\":0}").arg(0).arg(&at_h);
    }
    let filled: i64 = fill.query_async(&mut r).await.unwrap();

    // Reader B, afterwards.
    let b = Reader::from_config_with(&config, ReaderOptions::default()).unwrap();
    let seen_b = b.get_raw("public.items", 1).await.unwrap().unwrap();
    let seen_b: serde_json::Value = serde_json::from_slice(&seen_b).unwrap();
    resumer.await.unwrap();
    daemon.resume();
    settled(&env, &mut r).await;
    daemon.terminate();
    let v = |j: &serde_json::Value| j["v"].to_string().trim_matches('"').to_string();
    if v(&seen_a) == "1" && v(&seen_b) == "0" {
        return Err(format!(
            "{format}: reader A saw v=1 (returned after {a_took:?}, daemon lag < 600 ms), then H's fill \
             returned {filled} and reader B saw v=0: {seen_a} then {seen_b}"
        ));
    }
    Ok(())
}

/// Control: JSON tables hold (A waits for the daemon before returning).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_json_wait_timeout_is_monotonic() {
    wait_timeout_then_slow_holder("json").await.unwrap();
}

/// Hash tables wait for the daemon as JSON tables do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_hash_wait_timeout_is_monotonic() {
    wait_timeout_then_slow_holder("hash").await.unwrap();
}

/// A table that stops at run time (its rule no longer fits: a cached column renamed)
/// has its keys dropped and `Backfills::remove_table` forgets its rule; when a later Relation
/// message shows that it fits again, the daemon logs "the table fits its rule again:
/// backfilling it", but `Backfills::schedule` returns at once because `is_mirror` looks the
/// rule up in the map it was removed from. No backfill runs until the daemon restarts: the
/// mirror table holds only the rows changed since, and `verify` reports the rest missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_table_that_fits_again_is_backfilled() {
    let env = Env::start(
        "CREATE TABLE t (id int PRIMARY KEY, x int NOT NULL);
         INSERT INTO t SELECT g, g FROM generate_series(1, 20) g;",
        "public.t",
    );
    let rules = "[[tables]]\ntable = \"public.t\"\nkey = \"t:{id}\"\ncolumns = [\"id\", \"x\"]\n";
    let path = env.write_config(rules);
    let daemon = InProcess::start(env.config(rules));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.t", Duration::from_secs(60)).await;
    assert_eq!(keys(&mut r, "t:*").await.len(), 20);

    // The rule stops fitting: the table stops, its keys go.
    env.sql("ALTER TABLE t RENAME COLUMN x TO y; UPDATE t SET y = 0 WHERE id = 1;");
    eventually(
        Duration::from_secs(20),
        "the stopped table's keys dropped",
        || {
            let mut r = r.clone();
            async move { keys(&mut r, "t:*").await.is_empty().then_some(()) }
        },
    )
    .await;
    // It fits again; one row changes, which brings the new Relation message.
    env.sql("ALTER TABLE t RENAME COLUMN y TO x; UPDATE t SET x = 100 WHERE id = 2;");
    settled(&env, &mut r).await;
    let backfilled = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if keys(&mut r.clone(), "t:*").await.len() == 20 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let n = keys(&mut r, "t:*").await.len();
    let p = path.display().to_string();
    let (code, out, _) = tokio::task::spawn_blocking(move || pgcache(&["verify", "--config", &p]))
        .await
        .unwrap();
    daemon.stop().await.unwrap();
    assert!(
        backfilled.is_ok(),
        "20 rows, {n} keys 20 s after the table fit its rule again; verify exit {code}:\n{out}"
    );
}

/// A fill that read a row before its partition was detached (or truncated, or
/// dropped) and fills after the daemon reconciled the table must lose: the reconcile event
/// revokes every lease of the table (it used to revoke none, and the row came back for
/// good). A row DELETE (lease revoked by the change) and a root TRUNCATE (leases of
/// the key space dropped) both make such a fill lose. `verify` then reports an extra key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_fill_racing_a_partition_detach_loses() {
    use pgcache::reader::{FillOutcome, LeaseOutcome};
    let env = Env::start(
        "CREATE TABLE events (id int, day date, note text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
         CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
         CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         INSERT INTO events SELECT g, date '2024-06-01', 'a' FROM generate_series(1, 10) g;
         INSERT INTO events SELECT g, date '2025-06-01', 'b' FROM generate_series(11, 20) g;",
        "public.events",
    );
    let rules = "[[tables]]\ntable = \"events\"\nkey = \"ev:{id}:{day}\"\n";
    let path = env.write_config(rules);
    let config = env.config(rules);
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.events", Duration::from_secs(60)).await;
    assert_eq!(keys(&mut r, "ev:*").await.len(), 20);

    // Row 5 is not cached (evicted); a reader takes its lease and reads it.
    let _: () = redis::cmd("DEL")
        .arg("ev:5:2024-06-01")
        .query_async(&mut r)
        .await
        .unwrap();
    let reader = Reader::from_config_with(
        &config,
        ReaderOptions::default().lease_ttl(Duration::from_secs(30)),
    )
    .unwrap();
    let events = reader.table("public.events").unwrap();
    let LeaseOutcome::Acquired(lease) = events.lease((5, "2024-06-01")).await.unwrap() else {
        panic!("expected to take the lease");
    };
    let row = lease.read_row().await.unwrap().expect("row 5 exists");

    // The partition goes; the daemon reconciles the table.
    env.sql("ALTER TABLE events DETACH PARTITION events_2024");
    eventually(
        Duration::from_secs(30),
        "the detached rows' keys gone",
        || {
            let mut r = r.clone();
            async move { (keys(&mut r, "ev:*").await.len() == 10).then_some(()) }
        },
    )
    .await;
    settled(&env, &mut r).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The slow fill.
    let outcome = lease.fill(&row).await.unwrap();
    let resurrected = get(&mut r, "ev:5:2024-06-01").await;
    let p = path.display().to_string();
    let (code, out, _) = tokio::task::spawn_blocking(move || pgcache(&["verify", "--config", &p]))
        .await
        .unwrap();
    daemon.stop().await.unwrap();
    assert!(
        matches!(outcome, FillOutcome::Lost) && resurrected.is_none(),
        "the fill of a detached row {}: ev:5:2024-06-01 = {resurrected:?}; verify exit {code}:\n{out}",
        if matches!(outcome, FillOutcome::Filled) { "won" } else { "did not win" }
    );
}

const PARTITIONED_ORDERS: &str = "
CREATE TABLE orders (id int, day date, user_id int NOT NULL, PRIMARY KEY (id, day))
  PARTITION BY RANGE (day);
CREATE TABLE orders_2024 PARTITION OF orders FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE orders_2025 PARTITION OF orders FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE orders_2026 PARTITION OF orders FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
ALTER TABLE orders REPLICA IDENTITY FULL;
ALTER TABLE orders_2024 REPLICA IDENTITY FULL;
ALTER TABLE orders_2025 REPLICA IDENTITY FULL;
ALTER TABLE orders_2026 REPLICA IDENTITY FULL;
INSERT INTO orders VALUES (1, '2024-06-01', 7), (2, '2025-06-01', 7), (3, '2026-06-01', 7),
                          (4, '2026-06-01', 8);
";

const PARTITIONED_RULES: &str = "
[[tables]]
table = \"public.orders\"
key = \"order:{id}:{day}\"

[[tables.invalidate]]
key = \"user-orders:{user_id}\"
";

/// . Partition TRUNCATE / DETACH / DROP / ATTACH change which rows the partitioned
/// table holds without row changes in the WAL. The daemon reconciles (or backfills) the
/// table's own keys, but leaves the keys of its `[[tables.invalidate]]` rules alone, so a
/// user's order list computed with `get_with` keeps listing orders that are gone (or misses
/// attached ones) for good: no TTL, and nothing else ever deletes it. A plain TRUNCATE of
/// the table drops every `user-orders:*` key (README); the partition forms must too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_partition_events_delete_invalidation_keys() {
    let env = Env::start(PARTITIONED_ORDERS, "public.orders");
    let config = env.config(PARTITIONED_RULES);
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.orders", Duration::from_secs(60)).await;
    let reader = Reader::from_config_with(&config, ReaderOptions::default()).unwrap();
    let db = Arc::new(env.pg_client().await);
    let key = reader.key("user-orders:{user_id}", 7).unwrap();

    let mut failures = Vec::new();
    let steps: [(&str, &str, Vec<i32>); 4] = [
        ("TRUNCATE orders_2024", "order:1:*", vec![2, 3]),
        ("ALTER TABLE orders DETACH PARTITION orders_2025", "order:2:*", vec![3]),
        ("DROP TABLE orders_2026", "order:3:*", vec![]),
        (
            "CREATE TABLE orders_2027 (LIKE orders INCLUDING ALL);
             INSERT INTO orders_2027 VALUES (5, '2027-06-01', 7);
             ALTER TABLE orders ATTACH PARTITION orders_2027 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');",
            "order:5:*",
            vec![5],
        ),
    ];
    for (sql, order_keys, expected) in steps {
        // Fill the computed list.
        let list: Vec<i32> = reader.get_with(&key, || order_ids(&db, 7)).await.unwrap();
        eventually(Duration::from_secs(10), "the list cached", || {
            let mut r = r.clone();
            async move { get(&mut r, "user-orders:7").await }
        })
        .await;
        let before = get(&mut r, "user-orders:7").await;
        env.sql(sql);
        // Wait until the daemon followed the event for the table's own keys.
        let attach = sql.contains("ATTACH");
        eventually(Duration::from_secs(30), "the table's keys followed", || {
            let mut r = r.clone();
            async move {
                let n = keys(&mut r, order_keys).await.len();
                (if attach { n == 1 } else { n == 0 }).then_some(())
            }
        })
        .await;
        settled(&env, &mut r).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = get(&mut r, "user-orders:7").await;
        let fresh = order_ids(&db, 7).await.unwrap();
        assert_eq!(fresh, expected);
        if let Some(cached) = &now {
            let cached: Vec<i32> = serde_json::from_str(cached).unwrap();
            if cached != fresh {
                failures.push(format!(
                    "after `{sql}`: user-orders:7 still holds {cached:?} (filled as {list:?}, was {before:?}), Postgres has {fresh:?}"
                ));
                // Let the next step start clean.
                let _: () = redis::cmd("DEL")
                    .arg("user-orders:7")
                    .query_async(&mut r)
                    .await
                    .unwrap();
            }
        }
    }
    daemon.stop().await.unwrap();
    assert!(
        failures.is_empty(),
        "stale computed values:\n{}",
        failures.join("\n")
    );
}

/// Review 3, R8: a TRUNCATE of `users` (keys `user:{id}`) must not delete the keys of
/// `orders`, hash-tagged by user (`{user:7}:order:1`): the lease pattern it drops used to
/// be `{user:*`, which takes them in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_truncate_leaves_a_hash_tagged_neighbour() {
    let env = Env::start(
        "CREATE TABLE users (id int PRIMARY KEY, name text);
         CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL);
         ALTER TABLE orders REPLICA IDENTITY FULL;
         INSERT INTO users VALUES (1, 'a'), (2, 'b');
         INSERT INTO orders SELECT g, 1 + g % 2 FROM generate_series(1, 6) g;",
        "public.users,public.orders",
    );
    let rules = "[[tables]]\ntable = \"users\"\nkey = \"user:{id}\"\n\n\
                 [[tables]]\ntable = \"orders\"\nkey = \"{{user:{user_id}}}:order:{id}\"\n";
    let daemon = InProcess::start(env.config(rules));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.orders", Duration::from_secs(60)).await;
    wait_backfill_done(&mut r, "public.users", Duration::from_secs(60)).await;
    assert_eq!(keys(&mut r, "{user:*}:order:*").await.len(), 6);
    env.sql("TRUNCATE users");
    settled(&env, &mut r).await;
    assert_eq!(keys(&mut r, "user:*").await, Vec::<String>::new());
    assert_eq!(
        keys(&mut r, "{user:*}:order:*").await.len(),
        6,
        "orders' keys deleted"
    );
    env.assert_converged(rules).await;
    daemon.stop().await.unwrap();
}

/// Review 3, R3: a mirror table stopped at run time (a column of its rule dropped), its keys
/// deleted, then fixed while the daemon is stopped: the next start backfills it (the
/// checkpoint no longer says its backfill is done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_table_fixed_while_stopped_is_backfilled() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, a text, b text);
         INSERT INTO items SELECT g, 'a' || g, 'b' || g FROM generate_series(1, 50) g;",
        "public.items",
    );
    let rule =
        "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\ncolumns = [\"id\", \"a\", \"b\"]\n";
    let daemon = InProcess::start(env.config(rule));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    assert_eq!(keys(&mut r, "item:*").await.len(), 50);
    env.sql("ALTER TABLE items DROP COLUMN b; UPDATE items SET a = 'x' WHERE id = 1;");
    eventually(
        Duration::from_secs(30),
        "the stopped table's keys gone",
        || {
            let mut r = r.clone();
            async move { keys(&mut r, "item:*").await.is_empty().then_some(()) }
        },
    )
    .await;
    settled(&env, &mut r).await;
    daemon.stop().await.unwrap();
    env.sql("ALTER TABLE items ADD COLUMN b text");
    let daemon = InProcess::start(env.config(rule));
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    settled(&env, &mut r).await;
    assert_eq!(keys(&mut r, "item:*").await.len(), 50);
    env.assert_converged(rule).await;
    daemon.stop().await.unwrap();
}

/// Review 3, R10: a table renamed before any change to it in this session is noticed (by
/// its OID), so its keys go; renamed back and restarted, every change made under the other
/// name is in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_rename_is_noticed_without_an_earlier_change() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 5) g;",
        "public.items",
    );
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";
    let daemon = InProcess::start(env.config(rule));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    env.sql(
        "ALTER TABLE items RENAME TO items_renamed;
         UPDATE items_renamed SET v = 'changed' WHERE id = 1;
         DELETE FROM items_renamed WHERE id = 2;",
    );
    eventually(
        Duration::from_secs(30),
        "the renamed table's keys gone",
        || {
            let mut r = r.clone();
            async move { keys(&mut r, "item:*").await.is_empty().then_some(()) }
        },
    )
    .await;
    daemon.stop().await.unwrap();
    env.sql("ALTER TABLE items_renamed RENAME TO items");
    let daemon = InProcess::start(env.config(rule));
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    settled(&env, &mut r).await;
    assert_eq!(
        get(&mut r, "item:1").await.as_deref(),
        Some(r#"{"id":1,"v":"changed"}"#)
    );
    assert_eq!(get(&mut r, "item:2").await, None);
    env.assert_converged(rule).await;
    daemon.stop().await.unwrap();
}

/// Review 3, R12: a table dropped and created again (a reload) under the daemon: the keys of
/// the old rows go, the new rows are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_table_dropped_and_created_again_leaves_no_old_keys() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'old' || g FROM generate_series(1, 10) g;",
        "public.items",
    );
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";
    let daemon = InProcess::start(env.config(rule));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    env.sql(
        "BEGIN;
         DROP TABLE items;
         CREATE TABLE items (id int PRIMARY KEY, v text);
         GRANT SELECT ON items TO pgcache;
         ALTER PUBLICATION pgcache ADD TABLE items;
         INSERT INTO items SELECT g, 'new' || g FROM generate_series(1, 3) g;
         COMMIT;",
    );
    eventually(Duration::from_secs(30), "only the new rows' keys", || {
        let mut r = r.clone();
        async move { (keys(&mut r, "item:*").await.len() == 3).then_some(()) }
    })
    .await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    settled(&env, &mut r).await;
    assert_eq!(get(&mut r, "item:7").await, None);
    assert_eq!(
        get(&mut r, "item:2").await.as_deref(),
        Some(r#"{"id":2,"v":"new2"}"#)
    );
    env.assert_converged(rule).await;
    daemon.stop().await.unwrap();
}

/// Review 3, R6: a refresh table's cached row, its partition detached, updated and attached
/// again in one transaction (no row change under the table's name): the attach's resync
/// makes the daemon forget the table's keys, so the old value is not served for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_refresh_table_forgets_its_keys_on_attach() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
         CREATE TABLE items_p1 PARTITION OF items FOR VALUES FROM (1) TO (100);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 10) g;",
        "public.items",
    );
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\nmode = \"refresh\"\n";
    let config = env.config(rule);
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;
    wait_streaming(&mut r).await;
    let reader = Reader::from_config_with(&config, ReaderOptions::default()).unwrap();
    let items = reader.table("public.items").unwrap();
    let value: serde_json::Value = items.get(5).await.unwrap().expect("row 5");
    assert_eq!(value["v"], "v5");
    assert!(get(&mut r, "item:5").await.is_some(), "the fill is cached");
    env.sql(
        "BEGIN;
         ALTER TABLE items DETACH PARTITION items_p1;
         UPDATE items_p1 SET v = 'changed' WHERE id = 5;
         ALTER TABLE items ATTACH PARTITION items_p1 FOR VALUES FROM (1) TO (100);
         COMMIT;",
    );
    settled(&env, &mut r).await;
    assert_eq!(
        get(&mut r, "item:5").await,
        None,
        "the old value is still cached"
    );
    let value: serde_json::Value = items.get(5).await.unwrap().expect("row 5");
    assert_eq!(value["v"], "changed");
    daemon.stop().await.unwrap();
}

/// Review 3, R1: the replica identity changed under a running daemon so that the key column
/// is no longer in it: deletes would come without the key, so the table stops with its keys
/// deleted (nothing stale served) instead of keeping keys of deleted rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_replica_identity_without_the_key_stops_the_table() {
    let env = Env::start(
        "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL UNIQUE);
         INSERT INTO users SELECT g, 'u' || g || '@x' FROM generate_series(1, 5) g;",
        "public.users",
    );
    let rule = "[[tables]]\ntable = \"users\"\nkey = \"user:{id}\"\n";
    let daemon = InProcess::start(env.config(rule));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.users", Duration::from_secs(60)).await;
    assert_eq!(keys(&mut r, "user:*").await.len(), 5);
    env.sql(
        "ALTER TABLE users REPLICA IDENTITY USING INDEX users_email_key;
         DELETE FROM users WHERE id = 1;",
    );
    eventually(Duration::from_secs(30), "the table's keys gone", || {
        let mut r = r.clone();
        async move { keys(&mut r, "user:*").await.is_empty().then_some(()) }
    })
    .await;
    daemon.stop().await.unwrap();
}

/// Review 3, R15: a publication row filter leaves the changes of rows outside it out of the
/// stream: `check` fails the table with the fix, and the daemon stops it (no keys) rather
/// than serving what the backfill read for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_publication_row_filter_is_refused() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 20) g;",
        "public.items",
    );
    env.sql("ALTER PUBLICATION pgcache SET TABLE items WHERE (id < 10), pgcache.events");
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";
    let config_path = env.write_config(rule).display().to_string();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || pgcache(&["check", "--config", &config_path]))
            .await
            .unwrap();
    assert_ne!(code, 0, "{out}{err}");
    assert!(out.contains("row filter (WHERE (id < 10))"), "{out}{err}");
    assert!(
        out.contains("DROP TABLE \"public\".\"items\""),
        "{out}{err}"
    );
    let daemon = InProcess::start(env.config(rule));
    let mut r = env.redis().await;
    wait_streaming(&mut r).await;
    env.sql("UPDATE items SET v = 'x' WHERE id = 15");
    settled(&env, &mut r).await;
    assert_eq!(keys(&mut r, "item:*").await, Vec::<String>::new());
    daemon.stop().await.unwrap();
}

/// Review 3, R9: Postgres restored from a copy of its data directory (slot included), so the
/// checkpoint in Redis is ahead of the server's WAL. The daemon must not start the stream
/// there (it would skip every commit until the server got that far again): it rebuilds
/// Redis from Postgres, and commits after the restore arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_postgres_restored_from_an_older_copy_is_followed() {
    let mut env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 5) g;",
        "public.items",
    );
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";
    let daemon = InProcess::start(env.config(rule));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    settled(&env, &mut r).await;
    daemon.stop().await.unwrap();
    env.pg.stop().unwrap();
    let data = env.pg.data_dir().to_path_buf();
    let copy = data.with_extension("copy");
    let cp = |from: &std::path::Path, to: &std::path::Path| {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "cp -a {} {}",
            from.display(),
            to.display()
        );
    };
    cp(&data, &copy);
    env.pg.start_again().unwrap();
    // The future that the restore takes back.
    let daemon = InProcess::start(env.config(rule));
    env.sql("INSERT INTO items SELECT g, 'future' FROM generate_series(100, 3000) g");
    env.sql("UPDATE items SET v = 'future' WHERE id <= 5");
    settled(&env, &mut r).await;
    assert_eq!(
        get(&mut r, "item:100").await.as_deref(),
        Some(r#"{"id":100,"v":"future"}"#)
    );
    daemon.stop().await.unwrap();
    env.pg.stop().unwrap();
    std::fs::remove_dir_all(&data).unwrap();
    cp(&copy, &data);
    env.pg.start_again().unwrap();

    let daemon = InProcess::start(env.config(rule));
    wait_streaming(&mut r).await;
    env.sql("UPDATE items SET v = 'after-restore' WHERE id = 1; INSERT INTO items VALUES (7, 'after-restore');");
    // The checkpoint's own "applied" and "done" are from the lost future, so `settled`
    // cannot tell: wait for the values.
    eventually(
        Duration::from_secs(30),
        "the commits after the restore",
        || {
            let mut r = r.clone();
            async move {
                let one = get(&mut r, "item:1").await?;
                let gone = get(&mut r, "item:100").await.is_none();
                (one == r#"{"id":1,"v":"after-restore"}"# && gone).then_some(())
            }
        },
    )
    .await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    settled(&env, &mut r).await;
    assert_eq!(
        get(&mut r, "item:7").await.as_deref(),
        Some(r#"{"id":7,"v":"after-restore"}"#)
    );
    assert_eq!(
        get(&mut r, "item:100").await,
        None,
        "a row of the lost future"
    );
    env.assert_converged(rule).await;
    daemon.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&copy);
}

/// Review 3, R11: an ALTER TABLE that changes every row without a row change in the WAL
/// (a rewrite with `USING`, a column added with a default) reaches every cached value while
/// the daemon runs, through the event triggers of `sql/events.sql`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_alter_table_without_row_changes_reaches_the_values() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, price numeric(10,2) NOT NULL);
         INSERT INTO items SELECT g, g FROM generate_series(1, 5) g;",
        "public.items",
    );
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";
    let daemon = InProcess::start(env.config(rule));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    assert_eq!(
        get(&mut r, "item:3").await.as_deref(),
        Some(r#"{"id":3,"price":"3.00"}"#)
    );
    env.sql("ALTER TABLE items ALTER COLUMN price TYPE numeric(10,2) USING price * 100");
    eventually(Duration::from_secs(30), "the rewritten values", || {
        let mut r = r.clone();
        async move {
            (get(&mut r, "item:3").await? == r#"{"id":3,"price":"300.00"}"#).then_some(())
        }
    })
    .await;
    env.sql("ALTER TABLE items ADD COLUMN label text NOT NULL DEFAULT 'new'");
    eventually(Duration::from_secs(30), "the added column", || {
        let mut r = r.clone();
        async move {
            (get(&mut r, "item:3").await? == r#"{"id":3,"price":"300.00","label":"new"}"#)
                .then_some(())
        }
    })
    .await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    settled(&env, &mut r).await;
    env.assert_converged(rule).await;
    daemon.stop().await.unwrap();
}

/// Review 4, N8 (G10, read-your-writes): an early refresh read the row, then a DELETE was
/// applied (revoking the refresh's lease). A lookup that begins after `wait_for_writes` and
/// joins the refresh's flight must not get the deleted row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_lost_early_refresh_hands_its_callers_no_older_row() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 3) g;
         CREATE TABLE other (id int);",
        "public.items,public.other",
    );
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\nttl = \"60s\"\n";
    let config_path = env.write_config(rule);
    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::spawn(&config_path, &log);
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    settled(&env, &mut r).await;
    let reader = Reader::from_config_with(
        &env.config(rule),
        ReaderOptions::default()
            .early_refresh_beta(Some(1e9))
            .max_lag_wait(Duration::from_secs(10))
            .max_wait_step(Duration::from_secs(2)),
    )
    .unwrap();
    let items = reader.table("public.items").unwrap();
    let first = items.lookup::<serde_json::Value>(1).await.unwrap();
    assert!(first.value.is_some());
    tokio::time::sleep(Duration::from_millis(300)).await; // its refresh settles
                                                          // The daemon paused: the next refresh's fill waits for it to apply past its read.
    daemon.pause();
    env.sql("INSERT INTO other VALUES (1)");
    let hit = items.lookup::<serde_json::Value>(1).await.unwrap();
    assert!(hit.value.is_some(), "a hit, which starts an early refresh");
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.sql("DELETE FROM items WHERE id = 1");
    daemon.resume();
    reader.wait_for_writes().await.unwrap();
    let after = items.lookup::<serde_json::Value>(1).await.unwrap();
    assert_eq!(
        after.value, None,
        "the deleted row, served {:?}",
        after.served
    );
    daemon.terminate();
}

/// Review 4, N9 (read-your-writes, computed keys): a `get_with` that begins after the
/// caller's own write was applied, and joins a load that began before it, must not get the
/// older value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_get_with_after_a_write_does_not_take_an_older_load() {
    let env = Env::start(
        "CREATE TABLE orders (id int PRIMARY KEY, user_id int);
         ALTER TABLE orders REPLICA IDENTITY FULL;
         INSERT INTO orders VALUES (1, 7);",
        "public.orders",
    );
    let rule = "[[tables]]\ntable = \"orders\"\nkey = \"order:{id}\"\n\n\
                [[tables.invalidate]]\nkey = \"user-orders:{user_id}\"\n";
    let config = env.config(rule);
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;
    wait_streaming(&mut r).await;
    let reader = Reader::from_config_with(&config, ReaderOptions::default()).unwrap();
    let key = reader.key("user-orders:{user_id}", 7i64).unwrap();
    let db = Arc::new(env.pg_client().await);
    let count = |db: Arc<tokio_postgres::Client>| async move {
        let n: i64 = db
            .query_one("SELECT count(*) FROM orders WHERE user_id = 7", &[])
            .await?
            .get(0);
        Ok::<_, tokio_postgres::Error>(n)
    };
    // Caller A: its loader reads the count, then takes a while.
    let a = {
        let (reader, key, db) = (reader.clone(), key.clone(), db.clone());
        tokio::spawn(async move {
            reader
                .get_with(&key, || async move {
                    let n = count(db).await?;
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    Ok::<_, tokio_postgres::Error>(n)
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Caller B: writes, waits for the daemon, then reads.
    env.sql("INSERT INTO orders VALUES (100, 7)");
    reader.wait_for_writes().await.unwrap();
    let b: i64 = reader.get_with(&key, || count(db.clone())).await.unwrap();
    let a: i64 = a.await.unwrap().unwrap();
    assert_eq!(a, 1, "A began before the insert");
    assert_eq!(b, 2, "B began after its own write was applied");
    daemon.stop().await.unwrap();
}

/// Review 3, R16: a partitioned table whose publication has `publish_via_partition_root`
/// off: `check` says that, with the fix, rather than "not in the publication".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_partitions_published_alone_are_named_as_such() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
         CREATE TABLE items_p1 PARTITION OF items FOR VALUES FROM (1) TO (100);",
        "public.items",
    );
    env.sql("ALTER PUBLICATION pgcache SET (publish_via_partition_root = false)");
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";
    let config_path = env.write_config(rule).display().to_string();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || pgcache(&["check", "--config", &config_path]))
            .await
            .unwrap();
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        out.contains("publish_via_partition_root is off"),
        "{out}{err}"
    );
    assert!(
        out.contains("SET (publish_via_partition_root = true)"),
        "{out}{err}"
    );
}

/// Review 4, N7 (G7): a lookup whose key is longer than the least `proto-max-bulk-len`
/// Redis allows is read from Postgres without touching Redis, so Redis does not drop the
/// connection and the breaker stays closed for every other key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_an_over_long_key_leaves_the_reader_working() {
    let env = Env::start_with(
        pgcache::testkit::PgOptions::default(),
        pgcache::testkit::RedisOptions {
            extra_args: vec!["--proto-max-bulk-len".into(), "1mb".into()],
            ..Default::default()
        },
        "CREATE TABLE items (id text PRIMARY KEY, v text);
         INSERT INTO items VALUES ('a', 'x');",
        "public.items",
    );
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";
    let config = env.config(rule);
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    let reader = Reader::from_config_with(&config, ReaderOptions::default()).unwrap();
    let items = reader.table("public.items").unwrap();
    let long = "k".repeat(1_100_000);
    let found = items
        .lookup::<serde_json::Value>(long.as_str())
        .await
        .unwrap();
    assert_eq!(found.value, None);
    let before = reader.stats().db_reads;
    for _ in 0..20 {
        let hit = items.lookup::<serde_json::Value>("a").await.unwrap();
        assert_eq!(hit.value, Some(serde_json::json!({"id": "a", "v": "x"})));
    }
    assert_eq!(
        reader.stats().db_reads,
        before,
        "the breaker opened: hits went to Postgres"
    );
    daemon.stop().await.unwrap();
}

/// Review 3, R13: an enum value renamed (`ALTER TYPE ... RENAME VALUE`) changes how every row
/// with it reads, without a row change in the WAL: the event trigger reports a resync, and
/// the cached values follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_an_enum_value_renamed_reaches_the_values() {
    let env = Env::start(
        "CREATE TYPE mood AS ENUM ('sad', 'ok');
         CREATE TABLE people (id int PRIMARY KEY, m mood NOT NULL);
         INSERT INTO people VALUES (1, 'sad'), (2, 'ok');",
        "public.people",
    );
    let rule = "[[tables]]\ntable = \"people\"\nkey = \"person:{id}\"\n";
    let daemon = InProcess::start(env.config(rule));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.people", Duration::from_secs(60)).await;
    assert_eq!(
        get(&mut r, "person:1").await.as_deref(),
        Some(r#"{"id":1,"m":"sad"}"#)
    );
    env.sql("ALTER TYPE mood RENAME VALUE 'sad' TO 'unhappy'");
    eventually(Duration::from_secs(30), "the renamed value", || {
        let mut r = r.clone();
        async move { (get(&mut r, "person:1").await? == r#"{"id":1,"m":"unhappy"}"#).then_some(()) }
    })
    .await;
    wait_backfill_done(&mut r, "public.people", Duration::from_secs(60)).await;
    settled(&env, &mut r).await;
    env.assert_converged(rule).await;
    daemon.stop().await.unwrap();
}

/// Review 3, R4: a table the daemon has stopped (at start: a publication row filter; at run
/// time: a replica identity without the key column) takes no reader fills, since no change
/// would ever reach them: the reader serves the row it read, uncached, and a table that runs
/// is filled as before. Once the table is fixed and the daemon restarted, fills come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_stopped_table_takes_no_fills() {
    use pgcache::reader::Served;
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 20) g;
         CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL UNIQUE);
         INSERT INTO users SELECT g, 'u' || g || '@x' FROM generate_series(1, 5) g;",
        "public.items, public.users",
    );
    env.sql("ALTER PUBLICATION pgcache SET TABLE items WHERE (id < 10), users, pgcache.events");
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\nmode = \"refresh\"\n\n\
                [[tables]]\ntable = \"users\"\nkey = \"{{item:{id}}}:user\"\nmode = \"refresh\"\n";
    let config = env.config(rule);
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;
    wait_streaming(&mut r).await;
    settled(&env, &mut r).await;
    let stopped: Option<String> = redis::cmd("HGET")
        .arg(CHECKPOINT)
        .arg("stopped")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(stopped.as_deref(), Some("^item:[^:{}%s]*$"));

    let reader = Reader::from_config_with(&config, ReaderOptions::default()).unwrap();
    let items = reader.table("public.items").unwrap();
    let users = reader.table("public.users").unwrap();
    let started = std::time::Instant::now();
    let found = items.lookup::<serde_json::Value>(15).await.unwrap();
    assert_eq!(found.value, Some(serde_json::json!({"id": 15, "v": "v15"})));
    assert_eq!(found.served, Served::Uncached);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        get(&mut r, "item:15").await,
        None,
        "a fill of a stopped table"
    );
    assert_eq!(get(&mut r, "{item:15}:pgcache-lease").await, None);
    // A running table whose keys look alike is filled.
    let user = users.lookup::<serde_json::Value>(1).await.unwrap();
    assert_eq!(user.served, Served::Filled);
    assert!(get(&mut r, "{item:1}:user").await.is_some());

    env.sql("UPDATE items SET v = 'changed' WHERE id = 15");
    let found = items.lookup::<serde_json::Value>(15).await.unwrap();
    assert_eq!(
        found.value,
        Some(serde_json::json!({"id": 15, "v": "changed"}))
    );

    // Stopped at run time: the field names it in the write that drops its keys.
    env.sql(
        "ALTER TABLE users REPLICA IDENTITY USING INDEX users_email_key;
         DELETE FROM users WHERE id = 5;",
    );
    eventually(Duration::from_secs(30), "users stopped", || {
        let mut r = r.clone();
        async move {
            let stopped: Option<String> = redis::cmd("HGET")
                .arg(CHECKPOINT)
                .arg("stopped")
                .query_async(&mut r)
                .await
                .ok()?;
            stopped
                .is_some_and(|s| s.contains("^{item:[^:{}%s]*}:user$"))
                .then_some(())
        }
    })
    .await;
    // The field goes with the transaction that drops the keys. (It went out ahead of them
    // once, in a write of fields only while that transaction was still being read: safe for
    // this field, not for a table's shape. Fields read inside a transaction now wait for
    // its operations; this waits all the same, since a check right after the field is
    // seen would race a write in parts.)
    eventually(Duration::from_secs(30), "the users' keys dropped", || {
        let mut r = r.clone();
        async move { get(&mut r, "{item:1}:user").await.is_none().then_some(()) }
    })
    .await;
    let user = users.lookup::<serde_json::Value>(2).await.unwrap();
    assert_eq!(user.served, Served::Uncached);
    assert_eq!(get(&mut r, "{item:2}:user").await, None);
    env.sql("UPDATE users SET email = 'new@x' WHERE id = 2");
    let user = users.lookup::<serde_json::Value>(2).await.unwrap();
    assert_eq!(
        user.value,
        Some(serde_json::json!({"id": 2, "email": "new@x"}))
    );
    // (Replayed after a restart, that update would stop the table again.)
    settled(&env, &mut r).await;
    daemon.stop().await.unwrap();

    // Fixed while stopped: the next start clears the field, and fills are cached again.
    env.sql(
        "ALTER PUBLICATION pgcache SET TABLE items, users, pgcache.events;
         ALTER TABLE users REPLICA IDENTITY DEFAULT;",
    );
    let daemon = InProcess::start(config.clone());
    wait_streaming(&mut r).await;
    settled(&env, &mut r).await;
    let stopped: Option<String> = redis::cmd("HGET")
        .arg(CHECKPOINT)
        .arg("stopped")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(stopped, None);
    let found = items.lookup::<serde_json::Value>(15).await.unwrap();
    assert_eq!(found.served, Served::Filled);
    assert_eq!(
        get(&mut r, "item:15").await.as_deref(),
        Some(r#"{"id":15,"v":"changed"}"#)
    );
    env.sql("UPDATE items SET v = 'again' WHERE id = 15");
    settled(&env, &mut r).await;
    assert_eq!(
        get(&mut r, "item:15").await.as_deref(),
        Some(r#"{"id":15,"v":"again"}"#),
        "the change reaches the filled key"
    );
    daemon.stop().await.unwrap();
}

async fn stopped_patterns(r: &mut redis::aio::MultiplexedConnection) -> Option<String> {
    redis::cmd("HGET")
        .arg(CHECKPOINT)
        .arg("stopped")
        .query_async(r)
        .await
        .unwrap()
}

/// Review 4, N2: a cached table swapped by renames for one outside the publication, with no
/// change to either afterwards. The rename's event makes the daemon check the name: the
/// table stops (its keys dropped, fills refused), instead of its keys serving the old
/// table's rows for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_table_swapped_for_an_unpublished_one_stops() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'old' || g FROM generate_series(1, 10) g;
         CREATE TABLE other (id int PRIMARY KEY, v text);
         INSERT INTO other SELECT g, 'o' || g FROM generate_series(1, 3) g;",
        "public.items, public.other",
    );
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n\n\
                [[tables]]\ntable = \"other\"\nkey = \"other:{id}\"\n";
    let config = env.config(rule);
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    wait_backfill_done(&mut r, "public.other", Duration::from_secs(60)).await;
    env.sql(
        "BEGIN;
         CREATE TABLE items_new (id int PRIMARY KEY, v text);
         GRANT SELECT ON items_new TO pgcache;
         INSERT INTO items_new SELECT g, 'new' || g FROM generate_series(1, 10) g;
         ALTER TABLE items RENAME TO items_old;
         ALTER TABLE items_new RENAME TO items;
         COMMIT;",
    );
    eventually(
        Duration::from_secs(30),
        "the swapped table's keys gone",
        || {
            let mut r = r.clone();
            async move { keys(&mut r, "item:*").await.is_empty().then_some(()) }
        },
    )
    .await;
    settled(&env, &mut r).await;
    assert_eq!(
        stopped_patterns(&mut r).await.as_deref(),
        Some("^item:[^:{}%s]*$")
    );
    let reader = Reader::from_config_with(&config, ReaderOptions::default()).unwrap();
    let found = reader
        .table("public.items")
        .unwrap()
        .lookup::<serde_json::Value>(3)
        .await
        .unwrap();
    assert_eq!(found.value, Some(serde_json::json!({"id": 3, "v": "new3"})));
    assert_eq!(get(&mut r, "item:3").await, None);
    // The other table goes on.
    env.sql("UPDATE other SET v = 'changed' WHERE id = 1");
    settled(&env, &mut r).await;
    assert_eq!(
        get(&mut r, "other:1").await.as_deref(),
        Some(r#"{"id":1,"v":"changed"}"#)
    );
    daemon.stop().await.unwrap();
}

/// Review 4, N2: a cached table dropped, with nothing after it: its keys go at once. Created
/// again later and published, it is followed again from scratch in the same session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_dropped_table_leaves_no_keys_and_is_followed_when_back() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'old' || g FROM generate_series(1, 10) g;",
        "public.items",
    );
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";
    let daemon = InProcess::start(env.config(rule));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    env.sql("DROP TABLE items");
    eventually(
        Duration::from_secs(30),
        "the dropped table's keys gone",
        || {
            let mut r = r.clone();
            async move { keys(&mut r, "item:*").await.is_empty().then_some(()) }
        },
    )
    .await;
    settled(&env, &mut r).await;
    assert!(stopped_patterns(&mut r).await.is_some());
    env.sql(
        "BEGIN;
         CREATE TABLE items (id int PRIMARY KEY, v text);
         GRANT SELECT ON items TO pgcache;
         INSERT INTO items SELECT g, 'new' || g FROM generate_series(1, 4) g;
         ALTER PUBLICATION pgcache ADD TABLE items;
         COMMIT;
         INSERT INTO items VALUES (5, 'new5');",
    );
    eventually(Duration::from_secs(30), "the new table's rows", || {
        let mut r = r.clone();
        async move { (keys(&mut r, "item:*").await.len() == 5).then_some(()) }
    })
    .await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    settled(&env, &mut r).await;
    assert_eq!(stopped_patterns(&mut r).await, None);
    assert_eq!(
        get(&mut r, "item:2").await.as_deref(),
        Some(r#"{"id":2,"v":"new2"}"#)
    );
    env.assert_converged(rule).await;
    daemon.stop().await.unwrap();
}

/// Review 3, R16 at run time: `publish_via_partition_root` turned off while the daemon runs.
/// The partitions' changes arrive under their own names; the first one stops the cached
/// root (keys dropped, fills refused) instead of leaving its keys stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_partitions_published_alone_at_run_time_stop_the_root() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
         CREATE TABLE items_p1 PARTITION OF items FOR VALUES FROM (1) TO (100);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 10) g;",
        "public.items",
    );
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";
    let daemon = InProcess::start(env.config(rule));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    assert_eq!(keys(&mut r, "item:*").await.len(), 10);
    env.sql(
        "ALTER PUBLICATION pgcache SET (publish_via_partition_root = false);
         UPDATE items SET v = 'changed' WHERE id = 1;",
    );
    eventually(Duration::from_secs(30), "the root's keys gone", || {
        let mut r = r.clone();
        async move { keys(&mut r, "item:*").await.is_empty().then_some(()) }
    })
    .await;
    settled(&env, &mut r).await;
    assert_eq!(
        stopped_patterns(&mut r).await.as_deref(),
        Some("^item:[^:{}%s]*$")
    );
    daemon.stop().await.unwrap();
}

/// Review 4, N6: a key written while Redis's `proto-max-bulk-len` was higher, longer than
/// the limit set later. The daemon can no longer name it in any command, so a change to its
/// row could never reach it: at start, it is deleted (its lease too), and the other keys stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_key_too_long_for_a_lowered_limit_is_deleted() {
    let env = Env::start_with(
        pgcache::testkit::PgOptions::default(),
        pgcache::testkit::RedisOptions {
            extra_args: vec!["--proto-max-bulk-len".into(), "4mb".into()],
            ..Default::default()
        },
        // (No index can hold such a value: the key column is outside the primary key, with
        // the full row as replica identity.)
        "CREATE TABLE items (n int PRIMARY KEY, id text NOT NULL, v text);
         ALTER TABLE items REPLICA IDENTITY FULL;
         INSERT INTO items VALUES (1, 'a', 'x'), (2, repeat('k', 1500000), 'long');",
        "public.items",
    );
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\ncolumns = [\"id\", \"v\"]\n";
    let daemon = InProcess::start(env.config(rule));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    let long_key = format!("item:{}", "k".repeat(1_500_000));
    assert_eq!(
        get(&mut r, &long_key).await.as_deref().map(str::len),
        Some(r#"{"id":"","v":"long"}"#.len() + 1_500_000)
    );
    daemon.stop().await.unwrap();

    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("proto-max-bulk-len")
        .arg("1mb")
        .query_async(&mut r)
        .await
        .unwrap();
    env.sql("UPDATE items SET v = 'changed' WHERE v = 'long'");
    let daemon = InProcess::start(env.config(rule));
    wait_streaming(&mut r).await;
    settled(&env, &mut r).await;
    // The key cannot be named in a command any more: look for it by scanning.
    let left = keys(&mut r, "item:*").await;
    assert_eq!(left, vec!["item:a".to_string()], "the long key stayed");
    assert_eq!(
        get(&mut r, "item:a").await.as_deref(),
        Some(r#"{"id":"a","v":"x"}"#)
    );
    daemon.stop().await.unwrap();
}

/// A cached table taken out of the publication, given a row filter, or renamed with its
/// schema, while the daemon runs and with no change to it afterwards: the DDL's event makes
/// the daemon check, and the table stops (keys dropped, fills refused) rather than serving
/// values no change will reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_publication_and_schema_changes_at_run_time_stop_the_table() {
    let env = Env::start(
        "CREATE SCHEMA shop;
         CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 20) g;
         CREATE TABLE other (id int PRIMARY KEY, v text);
         INSERT INTO other SELECT g, 'o' || g FROM generate_series(1, 5) g;
         CREATE TABLE shop.orders (id int PRIMARY KEY, v text);
         INSERT INTO shop.orders SELECT g, 'x' || g FROM generate_series(1, 5) g;",
        "public.items, public.other, shop.orders",
    );
    env.sql("GRANT USAGE ON SCHEMA shop TO pgcache; GRANT SELECT ON shop.orders TO pgcache;");
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n\n\
                [[tables]]\ntable = \"other\"\nkey = \"other:{id}\"\n\n\
                [[tables]]\ntable = \"shop.orders\"\nkey = \"order:{id}\"\n";
    let daemon = InProcess::start(env.config(rule));
    let mut r = env.redis().await;
    for table in ["public.items", "public.other", "shop.orders"] {
        wait_backfill_done(&mut r, table, Duration::from_secs(60)).await;
    }
    let gone = |pattern: &'static str| {
        let r = r.clone();
        move || {
            let mut r = r.clone();
            async move { keys(&mut r, pattern).await.is_empty().then_some(()) }
        }
    };

    env.sql("ALTER PUBLICATION pgcache DROP TABLE items");
    eventually(Duration::from_secs(30), "items' keys gone", gone("item:*")).await;
    env.sql(
        "ALTER PUBLICATION pgcache SET TABLE other WHERE (id < 3), shop.orders, pgcache.events",
    );
    eventually(
        Duration::from_secs(30),
        "other's keys gone",
        gone("other:*"),
    )
    .await;
    env.sql("ALTER SCHEMA shop RENAME TO store");
    eventually(
        Duration::from_secs(30),
        "orders' keys gone",
        gone("order:*"),
    )
    .await;
    settled(&env, &mut r).await;
    let stopped = stopped_patterns(&mut r).await.unwrap_or_default();
    for pattern in ["^item:", "^other:", "^order:"] {
        assert!(stopped.contains(pattern), "{pattern} in {stopped:?}");
    }
    daemon.stop().await.unwrap();
}

/// Review 5, B1: a cached table dropped by `DROP SCHEMA ... CASCADE`, its name then taken by
/// an unpublished table: the drop is reported like a `DROP TABLE`, so its keys go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_schema_dropped_with_its_cached_table_leaves_no_keys() {
    let env = Env::start(
        "CREATE SCHEMA s;
         CREATE TABLE s.items (id int PRIMARY KEY, v text);
         INSERT INTO s.items SELECT g, 'old' || g FROM generate_series(1, 5) g;",
        "s.items",
    );
    env.sql("GRANT USAGE ON SCHEMA s TO pgcache; GRANT SELECT ON s.items TO pgcache;");
    let rule = "[[tables]]\ntable = \"s.items\"\nkey = \"item:{id}\"\n";
    let daemon = InProcess::start(env.config(rule));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "s.items", Duration::from_secs(60)).await;
    env.sql(
        "DROP SCHEMA s CASCADE;
         CREATE SCHEMA s;
         CREATE TABLE s.items (id int PRIMARY KEY, v text);
         INSERT INTO s.items VALUES (1, 'NEW-1');",
    );
    eventually(
        Duration::from_secs(30),
        "the dropped table's keys gone",
        || {
            let mut r = r.clone();
            async move { keys(&mut r, "item:*").await.is_empty().then_some(()) }
        },
    )
    .await;
    daemon.stop().await.unwrap();
}

/// Review 5, B4: the publication stops publishing deletes while the daemon runs. No table's
/// keys can be kept current: every table stops, its keys dropped, rather than keeping keys
/// of deleted rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_publication_that_stops_publishing_deletes_stops_the_tables() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 5) g;",
        "public.items",
    );
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";
    let daemon = InProcess::start(env.config(rule));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    env.sql(
        "ALTER PUBLICATION pgcache SET (publish = 'insert, update');
         DELETE FROM items WHERE id = 5;",
    );
    eventually(Duration::from_secs(30), "the keys gone", || {
        let mut r = r.clone();
        async move { keys(&mut r, "item:*").await.is_empty().then_some(()) }
    })
    .await;
    settled(&env, &mut r).await;
    assert!(stopped_patterns(&mut r)
        .await
        .is_some_and(|s| s.contains("^item:")));
    daemon.stop().await.unwrap();
}

/// Review 5, B5: an update of another column of a row whose key column is stored out of line
/// (TOAST) and unchanged: the new image leaves the key column out, and the key is taken from
/// the old image (the replica identity), so the change is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_an_update_beside_a_toasted_key_column_is_applied() {
    let env = Env::start(
        "CREATE TABLE docs (k text PRIMARY KEY, v text);
         ALTER TABLE docs ALTER COLUMN k SET STORAGE EXTERNAL;
         INSERT INTO docs VALUES (repeat('k', 2500), 'old-1'), ('short', 'old-2');",
        "public.docs",
    );
    let rule = "[[tables]]\ntable = \"docs\"\nkey = \"doc:{k}\"\n";
    let daemon = InProcess::start(env.config(rule));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.docs", Duration::from_secs(60)).await;
    env.sql("UPDATE docs SET v = 'new-1' WHERE v = 'old-1'; UPDATE docs SET v = 'new-2' WHERE k = 'short';");
    settled(&env, &mut r).await;
    let long = format!("doc:{}", "k".repeat(2500));
    let value: serde_json::Value =
        serde_json::from_str(&get(&mut r, &long).await.expect("the long key")).unwrap();
    assert_eq!(value["v"], "new-1");
    env.assert_converged(rule).await;
    daemon.stop().await.unwrap();
}

/// Review 5, B6: a table swapped (and one reloaded) while the daemon was stopped: the
/// checkpoint records each table's OID, so the start notices another table under the name,
/// deletes the keys of rows that are gone and writes the table again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_table_swapped_or_reloaded_while_stopped_leaves_no_old_keys() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'old' || g FROM generate_series(1, 5) g;",
        "public.items",
    );
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";
    let daemon = InProcess::start(env.config(rule));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    settled(&env, &mut r).await;
    daemon.stop().await.unwrap();
    env.sql(
        "BEGIN;
         CREATE TABLE items_new (id int PRIMARY KEY, v text);
         GRANT SELECT ON items_new TO pgcache;
         INSERT INTO items_new SELECT g, 'new' || g FROM generate_series(1, 3) g;
         ALTER PUBLICATION pgcache ADD TABLE items_new;
         ALTER TABLE items RENAME TO items_old;
         ALTER TABLE items_new RENAME TO items;
         DROP TABLE items_old;
         COMMIT;",
    );
    let daemon = InProcess::start(env.config(rule));
    eventually(Duration::from_secs(30), "only the new rows' keys", || {
        let mut r = r.clone();
        async move { (keys(&mut r, "item:*").await.len() == 3).then_some(()) }
    })
    .await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    settled(&env, &mut r).await;
    env.assert_converged(rule).await;
    daemon.stop().await.unwrap();

    // A reload: dropped and created again, published, with fewer rows.
    env.sql(
        "DROP TABLE items;
         CREATE TABLE items (id int PRIMARY KEY, v text);
         GRANT SELECT ON items TO pgcache;
         INSERT INTO items VALUES (1, 'again');
         ALTER PUBLICATION pgcache ADD TABLE items;",
    );
    let daemon = InProcess::start(env.config(rule));
    eventually(
        Duration::from_secs(30),
        "only the reloaded row's key",
        || {
            let mut r = r.clone();
            async move { (keys(&mut r, "item:*").await.len() == 1).then_some(()) }
        },
    )
    .await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    settled(&env, &mut r).await;
    env.assert_converged(rule).await;
    daemon.stop().await.unwrap();
}
