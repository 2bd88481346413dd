//! Probabilistic early refresh (XFetch, Vattani et al., "Optimal Probabilistic Cache
//! Stampede Prevention", VLDB 2015): a hit on a key with a TTL refreshes it early with a
//! probability that rises as expiry nears and with the time a fill takes, so a hot key is
//! rewritten shortly before it expires instead of expiring into a burst of misses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Assumed fill time before this process has measured one.
const DEFAULT_FILL_TIME: Duration = Duration::from_millis(10);

/// Whether to refresh now: `-delta * beta * ln(u) >= remaining`, with `u` uniform in (0, 1].
pub(crate) fn should_refresh(delta: Duration, beta: f64, remaining: Duration, u: f64) -> bool {
    let u = u.clamp(f64::MIN_POSITIVE, 1.0);
    -delta.as_secs_f64() * beta * u.ln() >= remaining.as_secs_f64()
}

/// A moving average of how long fills take (lease taken to value written), per table.
#[derive(Default)]
pub(crate) struct FillTimer {
    /// Microseconds; 0 until the first fill.
    micros: AtomicU64,
}

impl FillTimer {
    pub(crate) fn record(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        // Racing updates may drop a sample; an average does not mind.
        let old = self.micros.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.micros.store(new, Ordering::Relaxed);
    }

    /// The delta of XFetch.
    pub(crate) fn delta(&self) -> Duration {
        match self.micros.load(Ordering::Relaxed) {
            0 => DEFAULT_FILL_TIME,
            us => Duration::from_micros(us),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_probability_rises_near_expiry() {
        let delta = Duration::from_millis(10);
        let chance = |remaining: Duration| {
            (1..=1000)
                .filter(|i| should_refresh(delta, 1.0, remaining, *i as f64 / 1000.0))
                .count()
        };
        // -0.01 * ln(u) >= remaining  <=>  u <= exp(-remaining / 0.01)
        assert_eq!(chance(Duration::from_secs(10)), 0);
        let near = chance(Duration::from_millis(10));
        assert!((360..=375).contains(&near), "{near}");
        assert_eq!(chance(Duration::ZERO), 1000);
        assert!(chance(Duration::from_millis(5)) > near);
        // A larger beta refreshes earlier.
        assert!(should_refresh(delta, 10.0, Duration::from_millis(50), 0.5));
        assert!(!should_refresh(delta, 1.0, Duration::from_millis(50), 0.5));
        // u = 0 must not produce NaN or infinity trouble.
        assert!(should_refresh(delta, 1.0, Duration::from_secs(1), 0.0));
    }

    #[test]
    fn fill_timer_averages() {
        let t = FillTimer::default();
        assert_eq!(t.delta(), DEFAULT_FILL_TIME);
        t.record(Duration::from_millis(8));
        assert_eq!(t.delta(), Duration::from_millis(8));
        for _ in 0..100 {
            t.record(Duration::from_millis(16));
        }
        let d = t.delta();
        assert!(
            d > Duration::from_millis(15) && d <= Duration::from_millis(16),
            "{d:?}"
        );
    }
}
