//! The live view: on a terminal, a compact screen redrawn in place once a second; otherwise
//! one plain line per second. Pure functions from two samples to text.

use std::fmt::Write as _;
use std::time::Duration;

use super::meter::Latency;
use super::sample::Sample;

/// ANSI: cursor home, clear to the end of the screen.
const REDRAW: &str = "\x1b[H\x1b[J";
/// ANSI: clear the whole screen first, so the view starts on a clean terminal.
const CLEAR: &str = "\x1b[2J";

/// Draws samples to a terminal or a plain stream.
pub struct View {
    tty: bool,
    drawn: bool,
    header: String,
}

impl View {
    /// `header` names the servers; it heads every screen.
    pub fn new(tty: bool, header: String) -> View {
        View {
            tty,
            drawn: false,
            header,
        }
    }

    /// The text to print for the interval from `prev` to `now`.
    pub fn frame(&mut self, prev: &Sample, now: &Sample) -> String {
        if !self.tty {
            return format!("{}\n", line(prev, now));
        }
        let mut text = String::new();
        if !self.drawn {
            text.push_str(CLEAR);
            self.drawn = true;
        }
        text.push_str(REDRAW);
        text.push_str(&screen(&self.header, prev, now));
        text
    }
}

fn per_second(now: u64, prev: u64, interval: Duration) -> f64 {
    let seconds = interval.as_secs_f64();
    if seconds <= 0.0 {
        0.0
    } else {
        now.saturating_sub(prev) as f64 / seconds
    }
}

fn bytes(n: u64) -> String {
    match n {
        0..=9_999 => format!("{n} B"),
        10_000..=9_999_999 => format!("{:.1} kB", n as f64 / 1e3),
        _ => format!("{:.1} MB", n as f64 / 1e6),
    }
}

fn latency(l: Option<&Latency>) -> String {
    match l.and_then(|l| Some((l.mean_ms()?, l.max_ms()?))) {
        Some((mean, max)) => format!("{mean:.1} ms avg, {max:.1} ms max"),
        None => "no commits".to_string(),
    }
}

fn percent(rate: f64) -> String {
    format!("{:.1}%", rate * 100.0)
}

/// The numbers of one interval, shared by both layouts.
struct Interval {
    writes_tx: f64,
    writes_rows: f64,
    applied: Option<f64>,
    applied_tx: Option<f64>,
    reads: f64,
    /// Hit rate within this interval, `None` without lookups.
    recent_hit_rate: Option<f64>,
    errors: Vec<String>,
}

fn interval(prev: &Sample, now: &Sample) -> Interval {
    let dt = now.elapsed.saturating_sub(prev.elapsed);
    let (w, pw) = (&now.workload, &prev.workload);
    let lookups = |s: &crate::reader::Stats| s.hits + s.misses;
    let recent_lookups = lookups(&now.reader).saturating_sub(lookups(&prev.reader));
    let recent_hits = now.reader.hits.saturating_sub(prev.reader.hits);
    let mut errors = Vec::new();
    if w.write_errors > 0 {
        errors.push(format!("{} failed writes", w.write_errors));
    }
    if w.read_errors > 0 {
        errors.push(format!("{} failed reads", w.read_errors));
    }
    if let Some(p) = &now.progress {
        if p.errors > 0 {
            errors.push(format!("{} daemon errors", p.errors));
        }
        if p.reconnects > 0 {
            errors.push(format!("{} daemon reconnects", p.reconnects));
        }
    }
    if let Some(problem) = &now.problem {
        errors.push(format!("not sampled: {problem}"));
    }
    let progress = now.progress.zip(prev.progress);
    Interval {
        writes_tx: per_second(w.transactions, pw.transactions, dt),
        writes_rows: per_second(w.rows, pw.rows, dt),
        applied: progress.map(|(n, p)| per_second(n.changes, p.changes, dt)),
        applied_tx: progress.map(|(n, p)| per_second(n.transactions, p.transactions, dt)),
        reads: per_second(w.reads, pw.reads, dt),
        recent_hit_rate: (recent_lookups > 0).then(|| recent_hits as f64 / recent_lookups as f64),
        errors,
    }
}

fn or_unknown(value: Option<f64>, unit: &str) -> String {
    value.map_or_else(|| "?".to_string(), |v| format!("{v:.0} {unit}"))
}

/// One plain line: `[  3s] writes 98 tx/s ... | reads 392/s, hit rate 91.3% ...`.
pub fn line(prev: &Sample, now: &Sample) -> String {
    let i = interval(prev, now);
    let mut text = format!(
        "[{:>4.0}s] writes {:.0} tx/s {:.0} rows/s | applied {} | lag {}, {} | keys {} | reads {:.0}/s, hit rate {} (fills {})",
        now.elapsed.as_secs_f64(),
        i.writes_tx,
        i.writes_rows,
        or_unknown(i.applied, "changes/s"),
        now.lag_bytes.map_or_else(|| "?".to_string(), bytes),
        latency(now.latency.as_ref()),
        now.keys.pairs(),
        i.reads,
        percent(now.reader.hit_rate()),
        now.reader.fills,
    );
    if !i.errors.is_empty() {
        let _ = write!(text, " | {}", i.errors.join(", "));
    }
    text
}

/// The terminal screen.
pub fn screen(header: &str, prev: &Sample, now: &Sample) -> String {
    let i = interval(prev, now);
    let r = &now.reader;
    let mut s = format!(
        "{header}\n\
         running {:.0} s, Ctrl-C stops and cleans up\n\n",
        now.elapsed.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "  writes to Postgres   {:>13}  {:>13}   orders, stock, prices, sign-ups, deletes",
        format!("{:.0} tx/s", i.writes_tx),
        format!("{:.0} rows/s", i.writes_rows),
    );
    let _ = writeln!(
        s,
        "  applied to Redis     {:>13}  {:>13}   one MULTI/EXEC per batch, with the checkpoint",
        or_unknown(i.applied_tx, "tx/s"),
        or_unknown(i.applied, "changes/s"),
    );
    let _ = writeln!(
        s,
        "  replication lag      {} of WAL behind; commit to Redis {}",
        now.lag_bytes.map_or_else(|| "?".to_string(), bytes),
        latency(now.latency.as_ref())
    );
    let keys: Vec<String> = now
        .keys
        .0
        .iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    let _ = writeln!(s, "  keys per table       {}", keys.join("   "));
    let _ = writeln!(
        s,
        "  reads (Reader)       {:>6.0}/s   hit rate {} overall, {} this second",
        i.reads,
        percent(r.hit_rate()),
        i.recent_hit_rate.map_or_else(|| "-".to_string(), percent)
    );
    let _ = writeln!(
        s,
        "                       hits {}  misses {}  fills {}  lost fills {}  lease waits {}  db reads {}",
        r.hits, r.misses, r.fills, r.lost_fills, r.waits, r.db_reads
    );
    if !i.errors.is_empty() {
        let _ = writeln!(s, "\n  problems: {}", i.errors.join(", "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::meter::Progress;
    use crate::demo::sample::KeyCounts;
    use crate::demo::workload::Counts;
    use crate::reader::Stats;

    fn samples() -> (Sample, Sample) {
        let prev = Sample {
            elapsed: Duration::from_secs(1),
            workload: Counts {
                transactions: 100,
                rows: 300,
                reads: 400,
                ..Counts::default()
            },
            progress: Some(Progress {
                changes: 300,
                transactions: 100,
                ..Progress::default()
            }),
            reader: Stats {
                hits: 300,
                misses: 100,
                ..Stats::default()
            },
            ..Sample::default()
        };
        let now = Sample {
            elapsed: Duration::from_secs(3),
            workload: Counts {
                transactions: 300,
                rows: 800,
                reads: 1200,
                ..Counts::default()
            },
            progress: Some(Progress {
                changes: 790,
                transactions: 296,
                ..Progress::default()
            }),
            latency: Some(Latency {
                count: 2,
                sum: 0.004,
                max: 0.003,
            }),
            lag_bytes: Some(12_345),
            keys: KeyCounts(vec![("product", 200), ("customer", 104), ("order", 37)]),
            reader: Stats {
                hits: 1000,
                misses: 200,
                fills: 150,
                ..Stats::default()
            },
            problem: None,
        };
        (prev, now)
    }

    #[test]
    fn a_line_per_second_when_not_a_terminal() {
        let (prev, now) = samples();
        let text = View::new(false, String::new()).frame(&prev, &now);
        assert_eq!(
            text,
            "[   3s] writes 100 tx/s 250 rows/s | applied 245 changes/s | lag 12.3 kB, 2.0 ms avg, 3.0 ms max | keys product=200 customer=104 order=37 | reads 400/s, hit rate 83.3% (fills 150)\n"
        );
        assert!(!text.contains('\x1b'));
    }

    #[test]
    fn a_screen_redrawn_in_place_on_a_terminal() {
        let (prev, now) = samples();
        let mut view = View::new(true, "pgcache demo".to_string());
        let first = view.frame(&prev, &now);
        assert!(first.starts_with(CLEAR));
        let second = view.frame(&prev, &now);
        assert!(second.starts_with(REDRAW));
        assert!(second.contains("keys per table       product 200   customer 104   order 37"));
        assert!(second.contains("hit rate 83.3% overall, 87.5% this second"));
        assert!(!second.contains("problems"));
    }

    #[test]
    fn problems_and_unknowns_are_shown() {
        let (prev, mut now) = samples();
        now.workload.write_errors = 2;
        now.progress = None;
        now.problem = Some("Redis: scanning keys: timed out".to_string());
        let text = line(&prev, &now);
        assert!(text.contains("applied ?"));
        assert!(
            text.ends_with("| 2 failed writes, not sampled: Redis: scanning keys: timed out"),
            "{text}"
        );
    }
}
