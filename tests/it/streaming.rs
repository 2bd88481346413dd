//! Large transactions streamed while in progress (pgoutput protocol version 2, `streaming
//! 'on'`): spooled, applied at Stream Commit, dropped at Stream Abort. Every server here
//! runs with `logical_decoding_work_mem = 64kB`, so a few thousand rows are streamed, and
//! each test checks (`pg_stat_replication_slots.stream_txns`) that they were.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgcache::testkit::{PgOptions, RedisOptions};
use serde_json::{json, Value};

use crate::common::{
    count_keys, eventually, get, keys, memory_kb, pgcache, settled, wait_backfill_done,
    wait_for_json, Daemon, Env, InProcess,
};

const CHECKPOINT: &str = "pgcache:{pgcache}:checkpoint";

fn start(schema: &str, tables: &str) -> Env {
    Env::start_with(
        PgOptions {
            extra_conf: vec!["logical_decoding_work_mem = '64kB'".to_string()],
            ..PgOptions::default()
        },
        RedisOptions::default(),
        schema,
        tables,
    )
}

/// Transactions the slot's walsender streamed so far.
fn streamed(env: &Env) -> i64 {
    env.sql("SELECT coalesce(sum(stream_txns), 0) FROM pg_stat_replication_slots")
        .trim()
        .parse()
        .unwrap()
}

async fn wait_streamed(env: &Env, at_least: i64) {
    eventually(
        Duration::from_secs(60),
        "a transaction streamed",
        || async { (streamed(env) >= at_least).then_some(()) },
    )
    .await;
}

/// `v` of every row `item:1..=n`, read with one MGET (one instant of Redis).
async fn values(r: &mut redis::aio::MultiplexedConnection, n: i32) -> Vec<Option<i64>> {
    let keys: Vec<String> = (1..=n).map(|id| format!("item:{id}")).collect();
    let got: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&keys)
        .query_async(r)
        .await
        .expect("MGET");
    got.into_iter()
        .map(|v| {
            v.map(|v| {
                serde_json::from_str::<Value>(&v).unwrap()["v"]
                    .as_i64()
                    .unwrap()
            })
        })
        .collect()
}

const ITEMS: &str = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";

/// A streamed transaction is invisible in Redis until it commits, then appears all at
/// once: a reader polling every key with one MGET never sees part of it, although it is
/// far above `max_transaction_changes` (which would split one sent whole). Its spool
/// file is gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_transaction_is_applied_at_commit_all_at_once() {
    const N: i32 = 4000;
    let env = start(
        &format!("CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL); INSERT INTO items SELECT g, 0 FROM generate_series(1, {N}) g;"),
        "public.items",
    );
    let spool = env.dir.path().join("spool");
    let config = env.config(&format!(
        "[apply]\nmax_transaction_changes = 50\nspool_dir = \"{}\"\n\n{ITEMS}",
        spool.display()
    ));
    let daemon = InProcess::start(config);
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;

    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let mut r = r.clone();
        let watching = watching.clone();
        tokio::spawn(async move {
            let mut mixed = Vec::new();
            let mut seen_new = false;
            loop {
                let last = !watching.load(Ordering::Relaxed);
                let vs = values(&mut r, N).await;
                let ones = vs.iter().filter(|v| **v == Some(1)).count();
                if ones != 0 && ones != vs.len() {
                    mixed.push(ones);
                }
                seen_new |= ones == vs.len();
                if last {
                    return (mixed, seen_new);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let client = env.pg_client().await;
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("UPDATE items SET v = 1")
        .await
        .unwrap();
    // Streamed while open, and spooled: nothing of it in Redis.
    wait_streamed(&env, 1).await;
    eventually(Duration::from_secs(30), "a spool file", || async {
        std::fs::read_dir(&spool)
            .ok()?
            .filter_map(Result::ok)
            .any(|e| e.path().extension().is_some_and(|x| x == "spool"))
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        values(&mut r, N).await.iter().all(|v| *v == Some(0)),
        "an uncommitted streamed transaction reached Redis"
    );
    client.batch_execute("COMMIT").await.unwrap();
    settled(&env, &mut r).await;
    watching.store(false, Ordering::Relaxed);
    let (mixed, seen_new) = watcher.await.unwrap();
    assert!(seen_new);
    assert!(
        mixed.is_empty(),
        "a reader saw part of the streamed transaction: {:?}",
        &mixed[..mixed.len().min(5)]
    );
    assert!(values(&mut r, N).await.iter().all(|v| *v == Some(1)));
    let left: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "spool files left: {left:?}");
    daemon.stop().await.unwrap();
    env.assert_converged(ITEMS).await;
}

/// G1 both ways for what rolls back: a streamed transaction rolled back leaves nothing; in
/// a committed one, the changes of a rolled-back savepoint (and of one nested in it) are
/// skipped and the rest applied; an interleaved small transaction and a second streamed
/// one committing in between land too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_streamed_transactions_and_savepoints_leave_nothing() {
    let env = start(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);",
        "public.items",
    );
    let daemon = InProcess::start(env.config(ITEMS));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;

    let a = env.pg_client().await;
    let b = env.pg_client().await;
    let c = env.pg_client().await;
    // A: committed, with rolled-back savepoints (one nested) between its kept rows.
    a.batch_execute(
        "BEGIN; INSERT INTO items SELECT g, 1 FROM generate_series(1, 3000) g;
         SAVEPOINT s1; INSERT INTO items SELECT g, 1 FROM generate_series(10001, 12000) g;
         SAVEPOINT s2; INSERT INTO items SELECT g, 1 FROM generate_series(12001, 14000) g;
         ROLLBACK TO SAVEPOINT s1;
         SAVEPOINT s3; UPDATE items SET v = 2 WHERE id <= 1000; RELEASE SAVEPOINT s3;",
    )
    .await
    .unwrap();
    // B: streamed, then rolled back.
    b.batch_execute("BEGIN; INSERT INTO items SELECT g, 9 FROM generate_series(20001, 25000) g;")
        .await
        .unwrap();
    // C: a second large one that commits while A and B are open, and a small one.
    c.batch_execute(
        "BEGIN; INSERT INTO items SELECT g, 3 FROM generate_series(30001, 33000) g; COMMIT;
         INSERT INTO items VALUES (50000, 5);",
    )
    .await
    .unwrap();
    wait_streamed(&env, 3).await;
    wait_for_json(&mut r, "item:50000", Some(json!({"id": 50000, "v": 5}))).await;
    wait_for_json(&mut r, "item:33000", Some(json!({"id": 33000, "v": 3}))).await;
    assert_eq!(get(&mut r, "item:1").await, None, "A is not committed yet");
    a.batch_execute("INSERT INTO items SELECT g, 4 FROM generate_series(3001, 3500) g; COMMIT;")
        .await
        .unwrap();
    b.batch_execute("ROLLBACK").await.unwrap();
    env.sql("INSERT INTO items VALUES (60000, 6)");
    wait_for_json(&mut r, "item:60000", Some(json!({"id": 60000, "v": 6}))).await;
    settled(&env, &mut r).await;

    assert_eq!(keys(&mut r, "item:*").await.len(), 3500 + 3000 + 2);
    for (id, v) in [
        (1, Some(2)),
        (1000, Some(2)),
        (1001, Some(1)),
        (3500, Some(4)),
    ] {
        let got = get(&mut r, &format!("item:{id}")).await;
        assert_eq!(
            got.map(|g| serde_json::from_str::<Value>(&g).unwrap()["v"].as_i64()),
            v.map(Some),
            "item:{id}"
        );
    }
    for id in [10001, 12000, 12001, 14000, 20001, 25000] {
        assert_eq!(get(&mut r, &format!("item:{id}")).await, None, "item:{id}");
    }
    daemon.stop().await.unwrap();
    env.assert_converged(ITEMS).await;
}

/// TRUNCATE and a column added inside a streamed transaction, while another session's
/// small transactions on a second table commit in between; then a small transaction on the
/// altered table (Postgres sends its schema again after a streamed commit). A column added
/// in a savepoint that rolls back, with the table written by another session before the
/// streamed transaction commits, must not change how that session's rows are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_and_schema_changes_inside_a_streamed_transaction() {
    let env = start(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         CREATE TABLE other (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO items SELECT g, 0 FROM generate_series(1, 2000) g;
         INSERT INTO other SELECT g, 0 FROM generate_series(1, 10) g;",
        "public.items,public.other",
    );
    let rules = format!("{ITEMS}\n[[tables]]\ntable = \"other\"\nkey = \"other:{{id}}\"\n");
    let daemon = InProcess::start(env.config(&rules));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    wait_backfill_done(&mut r, "public.other", Duration::from_secs(60)).await;

    let a = env.pg_client().await;
    a.batch_execute(
        "BEGIN; TRUNCATE items; ALTER TABLE items ADD COLUMN note text DEFAULT 'x';
         INSERT INTO items SELECT g, 7, 'n' || g FROM generate_series(5001, 9000) g;",
    )
    .await
    .unwrap();
    wait_streamed(&env, 1).await;
    env.sql("UPDATE other SET v = 1 WHERE id = 1");
    wait_for_json(&mut r, "other:1", Some(json!({"id": 1, "v": 1}))).await;
    assert!(
        get(&mut r, "item:1").await.is_some(),
        "the TRUNCATE is not committed"
    );
    a.batch_execute("COMMIT").await.unwrap();
    env.sql("INSERT INTO items VALUES (1, 1, 'after')");
    wait_for_json(
        &mut r,
        "item:1",
        Some(json!({"id": 1, "v": 1, "note": "after"})),
    )
    .await;
    settled(&env, &mut r).await;
    assert_eq!(get(&mut r, "item:2").await, None, "truncated");
    wait_for_json(
        &mut r,
        "item:9000",
        Some(json!({"id": 9000, "v": 7, "note": "n9000"})),
    )
    .await;
    env.assert_converged(&rules).await;

    // A column added in a savepoint that rolls back: its lock goes with it, so another
    // session writes the table before the streamed transaction commits.
    let streamed_before = streamed(&env);
    a.batch_execute(
        "BEGIN; INSERT INTO other SELECT g, 2 FROM generate_series(100, 4000) g;
         SAVEPOINT s; ALTER TABLE items ADD COLUMN extra int DEFAULT 5;
         INSERT INTO items SELECT g, 8, 'm', 6 FROM generate_series(10001, 13000) g;
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO items SELECT g, 9, 'k' FROM generate_series(14001, 17000) g;",
    )
    .await
    .unwrap();
    wait_streamed(&env, streamed_before + 1).await;
    env.sql("INSERT INTO items VALUES (2, 2, 'between')");
    wait_for_json(
        &mut r,
        "item:2",
        Some(json!({"id": 2, "v": 2, "note": "between"})),
    )
    .await;
    a.batch_execute("COMMIT").await.unwrap();
    env.sql("INSERT INTO items VALUES (3, 3, 'last')");
    wait_for_json(
        &mut r,
        "item:3",
        Some(json!({"id": 3, "v": 3, "note": "last"})),
    )
    .await;
    settled(&env, &mut r).await;
    assert_eq!(get(&mut r, "item:10001").await, None);
    wait_for_json(
        &mut r,
        "item:17000",
        Some(json!({"id": 17000, "v": 9, "note": "k"})),
    )
    .await;
    daemon.stop().await.unwrap();
    env.assert_converged(&rules).await;
}

/// Relation messages inside a stream block describe the schema as of that transaction: a
/// streamed transaction that renames the key column (which breaks the table's rule) and
/// then rolls back must leave the table running and its keys in place, and a transaction
/// committing meanwhile on it is read with the schema it was sent with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_change_in_a_rolled_back_streamed_transaction_changes_nothing() {
    let env = start(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO items SELECT g, 0 FROM generate_series(1, 100) g;
         CREATE TABLE other (id int PRIMARY KEY, v int NOT NULL);",
        "public.items,public.other",
    );
    let rules = format!("{ITEMS}\n[[tables]]\ntable = \"other\"\nkey = \"other:{{id}}\"\n");
    let daemon = InProcess::start(env.config(&rules));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    let a = env.pg_client().await;
    a.batch_execute(
        "BEGIN; INSERT INTO other SELECT g, 1 FROM generate_series(1, 3000) g;
         SAVEPOINT s; ALTER TABLE items RENAME COLUMN id TO id2;
         UPDATE items SET v = 5 WHERE id2 <= 50;
         INSERT INTO other SELECT g, 1 FROM generate_series(3001, 6000) g;",
    )
    .await
    .unwrap();
    wait_streamed(&env, 1).await;
    // Give a daemon that read the renamed schema early the time to act on it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(keys(&mut r, "item:*").await.len(), 100, "keys were dropped");
    a.batch_execute("ROLLBACK TO SAVEPOINT s; UPDATE items SET v = 6 WHERE id = 1;")
        .await
        .unwrap();
    env.sql("UPDATE items SET v = 7 WHERE id = 2");
    wait_for_json(&mut r, "item:2", Some(json!({"id": 2, "v": 7}))).await;
    assert_eq!(keys(&mut r, "item:*").await.len(), 100, "keys were dropped");
    a.batch_execute("ROLLBACK").await.unwrap();
    env.sql("UPDATE items SET v = 8 WHERE id = 3");
    wait_for_json(&mut r, "item:3", Some(json!({"id": 3, "v": 8}))).await;
    settled(&env, &mut r).await;
    assert_eq!(keys(&mut r, "item:*").await.len(), 100);
    assert_eq!(keys(&mut r, "other:*").await.len(), 0);
    wait_for_json(&mut r, "item:1", Some(json!({"id": 1, "v": 0}))).await;
    daemon.stop().await.unwrap();
    env.assert_converged(&rules).await;
}

/// The first change to a table in a streamed transaction is in a savepoint that rolls
/// back: the savepoint's rows are skipped and the rows written after it arrive. (Postgres
/// sends the table's schema tagged with the subtransaction whose change needed it; the
/// daemon skips it with the rolled-back changes, and relies on Postgres sending it again
/// with the next change after the subtransaction's abort, which this test checks.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_sent_in_a_rolled_back_savepoint_still_applies() {
    let env = start(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);",
        "public.items",
    );
    let daemon = InProcess::start(env.config(ITEMS));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    // The first change to items this session sees is in the savepoint.
    env.sql(
        "BEGIN; SAVEPOINT s; INSERT INTO items SELECT g, 1 FROM generate_series(1, 3000) g;
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO items SELECT g, 2 FROM generate_series(5001, 8000) g; COMMIT;",
    );
    wait_streamed(&env, 1).await;
    settled(&env, &mut r).await;
    assert_eq!(keys(&mut r, "item:*").await.len(), 3000);
    assert_eq!(get(&mut r, "item:1").await, None);
    wait_for_json(&mut r, "item:8000", Some(json!({"id": 8000, "v": 2}))).await;
    daemon.stop().await.unwrap();
    env.assert_converged(ITEMS).await;
}

/// A streamed transaction over a table being backfilled: the chunks and the transaction
/// meet in stream order (the watermarks), and Redis ends equal to Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_transaction_during_a_backfill_converges() {
    let env = start(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO items SELECT g, 0 FROM generate_series(1, 20000) g;",
        "public.items",
    );
    let rules = format!("[backfill]\nchunk_rows = 500\n\n{ITEMS}");
    let daemon = InProcess::start(env.config(&rules));
    let mut r = env.redis().await;
    eventually(Duration::from_secs(30), "the backfill under way", || {
        let mut r = r.clone();
        async move { get(&mut r, "item:1").await.map(drop) }
    })
    .await;
    env.sql(
        "BEGIN; UPDATE items SET v = v + 1 WHERE id % 2 = 0;
         DELETE FROM items WHERE id % 7 = 0;
         INSERT INTO items SELECT g, 1 FROM generate_series(20001, 23000) g; COMMIT;",
    );
    wait_streamed(&env, 1).await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(120)).await;
    settled(&env, &mut r).await;
    daemon.stop().await.unwrap();
    env.assert_converged(&rules).await;
}

/// The daemon killed (SIGKILL) while a streamed transaction's blocks arrive, again while
/// its commit is applied in parts (over `max_spool_bytes`), and once more as soon as a
/// streamed transaction under `max_spool_bytes` commits: after each restart Redis
/// converges, and the counter the transactions move never goes back (G1, G3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_mid_stream_and_mid_apply_lose_nothing_and_go_back_nowhere() {
    let env = start(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL); INSERT INTO items VALUES (1, 0);",
        "public.items",
    );
    let config_path = env.write_config(&format!(
        "[apply]\nmax_transaction_changes = 50\nmax_spool_bytes = \"64kB\"\n\n{ITEMS}"
    ));
    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::spawn_logging(&config_path, &log, "pgcache=info");
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;

    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let mut r = r.clone();
        let watching = watching.clone();
        tokio::spawn(async move {
            let mut highest = 0i64;
            let mut went_back = Vec::new();
            loop {
                let last = !watching.load(Ordering::Relaxed);
                if let Some(text) = get(&mut r, "item:1").await {
                    let v = serde_json::from_str::<Value>(&text).unwrap()["v"]
                        .as_i64()
                        .unwrap();
                    if v < highest {
                        went_back.push((highest, v));
                    }
                    highest = highest.max(v);
                }
                if last {
                    return (highest, went_back);
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        })
    };
    let client = env.pg_client().await;
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute(
            "DO $$ BEGIN FOR i IN 1..10000 LOOP UPDATE items SET v = v + 1 WHERE id = 1; END LOOP; END $$;
             INSERT INTO items SELECT g, 1 FROM generate_series(2, 3000) g;",
        )
        .await
        .unwrap();
    wait_streamed(&env, 1).await;
    // Killed with blocks spooled and the transaction open.
    daemon.kill9();
    let mut daemon = Daemon::spawn_logging(&config_path, &log, "pgcache=info");
    client
        .batch_execute(
            "DO $$ BEGIN FOR i IN 1..10000 LOOP UPDATE items SET v = v + 1 WHERE id = 1; END LOOP; END $$;
             COMMIT;",
        )
        .await
        .unwrap();
    // Killed while the commit is applied in parts.
    eventually(Duration::from_secs(60), "a part in Redis", || {
        let mut r = r.clone();
        async move {
            let partial: Option<String> = redis::cmd("HGET")
                .arg(CHECKPOINT)
                .arg("partial")
                .query_async(&mut r)
                .await
                .ok()?;
            partial.filter(|p| !p.is_empty()).map(drop)
        }
    })
    .await;
    daemon.kill9();
    let mut daemon = Daemon::spawn_logging(&config_path, &log, "pgcache=info");
    wait_for_json(&mut r, "item:1", Some(json!({"id": 1, "v": 20000}))).await;
    settled(&env, &mut r).await;
    assert!(
        daemon.log().contains("resuming a large transaction"),
        "{}",
        daemon.log()
    );
    assert!(daemon.terminate().success());

    // Under max_spool_bytes (applied in one EXEC): killed as soon as it commits, before
    // or while its write lands.
    std::fs::write(&config_path, env.config_toml(ITEMS)).unwrap();
    let mut daemon = Daemon::spawn_logging(&config_path, &log, "pgcache=info");
    let before = streamed(&env);
    client
        .batch_execute(
            "BEGIN; DO $$ BEGIN FOR i IN 1..10000 LOOP UPDATE items SET v = v + 1 WHERE id = 1; END LOOP; END $$;
             UPDATE items SET v = 2 WHERE id > 1; COMMIT;",
        )
        .await
        .unwrap();
    daemon.kill9();
    assert!(
        streamed(&env) > before,
        "the last transaction was not streamed"
    );
    let mut daemon = Daemon::spawn_logging(&config_path, &log, "pgcache=info");
    wait_for_json(&mut r, "item:1", Some(json!({"id": 1, "v": 30000}))).await;
    settled(&env, &mut r).await;
    watching.store(false, Ordering::Relaxed);
    let (highest, went_back) = watcher.await.unwrap();
    assert_eq!(highest, 30000);
    assert!(
        went_back.is_empty(),
        "item:1 went back: {:?}",
        &went_back[..went_back.len().min(5)]
    );
    assert!(daemon.terminate().success());
    env.assert_converged(ITEMS).await;
}

/// With `postgres.streaming = false` the server is asked for protocol version 1: nothing
/// is streamed (Postgres spills instead), and the transaction still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_off_asks_for_whole_transactions() {
    let env = start(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);",
        "public.items",
    );
    let toml = env
        .config_toml(ITEMS)
        .replace("[postgres]\n", "[postgres]\nstreaming = false\n");
    let config = Arc::new(pgcache::config::Config::from_toml_str(&toml).unwrap());
    let daemon = InProcess::start(config);
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    env.sql("INSERT INTO items SELECT g, 1 FROM generate_series(1, 4000) g");
    settled(&env, &mut r).await;
    assert_eq!(keys(&mut r, "item:*").await.len(), 4000);
    assert_eq!(streamed(&env), 0);
    let spilled: i64 = env
        .sql("SELECT coalesce(sum(spill_txns), 0) FROM pg_stat_replication_slots")
        .trim()
        .parse()
        .unwrap();
    assert!(spilled >= 1, "the server did not spill the transaction");
    daemon.stop().await.unwrap();
}

/// G8 with streaming: a million-row transaction streamed to the spool (far above the
/// default `max_spool_bytes`, so applied in parts) leaves the daemon's peak resident memory
/// as bounded as one sent whole (`stream::memory`), and every row arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_streamed_transaction_in_bounded_memory() {
    const ROWS: usize = 1_000_000;
    const LIMIT_KB: u64 = 100 * 1024;
    let env = start(
        "CREATE TABLE big (id int PRIMARY KEY, v text);",
        "public.big",
    );
    let rules = "[[tables]]\ntable = \"big\"\nkey = \"big:{id}\"\n";
    let config = env.write_config(rules);
    let mut daemon = Daemon::spawn(&config, &env.dir.path().join("daemon.log"));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.big", Duration::from_secs(60)).await;
    env.sql("INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 1000000) g");
    let mut peak_rss = 0;
    let limit = Duration::from_secs(300);
    let deadline = std::time::Instant::now() + limit;
    loop {
        let (_, rss) = memory_kb(daemon.pid()).expect("the daemon exited");
        peak_rss = peak_rss.max(rss);
        let dbsize: usize = redis::cmd("DBSIZE").query_async(&mut r).await.unwrap();
        if dbsize > ROWS && get(&mut r, "big:1000000").await.is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not applied after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    settled(&env, &mut r).await;
    let (hwm, _) = memory_kb(daemon.pid()).expect("daemon memory");
    eprintln!("streamed million-row transaction: daemon VmHWM {hwm} kB, highest VmRSS sampled {peak_rss} kB");
    assert!(streamed(&env) >= 1, "the transaction was not streamed");
    assert!(
        hwm < LIMIT_KB,
        "the daemon's peak resident memory was {hwm} kB (limit {LIMIT_KB} kB)"
    );
    assert_eq!(count_keys(&mut r, "big:*").await, ROWS as u64);
    assert_eq!(
        get(&mut r, "big:77").await.as_deref(),
        Some(r#"{"id":77,"v":"28dd2c7955ce926456240b2ff0100bde"}"#)
    );
    assert!(daemon.terminate().success());
}

/// G9: a spool directory the daemon cannot write is named by `check` (with the fix) and
/// stops `run` at once, instead of failing at the first large transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_spool_dir_is_named() {
    let env = start(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);",
        "public.items",
    );
    let rules = format!("[apply]\nspool_dir = \"/proc/pgcache-spool\"\n\n{ITEMS}");
    let path = env.write_config(&rules);
    let config = path.display().to_string();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || pgcache(&["check", "--config", &config]))
            .await
            .unwrap();
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        out.contains("FAIL apply.spool_dir: spool directory /proc/pgcache-spool: "),
        "{out}{err}"
    );
    assert!(out.contains("postgres.streaming = false"), "{out}");
    let err = InProcess::start(env.config(&rules))
        .ended(Duration::from_secs(60))
        .await
        .expect_err("the daemon ran without a spool directory");
    assert!(
        err.to_string()
            .contains("apply.spool_dir: spool directory /proc/pgcache-spool"),
        "{err}"
    );
}

/// A default spool directory that cannot be written (a container with a read-only file
/// system, here `TMPDIR` pointing nowhere writable) is not fatal: the daemon says so and
/// asks for whole transactions, as before it could stream them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_default_spool_dir_falls_back_to_whole_transactions() {
    let env = start(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);",
        "public.items",
    );
    let config = env.write_config(ITEMS);
    let log = env.dir.path().join("daemon.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgcache"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("TMPDIR", "/proc/pgcache-no-tmp")
        .env("RUST_LOG", "pgcache=info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    env.sql("INSERT INTO items SELECT g, 1 FROM generate_series(1, 4000) g");
    settled(&env, &mut r).await;
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(keys(&mut r, "item:*").await.len(), 4000, "{log}");
    assert_eq!(streamed(&env), 0, "{log}");
    assert!(
        log.contains(
            "large transactions are not streamed: the default spool directory cannot be written"
        ),
        "{log}"
    );
}

/// G4: a streamed transaction whose commit waits for a synchronous standby that never
/// answers is committed in the WAL (Stream Commit arrives) but invisible to other sessions:
/// the daemon applies none of it until it is visible, then all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_commit_not_yet_visible_is_held_back() {
    const N: i32 = 3000;
    let env = start(
        &format!("CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL); INSERT INTO items SELECT g, 0 FROM generate_series(1, {N}) g;"),
        "public.items",
    );
    let daemon = InProcess::start(env.config(ITEMS));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    env.sql("ALTER SYSTEM SET synchronous_standby_names = 'nobody'; SELECT pg_reload_conf();");
    let writer = env.pg_client().await;
    let pid: i32 = writer
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let waiting = tokio::spawn(async move {
        writer
            .batch_execute("SET synchronous_commit = on; BEGIN; UPDATE items SET v = 1; COMMIT;")
            .await
    });
    let admin = env.pg_client().await;
    eventually(Duration::from_secs(20), "the commit to wait for its standby", || {
        let admin = &admin;
        async move {
            let waits: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'SyncRep'",
                    &[&pid],
                )
                .await
                .ok()?
                .get(0);
            (waits == 1).then_some(())
        }
    })
    .await;
    wait_streamed(&env, 1).await;
    // Streamed and committed in the WAL: give the daemon time to do the wrong thing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        values(&mut r, N).await.iter().all(|v| *v == Some(0)),
        "a streamed commit invisible to other sessions reached Redis"
    );
    admin
        .execute("SELECT pg_cancel_backend($1)", &[&pid])
        .await
        .unwrap();
    let _ = waiting.await.unwrap();
    env.sql("ALTER SYSTEM RESET synchronous_standby_names; SELECT pg_reload_conf();");
    eventually(Duration::from_secs(30), "the transaction applied", || {
        let mut r = r.clone();
        async move {
            values(&mut r, N)
                .await
                .iter()
                .all(|v| *v == Some(1))
                .then_some(())
        }
    })
    .await;
    daemon.stop().await.unwrap();
    env.assert_converged(ITEMS).await;
}

/// A streamed transaction that commits renames the cached table inside a savepoint, writes
/// to it under the new name, and rolls the savepoint back. The rename never happened: the
/// table must not be stopped (its keys dropped, later changes ignored), and a later change
/// arrives. (From the review.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_rolled_back_in_a_savepoint_of_a_streamed_transaction_changes_nothing() {
    let env = start(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO items SELECT g, 0 FROM generate_series(1, 100) g;
         CREATE TABLE other (id int PRIMARY KEY, v int NOT NULL);",
        "public.items,public.other",
    );
    let daemon = InProcess::start(env.config(ITEMS));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    let before = streamed(&env);
    let a = env.pg_client().await;
    a.batch_execute(
        "BEGIN; INSERT INTO other SELECT g, 1 FROM generate_series(1, 3000) g;
         SAVEPOINT s; ALTER TABLE items RENAME TO items_x;
         UPDATE items_x SET v = 5 WHERE id <= 50;
         INSERT INTO other SELECT g, 1 FROM generate_series(3001, 6000) g;",
    )
    .await
    .unwrap();
    wait_streamed(&env, before + 1).await;
    a.batch_execute("ROLLBACK TO SAVEPOINT s; UPDATE items SET v = 6 WHERE id = 1; COMMIT;")
        .await
        .unwrap();
    env.sql("UPDATE items SET v = 7 WHERE id = 2");
    wait_for_json(&mut r, "item:2", Some(json!({"id": 2, "v": 7}))).await;
    wait_for_json(&mut r, "item:1", Some(json!({"id": 1, "v": 6}))).await;
    settled(&env, &mut r).await;
    assert_eq!(keys(&mut r, "item:*").await.len(), 100, "keys were dropped");
    let stopped: Option<String> = redis::cmd("HGET")
        .arg(CHECKPOINT)
        .arg("stopped")
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(
        stopped.as_deref().is_none_or(str::is_empty),
        "stopped: {stopped:?}"
    );
    daemon.stop().await.unwrap();
    env.assert_converged(ITEMS).await;
}
