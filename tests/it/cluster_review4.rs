//! Adversarial review 4 (commit 4993be8): cluster key-space drops listed a range of slots at
//! a time, where they meet large transactions written in parts (`partial`), kill -9, and
//! hash tags.

use std::time::Duration;

use pgcache::checkpoint::{checkpoint_key, slot_checkpoint_key};
use pgcache::cluster::key_slot;
use pgcache::daemon::slot_router::SlotRouter;
use pgcache::testkit::TestRedisCluster;

use crate::cluster_daemon::{cluster_config_with, start_cluster};
use crate::common::{memory_kb, Daemon, Env};

const NOTES: &str = "CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL);
     INSERT INTO notes VALUES (0, 'first');";
const NOTE_RULES: &str = "[[tables]]\ntable = \"notes\"\nkey = \"note:{id}\"\n";

pub(crate) async fn router(cluster: &TestRedisCluster) -> SlotRouter {
    SlotRouter::connect(&cluster.urls(), None).await.unwrap()
}

pub(crate) async fn run(
    router: &mut SlotRouter,
    cmds: Vec<(u16, redis::Cmd)>,
) -> Vec<Option<String>> {
    let replies = match router.send_each(&cmds).await {
        Ok(r) => r,
        Err(_) => {
            let _ = router.refresh().await;
            // (A node busy with a long script: nothing read this time.)
            router
                .send_each(&cmds)
                .await
                .unwrap_or_else(|_| vec![redis::Value::Nil; cmds.len()])
        }
    };
    replies
        .into_iter()
        .map(|v| redis::from_redis_value::<Option<String>>(v).unwrap_or(None))
        .collect()
}

async fn get_many(router: &mut SlotRouter, keys: &[String]) -> Vec<Option<String>> {
    let cmds = keys
        .iter()
        .map(|k| {
            let mut cmd = redis::cmd("GET");
            cmd.arg(k);
            (key_slot(k.as_bytes()), cmd)
        })
        .collect();
    run(router, cmds).await
}

pub(crate) async fn hget(router: &mut SlotRouter, key: &str, field: &str) -> Option<String> {
    let mut cmd = redis::cmd("HGET");
    cmd.arg(key).arg(field);
    run(router, vec![(key_slot(key.as_bytes()), cmd)])
        .await
        .remove(0)
}

pub(crate) async fn get(router: &mut SlotRouter, key: &str) -> Option<String> {
    get_many(router, &[key.to_string()]).await.remove(0)
}

/// Postgres' current WAL insert position as the checkpoints' `applied` spells it.
pub(crate) async fn wal(pg: &tokio_postgres::Client) -> String {
    pg.query_one(
        "SELECT upper(lpad(to_hex((pg_current_wal_insert_lsn() - '0/0')::bigint), 16, '0'))",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The `partial` field of the slot checkpoint of each key's slot.
async fn partials(router: &mut SlotRouter, keys: &[String]) -> Vec<Option<String>> {
    let cmds = keys
        .iter()
        .map(|k| {
            let slot = key_slot(k.as_bytes());
            let mut cmd = redis::cmd("HGET");
            cmd.arg(slot_checkpoint_key("", "pgcache", slot))
                .arg("partial");
            (slot, cmd)
        })
        .collect();
    run(router, cmds).await
}

async fn keys(router: &mut SlotRouter, pattern: &str) -> Vec<String> {
    let _ = router.refresh().await;
    let mut out = Vec::new();
    for addr in router.masters() {
        let mut conn = router.node(&addr).await.unwrap();
        let mut cursor = "0".to_string();
        loop {
            let (next, page): (String, Vec<String>) = redis::cmd("SCAN")
                .arg(&cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut conn)
                .await
                .unwrap();
            out.extend(page);
            if next == "0" {
                break;
            }
            cursor = next;
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Writes `keys` (MSET per slot, 20,000 at a time), as values a reader filled once.
async fn write_keys(router: &mut SlotRouter, keys: impl Iterator<Item = String>) {
    let mut by_slot: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
    for key in keys {
        by_slot
            .entry(key_slot(key.as_bytes()))
            .or_default()
            .push(key);
    }
    let mut cmds = Vec::new();
    for (slot, keys) in by_slot {
        for chunk in keys.chunks(20_000) {
            let mut cmd = redis::cmd("MSET");
            for k in chunk {
                cmd.arg(k).arg("a value a reader filled once");
            }
            cmds.push((slot, cmd));
        }
    }
    for batch in cmds.chunks(2_000) {
        router.send_each(batch).await.expect("write keys");
    }
}

/// Waits until the root checkpoint's `applied` is at Postgres' current WAL position.
async fn wait_frontier(router: &mut SlotRouter, pg: &tokio_postgres::Client, daemon: &Daemon) {
    let wal = wal(pg).await;
    let root = checkpoint_key("", "pgcache");
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let applied = hget(router, &root, "applied").await.unwrap_or_default();
        if applied >= wal {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the frontier stayed at {applied:?}, before {wal}\n{}",
            tail(&daemon.log())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last `n` lines of a log.
pub(crate) fn tail_lines(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn tail(log: &str) -> String {
    tail_lines(log, 60)
}

/// Starts a daemon on `notes` with large transactions written in parts of 100 changes, and
/// 600,000 keys in the table's key space (a drop of them goes a range of slots at a time).
async fn big_notes() -> (
    Env,
    TestRedisCluster,
    std::path::PathBuf,
    Daemon,
    SlotRouter,
) {
    let env = Env::start(NOTES, "public.notes");
    let cluster = start_cluster(3, 0).await;
    let path = env.dir.path().join("cluster.toml");
    let text = cluster_config_with(&env, &cluster, NOTE_RULES, "").replace(
        "publication = \"pgcache\"\n",
        "publication = \"pgcache\"\nstreaming = false\n",
    ) + "\n[apply]\nmax_transaction_changes = 100\n";
    std::fs::write(&path, text).unwrap();
    let daemon = Daemon::spawn(&path, &env.dir.path().join("daemon.log"));
    let mut r = router(&cluster).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while get_many(&mut r, &["note:0".to_string()]).await[0].is_none() {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    write_keys(&mut r, (0..600_000).map(|i| format!("note:x{i}"))).await;
    (env, cluster, path, daemon, r)
}

/// Waits until the drop of `big_notes`' 600,000 keys is under way (some of a sample of them
/// gone) and none of `rows` is written yet; panics if the rows land first (inconclusive).
async fn mid_drop(r: &mut SlotRouter, rows: &[String], daemon: &Daemon) {
    let sample: Vec<String> = (0..300).map(|i| format!("note:x{}", i * 1999)).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let values = get_many(r, rows).await;
        assert!(
            values.iter().all(Option::is_none),
            "the inserts landed before the drop was seen under way (inconclusive)\n{}",
            tail(&daemon.log())
        );
        let left = get_many(r, &sample)
            .await
            .iter()
            .filter(|v| v.is_some())
            .count();
        if left < sample.len() {
            assert!(
                left > 0,
                "the drop was over before it was seen under way (inconclusive)"
            );
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            tail(&daemon.log())
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// (b) One transaction, larger than `max_transaction_changes`, truncates a table of 600,000
/// keys and inserts 150 rows. Its first part (the TRUNCATE and 99 inserts) moves each slot's
/// `partial` mark. The drop goes a range of slots at a time, so a slot's delete and its
/// inserts are different writes. kill -9 in the middle of the drop, then restart: every
/// inserted row must be there, and nothing else of the table. (From review 4: the mark went
/// with every write of a slot, the drop's too, so a slot deleted in before the kill skipped
/// the part's inserts after the restart: 11 rows missing for good, G1 and G6. The mark now
/// goes only with a slot's last write of the batch.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review4_kill9_between_range_passes_of_a_large_transactions_truncate_loses_its_inserts() {
    let (env, _cluster, path, mut daemon, mut r) = big_notes().await;
    let pg = env.pg_client().await;
    wait_frontier(&mut r, &pg, &daemon).await;
    let watched: Vec<String> = (1..=150).map(|id| format!("note:{id}")).collect();
    env.sql(
        "BEGIN; TRUNCATE notes; \
         INSERT INTO notes SELECT g, 'after' FROM generate_series(1, 150) g; COMMIT;",
    );
    mid_drop(&mut r, &watched, &daemon).await;
    daemon.kill9();
    let mut daemon = Daemon::spawn(&path, &env.dir.path().join("daemon.log"));
    wait_frontier(&mut r, &pg, &daemon).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let want: Vec<String> = {
        let mut w: Vec<String> = (1..=150).map(|id| format!("note:{id}")).collect();
        w.sort();
        w
    };
    let got = keys(&mut r, "note:*").await;
    let missing: Vec<&String> = want
        .iter()
        .filter(|k| got.binary_search(k).is_err())
        .collect();
    let extra: Vec<&String> = got
        .iter()
        .filter(|k| want.binary_search(k).is_err())
        .collect();
    let missing_owned: Vec<String> = missing.iter().map(|k| (*k).clone()).collect();
    println!(
        "slot checkpoints' partial of the missing rows: {:?}",
        partials(&mut r, &missing_owned).await
    );
    daemon.terminate();
    for line in daemon.log().lines().filter(|l| {
        l.contains("batch sent")
            || l.contains("resuming")
            || l.contains("range of slots")
            || l.contains("WARN")
            || l.contains("ERROR")
    }) {
        println!("{line}");
    }
    assert!(
        missing.is_empty() && extra.is_empty(),
        "after kill -9 and restart: rows missing from Redis: {missing:?}; keys left: {} ({:?})",
        extra.len(),
        extra.iter().take(10).collect::<Vec<_>>()
    );
}

/// (a) The same with a change before the TRUNCATE in the transaction: the row updated first
/// is written before the drop reaches its slot. kill -9 once it is there, in the middle of
/// the drop: after the restart the updated row of the truncated table, and every other key
/// of the table, must be gone. (From review 4: that write carried the part's `partial`, so
/// the restart skipped the drop in its slot, and 26 keys of the truncated table stayed,
/// stale, G6.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review4_kill9_before_a_large_transactions_truncate_reaches_a_written_slot_leaves_keys() {
    let (env, _cluster, path, mut daemon, mut r) = big_notes().await;
    let pg = env.pg_client().await;
    wait_frontier(&mut r, &pg, &daemon).await;
    let watched = vec!["note:0".to_string()];
    env.sql(
        "BEGIN; UPDATE notes SET body = 'updated' WHERE id = 0; TRUNCATE notes; \
         INSERT INTO notes SELECT g, 'after' FROM generate_series(1, 150) g; COMMIT;",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !get_many(&mut r, &watched).await[0]
        .as_deref()
        .is_some_and(|v| v.contains("updated"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            tail(&daemon.log())
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let inserted: Vec<String> = (1..=150).map(|id| format!("note:{id}")).collect();
    mid_drop(&mut r, &inserted, &daemon).await;
    daemon.kill9();
    let mut daemon = Daemon::spawn(&path, &env.dir.path().join("daemon.log"));
    wait_frontier(&mut r, &pg, &daemon).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let want: Vec<String> = {
        let mut w: Vec<String> = (1..=150).map(|id| format!("note:{id}")).collect();
        w.sort();
        w
    };
    let got = keys(&mut r, "note:*").await;
    let missing: Vec<&String> = want
        .iter()
        .filter(|k| got.binary_search(k).is_err())
        .collect();
    let extra: Vec<&String> = got
        .iter()
        .filter(|k| want.binary_search(k).is_err())
        .collect();
    let note0 = get_many(&mut r, &watched).await.remove(0);
    daemon.terminate();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "after kill -9 and restart: note:0 = {note0:?} (row deleted in Postgres); rows \
         missing: {missing:?}; keys of the truncated table left: {} ({:?})",
        extra.len(),
        extra.iter().take(10).collect::<Vec<_>>()
    );
}

/// A daemon on `notes` with `keys` written into the cluster beside its rows, then
/// `TRUNCATE notes; INSERT (1, 'after')` applied: the daemon's peak RSS before and after
/// (kB), and the table's keys left.
async fn truncate_measured(written: impl Iterator<Item = String>) -> (u64, u64, Vec<String>) {
    let env = Env::start(NOTES, "public.notes");
    let cluster = start_cluster(3, 0).await;
    let path = env.dir.path().join("cluster.toml");
    std::fs::write(&path, cluster_config_with(&env, &cluster, NOTE_RULES, "")).unwrap();
    let daemon = Daemon::spawn(&path, &env.dir.path().join("daemon.log"));
    let mut r = router(&cluster).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while get_many(&mut r, &["note:0".to_string()]).await[0].is_none() {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    write_keys(&mut r, written).await;
    let (before_kb, _) = memory_kb(daemon.pid()).expect("the daemon runs");
    env.sql("BEGIN; TRUNCATE notes; INSERT INTO notes VALUES (1, 'after'); COMMIT;");
    let started = std::time::Instant::now();
    let want = ["note:0".to_string(), "note:1".to_string()];
    let mut peak_kb = before_kb;
    loop {
        let (hwm, _) = memory_kb(daemon.pid()).expect("the daemon exited");
        peak_kb = peak_kb.max(hwm);
        let got = get_many(&mut r, &want).await;
        if got[0].is_none() && got[1].is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "the truncate was not applied in time (peak {peak_kb} kB, before {before_kb} kB)\n{}",
            tail(&daemon.log())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (hwm, _) = memory_kb(daemon.pid()).expect("the daemon exited");
    let left = keys(&mut r, "note:*").await;
    (before_kb, peak_kb.max(hwm), left)
}

/// (c) G8 with a hash tag: a TRUNCATE of a table whose 1,000,000 keys share one hash tag (one
/// slot, e.g. `tenant:{{{tenant}}}:...` with one big tenant) lists them all at once, and
/// writes their delete as one slot write: the daemon's memory grows with the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review4_a_truncate_of_one_big_hash_slot_stays_in_bounded_memory() {
    const KEYS: usize = 1_000_000;
    let (before_kb, peak_kb, left) =
        truncate_measured((0..KEYS).map(|i| format!("note:{{t}}:{i}"))).await;
    println!(
        "truncate of {KEYS} keys in one slot: peak RSS {before_kb} kB before, {peak_kb} kB after"
    );
    assert!(left == vec!["note:1".to_string()], "keys left");
    assert!(
        peak_kb < before_kb + 30 * 1024,
        "the daemon's peak RSS rose from {before_kb} kB to {peak_kb} kB dropping {KEYS} keys \
         of one hash slot"
    );
}

/// (d) G8 with cached absences: negative caching keeps a reader's "no such row" in the row's
/// lease key, so a table probed for many missing ids has many lease keys. The lease pass
/// before a drop's first listing holds every lease of each master at once (it has no
/// budget): a TRUNCATE with 1,000,000 cached absences grows the daemon with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review4_a_truncate_with_many_cached_absences_stays_in_bounded_memory() {
    const KEYS: usize = 1_000_000;
    let (before_kb, peak_kb, _) = truncate_measured(
        (0..KEYS).map(|i| pgcache::template::lease_key(&format!("note:{}", 1_000_000 + i))),
    )
    .await;
    println!(
        "truncate with {KEYS} cached absences: peak RSS {before_kb} kB before, {peak_kb} kB after"
    );
    assert!(
        peak_kb < before_kb + 30 * 1024,
        "the daemon's peak RSS rose from {before_kb} kB to {peak_kb} kB dropping {KEYS} \
         cached absences"
    );
}

/// (g) A drop of 600,000 keys (a range of slots at a time) with inserts after it in the same
/// transaction, while `redis-cli --cluster reshard` moves 3,000 slots (and their keys)
/// between masters: every key of the table goes, the inserted rows stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review4_a_range_drop_under_live_resharding_converges() {
    let env = Env::start(NOTES, "public.notes");
    let cluster = start_cluster(3, 0).await;
    let path = env.dir.path().join("cluster.toml");
    std::fs::write(&path, cluster_config_with(&env, &cluster, NOTE_RULES, "")).unwrap();
    let daemon = Daemon::spawn(&path, &env.dir.path().join("daemon.log"));
    let mut r = router(&cluster).await;
    let pg = env.pg_client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while get_many(&mut r, &["note:0".to_string()]).await[0].is_none() {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    write_keys(&mut r, (0..600_000).map(|i| format!("note:x{i}"))).await;
    wait_frontier(&mut r, &pg, &daemon).await;
    let topology = cluster.topology().unwrap();
    let masters: Vec<_> = topology.iter().filter(|n| n.is_master()).collect();
    let (from, to) = (masters[0].id.clone(), masters[1].id.clone());
    let addr = cluster
        .url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    let reshard = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-cli")
            .args(["--cluster", "reshard", &addr])
            .args(["--cluster-from", &from, "--cluster-to", &to])
            .args(["--cluster-slots", "3000", "--cluster-yes"])
            .args(["--cluster-pipeline", "100"])
            .output()
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.sql(
        "BEGIN; TRUNCATE notes; \
         INSERT INTO notes SELECT g, 'after' FROM generate_series(1, 150) g; COMMIT;",
    );
    let out = reshard.await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_frontier(&mut r, &pg, &daemon).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut want: Vec<String> = (1..=150).map(|id| format!("note:{id}")).collect();
    want.sort();
    let got = keys(&mut r, "note:*").await;
    let missing: Vec<&String> = want
        .iter()
        .filter(|k| got.binary_search(k).is_err())
        .collect();
    let extra: Vec<&String> = got
        .iter()
        .filter(|k| want.binary_search(k).is_err())
        .collect();
    let log = daemon.log();
    for line in log
        .lines()
        .filter(|l| l.contains("range of slots") || l.contains("WARN") || l.contains("ERROR"))
    {
        println!("{line}");
    }
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}; left {} ({:?})",
        extra.len(),
        extra.iter().take(10).collect::<Vec<_>>()
    );
}

/// (h) G4 against the range passes: readers fill a refresh table's keys as fast as they
/// can while a TRUNCATE of it (600,000 keys, a range of slots at a time, leases revoked
/// before the first listing only) is applied; once it is, no row key may be left (each
/// would be a fill of a row the TRUNCATE removed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review4_fills_during_a_range_drop_leave_no_stale_key() {
    let env = Env::start(
        "CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL);
         INSERT INTO notes SELECT g, 'row' FROM generate_series(1, 3000) g;",
        "public.notes",
    );
    let cluster = start_cluster(3, 0).await;
    let path = env.dir.path().join("cluster.toml");
    let rules = "[[tables]]\ntable = \"notes\"\nkey = \"note:{id}\"\nmode = \"refresh\"\n";
    let text = cluster_config_with(&env, &cluster, rules, "");
    std::fs::write(&path, &text).unwrap();
    let daemon = Daemon::spawn(&path, &env.dir.path().join("daemon.log"));
    let mut r = router(&cluster).await;
    let pg = env.pg_client().await;
    write_keys(&mut r, (0..600_000).map(|i| format!("note:x{i}"))).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_frontier(&mut r, &pg, &daemon).await;
    let config = pgcache::config::Config::from_toml_str(&text).unwrap();
    let reader = std::sync::Arc::new(pgcache::Reader::from_config(&config).unwrap());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let reader = reader.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut id = 1 + t * 187;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                id = (id * 7919 + 13) % 3000 + 1;
                let _ = reader.get::<serde_json::Value>("notes", id as i64).await;
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cached_before = keys(&mut r, "note:[0-9]*").await.len();
    env.sql("TRUNCATE notes");
    wait_frontier(&mut r, &pg, &daemon).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut lookups = 0;
    for t in tasks {
        lookups += t.await.unwrap();
    }
    let left = keys(&mut r, "note:[0-9]*").await;
    let log = daemon.log();
    let passes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("range of slots"))
        .collect();
    println!(
        "{lookups} lookups; {cached_before} row keys cached before the TRUNCATE; passes: {passes:?}"
    );
    assert!(
        !passes.is_empty(),
        "the drop was not listed a range at a time"
    );
    assert!(
        left.is_empty(),
        "row keys of a truncated table left: {} ({:?})",
        left.len(),
        left.iter().take(10).collect::<Vec<_>>()
    );
}
