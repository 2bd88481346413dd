//! G10, monotonic reads: once any reader has seen a row at some version, no reader sees an
//! older one later, across fills, the stream, a lagging daemon, a daemon killed with
//! SIGKILL, and Redis losing its data.
//!
//! Readers in three processes read random rows of a `refresh` table (with a TTL, and keys
//! evicted at random, so misses and fills never stop) and of a `mirror` table, while two
//! writers increment random rows. Every reader records each value with the wall-clock
//! interval of the call that returned it; afterwards, any value returned by a call that
//! *started after* another call returned a higher value for the same row is a violation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;

use super::*;
use crate::common::{wait_backfill_done, wait_streaming, Daemon, Env};

const ROWS: i64 = 200;
const SCHEMA: &str = "CREATE TABLE counters_r (id int PRIMARY KEY, v bigint NOT NULL);
    CREATE TABLE counters_m (id int PRIMARY KEY, v bigint NOT NULL);
    INSERT INTO counters_r SELECT g, 0 FROM generate_series(1, 200) g;
    INSERT INTO counters_m SELECT g, 0 FROM generate_series(1, 200) g;";
const RULES: &str =
    "[[tables]]\ntable = \"counters_r\"\nkey = \"cr:{id}\"\nmode = \"refresh\"\nttl = \"2s\"\n\n\
                     [[tables]]\ntable = \"counters_m\"\nkey = \"cm:{id}\"\n";
const TABLES: [&str; 2] = ["counters_r", "counters_m"];

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// One reader process: tasks read random rows until the stop file appears, then write what
/// they saw (`table id v start_ns end_ns` per line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monotonic_worker() {
    if std::env::var(WORKER_MODE).as_deref() != Ok("monotonic") {
        return;
    }
    let config = Config::load(Path::new(&std::env::var(WORKER_CONFIG).unwrap())).unwrap();
    let dir = PathBuf::from(std::env::var(WORKER_DIR).unwrap());
    let tasks: usize = std::env::var(WORKER_TASKS).unwrap().parse().unwrap();
    let reader = reader(&config, ReaderOptions::default());
    let stop = dir.join("stop");
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let reader = reader.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut errors = 0;
                let mut n = 0u64;
                while n % 64 != 0 || !stop.exists() {
                    n += 1;
                    let (table, id) = {
                        let mut rng = rand::thread_rng();
                        (TABLES[rng.gen_range(0..2)], rng.gen_range(1..=ROWS))
                    };
                    let start = now_ns();
                    match reader.get_json(table, id).await {
                        Ok(value) => {
                            let v = value.map_or(-1, |v| v["v"].as_i64().unwrap());
                            seen.push(format!("{table} {id} {v} {start} {}", now_ns()));
                        }
                        // Servers restarting: a lookup may fail; it never lies.
                        Err(_) => errors += 1,
                    }
                }
                (seen, errors)
            })
        })
        .collect();
    let mut lines = Vec::new();
    let mut errors = 0;
    for handle in handles {
        let (seen, e) = handle.await.unwrap();
        lines.extend(seen);
        errors += e;
    }
    std::fs::write(
        dir.join(format!("seen-{}", std::process::id())),
        lines.join("\n"),
    )
    .unwrap();
    let result =
        json!({ "reads": lines.len(), "errors": errors, "stats": stats_json(&reader.stats()) });
    println!("\n{RESULT_PREFIX}{result}");
}

/// A read: the value, and when the call started and returned.
struct Seen {
    v: i64,
    start: u128,
    end: u128,
}

/// Calls that started after another call for the same row had returned a higher value.
fn violations(seen: &HashMap<(String, i64), Vec<Seen>>) -> Vec<String> {
    let mut found = Vec::new();
    for ((table, id), reads) in seen {
        let mut by_start: Vec<&Seen> = reads.iter().collect();
        by_start.sort_by_key(|s| s.start);
        let mut by_end: Vec<&Seen> = reads.iter().collect();
        by_end.sort_by_key(|s| s.end);
        let (mut done, mut highest) = (0, i64::MIN);
        for read in by_start {
            while done < by_end.len() && by_end[done].end < read.start {
                highest = highest.max(by_end[done].v);
                done += 1;
            }
            if read.v < highest {
                found.push(format!(
                    "{table} {id}: read {} after {highest} was returned",
                    read.v
                ));
            }
        }
    }
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reader_sees_a_row_go_back() {
    const PROCESSES: usize = 3;
    const TASKS: usize = 6;
    let env = Env::start(SCHEMA, "public.counters_r,public.counters_m");
    let config_path = env.write_config(RULES);
    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::spawn_logging(&config_path, &log, "pgcache=info");
    let mut r = env.redis().await;
    wait_streaming(&mut r).await;
    wait_backfill_done(&mut r, "public.counters_m", Duration::from_secs(60)).await;

    let dir = tempfile::tempdir().unwrap();
    let mut workers: Vec<Child> = (0..PROCESSES)
        .map(|_| {
            worker_command(
                "reader::monotonic::monotonic_worker",
                "monotonic",
                &config_path,
                dir.path(),
            )
            .env(WORKER_TASKS, TASKS.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();

    // Two writers increment random rows; a chaos task evicts refresh keys, so that misses
    // and fills go on all the time.
    let stop = Arc::new(AtomicBool::new(false));
    let mut background = Vec::new();
    for _ in 0..2 {
        let client = env.pg_client().await;
        let stop = stop.clone();
        background.push(tokio::spawn(async move {
            let mut writes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (table, id) = {
                    let mut rng = rand::thread_rng();
                    (TABLES[rng.gen_range(0..2)], rng.gen_range(1..=ROWS) as i32)
                };
                let sql = format!("UPDATE {table} SET v = v + 1 WHERE id = $1");
                match client.execute(&sql, &[&id]).await {
                    Ok(_) => writes += 1,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            writes
        }));
    }
    {
        let mut r = r.clone();
        let stop = stop.clone();
        background.push(tokio::spawn(async move {
            let mut evicted = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = rand::thread_rng().gen_range(1..=ROWS);
                if redis::cmd("DEL")
                    .arg(format!("cr:{id}"))
                    .query_async::<i64>(&mut r)
                    .await
                    .is_ok()
                {
                    evicted += 1;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            evicted
        }));
    }

    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    // The daemon lags: longer than the readers' max_lag_wait.
    daemon.pause();
    tokio::time::sleep(Duration::from_secs(3)).await;
    daemon.resume();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The daemon dies mid-stream and comes back.
    daemon.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut daemon = Daemon::spawn_logging(&config_path, &log, "pgcache=info");
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Redis loses its data under the running daemon.
    let _: () = redis::cmd("FLUSHALL").query_async(&mut r).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;

    stop.store(true, Ordering::Relaxed);
    let mut counts = Vec::new();
    for task in background {
        counts.push(task.await.unwrap());
    }
    std::fs::write(dir.path().join("stop"), "").unwrap();
    let mut results = Vec::new();
    for worker in &mut workers {
        results.push(worker_result(worker, Duration::from_secs(60)));
    }
    let elapsed = started.elapsed();

    let mut seen: HashMap<(String, i64), Vec<Seen>> = HashMap::new();
    let mut reads = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("seen-")
        {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let f: Vec<&str> = line.split(' ').collect();
            reads += 1;
            seen.entry((f[0].to_string(), f[1].parse().unwrap()))
                .or_default()
                .push(Seen {
                    v: f[2].parse().unwrap(),
                    start: f[3].parse().unwrap(),
                    end: f[4].parse().unwrap(),
                });
        }
    }
    let absent: usize = seen.values().flatten().filter(|s| s.v < 0).count();
    let found = violations(&seen);
    assert!(
        reads > 1_000,
        "too few reads to mean anything: {reads} ({results:?})"
    );
    assert_eq!(absent, 0, "rows that exist were read as absent");
    assert!(
        found.is_empty(),
        "{} reads went back in time (of {reads}, writes and evictions {counts:?}, {elapsed:?}), e.g. {:?}\n{results:?}\n{}",
        found.len(),
        &found[..found.len().min(10)],
        daemon.log()
    );
    println!("{reads} reads, writes and evictions {counts:?}, {elapsed:?}; {results:?}");
    daemon.terminate();
}

/// Waits for a worker and returns the JSON it printed.
fn worker_result(worker: &mut Child, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = worker.try_wait().unwrap() {
            let mut out = String::new();
            std::io::Read::read_to_string(worker.stdout.as_mut().unwrap(), &mut out).unwrap();
            assert!(status.success(), "worker failed: {out}");
            let line = out
                .lines()
                .find_map(|l| l.strip_prefix(RESULT_PREFIX))
                .unwrap_or_else(|| panic!("no result from a worker: {out}"));
            return serde_json::from_str(line).unwrap();
        }
        assert!(Instant::now() < deadline, "a worker did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_checker_finds_a_value_that_goes_back() {
    let mut seen = HashMap::new();
    seen.insert(
        ("t".to_string(), 1),
        vec![
            Seen {
                v: 2,
                start: 0,
                end: 10,
            },
            // Overlapping the first call: either order is possible.
            Seen {
                v: 1,
                start: 5,
                end: 12,
            },
            // Started after the first returned 2.
            Seen {
                v: 1,
                start: 11,
                end: 20,
            },
        ],
    );
    assert_eq!(violations(&seen), vec!["t 1: read 1 after 2 was returned"]);
}
