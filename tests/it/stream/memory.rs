//! G8 under the largest transaction we test: a million rows in one transaction, the daemon
//! running as a child process so its resident memory can be read from `/proc`.

use std::time::{Duration, Instant};

use rand::Rng;

use super::shorten;
use crate::common::{count_keys, eventually, get, memory_kb, Daemon, Env};

async fn dbsize(r: &mut redis::aio::MultiplexedConnection) -> u64 {
    redis::cmd("DBSIZE").query_async(r).await.expect("DBSIZE")
}

/// One transaction of a million rows reaches Redis while the daemon's memory stays bounded
/// (G8): it must not hold the transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn million_row_transaction_in_bounded_memory() {
    const ROWS: u64 = 1_000_000;
    const LIMIT_KB: u64 = 100 * 1024;
    let env = Env::start(
        "CREATE TABLE big (id int PRIMARY KEY, v text);",
        "public.big",
    );
    let config = env.write_config("[[tables]]\ntable = \"big\"\nkey = \"big:{id}\"\n");
    let mut daemon = Daemon::spawn(&config, &env.dir.path().join("daemon.log"));
    let pid = daemon.pid();
    let mut r = env.redis().await;
    eventually(Duration::from_secs(30), "the daemon to stream", || async {
        (env.sql("SELECT active FROM pg_replication_slots WHERE slot_name = 'pgcache'") == "t")
            .then_some(())
    })
    .await;
    let (start_hwm, _) = memory_kb(pid).expect("daemon memory");

    let started = Instant::now();
    env.sql("INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 1000000) g");
    let committed = started.elapsed();
    let mut peak_rss = 0;
    let limit = Duration::from_secs(300);
    let deadline = Instant::now() + limit;
    loop {
        let (_, rss) = memory_kb(pid)
            .unwrap_or_else(|| panic!("the daemon exited\n{}", shorten(&daemon.log())));
        peak_rss = peak_rss.max(rss);
        if dbsize(&mut r).await >= ROWS && count_keys(&mut r, "big:*").await == ROWS {
            break;
        }
        if Instant::now() > deadline {
            let n = count_keys(&mut r, "big:*").await;
            panic!(
                "only {n} of {ROWS} rows in Redis after {limit:?}\n{}",
                shorten(&daemon.log())
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let applied = started.elapsed();
    let (hwm, rss) = memory_kb(pid).expect("daemon memory");
    eprintln!(
        "million_row_transaction: insert committed after {committed:?}, all rows in Redis \
         after {applied:?}; daemon VmHWM {hwm} kB (at start {start_hwm} kB), VmRSS now {rss} kB, \
         highest VmRSS sampled {peak_rss} kB"
    );
    assert!(
        hwm < LIMIT_KB,
        "the daemon's peak resident memory was {hwm} kB (limit {LIMIT_KB} kB) for one \
         transaction of {ROWS} rows"
    );

    // A sample of keys equals the database, byte for byte.
    let client = env.pg_client().await;
    let ids: Vec<i32> = {
        let mut rng = rand::thread_rng();
        let mut ids: Vec<i32> = (0..200).map(|_| rng.gen_range(1..=1_000_000)).collect();
        ids.extend([1, 1_000_000]);
        ids
    };
    let rows = client
        .query("SELECT id, v FROM big WHERE id = ANY($1)", &[&ids])
        .await
        .unwrap();
    assert!(rows.len() >= 150, "sampled {} rows", rows.len());
    for row in rows {
        let (id, v): (i32, String) = (row.get(0), row.get(1));
        let key = format!("big:{id}");
        assert_eq!(
            get(&mut r, &key).await,
            Some(format!(r#"{{"id":{id},"v":"{v}"}}"#)),
            "{key}"
        );
    }
    assert!(daemon.terminate().success(), "{}", shorten(&daemon.log()));
}
