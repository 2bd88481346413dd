//! Comparing Redis with Postgres (`pgcache verify`): once the daemon has caught up, every
//! mirrored table in Redis equals its projection from Postgres (G6).
//!
//! Per table:
//! - **mirror**: every row (or a sample) is read from Postgres, by key pages, with the read
//!   helper's query and encoder (so values are byte-identical to the stream's), and compared
//!   with Redis: a row without its key is *missing*, a key with another value is *stale*.
//!   Then the table's key space is walked with `SCAN`; a key whose row does not exist is
//!   *extra*.
//! - **refresh**: only keys that are cached are checked (stale, extra): absence is normal.
//! - **invalidate**: not compared; the application builds those values.
//! - A mirror table with a `ttl`, or whose backfill is running, is checked like refresh for
//!   absent keys (they may have expired, or not be loaded yet).
//!
//! Rows change while `verify` runs, and the daemon applies them a moment later. So a
//! difference is only a candidate. In each following round `verify` waits until the daemon
//! has applied everything committed so far (see `postgres::Settle`), then reads Redis and
//! Postgres again. A candidate that agrees is dropped; one whose row changed meanwhile
//! starts over; one whose row stayed the same and still differs gets a strike. Two strikes
//! make it drift. Candidates that kept changing through every round are reported as
//! *unsettled*, not as drift.

mod postgres;
mod redis;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use rand::Rng;
use serde::Serialize;

pub use self::redis::{count_keys, key_space_pattern, Servers};
use self::redis::{Cached, Conn, KeyWalk};
use crate::checkpoint;
use crate::config::{Config, Format, Mode, TableRule};
use crate::reader::source::{KeyTexts, RowSource};
use crate::reader::ReaderError;

/// Rows per Postgres page and keys per Redis read.
const CHUNK: usize = 500;
/// Rounds of re-reading candidates before giving up on them as unsettled.
const MAX_ROUNDS: usize = 6;
/// Rounds in a row a candidate must differ, with its row unchanged, to be drift.
const STRIKES: u8 = 2;

/// What to verify.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Only this table (`schema.table`, or `table` for `public`).
    pub table: Option<String>,
    /// Check this many random rows, and this many random keys, per table.
    pub sample: Option<u64>,
    /// Examples of each kind of difference to report per table.
    pub max_examples: usize,
    /// How long to wait for the daemon to apply a marker before rechecking anyway.
    pub settle_timeout: Duration,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            table: None,
            sample: None,
            max_examples: 5,
            settle_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no [[tables]] entry for {name:?} (configured: {known})")]
    UnknownTable { name: String, known: String },
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("redis: {0}")]
    Redis(String),
    #[error("{table}: {problem}")]
    Schema { table: String, problem: String },
    #[error("{0}")]
    Read(ReaderError),
}

impl From<::redis::RedisError> for VerifyError {
    fn from(e: ::redis::RedisError) -> Self {
        VerifyError::Redis(e.to_string())
    }
}

/// The result for every table checked.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tables: Vec<TableReport>,
    /// Every recheck saw the daemon catch up first; when `false`, differences may be
    /// changes still waiting in the slot (the daemon is stopped or far behind).
    pub settled: bool,
}

impl Report {
    pub fn drift(&self) -> bool {
        self.tables.iter().any(TableReport::drift)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TableReport {
    pub table: String,
    pub mode: String,
    /// `false` when the table's values are not compared (invalidate mode, missing table).
    pub checked: bool,
    /// Rows read from Postgres and compared.
    pub rows_checked: u64,
    /// Keys found in Redis and compared.
    pub keys_checked: u64,
    pub missing: u64,
    pub stale: u64,
    pub extra: u64,
    /// Keys that differed but kept changing through every recheck: not counted as drift.
    pub unsettled: u64,
    pub examples: Examples,
    pub notes: Vec<String>,
}

impl TableReport {
    pub fn drift(&self) -> bool {
        self.missing + self.stale + self.extra > 0
    }

    fn new(rule: &TableRule) -> TableReport {
        TableReport {
            table: rule.qualified_name(),
            mode: rule.mode.to_string(),
            checked: true,
            rows_checked: 0,
            keys_checked: 0,
            missing: 0,
            stale: 0,
            extra: 0,
            unsettled: 0,
            examples: Examples::default(),
            notes: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Examples {
    pub missing: Vec<Example>,
    pub stale: Vec<Example>,
    pub extra: Vec<Example>,
}

/// One differing key, with both sides (values shortened for display).
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    pub key: String,
    pub redis: Option<String>,
    pub postgres: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Agree,
    Missing,
    Stale,
    Extra,
}

/// A key that differed once, waiting for rechecks.
struct Candidate {
    /// How to read its row; `None` for a key no row could have (it does not parse).
    texts: Option<KeyTexts>,
    expected: Option<Vec<u8>>,
    cached: Cached,
    strikes: u8,
}

/// Compares Redis with Postgres for the configured tables.
///
/// # Errors
/// An unknown `--table`, an unreachable server, or a failed query.
pub async fn verify(config: &Config, options: &VerifyOptions) -> Result<Report, VerifyError> {
    let rules: Vec<&TableRule> = match &options.table {
        None => config.tables.iter().collect(),
        Some(name) => {
            let (schema, table) = name.split_once('.').unwrap_or(("public", name));
            match config.table(schema, table) {
                Some(rule) => vec![rule],
                None => {
                    return Err(VerifyError::UnknownTable {
                        name: name.clone(),
                        known: config
                            .tables
                            .iter()
                            .map(TableRule::qualified_name)
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            }
        }
    };
    let pool = postgres::pool(config.postgres.url.expose())?;
    let servers = Servers::connect(config, Duration::from_secs(10))
        .await
        .map_err(|e| VerifyError::Redis(e.to_string()))?;
    let checkpoint_key =
        checkpoint::checkpoint_key(&config.redis.key_prefix, &config.postgres.slot);
    let mut run = Run {
        settle: postgres::Settle::new(
            &config.postgres.slot,
            checkpoint_key.clone(),
            options.settle_timeout,
        ),
        key_prefix: config.redis.key_prefix.clone(),
        pool,
        redis: servers.data,
        scans: servers.scans,
        options: options.clone(),
    };
    let backfills = checkpoint::read_state(&mut run.redis, &checkpoint_key)
        .await
        .map(|state| state.backfills)
        .unwrap_or_default();
    let mut tables = Vec::new();
    for rule in rules {
        let backfill_running = backfills
            .get(&rule.qualified_name())
            .is_some_and(|b| !b.is_done());
        tables.push(run.table(rule, backfill_running).await?);
    }
    Ok(Report {
        tables,
        settled: run.settle.settled(),
    })
}

/// Connections and settings for one `verify` run.
struct Run {
    settle: postgres::Settle,
    key_prefix: String,
    pool: deadpool_postgres::Pool,
    /// Values are read here (on a cluster, from each key's master).
    redis: Conn,
    /// Key spaces are scanned here: the one server, or every master of a cluster.
    scans: Vec<::redis::aio::MultiplexedConnection>,
    options: VerifyOptions,
}

/// How one table's values are compared.
struct Table<'a> {
    rule: &'a TableRule,
    source: RowSource,
    /// For hash tables: json/jsonb columns, whose fields are stored as JSON text.
    json_columns: HashSet<String>,
    /// An absent key is not a difference (refresh mode, a TTL, a backfill under way).
    absent_ok: bool,
}

impl Table<'_> {
    fn verdict(&self, expected: &Option<Vec<u8>>, cached: &Cached) -> Verdict {
        match (expected, cached) {
            (None, Cached::Absent) => Verdict::Agree,
            (None, _) => Verdict::Extra,
            (Some(_), Cached::Absent) if self.absent_ok => Verdict::Agree,
            (Some(_), Cached::Absent) => Verdict::Missing,
            (Some(row), Cached::String(value)) if self.rule.format == Format::Json => {
                if row == value {
                    Verdict::Agree
                } else {
                    Verdict::Stale
                }
            }
            (Some(row), Cached::Hash(fields)) if self.rule.format == Format::Hash => {
                if redis::hash_fields(row, &self.json_columns).as_ref() == Some(fields) {
                    Verdict::Agree
                } else {
                    Verdict::Stale
                }
            }
            (Some(_), _) => Verdict::Stale,
        }
    }
}

impl Run {
    async fn table(
        &mut self,
        rule: &TableRule,
        backfill_running: bool,
    ) -> Result<TableReport, VerifyError> {
        let mut report = TableReport::new(rule);
        if rule.mode == Mode::Invalidate {
            report.checked = false;
            report
                .notes
                .push("invalidate mode: values are the application's, not compared".into());
            return Ok(report);
        }
        let client = postgres::client(&self.pool).await?;
        let Some(scan) = postgres::KeyScan::new(&client, rule).await? else {
            report.checked = false;
            report.notes.push("the table does not exist".into());
            return Ok(report);
        };
        let json_columns = match rule.format {
            Format::Hash => postgres::json_columns(&client, rule)
                .await?
                .into_iter()
                .collect(),
            Format::Json => HashSet::new(),
        };
        drop(client);
        let mut absent_ok = rule.mode == Mode::Refresh;
        if rule.mode == Mode::Mirror && rule.ttl.is_some() {
            absent_ok = true;
            report
                .notes
                .push("ttl is set: absent keys may have expired, so they are not counted".into());
        }
        if rule.mode == Mode::Mirror && backfill_running {
            absent_ok = true;
            report
                .notes
                .push("a backfill is running: absent keys are not counted".into());
        }
        let table = Table {
            rule,
            source: postgres::source(rule),
            json_columns,
            absent_ok,
        };
        let mut candidates = BTreeMap::new();
        if rule.mode == Mode::Mirror {
            report.rows_checked = self.rows_pass(&table, &scan, &mut candidates).await?;
        }
        report.keys_checked = self.keys_pass(&table, &mut candidates).await?;
        self.recheck(&table, &mut candidates, &mut report).await?;
        Ok(report)
    }

    /// Postgres first: every row (or a sample) against its key.
    async fn rows_pass(
        &mut self,
        table: &Table<'_>,
        scan: &postgres::KeyScan,
        candidates: &mut BTreeMap<String, Candidate>,
    ) -> Result<u64, VerifyError> {
        let mut checked = 0u64;
        let client = postgres::client(&self.pool).await?;
        if let Some(n) = self.options.sample {
            let rows = scan.sample(&client, n).await?;
            drop(client);
            for chunk in rows.chunks(CHUNK) {
                checked += chunk.len() as u64;
                let keys = self.key_texts(table.rule, chunk);
                self.compare(table, keys, Vec::new(), candidates).await?;
            }
            return Ok(checked);
        }
        let mut cursor: Option<Vec<String>> = None;
        loop {
            let (rows, next) = scan.next(&client, cursor.as_deref(), CHUNK).await?;
            checked += rows.len() as u64;
            let last = rows.len() < CHUNK;
            let keys = self.key_texts(table.rule, &rows);
            self.compare(table, keys, Vec::new(), candidates).await?;
            match next {
                Some(next) if !last => cursor = Some(next),
                _ => return Ok(checked),
            }
        }
    }

    /// Then Redis: every key of the table's key space (or a sample) against its row.
    async fn keys_pass(
        &mut self,
        table: &Table<'_>,
        candidates: &mut BTreeMap<String, Candidate>,
    ) -> Result<u64, VerifyError> {
        let mut walk = KeyWalk::new(&self.key_prefix, table.rule);
        let mut checked = 0u64;
        let mut seen = 0u64;
        let mut reservoir: Vec<String> = Vec::new();
        let mut pending: Vec<String> = Vec::new();
        while let Some(keys) = walk.next(&self.scans).await? {
            match self.options.sample {
                // Reservoir sampling: each key of the walk is kept with equal chance.
                Some(n) => {
                    for key in keys {
                        seen += 1;
                        if (reservoir.len() as u64) < n {
                            reservoir.push(key);
                        } else {
                            let j = rand::thread_rng().gen_range(0..seen);
                            if j < n {
                                reservoir[j as usize] = key;
                            }
                        }
                    }
                }
                None => {
                    pending.extend(keys);
                    if pending.len() >= CHUNK {
                        checked += pending.len() as u64;
                        let batch = std::mem::take(&mut pending);
                        self.compare_keys(table, batch, candidates).await?;
                    }
                }
            }
        }
        pending.extend(reservoir);
        for batch in pending.chunks(CHUNK) {
            checked += batch.len() as u64;
            self.compare_keys(table, batch.to_vec(), candidates).await?;
        }
        Ok(checked)
    }

    async fn compare_keys(
        &mut self,
        table: &Table<'_>,
        keys: Vec<String>,
        candidates: &mut BTreeMap<String, Candidate>,
    ) -> Result<(), VerifyError> {
        let mut parsed = Vec::new();
        let mut foreign = Vec::new();
        for key in keys {
            match self.parse(table.rule, &key) {
                Some(texts) => parsed.push(texts),
                None => foreign.push(key),
            }
        }
        self.compare(table, parsed, foreign, candidates).await
    }

    /// A key's column values, if the key could have been rendered from a row.
    fn parse(&self, rule: &TableRule, key: &str) -> Option<KeyTexts> {
        let values = rule.key.parse_key(&self.key_prefix, key)?;
        let texts = values
            .into_iter()
            .map(String::from_utf8)
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        Some(KeyTexts {
            redis_key: key.to_string(),
            texts,
        })
    }

    fn key_texts(&self, rule: &TableRule, rows: &[Vec<String>]) -> Vec<KeyTexts> {
        rows.iter()
            .map(|texts| {
                let values: Vec<&[u8]> = texts.iter().map(|t| t.as_bytes()).collect();
                KeyTexts {
                    redis_key: rule.key.render(&self.key_prefix, &values),
                    texts: texts.clone(),
                }
            })
            .collect()
    }

    /// Reads both sides of `keys` (and Redis only for `foreign` keys, which no row can
    /// have) and records every difference as a candidate.
    async fn compare(
        &mut self,
        table: &Table<'_>,
        keys: Vec<KeyTexts>,
        foreign: Vec<String>,
        candidates: &mut BTreeMap<String, Candidate>,
    ) -> Result<(), VerifyError> {
        let keys: Vec<KeyTexts> = keys
            .into_iter()
            .filter(|k| !candidates.contains_key(&k.redis_key))
            .collect();
        if keys.is_empty() && foreign.is_empty() {
            return Ok(());
        }
        let expected = postgres::expected(&table.source, &self.pool, &keys).await?;
        let names: Vec<String> = keys
            .iter()
            .map(|k| k.redis_key.clone())
            .chain(foreign.iter().cloned())
            .collect();
        let cached = redis::read(&mut self.redis, table.rule.format, &names).await?;
        let sides = keys
            .into_iter()
            .map(Some)
            .zip(expected)
            .chain(foreign.iter().map(|_| (None, None)));
        for ((texts, expected), (name, cached)) in sides.zip(names.into_iter().zip(cached)) {
            if table.verdict(&expected, &cached) != Verdict::Agree {
                candidates.insert(
                    name,
                    Candidate {
                        texts,
                        expected,
                        cached,
                        strikes: 0,
                    },
                );
            }
        }
        Ok(())
    }

    /// Rounds of: wait for the daemon, read Redis, read Postgres, judge.
    async fn recheck(
        &mut self,
        table: &Table<'_>,
        candidates: &mut BTreeMap<String, Candidate>,
        report: &mut TableReport,
    ) -> Result<(), VerifyError> {
        for _ in 0..MAX_ROUNDS {
            if candidates.is_empty() {
                break;
            }
            let client = postgres::client(&self.pool).await?;
            self.settle.wait(&client, &mut self.redis).await?;
            drop(client);
            let names: Vec<String> = candidates.keys().cloned().collect();
            let cached = redis::read(&mut self.redis, table.rule.format, &names).await?;
            let readable: Vec<KeyTexts> = candidates
                .values()
                .filter_map(|c| c.texts.clone())
                .collect();
            let mut expected = Vec::with_capacity(readable.len());
            for chunk in readable.chunks(CHUNK) {
                expected.extend(postgres::expected(&table.source, &self.pool, chunk).await?);
            }
            let mut expected = expected.into_iter();
            for (name, cached) in names.into_iter().zip(cached) {
                let Some(candidate) = candidates.get_mut(&name) else {
                    continue;
                };
                let now = match candidate.texts {
                    Some(_) => expected.next().flatten(),
                    None => None,
                };
                let verdict = table.verdict(&now, &cached);
                if verdict == Verdict::Agree {
                    candidates.remove(&name);
                    continue;
                }
                if now == candidate.expected {
                    candidate.strikes += 1;
                } else {
                    candidate.strikes = 0;
                    candidate.expected = now;
                }
                candidate.cached = cached;
                if candidate.strikes >= STRIKES {
                    if let Some(candidate) = candidates.remove(&name) {
                        self.record(table, report, name, candidate, verdict);
                    }
                }
            }
        }
        report.unsettled = candidates.len() as u64;
        if report.unsettled > 0 {
            report.notes.push(format!(
                "{} key(s) kept changing while verify ran; not counted as drift",
                report.unsettled
            ));
        }
        Ok(())
    }

    fn record(
        &self,
        table: &Table<'_>,
        report: &mut TableReport,
        key: String,
        candidate: Candidate,
        verdict: Verdict,
    ) {
        let (count, examples) = match verdict {
            Verdict::Missing => (&mut report.missing, &mut report.examples.missing),
            Verdict::Stale => (&mut report.stale, &mut report.examples.stale),
            Verdict::Extra => (&mut report.extra, &mut report.examples.extra),
            Verdict::Agree => return,
        };
        *count += 1;
        if examples.len() < self.options.max_examples {
            examples.push(Example {
                key,
                redis: show_cached(&candidate.cached),
                postgres: candidate
                    .expected
                    .as_deref()
                    .map(|row| match table.rule.format {
                        Format::Json => shorten(&String::from_utf8_lossy(row)),
                        Format::Hash => redis::hash_fields(row, &table.json_columns)
                            .map(|f| show_fields(&f))
                            .unwrap_or_else(|| shorten(&String::from_utf8_lossy(row))),
                    }),
            });
        }
    }
}

fn show_cached(cached: &Cached) -> Option<String> {
    match cached {
        Cached::Absent => None,
        Cached::String(v) => Some(shorten(&String::from_utf8_lossy(v))),
        Cached::Hash(fields) => Some(show_fields(fields)),
        Cached::Other(kind) => Some(format!("<a {kind}, not a string or hash>")),
    }
}

fn show_fields(fields: &BTreeMap<String, Vec<u8>>) -> String {
    let map: BTreeMap<&str, String> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    shorten(&serde_json::to_string(&map).unwrap_or_default())
}

/// Values are shown whole up to 300 characters.
fn shorten(text: &str) -> String {
    const MAX: usize = 300;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(mode: &str, format: &str) -> TableRule {
        Config::from_toml_str(&format!(
            "[postgres]\nurl = \"postgres://u@h/db\"\n[redis]\nurl = \"redis://h\"\n\
             [[tables]]\ntable = \"t\"\nkey = \"t:{{id}}\"\nmode = \"{mode}\"\nformat = \"{format}\"\n"
        ))
        .unwrap()
        .tables
        .remove(0)
    }

    fn table(rule: &TableRule, absent_ok: bool) -> Table<'_> {
        Table {
            rule,
            source: postgres::source(rule),
            json_columns: HashSet::new(),
            absent_ok,
        }
    }

    #[test]
    fn verdicts_for_json_tables() {
        let r = rule("mirror", "json");
        let t = table(&r, false);
        let row = Some(br#"{"id":1}"#.to_vec());
        let same = Cached::String(br#"{"id":1}"#.to_vec());
        assert_eq!(t.verdict(&row, &same), Verdict::Agree);
        assert_eq!(t.verdict(&row, &Cached::Absent), Verdict::Missing);
        assert_eq!(
            t.verdict(&row, &Cached::String(br#"{"id":2}"#.to_vec())),
            Verdict::Stale
        );
        assert_eq!(t.verdict(&None, &same), Verdict::Extra);
        assert_eq!(t.verdict(&None, &Cached::Absent), Verdict::Agree);
        assert_eq!(
            t.verdict(&row, &Cached::Other("list".into())),
            Verdict::Stale
        );
        // Refresh mode: not cached is fine.
        let t = table(&r, true);
        assert_eq!(t.verdict(&row, &Cached::Absent), Verdict::Agree);
    }

    #[test]
    fn verdicts_for_hash_tables() {
        let r = rule("mirror", "hash");
        let t = table(&r, false);
        let row = Some(br#"{"id":1,"name":"x","gone":null}"#.to_vec());
        let fields: BTreeMap<String, Vec<u8>> = [
            ("id".to_string(), b"1".to_vec()),
            ("name".to_string(), b"x".to_vec()),
        ]
        .into();
        assert_eq!(
            t.verdict(&row, &Cached::Hash(fields.clone())),
            Verdict::Agree
        );
        let mut other = fields;
        other.insert("name".into(), b"y".to_vec());
        assert_eq!(t.verdict(&row, &Cached::Hash(other)), Verdict::Stale);
    }

    #[test]
    fn long_values_are_shortened() {
        assert_eq!(shorten("abc"), "abc");
        let long = "é".repeat(400);
        let short = shorten(&long);
        assert_eq!(short.chars().count(), 301);
        assert!(short.ends_with('…'));
    }
}
