use std::path::PathBuf;
use std::time::Duration;

use super::*;

const MINIMAL: &str = r#"
[postgres]
url = "postgres://pgcache@localhost/app"

[redis]
url = "redis://localhost:6379"

[[tables]]
table = "public.users"
key = "user:profile:{id}"
"#;

/// `MINIMAL` with `tables` in place of its one table.
fn with_tables(tables: &str) -> String {
    format!(
        "[postgres]\nurl = \"postgres://pgcache@localhost/app\"\n[redis]\nurl = \"redis://localhost:6379\"\n{tables}"
    )
}

fn errors(toml: &str) -> Vec<String> {
    Config::from_toml_str(toml)
        .expect_err("config should be rejected")
        .errors()
        .to_vec()
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::from_toml_str(MINIMAL).unwrap();
    assert_eq!(c.postgres.url.expose(), "postgres://pgcache@localhost/app");
    assert_eq!(c.postgres.slot, "pgcache");
    assert_eq!(c.postgres.publication, "pgcache");
    assert!(!c.postgres.recreate_lost_slot);
    assert!(c.postgres.streaming);
    assert_eq!(c.redis.url.expose(), "redis://localhost:6379");
    assert_eq!(c.redis.key_prefix, "");
    assert_eq!(c.apply, ApplyConfig::default());
    assert_eq!(c.apply.max_batch_changes, 10_000);
    assert_eq!(c.apply.max_transaction_changes, 20_000);
    assert_eq!(c.apply.confirm_delay, Duration::ZERO);
    assert_eq!(c.apply.max_spool_bytes, 16 << 20);
    let dir = c.apply.spool_dir_for("s1", "postgres://db:5432/app");
    assert_eq!(dir.parent(), Some(std::env::temp_dir().as_path()));
    let name = dir.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("pgcache-spool-s1-"), "{name}");
    assert_ne!(dir, c.apply.spool_dir_for("s1", "postgres://db:5433/app"));
    assert_eq!(dir, c.apply.spool_dir_for("s1", "postgres://db:5432/app"));
    assert_eq!(c.metrics.listen, Some("127.0.0.1:9187".parse().unwrap()));
    assert_eq!(c.log.format, LogFormat::Human);
    assert_eq!(c.log.level, "info");
    assert_eq!(c.tables.len(), 1);
    let t = &c.tables[0];
    assert_eq!((t.schema.as_str(), t.name.as_str()), ("public", "users"));
    assert_eq!(t.qualified_name(), "public.users");
    assert_eq!(t.key.as_str(), "user:profile:{id}");
    assert_eq!(t.key_prefix_literal(), "user:profile:");
    assert_eq!(t.columns, None);
    assert_eq!(t.mode, Mode::Mirror);
    assert_eq!(t.ttl, None);
    assert_eq!(t.format, Format::Json);
    assert_eq!(t.encode, EncodeOptions::default());
}

#[test]
fn every_key_is_read() {
    let c = Config::from_toml_str(
        r#"
[postgres]
url = "host=/run/postgresql dbname=app user=pgcache"
slot = "pgcache_2"
publication = "Cache Pub"
recreate_lost_slot = true
streaming = false
[redis]
url = "rediss://:pw@cache:6380/2"
key_prefix = "app1:"
tls_ca_file = "system"
[reader]
url = "postgres://app_reader@db/app?sslmode=verify-full&sslrootcert=/etc/ca.pem&channel_binding=require"
[apply]
max_batch_changes = 500
max_transaction_changes = 7
confirm_delay = "1s"
max_batch_bytes = "8MB"
max_transaction_bytes = 1048576
max_spool_bytes = "32MB"
spool_dir = "/var/spool/pgcache"
[metrics]
listen = ""
max_connections = 8
header_timeout = "2s"
request_timeout = "3s"
[log]
format = "json"
level = "info,pgcache=debug"
[[tables]]
table = "sales.orders"
key = "tenant:{tenant_id}:order:{id}"
columns = ["tenant_id", "id", "total"]
mode = "refresh"
ttl = "1h30m"
format = "hash"
numeric = "number"
[[tables]]
table = "events"
key = "event:{id}"
mode = "invalidate"
"#,
    )
    .unwrap();
    assert_eq!(c.postgres.slot, "pgcache_2");
    assert_eq!(c.postgres.publication, "Cache Pub");
    assert!(c.postgres.recreate_lost_slot);
    assert!(!c.postgres.streaming);
    assert_eq!(c.redis.key_prefix, "app1:");
    assert_eq!(c.redis.tls_ca_file, Some(RedisRoots::System));
    assert_eq!(
        c.reader.url.as_ref().map(Secret::expose),
        Some("postgres://app_reader@db/app?sslmode=verify-full&sslrootcert=/etc/ca.pem&channel_binding=require")
    );
    assert_eq!(
        c.apply,
        ApplyConfig {
            max_batch_changes: 500,
            max_transaction_changes: 7,
            confirm_delay: Duration::from_secs(1),
            max_batch_bytes: 8 << 20,
            max_transaction_bytes: 1 << 20,
            max_spool_bytes: 32 << 20,
            spool_dir: Some(PathBuf::from("/var/spool/pgcache")),
        }
    );
    assert_eq!(
        c.metrics,
        MetricsConfig {
            listen: None,
            max_connections: 8,
            header_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(3),
        }
    );
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.log.level, "info,pgcache=debug");
    let t = c.table("sales", "orders").unwrap();
    assert_eq!(t.key.columns(), ["tenant_id", "id"]);
    assert_eq!(
        t.columns.as_deref(),
        Some(&["tenant_id".to_string(), "id".into(), "total".into()][..])
    );
    assert_eq!(t.mode, Mode::Refresh);
    assert_eq!(t.ttl, Some(Duration::from_secs(5400)));
    assert_eq!(t.format, Format::Hash);
    assert!(t.encode.numeric_as_number);
    let e = c.table("public", "events").unwrap();
    assert_eq!(e.mode, Mode::Invalidate);
    assert!(c.table("public", "orders").is_none());
    assert!(c.table("sales", "events").is_none());
}

#[test]
fn example_config_parses() {
    let text = include_str!("../../deploy/pgcache.example.toml");
    let c = Config::from_toml_str(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.tables.len(), 3);
    assert_eq!(c.tables[0].ttl, Some(Duration::from_secs(3600)));
    assert_eq!(c.tables[1].qualified_name(), "public.orders");
    assert_eq!(c.tables[2].format, Format::Hash);
    assert_eq!(
        c.tables[1].invalidate[0].key.as_str(),
        "tenant-orders:{tenant_id}"
    );
}

const INVALIDATE_BASE: &str =
    "[postgres]\nurl = \"postgres://u@h/db\"\n[redis]\nurl = \"redis://h\"\n";

#[test]
fn invalidation_rules_are_read() {
    let c = Config::from_toml_str(&format!(
        "{INVALIDATE_BASE}[[tables]]\ntable = \"orders\"\nkey = \"order:{{id}}\"\n\
         [[tables.invalidate]]\nkey = \"user-orders:{{user_id}}\"\n\
         [[tables.invalidate]]\nkey = \"page:{{user_id}}:{{id}}\"\n\
         [[tables]]\ntable = \"users\"\nkey = \"user:{{id}}\"\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let orders = &c.tables[0];
    let keys: Vec<&str> = orders.invalidate.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["user-orders:{user_id}", "page:{user_id}:{id}"]);
    assert!(c.tables[1].invalidate.is_empty());
    assert_eq!(
        orders.invalidation_patterns("app:"),
        [
            "app:user-orders:*",
            "{app:user-orders:*}:pgcache-lease",
            "app:user-orders:*:pgcache-lease",
            "app:page:*:*",
            "{app:page:*:*}:pgcache-lease",
            "app:page:*:*:pgcache-lease",
        ]
    );
}

#[test]
fn invalidation_rules_are_checked() {
    let err = Config::from_toml_str(&format!(
        "{INVALIDATE_BASE}[[tables]]\ntable = \"orders\"\nkey = \"order:{{id}}\"\n\
         [[tables.invalidate]]\nkey = \"order:{{id}}:items\"\n\
         [[tables.invalidate]]\n\
         [[tables.invalidate]]\nkey = \"pgcache:{{id}}\"\n\
         [[tables.invalidate]]\nkey = \"list:{{id\"\nttl = \"1s\"\n\
         [[tables]]\ntable = \"users\"\nkey = \"user:{{id}}\"\ninvalidate = \"x\"\n"
    ))
    .unwrap_err();
    let errors = err.errors();
    let has = |needle: &str| errors.iter().any(|e| e.contains(needle));
    assert!(has("tables[0].invalidate[1].key: missing"), "{errors:#?}");
    assert!(
        has("tables[0].invalidate[2].key: key prefix \"pgcache:\" overlaps"),
        "{errors:#?}"
    );
    assert!(has("tables[0].invalidate[3].key: "), "{errors:#?}");
    assert!(
        has("unknown key \"tables[0].invalidate[3].ttl\""),
        "{errors:#?}"
    );
    assert!(has("tables[1].invalidate: expected a list"), "{errors:#?}");
    assert!(
        has("tables[0].invalidate[0].key: key prefix \"order:\" is inside the key space \"order:\" of tables[0].key"),
        "{errors:#?}"
    );
}

/// The other way round: an invalidation pattern that takes in another table's keys
/// (`stats:*` over `stats:daily:*`), which deleting it by pattern would wipe.
#[test]
fn invalidation_keys_may_not_take_in_a_tables_keys() {
    let err = Config::from_toml_str(&format!(
        "{INVALIDATE_BASE}[[tables]]\ntable = \"orders\"\nkey = \"order:{{id}}\"\n\
         [[tables.invalidate]]\nkey = \"stats:{{user_id}}\"\n\
         [[tables]]\ntable = \"daily\"\nkey = \"stats:daily:{{day}}\"\n"
    ))
    .unwrap_err();
    let errors = err.errors();
    assert!(
        errors.iter().any(|e| e.contains(
            "tables[0].invalidate[0].key: its key space \"stats:\" takes in the keys of tables[1].key"
        )),
        "{errors:#?}"
    );
}

#[test]
fn environment_overrides_keys() {
    let c = Config::from_toml_str_with_env(
        MINIMAL,
        env(&[
            ("PGCACHE__REDIS__URL", "redis://:s3cret@cache:6380/1"),
            ("PGCACHE__POSTGRES__SLOT", "other"),
            ("PGCACHE__APPLY__MAX_BATCH_CHANGES", "500"),
            ("PGCACHE__APPLY__CONFIRM_DELAY", "250ms"),
            ("PGCACHE__METRICS__LISTEN", ""),
            ("PGCACHE__REDIS__KEY_PREFIX", "x:"),
            ("PGCACHE_UNRELATED", "ignored"),
            ("OTHER__REDIS__URL", "ignored"),
        ]),
    )
    .unwrap();
    assert_eq!(c.redis.url.expose(), "redis://:s3cret@cache:6380/1");
    assert_eq!(c.postgres.slot, "other");
    assert_eq!(c.apply.max_batch_changes, 500);
    assert_eq!(c.apply.confirm_delay, Duration::from_millis(250));
    assert_eq!(c.metrics.listen, None);
    assert_eq!(c.redis.key_prefix, "x:");

    // A required key may come from the environment alone.
    let no_url = MINIMAL.replace("url = \"postgres://pgcache@localhost/app\"", "");
    let c = Config::from_toml_str_with_env(
        &no_url,
        env(&[("PGCACHE__POSTGRES__URL", "postgres://u@h/db")]),
    )
    .unwrap();
    assert_eq!(c.postgres.url.expose(), "postgres://u@h/db");
}

#[test]
fn environment_errors_name_the_variable() {
    let err = Config::from_toml_str_with_env(
        MINIMAL,
        env(&[
            ("PGCACHE__APPLY__MAX_BATCH_CHANGES", "lots"),
            ("PGCACHE__REDIS__URLL", "redis://x"),
            ("PGCACHE__TABLES__0__TTL", "1h"),
        ]),
    )
    .unwrap_err();
    assert_eq!(
        err.errors(),
        [
            "PGCACHE__TABLES__0__TTL: tables cannot be set from the environment; edit the config file",
            "unknown key \"redis.urll\" (from PGCACHE__REDIS__URLL)",
            "apply.max_batch_changes (from PGCACHE__APPLY__MAX_BATCH_CHANGES): expected a whole number of at least 1, found \"lots\"",
        ]
    );
}

#[test]
fn messages_from_the_brief() {
    let errs = errors(&with_tables(
        r#"
[[tables]]
table = "public.users"
key = "user:{id}"
ttl = "an hour"
[[tables]]
table = "public.accounts"
key = "account:{emial}"
columns = ["id", "email"]
[[tables]]
table = "public.orders"
key = "order:{id}"
mode = "mirrors"
format = "xml"
[[tables]]
table = "public.profiles"
key = "user:profile:{id}"
"#,
    ));
    assert_eq!(
        errs,
        [
            "tables[0].ttl: \"an hour\" is not a duration (examples: 30s, 15m, 1h)",
            "tables[1].key: column \"emial\" is not in tables[1].columns",
            "tables[2].mode: unknown mode \"mirrors\" (expected mirror, refresh or invalidate)",
            "tables[2].format: unknown format \"xml\" (expected json or hash)",
            "tables[0].key and tables[3].key: key prefixes \"user:\" and \"user:profile:\" overlap, so TRUNCATE and verify could not tell the tables apart",
        ]
    );
}

#[test]
fn durations_have_one_spelling() {
    let ttl = |v: &str| {
        Config::from_toml_str(&with_tables(&format!(
            "[[tables]]\ntable = \"t\"\nkey = \"t:{{id}}\"\nttl = \"{v}\"\n"
        )))
        .map(|c| c.tables[0].ttl)
    };
    assert_eq!(ttl("30s").unwrap(), Some(Duration::from_secs(30)));
    assert_eq!(ttl("1h30m").unwrap(), Some(Duration::from_secs(5400)));
    assert_eq!(ttl("1500ms").unwrap(), Some(Duration::from_millis(1500)));
    for bad in ["1 hour", "1h 30m", "3600", "", "-1s"] {
        let err = ttl(bad).unwrap_err().to_string();
        assert!(err.contains("is not a duration"), "{bad}: {err}");
    }
    assert!(ttl("0s")
        .unwrap_err()
        .to_string()
        .contains("shorter than 1ms"));
    assert!(ttl("999us")
        .unwrap_err()
        .to_string()
        .contains("shorter than 1ms"));
}

#[test]
fn collects_every_error() {
    let err = Config::from_toml_str(
        r#"
tabels = []
[postgres]
slot = "Bad-Slot"
[redis]
url = "http://:hunter2@cache"
[apply]
max_batch_changes = 0
max_transaction_changes = "x"
confirm_delay = 5
[metrics]
listen = "localhost:9187"
[log]
format = "text"
level = "verbose"
"#,
    )
    .unwrap_err();
    let want = [
        "postgres.url: missing (set postgres.url, postgres.url_file or PGCACHE__POSTGRES__URL)",
        "postgres.slot: \"Bad-Slot\" is not a replication slot name (1 to 63 of a-z, 0-9 and _)",
        "redis.url: \"http://:***@cache\" is not a Redis URL (examples: redis://localhost:6379, rediss://host:6380/0, redis+unix:///run/redis.sock)",
        "apply.max_batch_changes: expected a whole number of at least 1, found 0",
        "apply.max_transaction_changes: expected a whole number of at least 1, found \"x\"",
        "apply.confirm_delay: expected a string, found a number",
        "metrics.listen: \"localhost:9187\" is not an IP address and port (examples: 127.0.0.1:9187, [::]:9187; \"\" disables metrics)",
        "log.format: unknown format \"text\" (expected human or json)",
        "log.level: \"verbose\" is not a log level (trace, debug, info, warn, error, off, or directives like info,pgcache=debug)",
        "tables: no tables configured (add a [[tables]] entry for each table to cache)",
        "unknown key \"tabels\"",
    ];
    assert_eq!(err.errors(), want);
    // Display: one problem per line.
    assert_eq!(err.to_string(), want.join("\n"));
    assert!(!err.to_string().contains("hunter2"));
}

#[test]
fn unknown_keys_anywhere() {
    let errs = errors(&format!(
        "{MINIMAL}ttl = \"1h\"\nkey_prefix = \"x\"\n[postgres.tls]\nmode = 1\n[apply]\nbatch = 1\n"
    ));
    assert_eq!(
        errs,
        [
            "unknown key \"postgres.tls\"",
            "unknown key \"apply.batch\"",
            "unknown key \"tables[0].key_prefix\"",
        ]
    );
}

#[test]
fn wrong_shapes_are_named() {
    let errs = errors(
        "postgres = \"x\"\nredis = 5\ntables = 3\n[metrics]\nlisten = [1]\n[log]\nlevel = true\n",
    );
    assert_eq!(
        errs,
        [
            "postgres: expected a table, found a string",
            "postgres.url: missing (set postgres.url, postgres.url_file or PGCACHE__POSTGRES__URL)",
            "redis: expected a table, found a number",
            "redis.url: missing (set redis.url, redis.url_file or PGCACHE__REDIS__URL)",
            "metrics.listen: expected a string, found a list",
            "log.level: expected a string, found a boolean",
            "tables: expected a list of [[tables]] entries, found a number",
        ]
    );
    let errs = errors(&with_tables(
        "[[tables]]\ntable = \"t\"\nkey = \"t:{id}\"\ncolumns = \"id\"\n[[tables]]\ntable = \"u\"\nkey = \"u:{id}\"\ncolumns = [\"id\", 2]\n",
    ));
    assert_eq!(
        errs,
        [
            "tables[0].columns: expected a list of strings, found a string",
            "tables[1].columns[1]: expected a string, found a number",
        ]
    );
}

#[test]
fn table_rules_are_checked() {
    let errs = errors(&with_tables(
        r#"
[[tables]]
key = "a:{id}"
[[tables]]
table = "public.b"
[[tables]]
table = "x.y.z"
key = "{id}"
[[tables]]
table = "d"
key = "d:{id}"
columns = ["id", "id", ""]
[[tables]]
table = "e"
key = "e:{id}"
columns = []
[[tables]]
table = "public.f"
key = "f:{id}"
numeric = "float"
mode = "invalidate"
ttl = "1h"
[[tables]]
table = "f"
key = "pgcache:{id}"
[[tables]]
table = "g"
key = "pg{id}"
"#,
    ));
    assert_eq!(
        errs,
        [
            "tables[0].table: missing (e.g. table = \"public.users\")",
            "tables[1].key: missing (e.g. key = \"user:profile:{id}\")",
            "tables[2].table: \"x.y.z\" is not a table name (schema.table or table, e.g. public.users)",
            "tables[2].key: key template \"{id}\" must start with literal text that names the table, such as \"user:\" in \"user:{id}\"",
            "tables[3].columns: column \"id\" is listed twice",
            "tables[3].columns[2]: empty column name",
            "tables[4].columns: is empty (leave it out to store all columns)",
            "tables[5].ttl: has no effect in invalidate mode, which only deletes keys (remove it, or use mode = \"mirror\")",
            "tables[5].numeric: unknown numeric encoding \"float\" (expected string or number)",
            "tables[6].key: key prefix \"pgcache:\" overlaps \"pgcache:\", which pgcache keeps for its own keys",
            "tables[7].key: key prefix \"pg\" overlaps \"pgcache:\", which pgcache keeps for its own keys",
            "tables[5].table and tables[6].table: public.f is configured twice (one [[tables]] entry per table; for more keys that its changes delete, add [[tables.invalidate]] entries to it)",
            "tables[6].key and tables[7].key: key prefixes \"pgcache:\" and \"pg\" overlap, so TRUNCATE and verify could not tell the tables apart",
        ]
    );
}

#[test]
fn duplicate_tables_and_same_prefixes() {
    let errs = errors(&with_tables(
        "[[tables]]\ntable = \"users\"\nkey = \"user:{id}\"\n[[tables]]\ntable = \"public.users\"\nkey = \"user:{id}\"\n",
    ));
    assert_eq!(
        errs,
        [
            "tables[0].table and tables[1].table: public.users is configured twice (one [[tables]] entry per table; for more keys that its changes delete, add [[tables.invalidate]] entries to it)",
            "tables[0].key and tables[1].key: key prefixes \"user:\" and \"user:\" overlap, so TRUNCATE and verify could not tell the tables apart",
        ]
    );
    // Disjoint prefixes that share a start are fine.
    Config::from_toml_str(&with_tables(
        "[[tables]]\ntable = \"a\"\nkey = \"user:{id}\"\n[[tables]]\ntable = \"b\"\nkey = \"users:{id}\"\n",
    ))
    .unwrap();
}

#[test]
fn urls_are_checked_and_never_leak() {
    let with_urls = |pg: &str, redis: &str| {
        format!("[postgres]\nurl = \"{pg}\"\n[redis]\nurl = \"{redis}\"\n[[tables]]\ntable = \"t\"\nkey = \"t:{{id}}\"\n")
    };
    let errs = errors(&with_urls(
        "postgres://app:hunter2@db:notaport/app",
        "redis://:hunter2@cache:99999",
    ));
    assert_eq!(
        errs,
        [
            "postgres.url: \"postgres://app:***@db:notaport/app\" is not a valid connection string (invalid value for option `port`) (examples: postgres://user@host/db, host=/run/postgresql dbname=app)",
            "redis.url: \"redis://:***@cache:99999\" has a port that is not a number from 0 to 65535",
        ]
    );
    let errs = errors(&with_urls(
        "dbname=app password=hunter2",
        "redis://cache/zero",
    ));
    assert_eq!(
        errs,
        [
            "postgres.url: \"dbname=app password=***\" names no host (examples: postgres://user@host/db, host=/run/postgresql dbname=app)",
            "redis.url: \"redis://cache/zero\" has a database that is not a number (redis://host:6379/0)",
        ]
    );
    for ok in [
        "redis://localhost",
        "redis://:pw@[::1]:6379/0",
        "redis+unix:///run/redis.sock",
        "unix:///tmp/r.sock?db=1",
        "redis://[::1]",
    ] {
        Config::from_toml_str(&with_urls("postgres://h/db", ok))
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in [
        "redis://",
        "redis://:pw@/0",
        "localhost:6379",
        "redis+unix://relative",
        "redis://[::1",
    ] {
        let errs = errors(&with_urls("postgres://h/db", bad));
        assert!(errs[0].starts_with("redis.url: "), "{bad}: {errs:?}");
    }
    // Debug of a whole config hides the passwords too.
    let c = Config::from_toml_str(&with_urls(
        "postgres://app:hunter2@db/app",
        "redis://:hunter2@cache",
    ))
    .unwrap();
    assert!(!format!("{c:?}").contains("hunter2"), "{c:?}");
}

#[test]
fn toml_syntax_errors_give_the_line_without_secrets() {
    let err =
        Config::from_toml_str("[postgres]\nslot = \"a\"\nurl = \"postgres://u:hunter2@h/db\n")
            .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("config is not valid TOML: TOML parse error at line 3"),
        "{msg}"
    );
    assert!(!msg.contains("hunter2"), "{msg}");
    assert_eq!(err.errors().len(), 1);
}

#[test]
fn url_files_hold_secrets() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pg_url"), "postgres://app:hunter2@db/app\n").unwrap();
    let config = format!(
        "[postgres]\nurl_file = \"pg_url\"\n[redis]\nurl_file = \"{}\"\n[[tables]]\ntable = \"t\"\nkey = \"t:{{id}}\"\n",
        dir.path().join("redis_url").display()
    );
    let path = dir.path().join("pgcache.toml");
    std::fs::write(&path, &config).unwrap();

    // The Redis file does not exist yet; relative url_file paths are relative to the config.
    let err = Config::load(&path).unwrap_err();
    assert_eq!(err.errors().len(), 1, "{err}");
    assert!(
        err.errors()[0].starts_with("redis.url_file: cannot read "),
        "{err}"
    );

    std::fs::write(dir.path().join("redis_url"), "  redis://:pw@cache:6379 \n").unwrap();
    let c = Config::load(&path).unwrap();
    assert_eq!(c.postgres.url.expose(), "postgres://app:hunter2@db/app");
    assert_eq!(c.redis.url.expose(), "redis://:pw@cache:6379");

    let errs = errors(
        "[postgres]\nurl = \"postgres://h/db\"\nurl_file = \"/x\"\n[redis]\nurl = \"redis://h\"\n[[tables]]\ntable = \"t\"\nkey = \"t:{id}\"\n",
    );
    assert_eq!(
        errs,
        ["postgres.url and postgres.url_file: set one of them, not both"]
    );
}

#[test]
fn load_reports_missing_and_broken_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let err = Config::load(&missing).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("cannot read config file {}: ", missing.display())),
        "{err}"
    );

    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[postgres\nurl = 1\n").unwrap();
    let err = Config::load(&broken).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "config file {} is not valid TOML: TOML parse error at line 1",
            broken.display()
        )),
        "{err}"
    );
}

#[test]
fn modes_and_formats_display_as_written() {
    assert_eq!(Mode::Mirror.to_string(), "mirror");
    assert_eq!(Mode::Refresh.to_string(), "refresh");
    assert_eq!(Mode::Invalidate.to_string(), "invalidate");
    assert_eq!(Format::Json.to_string(), "json");
    assert_eq!(Format::Hash.to_string(), "hash");
}

#[test]
fn rediss_needs_a_ca_and_a_ca_needs_rediss() {
    let with_redis = |redis: &str| {
        format!("[postgres]\nurl = \"postgres://h/db\"\n[redis]\n{redis}\n[[tables]]\ntable = \"t\"\nkey = \"t:{{id}}\"\n")
    };
    assert_eq!(
        errors(&with_redis("url = \"rediss://user:pw@cache:6380\"")),
        ["redis.url: rediss:// checks the server's certificate, but no CA is configured: set redis.tls_ca_file = \"/path/to/ca.pem\" (the CA that signed Redis' certificate), or redis.tls_ca_file = \"system\" to trust the operating system's roots"]
    );
    let errs = errors(&with_redis(
        "url = \"redis://cache\"\ntls_ca_file = \"system\"",
    ));
    assert!(errs[0].contains("not rediss://"), "{errs:?}");
    let errs = errors(&with_redis(
        "url = \"rediss://cache/#insecure\"\ntls_ca_file = \"system\"",
    ));
    assert!(errs[0].contains("#insecure"), "{errs:?}");
    let errs = errors(&with_redis(
        "url = \"rediss://cache\"\ntls_ca_file = \"/nonexistent/redis-ca.pem\"",
    ));
    assert!(
        errs[0].starts_with("redis.tls_ca_file: cannot read /nonexistent/redis-ca.pem"),
        "{errs:?}"
    );
    let c = Config::from_toml_str(&with_redis(
        "url = \"rediss://user:pw@cache:6380\"\ntls_ca_file = \"system\"",
    ))
    .unwrap();
    c.redis.client().unwrap();

    // A relative CA file is relative to the config file.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("redis-ca.pem"), "").unwrap();
    let path = dir.path().join("pgcache.toml");
    std::fs::write(
        &path,
        with_redis("url = \"rediss://cache\"\ntls_ca_file = \"redis-ca.pem\""),
    )
    .unwrap();
    let c = Config::load(&path).unwrap();
    assert_eq!(
        c.redis.tls_ca_file,
        Some(RedisRoots::File(dir.path().join("redis-ca.pem")))
    );
}

#[test]
fn postgres_urls_take_the_tls_settings_libpq_takes() {
    let with_pg = |pg: &str| {
        format!("[postgres]\nurl = \"{pg}\"\n[redis]\nurl = \"redis://r\"\n[[tables]]\ntable = \"t\"\nkey = \"t:{{id}}\"\n")
    };
    for ok in [
        "postgres://u@db/app?sslmode=verify-full&sslrootcert=/etc/ca.pem",
        "postgres://u@db/app?sslmode=verify-ca",
        "postgres://u@db/app?sslrootcert=system&channel_binding=require",
        "host=db user=u sslmode=verify-full sslrootcert=system channel_binding=disable",
    ] {
        Config::from_toml_str(&with_pg(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    assert_eq!(
        errors(&with_pg("postgres://u:hunter2@db/app?channel_binding=yes")),
        ["postgres.url: \"postgres://u:***@db/app?channel_binding=yes\" is not usable: invalid channel_binding \"yes\": expected disable, prefer or require (examples: postgres://user@host/db, host=/run/postgresql dbname=app)"]
    );
    let errs = errors(&with_pg(
        "postgres://u@db/app?sslmode=require&sslrootcert=system",
    ));
    assert!(
        errs[0].contains("sslrootcert=system needs sslmode=verify-full"),
        "{errs:?}"
    );
}

#[test]
fn reader_url_is_optional_and_checked_like_postgres_url() {
    let base = "[postgres]\nurl = \"postgres://pgcache@db/app\"\n[redis]\nurl = \"redis://r\"\n[[tables]]\ntable = \"t\"\nkey = \"t:{id}\"\n";
    let c = Config::from_toml_str(base).unwrap();
    assert!(c.reader.url.is_none());
    let c = Config::from_toml_str_with_env(
        base,
        env(&[("PGCACHE__READER__URL", "postgres://reader:pw@db/app")]),
    )
    .unwrap();
    assert_eq!(
        c.reader.url.as_ref().map(Secret::expose),
        Some("postgres://reader:pw@db/app")
    );
    let errs = errors(&format!(
        "{base}[reader]\nurl = \"postgres://reader:hunter2@db:port/app\"\n"
    ));
    assert_eq!(
        errs,
        ["reader.url: \"postgres://reader:***@db:port/app\" is not a valid connection string (invalid value for option `port`) (examples: postgres://user@host/db, host=/run/postgresql dbname=app)"]
    );
    let errs = errors(&format!("{base}[reader]\nusername = \"x\"\n"));
    assert_eq!(errs, ["unknown key \"reader.username\""]);
}

#[test]
fn metrics_limits_are_checked() {
    let base = "[postgres]\nurl = \"postgres://pgcache@db/app\"\n[redis]\nurl = \"redis://r\"\n[[tables]]\ntable = \"t\"\nkey = \"t:{id}\"\n";
    let c = Config::from_toml_str(base).unwrap();
    assert_eq!(c.metrics.max_connections, DEFAULT_METRICS_MAX_CONNECTIONS);
    assert_eq!(c.metrics.header_timeout, DEFAULT_METRICS_HEADER_TIMEOUT);
    assert_eq!(c.metrics.request_timeout, DEFAULT_METRICS_REQUEST_TIMEOUT);
    let errs = errors(&format!(
        "{base}[metrics]\nmax_connections = 0\nheader_timeout = \"0s\"\nrequest_timeout = \"soon\"\n"
    ));
    assert_eq!(
        errs,
        [
            "metrics.max_connections: expected a whole number of at least 1, found 0",
            "metrics.header_timeout: must be more than 0s",
            "metrics.request_timeout: \"soon\" is not a duration (examples: 30s, 15m, 1h)",
        ]
    );
}

/// `[postgres]` and a table around the given `[redis]` section.
fn with_redis(redis: &str) -> String {
    format!(
        "[postgres]\nurl = \"postgres://pgcache@localhost/app\"\n[redis]\n{redis}\n\
         [[tables]]\ntable = \"public.users\"\nkey = \"user:{{id}}\"\n"
    )
}

fn redis_errors(redis: &str) -> Vec<String> {
    errors(&with_redis(redis))
}

#[test]
fn one_server_is_the_default_topology() {
    let c = Config::from_toml_str(MINIMAL).unwrap();
    assert_eq!(c.redis.topology, RedisTopology::Single);
    assert_eq!(c.redis.single_only("x"), Ok(()));
    let c = Config::from_toml_str(&with_redis("url = \"redis://h\"\ncluster = false")).unwrap();
    assert_eq!(c.redis.topology, RedisTopology::Single);
}

#[test]
fn cluster_takes_one_seed_or_several() {
    let c = Config::from_toml_str(&with_redis(
        "url = \"redis://10.0.0.1:6379\"\ncluster = true\nkey_prefix = \"app:\"",
    ))
    .unwrap();
    assert_eq!(
        c.redis.topology,
        RedisTopology::Cluster {
            seeds: vec![Secret::new("redis://10.0.0.1:6379")]
        }
    );
    assert_eq!(c.redis.url.expose(), "redis://10.0.0.1:6379");
    assert_eq!(c.redis.key_prefix, "app:");

    let c = Config::from_toml_str(&with_redis(
        "cluster = true\nurls = [\"redis://:pw@10.0.0.1:6379\", \"redis://:pw@10.0.0.2:6379/0\"]",
    ))
    .unwrap();
    let RedisTopology::Cluster { seeds } = &c.redis.topology else {
        panic!("{:?}", c.redis.topology)
    };
    let seeds: Vec<&str> = seeds.iter().map(Secret::expose).collect();
    assert_eq!(
        seeds,
        ["redis://:pw@10.0.0.1:6379", "redis://:pw@10.0.0.2:6379/0"]
    );
    assert_eq!(c.redis.url.expose(), "redis://:pw@10.0.0.1:6379");

    // TLS seeds with their CA.
    let c = Config::from_toml_str(&with_redis(
        "cluster = true\ntls_ca_file = \"system\"\nurls = [\"rediss://a:6380\", \"rediss://b:6380\"]",
    ))
    .unwrap();
    assert!(matches!(c.redis.topology, RedisTopology::Cluster { ref seeds } if seeds.len() == 2));
}

#[test]
fn cluster_seeds_come_from_the_environment_comma_separated() {
    let c = Config::from_toml_str_with_env(
        &with_redis("url = \"redis://ignored:1\""),
        env(&[
            ("PGCACHE__REDIS__CLUSTER", "true"),
            ("PGCACHE__REDIS__URL", ""),
            ("PGCACHE__REDIS__URLS", "redis://a:7000, redis://b:7001"),
        ]),
    );
    // url and urls together are refused, wherever they come from.
    let errs = c.expect_err("url and urls").errors().to_vec();
    assert!(
        errs[0].starts_with("redis.url (from PGCACHE__REDIS__URL) and redis.urls"),
        "{errs:?}"
    );

    let c = Config::from_toml_str_with_env(
        &with_redis("cluster = true\nurls = [\"redis://x:1\"]"),
        env(&[("PGCACHE__REDIS__URLS", "redis://a:7000, redis://b:7001")]),
    )
    .unwrap();
    let RedisTopology::Cluster { seeds } = &c.redis.topology else {
        panic!("{:?}", c.redis.topology)
    };
    let seeds: Vec<&str> = seeds.iter().map(Secret::expose).collect();
    assert_eq!(seeds, ["redis://a:7000", "redis://b:7001"]);
}

#[test]
fn cluster_seeds_are_checked() {
    let cases: &[(&str, &str)] = &[
        (
            "urls = [\"redis://a:1\"]\nurl = \"redis://b:1\"",
            "redis.urls: lists the seeds of a Redis Cluster, but redis.cluster is not true (set redis.cluster = true, or use redis.url for one server)",
        ),
        (
            "cluster = true\nurl = \"redis://b:1\"\nurls = [\"redis://a:1\"]",
            "redis.url and redis.urls: set one of them, not both (urls lists several seeds)",
        ),
        (
            "cluster = true\nurls = []",
            "redis.urls: empty; list at least one URL (e.g. [\"redis://10.0.0.1:6379\"])",
        ),
        (
            "cluster = true",
            "redis.url: missing (set redis.url, redis.url_file or PGCACHE__REDIS__URL)",
        ),
        (
            "cluster = \"yes\"\nurl = \"redis://a\"",
            "redis.cluster: expected true or false, found \"yes\"",
        ),
        (
            "cluster = true\nurl = \"redis+unix:///run/redis.sock\"",
            "redis.url: \"redis+unix:///run/redis.sock\" is a Unix socket, but a Redis Cluster is reached over TCP (redis://host:port)",
        ),
        (
            "cluster = true\nurl = \"redis://:secret@a:1/2\"",
            "redis.url: \"redis://:***@a:1/2\" names database 2, but a Redis Cluster has only database 0",
        ),
        (
            "cluster = true\nurls = [\"redis://a:1\", \"http://b\"]",
            "redis.urls[1]: \"http://b\" is not a Redis URL (examples: redis://localhost:6379, rediss://host:6380/0, redis+unix:///run/redis.sock)",
        ),
        (
            "cluster = true\ntls_ca_file = \"system\"\nurls = [\"rediss://a:1\", \"redis://b:1\"]",
            "redis.urls[1]: redis.tls_ca_file is set, but the URL is not rediss://, so nothing would use it (write rediss:// for TLS, or remove tls_ca_file)",
        ),
        (
            "cluster = true\nurls = [\"redis://a:1\", \"rediss://b:1\"]",
            "redis.urls[1]: rediss:// checks the server's certificate, but no CA is configured: set redis.tls_ca_file = \"/path/to/ca.pem\" (the CA that signed Redis' certificate), or redis.tls_ca_file = \"system\" to trust the operating system's roots",
        ),
        (
            "cluster = true\nurl = \"redis://a:1\"\nkey_prefix = \"app{1}:\"",
            "redis.key_prefix: \"app{1}:\" holds a brace; on a Redis Cluster a hash tag in the prefix would put every key, and every slot's checkpoint, in one hash slot (leave braces out)",
        ),
        (
            "cluster = true\nurls = [\"redis://:one@a:1\", \"redis://:two@b:1\"]",
            "redis.urls[1]: has another user or password than redis.urls[0]; the nodes of a Redis Cluster share one login, so every seed must carry the same",
        ),
    ];
    for (redis, expected) in cases {
        let errs = redis_errors(redis);
        assert_eq!(errs, [*expected], "for:\n{redis}");
    }
    // The password that differs is not printed.
    let errs = redis_errors("cluster = true\nurls = [\"redis://:one@a:1\", \"redis://:two@b:1\"]");
    assert!(
        !errs[0].contains("one") || !errs[0].contains("two@"),
        "{errs:?}"
    );
}

#[test]
fn sentinel_form_is_read() {
    let c = Config::from_toml_str(&with_redis(
        "key_prefix = \"p:\"\n[redis.sentinel]\nmaster = \"mymaster\"\n\
         urls = [\"redis://10.0.0.5:26379\", \"redis://:spw@10.0.0.6:26379\"]\n\
         username = \"pgcache\"\npassword = \"mpw\"\ndb = 3",
    ))
    .unwrap();
    let RedisTopology::Sentinel(sentinel) = &c.redis.topology else {
        panic!("{:?}", c.redis.topology)
    };
    assert_eq!(sentinel.master, "mymaster");
    let urls: Vec<&str> = sentinel.urls.iter().map(Secret::expose).collect();
    assert_eq!(
        urls,
        ["redis://10.0.0.5:26379", "redis://:spw@10.0.0.6:26379"]
    );
    assert_eq!(sentinel.username.as_deref(), Some("pgcache"));
    assert_eq!(sentinel.password.as_ref().map(Secret::expose), Some("mpw"));
    assert_eq!(sentinel.db, 3);
    assert_eq!(c.redis.key_prefix, "p:");
    assert!(!format!("{:?}", c.redis).contains("mpw"), "{:?}", c.redis);

    // Defaults, and the password from a file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    std::fs::write(&file, "from-file\n").unwrap();
    let c = Config::from_toml_str(&with_redis(&format!(
        "[redis.sentinel]\nmaster = \"m\"\nurls = [\"redis://s:26379\"]\npassword_file = {:?}",
        file.display().to_string()
    )))
    .unwrap();
    let RedisTopology::Sentinel(sentinel) = &c.redis.topology else {
        panic!("{:?}", c.redis.topology)
    };
    assert_eq!(
        sentinel.password.as_ref().map(Secret::expose),
        Some("from-file")
    );
    assert_eq!((sentinel.db, sentinel.username.as_deref()), (0, None));
}

#[test]
fn sentinel_form_is_checked() {
    let cases: &[(&str, &[&str])] = &[
        (
            "[redis.sentinel]\nurls = [\"redis://s:26379\"]",
            &["redis.sentinel.master: missing (the name the sentinels monitor the master under, e.g. \"mymaster\")"],
        ),
        (
            "[redis.sentinel]\nmaster = \"my master\"",
            &[
                "redis.sentinel.master: \"my master\" is not a master name (the name in the sentinels' SENTINEL MONITOR, without spaces)",
                "redis.sentinel.urls: missing (the sentinels, e.g. [\"redis://10.0.0.5:26379\", \"redis://10.0.0.6:26379\"])",
            ],
        ),
        (
            "url = \"redis://a\"\n[redis.sentinel]\nmaster = \"m\"\nurls = [\"redis://s:26379\"]",
            &["redis.url: with [redis.sentinel] the sentinels name the master; remove redis.url (the sentinels go in redis.sentinel.urls, the master's login in redis.sentinel.username and password)"],
        ),
        (
            "cluster = true\n[redis.sentinel]\nmaster = \"m\"\nurls = [\"redis://s:26379\"]",
            &["redis.cluster and redis.sentinel: a Redis Cluster has no sentinels; set one of them"],
        ),
        (
            "[redis.sentinel]\nmaster = \"m\"\nurls = [\"redis://s:26379\", \"unix:///tmp/s.sock\"]",
            &["redis.sentinel.urls[1]: \"unix:///tmp/s.sock\" is a Unix socket, but a sentinel is reached over TCP (redis://host:port)"],
        ),
        (
            "[redis.sentinel]\nmaster = \"m\"\nurls = [\"redis://s:26379\"]\ndb = -1\nport = 1",
            &[
                "redis.sentinel.db: expected a database number (0, 1, ...), found -1",
                "unknown key \"redis.sentinel.port\"",
            ],
        ),
        (
            "[redis.sentinel]\nmaster = \"m\"\nurls = [\"redis://s:26379\"]\npassword = \"a\"\npassword_file = \"b\"",
            &["redis.sentinel.password and redis.sentinel.password_file: set one of them, not both"],
        ),
    ];
    for (redis, expected) in cases {
        let errs = redis_errors(redis);
        assert_eq!(errs, *expected, "for:\n{redis}");
    }
}

#[test]
fn a_one_server_client_refuses_a_cluster_or_sentinels_and_says_what_runs_there() {
    let c = Config::from_toml_str(&with_redis("url = \"redis://a:1\"\ncluster = true")).unwrap();
    let message = c.redis.single_only("x").unwrap_err();
    assert_eq!(
        message,
        "redis.cluster = true (Redis Cluster) is not supported by x: it needs redis.url of one \
         server (the daemon, check, verify, status and the read helper run on a cluster)"
    );
    let err = c.redis.client().unwrap_err().to_string();
    assert!(err.contains("is not supported by this command"), "{err}");
    let c = Config::from_toml_str(&with_redis(
        "[redis.sentinel]\nmaster = \"m\"\nurls = [\"redis://s:26379\"]",
    ))
    .unwrap();
    assert!(c
        .redis
        .single_only("x")
        .unwrap_err()
        .ends_with("follow the master the sentinels name)"));
    assert_eq!(c.redis.single_or_sentinel("the daemon"), Ok(()));
}

#[test]
fn wait_replicas_is_read_and_checked() {
    let c = Config::from_toml_str(&with_redis("url = \"redis://a:1\"\nwait_replicas = 2")).unwrap();
    assert_eq!(c.redis.wait_replicas, Some(2));
    let c = Config::from_toml_str(&with_redis(
        "wait_replicas = 1\n[redis.sentinel]\nmaster = \"m\"\nurls = [\"redis://s:26379\"]",
    ))
    .unwrap();
    assert_eq!(c.redis.wait_replicas, Some(1));
    let c = Config::from_toml_str(&with_redis("url = \"redis://a:1\"")).unwrap();
    assert_eq!(c.redis.wait_replicas, None);
    let err =
        Config::from_toml_str(&with_redis("url = \"redis://a:1\"\nwait_replicas = 0")).unwrap_err();
    assert!(
        err.errors()
            .iter()
            .any(|e| e.starts_with("redis.wait_replicas:")),
        "{err:?}"
    );
}

#[test]
fn a_cluster_backfills_in_bigger_chunks_unless_told() {
    let one = Config::from_toml_str(MINIMAL).unwrap();
    assert_eq!(one.backfill.chunk_rows, DEFAULT_BACKFILL_CHUNK_ROWS);
    let cluster = with_redis("url = \"redis://10.0.0.1:6379\"\ncluster = true");
    let c = Config::from_toml_str(&cluster).unwrap();
    assert_eq!(c.backfill.chunk_rows, DEFAULT_CLUSTER_BACKFILL_CHUNK_ROWS);
    let c = Config::from_toml_str(&format!("{cluster}\n\n[backfill]\nchunk_rows = 700\n")).unwrap();
    assert_eq!(c.backfill.chunk_rows, 700);
}

#[test]
fn a_cluster_writes_bigger_batches_unless_told() {
    let one = Config::from_toml_str(MINIMAL).unwrap();
    assert_eq!(one.apply.max_batch_changes, DEFAULT_MAX_BATCH_CHANGES);
    let cluster = with_redis("url = \"redis://10.0.0.1:6379\"\ncluster = true");
    let c = Config::from_toml_str(&cluster).unwrap();
    assert_eq!(c.apply.max_batch_changes, DEFAULT_CLUSTER_MAX_BATCH_CHANGES);
    // Told, even to the one-server default: kept.
    let c = Config::from_toml_str(&format!(
        "{cluster}\n\n[apply]\nmax_batch_changes = 10000\n"
    ))
    .unwrap();
    assert_eq!(c.apply.max_batch_changes, 10_000);
}
