//! The daemon's progress as the demo sees it: a `metrics` recorder, installed in process,
//! that keeps the few series the live view shows (changes and transactions applied, apply
//! latency, errors, reconnects) and ignores the rest.
//!
//! The daemon records through the `metrics` facade whatever recorder is installed, so the
//! numbers shown are the ones a Prometheus dashboard would show, not a separate count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

use crate::metrics as m;

/// Totals since the recorder was installed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Progress {
    /// Row changes the daemon applied to Redis (`pgcache_changes_total`).
    pub changes: u64,
    /// Postgres transactions applied (`pgcache_transactions_total`).
    pub transactions: u64,
    pub errors: u64,
    pub reconnects: u64,
    /// Commit in Postgres to EXEC acknowledged by Redis, over all transactions.
    pub latency: Latency,
}

/// Count, sum and maximum of apply latencies, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub sum: f64,
    pub max: f64,
}

impl Latency {
    /// The mean in milliseconds, `None` without samples.
    pub fn mean_ms(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64 * 1e3)
    }

    pub fn max_ms(&self) -> Option<f64> {
        (self.count > 0).then_some(self.max * 1e3)
    }
}

/// What the recorder hands out: shared by every handle of a series.
#[derive(Default)]
pub struct Meter {
    changes: Arc<Total>,
    transactions: Arc<Total>,
    errors: Arc<Total>,
    reconnects: Arc<Total>,
    latency: Arc<LatencyTotal>,
}

#[derive(Default)]
struct Total(AtomicU64);

impl CounterFn for Total {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

/// Latencies over the whole run, and since the view last took a window.
#[derive(Default)]
struct LatencyTotal(Mutex<(Latency, Latency)>);

impl Latency {
    fn add(&mut self, seconds: f64) {
        self.count += 1;
        self.sum += seconds;
        self.max = self.max.max(seconds);
    }
}

impl HistogramFn for LatencyTotal {
    fn record(&self, value: f64) {
        if let Ok(mut both) = self.0.lock() {
            both.0.add(value);
            both.1.add(value);
        }
    }
}

impl Meter {
    /// Installs a recorder as the process's global one and returns what it counts.
    ///
    /// # Errors
    /// When another recorder is already installed (a process gets one); the view then
    /// shows the daemon's progress as unknown instead of zero.
    pub fn install() -> Result<Arc<Meter>, String> {
        let meter = Arc::new(Meter::default());
        metrics::set_global_recorder(MeterRecorder(meter.clone()))
            .map_err(|_| "another metrics recorder is installed".to_string())?;
        Ok(meter)
    }

    pub fn progress(&self) -> Progress {
        let get = |t: &Total| t.0.load(Ordering::Relaxed);
        Progress {
            changes: get(&self.changes),
            transactions: get(&self.transactions),
            errors: get(&self.errors),
            reconnects: get(&self.reconnects),
            latency: self.latency.0.lock().map(|both| both.0).unwrap_or_default(),
        }
    }

    /// Apply latencies since the last call (the first call: since installation).
    pub fn take_latency_window(&self) -> Latency {
        self.latency
            .0
            .lock()
            .map(|mut both| std::mem::take(&mut both.1))
            .unwrap_or_default()
    }
}

struct MeterRecorder(Arc<Meter>);

impl Recorder for MeterRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let total = match key.name() {
            m::CHANGES => &self.0.changes,
            m::TRANSACTIONS => &self.0.transactions,
            m::ERRORS => &self.0.errors,
            m::RECONNECTS => &self.0.reconnects,
            _ => return Counter::noop(),
        };
        Counter::from_arc(total.clone())
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        if key.name() == m::APPLY_LATENCY {
            Histogram::from_arc(self.0.latency.clone())
        } else {
            Histogram::noop()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_series_the_view_shows() {
        let meter = Arc::new(Meter::default());
        let recorder = MeterRecorder(meter.clone());
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!(m::CHANGES, "table" => "public.t", "op" => "insert").increment(3);
            metrics::counter!(m::CHANGES, "table" => "public.u", "op" => "delete").increment(1);
            metrics::counter!(m::TRANSACTIONS).increment(2);
            metrics::counter!(m::BATCHES).increment(7);
            metrics::histogram!(m::APPLY_LATENCY).record(0.002);
            metrics::histogram!(m::APPLY_LATENCY).record(0.004);
            metrics::histogram!(m::EXEC_SECONDS).record(9.0);
        });
        let p = meter.progress();
        assert_eq!((p.changes, p.transactions, p.errors), (4, 2, 0));
        assert_eq!(p.latency.count, 2);
        assert!((p.latency.mean_ms().unwrap() - 3.0).abs() < 1e-9);
        assert!((p.latency.max_ms().unwrap() - 4.0).abs() < 1e-9);
        assert_eq!(meter.take_latency_window().count, 2);
        assert_eq!(meter.take_latency_window().count, 0);
        assert_eq!(meter.progress().latency.count, 2);
    }
}
