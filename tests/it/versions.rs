//! What changed between the Postgres versions pgcache supports, tested on whichever version
//! the harness runs (`PGCACHE_PG_BINDIR`; `.ci/run` runs this on 15 and on 18).

use std::time::Duration;

use pgcache::reader::ReaderOptions;
use pgcache::Reader;
use serde_json::json;

use crate::common::{get, pgcache, wait_backfill_done, wait_for_json, Env, InProcess};

/// `server_version_num`, e.g. 150020 or 180006.
fn server_version_num(env: &Env) -> u32 {
    env.sql("SHOW server_version_num")
        .parse()
        .expect("server_version_num is a number")
}

/// Generated columns are never in a value: pgoutput does not send them, so the backfill and
/// the reader leave them out too. Postgres 18 added virtual generated columns and made them
/// the default (`GENERATED ALWAYS AS (...)` without `STORED`); they must be left out the
/// same way, and `verify` must agree. Postgres 18 can also publish stored generated
/// columns, which `check` refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_columns_stored_and_virtual_are_left_out() {
    let env = Env::start("", "");
    let pg18 = server_version_num(&env) >= 180_000;
    let virtual_column = if pg18 {
        ", tripled int GENERATED ALWAYS AS (a * 3)"
    } else {
        ""
    };
    env.sql(&format!(
        "CREATE TABLE gen (id int PRIMARY KEY, a int, \
         doubled int GENERATED ALWAYS AS (a * 2) STORED{virtual_column}, b text);
         INSERT INTO gen (id, a, b) VALUES (1, 1, 'backfilled');"
    ));
    let setup = || {
        env.run_sql_file(
            "sql/setup.sql",
            &[
                ("role", "pgcache"),
                ("password", "pgcache-secret"),
                ("publication", "pgcache"),
                ("slot", "pgcache"),
                ("tables", "public.gen"),
            ],
        )
    };
    setup();
    let rules = "[[tables]]\ntable = \"public.gen\"\nkey = \"gen:{id}\"\n";
    let config = env.config(rules);
    let config_path = env.write_config(rules).display().to_string();
    let check = || {
        let path = config_path.clone();
        async move {
            tokio::task::spawn_blocking(move || pgcache(&["check", "--config", &path]))
                .await
                .expect("check ran")
        }
    };
    if pg18 {
        // Postgres 18 can publish stored generated columns; `check` (and so `run`) refuses
        // that, and running the setup script again turns it off.
        env.sql("ALTER PUBLICATION pgcache SET (publish_generated_columns = stored)");
        let (code, out, err) = check().await;
        assert_eq!(
            code, 1,
            "check passed a publication with generated columns:\n{out}{err}"
        );
        assert!(
            out.contains("publishes stored generated columns")
                && out.contains("public.gen")
                && out.contains("SET (publish_generated_columns = none)"),
            "{out}"
        );
        setup();
    }
    let (code, out, err) = check().await;
    assert_eq!(code, 0, "check:\n{out}{err}");
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;

    wait_backfill_done(&mut r, "public.gen", Duration::from_secs(30)).await;
    wait_for_json(
        &mut r,
        "gen:1",
        Some(json!({"id": 1, "a": 1, "b": "backfilled"})),
    )
    .await;
    env.sql(
        "INSERT INTO gen (id, a, b) VALUES (2, 2, 'streamed');
         UPDATE gen SET a = 10 WHERE id = 1;",
    );
    wait_for_json(
        &mut r,
        "gen:2",
        Some(json!({"id": 2, "a": 2, "b": "streamed"})),
    )
    .await;
    wait_for_json(
        &mut r,
        "gen:1",
        Some(json!({"id": 1, "a": 10, "b": "backfilled"})),
    )
    .await;

    let path = config_path.clone();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || pgcache(&["verify", "--config", &path]))
            .await
            .expect("verify ran");
    assert_eq!(code, 0, "verify found drift:\n{out}\n{err}");

    daemon.stop().await.expect("daemon stops cleanly");
    let from_daemon = get(&mut r, "gen:2").await.expect("gen:2 is cached");
    let _: () = redis::cmd("DEL")
        .arg("gen:2")
        .query_async(&mut r)
        .await
        .expect("DEL");
    let reader = Reader::from_config_with(&config, ReaderOptions::default()).expect("reader");
    let filled = reader
        .table("public.gen")
        .expect("table")
        .get_raw(2)
        .await
        .expect("read")
        .expect("row 2 exists");
    assert_eq!(String::from_utf8_lossy(&filled), from_daemon);
}
