//! Per-module evaluation counts and a lock-free latency histogram, for
//! `warden policy list` and the metrics page.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Values below this many µs get a bucket each; above, eight buckets per
/// power of two (at most 12.5 % wide).
const LINEAR: u64 = 16;
const SUB: u64 = 8;
const BUCKETS: usize = (LINEAR + (40 - 4) * SUB) as usize;

#[derive(Debug)]
pub struct ModuleStats {
    errors: AtomicU64,
    timeouts: AtomicU64,
    micros: Box<[AtomicU64]>,
}

impl Default for ModuleStats {
    fn default() -> Self {
        ModuleStats {
            errors: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            micros: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket_of(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let exponent = 63 - u64::from(us.leading_zeros());
    let mantissa = (us >> (exponent - 3)) & (SUB - 1);
    ((LINEAR + (exponent - 4) * SUB + mantissa) as usize).min(BUCKETS - 1)
}

/// The upper end of a bucket, in µs.
fn bucket_top(index: usize) -> u64 {
    let index = index as u64;
    if index < LINEAR {
        return index;
    }
    let exponent = (index - LINEAR) / SUB + 4;
    let mantissa = (index - LINEAR) % SUB;
    ((SUB + mantissa + 1) << (exponent - 3)) - 1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub evaluations: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

impl ModuleStats {
    pub fn observe(&self, took: Duration, error: bool, timeout: bool) {
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if timeout {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        let us = took.as_micros().min(u128::from(u64::MAX)) as u64;
        self.micros[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let counts: Vec<u64> = self
            .micros
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let quantile = |q: f64| {
            if total == 0 {
                return 0;
            }
            let rank = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, count) in counts.iter().enumerate() {
                seen += count;
                if seen >= rank {
                    return bucket_top(i);
                }
            }
            bucket_top(BUCKETS - 1)
        };
        StatsSnapshot {
            // Every evaluation lands in one bucket: one shared counter fewer
            // to bump per evaluation.
            evaluations: total,
            errors: self.errors.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            p50_us: quantile(0.50),
            p99_us: quantile(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_values_within_an_eighth() {
        for us in [0, 1, 15, 16, 17, 100, 1_000, 4_999, 65_536, 10_000_000] {
            let i = bucket_of(us);
            assert!(
                bucket_top(i) >= us,
                "{us} above its bucket's top {}",
                bucket_top(i)
            );
            assert!(
                bucket_top(i) <= us + us / 8 + 1,
                "{us}: bucket top {} too wide",
                bucket_top(i)
            );
        }
    }

    #[test]
    fn quantiles_follow_the_observations() {
        let stats = ModuleStats::default();
        for _ in 0..98 {
            stats.observe(Duration::from_micros(3), false, false);
        }
        stats.observe(Duration::from_micros(900), true, false);
        stats.observe(Duration::from_millis(5), true, true);
        let s = stats.snapshot();
        assert_eq!((s.evaluations, s.errors, s.timeouts), (100, 2, 1));
        assert_eq!(s.p50_us, 3);
        assert!((900..=1_023).contains(&s.p99_us), "{}", s.p99_us);
    }
}
