//! Control events are authenticated by Postgres's own privileges: only the daemon's role
//! and pgcache's SECURITY DEFINER functions may write `pgcache.events`, and logical
//! messages, which any role can emit, have no effect on the daemon.

use std::time::Duration;

use serde_json::json;

use crate::common::{get, wait_backfill_done, wait_for_json, wait_streaming, Daemon, Env, DB};

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
    INSERT INTO items SELECT g, g FROM generate_series(1, 10) g;
    CREATE ROLE intruder LOGIN PASSWORD 'x'; GRANT SELECT ON items TO intruder;";
const RULE: &str = "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\n";

/// Forged `resync` messages (and a message Postgres cannot even send to the daemon) do
/// nothing; an ordinary role cannot write the control table either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_control_messages_have_no_effect() {
    let env = Env::start(ITEMS, "public.items");
    let config = env.write_config(RULE);
    let log = env.dir.path().join("daemon.log");
    let mut daemon = Daemon::spawn(&config, &log);
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    let before: String = redis::cmd("HGET")
        .arg("pgcache:{pgcache}:checkpoint")
        .arg("backfill:public.items")
        .query_async(&mut r)
        .await
        .unwrap();
    // A key removed by hand: a resync would bring it back.
    let _: () = redis::cmd("DEL")
        .arg("item:3")
        .query_async(&mut r)
        .await
        .unwrap();
    env.pg
        .psql_as(
            "intruder",
            Some("x"),
            DB,
            "SELECT pg_logical_emit_message(false, 'pgcache', 'resync:*');
             SELECT pg_logical_emit_message(true, 'pgcache', 'resync:public.items');
             SELECT pg_logical_emit_message(false, 'pgcache', 'high:whatever');",
        )
        .unwrap();
    let denied = env
        .pg
        .psql_as(
            "intruder",
            Some("x"),
            DB,
            "INSERT INTO pgcache.events (kind, arg) VALUES ('resync', '*')",
        )
        .unwrap_err();
    assert!(
        format!("{denied:#}").contains("permission denied"),
        "{denied:#}"
    );
    let denied = env
        .pg
        .psql_as(
            "intruder",
            Some("x"),
            DB,
            "SELECT pgcache.emit('resync', '*')",
        )
        .unwrap_err();
    assert!(
        format!("{denied:#}").contains("permission denied"),
        "{denied:#}"
    );
    // The stream goes on past them, and nothing was backfilled again.
    env.sql("UPDATE items SET v = 100 WHERE id = 1");
    wait_for_json(&mut r, "item:1", Some(json!({"id": 1, "v": 100}))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(&mut r, "item:3").await, None, "a forged resync ran");
    let after: String = redis::cmd("HGET")
        .arg("pgcache:{pgcache}:checkpoint")
        .arg("backfill:public.items")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(before, after, "the backfill started again");
    // The daemon's own request does run.
    let (code, out, err) =
        crate::common::pgcache(&["resync", "--config", &config.display().to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    wait_for_json(&mut r, "item:3", Some(json!({"id": 3, "v": 3}))).await;
    assert!(!daemon.log().contains("session ended"), "{}", daemon.log());
    daemon.terminate();
}

/// In a `SQL_ASCII` database a logical message whose prefix is not valid UTF-8 used to make
/// the walsender fail on every restart. The daemon does not ask for messages: it streams on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_postgres_cannot_send_does_not_stop_the_daemon() {
    let env = Env::start("", "");
    env.pg
        .psql(
            "postgres",
            "CREATE DATABASE ascii ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        )
        .unwrap();
    env.pg
        .psql(
            "ascii",
            "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)",
        )
        .unwrap();
    let setup = format!(
        "\\set role pgcache\n\\set password pw\n\\set publication pgcache\n\\set slot pgcache\n\\set tables public.items\n{}",
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/setup.sql"))
            .unwrap()
            .replace("\\ir ", &format!("\\i {}/sql/", env!("CARGO_MANIFEST_DIR")))
    );
    env.pg.psql("ascii", &setup).unwrap();
    let config = env.dir.path().join("ascii.toml");
    std::fs::write(
        &config,
        env.config_toml(RULE).replace(&format!("/{DB}?"), "/ascii?"),
    )
    .unwrap();
    let mut daemon = Daemon::spawn(&config, &env.dir.path().join("daemon.log"));
    let mut r = env.redis().await;
    wait_streaming(&mut r).await;
    env.pg
        .psql(
            "ascii",
            "SELECT pg_logical_emit_message(false, convert_from('\\xfffe'::bytea, 'SQL_ASCII'), 'x');
             INSERT INTO items VALUES (1, 1);",
        )
        .unwrap();
    wait_for_json(&mut r, "item:1", Some(json!({"id": 1, "v": 1}))).await;
    assert!(!daemon.log().contains("session ended"), "{}", daemon.log());
    daemon.terminate();
}
