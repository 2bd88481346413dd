//! The protocol's conformance fixtures (`tests/fixtures/protocol`, described in PROTOCOL.md),
//! run against real servers: the daemon and the read helper must produce exactly the keys and
//! the bytes the fixtures give, and the lease scripts must answer and leave Redis exactly as
//! the scenarios say. A port of the read helper runs the same files against itself.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use pgcache::checkpoint;
use pgcache::daemon::apply::script::{self, Owner};
use pgcache::daemon::apply::{Op, Prepared};
use pgcache::reader::KeyValue;
use pgcache::template::{lease_key, KeyTemplate};
use pgcache::testkit::{RedisOptions, TestRedis};
use pgcache::{Lsn, Reader};
use redis::aio::MultiplexedConnection;
use serde_json::Value;

use crate::common::{Env, InProcess};

const CHECKPOINT: &str = "pgcache:{pgcache}:checkpoint";

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/protocol")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let value: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    assert_eq!(value["protocol"], 3, "{name}: protocol version");
    value
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("fixture: {what} is not a string: {value}"))
}

fn array_of<'a>(value: &'a Value, what: &str) -> &'a [Value] {
    value
        .as_array()
        .unwrap_or_else(|| panic!("fixture: {what} is not an array: {value}"))
}

/// A key case's values as bytes (`values`, or `values_hex` for bytes JSON cannot carry).
fn key_values(row: &Value) -> Vec<Vec<u8>> {
    if let Some(hex) = row.get("values_hex") {
        return array_of(hex, "values_hex")
            .iter()
            .map(|h| {
                let h = str_of(h, "values_hex");
                (0..h.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex"))
                    .collect()
            })
            .collect();
    }
    array_of(&row["values"], "values")
        .iter()
        .map(|v| str_of(v, "value").as_bytes().to_vec())
        .collect()
}

/// The key cases that a Postgres table can hold (all but those marked `"postgres": false`).
fn postgres_key_cases(keys: &Value) -> Vec<(usize, &Value)> {
    array_of(&keys["cases"], "cases")
        .iter()
        .enumerate()
        .filter(|(_, case)| case.get("postgres") != Some(&Value::Bool(false)))
        .collect()
}

/// Rendering, lease keys, refused templates and position texts: the pure part of the
/// fixtures, without servers.
#[test]
fn keys_templates_and_positions_match_the_fixtures() {
    let keys = fixture("keys.json");
    let mut failures = Vec::new();
    for case in array_of(&keys["cases"], "cases") {
        let template = str_of(&case["template"], "template");
        let prefix = str_of(&case["key_prefix"], "key_prefix");
        let parsed = KeyTemplate::parse(template)
            .unwrap_or_else(|e| panic!("fixture template {template:?} is refused: {e}"));
        for row in array_of(&case["rows"], "rows") {
            let values = key_values(row);
            let slices: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
            let key = parsed.render(prefix, &slices);
            let expected = str_of(&row["key"], "key");
            if key != expected {
                failures.push(format!(
                    "{template} {values:?}: key {key:?}, fixture {expected:?}"
                ));
            }
            let lease = lease_key(&key);
            let expected = str_of(&row["lease_key"], "lease_key");
            if lease != expected {
                failures.push(format!("{key}: lease key {lease:?}, fixture {expected:?}"));
            }
            if parsed.parse_key(prefix, &key) != Some(values.clone()) {
                failures.push(format!("{key}: does not parse back into {values:?}"));
            }
        }
    }
    for case in array_of(&keys["invalid_templates"], "invalid_templates") {
        let template = str_of(&case["template"], "template");
        let error = str_of(&case["error"], "error");
        match KeyTemplate::parse(template) {
            Ok(_) => failures.push(format!("template {template:?} is accepted")),
            Err(e) => {
                let debug = format!("{e:?}");
                if !debug.starts_with(error) {
                    failures.push(format!("template {template:?}: {debug}, fixture {error}"));
                }
            }
        }
    }
    let leases = fixture("leases.json");
    assert_eq!(leases["checkpoint_key"], CHECKPOINT);
    assert_eq!(
        checkpoint::checkpoint_key("", "pgcache"),
        str_of(&leases["checkpoint_key"], "checkpoint_key")
    );
    for position in array_of(&leases["positions"], "positions") {
        let text = str_of(&position["lsn"], "lsn");
        let lsn: Lsn = text.parse().expect("fixture LSN");
        assert_eq!(lsn.to_string(), text, "LSN text round trip");
        let hex = checkpoint::hex(lsn);
        if hex != str_of(&position["applied"], "applied") {
            failures.push(format!(
                "{text}: applied {hex:?}, fixture {}",
                position["applied"]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Setup SQL, tables and `[[tables]]` rules for every encoding group (a JSON table and a
/// hash table) and every key case that Postgres can hold.
fn schema(encoding: &Value, keys: &Value) -> (String, Vec<String>, String) {
    let mut sql = String::new();
    let mut tables = Vec::new();
    let mut rules = String::new();
    for group in array_of(&encoding["groups"], "groups") {
        if let Some(setup) = group.get("setup") {
            let _ = writeln!(sql, "{};", str_of(setup, "setup"));
        }
        let table = str_of(&group["table"], "table");
        let ty = str_of(&group["type"], "type");
        let numeric = group
            .get("rule")
            .and_then(|r| r.get("numeric"))
            .map(|n| format!("numeric = {n}\n"))
            .unwrap_or_default();
        for (name, format) in [(table.to_string(), "json"), (format!("{table}_h"), "hash")] {
            let _ = writeln!(sql, "CREATE TABLE {name} (id int4 PRIMARY KEY, v {ty});");
            let _ = write!(
                rules,
                "[[tables]]\ntable = \"public.{name}\"\nkey = \"{name}:{{id}}\"\nformat = \"{format}\"\n{numeric}\n"
            );
            tables.push(format!("public.{name}"));
        }
    }
    for (i, case) in postgres_key_cases(keys) {
        let template = str_of(&case["template"], "template");
        let parsed = KeyTemplate::parse(template).expect("fixture template");
        let columns: Vec<String> = parsed
            .columns()
            .iter()
            .map(|c| format!("{c} {}", str_of(&case["columns"][c], "column type")))
            .collect();
        let _ = writeln!(
            sql,
            "CREATE TABLE k{i} ({}, PRIMARY KEY ({}));",
            columns.join(", "),
            parsed.columns().join(", ")
        );
        let _ = write!(
            rules,
            "[[tables]]\ntable = \"public.k{i}\"\nkey = {}\n\n",
            serde_json::to_string(template).expect("a string")
        );
        tables.push(format!("public.k{i}"));
    }
    (sql, tables, rules)
}

/// The rows of every encoding case (both tables) and every Postgres key case.
fn rows_sql(encoding: &Value, keys: &Value) -> String {
    let mut sql = String::new();
    for group in array_of(&encoding["groups"], "groups") {
        let table = str_of(&group["table"], "table");
        for case in array_of(&group["cases"], "cases") {
            let id = &case["id"];
            let literal = str_of(&case["literal"], "literal");
            for name in [table.to_string(), format!("{table}_h")] {
                let _ = writeln!(sql, "INSERT INTO {name} (id, v) VALUES ({id}, {literal});");
            }
        }
    }
    for (i, case) in postgres_key_cases(keys) {
        let parsed = KeyTemplate::parse(str_of(&case["template"], "template")).expect("template");
        for row in array_of(&case["rows"], "rows") {
            let values: Vec<String> = key_values(row)
                .iter()
                .zip(parsed.columns())
                .map(|(v, c)| {
                    let text = std::str::from_utf8(v).expect("Postgres key values are UTF-8");
                    format!(
                        "{}::{}",
                        pgcache::sql::literal(text),
                        str_of(&case["columns"][c], "type")
                    )
                })
                .collect();
            let _ = writeln!(
                sql,
                "INSERT INTO k{i} ({}) VALUES ({});",
                parsed.columns().join(", "),
                values.join(", ")
            );
        }
    }
    sql
}

async fn applied(r: &mut MultiplexedConnection) -> Option<String> {
    redis::cmd("HGET")
        .arg(CHECKPOINT)
        .arg("applied")
        .query_async(r)
        .await
        .expect("HGET")
}

/// Waits until the daemon has applied everything committed so far.
async fn wait_applied_now(env: &Env, r: &mut MultiplexedConnection) {
    let client = env.pg_client().await;
    let row = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("WAL position");
    let lsn: Lsn = row.get::<_, String>(0).parse().expect("an LSN");
    let target = checkpoint::hex(lsn);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if applied(r).await.is_some_and(|a| a >= target) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not apply up to {lsn} within 60 s\n{}",
            env.pg.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get(r: &mut MultiplexedConnection, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET")
        .arg(key)
        .query_async(r)
        .await
        .expect("GET")
}

async fn hgetall(r: &mut MultiplexedConnection, key: &str) -> BTreeMap<String, String> {
    redis::cmd("HGETALL")
        .arg(key)
        .query_async(r)
        .await
        .expect("HGETALL")
}

fn expected_hash(case: &Value) -> BTreeMap<String, String> {
    case["hash"]
        .as_object()
        .expect("hash is an object")
        .iter()
        .map(|(f, v)| (f.clone(), str_of(v, "hash field").to_string()))
        .collect()
}

fn show(bytes: &Option<Vec<u8>>) -> String {
    match bytes {
        None => "(absent)".to_string(),
        Some(b) => format!("{:?}", String::from_utf8_lossy(b)),
    }
}

/// Every value and hash the fixtures give, as Redis holds them now; one line per difference.
async fn encoding_differences(
    r: &mut MultiplexedConnection,
    encoding: &Value,
    what: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    for group in array_of(&encoding["groups"], "groups") {
        let ty = str_of(&group["type"], "type");
        for case in array_of(&group["cases"], "cases") {
            let key = str_of(&case["key"], "key");
            let want = str_of(&case["value"], "value");
            let got = get(r, key).await;
            if got.as_deref() != Some(want.as_bytes()) {
                out.push(format!(
                    "{what}: {ty} {}: {key} holds {}, fixture {want:?}",
                    case["literal"],
                    show(&got)
                ));
            }
            let hash_key = str_of(&case["hash_key"], "hash_key");
            let got = hgetall(r, hash_key).await;
            let want = expected_hash(case);
            if got != want {
                out.push(format!(
                    "{what}: {ty} {}: hash {hash_key} holds {got:?}, fixture {want:?}",
                    case["literal"]
                ));
            }
        }
    }
    out
}

/// Encoding and key fixtures through the three producers of values: the stream, the read
/// helper's miss, and the backfill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoding_and_keys_match_the_daemon_the_reader_and_the_backfill() {
    let encoding = fixture("encoding.json");
    let keys = fixture("keys.json");
    let env = Env::start("", "");
    let (schema_sql, tables, rules) = schema(&encoding, &keys);
    let client = env.pg_client().await;
    client
        .batch_execute(&schema_sql)
        .await
        .unwrap_or_else(|e| panic!("fixture schema: {e}\n{schema_sql}"));
    env.run_sql_file(
        "sql/setup.sql",
        &[
            ("role", "pgcache"),
            ("password", "pgcache-secret"),
            ("publication", "pgcache"),
            ("slot", "pgcache"),
            ("tables", &tables.join(",")),
        ],
    );
    let config = env.config(&rules);
    let daemon = InProcess::start(config.clone());
    let mut r = env.redis().await;
    crate::common::wait_streaming(&mut r).await;
    // The first start backfills every table. Its writes do not revoke leases (a fill then
    // loses because the key exists, as a fixture scenario shows), so it must be over before
    // the fills below, which expect to win.
    for table in &tables {
        crate::common::wait_backfill_done(&mut r, table, Duration::from_secs(120)).await;
    }

    // The stream.
    let rows = rows_sql(&encoding, &keys);
    client
        .batch_execute(&rows)
        .await
        .unwrap_or_else(|e| panic!("fixture rows: {e}\n{rows}"));
    wait_applied_now(&env, &mut r).await;
    let mut failures = encoding_differences(&mut r, &encoding, "stream").await;
    for (i, case) in postgres_key_cases(&keys) {
        let template = KeyTemplate::parse(str_of(&case["template"], "template")).expect("ok");
        let pattern = format!(
            "{}*",
            pgcache::template::glob_escape(template.literal_prefix())
        );
        let mut got: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut r)
            .await
            .expect("KEYS");
        got.sort();
        let mut want: Vec<String> = array_of(&case["rows"], "rows")
            .iter()
            .map(|row| str_of(&row["key"], "key").to_string())
            .collect();
        want.sort();
        if got != want {
            failures.push(format!(
                "stream: table k{i} wrote keys {got:?}, fixture {want:?}"
            ));
        }
    }

    // The read helper: the same keys, and on a miss the same bytes, read and filled.
    let reader = Reader::from_config(&config).expect("reader");
    for (i, case) in postgres_key_cases(&keys) {
        let table = reader.table(&format!("public.k{i}")).expect("table");
        for row in array_of(&case["rows"], "rows") {
            let values: Vec<String> = key_values(row)
                .into_iter()
                .map(|v| String::from_utf8(v).expect("UTF-8"))
                .collect();
            let dynamic: Vec<&dyn KeyValue> = values.iter().map(|v| v as &dyn KeyValue).collect();
            let key = table.key(&dynamic[..]).expect("key");
            let want = str_of(&row["key"], "key");
            if key != want {
                failures.push(format!(
                    "reader: k{i} {values:?}: key {key:?}, fixture {want:?}"
                ));
            }
        }
    }
    for group in array_of(&encoding["groups"], "groups") {
        let table = reader
            .table(&format!("public.{}", str_of(&group["table"], "table")))
            .expect("table");
        for case in array_of(&group["cases"], "cases") {
            let id = i32::try_from(case["id"].as_i64().expect("id")).expect("id");
            let key = str_of(&case["key"], "key");
            let want = str_of(&case["value"], "value");
            let _: i64 = redis::cmd("DEL")
                .arg(key)
                .query_async(&mut r)
                .await
                .expect("DEL");
            let got = table
                .get_raw(id)
                .await
                .unwrap_or_else(|e| panic!("reader: {key}: {e}"))
                .map(|b| b.to_vec());
            if got.as_deref() != Some(want.as_bytes()) {
                failures.push(format!(
                    "reader: {key} read {}, fixture {want:?}",
                    show(&got)
                ));
            }
            let filled = get(&mut r, key).await;
            if filled.as_deref() != Some(want.as_bytes()) {
                failures.push(format!(
                    "reader: {key} filled {}, fixture {want:?}",
                    show(&filled)
                ));
            }
        }
    }

    // A port's way, as PROTOCOL.md tells it: a connection with the pinned settings, the
    // lease first, then the row as `format('%s', v)` text and the read position after it,
    // encoded by the encoding table, filled once the daemon has applied up to the position.
    failures.extend(port_fills(&env, &mut r, &encoding).await);
    failures.extend(live_revocation(&env, &mut r, &client).await);

    // The backfill: every key gone, every table read again.
    for group in array_of(&encoding["groups"], "groups") {
        for case in array_of(&group["cases"], "cases") {
            for key in [&case["key"], &case["hash_key"]] {
                let _: i64 = redis::cmd("DEL")
                    .arg(str_of(key, "key"))
                    .query_async(&mut r)
                    .await
                    .expect("DEL");
            }
        }
    }
    for table in tables.iter().filter(|t| t.starts_with("public.p_")) {
        client
            .batch_execute(&format!("SELECT pgcache.emit('resync', '{table}')"))
            .await
            .expect("resync");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let backfilled = loop {
        let differences = encoding_differences(&mut r, &encoding, "backfill").await;
        if differences.is_empty() || Instant::now() > deadline {
            break differences;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    failures.extend(backfilled);

    daemon.stop().await.expect("clean stop");
    assert!(
        failures.is_empty(),
        "{} differences from the fixtures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The daemon itself, not a scripted batch, revokes a lease: a holder that read the row
/// before an UPDATE applied by the daemon loses its fill, and Redis keeps the daemon's value.
async fn live_revocation(
    env: &Env,
    r: &mut MultiplexedConnection,
    client: &tokio_postgres::Client,
) -> Vec<String> {
    let (key, lease) = ("p_text:3", lease_key("p_text:3"));
    let acquire = redis::Script::new(include_str!("../../src/reader/acquire.lua"));
    let fill = redis::Script::new(include_str!("../../src/reader/fill.lua"));
    let _: i64 = redis::cmd("DEL")
        .arg(key)
        .query_async(r)
        .await
        .expect("DEL");
    let mut out = Vec::new();
    let reply: redis::Value = acquire
        .key(key)
        .key(&lease)
        .arg("live-token")
        .arg(60_000)
        .arg("pgcache:absent")
        .invoke_async(r)
        .await
        .expect("acquire");
    if !reply_matches(&serde_json::json!([2]), &reply) {
        out.push(format!("live: {key}: acquire replied {reply:?}"));
    }
    // The holder's read happened here; then the row changes (to the same value, so the
    // backfill below still finds the fixture's bytes).
    let read_at: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("position")
        .get(0);
    client
        .batch_execute("UPDATE p_text SET v = v WHERE id = 3")
        .await
        .expect("update");
    wait_applied_now(env, r).await;
    if get(r, &lease).await.is_some() {
        out.push(format!(
            "live: the daemon applied an update of {key} but kept its lease"
        ));
    }
    let filled: i64 = fill
        .key(key)
        .key(&lease)
        .key(CHECKPOINT)
        .arg("live-token")
        .arg("row")
        .arg("stale")
        .arg("0")
        .arg(checkpoint::hex(read_at.parse().expect("an LSN")))
        .invoke_async(r)
        .await
        .expect("fill");
    if filled != 0 {
        out.push(format!("live: {key}: a revoked fill replied {filled}"));
    }
    let value = get(r, key).await;
    if value.as_deref() == Some(b"stale".as_slice()) {
        out.push(format!("live: {key}: the revoked fill was written"));
    }
    out
}

/// Fills every JSON encoding case the way PROTOCOL.md tells a port to; one line per
/// difference from the fixtures.
async fn port_fills(env: &Env, r: &mut MultiplexedConnection, encoding: &Value) -> Vec<String> {
    let mut config: tokio_postgres::Config = env.pg.url(crate::common::DB).parse().expect("url");
    config.options(pgcache::pgconn::session_options());
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let acquire = redis::Script::new(include_str!("../../src/reader/acquire.lua"));
    let fill = redis::Script::new(include_str!("../../src/reader/fill.lua"));
    let mut out = Vec::new();
    for group in array_of(&encoding["groups"], "groups") {
        let table = str_of(&group["table"], "table");
        let oid: u32 = client
            .query_one(
                &format!(
                    "SELECT {}::regtype::oid",
                    pgcache::sql::literal(str_of(&group["type"], "type"))
                ),
                &[],
            )
            .await
            .expect("type oid")
            .get(0);
        let ty = pgcache::encoder::PgType::resolve(&client, oid)
            .await
            .expect("type");
        let opts = pgcache::encoder::EncodeOptions {
            numeric_as_number: group["rule"]["numeric"] == "number",
        };
        for case in array_of(&group["cases"], "cases") {
            let key = str_of(&case["key"], "key");
            let want = str_of(&case["value"], "value");
            let _: i64 = redis::cmd("DEL")
                .arg(key)
                .query_async(r)
                .await
                .expect("DEL");
            // A fill that loses starts over, as the protocol says; the next round may hit.
            for attempt in 0.. {
                let token = format!("port-{attempt}-{key}");
                let reply: redis::Value = acquire
                    .key(key)
                    .key(lease_key(key))
                    .arg(&token)
                    .arg(2000)
                    .arg("pgcache:absent")
                    .invoke_async(r)
                    .await
                    .expect("acquire");
                if attempt > 0 && reply_matches(&serde_json::json!([1, want]), &reply) {
                    break;
                }
                if !reply_matches(&serde_json::json!([2]), &reply) {
                    out.push(format!("port: {key}: acquire replied {reply:?}"));
                    break;
                }
                let rows = client
                    .simple_query(&format!(
                        "SELECT id::text, CASE WHEN v IS NULL THEN NULL ELSE format('%s', v) END \
                     FROM {table} WHERE id = {}",
                        case["id"]
                    ))
                    .await
                    .expect("row");
                let row = rows
                    .iter()
                    .find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
                        _ => None,
                    })
                    .expect("a row");
                let position: String = client
                    .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                    .await
                    .expect("position")
                    .get(0);
                let read_at = checkpoint::hex(position.parse().expect("an LSN"));
                let mut value = Vec::new();
                let columns = [("id", pgcache::encoder::PgType::Int), ("v", ty.clone())];
                let texts = [row.get(0), row.get(1)];
                if let Err(e) = pgcache::encoder::encode_row(
                    &mut value,
                    &columns,
                    texts.iter().map(|t| t.map(str::as_bytes)),
                    opts,
                ) {
                    out.push(format!("port: {key}: cannot encode {texts:?}: {e}"));
                    break;
                }
                if value != want.as_bytes() {
                    out.push(format!(
                        "port: {key}: format('%s') text encodes as {:?}, fixture {want:?}",
                        String::from_utf8_lossy(&value)
                    ));
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                let filled = loop {
                    let filled: i64 = fill
                        .key(key)
                        .key(lease_key(key))
                        .key(CHECKPOINT)
                        .arg(&token)
                        .arg("row")
                        .arg(&value)
                        .arg("0")
                        .arg(&read_at)
                        .invoke_async(r)
                        .await
                        .expect("fill");
                    if filled != 2 || Instant::now() > deadline {
                        break filled;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                };
                if filled == 0 && attempt < 3 {
                    continue;
                }
                if filled != 1 {
                    out.push(format!("port: {key}: fill replied {filled}"));
                }
                break;
            }
        }
    }
    out
}

/// A reply as the fixtures write it: integers, strings, arrays, null, "OK".
fn reply_matches(expected: &Value, got: &redis::Value) -> bool {
    match (expected, got) {
        (Value::Null, redis::Value::Nil) => true,
        (Value::Number(n), redis::Value::Int(i)) => n.as_i64() == Some(*i),
        (Value::String(s), redis::Value::BulkString(b)) => s.as_bytes() == b.as_slice(),
        (Value::String(s), redis::Value::SimpleString(t)) => s == t,
        (Value::String(s), redis::Value::Okay) => s == "OK",
        (Value::Array(e), redis::Value::Array(g)) => {
            e.len() == g.len() && e.iter().zip(g).all(|(e, g)| reply_matches(e, g))
        }
        _ => false,
    }
}

fn strings(value: &Value, what: &str) -> Vec<String> {
    array_of(value, what)
        .iter()
        .map(|v| str_of(v, what).to_string())
        .collect()
}

/// The daemon's side of a scenario: batches written by the daemon's own write path, so a
/// scenario checks what the daemon really does to leases and to the checkpoint.
struct FakeStream {
    owner: Option<Owner>,
}

impl FakeStream {
    async fn apply(&mut self, conn: &mut MultiplexedConnection, step: &Value) {
        if self.owner.is_none() {
            let takeover = checkpoint::takeover(conn, CHECKPOINT, "owner-1", "epoch-1")
                .await
                .expect("takeover");
            self.owner = Some(Owner {
                checkpoint_key: CHECKPOINT.to_string(),
                token: "owner-1".to_string(),
                epoch: takeover.state.epoch.expect("an epoch"),
                position: takeover.state.lsn,
            });
        }
        let owner = self.owner.as_mut().expect("owner");
        let position: Lsn = str_of(&step["position"], "position").parse().expect("LSN");
        let ops = array_of(&step["ops"], "ops")
            .iter()
            .map(|op| {
                let value = || str_of(&op["value"], "value").as_bytes().to_vec();
                if let Some(key) = op.get("set") {
                    Op::Set {
                        key: str_of(key, "set").to_string(),
                        value: value(),
                        ttl_ms: None,
                    }
                } else if let Some(key) = op.get("fill") {
                    Op::Fill {
                        key: str_of(key, "fill").to_string(),
                        value: value(),
                        ttl_ms: None,
                    }
                } else if let Some(key) = op.get("del") {
                    Op::Del {
                        key: str_of(key, "del").to_string(),
                    }
                } else if let Some(space) = op.get("truncate") {
                    Op::DropKeySpace {
                        key_space: str_of(space, "truncate").to_string(),
                    }
                } else {
                    panic!("fixture: unknown daemon operation {op}")
                }
            })
            .collect();
        let prepared = Prepared {
            ops,
            position: Some(position),
            ..Prepared::default()
        };
        script::write(conn, owner, &prepared, pgcache::clock::now_ms())
            .await
            .expect("the daemon's write");
        owner.position = Some(position);
    }
}

/// Every lease scenario, on the real scripts of the read helper and the daemon's real writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_scenarios_match_the_fixtures() {
    let leases = fixture("leases.json");
    let redis = TestRedis::start_with(RedisOptions::default()).expect("start redis");
    let mut conn = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let scripts = [
        (
            "acquire",
            redis::Script::new(include_str!("../../src/reader/acquire.lua")),
        ),
        (
            "fill",
            redis::Script::new(include_str!("../../src/reader/fill.lua")),
        ),
        (
            "release",
            redis::Script::new(include_str!("../../src/reader/release.lua")),
        ),
    ];
    let mut failures = Vec::new();
    for scenario in array_of(&leases["scenarios"], "scenarios") {
        let name = str_of(&scenario["name"], "name");
        let _: () = redis::cmd("FLUSHALL")
            .query_async(&mut conn)
            .await
            .expect("FLUSHALL");
        let mut stream = FakeStream { owner: None };
        for (n, step) in array_of(&scenario["steps"], "steps").iter().enumerate() {
            let at = format!("{name}, step {n}");
            if let Some(which) = step.get("eval") {
                let which = str_of(which, "eval");
                let script = &scripts
                    .iter()
                    .find(|(s, _)| *s == which)
                    .unwrap_or_else(|| panic!("fixture: unknown script {which}"))
                    .1;
                let mut invocation = script.prepare_invoke();
                for key in strings(&step["keys"], "keys") {
                    invocation.key(key);
                }
                for arg in strings(&step["argv"], "argv") {
                    invocation.arg(arg);
                }
                let reply: redis::Value = invocation
                    .invoke_async(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("{at}: {which}.lua failed: {e}"));
                if !reply_matches(&step["expect"], &reply) {
                    failures.push(format!(
                        "{at}: {which}.lua replied {reply:?}, fixture {}",
                        step["expect"]
                    ));
                }
            } else if let Some(batch) = step.get("daemon") {
                stream.apply(&mut conn, batch).await;
            } else if let Some(command) = step.get("redis") {
                let args = strings(command, "redis");
                let mut cmd = redis::cmd(&args[0]);
                for arg in &args[1..] {
                    cmd.arg(arg);
                }
                let reply: redis::Value = cmd.query_async(&mut conn).await.expect("command");
                if !reply_matches(&step["expect"], &reply) {
                    failures.push(format!(
                        "{at}: {args:?} replied {reply:?}, fixture {}",
                        step["expect"]
                    ));
                }
            } else if let Some(ms) = step.get("sleep_ms") {
                tokio::time::sleep(Duration::from_millis(ms.as_u64().expect("ms"))).await;
            } else if let Some(state) = step.get("state") {
                for (key, want) in state.as_object().expect("state is an object") {
                    let got = get(&mut conn, key).await;
                    let want = want.as_str().map(|s| s.as_bytes().to_vec());
                    if got != want {
                        failures.push(format!(
                            "{at}: {key} holds {}, fixture {}",
                            show(&got),
                            show(&want)
                        ));
                    }
                }
            } else if let Some(pttl) = step.get("pttl") {
                for (key, want) in pttl.as_object().expect("pttl is an object") {
                    let got: i64 = redis::cmd("PTTL")
                        .arg(key)
                        .query_async(&mut conn)
                        .await
                        .expect("PTTL");
                    let ok = match want {
                        Value::Array(range) => {
                            let lo = range[0].as_i64().expect("min");
                            let hi = range[1].as_i64().expect("max");
                            (lo..=hi).contains(&got)
                        }
                        n => n.as_i64() == Some(got),
                    };
                    if !ok {
                        failures.push(format!("{at}: PTTL {key} is {got}, fixture {want}"));
                    }
                }
            } else if let Some(fields) = step.get("checkpoint") {
                for (field, want) in fields.as_object().expect("checkpoint is an object") {
                    let got: Option<String> = redis::cmd("HGET")
                        .arg(CHECKPOINT)
                        .arg(field)
                        .query_async(&mut conn)
                        .await
                        .expect("HGET");
                    if got.as_deref() != want.as_str() {
                        failures.push(format!(
                            "{at}: checkpoint field {field} is {got:?}, fixture {want}"
                        ));
                    }
                }
            } else {
                panic!("fixture: {at}: unknown step {step}");
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} differences from the fixtures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
