//! A table's rule changed where it meets other faults: Redis restored from a snapshot taken
//! under the old rule, and an old daemon, stalled mid-write under the old rule, while the new
//! one takes over. In each, no key of the old rule may be left or come back, and the values
//! are the rows under the new rule.

use std::time::Duration;

use serde_json::json;

use crate::common::{
    eventually, get_json, keys, settled, verify, wait_backfill_done, wait_for_json,
    wait_slot_confirms, Daemon, Env,
};

const OLD_RULE: &str = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";
const NEW_RULE: &str = "[[tables]]\ntable = \"items\"\nkey = \"thing:{id}\"\nformat = \"hash\"\n";

async fn hget(r: &mut redis::aio::MultiplexedConnection, key: &str, field: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async(r)
        .await
        .unwrap()
}

/// Redis restored from a snapshot taken under the old rule (so it holds the old rule's
/// record and keys, and is behind the slot), and the rule changed while the daemon was
/// stopped: the rebuild also drops the old rule's keys, and the table is written under the
/// new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_changed_while_redis_went_back_leaves_no_old_keys() {
    let mut env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO items SELECT g, 0 FROM generate_series(1, 100) g;",
        "public.items",
    );
    let config_path = env.write_config(OLD_RULE);
    let mut daemon = Daemon::spawn(&config_path, &env.dir.path().join("old.log"));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    let _: () = redis::cmd("SAVE").query_async(&mut r).await.unwrap();
    env.sql("UPDATE items SET v = 1; DELETE FROM items WHERE id > 90;");
    settled(&env, &mut r).await;
    wait_slot_confirms(&env, &mut r).await;
    daemon.terminate();

    let config_path = env.write_config(NEW_RULE);
    env.redis.kill9().unwrap();
    env.redis.start_again().unwrap();
    let mut r = env.redis().await;
    assert_eq!(keys(&mut r, "item:*").await.len(), 100, "the snapshot");
    let mut daemon = Daemon::spawn(&config_path, &env.dir.path().join("new.log"));
    eventually(
        Duration::from_secs(60),
        "the table under the new rule",
        || {
            let mut r = r.clone();
            async move {
                let things = keys(&mut r, "thing:*").await;
                if things.len() != 90 || !keys(&mut r, "item:*").await.is_empty() {
                    return None;
                }
                for key in things {
                    if hget(&mut r, &key, "v").await.as_deref() != Some("1") {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
    settled(&env, &mut r).await;
    let (code, out) = verify(&config_path).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        daemon.log().contains("Redis went back in time"),
        "{}",
        daemon.log()
    );
    daemon.terminate();
}

/// A rolling deploy of a rule change while the old daemon is stalled mid-write: the old
/// daemon's write (under the old rule) is stuck on a stalled link, its walsender times out,
/// and the new daemon takes the slot over, drops the old rule's keys and writes the new ones.
/// When the old daemon's link comes back, its write is refused: no old key comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_change_rolled_out_past_a_stalled_daemon_leaves_no_old_keys() {
    use pgcache::testkit::{Direction, TcpProxy};
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO items SELECT g, 0 FROM generate_series(1, 20) g;",
        "public.items",
    );
    env.sql("ALTER SYSTEM SET wal_sender_timeout = '1s'; SELECT pg_reload_conf();");
    let to_redis =
        TcpProxy::start(format!("127.0.0.1:{}", env.redis.port()).parse().unwrap()).unwrap();
    let to_pg = TcpProxy::start(format!("127.0.0.1:{}", env.pg.port()).parse().unwrap()).unwrap();
    let old_config = env.dir.path().join("old.toml");
    std::fs::write(
        &old_config,
        env.config_toml(OLD_RULE)
            .replace(
                &format!(":{}/", env.redis.port()),
                &format!(":{}/", to_redis.port()),
            )
            .replace(
                &format!(":{}/", env.pg.port()),
                &format!(":{}/", to_pg.port()),
            ),
    )
    .unwrap();
    let new_config = env.write_config(NEW_RULE);
    let mut old = Daemon::spawn(&old_config, &env.dir.path().join("old.log"));
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    wait_for_json(&mut r, "item:1", Some(json!({"id": 1, "v": 0}))).await;

    to_redis.pause();
    env.sql("UPDATE items SET v = 1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    to_pg.pause();
    let client = env.pg_client().await;
    eventually(
        Duration::from_secs(20),
        "the old daemon's walsender to time out",
        || {
            let client = &client;
            async move {
                let active: bool = client
                    .query_one("SELECT active FROM pg_replication_slots", &[])
                    .await
                    .ok()?
                    .get(0);
                (!active).then_some(())
            }
        },
    )
    .await;

    let mut new = Daemon::spawn(&new_config, &env.dir.path().join("new.log"));
    eventually(Duration::from_secs(60), "the new rule's keys", || {
        let mut r = r.clone();
        async move {
            let done = keys(&mut r, "item:*").await.is_empty()
                && keys(&mut r, "thing:*").await.len() == 20
                && hget(&mut r, "thing:20", "v").await.as_deref() == Some("1");
            done.then_some(())
        }
    })
    .await;
    env.sql("UPDATE items SET v = 2 WHERE id = 1");
    settled(&env, &mut r).await;

    let before_resume = to_redis.bytes(Direction::ToServer);
    to_redis.resume();
    to_pg.resume();
    eventually(
        Duration::from_secs(20),
        "the old daemon's stalled write to reach Redis",
        || {
            let to_redis = &to_redis;
            async move { (to_redis.bytes(Direction::ToServer) > before_resume).then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(keys(&mut r, "item:*").await, Vec::<String>::new());
    assert_eq!(get_json(&mut r, "item:1").await, None);
    assert_eq!(hget(&mut r, "thing:1", "v").await.as_deref(), Some("2"));
    env.sql("UPDATE items SET v = 3 WHERE id = 1");
    settled(&env, &mut r).await;
    assert_eq!(hget(&mut r, "thing:1", "v").await.as_deref(), Some("3"));
    let (code, out) = verify(&new_config).await;
    assert_eq!(code, 0, "{out}");
    new.terminate();
    old.kill9();
}
