//! The whole change stream, without the backfill: every type the encoder knows, byte for byte
//! against the read helper; schema changes while the daemon streams; partitioned tables; and a
//! transaction of a million rows in bounded memory (G8, in `memory`).

mod memory;

use std::time::{Duration, Instant};

use base64::Engine as _;
use pgcache::Reader;
use serde_json::{json, Value};

use crate::common::{
    eventually, get, get_json, keys, wait_backfill_done, wait_for_json, Daemon, Env, InProcess, DB,
};

/// Role, publication and slot for `tables`, as `Env::start` does after its schema.
fn publish(env: &Env, tables: &str) {
    env.run_sql_file(
        "sql/setup.sql",
        &[
            ("role", "pgcache"),
            ("password", "pgcache-secret"),
            ("publication", "pgcache"),
            ("slot", "pgcache"),
            ("tables", tables),
        ],
    );
}

/// Waits until `key` holds something, and returns it.
async fn wait_for_value(r: &redis::aio::MultiplexedConnection, key: &str) -> String {
    eventually(Duration::from_secs(30), key, || {
        let mut r = r.clone();
        async move { get(&mut r, key).await }
    })
    .await
}

/// Waits until `key` holds exactly these bytes (or is absent, for `None`).
async fn wait_for_exact(
    r: &mut redis::aio::MultiplexedConnection,
    key: &str,
    expected: Option<&str>,
) {
    let limit = Duration::from_secs(30);
    let deadline = Instant::now() + limit;
    loop {
        let now = get(r, key).await;
        if now.as_deref() == expected {
            return;
        }
        if Instant::now() > deadline {
            panic!("{key}: expected {expected:?}, still {now:?} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn del(r: &mut redis::aio::MultiplexedConnection, key: &str) {
    let _: i64 = redis::cmd("DEL")
        .arg(key)
        .query_async(r)
        .await
        .expect("DEL");
}

/// Reads `table`'s rows `ids` through a fresh [`Reader`] after deleting their keys, so the
/// reader reads Postgres and fills; each value it returns, and each value it filled, must
/// equal the daemon's bytes in `from_daemon`.
async fn assert_reader_matches(
    env: &Env,
    config: &pgcache::config::Config,
    table: &str,
    prefix: &str,
    from_daemon: &[(i32, String)],
) {
    let mut r = evict(env, prefix, from_daemon).await;
    let reader = Reader::from_config(config).expect("reader");
    let table = reader.table(table).expect("table");
    for (id, daemon_value) in from_daemon {
        let key = format!("{prefix}{id}");
        let raw = table
            .get_raw(*id)
            .await
            .unwrap_or_else(|e| panic!("{key}: reader failed: {e}"))
            .unwrap_or_else(|| panic!("{key}: reader found no row"));
        let reader_value = String::from_utf8(raw.to_vec()).expect("reader returns UTF-8");
        assert!(
            &reader_value == daemon_value,
            "{key}: the reader's value differs from the daemon's\n reader {}\n daemon {}",
            shorten(&reader_value),
            shorten(daemon_value)
        );
        let filled = get(&mut r, &key).await;
        assert!(
            filled.as_ref() == Some(daemon_value),
            "{key}: the reader filled {:?}, the daemon wrote {}",
            filled.as_deref().map(shorten),
            shorten(daemon_value)
        );
    }
    assert_eq!(
        reader.stats().fills,
        from_daemon.len() as u64,
        "one fill per key read"
    );
}

/// Values of a megabyte make unreadable assertion messages.
fn shorten(text: &str) -> String {
    if text.len() <= 2000 {
        return text.to_string();
    }
    let mut cut = 2000;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}... ({} bytes)", &text[..cut], text.len())
}

fn assert_contains(value: &str, part: &str) {
    assert!(
        value.contains(part),
        "expected {part:?} in {}",
        shorten(value)
    );
}

const MATRIX: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE matrix (
  id int PRIMARY KEY,
  i2 int2, i4 int4, i8 int8, o oid,
  f4 float4, f8 float8,
  n numeric, n2 numeric(10,2),
  b bool,
  t text, vc varchar(10), ch char(5), nm name, u uuid, m mood, ci citext,
  ip inet, net cidr, mac macaddr,
  j json, jb jsonb,
  tstz timestamptz, ts timestamp, d date, tm time, ttz timetz, iv interval,
  by bytea,
  ia int4[], ta text[], ia2 int4[], tsa timestamptz[], na numeric[], ba bytea[], jba jsonb[],
  p posint
);
CREATE TABLE matrix_num (id int PRIMARY KEY, n numeric, n2 numeric(10,2), na numeric[], f8 float8);
"#;

const MATRIX_RULES: &str = r#"
[[tables]]
table = "public.matrix"
key = "matrix:{id}"

[[tables]]
table = "public.matrix_num"
key = "mnum:{id}"
numeric = "number"
"#;

/// Rows 1 to 6 of `matrix`: typical values, float specials, all NULL, a megabyte of text and
/// of bytea, non-ASCII text.
const MATRIX_ROWS: &str = r#"
INSERT INTO matrix VALUES (1,
  -32768, 2147483647, -9223372036854775808, 4294967295,
  1.1, 1e-7,
  12.50, 3,
  true,
  E'quote " back \\ nl \n tab \t cr \r bell \007 esc \033 del \177 it''s é ☃ 𝄞', 'short', 'ab', 'a name',
  'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', 'happy', 'MiXeD Case',
  '10.0.0.1', '10.0.0.0/8', '08-00-2B-01-02-03',
  '{"a": [1, 2.50, null], "s": "x\"y"}', '{"b": {"c": "d"}, "a": 1}',
  '2026-01-02 03:04:05.123456+00', '2026-01-02 03:04:05', '2026-01-02', '03:04:05.5', '03:04:05.25+02',
  '1 year 2 months 3 days 4 hours 5 minutes 6 seconds',
  '\x00ff10',
  '{1,NULL,3}',
  ARRAY['a b', 'c,d', NULL, 'NULL', '{brace}', 'quote"q', E'back\\slash', '', ' lead', 'null'],
  '{{1,2},{3,4}}',
  ARRAY['2026-01-02 03:04:05+00', '2026-06-30 23:59:59.999999-05', NULL]::timestamptz[],
  '{1.50,NaN,-0.001}',
  ARRAY['\x0102'::bytea, NULL, ''::bytea],
  ARRAY['{"k": [1, "v"]}'::jsonb, 'null'::jsonb, NULL],
  7);
INSERT INTO matrix (id, f4, f8, n) VALUES (2, 'NaN', 'Infinity', 'NaN');
INSERT INTO matrix (id, f4, f8, n) VALUES (3, '-Infinity', '-Infinity', '-0.000001');
INSERT INTO matrix (id) VALUES (4);
INSERT INTO matrix (id, t, by)
  SELECT 5,
         (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 32768) i),
         (SELECT decode(string_agg(md5(i::text), ''), 'hex') FROM generate_series(1, 65536) i);
INSERT INTO matrix (id, t, vc, ch, nm, ci, ip, ta, tstz, f8) VALUES (6,
  'héllo wörld ☃ 日本語 😀', 'ünïcödé', 'é', 'naïve', 'ÄÖÜ straße', '192.168.0.1/24',
  ARRAY['日本', 'é,è', '"', E'\\'], '2026-01-02 03:04:05+02', '-0');
INSERT INTO matrix_num VALUES (1, 12.50, 3, '{1.50,NaN,-0.001}', 0.1),
                              (2, 'NaN', NULL, NULL, 'NaN'),
                              (3, 123456789012345678901234567890.123456789, -0.5, '{}', NULL);
"#;

/// Every type of the encoding table (PROTOCOL.md, "Encoding table") goes through the stream,
/// and the read helper produces the same bytes for the same rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_matrix_stream_backfill_and_reader_are_byte_identical() {
    let env = Env::start("", "");
    if let Err(e) = env.pg.psql(DB, "CREATE EXTENSION IF NOT EXISTS citext;") {
        panic!(
            "the citext extension is missing from this Postgres ({e:#}); install \
             postgresql-contrib (Debian: apt-get install postgresql-contrib) and run again"
        );
    }
    env.sql(MATRIX);
    publish(&env, "public.matrix,public.matrix_num");
    let config = env.config(MATRIX_RULES);
    let daemon = InProcess::start(config.clone());
    let r = env.redis().await;

    // A first row proves the daemon streams, so the rows below come through the stream.
    env.sql("INSERT INTO matrix (id, i4) VALUES (0, 0)");
    let zero = wait_for_value(&r, "matrix:0").await;
    env.sql(MATRIX_ROWS);

    let mut from_daemon = vec![(0, zero)];
    for id in 1..=6 {
        from_daemon.push((id, wait_for_value(&r, &format!("matrix:{id}")).await));
    }
    let mut from_daemon_num = Vec::new();
    for id in 1..=3 {
        from_daemon_num.push((id, wait_for_value(&r, &format!("mnum:{id}")).await));
    }
    let value = |id: usize| -> Value {
        serde_json::from_str(&from_daemon[id].1).unwrap_or_else(|e| {
            panic!(
                "matrix:{id} is not JSON ({e}): {}",
                shorten(&from_daemon[id].1)
            )
        })
    };

    // Row 1, exact bytes where the encoding is the point.
    let one = &from_daemon[1].1;
    for part in [
        r#""i8":-9223372036854775808"#,
        r#""o":4294967295"#,
        r#""f4":1.1,"#,
        r#""f8":1e-07,"#,
        r#""n":"12.50""#,
        r#""n2":"3.00""#,
        r#""ch":"ab   ""#,
        r#""nm":"a name""#,
        r#""u":"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11""#,
        r#""ip":"10.0.0.1""#,
        r#""mac":"08:00:2b:01:02:03""#,
        r#""j":{"a": [1, 2.50, null], "s": "x\"y"}"#,
        r#""jb":{"a": 1, "b": {"c": "d"}}"#,
        r#""tstz":"2026-01-02T03:04:05.123456Z""#,
        r#""ts":"2026-01-02T03:04:05""#,
        r#""iv":"P1Y2M3DT4H5M6S""#,
        r#""by":"AP8Q""#,
        r#""ia2":[[1,2],[3,4]]"#,
        r#""na":["1.50","NaN","-0.001"]"#,
        r#""ba":["AQI=",null,""]"#,
        r#"bell \u0007 esc \u001b del "#,
    ] {
        assert_contains(one, part);
    }
    let expected = [
        ("id", json!(1)),
        ("i2", json!(-32768)),
        ("i4", json!(2147483647)),
        ("i8", json!(-9223372036854775808i64)),
        ("o", json!(4294967295u64)),
        ("f4", json!(1.1)),
        ("f8", json!(1e-7)),
        ("n", json!("12.50")),
        ("n2", json!("3.00")),
        ("b", json!(true)),
        (
            "t",
            json!(
                "quote \" back \\ nl \n tab \t cr \r bell \u{7} esc \u{1b} del \u{7f} it's é ☃ 𝄞"
            ),
        ),
        ("vc", json!("short")),
        ("ch", json!("ab   ")),
        ("nm", json!("a name")),
        ("u", json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
        ("m", json!("happy")),
        ("ci", json!("MiXeD Case")),
        ("ip", json!("10.0.0.1")),
        ("net", json!("10.0.0.0/8")),
        ("mac", json!("08:00:2b:01:02:03")),
        ("j", json!({"a": [1, 2.5, null], "s": "x\"y"})),
        ("jb", json!({"a": 1, "b": {"c": "d"}})),
        ("tstz", json!("2026-01-02T03:04:05.123456Z")),
        ("ts", json!("2026-01-02T03:04:05")),
        ("d", json!("2026-01-02")),
        ("tm", json!("03:04:05.5")),
        ("ttz", json!("03:04:05.25+02")),
        ("iv", json!("P1Y2M3DT4H5M6S")),
        ("by", json!("AP8Q")),
        ("ia", json!([1, null, 3])),
        (
            "ta",
            json!([
                "a b",
                "c,d",
                null,
                "NULL",
                "{brace}",
                "quote\"q",
                "back\\slash",
                "",
                " lead",
                "null"
            ]),
        ),
        ("ia2", json!([[1, 2], [3, 4]])),
        (
            "tsa",
            json!(["2026-01-02T03:04:05Z", "2026-07-01T04:59:59.999999Z", null]),
        ),
        ("na", json!(["1.50", "NaN", "-0.001"])),
        ("ba", json!(["AQI=", null, ""])),
        ("jba", json!([{"k": [1, "v"]}, null, null])),
        ("p", json!(7)),
    ];
    let got = value(1);
    let got = got.as_object().expect("an object");
    let mut columns: Vec<&str> = got.keys().map(String::as_str).collect();
    let mut names: Vec<&str> = expected.iter().map(|(c, _)| *c).collect();
    columns.sort_unstable();
    names.sort_unstable();
    assert_eq!(columns, names, "matrix:1 columns");
    assert!(
        one.starts_with(r#"{"id":1,"i2":-32768,"i4":2147483647,"#) && one.ends_with(r#","p":7}"#),
        "matrix:1 columns in table order: {}",
        shorten(one)
    );
    for (column, want) in &expected {
        assert_eq!(&got[*column], want, "matrix:1 column {column}");
    }
    // Float specials are strings; numeric stays exact.
    assert_contains(&from_daemon[2].1, r#""f4":"NaN","f8":"Infinity","n":"NaN""#);
    assert_contains(
        &from_daemon[3].1,
        r#""f4":"-Infinity","f8":"-Infinity","n":"-0.000001""#,
    );
    // All NULL but the key.
    let four = value(4);
    let object = four.as_object().expect("an object");
    assert_eq!(object.len(), 37, "every column is present: {four}");
    for (column, v) in object {
        if column != "id" {
            assert_eq!(v, &Value::Null, "matrix:4 column {column}");
        }
    }
    // A megabyte of text and of bytea, equal to the database's.
    let client = env.pg_client().await;
    let row = client
        .query_one("SELECT t, by FROM matrix WHERE id = 5", &[])
        .await
        .unwrap();
    let (text, bytes): (String, Vec<u8>) = (row.get(0), row.get(1));
    assert_eq!(text.len(), 1 << 20);
    assert_eq!(bytes.len(), 1 << 20);
    let five = value(5);
    assert!(
        five["t"].as_str() == Some(text.as_str()),
        "matrix:5 text differs"
    );
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(five["by"].as_str().expect("bytea is a base64 string"))
        .expect("valid base64");
    assert!(decoded == bytes, "matrix:5 bytea differs");
    // Non-ASCII: char(n) pads by characters, not bytes.
    let six = value(6);
    assert_eq!(six["t"], "héllo wörld ☃ 日本語 😀");
    assert_eq!(six["vc"], "ünïcödé");
    assert_eq!(six["ch"], "é    ");
    assert_eq!(six["nm"], "naïve");
    assert_eq!(six["ci"], "ÄÖÜ straße");
    assert_eq!(six["ip"], "192.168.0.1/24");
    assert_eq!(six["ta"], json!(["日本", "é,è", "\"", "\\"]));
    assert_eq!(six["tstz"], "2026-01-02T01:04:05Z");
    assert_contains(&from_daemon[6].1, r#""f8":-0,"n":null"#);
    // numeric = "number": numbers, with NaN still a string.
    assert_eq!(
        from_daemon_num[0].1,
        r#"{"id":1,"n":12.50,"n2":3.00,"na":[1.50,"NaN",-0.001],"f8":0.1}"#
    );
    assert_eq!(
        from_daemon_num[1].1,
        r#"{"id":2,"n":"NaN","n2":null,"na":null,"f8":"NaN"}"#
    );
    assert_eq!(
        from_daemon_num[2].1,
        r#"{"id":3,"n":123456789012345678901234567890.123456789,"n2":-0.50,"na":[],"f8":null}"#
    );

    assert_reader_matches(&env, &config, "public.matrix", "matrix:", &from_daemon).await;
    assert_reader_matches(
        &env,
        &config,
        "public.matrix_num",
        "mnum:",
        &from_daemon_num,
    )
    .await;
    assert_backfill_matches(&env, "public.matrix", "matrix:", &from_daemon).await;
    assert_backfill_matches(&env, "public.matrix_num", "mnum:", &from_daemon_num).await;
    daemon.stop().await.expect("clean stop");
}

/// Deletes the keys of these rows; returns the connection that did it.
async fn evict(
    env: &Env,
    prefix: &str,
    rows: &[(i32, String)],
) -> redis::aio::MultiplexedConnection {
    let mut r = env.redis().await;
    for (id, _) in rows {
        del(&mut r, &format!("{prefix}{id}")).await;
    }
    r
}

/// Deletes the keys, asks the running daemon to backfill the table again (`pgcache resync`
/// records this same control event), and checks the backfill writes exactly the stream's
/// bytes.
async fn assert_backfill_matches(
    env: &Env,
    table: &str,
    prefix: &str,
    from_daemon: &[(i32, String)],
) {
    let mut r = evict(env, prefix, from_daemon).await;
    env.sql(&format!("SELECT pgcache.emit('resync', '{table}')"));
    for (id, daemon_value) in from_daemon {
        let key = format!("{prefix}{id}");
        wait_for_exact(&mut r, &key, Some(daemon_value.as_str())).await;
    }
}

/// ALTER TABLE while the daemon streams: later values follow the new columns and types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_mid_stream() {
    let env = Env::start(
        "CREATE TABLE evolving (id int PRIMARY KEY, a text, n int, gone text, old_name text);",
        "public.evolving",
    );
    let config = env.config("[[tables]]\ntable = \"evolving\"\nkey = \"evo:{id}\"\n");
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;

    env.sql("INSERT INTO evolving VALUES (1, 'one', 1, 'g', 'o')");
    wait_for_exact(
        &mut r,
        "evo:1",
        Some(r#"{"id":1,"a":"one","n":1,"gone":"g","old_name":"o"}"#),
    )
    .await;

    // ADD COLUMN: new rows carry it, and so do updated old rows (with the default).
    env.sql("ALTER TABLE evolving ADD COLUMN extra text DEFAULT 'dflt'");
    env.sql("INSERT INTO evolving VALUES (2, 'two', 2, 'g2', 'o2', 'e2')");
    wait_for_exact(
        &mut r,
        "evo:2",
        Some(r#"{"id":2,"a":"two","n":2,"gone":"g2","old_name":"o2","extra":"e2"}"#),
    )
    .await;
    env.sql("UPDATE evolving SET a = 'one!' WHERE id = 1");
    wait_for_exact(
        &mut r,
        "evo:1",
        Some(r#"{"id":1,"a":"one!","n":1,"gone":"g","old_name":"o","extra":"dflt"}"#),
    )
    .await;

    // DROP COLUMN: values written after it no longer have it.
    env.sql("ALTER TABLE evolving DROP COLUMN gone");
    env.sql("UPDATE evolving SET a = 'one!!' WHERE id = 1");
    env.sql("INSERT INTO evolving VALUES (3, 'three', 3, 'o3', 'e3')");
    wait_for_exact(
        &mut r,
        "evo:3",
        Some(r#"{"id":3,"a":"three","n":3,"old_name":"o3","extra":"e3"}"#),
    )
    .await;
    assert_eq!(
        get(&mut r, "evo:1").await.as_deref(),
        Some(r#"{"id":1,"a":"one!!","n":1,"old_name":"o","extra":"dflt"}"#),
        "the update committed before the insert"
    );

    // RENAME COLUMN: values show the new name.
    env.sql("ALTER TABLE evolving RENAME COLUMN old_name TO new_name");
    env.sql("UPDATE evolving SET a = 'renamed' WHERE id = 1");
    wait_for_exact(
        &mut r,
        "evo:1",
        Some(r#"{"id":1,"a":"renamed","n":1,"new_name":"o","extra":"dflt"}"#),
    )
    .await;

    // A row no change touched since the DROP and the RENAME is rewritten in the new shape:
    // the daemon backfills a mirror table whose cached columns changed.
    wait_for_exact(
        &mut r,
        "evo:2",
        Some(r#"{"id":2,"a":"two","n":2,"new_name":"o2","extra":"e2"}"#),
    )
    .await;

    // Column type changes: later values encode with the new type.
    env.sql("ALTER TABLE evolving ALTER COLUMN n TYPE bigint");
    env.sql("UPDATE evolving SET n = 5000000000 WHERE id = 1");
    wait_for_exact(
        &mut r,
        "evo:1",
        Some(r#"{"id":1,"a":"renamed","n":5000000000,"new_name":"o","extra":"dflt"}"#),
    )
    .await;
    env.sql("ALTER TABLE evolving ALTER COLUMN n TYPE text");
    env.sql("UPDATE evolving SET n = n || 'x'");
    wait_for_exact(
        &mut r,
        "evo:1",
        Some(r#"{"id":1,"a":"renamed","n":"5000000000x","new_name":"o","extra":"dflt"}"#),
    )
    .await;
    wait_for_exact(
        &mut r,
        "evo:3",
        Some(r#"{"id":3,"a":"three","n":"3x","new_name":"o3","extra":"e3"}"#),
    )
    .await;
    // Rows no change touched are rewritten in the new shape too (the daemon backfills a
    // mirror table whose cached columns changed), so Redis converges to the projection.
    wait_for_exact(
        &mut r,
        "evo:2",
        Some(r#"{"id":2,"a":"two","n":"2x","new_name":"o2","extra":"e2"}"#),
    )
    .await;
    let last = vec![
        (1, get(&mut r, "evo:1").await.unwrap()),
        (3, get(&mut r, "evo:3").await.unwrap()),
    ];
    // The reader sees the same columns as the stream after all that. (Let the daemon's
    // rewrite of the reshaped table finish first, or it may fill the keys before the reader.)
    wait_backfill_done(&mut r, "public.evolving", Duration::from_secs(30)).await;
    assert_reader_matches(&env, &config, "public.evolving", "evo:", &last).await;
    daemon.stop().await.expect("clean stop");
}

/// A rule that names a column which is then dropped stops that table, with an error naming
/// the column, while the other tables of the publication keep streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_rule_column_stops_only_that_table() {
    let env = Env::start(
        "CREATE TABLE strict (id int PRIMARY KEY, label text, doomed text);
         CREATE TABLE bystander (id int PRIMARY KEY, v int);",
        "public.strict,public.bystander",
    );
    let config = env.write_config(
        r#"
[[tables]]
table = "public.strict"
key = "strict:{id}"
columns = ["id", "label", "doomed"]

[[tables]]
table = "public.bystander"
key = "by:{id}"
"#,
    );
    let mut daemon = Daemon::spawn(&config, &env.dir.path().join("daemon.log"));
    let mut r = env.redis().await;
    env.sql(
        "INSERT INTO strict VALUES (1, 'a', 'd1'), (2, 'b', 'd2');
         INSERT INTO bystander VALUES (1, 1);",
    );
    wait_for_exact(
        &mut r,
        "strict:2",
        Some(r#"{"id":2,"label":"b","doomed":"d2"}"#),
    )
    .await;
    wait_for_exact(&mut r, "by:1", Some(r#"{"id":1,"v":1}"#)).await;
    let stale = r#"{"id":1,"label":"a","doomed":"d1"}"#;
    assert_eq!(get(&mut r, "strict:1").await.as_deref(), Some(stale));

    env.sql("ALTER TABLE strict DROP COLUMN doomed");
    env.sql("UPDATE strict SET label = 'a2' WHERE id = 1");
    env.sql("INSERT INTO strict VALUES (3, 'c')");
    env.sql("INSERT INTO bystander VALUES (2, 2)");
    env.sql("UPDATE bystander SET v = 10 WHERE id = 1");
    // The other table keeps streaming, and the daemon keeps running.
    wait_for_exact(&mut r, "by:1", Some(r#"{"id":1,"v":10}"#)).await;
    wait_for_exact(&mut r, "by:2", Some(r#"{"id":2,"v":2}"#)).await;

    let log = daemon.log();
    assert!(
        log.contains("table stopped")
            && log.contains("public.strict")
            && log.contains(r#""doomed""#),
        "the log names the stopped table and the missing column:\n{log}"
    );
    // The bystander changes committed after the strict ones, so those have been handled.
    // Nothing can build strict:1 any more under its rule: it must not keep its old value
    // (absence is safe; a stale value is not).
    let now = get(&mut r, "strict:1").await;
    assert!(
        now.as_deref() != Some(stale),
        "STALE: strict:1 still holds {stale} after its row changed and its table stopped\n{log}"
    );
    assert_eq!(
        now, None,
        "strict:1 cannot be built under its rule, so it is absent"
    );
    assert_eq!(
        get(&mut r, "strict:3").await,
        None,
        "a row inserted after the drop is not cached under the broken rule"
    );
    // Still streaming.
    env.sql("UPDATE bystander SET v = 11 WHERE id = 2");
    wait_for_exact(&mut r, "by:2", Some(r#"{"id":2,"v":11}"#)).await;
    assert!(daemon.terminate().success(), "{}", daemon.log());
}

const PARTITIONED: &str = "
CREATE TABLE events (id int, region text, payload text, PRIMARY KEY (id, region))
  PARTITION BY LIST (region);
CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
CREATE TABLE readings (id int, day date, v int, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
CREATE TABLE readings_2025 PARTITION OF readings FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE readings_2026 PARTITION OF readings FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
";

/// Changes to partitions arrive under the root table's rule (publish_via_partition_root);
/// a row that moves between partitions leaves exactly one key, with its new value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_stream_under_the_root() {
    let env = Env::start(PARTITIONED, "public.events,public.readings");
    let config = env.config(
        r#"
[[tables]]
table = "public.events"
key = "event:{region}:{id}"

[[tables]]
table = "public.readings"
key = "reading:{id}"
"#,
    );
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;

    env.sql(
        "INSERT INTO events VALUES (1, 'eu', 'a'), (2, 'us', 'b');
         INSERT INTO readings VALUES (1, '2025-06-01', 10), (2, '2026-06-01', 20);",
    );
    wait_for_json(
        &mut r,
        "event:eu:1",
        Some(json!({"id": 1, "region": "eu", "payload": "a"})),
    )
    .await;
    wait_for_json(
        &mut r,
        "event:us:2",
        Some(json!({"id": 2, "region": "us", "payload": "b"})),
    )
    .await;
    wait_for_json(
        &mut r,
        "reading:1",
        Some(json!({"id": 1, "day": "2025-06-01", "v": 10})),
    )
    .await;
    wait_for_json(
        &mut r,
        "reading:2",
        Some(json!({"id": 2, "day": "2026-06-01", "v": 20})),
    )
    .await;

    // Moves between partitions: Postgres deletes from one and inserts into the other.
    env.sql("UPDATE events SET region = 'us', payload = 'moved' WHERE id = 1");
    wait_for_json(
        &mut r,
        "event:us:1",
        Some(json!({"id": 1, "region": "us", "payload": "moved"})),
    )
    .await;
    assert_eq!(get(&mut r, "event:eu:1").await, None, "the old key is gone");
    env.sql("UPDATE readings SET day = '2026-02-01', v = 11 WHERE id = 1");
    wait_for_json(
        &mut r,
        "reading:1",
        Some(json!({"id": 1, "day": "2026-02-01", "v": 11})),
    )
    .await;
    // An update inside one partition.
    env.sql("UPDATE events SET payload = 'b2' WHERE id = 2");
    wait_for_json(
        &mut r,
        "event:us:2",
        Some(json!({"id": 2, "region": "us", "payload": "b2"})),
    )
    .await;
    // A move that keeps the key, then a change in the same transaction.
    env.sql(
        "BEGIN;
         UPDATE readings SET day = '2025-03-03' WHERE id = 2;
         UPDATE readings SET v = 21 WHERE id = 2;
         COMMIT;",
    );
    wait_for_json(
        &mut r,
        "reading:2",
        Some(json!({"id": 2, "day": "2025-03-03", "v": 21})),
    )
    .await;

    // Every key is the root's; none is a partition's, none is stale.
    let mut all = keys(&mut r, "*").await;
    all.retain(|k| !k.starts_with("pgcache:"));
    assert_eq!(all, ["event:us:1", "event:us:2", "reading:1", "reading:2"]);

    let reading = get(&mut r, "reading:1").await.unwrap();
    assert_reader_matches(
        &env,
        &config,
        "public.readings",
        "reading:",
        &[(1, reading)],
    )
    .await;

    env.sql("DELETE FROM events WHERE id = 2; DELETE FROM readings WHERE id = 1;");
    wait_for_json(&mut r, "event:us:2", None).await;
    wait_for_json(&mut r, "reading:1", None).await;
    let mut all = keys(&mut r, "*").await;
    all.retain(|k| !k.starts_with("pgcache:"));
    assert_eq!(all, ["event:us:1", "reading:2"]);
    assert_eq!(
        get_json(&mut r, "reading:2").await,
        Some(json!({"id": 2, "day": "2025-03-03", "v": 21}))
    );
    daemon.stop().await.expect("clean stop");
}

/// User-defined types resolve, through `pg_type`, to the encoding of what they print as:
/// enums and citext as text, domains (over domains too) as their base type, arrays of them
/// as arrays, composites and ranges as text of their own (`Other`), unknown OIDs as `Other`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_types_resolve_through_pg_type() {
    use pgcache::encoder::PgType;
    let env = Env::start(
        "CREATE TYPE mood AS ENUM ('ok', 'sad');
         CREATE DOMAIN positive AS int CHECK (VALUE > 0);
         CREATE DOMAIN small_positive AS positive CHECK (VALUE < 10);
         CREATE DOMAIN stamps AS timestamptz[];
         CREATE TYPE pair AS (a int, b text);
         CREATE TYPE intr AS RANGE (subtype = int8);",
        "",
    );
    if let Err(e) = env.pg.psql(DB, "CREATE EXTENSION citext") {
        panic!(
            "this test needs the citext extension, from Postgres's contrib modules \
             (Debian: apt-get install -y postgresql-contrib): {e:#}"
        );
    }
    let client = env.pg_client().await;
    let array = |elem: PgType| PgType::Array(Box::new(elem));
    for (name, want) in [
        ("mood", PgType::Text),
        ("mood[]", array(PgType::Text)),
        ("positive", PgType::Int),
        ("small_positive", PgType::Int),
        ("small_positive[]", array(PgType::Int)),
        ("stamps", array(PgType::TimestampTz)),
        ("stamps[]", array(array(PgType::TimestampTz))),
        ("pair", PgType::Other),
        ("pair[]", array(PgType::Other)),
        ("intr", PgType::Other),
        ("citext", PgType::Text),
        ("citext[]", array(PgType::Text)),
        ("int4", PgType::Int),
    ] {
        let oid: u32 = client
            .query_one("SELECT $1::text::regtype::oid", &[&name])
            .await
            .unwrap_or_else(|e| panic!("the OID of {name}: {e}"))
            .get(0);
        let got = PgType::resolve(&client, oid).await.expect("resolve");
        assert_eq!(got, want, "{name}");
    }
    assert_eq!(
        PgType::resolve(&client, 4_000_000_000)
            .await
            .expect("resolve"),
        PgType::Other
    );
}
