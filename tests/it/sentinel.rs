//! The daemon on a Sentinel-managed Redis: it writes to the master the sentinel names, and
//! follows a failover. With `redis.wait_replicas`, a failover loses nothing (Postgres is
//! confirmed only once the replica holds the write); without it, the loss is noticed (Redis
//! is behind the slot) and repaired by a rebuild. Either way `verify` is clean at the end.

use std::time::Duration;

use pgcache::testkit::TestSentinelGroup;

use crate::common::{eventually, pgcache, verify, Daemon, Env};

const RULE: &str = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";

/// The config of `env`'s Postgres with `[redis.sentinel]` instead of `redis.url`.
fn sentinel_config(env: &Env, group: &TestSentinelGroup, wait_replicas: Option<usize>) -> String {
    let single = format!("[redis]\nurl = \"{}\"\n", env.redis.url());
    let wait = wait_replicas.map_or(String::new(), |n| format!("wait_replicas = {n}\n"));
    let sentinel = format!(
        "[redis]\n{wait}\n[redis.sentinel]\nmaster = \"mymaster\"\nurls = [\"{}\"]\n",
        group.sentinel_url()
    );
    let text = env.config_toml(RULE);
    assert!(text.contains(&single), "{text}");
    text.replace(&single, &sentinel)
}

async fn connect(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Waits until every row of `items` has `v` in the Redis on `port`.
async fn wait_values(port: u16, rows: i32, v: i64) {
    eventually(
        Duration::from_secs(60),
        &format!("{rows} items with v = {v}"),
        || async move {
            let mut r = connect(port).await;
            for id in 1..=rows {
                let value: Option<String> = redis::cmd("GET")
                    .arg(format!("item:{id}"))
                    .query_async(&mut r)
                    .await
                    .ok()?;
                let value: serde_json::Value = serde_json::from_str(&value?).ok()?;
                if value["v"] != v {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}

async fn wal_now(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

async fn slot_confirmed_past(client: &tokio_postgres::Client, lsn: &str) -> bool {
    client
        .query_one(
            "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots",
            &[&lsn],
        )
        .await
        .unwrap()
        .get(0)
}

/// Runs the failover scenario: the daemon through the sentinel, replication stalled while an
/// update is applied to the master, the master killed, the replica (without the update)
/// promoted. Returns the daemon's log and whether the slot confirmed the update before the
/// master died.
async fn fail_over_under_a_write(wait_replicas: Option<usize>) -> (String, bool) {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO items SELECT g, 0 FROM generate_series(1, 50) g;",
        "public.items",
    );
    let mut group = TestSentinelGroup::start().expect("start the sentinel group");
    let config_path = env.dir.path().join("sentinel.toml");
    std::fs::write(&config_path, sentinel_config(&env, &group, wait_replicas)).unwrap();
    let first = group.master().0.port();
    let path = config_path.display().to_string();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || pgcache(&["check", "--config", &path]))
            .await
            .unwrap();
    assert!(
        out.contains(&format!(
            "the sentinels name 127.0.0.1:{first} as master \"mymaster\""
        )),
        "{out}{err}"
    );
    assert_eq!(code, 0, "{out}{err}");
    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::spawn(&config_path, &log);
    wait_values(first, 50, 0).await;
    group.wait_replica_in_sync(1).unwrap();

    // The replica stops taking the master's writes; the update reaches the master only.
    let replica = group.master().1.port();
    group.stall_replication();
    env.sql("UPDATE items SET v = 1");
    let pg = env.pg_client().await;
    let after_update = wal_now(&pg).await;
    if wait_replicas.is_none() {
        wait_values(first, 50, 1).await;
    }
    // (With wait_replicas, the write before it may still wait for the replica, and the
    // update with it: either way nothing past it is confirmed.)
    // Long enough for a confirmation (and a keepalive) to go out, if one is going to.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let confirmed = slot_confirmed_past(&pg, &after_update).await;

    let promoted = group.kill_master().unwrap();
    assert_eq!(promoted, replica);
    group.wait_master_is(promoted).unwrap();
    // The old master comes back as the new one's replica (with wait_replicas, the daemon
    // confirms nothing more until a replica holds its writes).
    group.restart_old_master().unwrap();
    // Changes after the failover go to the new master.
    env.sql("UPDATE items SET v = 2 WHERE id <= 10");
    eventually(
        Duration::from_secs(60),
        "the new master to converge",
        || async move {
            let mut r = connect(promoted).await;
            for id in 1..=50 {
                let value: String = redis::cmd("GET")
                    .arg(format!("item:{id}"))
                    .query_async(&mut r)
                    .await
                    .ok()?;
                let value: serde_json::Value = serde_json::from_str(&value).ok()?;
                let want = if id <= 10 { 2 } else { 1 };
                if value["v"] != want {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let (code, out) = verify(&config_path).await;
    assert_eq!(code, 0, "{out}");
    let log = daemon.log();
    daemon.terminate();
    (log, confirmed)
}

/// With `wait_replicas = 1`, nothing the replica lacks is confirmed to Postgres, so the
/// promoted replica is not behind the slot: the daemon applies the update again there, and
/// no rebuild is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_replicas_a_failover_loses_nothing() {
    let (log, confirmed) = fail_over_under_a_write(Some(1)).await;
    assert!(
        !confirmed,
        "the slot confirmed a write the replica did not have"
    );
    assert!(!log.contains("Redis went back in time"), "{log}");
}

/// Without it, the write is confirmed and then lost with the master: the daemon notices
/// that the new master is behind the slot and rebuilds, and the values converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_wait_replicas_a_lost_write_is_noticed_and_repaired() {
    let (log, confirmed) = fail_over_under_a_write(None).await;
    assert!(confirmed, "the slot never confirmed the update");
    assert!(log.contains("Redis went back in time"), "{log}");
}

/// The read helper on a Sentinel config: it asks the sentinels for the master (reading
/// Postgres until they answer), serves hits from it, and after a failover follows the new
/// master, where it serves current values again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_follows_the_master_the_sentinels_name() {
    use pgcache::reader::{ReaderOptions, Served};
    use pgcache::Reader;
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO items SELECT g, 0 FROM generate_series(1, 50) g;",
        "public.items",
    );
    let mut group = TestSentinelGroup::start().expect("start the sentinel group");
    let text = sentinel_config(&env, &group, None);
    let config_path = env.dir.path().join("sentinel.toml");
    std::fs::write(&config_path, &text).unwrap();
    let mut daemon = Daemon::spawn(&config_path, &env.dir.path().join("daemon.log"));
    let first = group.master().0.port();
    wait_values(first, 50, 0).await;

    let config = pgcache::config::Config::from_toml_str(&text).unwrap();
    let reader = Reader::from_config_with(&config, ReaderOptions::default()).unwrap();
    let items = reader.table("public.items").unwrap();
    let hit = |want: i64| {
        let items = items.clone();
        move || {
            let items = items.clone();
            async move {
                let found = items.lookup::<serde_json::Value>(1).await.ok()?;
                (found.served == Served::Hit && found.value?["v"] == want).then_some(())
            }
        }
    };
    eventually(
        Duration::from_secs(20),
        "a hit from the first master",
        hit(0),
    )
    .await;

    let promoted = group.kill_master().unwrap();
    group.wait_master_is(promoted).unwrap();
    group.restart_old_master().unwrap();
    env.sql("UPDATE items SET v = 5 WHERE id = 1");
    eventually(
        Duration::from_secs(60),
        "a hit of the new value from the new master",
        hit(5),
    )
    .await;
    let mut r = connect(promoted).await;
    let cached: Option<String> = redis::cmd("GET")
        .arg("item:1")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(cached.as_deref(), Some(r#"{"id":1,"v":5}"#));
    daemon.terminate();
}
