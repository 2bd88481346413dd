//! What the reader does without servers: building, naming tables and keys, and failing
//! cleanly when both servers are down. The protocol itself is tested against real servers
//! in `tests/it/reader.rs`.

use std::time::{Duration, Instant};

use super::*;

/// Nothing listens on port 1, so connections are refused at once.
const NO_POSTGRES: &str = "postgres://app@127.0.0.1:1/app?sslmode=disable";
const NO_REDIS: &str = "redis://127.0.0.1:1";

fn reader() -> Reader {
    Reader::builder(NO_POSTGRES, NO_REDIS)
        .key_prefix("app:")
        .table("public.users", "user:{id}")
        .table("shop.orders", "order:{tenant}:{id}")
        .table("shop.users", "shopuser:{id}")
        .table("audit", "audit:{id}")
        .options(
            ReaderOptions::default()
                .redis_timeout(Duration::from_millis(500))
                .postgres_timeout(Duration::from_secs(2)),
        )
        .build()
        .unwrap()
}

#[tokio::test]
async fn tables_and_keys_are_named_like_the_daemon() {
    let reader = reader();
    let users = reader.table("public.users").unwrap();
    assert_eq!(users.name(), "public.users");
    assert_eq!(users.key(42).unwrap(), "app:user:42");
    assert_eq!(users.key("7").unwrap(), "app:user:7");
    let orders = reader.table("orders").unwrap();
    assert_eq!(orders.key(("a:b", 7)).unwrap(), "app:order:a%3Ab:7");
    assert_eq!(reader.table("audit").unwrap().name(), "public.audit");

    let e = users.key(("a", 1)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "public.users: key template \"user:{id}\" takes 1 value(s) (id), got 2"
    );
    let e = orders.key(7).unwrap_err();
    assert!(
        matches!(
            e,
            ReaderError::KeyArity {
                expected: 2,
                got: 1,
                ..
            }
        ),
        "{e}"
    );

    let e = reader.table("nope").err().unwrap();
    assert!(matches!(e, ReaderError::UnknownTable { .. }), "{e}");
    assert!(e.to_string().contains("public.users, shop.orders"), "{e}");
    let e = reader.table("users").err().unwrap();
    assert!(matches!(e, ReaderError::AmbiguousTable { .. }), "{e}");
    assert!(e.to_string().contains("public.users, shop.users"), "{e}");
}

#[tokio::test]
async fn both_servers_down_is_an_error_not_a_hang() {
    let reader = reader();
    let started = Instant::now();
    let e = reader.get_json("public.users", 1).await.unwrap_err();
    assert!(matches!(e, ReaderError::PostgresUnavailable { .. }), "{e}");
    assert!(e.is_unavailable());
    // The cause, not only the pool's "Error occurred while creating a new object".
    assert!(
        e.to_string().starts_with(
            "public.users: cannot get a Postgres connection: error connecting to server: \
             Connection refused"
        ),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let s = reader.stats();
    assert_eq!((s.hits, s.misses, s.fallbacks, s.db_reads), (0, 1, 1, 1));

    let e = reader
        .get_many::<serde_json::Value, _>("public.users", [1, 2])
        .await
        .unwrap_err();
    assert!(matches!(e, ReaderError::PostgresUnavailable { .. }), "{e}");
    assert_eq!(reader.stats().misses, 3);
    // The lease API has no fallback: it reports Redis.
    let e = reader
        .table("public.users")
        .unwrap()
        .lease(1)
        .await
        .unwrap_err();
    assert!(matches!(e, ReaderError::Redis { .. }), "{e}");
}

#[tokio::test]
async fn bad_settings_are_named() {
    let e = Reader::builder(NO_POSTGRES, NO_REDIS)
        .table("t", "{id}")
        .build()
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("table t: key template \"{id}\""),
        "{e}"
    );
    let e = Reader::builder(NO_POSTGRES, NO_REDIS)
        .table("t", "t:{id}")
        .table("public.t", "u:{id}")
        .build()
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("public.t is configured twice"),
        "{e}"
    );
    let e = Reader::builder(NO_POSTGRES, NO_REDIS)
        .options(ReaderOptions::default().early_refresh_beta(Some(f64::NAN)))
        .build()
        .err()
        .unwrap();
    assert!(e.to_string().contains("early_refresh_beta"), "{e}");
    let e = Reader::builder("postgres://127.0.0.1/db?sslmode=sometimes", NO_REDIS)
        .build()
        .err()
        .unwrap();
    assert!(
        e.to_string().starts_with("invalid Postgres settings"),
        "{e}"
    );
    let e = Reader::builder(NO_POSTGRES, "http://nope")
        .build()
        .err()
        .unwrap();
    assert!(e.to_string().starts_with("invalid Redis settings"), "{e}");
}

/// Tables stored as hashes are served by every call, the lease API included (issue 14): with
/// no Redis, the lease fails for want of Redis, not because of the table's format.
#[tokio::test]
async fn hash_tables_are_served_by_the_lease_api_too() {
    let rule = TableRule {
        schema: "public".to_string(),
        name: "h".to_string(),
        key: crate::template::KeyTemplate::parse("h:{id}").unwrap(),
        columns: None,
        mode: crate::config::Mode::Mirror,
        ttl: None,
        format: Format::Hash,
        encode: crate::encoder::EncodeOptions::default(),
        invalidate: Vec::new(),
    };
    let reader = Reader::builder(NO_POSTGRES, NO_REDIS)
        .rule(rule)
        .build()
        .unwrap();
    let table = reader.table("public.h").unwrap();
    let e = table.lease(1).await.err().unwrap();
    assert!(matches!(e, ReaderError::Redis { .. }), "{e}");
}

/// What `build` and lookups need of the runtime: a current-thread runtime with only I/O and
/// time enabled is enough (the README and rustdoc say so).
#[test]
fn a_current_thread_runtime_with_io_and_time_is_enough() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let reader = reader();
        let e = reader.get_json("public.users", 1).await.unwrap_err();
        assert!(matches!(e, ReaderError::PostgresUnavailable { .. }), "{e}");
        let s = reader.stats();
        assert_eq!((s.misses, s.fallbacks), (1, 1), "{s:?}");
    });
}

#[tokio::test]
async fn debug_names_tables_and_options_but_no_urls() {
    let builder = Reader::builder("postgres://app:hunter2@127.0.0.1:1/app", NO_REDIS)
        .key_prefix("app:")
        .table("public.users", "user:{id}");
    let text = format!("{builder:?}");
    assert!(
        text.contains("public.users") && text.contains("app:"),
        "{text}"
    );
    assert!(
        !text.contains("hunter2") && !text.contains("127.0.0.1"),
        "{text}"
    );
    let reader = builder.build().unwrap();
    let text = format!("{reader:?}");
    assert!(
        text.contains("public.users") && text.contains("redis_timeout"),
        "{text}"
    );
    assert!(
        !text.contains("hunter2") && !text.contains("127.0.0.1"),
        "{text}"
    );
    let table = reader.table("users").unwrap();
    assert_eq!(
        format!("{table:?}"),
        r#"Table { name: "public.users", key: "user:{id}", key_prefix: "app:", .. }"#
    );
}

#[test]
fn building_needs_a_runtime() {
    let e = Reader::builder(NO_POSTGRES, NO_REDIS)
        .build()
        .err()
        .unwrap();
    assert!(e.to_string().contains("Tokio runtime"), "{e}");
}

/// Compile-time check: lookups can be spawned on a multi-threaded runtime.
#[allow(dead_code)]
fn lookups_are_send(reader: &Reader, table: &Table) {
    fn send<T: Send>(_: &T) {}
    send(&reader.get_json("t", 1));
    send(&reader.get_many::<serde_json::Value, _>("t", [1, 2]));
    send(&table.get_raw(("a", 1)));
    send(&table.lookup::<serde_json::Value>(1));
    send(&reader.lookup::<serde_json::Value>("t", 1));
    send(&table.lease(1));
}
