//! A randomized soak: a random workload (updates that leave a TOASTed column untouched,
//! inserts, deletes, key changes, large transactions) while faults and edge operations
//! come at random (daemon kill -9 and pause, FLUSHALL, a Postgres restart, `resync`, an
//! `ALTER TABLE`, a commit held by a synchronous standby that never answers, the table
//! swapped for a published copy). Readers flag
//! any row they see go back; at the end `verify` must find Redis equal to Postgres.
//!
//! Seeded and reproducible in what it chooses: `PGCACHE_SOAK_SEED=<n>` (the seed is
//! printed), `PGCACHE_SOAK_SECS=<n>` for a longer run (default 60).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgcache::reader::ReaderOptions;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::{eventually, pgcache, wait_backfill_done, wait_streaming, Daemon, Env};

const SCHEMA: &str =
    "CREATE TABLE items (id int PRIMARY KEY, v bigint NOT NULL, small int NOT NULL, body text);
    INSERT INTO items SELECT g, 0, 0, CASE WHEN g % 3 = 0
        THEN (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 96) i)
        ELSE 'short' END FROM generate_series(1, 300) g;
    CREATE TABLE counters (id int PRIMARY KEY, v bigint NOT NULL);
    INSERT INTO counters SELECT g, 0 FROM generate_series(1, 200) g;";
const RULES: &str = "[backfill]\nchunk_rows = 100\n\n\
    [[tables]]\ntable = \"items\"\nkey = \"it:{id}\"\n\n\
    [[tables]]\ntable = \"counters\"\nkey = \"ct:{id}\"\nmode = \"refresh\"\nttl = \"3s\"\n";

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
        .unwrap_or(default)
}

/// Per row: (value, call start, call end) of every read that found it.
type Seen = Arc<Mutex<HashMap<(&'static str, i64), Vec<(i64, u128, u128)>>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_faults_and_edges_leave_no_drift() {
    let seed = env_number("PGCACHE_SOAK_SEED", rand::random::<u32>().into());
    let secs = env_number("PGCACHE_SOAK_SECS", 60);
    println!("soak: PGCACHE_SOAK_SEED={seed} PGCACHE_SOAK_SECS={secs}");
    let mut env = Env::start(SCHEMA, "public.items,public.counters");
    let config_path = env.write_config(RULES);
    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::spawn_logging(&config_path, &log, "pgcache=info");
    let mut r = env.redis().await;
    wait_streaming(&mut r).await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let next_id = Arc::new(AtomicI32::new(1_000));
    let seen: Seen = Arc::default();
    let mut tasks = Vec::new();
    // The workload.
    for w in 0..2u64 {
        let url = env.pg.url(crate::common::DB);
        let (stop, next_id) = (stop.clone(), next_id.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(w));
            let mut done = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                tokio::spawn(conn);
                while !stop.load(Ordering::Relaxed) {
                    let id = rng.gen_range(1..=300);
                    let sql = match rng.gen_range(0..20) {
                        0..=7 => {
                            format!("UPDATE items SET v = v + 1, small = small + 1 WHERE id = {id}")
                        }
                        8..=13 => format!(
                            "UPDATE counters SET v = v + 1 WHERE id = {}",
                            rng.gen_range(1..=200)
                        ),
                        14 | 15 => format!(
                            "INSERT INTO items VALUES ({}, 0, 0, 'new')",
                            next_id.fetch_add(1, Ordering::Relaxed)
                        ),
                        16 => format!("DELETE FROM items WHERE id = {id}"),
                        17 => format!(
                            "UPDATE items SET id = {}, v = v + 1 WHERE id = {id}",
                            next_id.fetch_add(1, Ordering::Relaxed)
                        ),
                        _ => "DO $$ BEGIN FOR i IN 1..300 LOOP UPDATE counters SET v = v + 1 \
                              WHERE id = 1 + (i % 200); END LOOP; END $$"
                            .to_string(),
                    };
                    match client.batch_execute(&sql).await {
                        Ok(()) => done += 1,
                        Err(e) if e.is_closed() => break,
                        Err(_) => {}
                    }
                    // A steady load rather than a flood: the daemon (a debug build here)
                    // should keep up between faults, so that readers are not all waiting.
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            }
            done
        }));
    }
    // Readers.
    let config = pgcache::config::Config::load(&config_path).unwrap();
    let reader = pgcache::Reader::from_config_with(&config, ReaderOptions::default()).unwrap();
    for t in 0..4u64 {
        let (stop, seen, reader) = (stop.clone(), seen.clone(), reader.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(100 + t));
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (table, id) = if rng.gen_bool(0.75) {
                    ("items", rng.gen_range(1..=300))
                } else {
                    ("counters", rng.gen_range(1..=200))
                };
                let start = now_ns();
                if let Ok(Some(value)) = reader.get_json(table, id).await {
                    let v = value["v"].as_i64().unwrap();
                    seen.lock()
                        .unwrap()
                        .entry((table, id))
                        .or_default()
                        .push((v, start, now_ns()));
                    reads += 1;
                }
            }
            reads
        }));
    }

    // Faults and edge operations.
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1_000));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut faults: Vec<&str> = Vec::new();
    let mut added_columns = 0;
    let mut swaps = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1_500..4_000))).await;
        let fault = match rng.gen_range(0..9) {
            0 => {
                daemon.kill9();
                daemon = Daemon::spawn_logging(&config_path, &log, "pgcache=info");
                "daemon kill -9"
            }
            1 => {
                daemon.pause();
                tokio::time::sleep(Duration::from_millis(rng.gen_range(500..2_500))).await;
                daemon.resume();
                "daemon paused"
            }
            2 => {
                let _: () = redis::cmd("FLUSHALL").query_async(&mut r).await.unwrap();
                "FLUSHALL"
            }
            3 => {
                env.pg.restart().unwrap();
                "Postgres restart"
            }
            4 => {
                env.sql("SELECT pgcache.emit('resync', 'public.items')");
                "resync"
            }
            5 if added_columns < 3 => {
                added_columns += 1;
                env.sql(&format!(
                    "ALTER TABLE items ADD COLUMN extra{added_columns} int NOT NULL DEFAULT {added_columns}"
                ));
                "ALTER TABLE ADD COLUMN"
            }
            6 => {
                env.sql("ALTER SYSTEM SET synchronous_standby_names = 'nobody'; SELECT pg_reload_conf();");
                let client = env.pg_client().await;
                let pid: i32 = client
                    .query_one("SELECT pg_backend_pid()", &[])
                    .await
                    .unwrap()
                    .get(0);
                let held = tokio::spawn(async move {
                    client
                        .batch_execute("SET synchronous_commit = on; UPDATE counters SET v = v + 1 WHERE id = 7")
                        .await
                });
                tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1_500))).await;
                env.sql(&format!(
                    "SELECT pg_cancel_backend({pid}); ALTER SYSTEM RESET synchronous_standby_names; SELECT pg_reload_conf();"
                ));
                let _ = held.await;
                "commit held by a synchronous standby"
            }
            7 if swaps < 2 => {
                // A reload: the mirror table swapped for a published copy, in one
                // transaction, with no row change under the old table after it.
                swaps += 1;
                env.sql(&format!(
                    "BEGIN;
                     CREATE TABLE items_copy{swaps} (LIKE items INCLUDING ALL);
                     GRANT SELECT ON items_copy{swaps} TO pgcache;
                     LOCK TABLE items IN EXCLUSIVE MODE;
                     INSERT INTO items_copy{swaps} SELECT * FROM items;
                     ALTER TABLE items RENAME TO items_old{swaps};
                     ALTER TABLE items_copy{swaps} RENAME TO items;
                     ALTER PUBLICATION pgcache ADD TABLE items;
                     DROP TABLE items_old{swaps};
                     COMMIT;"
                ));
                "table swapped for a published copy"
            }
            _ => "none",
        };
        faults.push(fault);
    }
    stop.store(true, Ordering::Relaxed);
    let mut counts = Vec::new();
    for task in tasks {
        counts.push(task.await.unwrap());
    }

    // The end: the daemon catches up, Redis equals Postgres, and no read went back.
    let client = env.pg_client().await;
    let lsn: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let want = pgcache::checkpoint::hex(lsn.parse().unwrap());
    eventually(Duration::from_secs(120), "the daemon to catch up", || {
        let mut r = r.clone();
        let want = want.clone();
        async move {
            let applied: Option<String> = redis::cmd("HGET")
                .arg("pgcache:{pgcache}:checkpoint")
                .arg("applied")
                .query_async(&mut r)
                .await
                .ok()?;
            applied.filter(|a| *a >= want).map(drop)
        }
    })
    .await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(120)).await;
    let config = config_path.display().to_string();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        pgcache(&["verify", "--config", &config, "--table", "public.items"])
    })
    .await
    .unwrap();
    let mut back = Vec::new();
    let mut reads = 0;
    for ((table, id), mut calls) in seen.lock().unwrap().drain() {
        reads += calls.len();
        let mut ends = calls.clone();
        ends.sort_by_key(|c| c.2);
        calls.sort_by_key(|c| c.1);
        let (mut done, mut highest) = (0, i64::MIN);
        for (v, start, _) in calls {
            while done < ends.len() && ends[done].2 < start {
                highest = highest.max(ends[done].0);
                done += 1;
            }
            if v < highest {
                back.push(format!("{table} {id}: {v} after {highest}"));
            }
        }
    }
    println!(
        "soak: seed {seed}, {secs} s, workload and reads {counts:?}, {reads} reads checked, faults {faults:?}"
    );
    assert_eq!(
        code,
        0,
        "verify (seed {seed}):\n{out}{err}\n{}",
        daemon.log()
    );
    assert!(
        back.is_empty(),
        "seed {seed}: {} reads went back, e.g. {:?}",
        back.len(),
        &back[..back.len().min(10)]
    );
    daemon.terminate();
}
