//! Computed values and hash tables (issue 14 item 3): a user's order list cached through
//! `get_with`, deleted by the `orders` table's `[[tables.invalidate]]` rule on every insert,
//! update (both users' lists when an order moves) and delete; a fill racing an insert
//! loses; and `orders`, stored with `format = "hash"`, is served by the reader.

use std::sync::Arc;
use std::time::Duration;

use pgcache::reader::{Lookup, Served};
use serde::Deserialize;
use tokio::sync::oneshot;

use super::*;
use crate::common::{eventually, get, wait_streaming, Env, InProcess};

const SCHEMA: &str = "
CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL, total numeric(10,2) NOT NULL,
                     note text);
-- Deletes and updates must carry the old user_id, which is outside the primary key.
ALTER TABLE orders REPLICA IDENTITY FULL;
";

const RULES: &str = "
[[tables]]
table = \"public.orders\"
key = \"order:{id}\"
format = \"hash\"

[[tables.invalidate]]
key = \"user-orders:{user_id}\"

[[tables.invalidate]]
key = \"user-order-count:{user_id}\"
";

#[derive(Debug, Deserialize, PartialEq)]
struct Order {
    id: i32,
    user_id: i64,
    total: String,
    note: Option<String>,
}

/// The loader: the ids of a user's orders, straight from Postgres (also used by review.rs).
pub(crate) async fn order_ids(
    db: &tokio_postgres::Client,
    user: i32,
) -> Result<Vec<i32>, tokio_postgres::Error> {
    let rows = db
        .query(
            "SELECT id FROM orders WHERE user_id = $1 ORDER BY id",
            &[&user],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn wait_gone(r: &mut redis::aio::MultiplexedConnection, key: &str) {
    let what = format!("{key} to be deleted");
    eventually(Duration::from_secs(20), &what, || {
        let mut r = r.clone();
        async move { (!exists(&mut r, key).await).then_some(()) }
    })
    .await;
}

async fn wait_order(r: &mut redis::aio::MultiplexedConnection, id: i32, user: i32) {
    let what = format!("order {id} of user {user} in Redis");
    eventually(Duration::from_secs(20), &what, || {
        let mut r = r.clone();
        async move {
            let user_id: Option<String> = redis::cmd("HGET")
                .arg(format!("order:{id}"))
                .arg("user_id")
                .query_async(&mut r)
                .await
                .ok()?;
            (user_id == Some(user.to_string())).then_some(())
        }
    })
    .await;
}

/// A user's order list cached through a loader: filled on a miss, deleted by an insert,
/// and a fill that loaded before an insert the daemon applied meanwhile loses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_racing_an_insert_loses() {
    let env = Env::start(SCHEMA, "public.orders");
    let config = env.config(RULES);
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;
    wait_streaming(&mut r).await;
    let reader = reader(&config, long_leases());
    let db = Arc::new(env.pg_client().await);

    env.sql("INSERT INTO orders VALUES (1, 7, 10, NULL)");
    wait_order(&mut r, 1, 7).await;

    // A miss loads and fills; the next call is a hit (the loader is not called).
    let key = reader.key("user-orders:{user_id}", 7).unwrap();
    assert_eq!(key, "user-orders:7");
    let list: Vec<i32> = reader.get_with(&key, || order_ids(&db, 7)).await.unwrap();
    assert_eq!(list, [1]);
    assert_eq!(get(&mut r, "user-orders:7").await.as_deref(), Some("[1]"));
    let again: Vec<i32> = reader
        .get_with(&key, || async {
            Err::<Vec<i32>, _>("the loader must not run on a hit")
        })
        .await
        .unwrap();
    assert_eq!(again, [1]);

    // An insert deletes the list.
    env.sql("INSERT INTO orders VALUES (2, 7, 20, NULL)");
    wait_gone(&mut r, "user-orders:7").await;

    // The race: the loader reads [1, 2], then an insert is applied by the daemon before
    // the fill. The caller gets what it loaded; Redis must not keep it.
    let (loaded_tx, loaded_rx) = oneshot::channel::<()>();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let task = {
        let reader = reader.clone();
        let db = db.clone();
        let key = key.clone();
        tokio::spawn(async move {
            reader
                .lookup_with(&key, None, || async move {
                    let ids = order_ids(&db, 7).await?;
                    loaded_tx.send(()).unwrap();
                    go_rx.await.unwrap();
                    Ok::<_, tokio_postgres::Error>(ids)
                })
                .await
        })
    };
    loaded_rx.await.unwrap();
    let lost_before = reader.computed_stats().lost_fills;
    env.sql("INSERT INTO orders VALUES (3, 7, 30, NULL)");
    wait_order(&mut r, 3, 7).await; // the daemon applied it: the lease is gone
    go_tx.send(()).unwrap();
    let stale: Lookup<Vec<i32>> = task.await.unwrap().unwrap();
    assert_eq!(
        stale.value,
        Some(vec![1, 2]),
        "the caller gets the value it loaded"
    );
    assert_eq!(
        stale.served,
        Served::Uncached,
        "and learns it was not cached"
    );
    assert_eq!(reader.computed_stats().lost_fills, lost_before + 1);
    assert!(
        !exists(&mut r, "user-orders:7").await,
        "the stale list was cached: {:?}",
        get(&mut r, "user-orders:7").await
    );

    // The next call loads the fresh list and caches it.
    let fresh: Vec<i32> = reader.get_with(&key, || order_ids(&db, 7)).await.unwrap();
    assert_eq!(fresh, [1, 2, 3]);
    assert_eq!(
        get(&mut r, "user-orders:7").await.as_deref(),
        Some("[1,2,3]")
    );

    // Control: a load with no change meanwhile, with a TTL, fills.
    let count: i64 = reader
        .get_with_ttl(
            "user-order-count:7",
            Some(Duration::from_secs(60)),
            || async { Ok::<_, std::convert::Infallible>(3) },
        )
        .await
        .unwrap();
    assert_eq!(count, 3);
    let ttl: i64 = redis::cmd("PTTL")
        .arg("user-order-count:7")
        .query_async(&mut r)
        .await
        .unwrap();
    assert!((1..=60_000).contains(&ttl), "PTTL {ttl}");

    // A failing loader caches nothing and frees the lease at once.
    env.sql("DELETE FROM orders WHERE id = 3");
    wait_gone(&mut r, "user-orders:7").await;
    wait_gone(&mut r, "user-order-count:7").await;
    let failed = reader
        .get_with::<Vec<i32>, _, _, _>(&key, || async { Err("no database today") })
        .await;
    assert!(
        matches!(failed, Err(pgcache::reader::ReaderError::Loader { .. })),
        "{failed:?}"
    );
    assert!(!exists(&mut r, "user-orders:7").await);
    let list: Vec<i32> = tokio::time::timeout(
        Duration::from_secs(5),
        reader.get_with(&key, || order_ids(&db, 7)),
    )
    .await
    .expect("the failed loader's lease was given back")
    .unwrap();
    assert_eq!(list, [1, 2]);

    daemon.stop().await.unwrap();
}

/// Computed keys are counted as table lookups are (`computed_stats`, and in `stats`), and
/// each call says how it was served: a fill, a hit, and a herd of callers in one process
/// that share one loader run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn computed_keys_are_counted_and_say_how_they_were_served() {
    let env = Env::start(SCHEMA, "public.orders");
    let config = env.config(RULES);
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;
    wait_streaming(&mut r).await;
    let reader = reader(&config, long_leases());
    let db = Arc::new(env.pg_client().await);
    env.sql("INSERT INTO orders VALUES (1, 7, 10, NULL), (2, 7, 20, NULL)");
    wait_order(&mut r, 2, 7).await;
    assert_eq!(reader.computed_stats(), Stats::default());

    // A miss: loaded under the lease and cached.
    let first: Lookup<Vec<i32>> = reader
        .lookup_with("user-orders:7", None, || order_ids(&db, 7))
        .await
        .unwrap();
    assert_eq!(first.value, Some(vec![1, 2]));
    assert_eq!((first.served, first.coalesced), (Served::Filled, false));
    let s = reader.computed_stats();
    assert_eq!(
        (s.hits, s.misses, s.fills, s.db_reads, s.coalesced),
        (0, 1, 1, 1, 0),
        "{s:?}"
    );

    // A hit: no loader run.
    let hit: Lookup<Vec<i32>> = reader
        .lookup_with("user-orders:7", None, || async {
            Err::<Vec<i32>, _>("the loader must not run on a hit")
        })
        .await
        .unwrap();
    assert_eq!((hit.value, hit.served), (Some(vec![1, 2]), Served::Hit));
    let s = reader.computed_stats();
    assert_eq!((s.hits, s.misses, s.db_reads), (1, 1, 1), "{s:?}");
    assert_eq!(s.hit_rate(), 0.5);

    // A herd of 20 callers on a cold key, the loader slow enough for all to join its
    // flight: one loader run, one fill, the other 19 shared it (or, if late, hit).
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let herd = (0..20).map(|_| {
        let reader = reader.clone();
        let db = db.clone();
        let runs = runs.clone();
        tokio::spawn(async move {
            reader
                .lookup_with("user-order-count:7", None, || async move {
                    runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let ids = order_ids(&db, 7).await?;
                    Ok::<_, tokio_postgres::Error>(ids.len() as i64)
                })
                .await
                .unwrap()
        })
    });
    let found: Vec<Lookup<i64>> = futures_util::future::join_all(herd)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(found.iter().all(|f| f.value == Some(2)));
    let led: Vec<&Lookup<i64>> = found
        .iter()
        .filter(|f| f.served == Served::Filled && !f.coalesced)
        .collect();
    assert_eq!(led.len(), 1, "{found:?}");
    let shared = found.iter().filter(|f| f.coalesced).count();
    let late_hits = found.iter().filter(|f| f.served == Served::Hit).count();
    assert_eq!(shared + late_hits, 19, "{found:?}");
    let s = reader.computed_stats();
    assert_eq!(s.db_reads, 2, "{s:?}");
    assert_eq!(s.fills, 2, "{s:?}");
    assert_eq!(s.coalesced, shared as u64, "{s:?}");
    assert_eq!(s.hits + s.misses, 22, "{s:?}");
    assert_eq!(
        get(&mut r, "user-order-count:7").await.as_deref(),
        Some("2")
    );

    // The reader's totals include computed keys; the table's own counts do not (nothing
    // read the table through the reader).
    let orders = reader.table("public.orders").unwrap().stats();
    assert_eq!(orders, Stats::default());
    assert_eq!(reader.stats(), s);

    daemon.stop().await.unwrap();
}

/// An update that moves an order to another user deletes both users' lists (rendered from
/// the new row and from the old one), and a delete deletes the owner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_an_order_invalidates_both_users() {
    let env = Env::start(SCHEMA, "public.orders");
    let config = env.config(RULES);
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;
    wait_streaming(&mut r).await;
    let reader = reader(&config, long_leases());
    let db = env.pg_client().await;

    env.sql("INSERT INTO orders VALUES (1, 7, 10, NULL), (2, 8, 20, NULL)");
    wait_order(&mut r, 1, 7).await;
    wait_order(&mut r, 2, 8).await;
    for (user, ids) in [(7, vec![1]), (8, vec![2])] {
        let key = reader.key("user-orders:{user_id}", user).unwrap();
        let list: Vec<i32> = reader
            .get_with(&key, || order_ids(&db, user))
            .await
            .unwrap();
        assert_eq!(list, ids);
        assert!(exists(&mut r, &key).await);
    }

    // An update that changes neither template column still deletes the owner's list.
    env.sql("UPDATE orders SET note = 'gift' WHERE id = 2");
    wait_gone(&mut r, "user-orders:8").await;
    assert!(exists(&mut r, "user-orders:7").await, "user 7's list stays");
    let list: Vec<i32> = reader
        .get_with("user-orders:8", || order_ids(&db, 8))
        .await
        .unwrap();
    assert_eq!(list, [2]);

    // Order 1 moves from user 7 to user 8: both lists go.
    env.sql("UPDATE orders SET user_id = 8 WHERE id = 1");
    wait_gone(&mut r, "user-orders:7").await;
    wait_gone(&mut r, "user-orders:8").await;
    let seven: Vec<i32> = reader
        .get_with("user-orders:7", || order_ids(&db, 7))
        .await
        .unwrap();
    let eight: Vec<i32> = reader
        .get_with("user-orders:8", || order_ids(&db, 8))
        .await
        .unwrap();
    assert_eq!((seven, eight), (vec![], vec![1, 2]));

    // A delete carries the old row (REPLICA IDENTITY FULL): the owner's list goes.
    env.sql("DELETE FROM orders WHERE id = 2");
    wait_gone(&mut r, "user-orders:8").await;
    assert!(exists(&mut r, "user-orders:7").await);

    // TRUNCATE has no rows to render keys from: every key of the rules goes.
    env.sql("TRUNCATE orders");
    wait_gone(&mut r, "user-orders:7").await;

    daemon.stop().await.unwrap();
}

/// A table stored as hashes is served: hits read the daemon's hash, misses fill one that
/// is field for field the daemon's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_tables_are_served() {
    let env = Env::start(SCHEMA, "public.orders");
    let config = env.config(RULES);
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;
    wait_streaming(&mut r).await;
    let reader = reader(&config, long_leases());
    let orders = reader.table("public.orders").unwrap();

    env.sql("INSERT INTO orders VALUES (1, 7, 10.5, 'gift'), (2, 8, 20, NULL)");
    wait_order(&mut r, 1, 7).await;
    wait_order(&mut r, 2, 8).await;
    let daemon_fields: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg("order:1")
        .query_async(&mut r)
        .await
        .unwrap();

    // Hits.
    let one: Option<Order> = orders.get(1).await.unwrap();
    assert_eq!(
        one,
        Some(Order {
            id: 1,
            user_id: 7,
            total: "10.50".into(),
            note: Some("gift".into())
        })
    );
    let hits = orders.stats().hits;
    assert!(hits >= 1, "{:?}", orders.stats());

    // Misses fill the same fields the daemon wrote.
    del(&mut r, "order:1").await;
    del(&mut r, "order:2").await;
    let both: Vec<Option<Order>> = orders.get_many([1, 2, 3]).await.unwrap();
    assert_eq!(both[1].as_ref().map(|o| o.note.clone()), Some(None));
    assert_eq!(both[1].as_ref().map(|o| o.total.as_str()), Some("20.00"));
    assert!(both[2].is_none());
    let filled: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg("order:1")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(filled, daemon_fields);
    assert!(orders.stats().fills >= 2, "{:?}", orders.stats());

    // As a map, and raw (a JSON object of the fields' text).
    let map: Option<std::collections::HashMap<String, String>> =
        reader.get("public.orders", 1).await.unwrap();
    assert_eq!(map.unwrap()["total"], "10.50");
    let raw = orders.get_raw(2).await.unwrap().unwrap();
    let raw: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(raw, json!({"id": "2", "user_id": "8", "total": "20.00"}));

    // The daemon's next change replaces the filled hash.
    env.sql("UPDATE orders SET total = 11 WHERE id = 1");
    eventually(Duration::from_secs(20), "the update in Redis", || {
        let mut r = r.clone();
        async move {
            let total: Option<String> = redis::cmd("HGET")
                .arg("order:1")
                .arg("total")
                .query_async(&mut r)
                .await
                .ok()?;
            (total.as_deref() == Some("11.00")).then_some(())
        }
    })
    .await;
    let one: Option<Order> = orders.get(1).await.unwrap();
    assert_eq!(one.unwrap().total, "11.00");

    daemon.stop().await.unwrap();
}

/// `pgcache check` refuses an invalidation key whose columns deletes would not carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_an_invalidation_column_outside_the_replica_identity() {
    let env = Env::start(
        "CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL, total numeric);",
        "public.orders",
    );
    let path = env.write_config(RULES);
    let (code, out, err) = crate::common::pgcache(&["check", "--config", path.to_str().unwrap()]);
    let all = format!("{out}{err}");
    assert_ne!(code, 0, "{all}");
    assert!(
        all.contains("invalidation key column \"user_id\"")
            && all.contains("REPLICA IDENTITY FULL"),
        "{all}"
    );
}
