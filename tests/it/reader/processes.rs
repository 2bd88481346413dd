//! Several OS processes: a stampede over four, and a lease holder killed with SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use pgcache::config::Config;
use pgcache::reader::{LeaseOutcome, ReaderOptions};
use pgcache::testkit::{PgOptions, RedisOptions};
use serde_json::{json, Value};

use super::*;
use crate::common::{get, Env};

/// One of the four stampede processes: build a reader, report ready, wait for the start
/// signal, then ask for item 1 from many tasks at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_worker() {
    if std::env::var(WORKER_MODE).as_deref() != Ok("stampede") {
        return;
    }
    let config = Config::load(Path::new(&std::env::var(WORKER_CONFIG).unwrap())).unwrap();
    let dir = PathBuf::from(std::env::var(WORKER_DIR).unwrap());
    let tasks: usize = std::env::var(WORKER_TASKS).unwrap().parse().unwrap();
    let reader = reader(
        &config,
        ReaderOptions::default().lease_ttl(Duration::from_secs(10)),
    );
    // Open the Redis connection before the start, so the tasks really ask together.
    let items = reader.table("public.items").unwrap();
    match items
        .lease(1_000_000 + i64::from(std::process::id()))
        .await
        .unwrap()
    {
        LeaseOutcome::Acquired(lease) => lease.release().await.unwrap(),
        other => panic!("warm-up lease: {other:?}"),
    }
    std::fs::write(dir.join(format!("ready-{}", std::process::id())), "").unwrap();
    assert!(
        wait_for_file(&dir.join("go"), Duration::from_secs(60)).await,
        "no start signal"
    );

    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let items = items.clone();
            tokio::spawn(async move { items.get_json(1).await })
        })
        .collect();
    let mut values = Vec::new();
    for handle in handles {
        values.push(handle.await.unwrap().unwrap());
    }
    let result = json!({ "values": values, "stats": stats_json(&items.stats()) });
    // libtest has printed the test's name without a newline.
    println!("\n{RESULT_PREFIX}{result}");
}

/// G5: 200 callers in 4 processes ask for one cold key: one database read, one value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_across_processes_reads_postgres_once() {
    const PROCESSES: usize = 4;
    const TASKS: usize = 50;
    let env = Env::start_with(
        PgOptions {
            extra_conf: vec!["log_statement = 'all'".into()],
            ..PgOptions::default()
        },
        RedisOptions::default(),
        ITEMS,
        "",
    );
    daemon_caught_up(&env).await;
    env.sql("INSERT INTO items VALUES (1, 'lamp', 19.90)");
    let config = env.write_config(ITEMS_RULE);
    let barrier = env.dir.path().join("barrier");
    std::fs::create_dir(&barrier).unwrap();

    let mut children: Vec<Child> = (0..PROCESSES)
        .map(|_| {
            worker_command(
                "reader::processes::stampede_worker",
                "stampede",
                &config,
                &barrier,
            )
            .env(WORKER_TASKS, TASKS.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn worker")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ready = std::fs::read_dir(&barrier)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("ready-")
            })
            .count();
        if ready == PROCESSES {
            break;
        }
        let exited = children
            .iter_mut()
            .position(|c| c.try_wait().unwrap().is_some());
        if exited.is_some() || Instant::now() > deadline {
            let failed = children.remove(exited.unwrap_or(0));
            for mut child in children.drain(..) {
                let _ = child.kill();
            }
            let output = failed.wait_with_output().unwrap();
            panic!(
                "a worker {} before the start ({}):\n{}\n{}",
                if exited.is_some() {
                    "exited"
                } else {
                    "was not ready"
                },
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(item_reads(&env), 0, "nothing read before the start");
    std::fs::write(barrier.join("go"), "").unwrap();

    let mut all_values = Vec::new();
    let mut fills = 0;
    let mut db_reads = 0;
    for child in children.drain(..) {
        let pid = child.id();
        let output = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::task::spawn_blocking(move || child.wait_with_output()),
        )
        .await
        .unwrap_or_else(|_| {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("worker {pid} did not finish in 120 s");
        })
        .unwrap()
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "worker failed: {}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|l| {
                l.find(RESULT_PREFIX)
                    .map(|at| &l[at + RESULT_PREFIX.len()..])
            })
            .unwrap_or_else(|| panic!("worker printed no result:\n{stdout}"));
        let result: Value = serde_json::from_str(line).unwrap();
        all_values.extend(result["values"].as_array().unwrap().iter().cloned());
        fills += result["stats"]["fills"].as_u64().unwrap();
        db_reads += result["stats"]["db_reads"].as_u64().unwrap();
    }
    let expected = json!({"id": 1, "name": "lamp", "price": "19.90"});
    assert_eq!(all_values.len(), PROCESSES * TASKS);
    assert!(
        all_values.iter().all(|v| *v == expected),
        "values differ: {all_values:?}"
    );
    assert_eq!(
        item_reads(&env),
        1,
        "database reads of item 1 in the server log"
    );
    assert_eq!(
        (fills, db_reads),
        (1, 1),
        "fills and reads the workers counted"
    );
    let mut r = env.redis().await;
    assert_eq!(
        get(&mut r, "item:1").await.as_deref(),
        Some(r#"{"id":1,"name":"lamp","price":"19.90"}"#)
    );
}

/// Takes the lease on item 1, says so, and hangs until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_holder_worker() {
    if std::env::var(WORKER_MODE).as_deref() != Ok("hold-lease") {
        return;
    }
    let config = Config::load(Path::new(&std::env::var(WORKER_CONFIG).unwrap())).unwrap();
    let dir = PathBuf::from(std::env::var(WORKER_DIR).unwrap());
    let lease_ms: u64 = std::env::var(WORKER_LEASE_MS).unwrap().parse().unwrap();
    let reader = reader(
        &config,
        ReaderOptions::default().lease_ttl(Duration::from_millis(lease_ms)),
    );
    let LeaseOutcome::Acquired(lease) = reader.table("items").unwrap().lease(1).await.unwrap()
    else {
        panic!("the key must be cold");
    };
    std::fs::write(dir.join("leased"), "").unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
    drop(lease);
}

/// A lease holder killed after taking the lease frees the key when the lease expires:
/// another caller gets the value within the lease TTL plus one backoff step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lease_holder_frees_the_key_within_the_lease_ttl() {
    const LEASE: Duration = Duration::from_millis(1500);
    let options = ReaderOptions::default()
        .lease_ttl(LEASE)
        .max_wait_step(Duration::from_millis(50));
    let env = Env::start(ITEMS, "");
    daemon_caught_up(&env).await;
    env.sql("INSERT INTO items VALUES (1, 'lamp', 19.90)");
    let config_path = env.write_config(ITEMS_RULE);
    let mut holder = worker_command(
        "reader::processes::lease_holder_worker",
        "hold-lease",
        &config_path,
        env.dir.path(),
    )
    .env(WORKER_LEASE_MS, LEASE.as_millis().to_string())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn lease holder");
    assert!(
        wait_for_file(&env.dir.path().join("leased"), Duration::from_secs(60)).await,
        "the holder never took the lease"
    );
    let leased = Instant::now();
    holder.kill().unwrap(); // SIGKILL: no destructor gives the lease back
    holder.wait().unwrap();

    let reader = reader(&Config::load(&config_path).unwrap(), options.clone());
    let value = reader.get_json("items", 1).await.unwrap();
    let took = leased.elapsed();
    assert_eq!(
        value,
        Some(json!({"id": 1, "name": "lamp", "price": "19.90"}))
    );
    let s = reader.stats();
    assert_eq!((s.waits, s.fills, s.wait_timeouts), (1, 1, 0), "{s:?}");
    // It waited for the expiry (the holder took the lease just before `leased`)...
    assert!(
        took >= LEASE - Duration::from_millis(300),
        "did not wait for the lease: {took:?}"
    );
    // ...and not longer than the TTL plus one backoff step (and scheduling slack).
    let bound = LEASE + options.max_wait_step + Duration::from_millis(250);
    assert!(took <= bound, "took {took:?}, more than {bound:?}");
    let mut r = env.redis().await;
    assert!(get(&mut r, "item:1").await.is_some());
}
