//! The read helper against real servers: stampedes across processes, stale fills against
//! the daemon, Redis and Postgres outages, dead lease holders, and byte-identical values.
//!
//! - `processes`: several OS processes (stampede, a killed lease holder). They re-run this
//!   test binary on one of the `*_worker` tests, with `READER_IT_*` variables saying what to
//!   do; without them a worker returns at once.
//! - `consistency`: stale fills, byte-identical values, negative caching, refused keys.
//! - `availability`: Redis and Postgres outages.
//! - `lookups`: single flight in one process, `get_many`, early refresh.
//! - `computed`: `get_with` and `[[tables.invalidate]]` rules; tables stored as hashes.
//! - `monotonic`: readers in several processes never see a row go back (G10), while the
//!   daemon lags, is killed, and Redis loses its data.
//! - `written`: read-your-writes: waiting for the daemon to apply a position.

mod availability;
pub(crate) mod computed;
mod consistency;
mod lookups;
mod monotonic;
mod pool;
mod processes;
mod written;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgcache::config::Config;
use pgcache::reader::{ReaderOptions, Stats};
use pgcache::Reader;
use serde_json::{json, Value};

use crate::common::Env;

const WORKER_MODE: &str = "READER_IT_WORKER";
const WORKER_CONFIG: &str = "READER_IT_CONFIG";
const WORKER_DIR: &str = "READER_IT_DIR";
const WORKER_TASKS: &str = "READER_IT_TASKS";
const WORKER_LEASE_MS: &str = "READER_IT_LEASE_MS";
const RESULT_PREFIX: &str = "READER-IT-RESULT ";

const ITEMS: &str =
    "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2));";
const ITEMS_RULE: &str = "[[tables]]\ntable = \"public.items\"\nkey = \"item:{id}\"\n";

/// For tests of the lease mechanics alone, with no daemon: nothing writes the checkpoint,
/// so mark it as applied through every position, as a daemon that keeps up would. The
/// fill's wait for the daemon (monotonic reads) is tested against the real daemon in
/// `monotonic`.
pub(crate) async fn daemon_caught_up(env: &Env) {
    let mut r = env.redis().await;
    let _: () = redis::cmd("HSET")
        .arg("pgcache:{pgcache}:checkpoint")
        .arg("applied")
        .arg("FFFFFFFFFFFFFFFF")
        .query_async(&mut r)
        .await
        .expect("mark the checkpoint");
}

fn reader(config: &Config, options: ReaderOptions) -> Reader {
    Reader::from_config_with(config, options).expect("reader")
}

fn long_leases() -> ReaderOptions {
    // Only the daemon may end these leases within a test.
    ReaderOptions::default().lease_ttl(Duration::from_secs(30))
}

async fn exists(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(conn)
        .await
        .expect("EXISTS")
        == 1
}

async fn del(conn: &mut redis::aio::MultiplexedConnection, key: &str) {
    redis::cmd("DEL")
        .arg(key)
        .query_async::<i64>(conn)
        .await
        .expect("DEL");
}

/// The whole Postgres server log (the harness's `log()` is only its tail).
fn full_pg_log(env: &Env) -> String {
    let path = env
        .pg
        .data_dir()
        .parent()
        .expect("data dir has a parent")
        .join("postgres.log");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Row reads the reader sent for `items`, as the server logged them.
fn item_reads(env: &Env) -> usize {
    full_pg_log(env)
        .lines()
        .filter(|line| {
            line.contains("statement: SELECT k.o")
                && line.contains(r#"LEFT JOIN "public"."items" AS t"#)
        })
        .count()
}

fn worker_command(test: &str, mode: &str, config: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(WORKER_MODE, mode)
        .env(WORKER_CONFIG, config)
        .env(WORKER_DIR, dir)
        .stdin(Stdio::null());
    cmd
}

fn stats_json(s: &Stats) -> Value {
    json!({
        "hits": s.hits, "misses": s.misses, "fills": s.fills, "lost_fills": s.lost_fills,
        "waits": s.waits, "coalesced": s.coalesced, "fallbacks": s.fallbacks,
        "wait_timeouts": s.wait_timeouts, "db_reads": s.db_reads,
    })
}

/// Waits (bounded) for `path` to exist.
async fn wait_for_file(path: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}
