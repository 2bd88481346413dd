//! Crashes and outages: nothing lost (G1), no replays seen (G3), clear errors (G9).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgcache::testkit::{PgOptions, RedisOptions};
use rand::Rng;

use crate::common::{eventually, pgcache, Daemon, Env, InProcess, DB};

const COUNTERS: &str = "CREATE TABLE counters (id int PRIMARY KEY, v bigint NOT NULL);";
/// Rows inserted once the daemon streams, so they reach Redis through the stream.
const SEED: &str = "INSERT INTO counters SELECT i, 0 FROM generate_series(1, 20) i;";
const RULE: &str = "[[tables]]\ntable = \"counters\"\nkey = \"counter:{id}\"\n";

/// Database truth: id -> v.
async fn db_counters(env: &Env) -> HashMap<i32, i64> {
    let client = env.pg_client().await;
    client
        .query("SELECT id, v FROM counters", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

async fn redis_counters(r: &mut redis::aio::MultiplexedConnection) -> HashMap<i32, i64> {
    let mut out = HashMap::new();
    for id in 1..=20 {
        if let Some(v) = crate::common::get_json(r, &format!("counter:{id}")).await {
            out.insert(id, v["v"].as_i64().expect("v is a number"));
        }
    }
    out
}

async fn converged(env: &Env, r: &mut redis::aio::MultiplexedConnection, limit: Duration) {
    let expected = db_counters(env).await;
    let mut last = HashMap::new();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        last = redis_counters(r).await;
        if last == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("Redis did not converge to the database:\n db    {expected:?}\n redis {last:?}");
}

/// Increments random counters in single-row transactions until `stop`; retries through
/// Postgres restarts. Returns the number of committed transactions.
fn start_writer(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut committed = 0u64;
        let mut client: Option<tokio_postgres::Client> = None;
        while !stop.load(Ordering::Relaxed) {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(conn);
                        client = Some(c);
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            let id: i32 = rand::thread_rng().gen_range(1..=20);
            let c = client.as_ref().unwrap();
            match c
                .execute("UPDATE counters SET v = v + 1 WHERE id = $1", &[&id])
                .await
            {
                Ok(_) => committed += 1,
                Err(_) => client = None,
            }
        }
        committed
    })
}

/// A reader that polls every key and fails if any value ever goes down (G3).
fn start_monotonic_reader(
    mut r: redis::aio::MultiplexedConnection,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut high: HashMap<i32, i64> = HashMap::new();
        let mut polls = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let keys: Vec<String> = (1..=20).map(|id| format!("counter:{id}")).collect();
            let values: Result<Vec<Option<String>>, _> =
                redis::cmd("MGET").arg(&keys).query_async(&mut r).await;
            let Ok(values) = values else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            for (id, value) in (1..=20).zip(values) {
                if let Some(text) = value {
                    let v = serde_json::from_str::<serde_json::Value>(&text).unwrap()["v"]
                        .as_i64()
                        .unwrap();
                    let seen = high.entry(id).or_insert(v);
                    assert!(v >= *seen, "counter:{id} went back from {seen} to {v}");
                    *seen = v;
                }
            }
            polls += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        polls
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_daemon_repeatedly_loses_and_replays_nothing() {
    let env = Env::start(COUNTERS, "public.counters");
    let config = env.write_config(RULE);
    let log = env.dir.path().join("daemon.log");
    let mut r = env.redis().await;
    let mut daemon = Daemon::spawn(&config, &log);
    env.sql(SEED);
    converged(&env, &mut r, Duration::from_secs(30)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(env.pg.url(DB), stop.clone());
    let reader = start_monotonic_reader(r.clone(), stop.clone());
    for _ in 0..10 {
        let pause = rand::thread_rng().gen_range(100..600);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        daemon.kill9();
        daemon = Daemon::spawn(&config, &log);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let committed = writer.await.unwrap();
    // On a value gone back, the daemons' log (every start appends to it) says what each
    // restart resumed from.
    let polls = match reader.await {
        Ok(polls) => polls,
        Err(e) => panic!("reader saw a value go back: {e}\n{}", daemon.log()),
    };
    assert!(
        committed > 50,
        "the workload ran ({committed} transactions)"
    );
    assert!(polls > 50, "the reader polled ({polls} polls)");
    converged(&env, &mut r, Duration::from_secs(30)).await;
    assert!(
        daemon.terminate().success(),
        "SIGTERM exits 0\n{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_and_outage_lose_nothing() {
    let env = Env::start_with(
        PgOptions::default(),
        RedisOptions {
            appendonly: true,
            ..Default::default()
        },
        COUNTERS,
        "public.counters",
    );
    let mut env = env;
    let daemon = InProcess::start(env.config(RULE));
    env.sql(SEED);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(env.pg.url(DB), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Restarted mid-stream (AOF keeps what was acknowledged).
    env.redis.kill9().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    env.redis.start_again().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Unreachable for 10 s while writes go on.
    env.redis.stop().unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    env.redis.start_again().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let committed = writer.await.unwrap();
    assert!(
        committed > 50,
        "the workload ran ({committed} transactions)"
    );
    let mut r = env.redis().await;
    converged(&env, &mut r, Duration::from_secs(60)).await;
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_loses_nothing() {
    let mut env = Env::start(COUNTERS, "public.counters");
    let daemon = InProcess::start(env.config(RULE));
    env.sql(SEED);
    let mut r = env.redis().await;
    converged(&env, &mut r, Duration::from_secs(30)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(env.pg.url(DB), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.pg.restart().unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let committed = writer.await.unwrap();
    assert!(
        committed > 20,
        "the workload ran ({committed} transactions)"
    );
    converged(&env, &mut r, Duration::from_secs(60)).await;
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unready_servers_and_bad_config_exit_with_the_fix() {
    // Bad config: exit code 2, every problem named, nothing connects.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[postgres]\nurl = \"postgres://u:hunter2@127.0.0.1:1/x\"\n[redis]\nurl = \"redis://127.0.0.1:1\"\n\
         [[tables]]\ntable = \"users\"\nkey = \"user:{id}\"\nmode = \"mirrors\"\nttl = \"1 hour\"\n",
    )
    .unwrap();
    let (code, _, stderr) = pgcache(&["run", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("tables[0].mode"), "{stderr}");
    assert!(stderr.contains("tables[0].ttl"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");

    // Missing publication: exit 1 with the SQL that fixes it.
    let env = Env::start(COUNTERS, "public.counters");
    env.sql("DROP PUBLICATION pgcache");
    let config = env.write_config(RULE);
    let (code, _, stderr) = pgcache(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("publication \"pgcache\" does not exist"),
        "{stderr}"
    );
    assert!(stderr.contains("sql/publication.sql"), "{stderr}");

    // wal_level = replica: exit 1, naming the setting and the fix.
    let env = Env::start_with(
        PgOptions {
            wal_level: "replica".into(),
            ..Default::default()
        },
        RedisOptions::default(),
        "CREATE TABLE counters (id int PRIMARY KEY, v bigint NOT NULL);",
        "",
    );
    let config = env.write_config(RULE);
    let (code, _, stderr) = pgcache(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("wal_level is replica"), "{stderr}");
    assert!(
        stderr.contains("ALTER SYSTEM SET wal_level = logical"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_and_confirms() {
    let env = Env::start(COUNTERS, "public.counters");
    let config = env.write_config(RULE);
    let mut daemon = Daemon::spawn(&config, &env.dir.path().join("daemon.log"));
    let mut r = env.redis().await;
    env.sql(SEED);
    env.sql("UPDATE counters SET v = 5 WHERE id = 3");
    converged(&env, &mut r, Duration::from_secs(30)).await;
    assert!(daemon.terminate().success(), "{}", daemon.log());
    // The slot's confirmed position reached the checkpoint written to Redis.
    let checkpoint: String = redis::cmd("HGET")
        .arg("pgcache:{pgcache}:checkpoint")
        .arg("lsn")
        .query_async(&mut r)
        .await
        .unwrap();
    let confirmed =
        env.sql("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'pgcache'");
    let checkpoint: pgcache::Lsn = checkpoint.parse().unwrap();
    let confirmed: pgcache::Lsn = confirmed.parse().unwrap();
    assert!(
        confirmed >= checkpoint,
        "confirmed {confirmed} is behind the checkpoint {checkpoint}"
    );
    eventually(Duration::from_secs(5), "slot inactive", || async {
        (env.sql("SELECT active FROM pg_replication_slots WHERE slot_name = 'pgcache'") == "f")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_is_not_set_up_stops_alone() {
    // `lonely` is configured but not in the publication: its changes can never arrive.
    let env = Env::start(
        "CREATE TABLE counters (id int PRIMARY KEY, v bigint NOT NULL);
         CREATE TABLE lonely (id int PRIMARY KEY, v int);",
        "public.counters",
    );
    let mut r = env.redis().await;
    // A value cached earlier that the daemon could never keep fresh.
    let _: () = redis::cmd("SET")
        .arg("lonely:1")
        .arg(r#"{"id":1,"v":1}"#)
        .query_async(&mut r)
        .await
        .unwrap();
    let rules = format!("{RULE}\n[[tables]]\ntable = \"lonely\"\nkey = \"lonely:{{id}}\"\n");
    let daemon = InProcess::start(env.config(&rules));
    env.sql(SEED);
    let mut r2 = r.clone();
    converged(&env, &mut r2, Duration::from_secs(30)).await;
    eventually(Duration::from_secs(10), "lonely:1 dropped", || {
        let mut r = r.clone();
        async move {
            crate::common::get(&mut r, "lonely:1")
                .await
                .is_none()
                .then_some(())
        }
    })
    .await;
    daemon
        .stop()
        .await
        .expect("the daemon kept running for the other table");
}
