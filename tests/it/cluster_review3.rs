//! Adversarial review 3 (commit 6785839): the table-driven CRC16, the sort by (slot, index),
//! the session's memory of the `stopped` mark, concurrent key-space scans.

use std::sync::Arc;
use std::time::Duration;

use pgcache::checkpoint::{checkpoint_key, slot_checkpoint_key};
use pgcache::cluster::key_slot;
use pgcache::daemon::slot_router::SlotRouter;
use pgcache::testkit::TestRedisCluster;

use crate::cluster_daemon::{
    cluster_config_with, cut_off_replica, master_and_replica, start_cluster, stopped_fields,
    STOPPABLE_RULES,
};
use crate::common::{eventually, verify, Daemon, Env};

async fn node_conn(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The slots a master on `port` serves.
fn slots_of(cluster: &TestRedisCluster, port: u16) -> Vec<u16> {
    let view = cluster.topology().unwrap();
    let node = view
        .iter()
        .find(|n| n.port() == Some(port) && n.is_master())
        .unwrap();
    node.slots.iter().flat_map(|&(a, b)| a..=b).collect()
}

/// CRC16 / hash tags: `key_slot` equals `CLUSTER KEYSLOT` for odd keys (braces, empty tags,
/// several tags, NUL and non-ASCII bytes, long keys).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review3_key_slot_equals_cluster_keyslot() {
    let cluster = start_cluster(3, 0).await;
    let mut conn = node_conn(cluster.nodes()[0].port()).await;
    let mut keys: Vec<Vec<u8>> = [
        "",
        "{",
        "}",
        "{}",
        "{}{a}",
        "a{}b",
        "{a}",
        "a{b}c",
        "{{a}}",
        "{a}}",
        "a{b}{c}",
        "}{a}",
        "{}}",
        "{{}}",
        "a{{b}}c",
        "x{y",
        "x}y{z}",
        "{ab}cd",
        "{\u{e9}}",
        "\u{1F600}",
        "{\u{1F600}}x",
        "123456789",
    ]
    .iter()
    .map(|k| k.as_bytes().to_vec())
    .collect();
    for b in 0..=255u8 {
        keys.push(vec![b]);
        keys.push(vec![b'{', b, b'}', b'x']);
    }
    let alphabet = [b'{', b'}', b'a', 0u8, 0xff, 0x80, b'z', b'{', b'}'];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..5_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 24) as usize;
        let mut key = Vec::with_capacity(len);
        let mut y = x;
        for _ in 0..len {
            y = y.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let pick = (y >> 33) as usize;
            key.push(if pick % 3 == 0 {
                (pick >> 8) as u8
            } else {
                alphabet[pick % alphabet.len()]
            });
        }
        keys.push(key);
    }
    keys.push(vec![b'k'; 100_000]);
    let mut pipe = redis::pipe();
    for key in &keys {
        pipe.cmd("CLUSTER").arg("KEYSLOT").arg(key.as_slice());
    }
    let slots: Vec<u16> = pipe.query_async(&mut conn).await.unwrap();
    let wrong: Vec<_> = keys
        .iter()
        .zip(&slots)
        .filter(|(k, s)| key_slot(k) != **s)
        .map(|(k, s)| {
            (
                String::from_utf8_lossy(&k[..k.len().min(40)]).to_string(),
                *s,
                key_slot(k),
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {}: {wrong:?}",
        wrong.len(),
        keys.len()
    );
}

const STOP_SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, t int NOT NULL, v int NOT NULL);
ALTER TABLE items REPLICA IDENTITY FULL;
CREATE TABLE other (id int PRIMARY KEY, v int NOT NULL);
INSERT INTO items SELECT g, 0, 0 FROM generate_series(1, 5) g;
INSERT INTO other SELECT g, 0 FROM generate_series(1, 10) g;
";

/// A table stopped mid-session writes the `stopped` mark into every slot checkpoint; on a
/// master that holds none of the table's keys that is the only write. Without
/// wait_replicas, a failover that loses that one write leaves the master's slots without the
/// mark while epoch, owner and lsn are unchanged. Expected (G4/G7): the daemon notices (as it
/// does for lost positions) and puts the mark back, or at least readers never cache a key of
/// the stopped table. Checks: the mark on every slot some seconds after the failover, and a
/// reader's fill of a row of the stopped table that a later update would leave stale.
///
/// The old master is partitioned (SIGSTOP) and comes back demoted, so the daemon's session
/// survives the failover (a killed master ends it, and the next takeover sees the slots
/// disagree and marks them again). Before the fix the mark stayed missing on the promoted
/// master's slots, nothing noticed, and a reader filled a key of the stopped table that
/// then stayed stale; now the heartbeat's read-back notices and the session starts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review3_a_stopped_mark_lost_in_a_failover_is_written_again_before_readers_fill() {
    let env = Env::start(STOP_SCHEMA, "public.items,public.other");
    let cluster = start_cluster(3, 1).await;
    let text = cluster_config_with(&env, &cluster, STOPPABLE_RULES, "");
    let path = env.dir.path().join("cluster.toml");
    std::fs::write(&path, &text).unwrap();
    let config = Arc::new(pgcache::config::Config::from_toml_str(&text).unwrap());
    let log = env.dir.path().join("daemon.log");
    let mut router = SlotRouter::connect(&cluster.urls(), None).await.unwrap();
    let mut daemon = Daemon::spawn(&path, &log);
    let (code, out) = eventually(Duration::from_secs(60), "converged", || {
        let path = path.clone();
        async move {
            let (code, out) = verify(&path).await;
            (code == 0).then_some((code, out))
        }
    })
    .await;
    assert_eq!(code, 0, "{out}");

    // A tag whose slot's master holds neither the items keys ({0}) nor the root checkpoint.
    let root_port = cluster
        .master_of_slot(key_slot(checkpoint_key("", "pgcache").as_bytes()))
        .unwrap()
        .port();
    let items_port = cluster.master_of_slot(key_slot(b"0")).unwrap().port();
    let other_ports: Vec<u16> = (1..=10)
        .map(|id| {
            cluster
                .master_of_slot(key_slot(format!("other:{id}").as_bytes()))
                .unwrap()
                .port()
        })
        .collect();
    let tag = (1..2000)
        .find(|t| {
            let port = cluster
                .master_of_slot(key_slot(t.to_string().as_bytes()))
                .unwrap()
                .port();
            port != root_port && port != items_port
        })
        .expect("a tag on a third master");
    let key = format!("item:{{{tag}}}:100");
    let (master, replica) = master_and_replica(&cluster, &key);
    let m_port = cluster.nodes()[master].port();
    eprintln!(
        "tag {tag} on master {m_port}; root {root_port}; items {items_port}; other on {other_ports:?}"
    );
    // Let the replicas catch up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cut_off_replica(&cluster, master, replica);
    // The key column leaves the replica identity: the next change stops the table.
    env.sql("ALTER TABLE items REPLICA IDENTITY DEFAULT; UPDATE items SET v = 1 WHERE id = 1");
    let ck = slot_checkpoint_key("", "pgcache", key_slot(tag.to_string().as_bytes()));
    eventually(Duration::from_secs(30), "the mark on the master", || {
        let ck = ck.clone();
        async move {
            let mut conn = node_conn(m_port).await;
            let got: Option<String> = redis::cmd("HGET")
                .arg(&ck)
                .arg("stopped")
                .query_async(&mut conn)
                .await
                .ok()?;
            got.map(|_| ())
        }
    })
    .await;
    assert!(daemon.log().contains("table stopped"), "{}", daemon.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The old master is partitioned (paused), not killed: the daemon's connections to it
    // stay open. The replica, which never got the mark, takes over; the old master comes
    // back, finds itself demoted and resyncs from the new one.
    cluster.nodes()[master].pause().unwrap();
    cluster.nodes()[replica].resume().unwrap();
    cluster.nodes()[replica]
        .cli(&["CLUSTER", "FAILOVER", "TAKEOVER"])
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the replica to serve the slots",
        || {
            let ok = cluster.nodes()[replica]
                .cli(&["ROLE"])
                .is_ok_and(|r| r.starts_with("master"));
            async move { ok.then_some(()) }
        },
    )
    .await;
    cluster.nodes()[master].resume().unwrap();
    eventually(Duration::from_secs(30), "the old master demoted", || {
        let ok = cluster.nodes()[master]
            .cli(&["ROLE"])
            .is_ok_and(|r| r.starts_with("slave"));
        async move { ok.then_some(()) }
    })
    .await;
    // Within a few heartbeats every slot carries the mark again.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let marks = loop {
        let marks = stopped_fields(&mut router).await;
        if !marks.contains_key(&None) {
            break marks;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} slot checkpoints lost the stopped mark and the daemon did not notice\n{}",
            marks[&None],
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert!(
        daemon.log().contains("do not hold the stopped mark"),
        "{}",
        daemon.log()
    );

    // A reader of the stopped table.
    env.sql(&format!("INSERT INTO items VALUES (100, {tag}, 1)"));
    // Moves the root's `applied` past the insert (other:1 is not on that master).
    env.sql("UPDATE other SET v = v + 1 WHERE id = 1");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reader = pgcache::Reader::from_config(&config).unwrap();
    // The reader connects lazily: let it reach the cluster first.
    for _ in 0..10 {
        let _: Option<serde_json::Value> = reader.get("other", 2).await.unwrap();
        if reader.stats().hits > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let first: Option<serde_json::Value> = reader.get("items", (tag, 100)).await.unwrap();
    assert_eq!(first.unwrap()["v"], 1);
    let stats = reader.table("items").unwrap().stats();
    env.sql("UPDATE items SET v = 2 WHERE id = 100");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second: Option<serde_json::Value> = reader.get("items", (tag, 100)).await.unwrap();
    let cached = {
        let mut cmd = redis::cmd("GET");
        cmd.arg(&key);
        let _ = router.refresh().await;
        let r = router
            .send_each(&[(key_slot(key.as_bytes()), cmd)])
            .await
            .unwrap();
        redis::from_redis_value::<Option<String>>(r.into_iter().next().unwrap()).unwrap()
    };
    let text = daemon.log();
    daemon.terminate();
    assert!(
        second.as_ref().is_some_and(|r| r["v"] == 2) && cached.is_none(),
        "reader stats after the first read {stats:?}; the reader read {second:?} after the \
         row became v = 2; Redis holds {key} = {cached:?}\n{text}"
    );
}

/// The session's memory of the mark: slots that disagree at start (one master's slots
/// lost the mark while the daemon was down, or hold another value) get the mark again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review3_slots_that_disagree_on_the_mark_at_start_get_it_again() {
    const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, t int NOT NULL, v int NOT NULL);
CREATE TABLE other (id int PRIMARY KEY, v int NOT NULL);
INSERT INTO items SELECT g, g % 16, 0 FROM generate_series(1, 10) g;
INSERT INTO other SELECT g, 0 FROM generate_series(1, 10) g;
";
    let env = Env::start(SCHEMA, "public.items,public.other");
    let cluster = start_cluster(3, 0).await;
    let path = env.dir.path().join("cluster.toml");
    std::fs::write(
        &path,
        cluster_config_with(&env, &cluster, STOPPABLE_RULES, ""),
    )
    .unwrap();
    let log = env.dir.path().join("daemon.log");
    let mut router = SlotRouter::connect(&cluster.urls(), None).await.unwrap();
    let masters: Vec<u16> = cluster
        .masters()
        .unwrap()
        .iter()
        .map(|n| n.port())
        .collect();
    // Round 0: first start. Round 1: one master's slots lose the field. Round 2: one
    // master's slots hold another value. Round 3: every slot loses it (all agree on none).
    for round in 0..4 {
        if round > 0 {
            let targets: Vec<u16> = if round == 3 {
                masters.clone()
            } else {
                vec![masters[round]]
            };
            for port in targets {
                let mut conn = node_conn(port).await;
                let mut pipe = redis::pipe();
                for slot in slots_of(&cluster, port) {
                    let ck = slot_checkpoint_key("", "pgcache", slot);
                    if round == 2 {
                        pipe.cmd("HSET")
                            .arg(ck)
                            .arg("stopped")
                            .arg("nothing:*")
                            .ignore();
                    } else {
                        pipe.cmd("HDEL").arg(ck).arg("stopped").ignore();
                    }
                }
                let () = pipe.query_async(&mut conn).await.unwrap();
            }
        }
        let mut daemon = Daemon::spawn(&path, &log);
        env.sql(&format!("UPDATE other SET v = {round} + 10 WHERE id = 1"));
        let want = format!("\"v\":{}", round + 10);
        eventually(Duration::from_secs(30), "other:1", || {
            let want = want.clone();
            let mut cmd = redis::cmd("GET");
            cmd.arg("other:1");
            let urls = cluster.urls();
            async move {
                let mut router = SlotRouter::connect(&urls, None).await.ok()?;
                let r = router
                    .send_each(&[(key_slot(b"other:1"), cmd)])
                    .await
                    .ok()?;
                let v: Option<String> = redis::from_redis_value(r.into_iter().next()?).ok()?;
                v?.contains(&want).then_some(())
            }
        })
        .await;
        let marks = stopped_fields(&mut router).await;
        let text = daemon.log();
        daemon.terminate();
        assert_eq!(marks.len(), 1, "round {round}: {marks:?}\n{text}");
        let (pattern, count) = marks.iter().next().unwrap();
        assert!(
            pattern.as_deref().is_some_and(|p| p.contains("item:")) && *count == 16384,
            "round {round}: {marks:?}"
        );
    }
}

/// Ordering within a slot across key-space cuts: one transaction updates many keys over
/// many hash tags several times, truncates the table in the middle, inserts again and
/// updates again; another batch does it across transactions. Redis must equal Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review3_big_batches_with_truncates_keep_order_per_slot() {
    const SCHEMA: &str = "
CREATE TABLE orders (tenant int, id int, v int NOT NULL, PRIMARY KEY (tenant, id));
CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
INSERT INTO orders SELECT g % 97, g, 0 FROM generate_series(1, 3000) g;
INSERT INTO items SELECT g, 0 FROM generate_series(1, 3000) g;
";
    const RULES: &str = r#"[[tables]]
table = "orders"
key = "tenant:{{{tenant}}}:order:{id}"

[[tables]]
table = "items"
key = "item:{id}"
"#;
    let env = Env::start(SCHEMA, "public.orders,public.items");
    let cluster = start_cluster(3, 0).await;
    let path = env.dir.path().join("cluster.toml");
    std::fs::write(&path, cluster_config_with(&env, &cluster, RULES, "")).unwrap();
    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::spawn(&path, &log);
    let converged = |what: &'static str| {
        let path = path.clone();
        async move {
            let mut last = String::new();
            for _ in 0..60 {
                let (code, out) = verify(&path).await;
                if code == 0 {
                    return Ok(());
                }
                last = out;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(format!("{what}: {last}"))
        }
    };
    converged("start").await.unwrap();
    env.sql(
        "BEGIN;
         UPDATE orders SET v = v + 1;
         UPDATE items SET v = v + 1;
         UPDATE orders SET v = v + 10 WHERE id % 3 = 0;
         TRUNCATE orders;
         UPDATE items SET v = v + 100 WHERE id % 2 = 0;
         INSERT INTO orders SELECT g % 89, g, 5 FROM generate_series(1, 2000) g;
         UPDATE orders SET v = v + 7 WHERE id % 5 = 0;
         DELETE FROM orders WHERE id % 11 = 0;
         UPDATE orders SET tenant = tenant + 1 WHERE id % 13 = 0;
         COMMIT;",
    );
    // Many small transactions in one batch, a truncate among them.
    env.sql(
        "DO $$ BEGIN FOR i IN 1..200 LOOP
           UPDATE orders SET v = v + 1 WHERE id % 200 = i % 200;
           UPDATE items SET v = v + 1 WHERE id % 200 = i % 200;
         END LOOP; END $$;
         UPDATE orders SET v = v * 2;
         TRUNCATE items;
         INSERT INTO items SELECT g, g FROM generate_series(1, 1500) g;
         UPDATE items SET v = v + 1 WHERE id % 7 = 0;",
    );
    let result = converged("after the batches").await;
    let text = daemon.log();
    daemon.terminate();
    result.unwrap_or_else(|e| panic!("{e}\n{text}"));
}
