//! The end of a run: what happened, whether Redis matched Postgres, what it showed, and
//! what to try next. Pure text, so it is tested without servers.

use std::time::Duration;

use super::converge::TableCheck;
use super::sample::Sample;
use super::shop;

/// Everything the summary reports.
pub struct Summary<'a> {
    /// How long the traffic ran.
    pub ran: Duration,
    /// Taken after the writes stopped and the comparison ended.
    pub sample: &'a Sample,
    pub checks: &'a [TableCheck],
    /// How long after the last write Redis matched; `None`: it did not within `patience`.
    pub converged_in: Option<Duration>,
    pub patience: Duration,
    /// The last failed write or read, if any failed.
    pub problem: Option<&'a str>,
    pub redis_port: u16,
    /// Redis is a cluster: `redis-cli -c` follows its redirections.
    pub cluster: bool,
    pub pg_port: u16,
    /// The command that runs psql here.
    pub psql: &'a str,
    /// `--keep` was given: the servers stay up, so the commands can be tried now.
    pub keep: bool,
}

impl Summary<'_> {
    /// The text, ending with the `redis keys:` line.
    pub fn text(&self) -> String {
        let s = self.sample;
        let w = &s.workload;
        let r = &s.reader;
        let mut text = format!(
            "\nsummary after {:.1} s of traffic\n",
            self.ran.as_secs_f64()
        );
        text.push_str(&format!(
            "  writes     {} transactions changed {} rows in Postgres ({} of them the seed)\n",
            w.transactions,
            w.rows,
            shop::SEED_PRODUCTS + shop::SEED_CUSTOMERS
        ));
        match &s.progress {
            Some(p) => {
                let equal = if p.changes == w.rows {
                    " (= rows written)"
                } else {
                    ""
                };
                let latency = match (p.latency.mean_ms(), p.latency.max_ms()) {
                    (Some(mean), Some(max)) => {
                        format!("; commit to Redis {mean:.1} ms avg, {max:.1} ms max")
                    }
                    _ => String::new(),
                };
                text.push_str(&format!(
                    "  applied    {} changes{equal} in {} transactions{latency}\n",
                    p.changes, p.transactions
                ));
            }
            None => text.push_str("  applied    unknown (no metrics recorder)\n"),
        }
        text.push_str(&format!(
        "  reads      {} lookups through pgcache::Reader, hit rate {:.1}% ({} hits, {} misses, {} fills, {} lost fills, {} lease waits)\n",
        r.hits + r.misses,
        r.hit_rate() * 100.0,
        r.hits,
        r.misses,
        r.fills,
        r.lost_fills,
        r.waits
    ));
        if w.write_errors + w.read_errors > 0 {
            text.push_str(&format!(
                "  problems   {} failed writes, {} failed reads; last: {}\n",
                w.write_errors,
                w.read_errors,
                self.problem.unwrap_or_default()
            ));
        }
        text.push_str(&format!("  keys per table: {}\n", s.keys.pairs()));
        match self.converged_in {
            Some(after) => text.push_str(&format!(
                "  converged: Redis matches Postgres {:.2} s after the last write\n",
                after.as_secs_f64()
            )),
            None => text.push_str(&format!(
                "  NOT converged {} s after the last write\n",
                self.patience.as_secs()
            )),
        }
        for check in self.checks {
            text.push_str(&format!("    {check}\n"));
        }

        let (redis_port, pg_port) = (self.redis_port, self.pg_port);
        let redis_port = if self.cluster {
            format!("{redis_port} -c")
        } else {
            redis_port.to_string()
        };
        text.push_str(&format!(
        "
what you just saw
  - The workload wrote to Postgres only. The daemon read each committed transaction from
    the replication slot (pgoutput) and applied it to Redis in one MULTI/EXEC together with
    its checkpoint, so an order and the stock it took appear in Redis at the same instant.
  - products and customers are mirrored: every row has its key. orders are in refresh mode:
    pgcache::Reader cached them on first read, under a lease that stops a stampede and any
    stale fill, and the daemon kept the cached ones current as their status changed.
  - The hit rate is the reader's: each miss read Postgres once and filled Redis.

try next{}
  redis-cli -p {redis_port} GET product:1
  redis-cli -p {redis_port} --scan --pattern 'order:*'
  redis-cli -p {redis_port} HGETALL 'pgcache:{{{slot}}}:checkpoint'
  {psql} -h 127.0.0.1 -p {pg_port} -U postgres {db} -c \"UPDATE products SET price = 9.99 WHERE id = 1\"
  redis-cli -p {redis_port} GET product:1      (the new price, already there)
",
        if self.keep {
            ""
        } else {
            " (with `pgcache demo --keep`, which keeps the servers until Ctrl-C)"
        },
        slot = shop::SLOT,
        db = shop::DATABASE,
        psql = self.psql,
    ));
        // A stable last line for scripts and tests.
        text.push_str(&format!("redis keys: {}\n", s.keys.pairs()));
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::meter::{Latency, Progress};
    use crate::demo::sample::KeyCounts;
    use crate::demo::workload::Counts;
    use crate::reader::Stats;

    fn sample() -> Sample {
        Sample {
            workload: Counts {
                transactions: 10,
                rows: 320,
                ..Counts::default()
            },
            progress: Some(Progress {
                changes: 320,
                transactions: 11,
                latency: Latency {
                    count: 11,
                    sum: 0.011,
                    max: 0.004,
                },
                ..Progress::default()
            }),
            keys: KeyCounts(vec![("product", 200), ("customer", 105), ("order", 4)]),
            reader: Stats {
                hits: 9,
                misses: 1,
                fills: 1,
                ..Stats::default()
            },
            ..Sample::default()
        }
    }

    fn summary<'a>(sample: &'a Sample, checks: &'a [TableCheck], keep: bool) -> Summary<'a> {
        Summary {
            ran: Duration::from_secs(4),
            sample,
            checks,
            converged_in: Some(Duration::from_millis(120)),
            patience: Duration::from_secs(10),
            problem: None,
            redis_port: 6399,
            cluster: false,
            pg_port: 5499,
            psql: "psql",
            keep,
        }
    }

    #[test]
    fn reports_the_run_and_ends_with_the_key_counts() {
        let sample = sample();
        let checks = [TableCheck {
            table: "public.products",
            mirror: true,
            rows: 200,
            keys: 200,
            ..TableCheck::default()
        }];
        let text = summary(&sample, &checks, false).text();
        assert!(text.contains("applied    320 changes (= rows written) in 11 transactions; commit to Redis 1.0 ms avg, 4.0 ms max"), "{text}");
        assert!(text.contains("hit rate 90.0% (9 hits, 1 misses"), "{text}");
        assert!(text.contains("converged: Redis matches Postgres 0.12 s after the last write"));
        assert!(text.contains("public.products: 200 rows in Postgres = 200 keys in Redis"));
        assert!(text.contains("redis-cli -p 6399 HGETALL 'pgcache:{pgcache}:checkpoint'"));
        assert!(text.contains("psql -h 127.0.0.1 -p 5499 -U postgres shop"));
        assert!(text.contains("pgcache demo --keep"));
        assert!(
            text.ends_with("redis keys: product=200 customer=105 order=4\n"),
            "{text}"
        );
        assert!(!summary(&sample, &checks, true).text().contains("--keep"));
    }

    #[test]
    fn says_when_counts_differ_or_redis_did_not_converge() {
        let mut sample = sample();
        if let Some(p) = sample.progress.as_mut() {
            p.changes = 319;
        }
        let checks = [TableCheck {
            table: "public.products",
            mirror: true,
            rows: 200,
            keys: 199,
            missing: vec!["product:7".to_string()],
            ..TableCheck::default()
        }];
        let mut s = summary(&sample, &checks, false);
        s.converged_in = None;
        let text = s.text();
        assert!(text.contains("applied    319 changes in 11"), "{text}");
        assert!(text.contains("NOT converged 10 s after the last write"));
        assert!(text.contains("public.products: DIFFERS: 1 rows not in Redis (e.g. product:7)"));
    }
}
