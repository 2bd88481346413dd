//! Read-your-writes: a service that commits and then reads through the cache sees its own
//! write once it has waited for the daemon to apply it, including after writes to tables the
//! daemon does not cache; with the daemon stopped the wait fails with a clear error, and
//! succeeds once the daemon is back.

use std::time::{Duration, Instant};

use pgcache::reader::{ReaderError, ReaderOptions};
use pgcache::Lsn;
use serde_json::json;

use super::*;
use crate::common::{get_json, wait_backfill_done, wait_for_json, InProcess};

const SCHEMA: &str = "
CREATE TABLE carts (id int PRIMARY KEY, items int NOT NULL);
CREATE TABLE audit (id bigserial PRIMARY KEY, note text);
INSERT INTO carts VALUES (1, 0), (2, 0);
";
const RULES: &str = "
[[tables]]
table = \"public.carts\"
key = \"cart:{id}\"
mode = \"mirror\"
";

/// 100 write-then-read rounds through both forms of the wait: every read returns the value
/// just written. The same rounds without the wait are counted, to show the gap exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_after_the_wait_see_the_write() {
    let env = Env::start(SCHEMA, "public.carts");
    let config = env.config(RULES);
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.carts", Duration::from_secs(60)).await;
    wait_for_json(&mut r, "cart:1", Some(json!({"id": 1, "items": 0}))).await;
    let reader = reader(&config, ReaderOptions::default());
    let carts = reader.table("carts").unwrap();
    let app = env.pg_client().await;

    let mut stale_without_wait = 0;
    for i in 1..=100 {
        app.execute("UPDATE carts SET items = $1 WHERE id = 1", &[&i])
            .await
            .unwrap();
        if i % 2 == 0 {
            reader.wait_for_writes().await.unwrap();
            let cart = carts.get_json(1).await.unwrap();
            assert_eq!(cart, Some(json!({"id": 1, "items": i})), "round {i}");
        } else {
            // The application takes the position on its own connection.
            let text: String = app
                .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                .await
                .unwrap()
                .get(0);
            let position: Lsn = text.parse().unwrap();
            let cart = carts.get_after::<Value>(1, position).await.unwrap();
            assert_eq!(cart, Some(json!({"id": 1, "items": i})), "round {i}");
        }
        app.execute("UPDATE carts SET items = $1 WHERE id = 2", &[&i])
            .await
            .unwrap();
        if carts.get_json(2).await.unwrap() != Some(json!({"id": 2, "items": i})) {
            stale_without_wait += 1;
        }
    }
    eprintln!("reads without the wait that missed their own write: {stale_without_wait}/100");
    daemon.stop().await.unwrap();
}

/// Positions move past commits of tables the daemon does not cache: the wait after a write
/// to such a table returns, and promptly (no cached change ever comes to move it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_uncached_tables_are_reached() {
    let env = Env::start(SCHEMA, "public.carts");
    let config = env.config(RULES);
    let daemon = InProcess::start(config.clone());
    crate::common::wait_streaming(&mut env.redis().await).await;
    let reader = reader(
        &config,
        ReaderOptions::default().max_write_wait(Duration::from_secs(3)),
    );
    let app = env.pg_client().await;
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        app.execute("INSERT INTO audit (note) VALUES ($1)", &[&format!("n{i}")])
            .await
            .unwrap();
        let started = Instant::now();
        reader.wait_for_writes().await.unwrap();
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(1),
        "a wait past an uncached commit took {slowest:?}"
    );
    // Many waiters at once share one poller, and each is woken.
    app.execute("INSERT INTO audit (note) VALUES ('herd')", &[])
        .await
        .unwrap();
    let position = reader.write_position().await.unwrap();
    let waits = (0..200).map(|_| {
        let reader = reader.clone();
        tokio::spawn(async move { reader.wait_applied(position).await })
    });
    for wait in futures_util::future::join_all(waits).await {
        wait.unwrap().unwrap();
    }
    daemon.stop().await.unwrap();
}

/// With the daemon stopped the wait gives up after `max_write_wait` and says where the
/// checkpoint is; the same position is reached once the daemon runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_fails_clearly_while_the_daemon_is_stopped() {
    let env = Env::start(SCHEMA, "public.carts");
    let config = env.config(RULES);
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.carts", Duration::from_secs(60)).await;
    daemon.stop().await.unwrap();

    let reader = reader(
        &config,
        ReaderOptions::default().max_write_wait(Duration::from_millis(300)),
    );
    env.sql("UPDATE carts SET items = 7 WHERE id = 1");
    let position = reader.write_position().await.unwrap();
    let started = Instant::now();
    let error = reader.wait_applied(position).await.unwrap_err();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    match &error {
        ReaderError::NotApplied {
            position: p,
            applied: Some(applied),
            ..
        } => {
            assert_eq!(*p, position);
            assert!(*applied < position, "{applied} vs {position}");
        }
        other => panic!("expected NotApplied, got {other:?}"),
    }
    assert!(
        error.to_string().contains("has not applied the WAL up to"),
        "{error}"
    );
    assert!(error.is_unavailable());

    let daemon = InProcess::start(config.clone());
    let reader = super::reader(&config, ReaderOptions::default());
    reader.wait_applied(position).await.unwrap();
    assert_eq!(
        get_json(&mut r, "cart:1").await,
        Some(json!({"id": 1, "items": 7}))
    );
    daemon.stop().await.unwrap();
}
