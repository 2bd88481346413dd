//! The figures a bench run produces, the targets they are held to, and the two ways they
//! are written out: a plain table for people and a JSON file for tools.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};

/// What a figure is held to. Every figure carries a floor measured in the same run; the
/// target says which comparison decides pass or fail.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// `ratio >= x` (ratio = pgcache / floor, in the direction where higher is better).
    RatioAtLeast(f64),
    /// `pgcache < x`, in the figure's unit.
    Below(f64),
    /// `pgcache <= floor + x`, in the figure's unit.
    AtMostFloorPlus(f64),
    /// `pgcache == x`.
    Exactly(f64),
    /// Reported for reference, not held to anything.
    None,
}

impl Target {
    pub fn describe(self, unit: &str) -> String {
        match self {
            Target::RatioAtLeast(x) => format!("ratio >= {x}"),
            Target::Below(x) => format!("< {} {unit}", trim_float(x)),
            Target::AtMostFloorPlus(x) => format!("<= floor + {} {unit}", trim_float(x)),
            Target::Exactly(x) => format!("= {}", trim_float(x)),
            Target::None => "-".to_string(),
        }
    }

    fn check(self, pgcache: f64, floor: f64, ratio: f64) -> Option<bool> {
        match self {
            Target::RatioAtLeast(x) => Some(ratio >= x),
            Target::Below(x) => Some(pgcache < x),
            Target::AtMostFloorPlus(x) => Some(pgcache <= floor + x),
            Target::Exactly(x) => Some((pgcache - x).abs() < f64::EPSILON),
            Target::None => None,
        }
    }
}

/// One line of the results.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable name, e.g. `catchup.updates`; the JSON is keyed by it.
    pub id: String,
    pub title: String,
    pub unit: String,
    /// What pgcache achieved.
    pub pgcache: Option<f64>,
    /// The same work done by the floor (`floor_name`) in the same run.
    pub floor: Option<f64>,
    pub floor_name: String,
    /// pgcache relative to the floor, oriented so that 1.0 means "as good as the floor".
    pub ratio: Option<f64>,
    pub target: String,
    #[serde(skip)]
    pub target_rule: Target,
    /// `None` when the figure has no target or could not be measured.
    pub pass: Option<bool>,
    /// Why the figure could not be measured.
    pub error: Option<String>,
    /// Everything else measured on the way (raw seconds, counts, the daemon's own view).
    pub details: Value,
}

/// Whether a higher or a lower number is better; decides how the ratio is oriented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// A figure before it is measured: its name, unit, floor and target.
#[derive(Debug, Clone)]
pub struct FigureSpec {
    pub id: String,
    pub title: String,
    pub unit: &'static str,
    pub floor_name: &'static str,
    pub better: Better,
    pub target: Target,
}

impl FigureSpec {
    pub fn new(
        id: impl Into<String>,
        title: impl Into<String>,
        unit: &'static str,
        floor_name: &'static str,
        better: Better,
        target: Target,
    ) -> FigureSpec {
        FigureSpec {
            id: id.into(),
            title: title.into(),
            unit,
            floor_name,
            better,
            target,
        }
    }

    /// The figure with pgcache's number and the floor's; the ratio and the verdict follow.
    pub fn measured(&self, pgcache: f64, floor: f64, details: Value) -> Figure {
        let ratio = match self.better {
            Better::Higher => pgcache / floor,
            Better::Lower => floor / pgcache,
        };
        let sane = pgcache.is_finite() && floor.is_finite() && ratio.is_finite();
        let mut figure = self.blank(details);
        if !sane {
            figure.error = Some(format!(
                "not a usable measurement: pgcache {pgcache}, floor {floor}"
            ));
            return figure;
        }
        figure.pgcache = Some(pgcache);
        figure.floor = Some(floor);
        figure.ratio = Some(ratio);
        figure.pass = self.target.check(pgcache, floor, ratio);
        figure
    }

    /// The figure as not measured, with the reason.
    pub fn failed(&self, reason: impl Into<String>) -> Figure {
        let mut figure = self.blank(Value::Null);
        figure.error = Some(reason.into());
        figure
    }

    fn blank(&self, details: Value) -> Figure {
        Figure {
            id: self.id.clone(),
            title: self.title.clone(),
            unit: self.unit.to_string(),
            pgcache: None,
            floor: None,
            floor_name: self.floor_name.to_string(),
            ratio: None,
            target: self.target.describe(self.unit),
            target_rule: self.target,
            pass: None,
            error: None,
            details,
        }
    }
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub quick: bool,
    /// `release` or `debug`: a debug build's numbers say little.
    pub build: &'static str,
    pub started_unix: u64,
    pub seconds: f64,
    pub machine: Value,
    pub figures: Vec<Figure>,
}

impl Report {
    /// Figures that could not be measured.
    pub fn failures(&self) -> impl Iterator<Item = &Figure> {
        self.figures.iter().filter(|f| f.error.is_some())
    }

    /// The results as a plain table, then one line per figure that could not be measured.
    pub fn table(&self) -> String {
        let header = ["figure", "pgcache", "floor", "ratio", "target", "result"];
        let mut rows: Vec<[String; 6]> = Vec::new();
        for f in &self.figures {
            let value = |v: Option<f64>| match v {
                Some(v) => format!("{} {}", human(v), f.unit),
                None => "-".to_string(),
            };
            let floor = match f.floor {
                Some(v) => format!("{} {} ({})", human(v), f.unit, f.floor_name),
                None => format!("- ({})", f.floor_name),
            };
            let result = match (&f.error, f.pass) {
                (Some(_), _) => "FAILED".to_string(),
                (None, Some(true)) => "pass".to_string(),
                (None, Some(false)) => "MISS".to_string(),
                (None, None) => "info".to_string(),
            };
            rows.push([
                f.id.clone(),
                value(f.pgcache),
                floor,
                f.ratio.map_or("-".to_string(), |r| format!("{r:.2}")),
                f.target.clone(),
                result,
            ]);
        }
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String]| {
            let mut text = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                let pad = w.saturating_sub(cell.chars().count());
                // Numbers right-aligned, words left-aligned.
                if (1..=3).contains(&i) {
                    text.push_str(&" ".repeat(pad));
                    text.push_str(cell);
                } else {
                    text.push_str(cell);
                    text.push_str(&" ".repeat(pad));
                }
            }
            let _ = writeln!(out, "{}", text.trim_end());
        };
        line(&mut out, &header.map(String::from));
        line(&mut out, &widths.map(|w| "-".repeat(w)));
        for row in &rows {
            line(&mut out, row);
        }
        let failures: Vec<&Figure> = self.failures().collect();
        if !failures.is_empty() {
            out.push('\n');
            for f in failures {
                let _ = writeln!(
                    out,
                    "FAILED {}: {}",
                    f.id,
                    f.error.as_deref().unwrap_or_default()
                );
            }
        }
        out
    }

    /// One line on how the run was made: build, scale, time, machine load.
    pub fn summary(&self) -> String {
        let load = |key: &str| {
            self.machine[key]
                .as_array()
                .and_then(|a| a.first())
                .and_then(Value::as_f64)
                .map_or("?".to_string(), |l| format!("{l:.2}"))
        };
        format!(
            "{} build, {} run, {:.0} s, {} CPUs, load average {} at start and {} at end",
            self.build,
            if self.quick { "quick (smoke)" } else { "full" },
            self.seconds,
            self.machine["cpus"],
            load("loadavg_at_start"),
            load("loadavg_at_end"),
        )
    }

    /// # Errors
    /// The file cannot be written.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let mut text = serde_json::to_string_pretty(&self.to_json())?;
        text.push('\n');
        std::fs::write(path, text)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "quick": self.quick,
            "build": self.build,
            "started_unix": self.started_unix,
            "seconds": self.seconds,
            "machine": self.machine,
            "figures": self.figures,
        })
    }
}

/// A number for the table: thousands separated when large, three significant digits
/// when small.
pub fn human(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        let whole = v.round() as i64;
        let digits = whole.unsigned_abs().to_string();
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if whole < 0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn trim_float(x: f64) -> String {
    let s = format!("{x}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(better: Better, target: Target) -> FigureSpec {
        FigureSpec::new("x.y", "X", "rows/s", "floor", better, target)
    }

    #[test]
    fn ratio_is_oriented_so_one_means_as_good_as_the_floor() {
        let f = spec(Better::Higher, Target::RatioAtLeast(0.9)).measured(95.0, 100.0, Value::Null);
        assert_eq!(f.ratio, Some(0.95));
        assert_eq!(f.pass, Some(true));
        let f = spec(Better::Lower, Target::Below(5.0)).measured(4.0, 2.0, Value::Null);
        assert_eq!(f.ratio, Some(0.5));
        assert_eq!(f.pass, Some(true));
        let f = spec(Better::Lower, Target::AtMostFloorPlus(5.0)).measured(8.0, 2.0, Value::Null);
        assert_eq!(f.pass, Some(false));
    }

    #[test]
    fn unusable_numbers_are_errors_not_figures() {
        let f = spec(Better::Higher, Target::None).measured(1.0, 0.0, Value::Null);
        assert!(f.error.is_some());
        assert_eq!(f.pgcache, None);
    }

    #[test]
    fn table_lists_every_figure_and_the_failures() {
        let report = Report {
            quick: true,
            build: "debug",
            started_unix: 0,
            seconds: 1.0,
            machine: Value::Null,
            figures: vec![
                spec(Better::Higher, Target::RatioAtLeast(0.9)).measured(
                    123_456.0,
                    130_000.0,
                    Value::Null,
                ),
                spec(Better::Higher, Target::None).failed("Postgres did not start"),
            ],
        };
        let table = report.table();
        assert!(table.contains("123,456 rows/s"), "{table}");
        assert!(table.contains("pass"), "{table}");
        assert!(
            table.contains("FAILED x.y: Postgres did not start"),
            "{table}"
        );
        let json = report.to_json();
        assert_eq!(json["figures"].as_array().unwrap().len(), 2);
        assert_eq!(json["figures"][0]["ratio"], json!(123_456.0 / 130_000.0));
    }

    #[test]
    fn human_numbers() {
        assert_eq!(human(1_234_567.4), "1,234,567");
        assert_eq!(human(0.1234), "0.123");
        assert_eq!(human(12.345), "12.3");
    }
}
