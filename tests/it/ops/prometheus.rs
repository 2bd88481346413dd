//! A strict reader of the Prometheus text exposition format, for testing `/metrics`.

use std::collections::{BTreeMap, HashMap};

/// A sample's labels other than `le`, sorted: one histogram series.
type Labels = Vec<(String, String)>;

/// One sample of the Prometheus text format.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A strict reader of the Prometheus text format (0.0.4): every line is a HELP, a TYPE or a
/// sample; names and labels are well formed; values are floats; each sample belongs to a
/// family whose TYPE came first; histogram buckets rise and end at `+Inf` = `_count`.
pub fn parse_prometheus(text: &str) -> Result<(Vec<Sample>, HashMap<String, String>), String> {
    fn valid_name(s: &str) -> bool {
        let mut chars = s.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    fn value(s: &str) -> Result<f64, String> {
        match s {
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            "NaN" => Ok(f64::NAN),
            s => s.parse().map_err(|_| format!("bad value {s:?}")),
        }
    }
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let err = |what: &str| format!("line {}: {what}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            if !valid_name(name) {
                return Err(err("bad HELP name"));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (Some(name), Some(kind), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(err("bad TYPE line"));
            };
            if !valid_name(name)
                || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
            {
                return Err(err("bad TYPE"));
            }
            if types.insert(name.to_string(), kind.to_string()).is_some() {
                return Err(err("TYPE given twice"));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| err("no value"))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(err("bad metric name"));
        }
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let end;
            loop {
                match chars.peek() {
                    Some(&(i, '}')) => {
                        end = i;
                        break;
                    }
                    None => return Err(err("unclosed labels")),
                    _ => {}
                }
                let start = chars.peek().map(|&(i, _)| i).unwrap_or(0);
                let eq = body[start..]
                    .find('=')
                    .ok_or_else(|| err("label without ="))?
                    + start;
                let label = &body[start..eq];
                if !valid_name(label) || label.contains(':') {
                    return Err(err("bad label name"));
                }
                while chars.peek().is_some_and(|&(i, _)| i <= eq) {
                    chars.next();
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(err("label value not quoted"));
                }
                let mut value_text = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value_text.push('\n'),
                            Some((_, c @ ('\\' | '"'))) => value_text.push(c),
                            _ => return Err(err("bad escape")),
                        },
                        Some((_, '"')) => break,
                        Some((_, c)) => value_text.push(c),
                        None => return Err(err("unterminated label value")),
                    }
                }
                labels.insert(label.to_string(), value_text);
                if chars.peek().map(|&(_, c)| c) == Some(',') {
                    chars.next();
                }
            }
            rest = &body[end + 1..];
        }
        let mut fields = rest.trim_start_matches(' ').split(' ');
        let value = value(fields.next().ok_or_else(|| err("no value"))?).map_err(|e| err(&e))?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| err("bad timestamp"))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing text"));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s).filter(|base| {
                    types
                        .get(*base)
                        .is_some_and(|t| t == "histogram" || t == "summary")
                })
            })
            .unwrap_or(name);
        if !types.contains_key(family) {
            return Err(err("sample before its TYPE"));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    // Histograms: cumulative buckets, +Inf equal to _count, per label set.
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let bucket = format!("{family}_bucket");
        let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
        for s in samples.iter().filter(|s| s.name == bucket) {
            let le = value(s.labels.get("le").ok_or("a bucket without le")?)?;
            let key = s
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            series.entry(key).or_default().push((le, s.value));
        }
        for (key, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
                return Err(format!("{family}: buckets are not cumulative"));
            }
            let count = samples
                .iter()
                .find(|s| {
                    s.name == format!("{family}_count")
                        && s.labels
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect::<Vec<_>>()
                            == key
                })
                .ok_or(format!("{family}: no _count"))?;
            match buckets.last() {
                Some(&(le, n)) if le.is_infinite() && n == count.value => {}
                _ => return Err(format!("{family}: the +Inf bucket is not _count")),
            }
        }
    }
    Ok((samples, types))
}

pub fn counter(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}
