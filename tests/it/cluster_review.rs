//! Attacks on the cluster node write (one script per master over many slots) from an
//! adversarial review: Redis refusing writes (out of memory, too few replicas), batches over
//! several scripts per master under resharding and kill -9, slots half migrated by hand.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use pgcache::checkpoint::{checkpoint_key, slot_checkpoint_key};
use pgcache::cluster::key_slot;
use pgcache::daemon::slot_router::SlotRouter;
use pgcache::testkit::TestRedisCluster;

use crate::cluster_daemon::{cluster_config_with, start_cluster};
use crate::common::{Env, InProcess};

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
INSERT INTO items SELECT g, 0 FROM generate_series(1, 600) g;
";

const TABLES: &str = "public.items";

const RULES: &str = r#"[[tables]]
table = "items"
key = "item:{id}"
"#;

fn cluster_config(env: &Env, cluster: &TestRedisCluster, extra: &str) -> String {
    cluster_config_with(env, cluster, RULES, extra)
}

async fn values(router: &mut SlotRouter, keys: &[String]) -> Vec<Option<i64>> {
    let cmds: Vec<(u16, redis::Cmd)> = keys
        .iter()
        .map(|key| {
            let mut cmd = redis::cmd("GET");
            cmd.arg(key);
            (key_slot(key.as_bytes()), cmd)
        })
        .collect();
    let replies = match router.send_each(&cmds).await {
        Ok(r) => r,
        Err(_) => {
            let _ = router.refresh().await;
            router.send_each(&cmds).await.expect("read the cluster")
        }
    };
    replies
        .into_iter()
        .map(|v| {
            redis::from_redis_value::<Option<String>>(v)
                .ok()
                .flatten()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|j| j["v"].as_i64())
        })
        .collect()
}

async fn hget(router: &mut SlotRouter, key: &str, field: &str) -> Option<String> {
    let mut cmd = redis::cmd("HGET");
    cmd.arg(key).arg(field);
    let reply = router
        .send_each(&[(key_slot(key.as_bytes()), cmd)])
        .await
        .ok()?;
    redis::from_redis_value(reply.into_iter().next()?).ok()?
}

/// Keys whose `v` in Redis differs from Postgres (at most 10).
async fn differences(router: &mut SlotRouter, pg: &tokio_postgres::Client) -> Vec<String> {
    let mut want = BTreeMap::new();
    for row in pg.query("SELECT id, v FROM items", &[]).await.unwrap() {
        want.insert(
            format!("item:{}", row.get::<_, i32>(0)),
            i64::from(row.get::<_, i32>(1)),
        );
    }
    let keys: Vec<String> = want.keys().cloned().collect();
    let got = values(router, &keys).await;
    let mut out = Vec::new();
    for ((key, v), got) in want.iter().zip(got) {
        if got != Some(*v) {
            out.push(format!("{key}: v = {v} in Postgres, {got:?} cached"));
        }
    }
    out.truncate(10);
    out
}

async fn converges(router: &mut SlotRouter, env: &Env, limit: Duration) -> Result<(), String> {
    let pg = env.pg_client().await;
    let deadline = std::time::Instant::now() + limit;
    loop {
        let diff = differences(router, &pg).await;
        if diff.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!("not converged within {limit:?}: {diff:#?}"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// An item key whose slot's master holds neither the root checkpoint nor is the first node.
fn key_off_the_root(cluster: &TestRedisCluster) -> String {
    let root = key_slot(checkpoint_key("", "pgcache").as_bytes());
    let root_master = cluster.master_of_slot(root).unwrap().port();
    let first = cluster.nodes()[0].port();
    (1..=600)
        .map(|id| format!("item:{id}"))
        .find(|key| {
            let port = cluster
                .master_of_slot(key_slot(key.as_bytes()))
                .unwrap()
                .port();
            port != root_master && port != first
        })
        .expect("a key on a third master")
}

/// A master out of memory (maxmemory reached, `noeviction`) while the daemon writes a row
/// change to it. A guarded `MULTI … EXEC` is refused whole (EXECABORT, OOM), so the daemon
/// retries. Redis refuses only a script's first write when out of memory: the node script
/// used to swallow that refusal, let the lease `DEL` and the checkpoint `HSET` through, and
/// so moved the slot's position past a change whose value never landed (the key stayed old
/// for good). It now stops at the refused first write, with nothing written.
async fn oom_scenario(oom: bool) -> Result<(), String> {
    let fault: &[&[&str]] = if oom {
        &[&["maxmemory-policy", "noeviction"], &["maxmemory", "1"]]
    } else {
        &[]
    };
    let undo: &[&[&str]] = if oom { &[&["maxmemory", "0"]] } else { &[] };
    fault_scenario(fault, undo).await
}

async fn fault_scenario(fault: &[&[&str]], undo: &[&[&str]]) -> Result<(), String> {
    let env = Env::start(SCHEMA, TABLES);
    let cluster = start_cluster(3, 0).await;
    let config = Arc::new(
        pgcache::config::Config::from_toml_str(&cluster_config(&env, &cluster, "")).unwrap(),
    );
    let mut router = SlotRouter::connect(&cluster.urls(), None).await.unwrap();
    let daemon = InProcess::start(config.clone());
    converges(&mut router, &env, Duration::from_secs(60))
        .await
        .expect("the first load");

    let key = key_off_the_root(&cluster);
    let id: i32 = key.strip_prefix("item:").unwrap().parse().unwrap();
    let slot = key_slot(key.as_bytes());
    let ck = slot_checkpoint_key("", "pgcache", slot);
    let node = cluster.master_of_slot(slot).unwrap();
    let before = hget(&mut router, &ck, "lsn").await;
    for kv in fault {
        node.cli(&["CONFIG", "SET", kv[0], kv[1]]).unwrap();
    }
    env.sql(&format!("UPDATE items SET v = 77 WHERE id = {id}"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = hget(&mut router, &ck, "lsn").await;
    for kv in undo {
        node.cli(&["CONFIG", "SET", kv[0], kv[1]]).unwrap();
    }
    // More changes after memory is back, so the daemon surely catches up.
    env.sql("UPDATE items SET v = v + 1 WHERE id BETWEEN 500 AND 520");
    let result = converges(&mut router, &env, Duration::from_secs(30)).await;
    let after = hget(&mut router, &ck, "lsn").await;
    daemon.stop().await.ok();
    result.map_err(|e| {
        format!(
            "{key} (slot {slot}): slot lsn before {before:?}, under OOM {during:?}, after {after:?}: {e}"
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_out_of_memory_loses_no_change() {
    oom_scenario(true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_without_the_memory_fault_converges() {
    oom_scenario(false).await.unwrap();
}

const BIG_SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
INSERT INTO items SELECT g, 0 FROM generate_series(1, 6000) g;
";

/// Reads every item over and over, recording any `v` lower than one seen before.
fn start_watcher(
    urls: Vec<String>,
    n: i32,
    stop: Arc<std::sync::atomic::AtomicBool>,
    wrong: Arc<std::sync::Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<()> {
    use std::sync::atomic::Ordering;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut router = SlotRouter::connect(&urls, None).await.unwrap();
            let keys: Vec<String> = (1..=n).map(|id| format!("item:{id}")).collect();
            let mut seen: std::collections::HashMap<String, i64> = Default::default();
            while !stop.load(Ordering::SeqCst) {
                let cmds: Vec<(u16, redis::Cmd)> = keys
                    .iter()
                    .map(|key| {
                        let mut cmd = redis::cmd("GET");
                        cmd.arg(key);
                        (key_slot(key.as_bytes()), cmd)
                    })
                    .collect();
                let Ok(replies) = router.send_each(&cmds).await else {
                    let _ = router.refresh().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                for (key, reply) in keys.iter().zip(replies) {
                    let Some(v) = redis::from_redis_value::<Option<String>>(reply)
                        .ok()
                        .flatten()
                        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                        .and_then(|j| j["v"].as_i64())
                    else {
                        continue;
                    };
                    let before = seen.insert(key.clone(), v).unwrap_or(v);
                    if v < before {
                        wrong
                            .lock()
                            .unwrap()
                            .push(format!("{key}: {before} then {v}"));
                        seen.insert(key.clone(), before);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    })
}

/// Attack: batches of over 4096 commands per master (several node scripts per master, sent
/// at once), while `redis-cli --cluster reshard` moves slots and the daemon is killed -9
/// again and again. Expected: no value goes back, the cache converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_over_several_scripts_per_master_under_reshard_and_kill9() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let env = Env::start(BIG_SCHEMA, TABLES);
    let cluster = start_cluster(3, 0).await;
    let path = env.dir.path().join("cluster.toml");
    std::fs::write(&path, cluster_config(&env, &cluster, "")).unwrap();
    let log = env.dir.path().join("daemon.log");
    let mut router = SlotRouter::connect(&cluster.urls(), None).await.unwrap();
    let mut daemon = crate::common::Daemon::spawn(&path, &log);
    converges(&mut router, &env, Duration::from_secs(120))
        .await
        .expect("first load");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(std::sync::Mutex::new(Vec::new()));
    let url = env.pg.url(crate::common::DB);
    let workload = {
        let stop = stop.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                while !stop.load(Ordering::SeqCst) {
                    // Every row in one transaction: ~2000 keys per master, in ~1800 slots.
                    if client
                        .batch_execute("UPDATE items SET v = v + 1")
                        .await
                        .is_ok()
                    {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        })
    };
    let watcher = start_watcher(cluster.urls(), 6000, stop.clone(), wrong.clone());
    let topo = cluster.topology().unwrap();
    let masters: Vec<_> = topo.iter().filter(|n| n.is_master()).collect();
    let moves = [
        (masters[0].id.clone(), masters[1].id.clone()),
        (masters[2].id.clone(), masters[0].id.clone()),
    ];
    let addr = cluster
        .url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    let killer = {
        let stop = stop.clone();
        let path = path.clone();
        let log = log.clone();
        std::thread::spawn(move || {
            let mut kills = 0;
            while !stop.load(Ordering::SeqCst) && kills < 8 {
                std::thread::sleep(Duration::from_millis(1700));
                daemon.kill9();
                std::thread::sleep(Duration::from_millis(200));
                daemon = crate::common::Daemon::spawn(&path, &log);
                kills += 1;
            }
            daemon
        })
    };
    for (from, to) in moves {
        let addr = addr.clone();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("redis-cli")
                .args(["--cluster", "reshard", &addr])
                .args(["--cluster-from", &from, "--cluster-to", &to])
                .args(["--cluster-slots", "2000", "--cluster-yes"])
                .args(["--cluster-pipeline", "10"])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "reshard: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut daemon = killer.join().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    workload.join().unwrap();
    let _ = router.refresh().await;
    let result = converges(&mut router, &env, Duration::from_secs(120)).await;
    watcher.join().unwrap();
    let wrong = wrong.lock().unwrap().clone();
    let text = daemon.log();
    daemon.terminate();
    eprintln!("transactions: {}", done.load(Ordering::SeqCst));
    result.unwrap_or_else(|e| panic!("{e}\n{}", &text[text.len().saturating_sub(5000)..]));
    assert!(
        wrong.is_empty(),
        "values went back: {:#?}",
        &wrong[..wrong.len().min(10)]
    );
}

/// Control for the OOM attack: the same fault on one Redis (the daemon's write there is a
/// guarded `MULTI … EXEC`, which Redis refuses whole with EXECABORT under OOM). Expected
/// and observed: nothing is lost; the daemon waits and converges once memory is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_redis_out_of_memory_waits_and_catches_up() {
    let env = Env::start(SCHEMA, TABLES);
    let daemon = InProcess::start(env.config(RULES));
    let mut r = env.redis().await;
    let read = |r: &mut redis::aio::MultiplexedConnection, key: String| {
        let mut r = r.clone();
        async move {
            let text: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut r)
                .await
                .unwrap();
            text.and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|j| j["v"].as_i64())
        }
    };
    crate::common::eventually(Duration::from_secs(60), "the first load", || {
        let f = read(&mut r, "item:600".into());
        async move { (f.await == Some(0)).then_some(()) }
    })
    .await;
    env.redis
        .cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .unwrap();
    env.redis.cli(&["CONFIG", "SET", "maxmemory", "1"]).unwrap();
    env.sql("UPDATE items SET v = 77 WHERE id = 4");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = read(&mut r, "item:4".into()).await;
    env.redis.cli(&["CONFIG", "SET", "maxmemory", "0"]).unwrap();
    env.sql("UPDATE items SET v = v + 1 WHERE id BETWEEN 500 AND 520");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let a = read(&mut r, "item:4".into()).await;
        let b = read(&mut r, "item:510".into()).await;
        if a == Some(77) && b == Some(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "single server: item:4 = {a:?} (under OOM {during:?}), item:510 = {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    daemon.stop().await.ok();
}

/// Attack: a slot left half migrated by hand (`SETSLOT … IMPORTING/MIGRATING`, then
/// `MIGRATE` of only the slot checkpoint, or only the row key) while its row changes, with
/// a kill -9 of the daemon in the middle; then the migration is finished. Expected: nothing
/// lost, no value goes back.
async fn half_migrated(move_ck: bool) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let env = Env::start(SCHEMA, TABLES);
    let cluster = start_cluster(3, 0).await;
    let path = env.dir.path().join("cluster.toml");
    std::fs::write(&path, cluster_config(&env, &cluster, "")).unwrap();
    let log = env.dir.path().join("daemon.log");
    let mut router = SlotRouter::connect(&cluster.urls(), None).await.unwrap();
    let mut daemon = crate::common::Daemon::spawn(&path, &log);
    converges(&mut router, &env, Duration::from_secs(60))
        .await
        .expect("first load");
    let stop = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(std::sync::Mutex::new(Vec::new()));
    let watcher = start_watcher(cluster.urls(), 600, stop.clone(), wrong.clone());

    let key = key_off_the_root(&cluster);
    let id: i32 = key.strip_prefix("item:").unwrap().parse().unwrap();
    let slot = key_slot(key.as_bytes());
    let ck = slot_checkpoint_key("", "pgcache", slot);
    // Give the slot a position first.
    env.sql(&format!("UPDATE items SET v = v + 1 WHERE id = {id}"));
    converges(&mut router, &env, Duration::from_secs(30))
        .await
        .unwrap();
    let topo = cluster.topology().unwrap();
    let a = cluster.master_of_slot(slot).unwrap();
    let a_port = a.port();
    let a_id = topo
        .iter()
        .find(|n| n.port() == Some(a_port))
        .unwrap()
        .id
        .clone();
    let b_node = topo
        .iter()
        .find(|n| n.is_master() && n.port() != Some(a_port))
        .unwrap();
    let b_id = b_node.id.clone();
    let b_port = b_node.port().unwrap();
    let b = cluster.nodes().iter().find(|n| n.port() == b_port).unwrap();
    let s = slot.to_string();
    b.cli(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &a_id])
        .unwrap();
    a.cli(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &b_id])
        .unwrap();
    let first = if move_ck { ck.clone() } else { key.clone() };
    let out = a
        .cli(&[
            "MIGRATE",
            "127.0.0.1",
            &b_port.to_string(),
            &first,
            "0",
            "5000",
        ])
        .unwrap();
    assert!(out.contains("OK"), "MIGRATE {first}: {out}");

    for round in 0..3 {
        env.sql(&format!(
            "UPDATE items SET v = v + 1 WHERE id = {id}; UPDATE items SET v = v + 1 WHERE id BETWEEN {} AND {}",
            100 + round * 10,
            105 + round * 10
        ));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    daemon.kill9();
    env.sql(&format!("UPDATE items SET v = v + 1 WHERE id = {id}"));
    daemon = crate::common::Daemon::spawn(&path, &log);
    for _ in 0..2 {
        env.sql(&format!(
            "UPDATE items SET v = v + 1 WHERE id IN ({id}, 300, 301)"
        ));
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Finish the migration.
    loop {
        let keys = a.cli(&["CLUSTER", "GETKEYSINSLOT", &s, "100"]).unwrap();
        let keys: Vec<&str> = keys
            .lines()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .collect();
        if keys.is_empty() {
            break;
        }
        let mut args = vec!["MIGRATE", "127.0.0.1"];
        let port = b_port.to_string();
        args.push(&port);
        args.extend(["", "0", "5000", "KEYS"]);
        args.extend(keys.iter().copied());
        let out = a.cli(&args).unwrap();
        assert!(
            out.contains("OK") || out.contains("NOKEY"),
            "MIGRATE: {out}"
        );
    }
    for node in cluster.nodes() {
        let _ = node.cli(&["CLUSTER", "SETSLOT", &s, "NODE", &b_id]);
    }
    let _ = router.refresh().await;
    let result = converges(&mut router, &env, Duration::from_secs(60)).await;
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    let text = daemon.log();
    daemon.terminate();
    result.unwrap_or_else(|e| panic!("{e}\n{}", &text[text.len().saturating_sub(4000)..]));
    let wrong = wrong.lock().unwrap().clone();
    assert!(wrong.is_empty(), "values went back: {wrong:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_half_migrated_checkpoint_first_with_kill9() {
    half_migrated(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_half_migrated_row_key_first_with_kill9() {
    half_migrated(false).await;
}

const TAG_SCHEMA: &str = "
CREATE TABLE orders (tenant int, id int, v int NOT NULL, PRIMARY KEY (tenant, id));
INSERT INTO orders SELECT g % 20, g, 0 FROM generate_series(1, 400) g;
";

const TAG_RULES: &str = r#"[[tables]]
table = "orders"
key = "tenant:{{{tenant}}}:order:{id}"
"#;

/// Attack (G5): under OOM on the master of a tenant's hash tag, one Postgres transaction
/// that updates one of the tenant's orders and deletes another lands half: the delete (a
/// `DEL`, not deny-oom) is applied, the update (`MSET`, refused and swallowed by
/// `redis.pcall`) is not, and the slot checkpoint moves past the transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_tagged_transaction_out_of_memory_lands_whole() {
    tag_scenario(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hash_tagged_transaction_without_the_fault() {
    tag_scenario(false).await;
}

async fn tag_scenario(oom: bool) {
    let env = Env::start(TAG_SCHEMA, "public.orders");
    let cluster = start_cluster(3, 0).await;
    let single = format!("[redis]\nurl = \"{}\"\n", env.redis.url());
    let text = env.config_toml(TAG_RULES);
    let seeds: Vec<String> = cluster.urls().iter().map(|u| format!("{u:?}")).collect();
    let text = text.replace(
        &single,
        &format!("[redis]\nurls = [{}]\ncluster = true\n", seeds.join(", ")),
    );
    let config = Arc::new(pgcache::config::Config::from_toml_str(&text).unwrap());
    let mut router = SlotRouter::connect(&cluster.urls(), None).await.unwrap();
    let daemon = InProcess::start(config);
    let root = key_slot(checkpoint_key("", "pgcache").as_bytes());
    let root_port = cluster.master_of_slot(root).unwrap().port();
    let tenant = (0..20)
        .find(|t| {
            let k = format!("tenant:{{{t}}}:order:0");
            cluster
                .master_of_slot(key_slot(k.as_bytes()))
                .unwrap()
                .port()
                != root_port
        })
        .unwrap();
    let ids: Vec<i32> = (1..=400).filter(|g| g % 20 == tenant).collect();
    let (upd, del) = (ids[0], ids[1]);
    let k_upd = format!("tenant:{{{tenant}}}:order:{upd}");
    let k_del = format!("tenant:{{{tenant}}}:order:{del}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while get_raw(&mut router, &k_del).await.is_none() {
        assert!(std::time::Instant::now() < deadline, "the first load");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let node = cluster.master_of_slot(key_slot(k_upd.as_bytes())).unwrap();
    if oom {
        node.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
            .unwrap();
        node.cli(&["CONFIG", "SET", "maxmemory", "1"]).unwrap();
    }
    env.sql(&format!(
        "BEGIN;
         UPDATE orders SET v = 77 WHERE tenant = {tenant} AND id = {upd};
         DELETE FROM orders WHERE tenant = {tenant} AND id = {del};
         COMMIT;"
    ));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let upd_during = get_raw(&mut router, &k_upd).await;
    let del_during = get_raw(&mut router, &k_del).await;
    node.cli(&["CONFIG", "SET", "maxmemory", "0"]).unwrap();
    env.sql("UPDATE orders SET v = v + 1 WHERE id = 399");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let upd_after = get_raw(&mut router, &k_upd).await;
    let del_after = get_raw(&mut router, &k_del).await;
    daemon.stop().await.ok();
    assert!(
        del_after.is_none() && upd_after.as_deref().is_some_and(|v| v.contains("\"v\":77")),
        "one transaction (update {k_upd}, delete {k_del}): under OOM {k_upd} = {upd_during:?}, {k_del} = {del_during:?}; after memory is back {k_upd} = {upd_after:?}, {k_del} = {del_after:?}"
    );
}

async fn get_raw(router: &mut SlotRouter, key: &str) -> Option<String> {
    let mut cmd = redis::cmd("GET");
    cmd.arg(key);
    let reply = router
        .send_each(&[(key_slot(key.as_bytes()), cmd)])
        .await
        .ok()?;
    redis::from_redis_value::<Option<String>>(reply.into_iter().next()?)
        .ok()
        .flatten()
}

/// `min-replicas-to-write 1` on a master without replicas (every write refused with
/// NOREPLICAS): the node script stops at its first refused write, with nothing written, and
/// the daemon sends the batch again until writes are allowed. (It used to swallow the
/// refusals and answer `ok`, recording positions it never wrote.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_refused_for_lack_of_replicas_wait_and_converge() {
    fault_scenario(
        &[&["min-replicas-to-write", "1"]],
        &[&["min-replicas-to-write", "0"]],
    )
    .await
    .unwrap();
}
