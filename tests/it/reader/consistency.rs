//! What ends up in Redis: stale fills lose, values match the daemon byte for byte,
//! cached absences end with an insert, and keys the daemon would spell differently are refused.

use std::time::Duration;

use pgcache::reader::{FillOutcome, LeaseOutcome, ReaderError, ReaderOptions};
use serde_json::json;

use super::*;
use crate::common::{eventually, get, wait_backfill_done, wait_for_json, Env, InProcess};

const STALE_SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2));
CREATE TABLE drafts (id int PRIMARY KEY, body text);
";
const STALE_RULES: &str = "
[[tables]]
table = \"public.items\"
key = \"item:{id}\"
mode = \"mirror\"

[[tables]]
table = \"public.drafts\"
key = \"draft:{id}\"
mode = \"refresh\"
";

/// G4: a lease holder paused between its read and its fill loses to a change the daemon
/// applies meanwhile, for an update (mirror and refresh modes) and a delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_fills_lose_to_changes_the_daemon_applies() {
    let env = Env::start(STALE_SCHEMA, "public.items,public.drafts");
    let config = env.config(STALE_RULES);
    let daemon = InProcess::start(config.clone());
    let reader = reader(&config, long_leases());
    let items = reader.table("public.items").unwrap();
    let mut r = env.redis().await;

    env.sql("INSERT INTO items VALUES (1, 'old', 1), (2, 'doomed', 2), (3, 'calm', 3)");
    // The first backfill runs beside the stream and could write a key again after its
    // eviction below; past it, only the stream writes.
    wait_backfill_done(&mut r, "public.items", Duration::from_secs(60)).await;
    for (key, name, price) in [
        ("item:1", "old", "1.00"),
        ("item:2", "doomed", "2.00"),
        ("item:3", "calm", "3.00"),
    ] {
        let id: i64 = key[5..].parse().unwrap();
        wait_for_json(
            &mut r,
            key,
            Some(json!({"id": id, "name": name, "price": price})),
        )
        .await;
        del(&mut r, key).await; // evicted: the next read is a miss
    }

    // Control: with no change in between, the fill wins.
    let LeaseOutcome::Acquired(lease) = items.lease(3).await.unwrap() else {
        panic!("lease on a cold key");
    };
    let row = lease.read_row().await.unwrap().unwrap();
    assert_eq!(lease.fill(&row).await.unwrap(), FillOutcome::Filled);
    assert_eq!(
        get(&mut r, "item:3").await.as_deref(),
        Some(&*String::from_utf8(row).unwrap())
    );

    // Update between the read and the fill (mirror: the daemon writes the new row).
    let LeaseOutcome::Acquired(lease) = items.lease(1).await.unwrap() else {
        panic!("lease on a cold key");
    };
    assert!(matches!(items.lease(1).await.unwrap(), LeaseOutcome::Held));
    let stale = lease.read_row().await.unwrap().unwrap();
    env.sql("UPDATE items SET name = 'new' WHERE id = 1");
    wait_for_json(
        &mut r,
        "item:1",
        Some(json!({"id": 1, "name": "new", "price": "1.00"})),
    )
    .await;
    assert!(
        !exists(&mut r, lease.lease_key()).await,
        "the daemon revoked the lease"
    );
    assert_eq!(lease.fill(&stale).await.unwrap(), FillOutcome::Lost);
    assert_eq!(
        get(&mut r, "item:1").await.as_deref(),
        Some(r#"{"id":1,"name":"new","price":"1.00"}"#),
        "Redis ends with the updated row"
    );

    // Delete between the read and the fill: the row must not come back.
    let LeaseOutcome::Acquired(lease) = items.lease(2).await.unwrap() else {
        panic!("lease on a cold key");
    };
    let stale = lease.read_row().await.unwrap().unwrap();
    env.sql("DELETE FROM items WHERE id = 2");
    let lease_key = lease.lease_key().to_string();
    eventually(
        Duration::from_secs(20),
        "the daemon to revoke the lease",
        || {
            let mut r = r.clone();
            let lease_key = lease_key.clone();
            async move { (!exists(&mut r, &lease_key).await).then_some(()) }
        },
    )
    .await;
    assert_eq!(lease.fill(&stale).await.unwrap(), FillOutcome::Lost);
    assert_eq!(
        get(&mut r, "item:2").await,
        None,
        "the deleted row did not come back"
    );
    assert_eq!(items.get_json(2).await.unwrap(), None);

    // Refresh mode: the daemon does not write absent keys, so only the lease stops the
    // stale fill.
    let drafts = reader.table("drafts").unwrap();
    env.sql("INSERT INTO drafts VALUES (1, 'first')");
    // Applied before the lease is taken: else applying it would revoke the lease too, and
    // on a slow machine the update below could then revoke the next lookup's lease.
    reader.wait_for_writes().await.unwrap();
    let LeaseOutcome::Acquired(lease) = drafts.lease(1).await.unwrap() else {
        panic!("lease on a cold key");
    };
    let stale = lease.read_row().await.unwrap().unwrap();
    env.sql("UPDATE drafts SET body = 'second' WHERE id = 1");
    let lease_key = lease.lease_key().to_string();
    eventually(
        Duration::from_secs(20),
        "the daemon to revoke the draft lease",
        || {
            let mut r = r.clone();
            let lease_key = lease_key.clone();
            async move { (!exists(&mut r, &lease_key).await).then_some(()) }
        },
    )
    .await;
    assert_eq!(lease.fill(&stale).await.unwrap(), FillOutcome::Lost);
    assert_eq!(get(&mut r, "draft:1").await, None);
    assert_eq!(
        drafts.get_json(1).await.unwrap(),
        Some(json!({"id": 1, "body": "second"}))
    );
    assert_eq!(
        get(&mut r, "draft:1").await.as_deref(),
        Some(r#"{"id":1,"body":"second"}"#)
    );

    let s = reader.stats();
    assert_eq!(s.lost_fills, 3, "{s:?}");
    daemon.stop().await.unwrap();
}

const KITCHEN: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE kitchen (
  id int PRIMARY KEY,
  gone int,
  t text, vc varchar(10), ch char(5), n numeric(10,2), f4 real, f8 double precision,
  b boolean, ts timestamp, tstz timestamptz, d date, tm time, ttz timetz, iv interval,
  j json, jb jsonb, by bytea, u uuid, ip inet, net cidr, mac macaddr, m mood, p posint,
  ia int[], ta text[], tsa timestamptz[], pt point, bits varbit,
  twice int GENERATED ALWAYS AS (id * 2) STORED
);
ALTER TABLE kitchen DROP COLUMN gone;
CREATE TABLE orders (tenant text, id int, total numeric, note text, PRIMARY KEY (tenant, id));
"#;
const KITCHEN_RULES: &str = r#"
[[tables]]
table = "public.kitchen"
key = "kitchen:{id}"

[[tables]]
table = "public.orders"
key = "tenant:{tenant}:order:{id}"
columns = ["total", "id", "tenant"]
numeric = "number"
"#;

/// The reader's values are byte-identical to the daemon's for the same rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_are_byte_identical_to_the_daemon() {
    let env = Env::start(KITCHEN, "public.kitchen,public.orders");
    let config = env.config(KITCHEN_RULES);
    let daemon = InProcess::start(config.clone());
    // The first start backfills both tables. Let that finish first: a backfill chunk read
    // after the inserts would write their keys again after they are deleted below, and the
    // reader would then find them cached (or lose its fill to the daemon) instead of filling.
    let mut r = env.redis().await;
    for table in ["public.kitchen", "public.orders"] {
        wait_backfill_done(&mut r, table, Duration::from_secs(60)).await;
    }
    env.sql(
        r#"INSERT INTO kitchen (id, t, vc, ch, n, f4, f8, b, ts, tstz, d, tm, ttz, iv, j, jb, by, u, ip, net, mac, m, p, ia, ta, tsa, pt, bits) VALUES
        (1, E'quote " back \\ nl \n tab \t é ☃', 'short', 'ab', 12.5, 1.1, 'NaN', true,
         '2026-01-02 03:04:05.123456', '2026-01-02 03:04:05+02', '2026-01-02', '03:04:05.5', '03:04:05+02',
         '1 day 2 hours 3.5 seconds', '{"a": [1, 2.50, null]}', '{"b": {"c": "d"}, "a": 1}', '\x00ff10',
         'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '10.0.0.1', '10.0.0.0/8', '08:00:2b:01:02:03', 'happy', 7,
         '{1,NULL,3}', '{"a b","c,d",NULL,"NULL"}', '{"2026-01-02 03:04:05+00"}', '(1.5,-2)', '1011'),
        (2, NULL, NULL, NULL, NULL, '-Infinity', 1e-7, false, NULL, 'infinity', NULL, NULL, NULL, NULL,
         NULL, NULL, '', NULL, '::1', NULL, NULL, 'sad', NULL, '{}', NULL, NULL, NULL, NULL);
        INSERT INTO orders VALUES ('acme', 1, 12.340, 'x'), ('a:b c', 2, -0.5, NULL);"#,
    );
    let keys = [
        "kitchen:1",
        "kitchen:2",
        "tenant:acme:order:1",
        "tenant:a%3Ab%20c:order:2",
    ];
    let mut from_daemon = Vec::new();
    for key in keys {
        let value = eventually(Duration::from_secs(20), key, || {
            let mut r = r.clone();
            async move { get(&mut r, key).await }
        })
        .await;
        from_daemon.push(value);
    }
    // The daemon keeps running: a fill waits for it to have applied the WAL up to the
    // read, and with it stopped, any WAL written meanwhile (a checkpoint, autovacuum) would
    // hold the fill back. Nothing changes these rows, so it does not write their keys again.
    for key in keys {
        del(&mut r, key).await;
    }

    let reader = reader(&config, ReaderOptions::default());
    let kitchen = reader.table("kitchen").unwrap();
    let orders = reader.table("orders").unwrap();
    let from_reader = [
        kitchen.get_raw(1).await.unwrap(),
        kitchen.get_raw(2).await.unwrap(),
        orders.get_raw(("acme", 1)).await.unwrap(),
        orders.get_raw(("a:b c", 2)).await.unwrap(),
    ];
    for ((key, daemon_value), reader_value) in keys.iter().zip(&from_daemon).zip(&from_reader) {
        let reader_value = String::from_utf8(reader_value.as_ref().unwrap().to_vec()).unwrap();
        assert_eq!(
            &reader_value, daemon_value,
            "{key}: reader and daemon differ"
        );
        assert_eq!(
            get(&mut r, key).await.as_ref(),
            Some(daemon_value),
            "{key}: filled value"
        );
    }
    // Spot checks that the table was as tricky as intended.
    assert!(
        from_daemon[0].contains(r#""ip":"10.0.0.1""#),
        "{}",
        from_daemon[0]
    );
    assert!(
        from_daemon[0].contains(r#""ch":"ab   ""#),
        "{}",
        from_daemon[0]
    );
    assert!(!from_daemon[0].contains("twice"), "{}", from_daemon[0]);
    assert_eq!(from_daemon[2], r#"{"total":12.340,"id":1,"tenant":"acme"}"#);
    assert_eq!(reader.stats().fills, 4);
    daemon.stop().await.unwrap();
}

/// Negative caching keeps absent ids off Postgres, and an insert ends it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_caching_ends_with_an_insert() {
    let env = Env::start(STALE_SCHEMA, "public.items,public.drafts");
    let config = env.config(STALE_RULES);
    let daemon = InProcess::start(config.clone());
    // Once it streams: its first start drops every table's keys, leases included.
    crate::common::wait_streaming(&mut env.redis().await).await;
    let reader = reader(
        &config,
        ReaderOptions::default().negative_ttl(Some(Duration::from_secs(60))),
    );
    let drafts = reader.table("drafts").unwrap();
    assert_eq!(drafts.get_json(7).await.unwrap(), None);
    assert_eq!(drafts.get_json(7).await.unwrap(), None);
    let s = drafts.stats();
    assert_eq!((s.db_reads, s.negative_hits), (1, 1), "{s:?}");

    env.sql("INSERT INTO drafts VALUES (7, 'now here')");
    let value = eventually(
        Duration::from_secs(20),
        "the insert to end the cached absence",
        || {
            let drafts = drafts.clone();
            async move { drafts.get_json(7).await.unwrap() }
        },
    )
    .await;
    assert_eq!(value, json!({"id": 7, "body": "now here"}));
    daemon.stop().await.unwrap();
}

/// Key values the daemon would spell differently are refused, never filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_canonical_and_invalid_keys_are_refused() {
    let env = Env::start(ITEMS, "");
    daemon_caught_up(&env).await;
    env.sql("INSERT INTO items VALUES (42, 'x', 1)");
    let reader = reader(&env.config(ITEMS_RULE), ReaderOptions::default());
    let e = reader.get_json("items", "042").await.unwrap_err();
    assert!(matches!(e, ReaderError::NonCanonicalKey { .. }), "{e}");
    assert!(
        e.to_string()
            .contains(r#"key value "042" for column "id" is not in its canonical form "42""#),
        "{e}"
    );
    let e = reader.get_json("items", "4x").await.unwrap_err();
    assert!(matches!(e, ReaderError::BadKeyValue { .. }), "{e}");
    assert!(
        e.to_string().contains(
            r#"key value "4x" for column "id" is not usable: invalid input syntax for type integer"#
        ),
        "{e}"
    );
    let e = reader.get_json("items", "it's").await.unwrap_err();
    assert!(matches!(e, ReaderError::BadKeyValue { .. }), "{e}");
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Wrong {
        id: String,
    }
    let e = reader.get::<Wrong>("items", 42).await.unwrap_err();
    assert!(matches!(e, ReaderError::Decode { .. }), "{e}");
    assert!(e.to_string().contains(r#"key "item:42""#), "{e}");

    let mut r = env.redis().await;
    assert_eq!(get(&mut r, "item:042").await, None);
    eventually(
        Duration::from_secs(5),
        "refused leases to be given back",
        || {
            let mut r = r.clone();
            async move { (!exists(&mut r, "{item:042}:pgcache-lease").await).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        reader.get_json("items", 42).await.unwrap(),
        Some(json!({"id": 42, "name": "x", "price": "1.00"}))
    );
}

/// A reader that has read a table notices ALTER TABLE before its next read: the columns it
/// reads and how it encodes them follow the table, for an added column, a retyped one and
/// two columns that swap names (the case only a check of names and positions catches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_follows_alter_table_between_reads() {
    let env = Env::start(
        "CREATE TABLE shifting (id int PRIMARY KEY, a text, b text, n int);",
        "",
    );
    daemon_caught_up(&env).await;
    env.sql("INSERT INTO shifting VALUES (1, 'A', 'B', 7)");
    let config = env.config("[[tables]]\ntable = \"public.shifting\"\nkey = \"shift:{id}\"\n");
    let reader = reader(&config, ReaderOptions::default());
    let table = reader.table("shifting").unwrap();
    let mut r = env.redis().await;
    let mut read = async |expected: Value| {
        del(&mut r, "shift:1").await;
        assert_eq!(table.get_json(1).await.unwrap(), Some(expected.clone()));
        // What was filled is what was returned.
        let cached: Option<String> = redis::cmd("GET")
            .arg("shift:1")
            .query_async(&mut r)
            .await
            .unwrap();
        let cached: Value = serde_json::from_str(&cached.expect("filled")).unwrap();
        assert_eq!(cached, expected);
    };
    read(json!({"id": 1, "a": "A", "b": "B", "n": 7})).await;

    env.sql("ALTER TABLE shifting ADD COLUMN extra text DEFAULT 'x'");
    read(json!({"id": 1, "a": "A", "b": "B", "n": 7, "extra": "x"})).await;

    env.sql("ALTER TABLE shifting ALTER COLUMN n TYPE text USING n::text || '!'");
    read(json!({"id": 1, "a": "A", "b": "B", "n": "7!", "extra": "x"})).await;

    env.sql(
        "ALTER TABLE shifting RENAME COLUMN a TO tmp;
         ALTER TABLE shifting RENAME COLUMN b TO a;
         ALTER TABLE shifting RENAME COLUMN tmp TO b;",
    );
    read(json!({"id": 1, "b": "A", "a": "B", "n": "7!", "extra": "x"})).await;
    let s = table.stats();
    assert_eq!((s.misses, s.fills), (4, 4), "{s:?}");
}
