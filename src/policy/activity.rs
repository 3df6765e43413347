//! An agent's calls and errors over the last minute, for policies such as
//! `runaway_guard`: one-second buckets of atomics, no lock.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::record::now_micros;

const SECONDS: usize = 60;

/// Each bucket packs the second it counts (high 32 bits) and its count.
#[derive(Debug)]
struct Window {
    buckets: [AtomicU64; SECONDS],
}

impl Default for Window {
    fn default() -> Self {
        Window {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Window {
    fn add(&self, now_s: u64) {
        let bucket = &self.buckets[now_s as usize % SECONDS];
        let mut current = bucket.load(Ordering::Relaxed);
        loop {
            let next = if current >> 32 == now_s & 0xffff_ffff {
                current + 1
            } else {
                (now_s << 32) | 1
            };
            match bucket.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// Counts of the 60 seconds up to and including `now_s`.
    fn sum(&self, now_s: u64) -> u64 {
        let oldest = now_s.saturating_sub(SECONDS as u64 - 1) & 0xffff_ffff;
        let now_s = now_s & 0xffff_ffff;
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .filter(|v| (oldest..=now_s).contains(&(v >> 32)))
            .map(|v| v & 0xffff_ffff)
            .sum()
    }
}

#[derive(Debug, Default)]
pub struct Activity {
    calls: Window,
    errors: Window,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ActivityCounts {
    pub calls_last_minute: u64,
    pub errors_last_minute: u64,
}

fn seconds(unix_us: i64) -> u64 {
    (unix_us / 1_000_000) as u64
}

impl Activity {
    /// Counts a call started at `now_us` (Unix µs).
    pub fn call_started(&self, now_us: i64) {
        self.calls.add(seconds(now_us));
    }

    pub fn call_failed(&self) {
        self.errors.add(seconds(now_micros()));
    }

    /// The minute up to `now_us` (Unix µs).
    pub fn counts(&self, now_us: i64) -> ActivityCounts {
        self.counts_at(seconds(now_us))
    }

    fn counts_at(&self, now_s: u64) -> ActivityCounts {
        ActivityCounts {
            calls_last_minute: self.calls.sum(now_s),
            errors_last_minute: self.errors.sum(now_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_last_sixty_seconds_only() {
        let activity = Activity::default();
        let t = 1_764_000_000;
        for s in 0..5 {
            activity.calls.add(t + s);
            activity.calls.add(t + s);
        }
        activity.errors.add(t + 4);
        assert_eq!(activity.counts_at(t + 4).calls_last_minute, 10);
        assert_eq!(activity.counts_at(t + 4).errors_last_minute, 1);
        // A minute later the first second has left the window.
        assert_eq!(activity.counts_at(t + 60).calls_last_minute, 8);
        // A bucket reused for a new second starts again from one.
        activity.calls.add(t + 60);
        assert_eq!(activity.counts_at(t + 60).calls_last_minute, 9);
        assert_eq!(activity.counts_at(t + 200).calls_last_minute, 0);
    }
}
