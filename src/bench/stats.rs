//! Percentiles of measured durations, and the daemon's own latency histogram as its
//! Prometheus endpoint prints it.

use std::time::Duration;

/// The `q` quantile (0..=1) of `sorted` by nearest rank; `None` when empty.
pub fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The median of a few samples.
pub fn median(mut samples: Vec<Duration>) -> Option<Duration> {
    samples.sort();
    percentile(&samples, 0.5)
}

/// A Prometheus histogram: cumulative counts per upper bound (`le`), `+Inf` last.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    /// Reads the unlabelled histogram `name` (`name_bucket{le="..."}`, `name_sum`,
    /// `name_count`) from Prometheus text; `None` when it is not there.
    pub fn parse(text: &str, name: &str) -> Option<Histogram> {
        let mut h = Histogram::default();
        let bucket_prefix = format!("{name}_bucket{{le=\"");
        let mut seen = false;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&bucket_prefix) {
                let (le, rest) = rest.split_once("\"}")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                let count = parse_count(rest.trim())?;
                h.buckets.push((le, count));
                seen = true;
            } else if let Some(rest) = line.strip_prefix(&format!("{name}_sum ")) {
                h.sum = rest.trim().parse().ok()?;
            } else if let Some(rest) = line.strip_prefix(&format!("{name}_count ")) {
                h.count = parse_count(rest.trim())?;
            }
        }
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        seen.then_some(h)
    }

    /// What was recorded between `earlier` and `self` (both cumulative, same buckets).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let before = |le: f64| {
            earlier
                .buckets
                .iter()
                .find(|(e, _)| *e == le)
                .map_or(0, |(_, c)| *c)
        };
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, c)| (le, c.saturating_sub(before(le))))
                .collect(),
            count: self.count.saturating_sub(earlier.count),
            sum: self.sum - earlier.sum,
        }
    }

    /// The upper bound of the bucket that holds the `q` quantile: "p99 <= this".
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).max(1);
        self.buckets
            .iter()
            .find(|(_, c)| *c >= rank)
            .map(|(le, _)| *le)
    }
}

/// Counts print as integers, or as floats (`12.0`, `1e3`) from some exporters.
fn parse_count(text: &str) -> Option<u64> {
    text.parse::<u64>()
        .ok()
        .or_else(|| text.parse::<f64>().ok().map(|f| f as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&v, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&v, 0.999), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&v, 0.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn histogram_from_prometheus_text() {
        let text = "# TYPE pgcache_apply_latency_seconds histogram\n\
            pgcache_apply_latency_seconds_bucket{le=\"0.001\"} 10\n\
            pgcache_apply_latency_seconds_bucket{le=\"0.0025\"} 95\n\
            pgcache_apply_latency_seconds_bucket{le=\"0.005\"} 100\n\
            pgcache_apply_latency_seconds_bucket{le=\"+Inf\"} 100\n\
            pgcache_apply_latency_seconds_sum 0.15\n\
            pgcache_apply_latency_seconds_count 100\n\
            pgcache_other_bucket{le=\"1\"} 3\n";
        let h = Histogram::parse(text, "pgcache_apply_latency_seconds").unwrap();
        assert_eq!(h.count, 100);
        assert_eq!(h.buckets.len(), 4);
        assert_eq!(h.quantile_bound(0.5), Some(0.0025));
        assert_eq!(h.quantile_bound(0.99), Some(0.005));
        let earlier = Histogram {
            buckets: vec![(0.001, 10), (0.0025, 10), (0.005, 10), (f64::INFINITY, 10)],
            count: 10,
            sum: 0.005,
        };
        let delta = h.since(&earlier);
        assert_eq!(delta.count, 90);
        assert_eq!(delta.quantile_bound(0.01), Some(0.0025));
        assert!(Histogram::parse(text, "pgcache_missing").is_none());
    }
}
