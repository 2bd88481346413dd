//! Lookups in one process: single flight, `get_many`, early refresh.

use std::time::{Duration, Instant};

use pgcache::reader::{ReaderOptions, Served};
use serde_json::json;

use super::*;
use crate::common::{eventually, get, Env};

/// Callers in one process share one flight: one read, one fill, everyone else coalesced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_in_one_process_share_one_read() {
    let env = Env::start(ITEMS, "");
    daemon_caught_up(&env).await;
    env.sql("INSERT INTO items VALUES (1, 'lamp', 19.90)");
    let reader = reader(&env.config(ITEMS_RULE), ReaderOptions::default());
    let handles: Vec<_> = (0..100)
        .map(|_| {
            let reader = reader.clone();
            tokio::spawn(async move { reader.get_json("items", 1).await.unwrap() })
        })
        .collect();
    for handle in handles {
        assert_eq!(
            handle.await.unwrap(),
            Some(json!({"id": 1, "name": "lamp", "price": "19.90"}))
        );
    }
    let s = reader.stats();
    assert_eq!(
        (s.db_reads, s.fills, s.misses + s.hits),
        (1, 1, 100),
        "{s:?}"
    );
    assert_eq!(s.coalesced + s.hits + 1, 100, "{s:?}");
}

/// One MGET for all keys, then one database read for the misses; repeats and absent rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_reads_misses_together() {
    let env = Env::start(ITEMS, "");
    daemon_caught_up(&env).await;
    env.sql("INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 5) g");
    let reader = reader(&env.config(ITEMS_RULE), ReaderOptions::default());
    let items = reader.table("items").unwrap();
    items.get_json(1).await.unwrap();
    items.get_json(2).await.unwrap();
    let before = items.stats();

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Item {
        id: i64,
        name: String,
        price: String,
    }
    let got: Vec<Option<Item>> = items.get_many([1, 2, 3, 3, 4, 99]).await.unwrap();
    let item = |id: i64| {
        Some(Item {
            id,
            name: format!("n{id}"),
            price: format!("{id}.00"),
        })
    };
    assert_eq!(got, vec![item(1), item(2), item(3), item(3), item(4), None]);
    let s = items.stats();
    assert_eq!(s.hits - before.hits, 2, "{s:?}");
    assert_eq!(s.misses - before.misses, 4, "{s:?}");
    assert_eq!(
        s.db_reads - before.db_reads,
        1,
        "one read for 3, 4 and 99: {s:?}"
    );
    assert_eq!(s.fills - before.fills, 2, "{s:?}");
    let mut r = env.redis().await;
    assert!(get(&mut r, "item:3").await.is_some());
    assert!(get(&mut r, "item:99").await.is_none());
    let empty: Vec<Option<Item>> = items.get_many(Vec::<i32>::new()).await.unwrap();
    assert!(empty.is_empty());
}

/// XFetch: hits on a key close to expiry refresh it in the background, so it never expires
/// into a miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_keys_with_a_ttl_are_refreshed_early() {
    let env = Env::start(ITEMS, "");
    daemon_caught_up(&env).await;
    env.sql("INSERT INTO items VALUES (1, 'lamp', 19.90)");
    let config = env.config(
        "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\nmode = \"refresh\"\nttl = \"3s\"\n",
    );
    let reader = reader(
        &config,
        ReaderOptions::default()
            // Refresh at nearly every hit, to see it happen in a short test.
            .early_refresh_beta(Some(1000.0)),
    );
    assert!(reader.get_json("items", 1).await.unwrap().is_some());
    let mut r = env.redis().await;
    let ttl = |mut r: redis::aio::MultiplexedConnection| async move {
        redis::cmd("PTTL")
            .arg("item:1")
            .query_async::<i64>(&mut r)
            .await
            .unwrap()
    };
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let aged = ttl(r.clone()).await;
    assert!((1..=1900).contains(&aged), "{aged}");
    // Hits for longer than the TTL: every one is served from Redis.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert!(reader.get_json("items", 1).await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = reader.stats();
    assert!(s.early_refreshes >= 1, "{s:?}");
    assert_eq!(s.misses, 1, "only the first lookup missed: {s:?}");
    assert!(ttl(r.clone()).await > 0);
    assert!(get(&mut r, "item:1").await.is_some());
}

/// Issue 14: `lookup` says per call how the value was served: a fill, a hit, a wait for
/// another holder's fill, a cached absence, and which calls shared another caller's work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_says_how_each_call_was_served() {
    let env = Env::start(ITEMS, "");
    daemon_caught_up(&env).await;
    env.sql("INSERT INTO items VALUES (1, 'lamp', 19.90), (2, 'desk', 120)");
    let reader = reader(
        &env.config(ITEMS_RULE),
        ReaderOptions::default().negative_ttl(Some(Duration::from_secs(60))),
    );
    let items = reader.table("items").unwrap();
    let lamp = Some(json!({"id": 1, "name": "lamp", "price": "19.90"}));
    let desk = Some(json!({"id": 2, "name": "desk", "price": "120.00"}));

    // A herd on a cold key: one call fills, the others share it (or hit, once it is filled).
    let handles: Vec<_> = (0..50)
        .map(|_| {
            let items = items.clone();
            tokio::spawn(async move { items.lookup::<Value>(1).await.unwrap() })
        })
        .collect();
    let mut filled_alone = 0;
    for handle in handles {
        let found = handle.await.unwrap();
        assert_eq!(found.value, lamp);
        match (found.served, found.coalesced) {
            (Served::Filled, false) => filled_alone += 1,
            (Served::Filled, true) | (Served::Hit, _) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(filled_alone, 1);
    let hit = items.lookup::<Value>(1).await.unwrap();
    assert_eq!(
        (hit.value, hit.served, hit.coalesced),
        (lamp, Served::Hit, false)
    );

    // Another holder has the lease of key 2: the lookup waits for its fill.
    let pgcache::reader::LeaseOutcome::Acquired(lease) = items.lease(2).await.unwrap() else {
        panic!("the lease of a cold key is free");
    };
    let waiting = {
        let items = items.clone();
        tokio::spawn(async move { items.lookup::<Value>(2).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let row = lease.read_row().await.unwrap().unwrap();
    assert_eq!(
        lease.fill(&row).await.unwrap(),
        pgcache::reader::FillOutcome::Filled
    );
    let found = waiting.await.unwrap();
    assert_eq!((found.value, found.served), (desk, Served::Waited));

    // No row: read once, then a cached absence.
    let absent = items.lookup::<Value>(99).await.unwrap();
    assert_eq!((absent.value, absent.served), (None, Served::Filled));
    let absent = items.lookup::<Value>(99).await.unwrap();
    assert_eq!((absent.value, absent.served), (None, Served::NegativeHit));
    assert!(absent.served.from_cache());
}

/// Issue 14 item 3: a table stored as hashes goes through the same lookups as a JSON table:
/// a herd on a cold key costs one database read and one fill (single flight), `lookup` says
/// how each call was served, `get_many` reads its misses together, the lease API works, and
/// a hot key with a TTL is refreshed early, the refresh replacing the whole hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_tables_share_lookups_and_refresh_early() {
    use std::collections::{BTreeMap, HashMap};
    let env = Env::start(ITEMS, "");
    daemon_caught_up(&env).await;
    env.sql("INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 3) g");
    let config = env.config(
        "[[tables]]\ntable = \"items\"\nkey = \"item:{id}\"\nformat = \"hash\"\n\
         mode = \"refresh\"\nttl = \"3s\"\n",
    );
    let reader = reader(
        &config,
        ReaderOptions::default()
            // Refresh at nearly every hit close to expiry, to see it in a short test.
            .early_refresh_beta(Some(1000.0)),
    );
    let items = reader.table("items").unwrap();
    let mut r = env.redis().await;
    let fields = |id: i64, price: Option<&str>| {
        let mut f = HashMap::from([
            ("id".to_string(), id.to_string()),
            ("name".to_string(), format!("n{id}")),
        ]);
        if let Some(price) = price {
            f.insert("price".to_string(), price.to_string());
        }
        f
    };
    let hgetall = |mut r: redis::aio::MultiplexedConnection, key: &'static str| async move {
        redis::cmd("HGETALL")
            .arg(key)
            .query_async::<BTreeMap<String, String>>(&mut r)
            .await
            .unwrap()
    };

    // A herd of 100 callers on a cold key: one database read, one fill.
    let handles: Vec<_> = (0..100)
        .map(|_| {
            let items = items.clone();
            tokio::spawn(async move { items.lookup::<HashMap<String, String>>(1).await.unwrap() })
        })
        .collect();
    let mut filled_alone = 0;
    for handle in handles {
        let found = handle.await.unwrap();
        assert_eq!(found.value, Some(fields(1, Some("1.00"))));
        match (found.served, found.coalesced) {
            (Served::Filled, false) => filled_alone += 1,
            (Served::Filled, true) | (Served::Hit, _) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(filled_alone, 1);
    let s = items.stats();
    assert_eq!(
        (s.db_reads, s.fills, s.hits + s.misses),
        (1, 1, 100),
        "{s:?}"
    );
    assert_eq!(s.coalesced + s.hits + 1, 100, "{s:?}");
    let filled = hgetall(r.clone(), "item:1").await;
    assert_eq!(filled.get("price").map(String::as_str), Some("1.00"));
    let ttl: i64 = redis::cmd("PTTL")
        .arg("item:1")
        .query_async(&mut r)
        .await
        .unwrap();
    assert!((1..=3000).contains(&ttl), "PTTL {ttl}");

    // get_many: one pipeline of HGETALLs, the misses (2, and 99 which has no row) in one
    // database read; the repeat of 2 is served with it.
    let got: Vec<Option<HashMap<String, String>>> = items.get_many([1, 2, 2, 99]).await.unwrap();
    assert_eq!(
        got,
        [
            Some(fields(1, Some("1.00"))),
            Some(fields(2, Some("2.00"))),
            Some(fields(2, Some("2.00"))),
            None
        ]
    );
    let s = items.stats();
    assert_eq!((s.db_reads, s.fills), (2, 2), "{s:?}");

    // The lease API: values are the row's fields as a JSON object of their text.
    let pgcache::reader::LeaseOutcome::Acquired(lease) = items.lease(3).await.unwrap() else {
        panic!("the lease of a cold key is free");
    };
    let row = lease.read_row().await.unwrap().unwrap();
    let row_json: Value = serde_json::from_slice(&row).unwrap();
    assert_eq!(row_json, json!({"id": "3", "name": "n3", "price": "3.00"}));
    assert_eq!(
        lease.fill(&row).await.unwrap(),
        pgcache::reader::FillOutcome::Filled
    );
    assert_eq!(hgetall(r.clone(), "item:3").await.len(), 3);
    let pgcache::reader::LeaseOutcome::Hit(cached) = items.lease(3).await.unwrap() else {
        panic!("key 3 is cached");
    };
    assert_eq!(serde_json::from_slice::<Value>(&cached).unwrap(), row_json);

    // Early refresh. No daemon runs, so Redis keeps the old hash until a refresh reads the
    // row again: the new name appears and the price, now NULL, goes.
    env.sql("UPDATE items SET name = 'renamed', price = NULL WHERE id = 1");
    let misses = items.stats().misses;
    let refreshed = eventually(
        Duration::from_secs(10),
        "an early refresh of item:1",
        || {
            let items = items.clone();
            let r = r.clone();
            async move {
                let hit = items.lookup::<HashMap<String, String>>(1).await.unwrap();
                assert_eq!(
                    hit.served,
                    Served::Hit,
                    "a hot key never expires into a miss"
                );
                let cached = hgetall(r, "item:1").await;
                (cached.get("name").map(String::as_str) == Some("renamed")).then_some(cached)
            }
        },
    )
    .await;
    assert!(
        !refreshed.contains_key("price"),
        "the refresh kept the old price field: {refreshed:?}"
    );
    let s = items.stats();
    assert!(s.early_refreshes >= 1, "{s:?}");
    assert_eq!(s.misses, misses, "only hits meanwhile: {s:?}");
    let ttl: i64 = redis::cmd("PTTL")
        .arg("item:1")
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(
        (1..=3000).contains(&ttl),
        "the refresh sets the table's TTL: PTTL {ttl}"
    );
}
