//! The CDC core end to end: row changes in Postgres become the right keys and values in Redis.

use std::time::Duration;

use serde_json::json;

use crate::common::{get, get_json, keys, wait_backfill_done, wait_for_json, Env, InProcess};

const SCHEMA: &str = "
CREATE TABLE users (id int PRIMARY KEY, username text NOT NULL, email text, created_at timestamptz);
CREATE TABLE orders (tenant_id int, id int, total numeric, note text, PRIMARY KEY (tenant_id, id));
CREATE TABLE sessions (token text PRIMARY KEY, user_id int);
CREATE TABLE profiles (id int PRIMARY KEY, bio text);
";
const TABLES: &str = "public.users,public.orders,public.sessions,public.profiles";
const RULES: &str = r#"
[[tables]]
table = "public.users"
key = "user:profile:{id}"
columns = ["id", "username", "email", "created_at"]

[[tables]]
table = "orders"
key = "tenant:{tenant_id}:order:{id}"
ttl = "1h"

[[tables]]
table = "public.sessions"
key = "session:{token}"
mode = "invalidate"

[[tables]]
table = "public.profiles"
key = "profile:{id}"
mode = "refresh"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_flow_into_redis() {
    let env = Env::start(SCHEMA, TABLES);
    let daemon = InProcess::start(env.config(RULES));
    let mut r = env.redis().await;

    // Insert, including NULLs and a timestamptz.
    env.sql("INSERT INTO users VALUES (1, 'ada', NULL, '2026-01-02 03:04:05.123456+00')");
    wait_for_json(
        &mut r,
        "user:profile:1",
        Some(json!({"id": 1, "username": "ada", "email": null, "created_at": "2026-01-02T03:04:05.123456Z"})),
    )
    .await;

    // Update.
    env.sql("UPDATE users SET email = 'ada@example.com' WHERE id = 1");
    wait_for_json(
        &mut r,
        "user:profile:1",
        Some(json!({"id": 1, "username": "ada", "email": "ada@example.com", "created_at": "2026-01-02T03:04:05.123456Z"})),
    )
    .await;

    // Key-changing update: the old key goes, the new one appears.
    env.sql("UPDATE users SET id = 2 WHERE id = 1");
    wait_for_json(&mut r, "user:profile:2", Some(json!({"id": 2, "username": "ada", "email": "ada@example.com", "created_at": "2026-01-02T03:04:05.123456Z"}))).await;
    assert_eq!(
        get(&mut r, "user:profile:1").await,
        None,
        "old key must be deleted"
    );

    // Delete.
    env.sql("DELETE FROM users WHERE id = 2");
    wait_for_json(&mut r, "user:profile:2", None).await;

    // Multi-statement, multi-table transaction with a composite key and numeric as string.
    env.sql(
        "BEGIN;
         INSERT INTO users VALUES (10, 'bob', 'bob@example.com', NULL);
         INSERT INTO orders VALUES (7, 1, 12.50, 'first');
         INSERT INTO orders VALUES (7, 2, 3.10, NULL);
         UPDATE users SET username = 'bobby' WHERE id = 10;
         COMMIT;",
    );
    wait_for_json(
        &mut r,
        "tenant:7:order:2",
        Some(json!({"tenant_id": 7, "id": 2, "total": "3.10", "note": null})),
    )
    .await;
    assert_eq!(
        get_json(&mut r, "tenant:7:order:1").await,
        Some(json!({"tenant_id": 7, "id": 1, "total": "12.50", "note": "first"}))
    );
    assert_eq!(
        get_json(&mut r, "user:profile:10").await.unwrap()["username"],
        "bobby"
    );

    // TTL on the orders rule.
    let ttl: i64 = redis::cmd("PTTL")
        .arg("tenant:7:order:1")
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(
        ttl > 3_500_000 && ttl <= 3_600_000,
        "orders carry the 1h TTL, got {ttl} ms"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg("user:profile:10")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(ttl, -1, "users have no TTL");

    // TRUNCATE removes only that table's keys.
    env.sql("TRUNCATE orders");
    crate::common::eventually(Duration::from_secs(20), "orders keys to go", || {
        let mut r = r.clone();
        async move { keys(&mut r, "tenant:*").await.is_empty().then_some(()) }
    })
    .await;
    assert!(
        get(&mut r, "user:profile:10").await.is_some(),
        "other tables keep their keys"
    );

    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_invalidate_and_refresh() {
    let env = Env::start(SCHEMA, TABLES);
    let daemon = InProcess::start(env.config(RULES));
    let mut r = env.redis().await;

    // invalidate: the application caches its own value; any change deletes it.
    let _: () = redis::cmd("SET")
        .arg("session:abc")
        .arg(r#"{"built":"by the app"}"#)
        .query_async(&mut r)
        .await
        .unwrap();
    env.sql("INSERT INTO sessions VALUES ('abc', 1)");
    wait_for_json(&mut r, "session:abc", None).await;
    env.sql("UPDATE sessions SET user_id = 2");
    assert_eq!(
        get(&mut r, "session:abc").await,
        None,
        "invalidate never writes a value"
    );

    // refresh: keys not cached stay absent; cached keys are updated and keep their TTL.
    env.sql("INSERT INTO profiles VALUES (1, 'one'), (2, 'two')");
    let _: () = redis::cmd("SET")
        .arg("profile:2")
        .arg("{}")
        .arg("EX")
        .arg(600)
        .query_async(&mut r)
        .await
        .unwrap();
    env.sql("UPDATE profiles SET bio = bio || '!'");
    wait_for_json(&mut r, "profile:2", Some(json!({"id": 2, "bio": "two!"}))).await;
    assert_eq!(
        get(&mut r, "profile:1").await,
        None,
        "refresh does not add uncached keys"
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg("profile:2")
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(ttl > 590, "refresh keeps the TTL, got {ttl}");
    env.sql("DELETE FROM profiles WHERE id = 2");
    wait_for_json(&mut r, "profile:2", None).await;

    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_values_are_escaped() {
    let env = Env::start(
        "CREATE TABLE docs (a text, b text, body text, PRIMARY KEY (a, b));",
        "public.docs",
    );
    let daemon =
        InProcess::start(env.config("[[tables]]\ntable = \"docs\"\nkey = \"doc:{a}:{b}\"\n"));
    let mut r = env.redis().await;
    env.sql(
        "INSERT INTO docs VALUES ('x:y', '{tag}', 'colon and braces'), ('with space', 'ünï', 'spaces and non-ASCII'),
                                 ('x', 'y:{tag}', 'must not collide with the first')",
    );
    crate::common::eventually(Duration::from_secs(20), "three doc keys", || {
        let mut r = r.clone();
        async move { (keys(&mut r, "doc:*").await.len() == 3).then_some(()) }
    })
    .await;
    let all = keys(&mut r, "doc:*").await;
    for key in &all {
        // Exactly the two template separators, and no hash tag a value could have forged.
        assert_eq!(key.matches(':').count(), 2, "{key}");
        assert!(!key.contains('{') && !key.contains('}'), "{key}");
    }
    let first = pgcache::template::KeyTemplate::parse("doc:{a}:{b}").unwrap();
    let key = first.render("", &[b"x:y", b"{tag}"]);
    assert_eq!(
        get_json(&mut r, &key).await.unwrap()["body"],
        "colon and braces"
    );
    let key = first.render("", &["with space".as_bytes(), "ünï".as_bytes()]);
    assert!(key.contains("ünï"), "non-ASCII stays readable: {key}");
    assert_eq!(
        get_json(&mut r, &key).await.unwrap()["body"],
        "spaces and non-ASCII"
    );
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toasted_unchanged_columns_are_merged_or_deleted() {
    let env = Env::start(
        "CREATE TABLE blobs (id int PRIMARY KEY, big text, n int);",
        "public.blobs",
    );
    let daemon =
        InProcess::start(env.config("[[tables]]\ntable = \"blobs\"\nkey = \"blob:{id}\"\n"));
    let mut r = env.redis().await;
    // A value that is TOASTed out of line (incompressible, > 2 kB).
    env.sql(
        "INSERT INTO blobs SELECT 1, string_agg(md5(i::text), ''), 0 FROM generate_series(1, 400) i;
         INSERT INTO blobs SELECT 2, string_agg(md5(i::text), ''), 0 FROM generate_series(1, 400) i;",
    );
    let big = env.sql("SELECT big FROM blobs WHERE id = 1");
    wait_for_json(&mut r, "blob:2", Some(json!({"id": 2, "big": big, "n": 0}))).await;
    // The table's first backfill runs beside the stream and may write key 2 again (the
    // current row, rightly); past it, only the stream writes.
    wait_backfill_done(&mut r, "public.blobs", Duration::from_secs(60)).await;
    // Key 2 drops out of the cache; an update that leaves `big` untouched must then delete
    // (never guess) key 2 and read its row again, and merge the cached value for key 1.
    let _: () = redis::cmd("DEL")
        .arg("blob:2")
        .query_async(&mut r)
        .await
        .unwrap();
    env.sql("UPDATE blobs SET n = n + 1");
    wait_for_json(&mut r, "blob:1", Some(json!({"id": 1, "big": big, "n": 1}))).await;
    wait_for_json(&mut r, "blob:2", Some(json!({"id": 2, "big": big, "n": 1}))).await;
    // The repair is done: nothing waits in the checkpoint.
    let pending: Vec<String> = redis::cmd("HKEYS")
        .arg("pgcache:{pgcache}:checkpoint")
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(
        !pending.iter().any(|f| f.starts_with("repair:")),
        "{pending:?}"
    );
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_are_atomic_in_redis() {
    let env = Env::start(
        "CREATE TABLE pairs (id int PRIMARY KEY, v int);",
        "public.pairs",
    );
    env.sql("INSERT INTO pairs VALUES (1, 0), (2, 0)");
    let daemon =
        InProcess::start(env.config("[[tables]]\ntable = \"pairs\"\nkey = \"pair:{id}\"\n"));
    let mut r = env.redis().await;
    wait_for_json(&mut r, "pair:2", Some(json!({"id": 2, "v": 0}))).await;

    let observer = {
        let mut r = r.clone();
        tokio::spawn(async move {
            let mut seen = 0u64;
            loop {
                let (a, b): (Option<String>, Option<String>) = redis::cmd("MGET")
                    .arg("pair:1")
                    .arg("pair:2")
                    .query_async(&mut r)
                    .await
                    .unwrap();
                let v = |s: Option<String>| {
                    serde_json::from_str::<serde_json::Value>(&s.unwrap()).unwrap()["v"]
                        .as_i64()
                        .unwrap()
                };
                let (a, b) = (v(a), v(b));
                assert_eq!(a, b, "saw one row of a transaction without the other");
                seen += 1;
                if a == 300 {
                    return seen;
                }
            }
        })
    };
    let writer = tokio::task::spawn_blocking({
        let url = env.pg.url(crate::common::DB);
        move || {
            let mut sql = String::new();
            for i in 1..=300 {
                sql.push_str(&format!("BEGIN; UPDATE pairs SET v = {i} WHERE id = 1; UPDATE pairs SET v = {i} WHERE id = 2; COMMIT;\n"));
            }
            let status =
                std::process::Command::new(pgcache::testkit::TestPostgres::bin("psql").unwrap())
                    .args(["-X", "-q", "-d", &url, "-c", &sql])
                    .status()
                    .unwrap();
            assert!(status.success());
        }
    });
    writer.await.unwrap();
    let polls = tokio::time::timeout(Duration::from_secs(30), observer)
        .await
        .expect("observer saw the end")
        .unwrap();
    assert!(
        polls > 10,
        "the observer polled during the stream ({polls} polls)"
    );
    daemon.stop().await.expect("clean stop");
}
