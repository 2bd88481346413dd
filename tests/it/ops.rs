//! Operating pgcache: `check` names what is wrong and how to fix it, `verify` finds drift
//! and only drift, `status` reports where the daemon stands, `/metrics` is Prometheus text
//! whose counters move, and the log is JSON without passwords.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgcache::testkit::{PgOptions, RedisOptions};
use rand::Rng;

use crate::common::{eventually, pgcache, wait_backfill_done, Daemon, Env, InProcess, DB};

mod prometheus;
use self::prometheus::{counter, parse_prometheus};

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);";
const RULE: &str = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";

/// A config for `env` with the given Postgres URL, slot, publication and extra TOML.
fn config_text(env: &Env, url: &str, slot: &str, publication: &str, rest: &str) -> String {
    format!(
        "[postgres]\nurl = \"{url}\"\nslot = \"{slot}\"\npublication = \"{publication}\"\n\n\
         [redis]\nurl = \"{}\"\n\n{rest}\n",
        env.redis.url()
    )
}

fn write(env: &Env, name: &str, text: &str) -> PathBuf {
    let path = env.dir.path().join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// `pgcache <command> --config <path> [args]`, off the async workers.
async fn run(command: &str, config: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec![
        command.to_string(),
        "--config".to_string(),
        config.display().to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        pgcache(&refs)
    })
    .await
    .expect("pgcache ran")
}

fn assert_finding(out: &str, level: &str, what: &str, fix: &str) {
    let found = out.lines().enumerate().any(|(i, line)| {
        line.starts_with(level)
            && line.contains(what)
            && out
                .lines()
                .skip(i + 1)
                .take_while(|l| l.starts_with("     "))
                .any(|l| l.contains(fix))
    });
    assert!(
        found,
        "expected a {level} finding {what:?} with fix {fix:?} in:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_accepts_a_correct_setup() {
    let env = Env::start_with(
        PgOptions::default(),
        RedisOptions {
            appendonly: true,
            ..Default::default()
        },
        ITEMS,
        "public.items",
    );
    // The role sql/role.sql made: REPLICATION and SELECT, nothing more.
    let url = env.pg.url_as("pgcache", Some("pgcache-secret"), DB);
    let config = write(
        &env,
        "ok.toml",
        &config_text(&env, &url, "pgcache", "pgcache", RULE),
    );
    let (code, out, err) = run("check", &config, &[]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    for expected in [
        "OK   config",
        "OK   wal_level is logical",
        "OK   max_replication_slots is",
        "OK   max_wal_senders is",
        "OK   large transactions are streamed, spooled in ",
        "OK   role \"pgcache\" may stream (REPLICATION)",
        "OK   publication \"pgcache\" exists",
        "OK   slot \"pgcache\" exists (pgoutput",
        "OK   table public.items: key columns are in its replica identity (primary key)",
        "OK   redis version",
        "OK   redis maxmemory-policy noeviction",
        "OK   redis persistence: appendonly yes, appendfsync always",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    assert!(
        !out.lines()
            .any(|l| l.starts_with("FAIL") || l.starts_with("WARN")),
        "{out}"
    );
    assert!(out.contains("0 WARN, 0 FAIL"), "{out}");
    assert!(!out.contains("pgcache-secret"), "password leaked:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_each_wrong_setup_with_its_fix() {
    let env = Env::start_with(
        PgOptions {
            scram_user: Some(("checker".into(), "checker-pw".into())),
            ..Default::default()
        },
        RedisOptions::default(),
        "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);
         CREATE TABLE loose (id int PRIMARY KEY, name text);
         CREATE TABLE nopk (id int, name text);
         CREATE TABLE people (id int PRIMARY KEY, email text NOT NULL);",
        "public.items,public.nopk,public.people",
    );
    env.sql("SELECT pg_create_logical_replication_slot('tdslot', 'test_decoding')");
    env.sql("CREATE ROLE norepl LOGIN; GRANT SELECT ON items TO norepl");
    let superuser = env.pg.url(DB);

    // Tables: one not published, one without a primary key, one keyed by a non-identity
    // column; Redis without persistence.
    let tables = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n\
                  [[tables]]\ntable = \"loose\"\nkey = \"loose:{id}\"\n\
                  [[tables]]\ntable = \"nopk\"\nkey = \"nopk:{id}\"\n\
                  [[tables]]\ntable = \"people\"\nkey = \"person:{email}\"\n";
    let config = write(
        &env,
        "tables.toml",
        &config_text(&env, &superuser, "pgcache", "pgcache", tables),
    );
    let (code, out, _) = run("check", &config, &[]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("OK   table public.items: key columns"),
        "{out}"
    );
    assert_finding(
        &out,
        "FAIL",
        "table public.loose is not in publication \"pgcache\"",
        "ALTER PUBLICATION \"pgcache\" ADD TABLE \"public\".\"loose\";",
    );
    assert_finding(
        &out,
        "FAIL",
        "table public.nopk has no usable replica identity (no primary key)",
        "ALTER TABLE \"public\".\"nopk\" REPLICA IDENTITY FULL;",
    );
    assert_finding(
        &out,
        "FAIL",
        "table public.people: key column email is not in the replica identity (id)",
        "ALTER TABLE \"public\".\"people\" REPLICA IDENTITY FULL;",
    );
    assert_finding(
        &out,
        "WARN",
        "redis persistence is off",
        "CONFIG SET appendonly yes",
    );

    // No publication, no slot.
    let config = write(
        &env,
        "names.toml",
        &config_text(&env, &superuser, "noslot", "nopub", RULE),
    );
    let (code, out, _) = run("check", &config, &[]).await;
    assert_eq!(code, 1, "{out}");
    assert_finding(
        &out,
        "FAIL",
        "publication \"nopub\" does not exist",
        "psql -v publication=nopub -v tables='public.items' -f sql/publication.sql",
    );
    assert_finding(
        &out,
        "FAIL",
        "replication slot \"noslot\" does not exist",
        "SELECT pg_create_logical_replication_slot('noslot', 'pgoutput');",
    );

    // A slot of another plugin.
    let config = write(
        &env,
        "plugin.toml",
        &config_text(&env, &superuser, "tdslot", "pgcache", RULE),
    );
    let (code, out, _) = run("check", &config, &[]).await;
    assert_eq!(code, 1, "{out}");
    assert_finding(
        &out,
        "FAIL",
        "slot \"tdslot\" uses plugin \"test_decoding\", not pgoutput",
        "SELECT pg_drop_replication_slot('tdslot'); SELECT pg_create_logical_replication_slot('tdslot', 'pgoutput');",
    );

    // A role without SELECT (SCRAM, with a password that must not show).
    let url = env.pg.url_as("checker", Some("checker-pw"), DB);
    let config = write(
        &env,
        "select.toml",
        &config_text(&env, &url, "pgcache", "pgcache", RULE),
    );
    let (code, out, err) = run("check", &config, &[]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert_finding(
        &out,
        "FAIL",
        "role \"checker\" has no SELECT on public.items (columns id, name), so the daemon cannot backfill it",
        "GRANT SELECT ON TABLE \"public\".\"items\" TO \"checker\";",
    );
    assert!(
        !out.contains("checker-pw") && !err.contains("checker-pw"),
        "password leaked:\n{out}\n{err}"
    );

    // A role without REPLICATION.
    let url = env.pg.url_as("norepl", None, DB);
    let config = write(
        &env,
        "repl.toml",
        &config_text(&env, &url, "pgcache", "pgcache", RULE),
    );
    let (code, out, _) = run("check", &config, &[]).await;
    assert_eq!(code, 1, "{out}");
    assert_finding(
        &out,
        "FAIL",
        "role \"norepl\" lacks the REPLICATION attribute",
        "ALTER ROLE \"norepl\" REPLICATION;",
    );

    // An evicting Redis under a mirror table: a warning, so still exit 0.
    env.redis
        .cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"])
        .expect("config set");
    let config = write(
        &env,
        "evict.toml",
        &config_text(&env, &superuser, "pgcache", "pgcache", RULE),
    );
    let (code, out, _) = run("check", &config, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert_finding(
        &out,
        "WARN",
        "redis maxmemory-policy allkeys-lru (no maxmemory limit yet) may evict keys of mirror tables (public.items) and the checkpoint",
        "CONFIG SET maxmemory-policy noeviction",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_on_server_settings_and_unreachable_servers() {
    let env = Env::start_with(
        PgOptions {
            wal_level: "replica".into(),
            ..Default::default()
        },
        RedisOptions::default(),
        ITEMS,
        "",
    );
    let config = write(
        &env,
        "replica.toml",
        &config_text(&env, &env.pg.url(DB), "pgcache", "pgcache", RULE),
    );
    let (code, out, _) = run("check", &config, &[]).await;
    assert_eq!(code, 1, "{out}");
    assert_finding(
        &out,
        "FAIL",
        "wal_level is replica; logical replication needs logical",
        "ALTER SYSTEM SET wal_level = logical; then restart Postgres",
    );

    let env = Env::start_with(
        PgOptions {
            extra_conf: vec![
                "max_replication_slots = 0".into(),
                "max_wal_senders = 0".into(),
            ],
            ..Default::default()
        },
        RedisOptions::default(),
        ITEMS,
        "",
    );
    let config = write(
        &env,
        "slots.toml",
        &config_text(&env, &env.pg.url(DB), "pgcache", "pgcache", RULE),
    );
    let (code, out, _) = run("check", &config, &[]).await;
    assert_eq!(code, 1, "{out}");
    assert_finding(
        &out,
        "FAIL",
        "max_replication_slots is 0",
        "ALTER SYSTEM SET max_replication_slots = 10; then restart Postgres",
    );
    assert_finding(
        &out,
        "FAIL",
        "max_wal_senders is 0",
        "ALTER SYSTEM SET max_wal_senders = 10; then restart Postgres",
    );

    // Nothing listens: FAIL for both servers, without the password.
    let port = pgcache::testkit::free_port().unwrap();
    let text = format!(
        "[postgres]\nurl = \"postgres://app:hunter2@127.0.0.1:{port}/app?connect_timeout=2\"\n\
         [redis]\nurl = \"redis://:hunter3@127.0.0.1:{port}/\"\n{RULE}"
    );
    let config = write(&env, "down.toml", &text);
    let (code, out, err) = run("check", &config, &[]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("FAIL postgres postgres://app@127.0.0.1"),
        "{out}"
    );
    assert!(out.contains("FAIL redis redis://:***@127.0.0.1"), "{out}");
    assert!(
        !out.contains("hunter2") && !out.contains("hunter3") && !err.contains("hunter"),
        "password leaked:\n{out}\n{err}"
    );

    // A bad config: exit 2, before anything connects.
    let config = write(&env, "bad.toml", "[postgres]\nurl = \"x\"\n");
    let (code, _, err) = run("check", &config, &[]).await;
    assert_eq!(code, 2, "{err}");
}

/// Waits until every row of `items` is in Redis with the daemon's value.
async fn converged(config: &Path) {
    let config = config.to_path_buf();
    eventually(Duration::from_secs(60), "verify to pass", || {
        let config = config.clone();
        async move {
            let (code, _, _) = run("verify", &config, &[]).await;
            (code == 0).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_missing_stale_and_extra_keys() {
    let env = Env::start(ITEMS, "public.items");
    let config = env.write_config(RULE);
    let daemon = InProcess::start(env.config(RULE));
    env.sql("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 50) g");
    converged(&config).await;
    let (code, out, err) = run("verify", &config, &[]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(
            "public.items (mirror): 50 rows and 50 keys checked: 0 missing, 0 stale, 0 extra"
        ),
        "{out}"
    );
    assert!(out.contains("OK: Redis agrees with Postgres"), "{out}");

    let mut r = env.redis().await;
    // The first backfill could write item:7 again after the DEL below; wait for its end.
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    let _: () = redis::cmd("DEL")
        .arg("item:7")
        .query_async(&mut r)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("item:8")
        .arg(r#"{"id":8,"name":"not what the row says"}"#)
        .query_async(&mut r)
        .await
        .unwrap();
    for extra in ["item:9999", "item:abc"] {
        let _: () = redis::cmd("SET")
            .arg(extra)
            .arg(r#"{"id":9999,"name":"no such row"}"#)
            .query_async(&mut r)
            .await
            .unwrap();
    }

    let (code, out, err) = run("verify", &config, &[]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains(
            "public.items (mirror): 50 rows and 51 keys checked: 1 missing, 1 stale, 2 extra"
        ),
        "{out}"
    );
    assert!(out.contains("  missing  item:7\n"), "{out}");
    assert!(out.contains("  stale    item:8\n"), "{out}");
    assert!(
        out.contains(r#"redis:    {"id":8,"name":"not what the row says"}"#),
        "{out}"
    );
    assert!(
        out.contains(r#"postgres: {"id":8,"name":"item 8"}"#),
        "{out}"
    );
    assert!(out.contains("  extra    item:9999\n"), "{out}");
    assert!(out.contains("  extra    item:abc\n"), "{out}");
    assert!(
        out.contains("DRIFT: 4 key(s) in 1 table(s): public.items"),
        "{out}"
    );

    let (code, out, _) = run("verify", &config, &["--json", "--table", "public.items"]).await;
    assert_eq!(code, 1, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let table = &report["tables"][0];
    assert_eq!(report["drift"], true);
    assert_eq!(report["settled"], true, "{report}");
    assert_eq!(
        (&table["missing"], &table["stale"], &table["extra"]),
        (&1.into(), &1.into(), &2.into()),
        "{report}"
    );
    assert_eq!(table["examples"]["missing"][0]["key"], "item:7");
    assert_eq!(
        table["examples"]["stale"][0]["postgres"],
        r#"{"id":8,"name":"item 8"}"#
    );

    // A sample larger than the table sees everything too.
    let (code, out, _) = run("verify", &config, &["--sample", "1000"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("1 missing, 1 stale, 2 extra"), "{out}");

    let (code, _, err) = run("verify", &config, &["--table", "nosuch"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no [[tables]] entry for \"nosuch\""), "{err}");
    daemon.stop().await.expect("clean stop");
}

/// Updates, inserts and deletes rows of `items` until `stop`.
fn start_writer(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let mut done = 0u64;
        let mut next_id = 10_000;
        while !stop.load(Ordering::Relaxed) {
            let (op, id) = {
                let mut rng = rand::thread_rng();
                (rng.gen_range(0..10), rng.gen_range(1..=300))
            };
            let result = match op {
                0 => {
                    next_id += 1;
                    client
                        .execute(
                            "INSERT INTO items VALUES ($1, 'new') ON CONFLICT DO NOTHING",
                            &[&next_id],
                        )
                        .await
                }
                1 => {
                    client
                        .execute("DELETE FROM items WHERE id = $1", &[&(next_id - 1)])
                        .await
                }
                _ => {
                    client
                        .execute(
                            "UPDATE items SET name = md5(random()::text) WHERE id = $1",
                            &[&id],
                        )
                        .await
                }
            };
            result.expect("write");
            done += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        done
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_no_drift_on_a_converged_mirror_under_live_writes() {
    let env = Env::start(ITEMS, "public.items");
    let config = env.write_config(RULE);
    let daemon = InProcess::start(env.config(RULE));
    env.sql("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 300) g");
    converged(&config).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = start_writer(env.pg.url(DB), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    for args in [&[][..], &["--sample", "100"][..], &["--json"][..]] {
        let (code, out, err) = run("verify", &config, args).await;
        assert_eq!(code, 0, "verify {args:?} under live writes:\n{out}\n{err}");
        if args == ["--json"] {
            let report: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(report["drift"], false, "{report}");
            assert_eq!(report["settled"], true, "{report}");
        } else {
            assert!(out.contains("0 missing, 0 stale, 0 extra"), "{out}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 100, "the workload ran ({writes} writes)");
    converged(&config).await;
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_slot_checkpoint_heartbeat_and_keys() {
    let env = Env::start(ITEMS, "public.items");
    let config = env.write_config(RULE);
    let daemon = InProcess::start(env.config(RULE));
    env.sql("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 20) g");
    converged(&config).await;
    let mut r = env.redis().await;
    eventually(Duration::from_secs(20), "a heartbeat", || {
        let mut r = r.clone();
        async move {
            let beat: Option<String> = redis::cmd("HGET")
                .arg("pgcache:{pgcache}:checkpoint")
                .arg("heartbeat_ms")
                .query_async(&mut r)
                .await
                .ok()?;
            beat.map(|_| ())
        }
    })
    .await;

    let (code, out, err) = run("status", &config, &["--json"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("JSON status");
    let slot = &status["slot"];
    assert_eq!(slot["exists"], true, "{status}");
    assert_eq!(slot["active"], true, "{status}");
    assert!(slot["lag_bytes"].is_i64(), "{status}");
    assert!(slot["lag_seconds"].is_f64(), "{status}");
    assert!(slot["retained_wal_bytes"].is_i64(), "{status}");
    let confirmed: pgcache::Lsn = slot["confirmed_lsn"].as_str().unwrap().parse().unwrap();
    let checkpoint: pgcache::Lsn = status["checkpoint"]["lsn"]
        .as_str()
        .expect("a checkpoint")
        .parse()
        .unwrap();
    assert!(checkpoint > pgcache::Lsn::ZERO && confirmed > pgcache::Lsn::ZERO);
    assert_eq!(status["daemon"]["alive"], true, "{status}");
    assert_eq!(status["tables"][0]["table"], "public.items");
    assert_eq!(status["tables"][0]["keys"], 20, "{status}");

    // A key ending in the lease suffix is not a row.
    let _: () = redis::cmd("SET")
        .arg("item:1:pgcache-lease")
        .arg("token")
        .query_async(&mut r)
        .await
        .unwrap();
    let (code, out, _) = run("status", &config, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("slot         pgcache: active (walsender pid"),
        "{out}"
    );
    assert!(out.contains("checkpoint   0/"), "{out}");
    assert!(out.contains("(alive)"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("public.items"))
        .unwrap_or_else(|| panic!("no table row in:\n{out}"));
    assert!(row.contains("mirror") && row.contains(" 20 "), "{out}");

    daemon.stop().await.expect("clean stop");
    eventually(Duration::from_secs(10), "slot inactive", || async {
        (env.sql("SELECT active FROM pg_replication_slots WHERE slot_name = 'pgcache'") == "f")
            .then_some(())
    })
    .await;
    // Flushed at commit, so pg_current_wal_lsn() (the write position) has moved past it.
    env.sql("SET synchronous_commit = on; INSERT INTO items VALUES (21, 'while stopped')");
    let (code, out, _) = run("status", &config, &["--json"]).await;
    assert_eq!(code, 0, "{out}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["slot"]["active"], false, "{status}");
    assert!(
        status["slot"]["lag_bytes"].as_i64().unwrap() > 0,
        "{status}"
    );
    assert_eq!(status["slot"]["lag_seconds_at_least"], true, "{status}");
}

/// One HTTP GET: (status code, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))?
        .parse()
        .ok()?;
    assert_eq!(length, body.len(), "Content-Length matches the body");
    Some((code, body.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_and_logs_are_json_without_passwords() {
    let env = Env::start_with(
        PgOptions {
            scram_user: Some(("streamer".into(), "s3cret-pw".into())),
            ..Default::default()
        },
        RedisOptions::default(),
        ITEMS,
        "public.items",
    );
    env.sql("GRANT SELECT ON items TO streamer");
    env.grant_control("streamer");
    let port = pgcache::testkit::free_port().unwrap();
    let url = env.pg.url_as("streamer", Some("s3cret-pw"), DB);
    let config = write(
        &env,
        "metrics.toml",
        &config_text(
            &env,
            &url,
            "pgcache",
            "pgcache",
            &format!(
                "[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[log]\nformat = \"json\"\n\n{RULE}"
            ),
        ),
    );
    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::spawn(&config, &log);
    eventually(Duration::from_secs(30), "/readyz to answer 200", || async {
        let (code, _) = http_get(port, "/readyz")?;
        (code == 200).then_some(())
    })
    .await;
    let (code, body) = http_get(port, "/healthz").expect("/healthz");
    assert_eq!(code, 200, "{body}");
    assert_eq!(http_get(port, "/nothing").map(|r| r.0), Some(404));

    let (_, before) = http_get(port, "/metrics").expect("/metrics");
    let (samples, _) =
        parse_prometheus(&before).unwrap_or_else(|e| panic!("{e}\n--- metrics ---\n{before}"));
    let inserts = [("table", "public.items"), ("op", "insert")];
    let inserted_before = counter(&samples, "pgcache_changes_total", &inserts);
    let transactions_before = counter(&samples, "pgcache_transactions_total", &[]);

    for id in 1..=10 {
        env.sql(&format!("INSERT INTO items VALUES ({id}, 'item {id}')"));
    }
    let r = env.redis().await;
    eventually(Duration::from_secs(20), "the rows in Redis", || {
        let mut r = r.clone();
        async move {
            let n: usize = redis::cmd("EXISTS")
                .arg((1..=10).map(|i| format!("item:{i}")).collect::<Vec<_>>())
                .query_async(&mut r)
                .await
                .ok()?;
            (n == 10).then_some(())
        }
    })
    .await;
    let (code, after) = http_get(port, "/metrics").expect("/metrics");
    assert_eq!(code, 200);
    let (samples, types) =
        parse_prometheus(&after).unwrap_or_else(|e| panic!("{e}\n--- metrics ---\n{after}"));
    let inserted = counter(&samples, "pgcache_changes_total", &inserts);
    assert!(
        inserted >= inserted_before + 10.0,
        "inserts {inserted_before} -> {inserted}\n{after}"
    );
    assert!(
        counter(&samples, "pgcache_transactions_total", &[]) >= transactions_before + 10.0,
        "{after}"
    );
    for histogram in [
        "pgcache_apply_latency_seconds",
        "pgcache_redis_exec_seconds",
        "pgcache_batch_operations",
    ] {
        assert_eq!(
            types.get(histogram).map(String::as_str),
            Some("histogram"),
            "{after}"
        );
        assert!(
            samples
                .iter()
                .any(|s| s.name == format!("{histogram}_bucket")
                    && s.labels.get("le").map(String::as_str) == Some("+Inf")
                    && s.value > 0.0),
            "{histogram}_bucket with le=\"+Inf\" in:\n{after}"
        );
    }
    assert!(after.contains("# HELP pgcache_changes_total"), "{after}");

    assert!(daemon.terminate().success(), "{}", daemon.log());
    let text = daemon.log();
    assert!(!text.contains("s3cret-pw"), "password in the log:\n{text}");
    let mut batch_spans = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            event["level"].is_string() && event["fields"].is_object(),
            "{line}"
        );
        if event["span"]["name"] == "batch" {
            batch_spans += 1;
        }
    }
    assert!(batch_spans > 0, "no event inside a batch span:\n{text}");
}
