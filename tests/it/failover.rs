//! Failover slots (issue 16 item 2, Postgres 17+): a primary and a physical standby made
//! with `pg_basebackup`, the slot synchronized to the standby (`sync_replication_slots`),
//! the primary's logical walsender held to what the standby has
//! (`synchronized_standby_slots`). The primary dies under a write load, the standby is
//! promoted, and the daemon, given both hosts with `target_session_attrs=read-write`,
//! resumes from the synchronized slot: no rebuild, nothing lost, no key seen going back,
//! `verify` clean.
//!
//! Postgres 17+ only, so ignored in the default run (Debian's 15); `.ci/run` runs them on
//! Postgres 18: `PGCACHE_PG_BINDIR=$(bash .ci/install-pg18) cargo test --test it failover::
//! -- --include-ignored`.

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgcache::testkit::{PgOptions, TestPostgres};

use crate::common::{eventually, get_json, pgcache, wait_backfill_done, Daemon, Env, DB};

const ROWS: i64 = 20;
const RULES: &str = "[[tables]]\ntable = \"public.items\"\nkey = \"item:{id}\"\n";

fn server_version_num(pg: &TestPostgres) -> u32 {
    pg.psql(DB, "SHOW server_version_num")
        .unwrap()
        .parse()
        .expect("server_version_num is a number")
}

/// Runs SQL through psql with a libpq connection string (multi-host allowed).
fn psql_conninfo(conninfo: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(TestPostgres::bin("psql").expect("psql"))
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-w",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conninfo,
            "-c",
            sql,
        ])
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Postgres 17+: PGCACHE_PG_BINDIR=$(bash .ci/install-pg18) cargo test --test it failover:: -- --include-ignored"]
async fn promoted_standby_resumes_from_the_synchronized_slot() {
    let mut env = Env::start(
        &format!(
            "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL);
             INSERT INTO items SELECT i, 0 FROM generate_series(1, {ROWS}) i;"
        ),
        "public.items",
    );
    let version = server_version_num(&env.pg);
    assert!(
        version >= 170_000,
        "failover slots need Postgres 17+, this is {version}: run \
         PGCACHE_PG_BINDIR=$(bash .ci/install-pg18) cargo test --test it failover:: -- --include-ignored"
    );
    // sql/slot.sql made a failover slot.
    assert_eq!(
        env.sql("SELECT failover FROM pg_replication_slots WHERE slot_name = 'pgcache'"),
        "t"
    );
    let standby = env
        .pg
        .start_standby(
            "standby1",
            DB,
            PgOptions {
                extra_conf: vec![
                    "hot_standby_feedback = on".into(),
                    "sync_replication_slots = on".into(),
                ],
                ..PgOptions::default()
            },
        )
        .expect("start the standby");
    // The primary's walsender sends nothing the standby has not received.
    env.sql("ALTER SYSTEM SET synchronized_standby_slots = 'standby1'; SELECT pg_reload_conf();");

    let (p1, p2) = (env.pg.port(), standby.port());
    let url = format!(
        "postgres://postgres@127.0.0.1:{p1},127.0.0.1:{p2}/{DB}?sslmode=disable&target_session_attrs=read-write"
    );
    let config = env.dir.path().join("failover.toml");
    let text = env.config_toml(RULES).replacen(&env.pg.url(DB), &url, 1);
    assert!(text.contains(&url), "{text}");
    std::fs::write(&config, text).unwrap();

    let config_path = config.display().to_string();
    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::spawn(&config, &log);
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(30)).await;

    // The standby holds a synchronized, persistent copy of the slot.
    eventually(
        Duration::from_secs(60),
        "the slot synchronized to the standby",
        || {
            let standby = &standby;
            async move {
                let row = standby
                    .psql(
                        DB,
                        "SELECT synced AND NOT temporary FROM pg_replication_slots \
                     WHERE slot_name = 'pgcache'",
                    )
                    .ok()?;
                (row == "t").then_some(())
            }
        },
    )
    .await;

    // `check` visits both servers: the primary's synchronized_standby_slots, and the
    // standby's settings, each OK.
    let (code, out, err) = pgcache(&["check", "--config", &config_path]);
    assert_eq!(code, 0, "check failed:\n{out}\n{err}");
    for part in [
        "slot \"pgcache\" is a failover slot",
        "synchronized_standby_slots lists \"standby1\"",
        &format!("standby 127.0.0.1:{p2}: sync_replication_slots is on"),
        &format!("standby 127.0.0.1:{p2}: hot_standby_feedback is on"),
        &format!("standby 127.0.0.1:{p2}: primary_slot_name is \"standby1\""),
        &format!("standby 127.0.0.1:{p2}: primary_conninfo names dbname"),
        &format!("standby 127.0.0.1:{p2}: slot \"pgcache\" is synchronized"),
    ] {
        assert!(out.contains(part), "{part:?} not in:\n{out}");
    }

    // Pointed at the standby alone: a FAIL (the daemon streams from the primary), and the
    // standby's findings.
    let alone = env.dir.path().join("standby-only.toml");
    std::fs::write(
        &alone,
        env.config_toml(RULES)
            .replacen(&env.pg.url(DB), &standby.url(DB), 1),
    )
    .unwrap();
    let (code, out, err) = pgcache(&["check", "--config", &alone.display().to_string()]);
    assert_eq!(code, 1, "check passed a standby:\n{out}\n{err}");
    for part in [
        "FAIL this server is a standby (in recovery): pgcache streams from the primary",
        "target_session_attrs=read-write",
        "OK   sync_replication_slots is on",
        "OK   slot \"pgcache\" is synchronized",
    ] {
        assert!(out.contains(part), "{part:?} not in:\n{out}");
    }

    // Readers: every key's value only goes up (G10).
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, reads, mut r) = (stop.clone(), reads.clone(), r.clone());
        tokio::spawn(async move {
            let mut seen: HashMap<i64, i64> = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                for id in 1..=ROWS {
                    let Some(value) = get_json(&mut r, &format!("item:{id}")).await else {
                        panic!("item:{id} vanished");
                    };
                    let n = value["n"].as_i64().expect("n");
                    let before = seen.insert(id, n).unwrap_or(0);
                    assert!(n >= before, "item:{id} went back from {before} to {n}");
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
            seen
        })
    };
    // Writers: increments through both hosts, read-write, as a failover-aware application
    // does; failed attempts (the primary gone, the standby not yet promoted) are retried.
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, writes) = (stop.clone(), writes.clone());
        let conninfo = format!(
            "host=127.0.0.1,127.0.0.1 port={p1},{p2} user=postgres dbname={DB} \
             sslmode=disable target_session_attrs=read-write connect_timeout=2"
        );
        std::thread::spawn(move || {
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let sql: String = (0..10)
                    .map(|k| {
                        format!(
                            "UPDATE items SET n = n + 1 WHERE id = {};",
                            (i + k) % ROWS + 1
                        )
                    })
                    .collect();
                match psql_conninfo(&conninfo, &sql) {
                    Ok(_) => {
                        i += 10;
                        writes.fetch_add(10, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })
    };
    let wait_writes = |at_least: u64| {
        let writes = writes.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while writes.load(Ordering::Relaxed) < at_least {
                assert!(Instant::now() < deadline, "the write load stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_writes(200).await;

    // The primary dies; the standby is promoted while the writers keep trying.
    env.pg.kill9().expect("kill the primary");
    standby.promote().expect("promote the standby");
    let after = writes.load(Ordering::Relaxed);
    wait_writes(after + 300).await;
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let seen = reader.await.expect("no key went back");
    assert!(reads.load(Ordering::Relaxed) > 0);

    // Redis converges to the new primary: every value, then verify.
    let truth: HashMap<i64, i64> = standby
        .psql(DB, "SELECT id || ' ' || n FROM items")
        .unwrap()
        .lines()
        .map(|l| {
            let (id, n) = l.split_once(' ').unwrap();
            (id.parse().unwrap(), n.parse().unwrap())
        })
        .collect();
    for (id, n) in &truth {
        crate::common::wait_for_json(
            &mut r,
            &format!("item:{id}"),
            Some(serde_json::json!({"id": id, "n": n})),
        )
        .await;
        assert!(seen.get(id).copied().unwrap_or(0) <= *n);
    }
    let (code, out, err) =
        tokio::task::spawn_blocking(move || pgcache(&["verify", "--config", &config_path]))
            .await
            .unwrap();
    assert_eq!(code, 0, "verify found drift:\n{out}\n{err}");

    // It resumed from the synchronized slot: no rebuild, no lost slot.
    let text = daemon.log();
    assert!(
        !text.contains("was lost") && !text.contains("Redis lost its data"),
        "{text}"
    );
    assert!(
        text.contains("session ended; reconnecting"),
        "the daemon never lost the primary:\n{text}"
    );
    assert_eq!(
        standby
            .psql(
                DB,
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'pgcache'"
            )
            .unwrap(),
        "t",
        "the daemon does not stream from the promoted standby:\n{text}"
    );
    let mark: Option<String> = redis::cmd("HGET")
        .arg("pgcache:{pgcache}:checkpoint")
        .arg("slot_lost")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(mark, None);
    assert!(daemon.terminate().success(), "{}", daemon.log());
}

/// Without a failover slot (Postgres 15 and 16 have none; on 17+ the slot is made without
/// `failover`), promoting the standby loses the slot. `check` says so beforehand; the daemon
/// then stops with an error that says what happened and how to fix it, and with
/// `recreate_lost_slot = true` it recreates the slot on the promoted server and rebuilds the
/// cache, which then equals Postgres. Runs on every version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_without_a_failover_slot_loses_the_slot_clearly() {
    let mut env = Env::start(
        &format!(
            "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL);
             INSERT INTO items SELECT i, 0 FROM generate_series(1, {ROWS}) i;"
        ),
        "public.items",
    );
    let version = server_version_num(&env.pg);
    let mut standby_conf = vec!["hot_standby_feedback = on".to_string()];
    if version >= 170_000 {
        env.sql(
            "SELECT pg_drop_replication_slot('pgcache');
             SELECT pg_create_logical_replication_slot('pgcache', 'pgoutput');",
        );
        standby_conf.push("sync_replication_slots = on".into());
    }
    let standby = env
        .pg
        .start_standby(
            "standby1",
            DB,
            PgOptions {
                extra_conf: standby_conf,
                ..PgOptions::default()
            },
        )
        .expect("start the standby");
    let (p1, p2) = (env.pg.port(), standby.port());
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={p1},{p2} user=postgres dbname={DB} sslmode=disable \
         target_session_attrs=read-write"
    );
    let write = |name: &str, recreate: bool| {
        let text = env
            .config_toml(RULES)
            .replacen(&format!("\"{}\"", env.pg.url(DB)), &format!("'{url}'"), 1)
            .replacen(
                "publication = \"pgcache\"\n",
                &format!("publication = \"pgcache\"\nrecreate_lost_slot = {recreate}\n"),
                1,
            );
        assert!(
            text.contains(&url) && text.contains("recreate_lost_slot"),
            "{text}"
        );
        let path = env.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let plain = write("plain.toml", false);
    let recreating = write("recreating.toml", true);

    let plain_path = plain.display().to_string();
    let (code, out, err) = pgcache(&["check", "--config", &plain_path]);
    assert_eq!(code, 0, "check failed:\n{out}\n{err}");
    let expected = if version >= 170_000 {
        "slot \"pgcache\" is not a failover slot: the standbys (standby1) do not get a copy of it, so promoting one loses it"
    } else {
        "has no failover slots: a standby never gets a copy of slot \"pgcache\", so promoting it loses the slot"
    };
    assert!(out.contains(expected), "{expected:?} not in:\n{out}");
    let fix = if version >= 170_000 {
        "ALTER_REPLICATION_SLOT \"pgcache\" (FAILOVER true)"
    } else {
        "recreate_lost_slot = true"
    };
    assert!(out.contains(fix), "{fix:?} not in:\n{out}");

    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::spawn(&plain, &log);
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(30)).await;
    env.sql("UPDATE items SET n = 1 WHERE id = 1");
    crate::common::wait_for_json(&mut r, "item:1", Some(serde_json::json!({"id": 1, "n": 1})))
        .await;
    // The standby has everything; then the primary dies and the standby is promoted.
    let lsn = env.sql("SELECT pg_current_wal_lsn()");
    eventually(Duration::from_secs(30), "the standby to catch up", || {
        let (standby, lsn) = (&standby, lsn.clone());
        async move {
            let done = standby
                .psql(DB, &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'"))
                .ok()?;
            (done == "t").then_some(())
        }
    })
    .await;
    env.pg.kill9().expect("kill the primary");
    standby.promote().expect("promote the standby");
    standby
        .psql(DB, "UPDATE items SET n = 2 WHERE id = 2")
        .unwrap();

    // Without the option: a fatal error that says what happened, exit 1.
    let status = daemon.wait(Duration::from_secs(120));
    let text = daemon.log();
    assert_eq!(status.code(), Some(1), "{text}");
    for part in [
        "replication slot \"pgcache\" does not exist, but Redis holds a checkpoint made through it",
        "as after promoting a standby without failover slots",
        "recreate_lost_slot = true",
        "stopping: this needs an operator",
    ] {
        assert!(text.contains(part), "{part:?} not in the log:\n{text}");
    }

    // With it: the slot is made again on the promoted server and the cache rebuilt.
    let mut daemon = Daemon::spawn(&recreating, &env.dir.path().join("recreating.log"));
    crate::common::wait_for_json(&mut r, "item:2", Some(serde_json::json!({"id": 2, "n": 2})))
        .await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(30)).await;
    standby
        .psql(DB, "UPDATE items SET n = 3 WHERE id = 3")
        .unwrap();
    crate::common::wait_for_json(&mut r, "item:3", Some(serde_json::json!({"id": 3, "n": 3})))
        .await;
    let path = recreating.display().to_string();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || pgcache(&["verify", "--config", &path]))
            .await
            .unwrap();
    assert_eq!(code, 0, "verify found drift:\n{out}\n{err}");
    assert!(daemon.terminate().success(), "{}", daemon.log());
}

/// The replication connection with several hosts: tried in order; with
/// `target_session_attrs=read-write` a standby is passed over for the primary behind it, and
/// with no primary at all the error names every host and is retryable (a promotion may be
/// under way); `read-only` takes the standby. Every version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replication_connection_finds_the_primary_among_the_hosts() {
    use pgcache::daemon::replication::ReplicationConnection;
    use pgcache::pgconn::PgTarget;

    let env = Env::start("CREATE TABLE items (id int PRIMARY KEY)", "public.items");
    let standby = env
        .pg
        .start_standby("standby1", DB, PgOptions::default())
        .expect("start the standby");
    let (primary, standby_port) = (env.pg.port(), standby.port());
    let dead = pgcache::testkit::free_port().unwrap();
    let url = |ports: &[u16], attrs: &str| {
        let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!(
            "postgres://postgres@{}/{DB}?sslmode=disable&target_session_attrs={attrs}&connect_timeout=5",
            hosts.join(",")
        )
    };
    let port_of = |url: String| async move {
        let target = PgTarget::parse(&url).unwrap();
        let mut conn = ReplicationConnection::connect(&target)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let rows = conn.simple_query("SHOW port").await.unwrap();
        rows[0][0].clone().unwrap().parse::<u16>().unwrap()
    };
    assert_eq!(
        port_of(url(&[dead, standby_port, primary], "read-write")).await,
        primary
    );
    assert_eq!(
        port_of(url(&[standby_port, primary], "any")).await,
        standby_port
    );
    assert_eq!(
        port_of(url(&[primary, standby_port], "read-only")).await,
        standby_port
    );

    // No primary among them: an error naming each host, and worth retrying.
    let target = PgTarget::parse(&url(&[dead, standby_port], "read-write")).unwrap();
    let err = match ReplicationConnection::connect(&target).await {
        Ok(_) => panic!("connected to a standby with target_session_attrs=read-write"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(err.is_retryable(), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{dead}"))
            && text.contains(&format!(
                "127.0.0.1:{standby_port} is read-only (a standby), and target_session_attrs=read-write"
            )),
        "{text}"
    );
}

/// `synchronized_standby_slots` naming a slot that does not exist (as on a promoted standby
/// that kept its old primary's setting) holds the stream back. `check` says so with the fix,
/// the daemon logs a WARN that says what it means, and once the setting is amended the stream
/// flows. Postgres 17+.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Postgres 17+: PGCACHE_PG_BINDIR=$(bash .ci/install-pg18) cargo test --test it failover:: -- --include-ignored"]
async fn a_missing_synchronized_standby_slot_is_reported() {
    let env = Env::start(
        "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL);
         INSERT INTO items VALUES (1, 0);",
        "public.items",
    );
    let version = server_version_num(&env.pg);
    assert!(version >= 170_000, "needs Postgres 17+, this is {version}");
    env.sql("ALTER SYSTEM SET synchronized_standby_slots = 'gone'; SELECT pg_reload_conf();");
    let config = env.write_config(RULES);
    let path = config.display().to_string();
    let (code, out, err) = pgcache(&["check", "--config", &path]);
    assert_eq!(code, 0, "{out}\n{err}");
    for part in [
        "WARN synchronized_standby_slots lists \"gone\", which is no physical slot here",
        "pg_create_physical_replication_slot('gone')",
    ] {
        assert!(out.contains(part), "{part:?} not in:\n{out}");
    }

    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::spawn(&config, &log);
    let mut r = env.redis().await;
    env.sql("UPDATE items SET n = 1 WHERE id = 1");
    eventually(Duration::from_secs(30), "the daemon's warning", || {
        let text = daemon.log();
        async move {
            (text.contains("WARN")
                && text.contains("replication slot \"gone\" specified in parameter")
                && text
                    .contains("pgcache receives nothing until it does or the setting is amended"))
            .then_some(())
        }
    })
    .await;
    // Held back: even the backfill, whose watermarks travel in the stream, waits.
    assert!(
        !matches!(
            crate::common::backfill_progress(&mut r, "public.items").await,
            Some(p) if p["state"] == "done"
        ),
        "the stream was not held back"
    );
    env.sql("ALTER SYSTEM RESET synchronized_standby_slots; SELECT pg_reload_conf();");
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(30)).await;
    crate::common::wait_for_json(&mut r, "item:1", Some(serde_json::json!({"id": 1, "n": 1})))
        .await;
    assert!(daemon.terminate().success(), "{}", daemon.log());
}

/// Given a standby (a name that points at a server being promoted, say), the daemon waits
/// for it to be promoted instead of stopping: each session ends with a message that says
/// why, and the daemon retries. Every version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_given_a_standby_waits_for_its_promotion() {
    let env = Env::start("CREATE TABLE items (id int PRIMARY KEY)", "public.items");
    let standby = env
        .pg
        .start_standby("standby1", DB, PgOptions::default())
        .expect("start the standby");
    let config = env.dir.path().join("standby.toml");
    std::fs::write(
        &config,
        env.config_toml(RULES)
            .replacen(&env.pg.url(DB), &standby.url(DB), 1),
    )
    .unwrap();
    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::spawn(&config, &log);
    eventually(Duration::from_secs(30), "two attempts", || {
        let text = daemon.log();
        async move {
            (text
                .matches(
                    "is a standby (in recovery), and pgcache streams from the primary: waiting \
                     for it to be promoted",
                )
                .count()
                >= 2)
                .then_some(())
        }
    })
    .await;
    let text = daemon.log();
    assert!(text.contains("session ended; reconnecting"), "{text}");
    assert!(!text.contains("stopping: this needs an operator"), "{text}");
    assert!(daemon.terminate().success(), "{}", daemon.log());
}
