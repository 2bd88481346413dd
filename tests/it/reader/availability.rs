//! G7: Redis down, reads come from Postgres; Postgres down, hits are still served.

use std::time::{Duration, Instant};

use pgcache::reader::{ReaderOptions, Served};
use serde_json::{json, Value};

use super::*;
use crate::common::{eventually, get, Env};

/// G7: with Redis stopped, lookups return database values; when it is back, fills resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back_to_postgres_and_recovers() {
    let mut env = Env::start(ITEMS, "");
    daemon_caught_up(&env).await;
    env.sql("INSERT INTO items VALUES (1, 'a', 1), (2, 'b', 2), (3, 'c', 3)");
    let reader = reader(
        &env.config(ITEMS_RULE),
        ReaderOptions::default().redis_timeout(Duration::from_millis(500)),
    );
    let expected =
        |id: i64, name: &str| Some(json!({"id": id, "name": name, "price": format!("{id}.00")}));
    assert_eq!(reader.get_json("items", 1).await.unwrap(), expected(1, "a"));
    assert_eq!(reader.stats().fills, 1);

    env.redis.stop().unwrap();
    let started = Instant::now();
    assert_eq!(reader.get_json("items", 1).await.unwrap(), expected(1, "a"));
    assert_eq!(reader.get_json("items", 2).await.unwrap(), expected(2, "b"));
    let many: Vec<Option<Value>> = reader.get_many("items", [3, 1]).await.unwrap();
    assert_eq!(many, vec![expected(3, "c"), expected(1, "a")]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fallbacks are fast: {:?}",
        started.elapsed()
    );
    let s = reader.stats();
    assert_eq!((s.fallbacks, s.fills), (4, 1), "{s:?}");
    // Concurrent fallbacks for one key share their database read. The table is locked
    // while they start, so that the first read is still under way when the last one asks
    // (on a loaded machine the tasks could otherwise run one after another).
    let lock = env.pg_client().await;
    lock.batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let reader = reader.clone();
            tokio::spawn(async move { reader.get_json("items", 3).await.unwrap() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    lock.batch_execute("COMMIT").await.unwrap();
    for handle in handles {
        assert_eq!(handle.await.unwrap(), expected(3, "c"));
    }
    let after = reader.stats();
    assert_eq!(after.fallbacks - s.fallbacks, 20, "{after:?}");
    assert!(
        after.db_reads - s.db_reads <= 3,
        "fallback reads were not shared: {after:?}"
    );

    env.redis.start_again().unwrap();
    // Redis came back empty; with no daemon here, nothing writes the checkpoint again.
    daemon_caught_up(&env).await;
    let mut r = env.redis().await;
    eventually(
        Duration::from_secs(20),
        "a fill after Redis is back",
        || {
            let reader = reader.clone();
            async move {
                let value = reader.get_json("items", 2).await.unwrap();
                assert_eq!(value, expected(2, "b"));
                (reader.stats().fills >= 2).then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        get(&mut r, "item:2").await.as_deref(),
        Some(r#"{"id":2,"name":"b","price":"2.00"}"#)
    );
    let before = reader.stats();
    assert_eq!(reader.get_json("items", 2).await.unwrap(), expected(2, "b"));
    assert_eq!(
        reader.stats().hits,
        before.hits + 1,
        "served from Redis again"
    );
}

/// G7: with Postgres down, hits are still served; misses fail with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_still_serves_hits() {
    let mut env = Env::start(ITEMS, "");
    daemon_caught_up(&env).await;
    env.sql("INSERT INTO items VALUES (1, 'a', 1), (2, 'b', 2)");
    let reader = reader(
        &env.config(ITEMS_RULE),
        ReaderOptions::default().postgres_timeout(Duration::from_secs(2)),
    );
    let one = Some(json!({"id": 1, "name": "a", "price": "1.00"}));
    assert_eq!(reader.get_json("items", 1).await.unwrap(), one);

    env.pg.stop().unwrap();
    assert_eq!(reader.get_json("items", 1).await.unwrap(), one);
    let e = reader.get_json("items", 2).await.unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    assert!(e.to_string().starts_with("public.items: "), "{e}");

    env.pg.start_again().unwrap();
    let two = eventually(
        Duration::from_secs(20),
        "reads after Postgres is back",
        || {
            let reader = reader.clone();
            async move { reader.get_json("items", 2).await.ok() }
        },
    )
    .await;
    assert_eq!(two, Some(json!({"id": 2, "name": "b", "price": "2.00"})));
}

/// Issue 14: with Redis hung (SIGSTOP), only the lookup that finds it hung waits for
/// `redis_timeout`; the circuit breaker then sends lookups straight to Postgres, and closes
/// once Redis answers again. No daemon runs here, so Redis keeps row 1 as it was cached
/// while Postgres has a newer one: the value says where it came from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_opens_the_breaker_and_lookups_read_postgres_at_once() {
    let env = Env::start(ITEMS, "");
    daemon_caught_up(&env).await;
    env.sql("INSERT INTO items VALUES (1, 'cached', 1), (2, 'b', 2)");
    let timeout = Duration::from_secs(2);
    let cooldown = Duration::from_millis(300);
    let reader = reader(
        &env.config(ITEMS_RULE),
        ReaderOptions::default()
            .redis_timeout(timeout)
            .breaker_cooldown(cooldown),
    );
    let items = reader.table("items").unwrap();
    let item =
        |id: i64, name: &str| Some(json!({"id": id, "name": name, "price": format!("{id}.00")}));
    let first = items.lookup::<Value>(1).await.unwrap();
    assert_eq!(
        (first.value, first.served),
        (item(1, "cached"), Served::Filled)
    );
    let hit = items.lookup::<Value>(1).await.unwrap();
    assert_eq!((hit.value, hit.served), (item(1, "cached"), Served::Hit));
    env.sql("UPDATE items SET name = 'fresh' WHERE id = 1");

    env.redis.pause().unwrap();
    let started = Instant::now();
    let found = items.lookup::<Value>(1).await.unwrap();
    let first_took = started.elapsed();
    assert_eq!(
        (found.value, found.served),
        (item(1, "fresh"), Served::Fallback)
    );
    assert!(
        first_took >= timeout - Duration::from_millis(100),
        "the first lookup waits for the timeout: {first_took:?}"
    );
    // Past the first timeout, lookups do not ask Redis: each takes a database read, across
    // several cool-downs (whose probes run in the background).
    let mut slowest = Duration::ZERO;
    let until = Instant::now() + cooldown * 4;
    let mut lookups = 0;
    while Instant::now() < until || lookups < 20 {
        let started = Instant::now();
        let found = items.lookup::<Value>(1).await.unwrap();
        assert_eq!(
            (found.value, found.served),
            (item(1, "fresh"), Served::BreakerOpen)
        );
        let absent = items.lookup::<Value>(99).await.unwrap();
        assert_eq!((absent.value, absent.served), (None, Served::BreakerOpen));
        slowest = slowest.max(started.elapsed());
        lookups += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let many: Vec<Option<Value>> = items.get_many([2, 1]).await.unwrap();
    assert_eq!(many, vec![item(2, "b"), item(1, "fresh")]);
    slowest = slowest.max(started.elapsed());
    assert!(
        slowest < timeout / 4,
        "with the breaker open, lookups take a database read, not a Redis timeout: \
         slowest {slowest:?} of {lookups}"
    );
    let s = reader.stats();
    assert_eq!(s.breaker_fallbacks, 2 * lookups + 2, "{s:?}");
    assert_eq!(s.fallbacks, s.breaker_fallbacks + 1, "{s:?}");

    env.redis.resume().unwrap();
    let closed_after = Instant::now();
    let hit = eventually(
        timeout + cooldown * 4,
        "the breaker to close and a hit from Redis",
        || {
            let items = items.clone();
            async move {
                let found = items.lookup::<Value>(1).await.unwrap();
                (found.served == Served::Hit).then_some(found)
            }
        },
    )
    .await;
    assert_eq!(hit.value, item(1, "cached"), "served from Redis again");
    let closed_after = closed_after.elapsed();
    let hit = items.lookup::<Value>(1).await.unwrap();
    assert_eq!((hit.value, hit.served), (item(1, "cached"), Served::Hit));
    // A key Redis does not hold is filled again.
    let found = items.lookup::<Value>(2).await.unwrap();
    assert_eq!((found.value, found.served), (item(2, "b"), Served::Filled));
    assert!(closed_after < timeout + cooldown * 2, "{closed_after:?}");
}
