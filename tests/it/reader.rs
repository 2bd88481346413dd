//! The read helper against real servers: stampedes across processes, stale fills against
//! the daemon, Redis and Postgres outages, dead lease holders, and byte-identical values.
//!
//! Tests that need several OS processes re-run this test binary on one of the `*_worker`
//! tests, with `READER_IT_*` variables saying what to do; without them a worker returns at
//! once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgcache::config::Config;
use pgcache::reader::{FillOutcome, LeaseOutcome, ReaderError, ReaderOptions, Stats};
use pgcache::testkit::{PgOptions, RedisOptions};
use pgcache::Reader;
use serde_json::{json, Value};

use crate::common::{eventually, get, wait_for_json, Env, InProcess};

const WORKER_MODE: &str = "READER_IT_WORKER";
const WORKER_CONFIG: &str = "READER_IT_CONFIG";
const WORKER_DIR: &str = "READER_IT_DIR";
const WORKER_TASKS: &str = "READER_IT_TASKS";
const WORKER_LEASE_MS: &str = "READER_IT_LEASE_MS";
const RESULT_PREFIX: &str = "READER-IT-RESULT ";

const ITEMS: &str =
    "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2));";
const ITEMS_RULE: &str = "[[tables]]\ntable = \"public.items\"\nkey = \"item:{id}\"\n";

fn reader(config: &Config, options: ReaderOptions) -> Reader {
    Reader::from_config_with(config, options).expect("reader")
}

fn long_leases() -> ReaderOptions {
    // Only the daemon may end these leases within a test.
    ReaderOptions {
        lease_ttl: Duration::from_secs(30),
        ..ReaderOptions::default()
    }
}

async fn exists(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(conn)
        .await
        .expect("EXISTS")
        == 1
}

async fn del(conn: &mut redis::aio::MultiplexedConnection, key: &str) {
    redis::cmd("DEL")
        .arg(key)
        .query_async::<i64>(conn)
        .await
        .expect("DEL");
}

/// The whole Postgres server log (the harness's `log()` is only its tail).
fn full_pg_log(env: &Env) -> String {
    let path = env
        .pg
        .data_dir()
        .parent()
        .expect("data dir has a parent")
        .join("postgres.log");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Row reads the reader sent for `items`, as the server logged them.
fn item_reads(env: &Env) -> usize {
    full_pg_log(env)
        .lines()
        .filter(|line| {
            line.contains("statement: SELECT k.o")
                && line.contains(r#"LEFT JOIN "public"."items" AS t"#)
        })
        .count()
}

fn worker_command(test: &str, mode: &str, config: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(WORKER_MODE, mode)
        .env(WORKER_CONFIG, config)
        .env(WORKER_DIR, dir)
        .stdin(Stdio::null());
    cmd
}

fn stats_json(s: &Stats) -> Value {
    json!({
        "hits": s.hits, "misses": s.misses, "fills": s.fills, "lost_fills": s.lost_fills,
        "waits": s.waits, "coalesced": s.coalesced, "fallbacks": s.fallbacks,
        "wait_timeouts": s.wait_timeouts, "db_reads": s.db_reads,
    })
}

/// Waits (bounded) for `path` to exist.
async fn wait_for_file(path: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

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
        ReaderOptions {
            lease_ttl: Duration::from_secs(10),
            ..ReaderOptions::default()
        },
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
    env.sql("INSERT INTO items VALUES (1, 'lamp', 19.90)");
    let config = env.write_config(ITEMS_RULE);
    let barrier = env.dir.path().join("barrier");
    std::fs::create_dir(&barrier).unwrap();

    let mut children: Vec<Child> = (0..PROCESSES)
        .map(|_| {
            worker_command("reader::stampede_worker", "stampede", &config, &barrier)
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

/// Callers in one process share one flight: one read, one fill, everyone else coalesced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_in_one_process_share_one_read() {
    let env = Env::start(ITEMS, "");
    env.sql("INSERT INTO items VALUES (1, 'lamp', 19.90)");
    let reader = reader(&env.config(ITEMS_RULE), ReaderOptions::default());
    let handles: Vec<_> = (0..100)
        .map(|_| {
            let reader = reader.clone();
            tokio::spawn(async move { reader.get_json("items", 1).await.unwrap() })
        })
        .collect();
    for handle in handles {
        assert_eq!(
            handle.await.unwrap(),
            Some(json!({"id": 1, "name": "lamp", "price": "19.90"}))
        );
    }
    let s = reader.stats();
    assert_eq!(
        (s.db_reads, s.fills, s.misses + s.hits),
        (1, 1, 100),
        "{s:?}"
    );
    assert_eq!(s.coalesced + s.hits + 1, 100, "{s:?}");
}

const STALE_SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2));
CREATE TABLE drafts (id int PRIMARY KEY, body text);
";
const STALE_RULES: &str = "
[[tables]]
table = \"public.items\"
key = \"item:{id}\"
mode = \"mirror\"

[[tables]]
table = \"public.drafts\"
key = \"draft:{id}\"
mode = \"refresh\"
";

/// G4: a lease holder paused between its read and its fill loses to a change the daemon
/// applies meanwhile, for an update (mirror and refresh modes) and a delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_fills_lose_to_changes_the_daemon_applies() {
    let env = Env::start(STALE_SCHEMA, "public.items,public.drafts");
    let config = env.config(STALE_RULES);
    let daemon = InProcess::start(config.clone());
    let reader = reader(&config, long_leases());
    let items = reader.table("public.items").unwrap();
    let mut r = env.redis().await;

    env.sql("INSERT INTO items VALUES (1, 'old', 1), (2, 'doomed', 2), (3, 'calm', 3)");
    for (key, name, price) in [
        ("item:1", "old", "1.00"),
        ("item:2", "doomed", "2.00"),
        ("item:3", "calm", "3.00"),
    ] {
        let id: i64 = key[5..].parse().unwrap();
        wait_for_json(
            &mut r,
            key,
            Some(json!({"id": id, "name": name, "price": price})),
        )
        .await;
        del(&mut r, key).await; // evicted: the next read is a miss
    }

    // Control: with no change in between, the fill wins.
    let LeaseOutcome::Acquired(lease) = items.lease(3).await.unwrap() else {
        panic!("lease on a cold key");
    };
    let row = lease.read_row().await.unwrap().unwrap();
    assert_eq!(lease.fill(&row).await.unwrap(), FillOutcome::Filled);
    assert_eq!(
        get(&mut r, "item:3").await.as_deref(),
        Some(&*String::from_utf8(row).unwrap())
    );

    // Update between the read and the fill (mirror: the daemon writes the new row).
    let LeaseOutcome::Acquired(lease) = items.lease(1).await.unwrap() else {
        panic!("lease on a cold key");
    };
    assert!(matches!(items.lease(1).await.unwrap(), LeaseOutcome::Held));
    let stale = lease.read_row().await.unwrap().unwrap();
    env.sql("UPDATE items SET name = 'new' WHERE id = 1");
    wait_for_json(
        &mut r,
        "item:1",
        Some(json!({"id": 1, "name": "new", "price": "1.00"})),
    )
    .await;
    assert!(
        !exists(&mut r, lease.lease_key()).await,
        "the daemon revoked the lease"
    );
    assert_eq!(lease.fill(&stale).await.unwrap(), FillOutcome::Lost);
    assert_eq!(
        get(&mut r, "item:1").await.as_deref(),
        Some(r#"{"id":1,"name":"new","price":"1.00"}"#),
        "Redis ends with the updated row"
    );

    // Delete between the read and the fill: the row must not come back.
    let LeaseOutcome::Acquired(lease) = items.lease(2).await.unwrap() else {
        panic!("lease on a cold key");
    };
    let stale = lease.read_row().await.unwrap().unwrap();
    env.sql("DELETE FROM items WHERE id = 2");
    let lease_key = lease.lease_key().to_string();
    eventually(
        Duration::from_secs(20),
        "the daemon to revoke the lease",
        || {
            let mut r = r.clone();
            let lease_key = lease_key.clone();
            async move { (!exists(&mut r, &lease_key).await).then_some(()) }
        },
    )
    .await;
    assert_eq!(lease.fill(&stale).await.unwrap(), FillOutcome::Lost);
    assert_eq!(
        get(&mut r, "item:2").await,
        None,
        "the deleted row did not come back"
    );
    assert_eq!(items.get_json(2).await.unwrap(), None);

    // Refresh mode: the daemon does not write absent keys, so only the lease stops the
    // stale fill.
    let drafts = reader.table("drafts").unwrap();
    env.sql("INSERT INTO drafts VALUES (1, 'first')");
    let LeaseOutcome::Acquired(lease) = drafts.lease(1).await.unwrap() else {
        panic!("lease on a cold key");
    };
    let stale = lease.read_row().await.unwrap().unwrap();
    env.sql("UPDATE drafts SET body = 'second' WHERE id = 1");
    let lease_key = lease.lease_key().to_string();
    eventually(
        Duration::from_secs(20),
        "the daemon to revoke the draft lease",
        || {
            let mut r = r.clone();
            let lease_key = lease_key.clone();
            async move { (!exists(&mut r, &lease_key).await).then_some(()) }
        },
    )
    .await;
    assert_eq!(lease.fill(&stale).await.unwrap(), FillOutcome::Lost);
    assert_eq!(get(&mut r, "draft:1").await, None);
    assert_eq!(
        drafts.get_json(1).await.unwrap(),
        Some(json!({"id": 1, "body": "second"}))
    );
    assert_eq!(
        get(&mut r, "draft:1").await.as_deref(),
        Some(r#"{"id":1,"body":"second"}"#)
    );

    let s = reader.stats();
    assert_eq!(s.lost_fills, 3, "{s:?}");
    daemon.stop().await.unwrap();
}

/// G7: with Redis stopped, lookups return database values; when it is back, fills resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back_to_postgres_and_recovers() {
    let mut env = Env::start(ITEMS, "");
    env.sql("INSERT INTO items VALUES (1, 'a', 1), (2, 'b', 2), (3, 'c', 3)");
    let reader = reader(
        &env.config(ITEMS_RULE),
        ReaderOptions {
            redis_timeout: Duration::from_millis(500),
            ..ReaderOptions::default()
        },
    );
    let expected =
        |id: i64, name: &str| Some(json!({"id": id, "name": name, "price": format!("{id}.00")}));
    assert_eq!(reader.get_json("items", 1).await.unwrap(), expected(1, "a"));
    assert_eq!(reader.stats().fills, 1);

    env.redis.stop().unwrap();
    let started = Instant::now();
    assert_eq!(reader.get_json("items", 1).await.unwrap(), expected(1, "a"));
    assert_eq!(reader.get_json("items", 2).await.unwrap(), expected(2, "b"));
    let many: Vec<Option<Value>> = reader.get_many("items", [3, 1]).await.unwrap();
    assert_eq!(many, vec![expected(3, "c"), expected(1, "a")]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fallbacks are fast: {:?}",
        started.elapsed()
    );
    let s = reader.stats();
    assert_eq!((s.fallbacks, s.fills), (4, 1), "{s:?}");
    // Concurrent fallbacks for one key share their database read.
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let reader = reader.clone();
            tokio::spawn(async move { reader.get_json("items", 3).await.unwrap() })
        })
        .collect();
    for handle in handles {
        assert_eq!(handle.await.unwrap(), expected(3, "c"));
    }
    let after = reader.stats();
    assert_eq!(after.fallbacks - s.fallbacks, 20, "{after:?}");
    assert!(
        after.db_reads - s.db_reads <= 3,
        "fallback reads were not shared: {after:?}"
    );

    env.redis.start_again().unwrap();
    let mut r = env.redis().await;
    eventually(
        Duration::from_secs(20),
        "a fill after Redis is back",
        || {
            let reader = reader.clone();
            async move {
                let value = reader.get_json("items", 2).await.unwrap();
                assert_eq!(value, expected(2, "b"));
                (reader.stats().fills >= 2).then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        get(&mut r, "item:2").await.as_deref(),
        Some(r#"{"id":2,"name":"b","price":"2.00"}"#)
    );
    let before = reader.stats();
    assert_eq!(reader.get_json("items", 2).await.unwrap(), expected(2, "b"));
    assert_eq!(
        reader.stats().hits,
        before.hits + 1,
        "served from Redis again"
    );
}

/// G7: with Postgres down, hits are still served; misses fail with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_still_serves_hits() {
    let mut env = Env::start(ITEMS, "");
    env.sql("INSERT INTO items VALUES (1, 'a', 1), (2, 'b', 2)");
    let reader = reader(
        &env.config(ITEMS_RULE),
        ReaderOptions {
            postgres_timeout: Duration::from_secs(2),
            ..ReaderOptions::default()
        },
    );
    let one = Some(json!({"id": 1, "name": "a", "price": "1.00"}));
    assert_eq!(reader.get_json("items", 1).await.unwrap(), one);

    env.pg.stop().unwrap();
    assert_eq!(reader.get_json("items", 1).await.unwrap(), one);
    let e = reader.get_json("items", 2).await.unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    assert!(e.to_string().starts_with("public.items: "), "{e}");

    env.pg.start_again().unwrap();
    let two = eventually(
        Duration::from_secs(20),
        "reads after Postgres is back",
        || {
            let reader = reader.clone();
            async move { reader.get_json("items", 2).await.ok() }
        },
    )
    .await;
    assert_eq!(two, Some(json!({"id": 2, "name": "b", "price": "2.00"})));
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
        ReaderOptions {
            lease_ttl: Duration::from_millis(lease_ms),
            ..ReaderOptions::default()
        },
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
    let options = ReaderOptions {
        lease_ttl: LEASE,
        max_wait_step: Duration::from_millis(50),
        ..ReaderOptions::default()
    };
    let env = Env::start(ITEMS, "");
    env.sql("INSERT INTO items VALUES (1, 'lamp', 19.90)");
    let config_path = env.write_config(ITEMS_RULE);
    let mut holder = worker_command(
        "reader::lease_holder_worker",
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

const KITCHEN: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE kitchen (
  id int PRIMARY KEY,
  gone int,
  t text, vc varchar(10), ch char(5), n numeric(10,2), f4 real, f8 double precision,
  b boolean, ts timestamp, tstz timestamptz, d date, tm time, ttz timetz, iv interval,
  j json, jb jsonb, by bytea, u uuid, ip inet, net cidr, mac macaddr, m mood, p posint,
  ia int[], ta text[], tsa timestamptz[], pt point, bits varbit,
  twice int GENERATED ALWAYS AS (id * 2) STORED
);
ALTER TABLE kitchen DROP COLUMN gone;
CREATE TABLE orders (tenant text, id int, total numeric, note text, PRIMARY KEY (tenant, id));
"#;
const KITCHEN_RULES: &str = r#"
[[tables]]
table = "public.kitchen"
key = "kitchen:{id}"

[[tables]]
table = "public.orders"
key = "tenant:{tenant}:order:{id}"
columns = ["total", "id", "tenant"]
numeric = "number"
"#;

/// The reader's values are byte-identical to the daemon's for the same rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_are_byte_identical_to_the_daemon() {
    let env = Env::start(KITCHEN, "public.kitchen,public.orders");
    let config = env.config(KITCHEN_RULES);
    let daemon = InProcess::start(config.clone());
    env.sql(
        r#"INSERT INTO kitchen (id, t, vc, ch, n, f4, f8, b, ts, tstz, d, tm, ttz, iv, j, jb, by, u, ip, net, mac, m, p, ia, ta, tsa, pt, bits) VALUES
        (1, E'quote " back \\ nl \n tab \t é ☃', 'short', 'ab', 12.5, 1.1, 'NaN', true,
         '2026-01-02 03:04:05.123456', '2026-01-02 03:04:05+02', '2026-01-02', '03:04:05.5', '03:04:05+02',
         '1 day 2 hours 3.5 seconds', '{"a": [1, 2.50, null]}', '{"b": {"c": "d"}, "a": 1}', '\x00ff10',
         'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '10.0.0.1', '10.0.0.0/8', '08:00:2b:01:02:03', 'happy', 7,
         '{1,NULL,3}', '{"a b","c,d",NULL,"NULL"}', '{"2026-01-02 03:04:05+00"}', '(1.5,-2)', '1011'),
        (2, NULL, NULL, NULL, NULL, '-Infinity', 1e-7, false, NULL, 'infinity', NULL, NULL, NULL, NULL,
         NULL, NULL, '', NULL, '::1', NULL, NULL, 'sad', NULL, '{}', NULL, NULL, NULL, NULL);
        INSERT INTO orders VALUES ('acme', 1, 12.340, 'x'), ('a:b c', 2, -0.5, NULL);"#,
    );
    let keys = [
        "kitchen:1",
        "kitchen:2",
        "tenant:acme:order:1",
        "tenant:a%3Ab%20c:order:2",
    ];
    let mut r = env.redis().await;
    let mut from_daemon = Vec::new();
    for key in keys {
        let value = eventually(Duration::from_secs(20), key, || {
            let mut r = r.clone();
            async move { get(&mut r, key).await }
        })
        .await;
        from_daemon.push(value);
    }
    daemon.stop().await.unwrap();
    for key in keys {
        del(&mut r, key).await;
    }

    let reader = reader(&config, ReaderOptions::default());
    let kitchen = reader.table("kitchen").unwrap();
    let orders = reader.table("orders").unwrap();
    let from_reader = [
        kitchen.get_raw(1).await.unwrap(),
        kitchen.get_raw(2).await.unwrap(),
        orders.get_raw(("acme", 1)).await.unwrap(),
        orders.get_raw(("a:b c", 2)).await.unwrap(),
    ];
    for ((key, daemon_value), reader_value) in keys.iter().zip(&from_daemon).zip(&from_reader) {
        let reader_value = String::from_utf8(reader_value.as_ref().unwrap().to_vec()).unwrap();
        assert_eq!(
            &reader_value, daemon_value,
            "{key}: reader and daemon differ"
        );
        assert_eq!(
            get(&mut r, key).await.as_ref(),
            Some(daemon_value),
            "{key}: filled value"
        );
    }
    // Spot checks that the table was as tricky as intended.
    assert!(
        from_daemon[0].contains(r#""ip":"10.0.0.1""#),
        "{}",
        from_daemon[0]
    );
    assert!(
        from_daemon[0].contains(r#""ch":"ab   ""#),
        "{}",
        from_daemon[0]
    );
    assert!(!from_daemon[0].contains("twice"), "{}", from_daemon[0]);
    assert_eq!(from_daemon[2], r#"{"total":12.340,"id":1,"tenant":"acme"}"#);
    assert_eq!(reader.stats().fills, 4);
}

/// One MGET for all keys, then one database read for the misses; repeats and absent rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_reads_misses_together() {
    let env = Env::start(ITEMS, "");
    env.sql("INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 5) g");
    let reader = reader(&env.config(ITEMS_RULE), ReaderOptions::default());
    let items = reader.table("items").unwrap();
    items.get_json(1).await.unwrap();
    items.get_json(2).await.unwrap();
    let before = items.stats();

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Item {
        id: i64,
        name: String,
        price: String,
    }
    let got: Vec<Option<Item>> = items.get_many([1, 2, 3, 3, 4, 99]).await.unwrap();
    let item = |id: i64| {
        Some(Item {
            id,
            name: format!("n{id}"),
            price: format!("{id}.00"),
        })
    };
    assert_eq!(got, vec![item(1), item(2), item(3), item(3), item(4), None]);
    let s = items.stats();
    assert_eq!(s.hits - before.hits, 2, "{s:?}");
    assert_eq!(s.misses - before.misses, 4, "{s:?}");
    assert_eq!(
        s.db_reads - before.db_reads,
        1,
        "one read for 3, 4 and 99: {s:?}"
    );
    assert_eq!(s.fills - before.fills, 2, "{s:?}");
    let mut r = env.redis().await;
    assert!(get(&mut r, "item:3").await.is_some());
    assert!(get(&mut r, "item:99").await.is_none());
    let empty: Vec<Option<Item>> = items.get_many(Vec::<i32>::new()).await.unwrap();
    assert!(empty.is_empty());
}

/// Negative caching keeps absent ids off Postgres, and an insert ends it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_caching_ends_with_an_insert() {
    let env = Env::start(STALE_SCHEMA, "public.items,public.drafts");
    let config = env.config(STALE_RULES);
    let daemon = InProcess::start(config.clone());
    let reader = reader(
        &config,
        ReaderOptions {
            negative_ttl: Some(Duration::from_secs(60)),
            ..ReaderOptions::default()
        },
    );
    let drafts = reader.table("drafts").unwrap();
    assert_eq!(drafts.get_json(7).await.unwrap(), None);
    assert_eq!(drafts.get_json(7).await.unwrap(), None);
    let s = drafts.stats();
    assert_eq!((s.db_reads, s.negative_hits), (1, 1), "{s:?}");

    env.sql("INSERT INTO drafts VALUES (7, 'now here')");
    let value = eventually(
        Duration::from_secs(20),
        "the insert to end the cached absence",
        || {
            let drafts = drafts.clone();
            async move { drafts.get_json(7).await.unwrap() }
        },
    )
    .await;
    assert_eq!(value, json!({"id": 7, "body": "now here"}));
    daemon.stop().await.unwrap();
}

/// XFetch: hits on a key close to expiry refresh it in the background, so it never expires
/// into a miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_keys_with_a_ttl_are_refreshed_early() {
    let env = Env::start(ITEMS, "");
    env.sql("INSERT INTO items VALUES (1, 'lamp', 19.90)");
    let config = env.config(
        "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\nmode = \"refresh\"\nttl = \"3s\"\n",
    );
    let reader = reader(
        &config,
        ReaderOptions {
            // Refresh at nearly every hit, to see it happen in a short test.
            early_refresh_beta: Some(1000.0),
            ..ReaderOptions::default()
        },
    );
    assert!(reader.get_json("items", 1).await.unwrap().is_some());
    let mut r = env.redis().await;
    let ttl = |mut r: redis::aio::MultiplexedConnection| async move {
        redis::cmd("PTTL")
            .arg("item:1")
            .query_async::<i64>(&mut r)
            .await
            .unwrap()
    };
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let aged = ttl(r.clone()).await;
    assert!((1..=1900).contains(&aged), "{aged}");
    // Hits for longer than the TTL: every one is served from Redis.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert!(reader.get_json("items", 1).await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = reader.stats();
    assert!(s.early_refreshes >= 1, "{s:?}");
    assert_eq!(s.misses, 1, "only the first lookup missed: {s:?}");
    assert!(ttl(r.clone()).await > 0);
    assert!(get(&mut r, "item:1").await.is_some());
}

/// Key values the daemon would spell differently are refused, never filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_canonical_and_invalid_keys_are_refused() {
    let env = Env::start(ITEMS, "");
    env.sql("INSERT INTO items VALUES (42, 'x', 1)");
    let reader = reader(&env.config(ITEMS_RULE), ReaderOptions::default());
    let e = reader.get_json("items", "042").await.unwrap_err();
    assert!(matches!(e, ReaderError::NonCanonicalKey { .. }), "{e}");
    assert!(
        e.to_string()
            .contains(r#"key value "042" for column "id" is not in its canonical form "42""#),
        "{e}"
    );
    let e = reader.get_json("items", "4x").await.unwrap_err();
    assert!(matches!(e, ReaderError::BadKeyValue { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("invalid input syntax for type integer"),
        "{e}"
    );
    let e = reader.get_json("items", "it's").await.unwrap_err();
    assert!(matches!(e, ReaderError::BadKeyValue { .. }), "{e}");
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Wrong {
        id: String,
    }
    let e = reader.get::<Wrong>("items", 42).await.unwrap_err();
    assert!(matches!(e, ReaderError::Decode { .. }), "{e}");
    assert!(e.to_string().contains(r#"key "item:42""#), "{e}");

    let mut r = env.redis().await;
    assert_eq!(get(&mut r, "item:042").await, None);
    eventually(
        Duration::from_secs(5),
        "refused leases to be given back",
        || {
            let mut r = r.clone();
            async move { (!exists(&mut r, "{item:042}:pgcache-lease").await).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        reader.get_json("items", 42).await.unwrap(),
        Some(json!({"id": 42, "name": "x", "price": "1.00"}))
    );
}

#[allow(dead_code)]
fn _assert_send(reader: Arc<Reader>) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let _ = reader.get_json("t", 1).await;
        let _ = reader.get_many::<Value, _>("t", [1, 2]).await;
    }
}
