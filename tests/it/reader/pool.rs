//! A Postgres pool the application gives the reader: used when its connections print values
//! as the daemon's do, refused (and nothing filled) when they do not.

use std::time::Duration;

use pgcache::deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use pgcache::reader::ReaderError;
use pgcache::tokio_postgres::{Config as PgConfig, NoTls};
use serde_json::json;

use super::*;
use crate::common::{get, wait_backfill_done, InProcess, DB};

const SCHEMA: &str = "
CREATE TABLE events (id int PRIMARY KEY, at timestamptz NOT NULL);
INSERT INTO events VALUES (1, '2026-01-02 03:04:05+00');
";
const RULES: &str = "[[tables]]\ntable = \"public.events\"\nkey = \"event:{id}\"\n";

fn app_pool(env: &Env, options: &str) -> Pool {
    let mut config: PgConfig = env.pg.url(DB).parse().unwrap();
    config.options(options);
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager).max_size(4).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_pool_is_used_only_with_the_daemons_settings() {
    let env = Env::start(SCHEMA, "public.events");
    let config = env.config(RULES);
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;
    wait_backfill_done(&mut r, "public.events", Duration::from_secs(60)).await;
    let daemons_value = get(&mut r, "event:1").await.expect("the daemon's value");
    let (pg, redis_url) = (env.pg.url(DB), env.redis.url());

    // Another TimeZone would print `at` differently: refused, nothing cached.
    let wrong = Reader::builder(&pg, &redis_url)
        .table("public.events", "event:{id}")
        .postgres_pool(app_pool(&env, "-c TimeZone=Europe/Paris"))
        .build()
        .unwrap();
    del(&mut r, "event:1").await;
    let error = wrong.get_json("public.events", 1).await.unwrap_err();
    assert!(
        matches!(&error, ReaderError::Options(m) if m.contains("TimeZone") && m.contains("Europe/Paris")),
        "{error}"
    );
    assert_eq!(get(&mut r, "event:1").await, None, "nothing was filled");

    // With the daemon's settings: read, filled, byte for byte the daemon's value.
    let right = Reader::builder(&pg, &redis_url)
        .table("public.events", "event:{id}")
        .postgres_pool(app_pool(&env, &pgcache::pgconn::session_options()))
        .build()
        .unwrap();
    let row = right.get_json("public.events", 1).await.unwrap();
    assert_eq!(row, Some(json!({"id": 1, "at": "2026-01-02T03:04:05Z"})));
    assert_eq!(
        get(&mut r, "event:1").await.as_deref(),
        Some(&*daemons_value)
    );
    assert_eq!(right.stats().fills, 1);
    daemon.stop().await.unwrap();
}
