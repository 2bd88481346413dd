//! Backfill: existing rows reach Redis, live changes during the backfill are never
//! overwritten by older rows, and it survives kill -9, FLUSHALL and new tables.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::common::{
    backfill_progress, eventually, pgcache, wait_backfill_done, Daemon, Env, InProcess, DB,
};

/// 100,000 rows that exist before the slot does: only a backfill can bring them.
const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, v bigint NOT NULL, note text);
                     INSERT INTO items SELECT g, 0, 'row ' || g FROM generate_series(1, 100000) g;";
const RULE: &str =
    "[backfill]\nchunk_rows = 2000\n\n[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";

/// Database rows as the JSON the daemon writes for this table: id -> (v, note).
async fn db_items(client: &tokio_postgres::Client) -> HashMap<i32, (i64, String)> {
    client
        .query("SELECT id, v, note FROM items", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect()
}

/// Every `item:*` key in Redis, parsed.
async fn redis_items(r: &mut redis::aio::MultiplexedConnection) -> HashMap<i32, (i64, String)> {
    let mut keys: Vec<String> = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("item:*")
            .arg("COUNT")
            .arg(5000)
            .query_async(r)
            .await
            .unwrap();
        keys.extend(
            batch
                .into_iter()
                .filter(|k| !k.ends_with(pgcache::template::LEASE_SUFFIX)),
        );
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let mut out = HashMap::new();
    for chunk in keys.chunks(1000) {
        let values: Vec<Option<String>> =
            redis::cmd("MGET").arg(chunk).query_async(r).await.unwrap();
        for value in values.into_iter().flatten() {
            let json: serde_json::Value = serde_json::from_str(&value).unwrap();
            out.insert(
                json["id"].as_i64().unwrap() as i32,
                (
                    json["v"].as_i64().unwrap(),
                    json["note"].as_str().unwrap().to_string(),
                ),
            );
        }
    }
    out
}

async fn assert_converged(env: &Env, r: &mut redis::aio::MultiplexedConnection, limit: Duration) {
    let client = env.pg_client().await;
    let deadline = Instant::now() + limit;
    loop {
        let expected = db_items(&client).await;
        let actual = redis_items(r).await;
        if expected == actual {
            return;
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = expected
                .keys()
                .filter(|k| !actual.contains_key(k))
                .take(5)
                .collect();
            let extra: Vec<_> = actual
                .keys()
                .filter(|k| !expected.contains_key(k))
                .take(5)
                .collect();
            let stale: Vec<_> = expected
                .iter()
                .filter(|(k, v)| actual.get(k).is_some_and(|a| a != *v))
                .take(5)
                .collect();
            panic!(
                "Redis differs from the database: {} rows vs {} keys; missing {missing:?}, extra {extra:?}, stale {stale:?}",
                expected.len(),
                actual.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Updates, deletes and inserts on `items` until `stop`. Deleted ids are recorded.
fn start_workload(
    url: String,
    stop: Arc<AtomicBool>,
    deleted: Arc<Mutex<HashSet<i32>>>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut next_id = 100_001;
        let mut done = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let (op, id) = {
                let mut rng = rand::thread_rng();
                (rng.gen_range(0..10), rng.gen_range(1..=100_000))
            };
            let result = match op {
                0 => {
                    let r = client
                        .execute("DELETE FROM items WHERE id = $1", &[&id])
                        .await;
                    deleted.lock().unwrap().insert(id);
                    r
                }
                1 => {
                    next_id += 1;
                    client
                        .execute("INSERT INTO items VALUES ($1, 1, 'new')", &[&next_id])
                        .await
                }
                _ => {
                    client
                        .execute(
                            "UPDATE items SET v = v + 1, note = 'changed' WHERE id = $1",
                            &[&id],
                        )
                        .await
                }
            };
            if result.is_ok() {
                done += 1;
            } else {
                // Yield: a loop of instant errors (the servers gone after a failed assertion)
                // would keep the runtime from shutting down, and the test would hang rather
                // than report its failure.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        done
    })
}

/// Fails if any sampled key's `v` goes down, or a deleted key comes back after it was seen
/// gone.
fn start_watcher(
    mut r: redis::aio::MultiplexedConnection,
    stop: Arc<AtomicBool>,
    deleted: Arc<Mutex<HashSet<i32>>>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut high: HashMap<i32, i64> = HashMap::new();
        let mut gone: HashSet<i32> = HashSet::new();
        let mut polls = 0;
        while !stop.load(Ordering::Relaxed) {
            let ids: Vec<i32> = {
                let mut rng = rand::thread_rng();
                (0..200).map(|_| rng.gen_range(1..=100_000)).collect()
            };
            let keys: Vec<String> = ids.iter().map(|id| format!("item:{id}")).collect();
            let Ok(values) = redis::cmd("MGET")
                .arg(&keys)
                .query_async::<Vec<Option<String>>>(&mut r)
                .await
            else {
                // As in the workload: yield, so a failed test ends rather than spins.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let deleted_now = deleted.lock().unwrap().clone();
            for (id, value) in ids.into_iter().zip(values) {
                match value {
                    Some(text) => {
                        assert!(
                            !gone.contains(&id),
                            "item:{id} came back after its row was deleted"
                        );
                        let v = serde_json::from_str::<serde_json::Value>(&text).unwrap()["v"]
                            .as_i64()
                            .unwrap();
                        let seen = high.entry(id).or_insert(v);
                        assert!(v >= *seen, "item:{id} went back from v={seen} to v={v}");
                        *seen = v;
                    }
                    None if deleted_now.contains(&id) && high.contains_key(&id) => {
                        gone.insert(id);
                    }
                    None => {}
                }
            }
            polls += 1;
        }
        polls
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_under_live_writes_converges_without_going_back() {
    let env = Env::start(ITEMS, "public.items");
    let mut r = env.redis().await;
    let stop = Arc::new(AtomicBool::new(false));
    let deleted = Arc::new(Mutex::new(HashSet::new()));
    let workload = start_workload(env.pg.url(DB), stop.clone(), deleted.clone());
    let watcher = start_watcher(r.clone(), stop.clone(), deleted.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let daemon = InProcess::start(env.config(RULE));
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(240)).await;
    stop.store(true, Ordering::Relaxed);
    let writes = workload.await.unwrap();
    let polls = watcher
        .await
        .expect("no key went back and no deleted row came back");
    assert!(
        writes > 100,
        "the workload ran during the backfill ({writes} writes)"
    );
    assert!(polls > 5, "the watcher polled ({polls})");
    let p = backfill_progress(&mut r, "public.items").await.unwrap();
    assert!(
        p["rows"].as_u64().unwrap() >= 99_000,
        "progress counts rows: {p}"
    );
    assert_converged(&env, &mut r, Duration::from_secs(60)).await;
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_resumes_after_kill9() {
    let env = Env::start(ITEMS, "public.items");
    let config = env.write_config(&RULE.replace("chunk_rows = 2000", "chunk_rows = 500"));
    let log = env.dir.path().join("daemon.log");
    let mut r = env.redis().await;
    let stop = Arc::new(AtomicBool::new(false));
    let deleted = Arc::new(Mutex::new(HashSet::new()));
    let workload = start_workload(env.pg.url(DB), stop.clone(), deleted.clone());
    let watcher = start_watcher(r.clone(), stop.clone(), deleted.clone());
    let mut daemon = Daemon::spawn(&config, &log);
    // Kill it in the middle of the backfill, twice (or once, if the resumed backfill ends
    // before the second kill can catch it under way).
    for round in 0..2 {
        // Seconds, even in a debug build. (A busy stream once starved the chunk reads, which
        // run beside the stream on the daemon's one thread, and this took minutes.) The
        // limit is generous for a machine busy with builds (a CI run once took over 60 s).
        let running = eventually(Duration::from_secs(180), "backfill to be under way", || {
            let mut r = r.clone();
            async move {
                let p = backfill_progress(&mut r, "public.items").await?;
                if p["state"] == "done" {
                    return Some(false);
                }
                (p["state"] == "running" && p["rows"].as_u64()? >= 5_000).then_some(true)
            }
        })
        .await;
        if !running {
            assert!(
                round > 0,
                "the backfill ended before it could be killed once: the test needs more rows"
            );
            break;
        }
        daemon.kill9();
        let rows = backfill_progress(&mut r, "public.items").await.unwrap()["rows"]
            .as_u64()
            .unwrap();
        daemon = Daemon::spawn(&config, &log);
        // It resumes from the cursor rather than starting over.
        eventually(
            Duration::from_secs(180),
            "backfill to move on from its cursor",
            || {
                let mut r = r.clone();
                async move {
                    let p = backfill_progress(&mut r, "public.items").await?;
                    (p["rows"].as_u64()? > rows).then_some(())
                }
            },
        )
        .await;
        let p = backfill_progress(&mut r, "public.items").await.unwrap();
        assert!(
            p["rows"].as_u64().unwrap() > rows,
            "resumed, not restarted: {p}"
        );
        if p["state"] == "done" {
            break;
        }
    }
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    stop.store(true, Ordering::Relaxed);
    workload.await.unwrap();
    watcher
        .await
        .expect("no key went back and no deleted row came back");
    assert_converged(&env, &mut r, Duration::from_secs(60)).await;
    assert!(daemon.terminate().success(), "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_under_a_running_daemon_is_noticed_and_backfilled() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v bigint NOT NULL, note text);
         INSERT INTO items SELECT g, 0, 'row ' || g FROM generate_series(1, 5000) g;",
        "public.items",
    );
    let daemon = InProcess::start(env.config(RULE));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    assert_converged(&env, &mut r, Duration::from_secs(30)).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut r).await.unwrap();
    // No write needed: the heartbeat notices within seconds; a write would too.
    assert_converged(&env, &mut r, Duration::from_secs(60)).await;
    env.sql("UPDATE items SET v = 7 WHERE id = 9");
    assert_converged(&env, &mut r, Duration::from_secs(30)).await;
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_command_and_tables_added_later() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v bigint NOT NULL, note text);
         INSERT INTO items SELECT g, 0, 'row ' || g FROM generate_series(1, 3000) g;
         CREATE TABLE tags (id int PRIMARY KEY, name text);
         INSERT INTO tags SELECT g, 'tag ' || g FROM generate_series(1, 300) g;",
        "public.items,public.tags",
    );
    let mut r = env.redis().await;
    // First run: only items is configured.
    let daemon = InProcess::start(env.config(RULE));
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    daemon.stop().await.expect("clean stop");
    assert!(backfill_progress(&mut r, "public.tags").await.is_none());

    // tags appears in the config: backfilled on the next start, items is not redone.
    let both = format!("{RULE}\n[[tables]]\ntable = \"tags\"\nkey = \"tag:{{id}}\"\n");
    let items_before = backfill_progress(&mut r, "public.items").await.unwrap();
    let config = env.write_config(&both);
    let mut daemon = Daemon::spawn(&config, &env.dir.path().join("daemon.log"));
    wait_backfill_done(&mut r, "public.tags", Duration::from_secs(60)).await;
    let tag: String = redis::cmd("GET")
        .arg("tag:300")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(tag, r#"{"id":300,"name":"tag 300"}"#);
    assert_eq!(
        backfill_progress(&mut r, "public.items").await.unwrap()["started_ms"],
        items_before["started_ms"]
    );

    // Corrupt a key by hand; `pgcache resync --table items` repairs it through the stream.
    let _: () = redis::cmd("SET")
        .arg("item:42")
        .arg("garbage")
        .query_async(&mut r)
        .await
        .unwrap();
    let (code, stdout, stderr) = pgcache(&[
        "resync",
        "--config",
        config.to_str().unwrap(),
        "--table",
        "items",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    eventually(
        Duration::from_secs(60),
        "item:42 repaired by the resync",
        || {
            let mut r = r.clone();
            async move {
                let v: Option<String> = redis::cmd("GET")
                    .arg("item:42")
                    .query_async(&mut r)
                    .await
                    .ok()?;
                (v.as_deref() == Some(r#"{"id":42,"v":0,"note":"row 42"}"#)).then_some(())
            }
        },
    )
    .await;
    // A table that is not in the config is refused with a clear message.
    let (code, _, stderr) = pgcache(&[
        "resync",
        "--config",
        config.to_str().unwrap(),
        "--table",
        "nope",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("public.nope is not a table"), "{stderr}");
    assert!(daemon.terminate().success(), "{}", daemon.log());
}

/// A backfill Postgres refuses (here the daemon's role lost `SELECT` on the table while it
/// ran, then a resync was asked for) is logged with the server's own code and message: the
/// log said only "db error" before, which tells an operator nothing. (And the log, a file
/// here, had a terminal's colour codes in it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_backfill_is_logged_with_the_servers_message() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO items SELECT g, g FROM generate_series(1, 50) g;",
        "public.items",
    );
    let rule = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";
    let url = env.pg.url_as("pgcache", Some("pgcache-secret"), DB);
    let path = env.dir.path().join("role.toml");
    std::fs::write(
        &path,
        env.config_toml(rule).replacen(&env.pg.url(DB), &url, 1),
    )
    .unwrap();
    let mut daemon =
        Daemon::spawn_logging(&path, &env.dir.path().join("daemon.log"), "pgcache=info");
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;

    env.sql("REVOKE SELECT ON items FROM pgcache");
    let (code, stdout, stderr) = pgcache(&[
        "resync",
        "--config",
        path.to_str().unwrap(),
        "--table",
        "items",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let log = eventually(
        Duration::from_secs(60),
        "the refused backfill in the log",
        || {
            let text = daemon.log();
            async move { text.contains("backfill of public.items: ").then_some(text) }
        },
    )
    .await;
    let line = log
        .lines()
        .find(|l| l.contains("backfill of public.items: "))
        .unwrap();
    assert!(
        line.contains("42501") && line.contains("permission denied for table items"),
        "{line}"
    );
    // A log written to a file is plain text, without a terminal's colour codes.
    assert!(!log.contains('\u{1b}'), "{line}");
    // The rows already in Redis stay.
    let one: Option<String> = redis::cmd("GET")
        .arg("item:1")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(one.as_deref(), Some(r#"{"id":1,"v":1}"#));
    assert!(daemon.terminate().success(), "{}", daemon.log());
}
